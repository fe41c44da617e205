"""The rough edges a new user hits (issue 29): documented keys settable, optional
dependencies named by their extra, flags and config paths with one meaning. Cheap:
argument parsing and error lines run in-process through errors.run_cli."""
import dataclasses
import glob
import importlib.util
import os

import pytest

from flamingo_jax import errors
from flamingo_jax.config import load_config
from flamingo_jax.evaluate import datasets
from flamingo_jax.evaluate.config import EvalTaskConfig, compose, eval_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "eval", "*.py")))


def _one_error_line(capsys, status, code=2):
  err = capsys.readouterr().err.strip()
  assert status == code and err.count("\n") == 0 and err.startswith("error: "), (status, err)
  return err


@pytest.mark.parametrize("path", EVAL_FILES, ids=os.path.basename)
def test_every_documented_task_key_is_settable_on_every_benchmark(path, tmp_path):
  """docs/evaluation.md's task keys (those a configs/eval file leaves out too) override."""
  name = os.path.basename(path)[:-3]
  cfg, (task,) = compose(eval_files=[f"{path}:{tmp_path}"])
  given = load_config(f"{path}:{tmp_path}").tasks[task]
  assert "num_beams" not in given and "gt_normalisation" not in given  # the case at issue
  key = f"--config.eval.tasks.{task}"
  overrides = [f"{key}.num_beams=1", f"{key}.vqa_demo_answer=first",
               f"{key}.gt_normalisation=open_flamingo", f"{key}.ensemble=2",
               f"{key}.shots=(0,2)", f"{key}.num_trials=2"]
  if task in ("coco", "flickr30"):
    overrides.append(f"{key}.template=A photo of {{caption}}")
  cfg, _ = compose(eval_files=[f"{path}:{tmp_path}"], overrides=overrides)
  t = eval_config(cfg).tasks[task]
  assert (t.num_beams, t.vqa_demo_answer, t.gt_normalisation, t.ensemble, t.shots,
          t.num_trials) == (1, "first", "open_flamingo", 2, (0, 2), 2), name
  assert t.template == ("A photo of {caption}" if task in ("coco", "flickr30") else "")
  # Every key of the schema is present, at its default where the file leaves it out.
  assert set(cfg.eval.tasks[task]) == {f for f in EvalTaskConfig.__dataclass_fields__}
  with pytest.raises(errors.ConfigError, match=f"unknown config key 'eval.tasks.{task}.beams'"):
    compose(eval_files=[f"{path}:{tmp_path}"], overrides=[f"{key}.beams=1"])


def test_config_file_tasks_get_defaults_too(tmp_path):
  """A --config FILE's eval.tasks (the demo's way) take the same overrides."""
  cfg = load_config(os.path.join(REPO, "configs", "demo.py") + f":{tmp_path}")
  (task, *_) = list(cfg.eval.tasks)
  cfg, _ = compose(config=cfg, overrides=[f"--config.eval.tasks.{task}.num_beams=2"])
  assert eval_config(cfg).tasks[task].num_beams == 2


def test_imagenet_class_names_ship_with_the_package(tmp_path):
  """No open_flamingo / open_clip needed: the config names the packaged list of 1,000."""
  cfg, _ = compose(eval_files=[os.path.join(REPO, "configs", "eval", "imagenet.py")
                               + f":{tmp_path}"])
  path = eval_config(cfg).tasks["imagenet"].class_names
  assert os.path.isfile(path) and not path.startswith(str(tmp_path)), path
  names = datasets.read_class_names(path)
  assert len(names) == 1000 and names[:2] == ("tench", "goldfish") and names[-1] == "toilet paper"
  cfg, _ = compose(eval_files=[os.path.join(REPO, "configs", "eval", "imagenet.py")
                               + f":{tmp_path}"],
                   overrides=["--config.eval.tasks.imagenet.class_names=mine.txt"])
  assert eval_config(cfg).tasks["imagenet"].class_names == str(tmp_path / "mine.txt")
  (tmp_path / "classnames.txt").write_text("a\nb\n")  # the data root's own list wins
  cfg, _ = compose(eval_files=[os.path.join(REPO, "configs", "eval", "imagenet.py")
                               + f":{tmp_path}"])
  assert eval_config(cfg).tasks["imagenet"].class_names == str(tmp_path / "classnames.txt")


def test_gs_workdir_without_gcsfs_names_the_extra(monkeypatch, capsys):
  from flamingo_jax.training import loop  # pylint: disable=import-outside-toplevel
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "gcsfs" else real(name, *a))
  status = errors.run_cli(lambda argv: loop.workdir_path("gs://bucket/run"), [])
  err = _one_error_line(capsys, status)
  assert err == ("error: the workdir gs://bucket/run needs gcsfs, not installed: "
                 "pip install 'flamingo_jax[gcs]'"), err


