"""configs/flamingo_{3b,9b,80b}.py: the paper recipe validates as a whole, and each
`:local` variant (the same recipe shrunk for a CPU) trains through the real CLI."""
import json
import os
import subprocess
import sys
import tempfile

import pytest

from flamingo_jax.trainers.flamingo import train
from flamingo_jax.config import load_config
from flamingo_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("FLAMINGO_JAX_TEST_CACHE", os.path.join(
    tempfile.gettempdir(), f"flamingo_jax_test_jit_cache_{os.getuid()}"))
SIZES = ("3b", "9b", "80b")


@pytest.mark.parametrize("size", SIZES)
def test_paper_recipe_states_every_section(size):
  s = train.setup(train.with_default_sections(
      load_config(os.path.join(REPO, "configs", f"flamingo_{size}.py"))))
  assert s.train.input == "pipeline" and s.train.total_steps == 500_000
  assert {d.name: (d.batch_size, d.weight) for d in s.datasets} == {
      "m3w": (256, 1.0), "align": (512, 0.2), "ltip": (512, 0.2), "vtp": (64, 0.03)}
  assert (s.data.datasets["m3w"].seq_len, s.data.datasets["m3w"].max_images,
          s.data.datasets["m3w"].p_next, s.data.datasets["vtp"].num_frames) == (256, 5, 0.5, 8)
  assert (s.optim.learning_rate, s.optim.warmup_steps, s.optim.schedule, s.optim.weight_decay,
          s.optim.clip_norm) == (1e-4, 5000, "constant", 0.1, 1.0)
  assert (s.model.dtype, s.train.frozen_dtype, s.model.param_dtype) == (
      "bfloat16", "bfloat16", "float32")
  assert (s.mesh.tensor, s.mesh.zero1) == (16, True)
  assert s.model.xattn.every == {"3b": 1, "9b": 4, "80b": 7}[size]
  # fits 32 GiB chips: remat and micro-batches that divide the paper batches on the
  # meshes of docs/training.md (16 or 32 data-parallel shards on 256 chips)
  assert s.model.remat == "block" and s.model.scan_layers
  assert s.train.micro_batches == {"m3w": 4, "align": 4, "ltip": 4, "vtp": 2}
  for shards in (16, 32):
    for d in s.datasets:
      assert d.batch_size % (shards * s.train.micro_batches[d.name]) == 0, (d.name, shards)


def test_micro_batches_may_name_the_other_input_section():
  """A fit check on a subset of the synthetic mixture keeps the recipe's counts; a
  name in neither section is still a one-line error."""
  config = load_config(os.path.join(REPO, "configs", "flamingo_9b.py"))
  config.train.input = "synthetic"
  config.synthetic.datasets = {"m3w": dict(config.synthetic.datasets["m3w"])}
  s = train.setup(train.with_default_sections(config))
  assert [d.name for d in s.datasets] == ["m3w"]
  config.train.micro_batches["m3vv"] = 2
  with pytest.raises(ConfigError, match="train.micro_batches.m3vv"):
    train.setup(train.with_default_sections(config))


def _train_local(size, workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(
      [sys.executable, "-m", "flamingo_jax.train", "--config",
       os.path.join(REPO, "configs", f"flamingo_{size}.py") + ":local", "--workdir",
       str(workdir), *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # about a minute each on 2 idle CPU cores (compiling the 4-dataset step)
@pytest.mark.parametrize("size", SIZES)
def test_local_variant_trains_through_the_cli(size, tmp_path):
  out = _train_local(size, tmp_path)
  assert out.returncode == 0, out.stderr[-4000:]
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  assert {k for k in rows[0] if k.startswith("loss/")} == {
      "loss/m3w", "loss/align", "loss/ltip", "loss/vtp"}
  assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["nonfinite_total"] == 0
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]
  config = json.load(open(tmp_path / "config.json"))
  assert config["mesh"]["zero1"] is True and config["train"]["frozen_dtype"] == "bfloat16"
