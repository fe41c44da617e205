"""Bad input to a CLI gives one `error: ...` line naming the culprit and exit status 2.

Bugs keep their traceback, and FLAMINGO_JAX_TRACEBACK=1 or --traceback shows
the traceback of a user error too. Cheap cases call the CLI's main through
run_cli in this process; a few run the real `python -m ...` command.
"""
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from flamingo_jax.runtime import params_io
from flamingo_jax import errors
from flamingo_jax.data import convert, synthetic, train_tokenizer
from flamingo_jax.training import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.startswith("error: ")]


def assert_one_error(rc: int, stderr: str, *names: str) -> str:
  """Exit status 2, no traceback, exactly one `error:` line that names every `names`."""
  assert rc == errors.EXIT_USER_ERROR, stderr
  assert "Traceback" not in stderr, stderr
  lines = error_lines(stderr)
  assert len(lines) == 1, stderr
  for name in names:
    assert name in lines[0], (name, lines[0])
  return lines[0]


# ------------------------------------------------------------ the data tools


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli")
  (d / "junk.tar").write_bytes(b"not a tar file" * 40)
  (d / "empty.txt").write_text("")
  (d / "corpus.txt").write_text("a red circle\na blue square\n" * 20)
  return d


DATA_CASES = {
    "convert: no shard matches": (
        convert.main, "--kind pairs --input {d}/nothing*.tar --out {d}/o",
        ["no tar shards match", "nothing*.tar"]),
    "convert: unknown kind": (
        convert.main, "--kind pairz --input {d}/junk.tar --out {d}/o",
        ["--kind", "'pairz'"]),
    "convert: missing --out": (convert.main, "--kind pairs --input {d}/junk.tar", ["--out"]),
    "convert: unreadable shard": (
        convert.main, "--kind pairs --input {d}/junk.tar --out {d}/o",
        ["no usable samples", "junk.tar", "shards/unreadable"]),
    "convert: records_per_file": (
        convert.main, "--kind pairs --input {d}/junk.tar --out {d}/o --records_per_file 0",
        ["records_per_file", "0"]),
    "train_tokenizer: missing input": (
        train_tokenizer.main, "--input {d}/missing.txt --vocab_size 64 --out {d}/tok",
        ["missing.txt", "not a file"]),
    "train_tokenizer: empty input": (
        train_tokenizer.main, "--input {d}/empty.txt --vocab_size 64 --out {d}/tok",
        ["empty.txt", "empty"]),
    "train_tokenizer: vocab_size": (
        train_tokenizer.main, "--input {d}/corpus.txt --vocab_size 4 --out {d}/tok",
        ["vocab_size", "4"]),
    "train_tokenizer: vocab_size type": (
        train_tokenizer.main, "--input {d}/corpus.txt --vocab_size many --out {d}/tok",
        ["--vocab_size", "'many'"]),
    "synthetic: image_size": (synthetic.main, "--out {d}/s --image_size 8", ["image_size", "8"]),
    "synthetic: no pairs": (
        synthetic.main, "--out {d}/s --num_pairs 0 5 --no_tokenizer", ["--num_pairs", "(0, 5)"]),
    "synthetic: out is a file": (
        synthetic.main, "--out {d}/corpus.txt --no_tokenizer", ["corpus.txt"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_tool_user_errors(case, files, capsys):
  main, argv, names = DATA_CASES[case]
  rc = errors.run_cli(main, argv.format(d=files).split())
  assert_one_error(rc, capsys.readouterr().err, *names)


def test_traceback_flag_shows_the_traceback(files):
  with pytest.raises(ValueError, match="no tar shards match"):
    errors.run_cli(convert.main, ["--kind", "pairs", "--input", f"{files}/nothing*.tar",
                                  "--out", f"{files}/o", "--traceback"])


def test_bugs_keep_their_traceback():
  def buggy(argv):
    return {}["no such key"]

  with pytest.raises(KeyError):
    errors.run_cli(buggy, [])


def test_argument_parser_errors_are_one_line(capsys):
  p = errors.ArgumentParser(prog="tool")
  p.add_argument("--n", type=int, required=True)
  sub = p.add_subparsers(dest="cmd")
  sub.add_parser("go").add_argument("--m", type=int)
  rc = errors.run_cli(lambda argv: p.parse_args(argv), ["--n", "x"])
  assert assert_one_error(rc, capsys.readouterr().err) == \
      "error: tool: argument --n: invalid int value: 'x' (see tool --help)"
  rc = errors.run_cli(lambda argv: p.parse_args(argv), ["--n", "1", "go", "--m", "y"])
  assert_one_error(rc, capsys.readouterr().err, "tool go: argument --m", "'y'")


# ------------------------------------------------------------ the train CLI

TINY = os.path.join(REPO, "configs", "tiny.py")

# A pipeline config on tiny tar shards: configs/tiny.py with a `data` section.
PIPELINE_CONFIG = """
import importlib.util
spec = importlib.util.spec_from_file_location("tiny", {tiny!r})
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)


def get_config():
  config = tiny.get_config()
  del config["synthetic"]
  config.train.input = "pipeline"
  config.model.image_token_id = {image_id}
  config.model.eoc_token_id = {eoc_id}
  config.data = dict(tokenizer={tok!r}, image=dict(size=32), datasets=dict(
      pairs=dict(kind="pairs", paths=[{tar!r}], batch_size=8, seq_len=16)))
  return config
"""


@pytest.fixture(scope="module")
def train_files(tmp_path_factory, small_tokenizer):
  from data_helpers import pair_members, write_tar
  from flamingo_jax.data.tokenizer import Tokenizer
  d = tmp_path_factory.mktemp("train_cli")
  tok = small_tokenizer
  info = Tokenizer.load(tok).info
  assert (info.image_token_id, info.eoc_token_id) == (200, 201)  # the id cases below
  tar = write_tar(d / "pairs.tar", [m for i in range(16) for m in pair_members(i)])
  (d / "pipeline.py").write_text(PIPELINE_CONFIG.format(
      tiny=TINY, tok=tok, tar=tar, image_id=info.image_token_id, eoc_id=info.eoc_token_id))
  (d / "a_file").write_text("not a directory")
  (d / "garbage_ckpt").mkdir()
  (d / "garbage_ckpt" / "_METADATA").write_text("{not json")
  (d / "run_bad_frozen" / "frozen" / "lm").mkdir(parents=True)  # a previous run's frozen LM
  (d / "run_bad_frozen" / "frozen" / "lm" / "_METADATA").write_text("{not json")
  # The tiny LM with its token embedding [V, D] at half the width.
  from flamingo_jax.config import load_config
  from flamingo_jax.models.config import model_config
  from flamingo_jax.model_dir import init_params
  lm = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                    init_params(model_config(load_config(TINY)), abstract=True)["lm"])
  lm["embedding"] = jnp.zeros((512, 32))
  params_io.save_params(str(d / "narrow_lm"), lm, {"component": "lm"})
  # A committed step checkpoint whose state/ is gone.
  refuse = ckpt_lib.CheckpointConfig(async_save=False, on_corrupt="refuse")
  c = ckpt_lib.Checkpointer(str(d / "run_no_state" / "checkpoints"), refuse)
  c.save(5, {"params": {"w": jnp.ones(3)}}, {"pairs": {"next_index": 0}})
  c.close()
  shutil.rmtree(d / "run_no_state" / "checkpoints" / "5" / "state")
  c = ckpt_lib.Checkpointer(str(d / "run_no_state" / "checkpoints"), refuse)
  with pytest.raises(errors.CheckpointError, match="checkpoint 5 at .*/5: file state: missing"):
    c.restore_latest({"params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}})
  c.close()
  return {"dir": d, "tok": tok, "tar": tar, "pipeline": str(d / "pipeline.py"), "info": info}


# name -> (argv after `python -m flamingo_jax.train`, strings the error line must name)
TRAIN_CASES = {
    # Config typos, in several sections.
    "typo optim": (["--config.optim.learnin_rate=1"], ["optim.learnin_rate"]),
    "typo train": (["--config.train.total_step=5"], ["train.total_step"]),
    "typo mesh": (["--config.mesh.fsdb=2"], ["mesh.fsdb"]),
    "typo checkpoint": (["--config.checkpoint.evry=5"], ["checkpoint.evry"]),
    "typo model": (["--config.model.lm.num_layer=3"], ["model.lm.num_layer"]),
    "typo section": (["--config.modle.image_token_id=3"], ["modle"]),
    "typo synthetic": (["--config.synthetic.num_clases=3"], ["synthetic.num_clases"]),
    "typo synthetic dataset": (["--config.synthetic.datasets.pairs.batch_sise=4"],
                               ["synthetic.datasets.pairs.batch_sise"]),
    # Wrong types and values: the whole key path.
    "type float": (["--config.optim.learning_rate=abc"], ["optim.learning_rate", "abc"]),
    "type int": (["--config.train.total_steps=1.5"], ["train.total_steps", "1.5"]),
    "type bool": (["--config.mesh.zero1=maybe"], ["mesh.zero1", "maybe"]),
    "type synthetic": (["--config.synthetic.datasets.pairs.seq_len=long"],
                       ["synthetic.datasets.pairs.seq_len", "long"]),
    "value schedule": (["--config.optim.schedule=cosinus"], ["optim.schedule", "cosinus"]),
    "value input": (["--config.train.input=files"], ["train.input", "files"]),
    # Meshes the 8 devices cannot make.
    "mesh not dividing": (["--config.mesh.data=3"], ["mesh", "3", "8"]),
    "mesh two -1": (["--config.mesh.fsdp=-1"], ["mesh", "-1"]),
    "mesh batch": (["--config.mesh.data=8", "--config.synthetic.datasets.pairs.batch_size=4"],
                   ["pairs", "batch_size", "4", "8"]),
    # Token ids.
    "image id out of vocab": (["--config.model.image_token_id=600"],
                              ["image_token_id", "600", "512"]),
    "eoc id negative": (["--config.model.eoc_token_id=-1"], ["eoc_token_id", "-1"]),
    "image id is eoc id": (["--config.model.image_token_id=511"],
                           ["image_token_id", "eoc_token_id"]),
    # Files.
    "config file missing": ({"config": "configs/no_such_config.py"}, ["no_such_config.py"]),
    "config arg refused": ({"config": TINY + ":big"}, ["tiny.py", "big"]),
    "workdir is a file": ({"workdir": "{dir}/a_file"}, ["--workdir", "a_file"]),
    "workdir missing": ({"workdir": None}, ["--workdir"]),
    "override without value": (["--config.optim.learning_rate"], ["optim.learning_rate"]),
    "model_init missing": (["--config.model_init.lm={dir}/no_such_ckpt"],
                           ["'lm'", "no_such_ckpt"]),
    "model_init garbage": (["--config.model_init.vision={dir}/garbage_ckpt"],
                           ["garbage_ckpt"]),
    "model_init component": (["--config.model_init.decoder={dir}/garbage_ckpt"],
                             ["model_init.decoder"]),
    "model_init shapes": (["--config.model_init.lm={dir}/narrow_lm"],
                          ["model_init.lm", "narrow_lm", "embedding", "(512, 32)", "(512, 64)"]),
    # Checkpoints in the workdir.
    "workdir frozen garbage": ({"workdir": "{dir}/run_bad_frozen"},
                               ["checkpoint at", "frozen/lm: file _METADATA: not JSON"]),
    "workdir checkpoint without state": (
        {"workdir": "{dir}/run_no_state"}, ["checkpoint 5 at", "5: file state: missing"],
        ["--config.checkpoint.on_corrupt=refuse"]),
    # The pipeline input: tokenizer and shards, before anything compiles.
    "tokenizer missing": ({"config": "{pipeline}"}, ["tokenizer", "no_tok.model"],
                          ["--config.data.tokenizer={dir}/no_tok.model"]),
    "shards missing": ({"config": "{pipeline}"}, ["data.datasets.pairs", "none*.tar"],
                       ["--config.data.datasets.pairs.paths=['{dir}/none*.tar']"]),
    "image id vs tokenizer": ({"config": "{pipeline}"}, ["image_token_id", "tokenizer"],
                              ["--config.model.image_token_id=500"]),
    # The tokenizer's ids: pieces 0..199, <image> 200, <EOC> 201.
    "typo data": ({"config": "{pipeline}"}, ["data.worker_cont"],
                  ["--config.data.worker_cont=2"]),
    "typo data dataset": ({"config": "{pipeline}"}, ["data.datasets.pairs.seq_lenght"],
                          ["--config.data.datasets.pairs.seq_lenght=8"]),
    "type data": ({"config": "{pipeline}"}, ["data.datasets.pairs.min_similarity", "high"],
                  ["--config.data.datasets.pairs.min_similarity=high"]),
    "eoc id vs tokenizer": ({"config": "{pipeline}"}, ["tokenizer", "201", "199"],
                           ["--config.model.lm.vocab_size=201",
                            "--config.model.eoc_token_id=199"]),
}


def train_argv(case, files, workdir):
  spec = TRAIN_CASES[case]
  base = {"config": TINY, "workdir": str(workdir)}
  overrides = []
  if isinstance(spec[0], dict):
    base.update(spec[0])
    overrides = spec[2] if len(spec) > 2 else []
  else:
    overrides = spec[0]
  fmt = lambda s: s.format(**{k: v for k, v in files.items() if isinstance(v, str)},  # noqa
                           dir=files["dir"])
  argv = [a for k in ("config", "workdir") if base[k] is not None
          for a in (f"--{k}", fmt(base[k]))]
  return argv + [fmt(o) for o in overrides]


class CompiledBeforeTheError(Exception):
  """A bad input must be reported before anything compiles (tiny: ~40 s here)."""


@pytest.fixture
def fresh_cli_logging(monkeypatch):
  """No compiling, and each in-process run logs to this test's captured stderr."""
  def refuse(self, *args, **kwargs):
    raise CompiledBeforeTheError("the step was compiled before the bad input was reported")

  monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
  log = logging.getLogger("flamingo_jax")
  propagate, level = log.propagate, log.level  # the CLI's setup_logging changes both
  yield
  log.propagate, log.level = propagate, level
  for h in list(log.handlers):
    if getattr(h, "_flamingo_cli", False):
      log.removeHandler(h)


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_cli_user_errors(case, train_files, tmp_path, capsys, fresh_cli_logging):
  from flamingo_jax.trainers.flamingo import train
  names = [n.format(dir=train_files["dir"]) for n in TRAIN_CASES[case][1]]
  rc = errors.run_cli(train.main, train_argv(case, train_files, tmp_path / "w"))
  assert_one_error(rc, capsys.readouterr().err, *names)


def test_data_keys_the_config_leaves_out_can_be_overridden(train_files):
  """The pipeline config sets few data keys; the others take overrides (their defaults
  are filled first), with types checked."""
  from flamingo_jax.trainers.flamingo import train
  from flamingo_jax.data.config import data_config
  from flamingo_jax.training import cli
  config = cli.load(train_files["pipeline"], [
      "--config.data.worker_count=2", "--config.data.datasets.pairs.min_similarity=0.3",
      "--config.data.image.flip=False"], train.with_default_sections, train.OPEN_KEYS)
  data = data_config(config)
  assert (data.worker_count, data.datasets["pairs"].min_similarity, data.image.flip) == \
      (2, 0.3, False)
  assert data.datasets["pairs"].seq_len == 16 and data.datasets["pairs"].max_images == 1


SUBPROCESS_CASES = ["type float", "mesh not dividing"]


def test_real_command_lines(train_files, files, tmp_path):
  """`python -m flamingo_jax.train` and a data tool as users run them (concurrently:
  each imports JAX, several seconds on a busy CPU); FLAMINGO_JAX_TRACEBACK=1 shows the
  traceback of a user error."""
  env = {k: v for k, v in os.environ.items() if k != errors.TRACEBACK_ENV}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  convert_cmd = [sys.executable, "-m", "flamingo_jax.data.convert", "--kind", "pairs",
                 "--input", f"{files}/nothing*.tar", "--out", f"{files}/o"]
  runs = {case: ([sys.executable, "-m", "flamingo_jax.train",
                  *train_argv(case, train_files, tmp_path / case.replace(" ", "_"))], env)
          for case in SUBPROCESS_CASES}
  runs["convert"] = (convert_cmd, env)
  runs["convert traceback"] = (convert_cmd, {**env, errors.TRACEBACK_ENV: "1"})
  procs = {name: subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, (cmd, e) in runs.items()}
  stderr = {name: p.communicate(timeout=300)[1] for name, p in procs.items()}
  for case in SUBPROCESS_CASES:
    names = [n.format(dir=train_files["dir"]) for n in TRAIN_CASES[case][1]]
    assert_one_error(procs[case].returncode, stderr[case], *names)
  assert_one_error(procs["convert"].returncode, stderr["convert"], "no tar shards match")
  assert procs["convert traceback"].returncode == 1
  assert "Traceback" in stderr["convert traceback"]
  assert "no tar shards match" in stderr["convert traceback"].splitlines()[-1]
