"""The import rule of docs/architecture.md, read from the source: apps -> trainers -> library ->
foundation, each module importing only its own layer or lower ones, no circles between modules,
and a training library that knows no model family."""
import ast
import os
import re

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flamingo_jax")

# The command names users' launch scripts call (`python -m flamingo_jax.<verb>`): entry modules.
ENTRY_MODULES = ("train", "contrastive", "lm_pretrain", "generate", "demo", "ablations", "tools")
LAYERS = (  # lowest first: (layer, top-level names under flamingo_jax)
    ("foundation", ("", "config", "errors", "process", "models", "data")),
    ("library", ("training", "evaluate", "convert", "runtime", "model_dir")),
    ("trainers", ("trainers",)),
    ("apps", ("apps",) + ENTRY_MODULES),
)
TRAINING_MUST_NOT_IMPORT = ("flamingo_jax.models.flamingo", "flamingo_jax.models.xattn",
                            "flamingo_jax.models.layer_stack", "flamingo_jax.models.config",
                            "flamingo_jax.trainers", "flamingo_jax.apps")


def module_files() -> dict[str, str]:
  """'flamingo_jax.a.b' -> path, for every module of the package (packages as their __init__)."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if not f.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3]
      parts = rel.split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = os.path.join(root, f)
  return out


def imports_of(name: str, path: str, modules: set[str]) -> set[str]:
  """The flamingo_jax modules `name` imports anywhere in its file (function-local ones too)."""
  is_package = path.endswith("__init__.py")
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("flamingo_jax"))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        anchor = name.split(".") if is_package else name.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      if not base.startswith("flamingo_jax"):
        continue
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        found.add(sub if sub in modules else base)
  found.discard(name)
  return {m for m in found if m in modules}


def layer_of(module: str) -> int:
  top = module.split(".")[1] if "." in module else ""
  for rank, (_, names) in enumerate(LAYERS):
    if top in names:
      return rank
  raise AssertionError(f"{module}: in no layer of tests/test_layout.py's LAYERS; add its "
                       "top-level name where it belongs (and to docs/architecture.md)")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
  files = module_files()
  return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def test_every_import_goes_down_or_sideways(graph):
  upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
            for m, deps in sorted(graph.items()) for d in sorted(deps)
            if layer_of(d) > layer_of(m)]
  assert not upward, "imports against the layer rule:\n" + "\n".join(upward)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's strongly connected components of more than one module."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_import_circles(graph):
  assert not circles(graph), f"import circles: {circles(graph)}"


def test_training_library_knows_no_model_family(graph):
  bad = [f"{m} imports {d}" for m, deps in sorted(graph.items()) if m.startswith(
      "flamingo_jax.training") for d in sorted(deps) if d.startswith(TRAINING_MUST_NOT_IMPORT)]
  assert not bad, "\n".join(bad)


def test_entry_modules_only_name_their_program():
  """`python -m flamingo_jax.train` etc. resolve to the program's cli_main, nothing else."""
  files = module_files()
  for verb in ENTRY_MODULES:
    names = [verb] if f"flamingo_jax.{verb}" in files and not files[
        f"flamingo_jax.{verb}"].endswith("__init__.py") else [
            m.split(".", 1)[1] for m in files if m.startswith(f"flamingo_jax.{verb}.")]
    for name in names:
      tree = ast.parse(open(files[f"flamingo_jax.{name}"]).read())
      targets = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
      assert len(targets) == 1 and targets[0].startswith(
          ("flamingo_jax.apps.", "flamingo_jax.trainers.")), (name, targets)
      assert sum(isinstance(n, ast.FunctionDef) for n in ast.walk(tree)) == 0, name


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
  """The rule's reader on a made-up package: it must find what it is there to find."""
  modules = {"flamingo_jax.models.a", "flamingo_jax.models.b", "flamingo_jax.apps.c"}
  (tmp_path / "a.py").write_text("from flamingo_jax.models import b\nfrom flamingo_jax.apps import c\n")
  (tmp_path / "b.py").write_text("def f():\n  from flamingo_jax.models.a import x\n")
  got_a = imports_of("flamingo_jax.models.a", str(tmp_path / "a.py"), modules)
  got_b = imports_of("flamingo_jax.models.b", str(tmp_path / "b.py"), modules)
  assert got_a == {"flamingo_jax.models.b", "flamingo_jax.apps.c"}
  assert got_b == {"flamingo_jax.models.a"}  # a function-local import counts
  assert layer_of("flamingo_jax.apps.c") > layer_of("flamingo_jax.models.a")
  assert circles({"flamingo_jax.models.a": got_a, "flamingo_jax.models.b": got_b,
                  "flamingo_jax.apps.c": set()}) == [["flamingo_jax.models.a",
                                                      "flamingo_jax.models.b"]]


def test_docs_name_files_that_exist():
  """Every source path README.md and docs/ name (flamingo_jax/..., configs/..., tests/...,
  benchmarks/..., launch/...) is in the tree, so a move that leaves the docs behind fails."""
  repo = os.path.dirname(PACKAGE)
  docs = [os.path.join(repo, "README.md")] + [
      os.path.join(repo, "docs", f) for f in sorted(os.listdir(os.path.join(repo, "docs")))
      if f.endswith(".md")]
  pattern = re.compile(r"(?<![\w./-])((?:flamingo_jax|configs|tests|benchmarks|launch)/"
                       r"[\w./-]*\w(?:\.py|\.sh|/))")
  packages = "|".join(f for f in os.listdir(PACKAGE) if os.path.isdir(os.path.join(PACKAGE, f))
                       and not f.startswith("__"))
  short = re.compile(rf"(?<![\w./-])((?:{packages})/[\w/]*\w\.py)")  # a path inside the package
  missing = []
  for doc in docs:
    for line_no, line in enumerate(open(doc), 1):
      paths = pattern.findall(line) + [f"flamingo_jax/{p}" for p in short.findall(line)]
      for path in paths:
        if not os.path.exists(os.path.join(repo, path)):
          missing.append(f"{os.path.relpath(doc, repo)}:{line_no}: {path}")
  assert not missing, "docs name paths that do not exist:\n" + "\n".join(missing)