def test_fake_devices_in_process(capsys):
  """--fake_devices is a no-op where JAX already runs on that many CPU devices, one error
  line where it cannot be honoured (JAX started with another count), for every CLI."""
  import jax  # pylint: disable=import-outside-toplevel
  from flamingo_jax.apps import generate  # pylint: disable=import-outside-toplevel
  from flamingo_jax.evaluate import cli  # pylint: disable=import-outside-toplevel
  from flamingo_jax.runtime import distributed  # pylint: disable=import-outside-toplevel
  n = len(jax.devices())
  distributed.fake_cpu_devices(n)
  for main, args in ((cli.main, ["--out", "x", "--checkpoint", "m"]),
                     (generate.main, ["--checkpoint", "m", "--prompt", "p"])):
    status = errors.run_cli(main, [*args, f"--fake_devices={n + 1}"])
    err = _one_error_line(capsys, status)
    assert f"--fake_devices={n + 1}: JAX already runs on {n} cpu devices" in err, err


@pytest.mark.slow
def test_generate_fake_devices_mesh_in_a_fresh_process(tiny_model_dir, tmp_path):
  """`generate --fake_devices=2 --mesh.tensor=2` in a process without XLA_FLAGS (one CPU
  device) shards over 2 fake devices and completes as one device does."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from flamingo_jax.apps import generate  # pylint: disable=import-outside-toplevel
  image = tmp_path / "a.png"
  Image.fromarray(np.full((32, 32, 3), (200, 30, 30), np.uint8)).save(image)
  args = ["--checkpoint", tiny_model_dir[0], "--image", str(image), "--prompt", "a red",
          "--max_new_tokens", "4", "--json"]
  one = generate.main(args)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-m", "flamingo_jax.generate", *args,
                        "--fake_devices=2", "--mesh.tensor=2"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout)["tokens"] == one["tokens"]


def test_hf_lm_output_given_to_evaluate_says_what_is_needed(tmp_path, capsys):
  """`convert hf-lm` writes an LM alone (model_config.json = {"lm": ...}): evaluate and
  generate say it is not a Flamingo and how to get one, before reading any weights."""
  import json  # pylint: disable=import-outside-toplevel
  from flamingo_jax.apps import generate  # pylint: disable=import-outside-toplevel
  from flamingo_jax.evaluate import cli  # pylint: disable=import-outside-toplevel
  lm = tmp_path / "lm"
  lm.mkdir()
  (lm / "model_config.json").write_text(json.dumps({"lm": {"vocab_size": 64}}))
  for main, args in ((cli.main, ["--out", str(tmp_path / "o"), "--eval",
                                 f"{REPO}/configs/eval/coco.py:{tmp_path}"]),
                     (generate.main, ["--prompt", "a"])):
    err = _one_error_line(capsys, errors.run_cli(main, ["--checkpoint", str(lm), *args]))
    assert "holds a language model alone (`convert hf-lm` output" in err, err
    assert f"--config configs/from_hf_lm.py:{lm}" in err, err


def test_interrupted_run_exits_130_or_143_with_the_resume_command(monkeypatch, tmp_path,
                                                                   capsys):
  """A trainer stopped by a signal (its checkpoint saved) ends the demo with one line naming
  the signal and the command that resumes (without --force), status 128 + signum."""
  import signal  # pylint: disable=import-outside-toplevel
  from flamingo_jax.apps.demo import stages  # pylint: disable=import-outside-toplevel
  from flamingo_jax.training.loop import StopSignal  # pylint: disable=import-outside-toplevel
  for signum, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
    monkeypatch.setattr(StopSignal, "last_received", signum)

    def stopped(*args, **kwargs):
      stages.check_finished("Flamingo training", {"stopped": "signal", "step": 7})
    monkeypatch.setattr(stages, "run", stopped)
    got = errors.run_cli(stages.main, ["--workdir", str(tmp_path / "w x"), "--scale", "smoke",
                                       "--force", "flamingo"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert got == status, (got, err)
    assert err == (f"interrupted: Flamingo training stopped by {signal.Signals(signum).name} "
                   "at step 7, its checkpoint saved; resume with: python -m flamingo_jax.demo "
                   f"--workdir '{tmp_path / 'w x'}' --scale smoke"), err
  with pytest.raises(RuntimeError, match="stopped early"):  # any other early stop: a bug
    stages.check_finished("LM pretraining", {"stopped": "nan"})
  stages.check_finished("LM pretraining", {"stopped": "done"})


def test_ctrl_c_leaves_at_once(tmp_path):
  """Ctrl-C outside a trainer's steps: `error: interrupted` and status 130 now, neither once
  a worker thread finishes nor never (a KeyboardInterrupt swallowed, as Python does in a gc
  callback during a compilation)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  head = ("import os, signal, threading, time\nfrom flamingo_jax.errors import run_cli\n"
          "def main(argv):\n  threading.Thread(target=time.sleep, args=(120,)).start()\n")
  bodies = ("  raise KeyboardInterrupt\n",
            "  try:\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)\n"
            "  except KeyboardInterrupt:\n    pass\n  time.sleep(120)\n")
  for body in bodies:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", head + body + "raise SystemExit(run_cli(main))"],
                         capture_output=True, text=True, timeout=100, cwd=REPO)
    assert out.returncode == 130 and out.stderr.strip() == "error: interrupted", out.stderr
    assert time.time() - t0 < 30


