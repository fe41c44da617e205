"""Every shell command in README.md and docs/*.md (fenced and indented code blocks) is either
checked here or listed with the reason it is not, so a command that changes, disappears or
breaks fails the suite.

Checked: each `python -m flamingo_jax.<verb>` command goes through the real program up to
the point where it would start the work: its argument parser, its config file loaded from
the path the doc gives (any working directory), the doc's `--config.*` overrides applied and
every section parsed (the trainers' setup(), the evaluation's composed `eval` section), the
prompt's image markers (generate), the converters' flags. The work itself (training,
evaluating, converting weights) is what the tests named in NOT_HERE and the trainers' own
tests run on tiny data. Placeholders (DIR, MODEL_DIR, OUT, /data/...) become temporary paths.
"""
import glob
import os
import re
import shlex

import pytest

from flamingo_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO)
                              for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
# A line of a code block that is a command (not a file tree, Python or program output).
PROGRAM = re.compile(r"^(python3? |\.venv/bin/python |make |pip |cat |sbatch |launch/\S+\.sh|"
                     r"benchmarks/\S+\.(py|sh)|[A-Z_]+=\S* )")

# Commands not run here, by a pattern of the command line, with the reason.
NOT_HERE = [
    (r"^make (demo|test)$", "the whole demo (11 min) / the whole suite; tests/test_demo.py "
     "runs the demo at smoke scale"),
    (r"^(python|\.venv/bin/python) benchmarks/", "minutes to hours of CPU or a GPU; the "
     "results and their machines are in docs/benchmarks.md (tests/test_benchmarks.py checks "
     "the scripts' pieces)"),
    (r"benchmarks/gpu_\w+\.sh", "needs a GPU machine (docs/benchmarks.md)"),
    (r"^python3 -m venv ", "builds a separate reference venv (docs/nfnet.md)"),
    (r"^cat ", "prints a file the evaluation above wrote"),
    (r"^JAX_PLATFORMS=cpu python -m flamingo_jax.evaluate .*--config\.distributed\.",
     "two processes joined through jax.distributed (tests/test_eval_multiprocess.py)"),
    (r"^python -m flamingo_jax\.data\.(train_tokenizer|convert|synthetic) ",
     "writes a tokenizer / records / the synthetic world from input files "
     "(tests/test_data_tokenizer.py, test_data_sources.py, test_data_synthetic.py)"),
    (r"configs/from_hf_lm\.py:lm", "needs a `convert hf-lm` output (tests/test_train_from_hf_lm"
     ".py converts a tiny random Llama and trains on it)"),
]

# Placeholders of the docs -> what the check passes instead ({tmp}: a temporary directory).
PLACEHOLDERS = [("--num_samples N", "--num_samples 4"),
                ("--config.eval.KEY=VALUE", "--config.eval.batch_size=4"),
                ("MODEL_DIR", "{tmp}/model"), ("DATA_ROOT", "{tmp}/data"), ("/data/", "{tmp}/"),
                ("/results/", "{tmp}/results/"), ("/ckpt/", "{tmp}/ckpt/")]


def _code_blocks(text):
  for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
    yield m.group(1)
  for m in re.finditer(r"(?:(?<=\n\n)|^)((?:    [^\n]*\n|\n)+)", text):
    yield "\n".join(line[4:] for line in m.group(1).split("\n"))


def collect():
  """[(doc, command)] in doc order, continuation lines joined, comments dropped."""
  out = []
  for doc in DOCS:
    with open(os.path.join(REPO, doc)) as f:
      text = f.read()
    for block in _code_blocks(text):
      for line in block.replace("\\\n", " ").split("\n"):
        line = " ".join(re.split(r"\s+#\s", line)[0].split())
        if PROGRAM.match(line) and (doc, line) not in out:
          out.append((doc, line))
  return out


COMMANDS = collect()


def _argv(command, tmp):
  """The command's words after `python -m flamingo_jax.<verb>`, optional [...] parts kept
  (their brackets dropped), {a,b} alternatives as their first, placeholders filled."""
  command = re.sub(r"\[([^\[\]]*)\]", r"\1", command)
  command = re.sub(r"\{(\w+),[\w,]+\}", r"\1", command)
  for old, new in PLACEHOLDERS:
    command = command.replace(old, new.format(tmp=tmp))
  words = shlex.split(command)
  words = [w.replace("DIR", f"{tmp}/dir") if w in ("DIR", "--workdir=DIR") else w
           for w in words]
  start = words.index("-m")
  return words[start + 1], words[start + 2:]


class _Reached(Exception):
  """The program got to the start of its work with every argument and config accepted."""


def _check_trainer(module, argv, monkeypatch):
  from flamingo_jax.runtime import distributed
  monkeypatch.setattr(distributed, "fake_cpu_devices", lambda n, flag="": None)
  seen = []

  def run(config, workdir, **kwargs):
    seen.append(module.setup(config))  # every section parsed and cross-checked
    raise _Reached

  monkeypatch.setattr(module, "run", run)
  if hasattr(module, "evaluate_checkpoint"):
    monkeypatch.setattr(module, "evaluate_checkpoint", lambda config, *a: run(config, None))
  with pytest.raises(_Reached):
    module.main(argv)
  assert seen


