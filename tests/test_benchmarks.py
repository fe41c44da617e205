"""benchmarks/train_step.py: the two sides alternate step by step and each
timed step is the one it claims to be; OpenFlamingo's harness trains exactly
our trainable parameters on configs/bench_3b.py's workload (tiny sizes)."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import train_step  # noqa: E402


class FakePartner:
  def __init__(self, log):
    self.log = log

  def step(self):
    self.log.append("partner")
    time.sleep(0.01)


def test_step_clock_alternates_and_labels_steps(monkeypatch):
  """Simulates the trainer: on_step(k) comes after step k+1 is dispatched."""
  log = []
  monkeypatch.setattr(train_step.jax, "block_until_ready",
                      lambda xs: log.append("wait"))
  monkeypatch.setattr(train_step.jax, "live_arrays", lambda: [])
  total = 5
  clock = train_step.StepClock(total, FakePartner(log))
  for k in range(1, total + 1):
    log.append(f"on_step {k}")
    clock(k, {})
  # One wait (for step k+1) then one partner step per call, none after the last step.
  assert log == sum(([f"on_step {k}", "wait", "partner"] for k in range(1, total)), []) + \
      [f"on_step {total}"]
  assert [x[0] for x in clock.ours] == [3, 4, 5]
  assert len(clock.partner_times) == total - 1
  assert all(t >= 0.01 for t, _ in clock.partner_times)
  alone = train_step.StepClock(total)
  for k in range(1, total + 1):
    alone(k, {})
  assert [x[0] for x in alone.ours] == [2, 3, 4, 5]


def test_config_args_are_checked():
  from flamingo_jax.config import load_config
  with pytest.raises(ValueError, match="unknown argument"):
    load_config(os.path.join(REPO, "configs", "bench_3b.py:huge"))


@pytest.mark.slow
def test_alternated_run_on_the_tiny_bench_3b(tmp_path):
  if importlib.util.find_spec("open_flamingo") is None:  # its __init__ needs open_clip
    pytest.skip("open_flamingo is not installed")
  out = tmp_path / "results.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"),
                  "--configs", "bench_3b:tiny", "--set", "model.dtype='float32'",
                  "--set", "train.frozen_dtype='float32'", "--openflamingo", "--steps", "2",
                  "--warmup", "1", "--peak_size", "128", "--output", str(out)],
                 check=True, env=env, timeout=600)
  (res,) = json.loads(out.read_text())["configs"].values()
  ours, of = res["ours"], res["openflamingo"]
  assert res["alternated"] and len(ours["step_times_s"]) == 2 == len(of["step_times_s"])
  assert ours["input_made_once"] and 0 < ours["host_share_of_step"] < 1
  # The same workload: OpenFlamingo trains exactly our trainable parameters.
  assert of["trainable_params"] == ours["trainable_params"]
  assert res["speedup"] == pytest.approx(of["step_time_s"] / ours["step_time_s"])