def test_another_scale_needs_force_data(tmp_path):
  """--force STAGE with another --scale never rewrites the workdir's scale.json."""
  import json  # pylint: disable=import-outside-toplevel
  import dataclasses  # pylint: disable=import-outside-toplevel
  from flamingo_jax.apps.demo import stages  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "w"
  workdir.mkdir()
  smoke = json.loads(json.dumps(dataclasses.asdict(stages.SCALES["smoke"])))
  (workdir / "scale.json").write_text(json.dumps(smoke))
  for force in ((), ("eval",), ("flamingo", "eval")):
    with pytest.raises(errors.UserError, match="made with --scale smoke, not demo; use a new "
                       "--workdir or --force data"):
      stages.run(str(workdir), stages.SCALES["demo"], force=force)
    assert json.loads((workdir / "scale.json").read_text()) == smoke


def test_signal_in_a_stages_last_steps_stops_after_it(monkeypatch, tmp_path):
  """A signal the loop caught as its last steps ran: the stage is kept (result.json) and
  the demo stops there instead of going on to the next stage."""
  import signal  # pylint: disable=import-outside-toplevel
  from flamingo_jax.apps.demo import stages  # pylint: disable=import-outside-toplevel
  from flamingo_jax.training.loop import StopSignal  # pylint: disable=import-outside-toplevel
  ran = []
  monkeypatch.setattr(StopSignal, "last_received", None)
  monkeypatch.setattr(stages, "run_data", lambda *a: ran.append("data") or {})

  def lm(*args):
    ran.append("lm")
    StopSignal.last_received = signal.SIGTERM
    return {}
  monkeypatch.setattr(stages, "run_lm", lm)
  monkeypatch.setattr(stages, "run_vision", lambda *a: ran.append("vision") or {})
  with pytest.raises(errors.Interrupted, match="stopped by SIGTERM after stage lm finished"):
    stages.run(str(tmp_path), stages.SCALES["smoke"])
  assert ran == ["data", "lm"] and (tmp_path / "lm" / "result.json").exists()


def test_results_md_says_greedy_for_one_beam(tmp_path):
  from flamingo_jax.evaluate import run  # pylint: disable=import-outside-toplevel
  from flamingo_jax.evaluate.config import protocol  # pylint: disable=import-outside-toplevel
  cfg, _ = compose(eval_files=[f"{REPO}/configs/eval/coco.py:{tmp_path}"])
  ec = eval_config(cfg)
  t = ec.tasks["coco"]
  for beams, want in ((3, "beam search (3 beams, length penalty 0)"),
                      (1, "greedy (beam search with 1 beam)")):
    proto = protocol(ec, dataclasses.replace(t, num_beams=beams))
    assert run.decoding_text("captioning", ec, t, proto).startswith(want + ", at most 20")
  greedy = dataclasses.replace(ec, decode_method="greedy")
  assert run.decoding_text("captioning", greedy, t, protocol(greedy, t)).startswith("greedy, ")


def test_demo_seeds_output_labels_each_table(monkeypatch, tmp_path, capsys):
  """`demo --seeds 0,1`: the mean table, then seed 0's own table under a line saying so."""
  from flamingo_jax.apps.demo import stages  # pylint: disable=import-outside-toplevel

  def ev(score):
    return {"shots": [0], "metrics": {"classes": "top-1"}, "chance": {"classes": 4.5},
            "results": {"flamingo": {"classes": {"0": score}}}}
  runs = {0: {"eval": ev(50.0), "report": {"path": "r.md"}}, 1: {"eval": ev(60.0)}}
  monkeypatch.setattr(stages, "run_seeds", lambda *a: runs)
  assert errors.run_cli(stages.main, ["--workdir", str(tmp_path), "--seeds", "0,1"]) == 0
  out = capsys.readouterr().out
  mean = out.index("Mean and [min, max] over 2 seeds (0, 1).")
  label = out.index("Seed 0 alone (the first seed's run; report.md has both):")
  assert mean < out.index("| classes | top-1 | flamingo | 55.0 [50.0, 60.0] |") < label
  assert label < out.index("| classes | top-1 | flamingo | 50.0 |")