def _check_evaluate(argv, monkeypatch):
  from flamingo_jax import model_dir
  from flamingo_jax.config import load_config
  from flamingo_jax.evaluate import cli
  from flamingo_jax.runtime import distributed
  tiny = load_config(os.path.join(REPO, "configs", "tiny.py")).model
  monkeypatch.setattr(model_dir, "check_not_lm_only", lambda d: None)
  monkeypatch.setattr(model_dir, "read_model_config",
                      lambda d, overrides=(): model_dir.with_overrides(tiny, overrides))
  monkeypatch.setattr(distributed, "fake_cpu_devices", lambda n, flag="": None)

  def reached(*args):  # the composed eval section (every task) has been validated
    raise _Reached
  monkeypatch.setattr(distributed, "initialize", reached)
  with pytest.raises(_Reached):
    cli.main(argv)


def _check_generate(argv, monkeypatch):
  from flamingo_jax import model_dir
  from flamingo_jax.apps import generate
  monkeypatch.setattr(model_dir, "check_not_lm_only", lambda d: (_ for _ in ()).throw(_Reached))
  with pytest.raises(_Reached):
    generate.main(argv)


def _check_demo(argv, monkeypatch):
  import jax
  from flamingo_jax.apps.demo import stages
  calls = []
  monkeypatch.setattr(stages, "run", lambda *a, **k: calls.append(a) or {})
  monkeypatch.setattr(stages, "run_seeds", lambda workdir, scale, seeds, force: calls.append(
      seeds) or {s: {"eval": {}} for s in seeds})
  for name in ("seeds_table", "results_table", "margins"):  # nothing was evaluated
    monkeypatch.setattr(stages.report, name, lambda ev, n=name: {} if n == "margins" else "")
  cache = jax.config.jax_compilation_cache_dir
  try:
    assert errors.run_cli(stages.main, argv) == 0
  finally:
    jax.config.update("jax_compilation_cache_dir", cache)
  assert calls


def _check_convert(argv, monkeypatch):
  from flamingo_jax.convert.__main__ import build_parser
  args = build_parser().parse_args(argv)
  assert args.subcommand == argv[0]


def _check_count_params(argv, monkeypatch, capsys):
  from flamingo_jax.apps import count_params
  count_params.main(argv)
  out = capsys.readouterr().out
  assert ('"total"' if "--json" in argv else "total ") in out, out


def check(command, tmp, monkeypatch, capsys):
  """Raises unless the command is accepted as far as it can run here."""
  verb, argv = _argv(command, tmp)
  if verb in ("flamingo_jax.train", "flamingo_jax.contrastive", "flamingo_jax.lm_pretrain"):
    import importlib
    name = {"flamingo_jax.train": "flamingo", "flamingo_jax.contrastive": "contrastive",
            "flamingo_jax.lm_pretrain": "lm"}[verb]
    _check_trainer(importlib.import_module(f"flamingo_jax.trainers.{name}.train"), argv,
                   monkeypatch)
  elif verb == "flamingo_jax.evaluate":
    _check_evaluate(argv, monkeypatch)
  elif verb == "flamingo_jax.generate":
    _check_generate(argv, monkeypatch)
  elif verb == "flamingo_jax.demo":
    _check_demo(argv, monkeypatch)
  elif verb == "flamingo_jax.convert":
    _check_convert(argv, monkeypatch)
  elif verb == "flamingo_jax.tools.count_params":
    _check_count_params(argv, monkeypatch, capsys)
  else:
    raise AssertionError(f"no check for {verb!r}: add one, or a NOT_HERE entry with a reason")


def reason(command):
  for pattern, why in NOT_HERE:
    if re.search(pattern, command):
      return why
  return None


def test_the_docs_have_commands_and_every_one_is_covered():
  """A command no check and no NOT_HERE entry covers fails here, by name."""
  assert len(COMMANDS) >= 50, COMMANDS
  checked = {"flamingo_jax.train", "flamingo_jax.contrastive", "flamingo_jax.lm_pretrain",
             "flamingo_jax.evaluate", "flamingo_jax.generate", "flamingo_jax.demo",
             "flamingo_jax.convert", "flamingo_jax.tools.count_params"}
  uncovered = [f"{doc}: {c}" for doc, c in COMMANDS if reason(c) is None
               and not re.search(r"-m (" + "|".join(map(re.escape, checked)) + r") ", c)]
  assert not uncovered, "\n".join(uncovered)


@pytest.mark.slow
@pytest.mark.parametrize("doc,command", [(d, c) for d, c in COMMANDS if reason(c) is None],
                         ids=lambda x: x if x.endswith(".md") else x[:60])
def test_doc_command(doc, command, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # config paths as the docs write them, from elsewhere
  check(command, str(tmp_path), monkeypatch, capsys)


def test_synthetic_sizes_the_docs_quote_are_the_tools_defaults():
  """docs/data.md's default sizes are `data.synthetic.Sizes()`'s (questions: 2 per pair)."""
  from flamingo_jax.data.synthetic import Sizes
  with open(os.path.join(REPO, "docs", "data.md")) as f:
    text = " ".join(f.read().split())
  m = re.search(r"Default size \((\d+)/(\d+) pairs, (\d+)/(\d+) questions, (\d+)/(\d+) "
                r"documents, (\d+)/(\d+) videos, a ([\d,]+)-line corpus", text)
  assert m, "docs/data.md no longer quotes the synthetic world's default sizes"
  n = [int(g.replace(",", "")) for g in m.groups()]
  d = Sizes()
  assert n == [*d.pairs, *(2 * x for x in d.pairs), *d.documents, *d.videos, d.corpus_lines]
