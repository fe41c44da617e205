"""benchmarks/train_step.py: the two sides alternate step by step, each in a
worker process of its own, and each timed step is the one it claims to be; OpenFlamingo's harness trains exactly
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


def test_step_clock_pauses_between_steps_and_labels_them(monkeypatch):
  """Simulates the trainer: on_step(k) comes after step k+1 is dispatched."""
  log = []
  monkeypatch.setattr(train_step.jax, "block_until_ready",
                      lambda xs: log.append("wait"))
  monkeypatch.setattr(train_step.jax, "live_arrays", lambda: [])
  total = 5
  records = []

  def pause(record):
    log.append("pause")
    records.append(record)
    time.sleep(0.01)  # the other side's step: not part of ours

  clock = train_step.StepClock(total, pause)
  for k in range(1, total + 1):
    log.append(f"on_step {k}")
    clock(k, {})
  # One wait (for step k+1) then one pause per call, none after the last step.
  assert log == sum(([f"on_step {k}", "wait", "pause"] for k in range(1, total)), []) + \
      [f"on_step {total}"]
  assert records[0] is None and [r[0] for r in records[1:]] == [3, 4, 5]
  assert all(r[1] < 0.01 for r in records[1:])  # the pause is outside the timed step
  alone = train_step.StepClock(total)
  for k in range(1, total + 1):
    alone(k, {})
  assert [x[0] for x in alone.ours] == [2, 3, 4, 5]


class FakeWorker:
  """A worker whose step burns `cpu` CPU seconds (read back as its /proc time)."""

  def __init__(self, name, log, clock):
    self.name, self.log, self.clock = name, log, clock

  def ask(self, command):
    self.log.append(self.name)
    self.clock[self.name] += 1.0
    return {"wall_s": 1.0, "cpu_s": 1.0}

  def cpu(self):
    self.clock["spin_" + self.name] = self.clock.get("spin_" + self.name, 0) + 0.25
    return self.clock[self.name] + self.clock["spin_" + self.name]


def test_alternate_takes_turns_and_charges_the_idle_side():
  log, clock = [], {"ours": 0.0, "of": 0.0}
  ours, of = FakeWorker("ours", log, clock), FakeWorker("of", log, clock)
  records = train_step.alternate([ours, of], 3)
  assert log == ["ours", "of"] * 3
  assert [len(r) for r in records] == [3, 3]
  # Each read of the idle side adds 0.25 s of "spinning": 0.25 between two reads.
  assert all(r["cpu_while_other_stepped_s"] == pytest.approx(0.25) for rs in records for r in rs)


def test_step_stats_medians_and_ratios():
  recs = [{"wall_s": w, "cpu_s": 2 * w, "host_s": 0.1, "page_faults": 7 * w}
          for w in (1.0, 3.0, 2.0)]
  out = train_step.step_stats(recs, flops_per_step=8.0, tokens=100, peak=4.0)
  assert out["page_faults_per_step"] == 14
  assert out["step_time_s"] == 2.0 and out["process_cpu_time_per_step_s"] == 4.0
  assert out["mfu_frozen_aware"] == 1.0 and out["frozen_aware_flop_per_cpu_s"] == 2.0
  assert out["host_share_of_step"] == pytest.approx(0.05) and out["tokens_per_s"] == 50


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
                  "--warmup", "1", "--peak_size", "128", "--peak_seconds", "0",
                  "--output", str(out)],
                 check=True, env=env, timeout=600)
  results = json.loads(out.read_text())
  (res,) = results["configs"].values()
  ours, of = res["ours"], res["openflamingo"]
  # Both workers ran with freed memory kept mapped, so their steps barely page-fault.
  assert results["host_memory"] == "keep"
  assert 0 <= ours["page_faults_per_step"] < 20_000 and 0 <= of["page_faults_per_step"]
  assert res["alternated"] and res["separate_processes"]
  assert len(ours["step_times_s"]) == 2 == len(of["step_times_s"])
  assert ours["threads"] == of["threads"] == of["torch_threads"] == res["threads"]
  assert ours["process_cpu_time_per_step_s"] > 0 and of["process_cpu_time_per_step_s"] > 0
  assert ours["input_made_once"] and 0 < ours["host_share_of_step"] < 1
  # The same workload: OpenFlamingo trains exactly our trainable parameters.
  assert of["trainable_params"] == ours["trainable_params"]
  assert res["speedup"] == pytest.approx(of["step_time_s"] / ours["step_time_s"])
  assert res["ours_over_openflamingo"]["cpu"] == pytest.approx(
      ours["process_cpu_time_per_step_s"] / of["process_cpu_time_per_step_s"])


def test_summary_line_says_what_it_measures():
  """The line a person reads last: this benchmark's medians and what MFU is a share of
  (not the trainer's per-step line, which a paused worker would time wrongly)."""
  recs = [{"wall_s": w, "cpu_s": 2 * w} for w in (1.0, 3.0, 2.0)]
  stats = train_step.step_stats(recs, flops_per_step=2.0, tokens=100, peak=4.0)
  assert train_step.summary_line("tiny", "ours", stats, 3) == (
      "tiny ours: median of 3 timed steps 2 s/step, 4 CPU s/step, 50 text tokens/s, "
      "MFU 25.0% (frozen-aware FLOPs over the measured matmul peak)")


@pytest.mark.slow
def test_decode_benchmark_says_what_it_does(capsys):
  """benchmarks/decode.py: a stderr line before each model and variant compiles (minutes on
  the bench model), stdout only the JSON."""
  spec = importlib.util.spec_from_file_location(
      "decode_benchmark", os.path.join(REPO, "benchmarks", "decode.py"))
  decode = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(decode)
  report = decode.main(["--models", "tiny", "--variants", "cache", "--new_tokens", "2",
                        "--repeats", "1", "--batch", "1", "--prompt_len", "32"])
  out, err = capsys.readouterr()
  assert json.loads(out) == json.loads(json.dumps(report))
  lines = err.strip().splitlines()
  assert lines[0].startswith("decode.py: model tiny: random params") and len(lines) == 3, err
  assert lines[1].startswith("decode.py: model tiny, cache: compiling, then 1 timed calls")
  assert lines[2].startswith("decode.py: model tiny, cache: ") and "tokens/s" in lines[2]


def test_nfnet_forward_counts_the_unrolled_flops():
  """benchmarks/nfnet_forward.py: XLA's count agrees with the analytic one (some % of
  elementwise work above it), not the 0.66x it gave on the scanned blocks' program."""
  spec = importlib.util.spec_from_file_location(
      "nfnet_forward_benchmark", os.path.join(REPO, "benchmarks", "nfnet_forward.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = bench.bench("F0", 64, 1, 1, "float32")
  assert 1.0 < out["measured_over_analytic"] < 1.15, out  # 64 px: more elementwise share