def test_renamed_flags_keep_their_old_names_for_a_release(capsys):
  """convert openflamingo's checkpoint.pt is --input and its tokenizer directory
  --tokenizer_dir (--checkpoint is a model directory, --tokenizer a tokenizer file
  everywhere else); evaluate's random-init seed is --init_seed. The old names parse the same,
  with one note line each."""
  # pylint: disable=import-outside-toplevel
  from flamingo_jax.convert.__main__ import build_parser, run
  from flamingo_jax.evaluate import cli  # pylint: disable=import-outside-toplevel
  base = ["openflamingo", "--lm", "L", "--vision", "V", "--cross_attn_every_n_layers", "2",
          "--out", "O"]
  new = build_parser().parse_args(base + ["--input", "c.pt", "--tokenizer_dir", "T"])
  assert capsys.readouterr().err == ""
  old = build_parser().parse_args(base + ["--checkpoint", "c.pt", "--tokenizer", "T"])
  assert (old.input, old.tokenizer_dir) == (new.input, new.tokenizer_dir) == ("c.pt", "T")
  assert capsys.readouterr().err.splitlines() == [
      "note: --checkpoint is renamed --input; the old name goes in the next release",
      "note: --tokenizer is renamed --tokenizer_dir; the old name goes in the next release"]
  err = _one_error_line(capsys, errors.run_cli(run, base))
  assert err == "error: convert openflamingo: --input is required (OpenFlamingo's checkpoint.pt)"
  assert cli.build_parser().parse_args(["--out", "o", "--seed", "3"]).init_seed == 3
  assert "note: --seed is renamed --init_seed" in capsys.readouterr().err
  assert "--checkpoint" not in build_parser().format_help()  # the old names are hidden


def test_evaluate_init_seed_needs_random_init(capsys):
  """The seed of random params given with a real model was silently ignored before."""
  from flamingo_jax.evaluate import cli  # pylint: disable=import-outside-toplevel
  err = _one_error_line(capsys, errors.run_cli(cli.main, ["--checkpoint", "m", "--out", "o",
                                                          "--init_seed", "3"]))
  assert err == ("error: --init_seed 3 seeds random params and needs --random_init; the "
                 "trials' seeds are --trial_seeds (or --config.eval.seed=N)"), err


def test_checkpoint_metadata_warning_is_quiet(caplog):
  """orbax's absl warning that our step directories lack _CHECKPOINT_METADATA (every
  --eval_only and every resume printed it) is dropped; other absl warnings are kept."""
  import logging  # pylint: disable=import-outside-toplevel
  from flamingo_jax.training import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_checkpoint_metadata_warning()
  cli.quiet_checkpoint_metadata_warning()  # once only
  absl_log = logging.getLogger("absl")
  quiet = cli._NoMetadataWarning  # pylint: disable=protected-access
  assert sum(isinstance(f, quiet) for f in absl_log.filters) == 1
  with caplog.at_level(logging.WARNING, logger="absl"):
    absl_log.warning("Metadata file does not exist: /w/checkpoints/4/state/_CHECKPOINT_METADATA")
    absl_log.warning("something else")
  assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_config_paths_resolve_from_any_directory(monkeypatch, tmp_path):
  """`--config configs/tiny.py` and `--eval configs/eval/coco.py:ROOT` as the docs write
  them work outside the checkout (the packaged configs/); a file in the working directory
  comes first; a missing one names both places."""
  from flamingo_jax.config import configs_dir  # pylint: disable=import-outside-toplevel
  here = load_config(os.path.join(REPO, "configs", "tiny.py")).to_dict()
  monkeypatch.chdir(tmp_path)
  assert load_config("configs/tiny.py").to_dict() == here
  cfg, order = compose(eval_files=["configs/eval/coco.py:/data/coco"])
  assert order == ["coco"] and cfg.eval.tasks.coco.data_root == "/data/coco"
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "tiny.py").write_text("def get_config():\n  return {'mine': 1}\n")
  assert load_config("configs/tiny.py") == {"mine": 1}
  with pytest.raises(errors.ConfigError, match=(
      f"config file 'configs/nope.py' does not exist \\(relative to {tmp_path} or to the "
      f"packaged {configs_dir()}\\)")):
    load_config("configs/nope.py")
