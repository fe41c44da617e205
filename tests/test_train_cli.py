"""`python -m flamingo_jax.train` on configs/tiny.py: the loss falls, the workdir
holds what it should, and --compile_only reports memory per device."""
import glob
import json
import os
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("FLAMINGO_JAX_TEST_CACHE", os.path.join(
    tempfile.gettempdir(), f"flamingo_jax_test_jit_cache_{os.getuid()}"))


def _train(*args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "flamingo_jax.train", "--config",
                         os.path.join(REPO, "configs", "tiny.py"), *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_tiny_config_trains_from_the_cli(tmp_path):
  out = _train("--workdir", str(tmp_path), "--config.train.total_steps=40",
               "--config.train.peak_flops_per_device=1e11")
  assert out.returncode == 0, out.stderr[-4000:]
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [10, 20, 30, 40]
  loss = [r["loss"] for r in rows]
  assert loss[-1] < 0.8 * loss[0], loss
  assert all(r["loss/pairs"] > 0 and r["loss/interleaved"] > 0 for r in rows)
  assert rows[-1]["gates/xattn_block_1/ffw_gate"] > rows[0]["gates/xattn_block_1/ffw_gate"] > 0
  last = [line for line in out.stderr.splitlines() if "step 40/40" in line]
  assert last, out.stderr[-2000:]
  for part in ("loss", "interleaved", "pairs", "lr", "|g|", "tok/s", "MFU", "ETA"):
    assert part in last[0]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["40"]
  assert sorted(os.listdir(tmp_path / "frozen")) == ["lm", "vision"]
  assert {"config.json", "version.txt", "tensorboard"} <= set(os.listdir(tmp_path))

  # The same step, compiled only: memory per device as JSON.
  out = _train("--workdir", str(tmp_path / "compile"), "--compile_only",
               "--config.train.total_steps=40")
  assert out.returncode == 0, out.stderr[-4000:]
  report = json.loads(out.stdout)
  phases = [line for line in out.stderr.splitlines() if line.startswith("[compile_only] ")]
  for i, phase in enumerate(("abstract state", "lowering", "lowered", "compiled", "memory")):
    assert phases[i].startswith(f"[compile_only] {phase}"), phases
  memory = report["memory_per_device"]["interleaved+pairs"]
  assert memory["trainable_params"] == 201_092 * 4 and memory["temp"] > 0
  assert report["flops_per_step"]["interleaved+pairs"]["frozen_aware"] > 0


def test_bad_override_names_the_key(tmp_path):
  out = _train("--workdir", str(tmp_path), "--config.optim.lr=1.0", timeout=300)
  assert out.returncode != 0 and "optim.lr" in out.stderr


@pytest.mark.slow
def test_corrupt_checkpoints_through_the_cli(tmp_path):
  """A corrupt newest checkpoint: `refuse` is one error line (exit 2), the default falls
  back to the older one with a warning; corrupt frozen weights are one error line. No
  traceback, no orbax shutdown cascade."""
  base = ["--workdir", str(tmp_path), "--config.checkpoint.every=2",
          "--config.train.log_every=2", "--config.train.peak_flops_per_device=1e11"]
  out = _train(*base, "--config.train.total_steps=4")
  assert out.returncode == 0, out.stderr[-4000:]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  (state,) = glob.glob(str(tmp_path / "checkpoints" / "4" / "data" / "*.json"))
  with open(state, "w") as f:
    f.write("{garbage")

  out = _train(*base, "--config.train.total_steps=6", "--config.checkpoint.on_corrupt=refuse")
  assert out.returncode == 2
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: checkpoint 4 at {tmp_path}/checkpoints/4: file "
                         f"data/{os.path.basename(state)}: not JSON"), out.stderr[-2000:]
  assert len(last) < 200 and last.endswith("(refused: checkpoint.on_corrupt='refuse')")
  assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr

  out = _train(*base, "--config.train.total_steps=6")
  assert out.returncode == 0, out.stderr[-4000:]
  assert "checkpoint 4 at" in out.stderr and "falling back to checkpoint 2" in out.stderr
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4, 4, 6]  # steps 3-4 replayed from checkpoint 2
  assert rows[2]["loss"] == rows[1]["loss"]
  assert "Traceback" not in out.stderr

  # Random bytes inside the array data (zstd chunks that may still decode): caught by the
  # checksums or the decoder, one line naming the array, the older checkpoint intact.
  data = glob.glob(str(tmp_path / "checkpoints" / "6" / "state" / "**" / "d" / "*"),
                   recursive=True)
  big = max(data, key=os.path.getsize)
  with open(big, "r+b") as f:
    f.seek(os.path.getsize(big) // 3)
    f.write(bytes(range(7, 256, 3)) * 16)
  out = _train(*base, "--config.train.total_steps=8", "--config.checkpoint.on_corrupt=refuse")
  assert out.returncode == 2
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: checkpoint 6 at {tmp_path}/checkpoints/6: array state/"), \
      out.stderr[-2000:]
  assert len(last) < 200 and "{" not in last
  assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr

  for path in glob.glob(str(tmp_path / "frozen" / "lm" / "**" / "d" / "*"), recursive=True):
    with open(path, "r+b") as f:
      f.write(b"\x00garbage" * 8)
  out = _train(*base, "--config.train.total_steps=8")
  assert out.returncode == 2
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: checkpoint at {tmp_path}/frozen/lm: "), out.stderr[-2000:]
  assert len(last) < 200
  assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr
