"""Multi-host training: 2 local processes with 4 CPU devices each (localhost
coordinator) train configs/tiny.py and match 1 process with 8 devices."""
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("FLAMINGO_JAX_TEST_CACHE", os.path.join(
    tempfile.gettempdir(), f"flamingo_jax_test_jit_cache_{os.getuid()}"))
ARGS = ["--config.train.total_steps=4", "--config.train.log_every=1",
        "--config.train.peak_flops_per_device=1e11", "--config.checkpoint.every=2"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, devices, extra=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen(
      [sys.executable, "-m", "flamingo_jax.train", "--config",
       os.path.join(REPO, "configs", "tiny.py"), "--workdir", str(workdir), *ARGS, *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if k.startswith(("loss", "grad_norm", "gates"))}
          for r in rows]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  port = _free_port()
  procs = [_launch(tmp_path / "multi", 4, [
      f"--config.distributed.coordinator_address=localhost:{port}",
      "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"])
           for i in range(2)]
  outs = [p.communicate(timeout=1200)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert "(2 processes)" in outs[0]
  single = _launch(tmp_path / "single", 8)
  out = single.communicate(timeout=1200)[0]
  assert single.returncode == 0, out[-4000:]

  multi, one = _losses(tmp_path / "multi"), _losses(tmp_path / "single")
  assert len(multi) == len(one) == 4
  for m, o in zip(multi, one):
    assert m.keys() == o.keys()
    for k in m:
      assert m[k] == pytest.approx(o[k], rel=1e-5, abs=1e-7), k
  # Each process saved its own data-iterator state next to the shared arrays.
  data = os.listdir(tmp_path / "multi" / "checkpoints" / "4" / "data")
  assert {"process_0-of-2.json", "process_1-of-2.json", "process_1-of-2.json.sha256"} <= set(data)

  # Resumed on 2 processes: each verifies the checksums (the sums are global, so both agree)
  # and its own data state; step 2 was followed by a finite step, so it is marked.
  port = _free_port()
  procs = [_launch(tmp_path / "multi", 4, [
      f"--config.distributed.coordinator_address=localhost:{port}",
      "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
      "--config.train.total_steps=6"]) for i in range(2)]
  outs = [p.communicate(timeout=1200)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
    assert "has no checksums" not in out and "corrupt" not in out
  assert f"resumed from {tmp_path}/multi/checkpoints/4" in outs[0]
  assert os.path.exists(tmp_path / "multi" / "checkpoints" / "4" / "FINITE_NEXT")
