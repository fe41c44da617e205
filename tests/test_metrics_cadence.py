"""Metrics leave the devices only at log steps (training/loop.py): one
device_get per log window, fetched while the next step runs; every step still
reaches the history and on_step in order; the non-finite stop names the step
that tripped it; a checkpoint is saved only after its steps were handled; and a
run with log_every > 1 resumes exactly."""
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import pytest

from flamingo_jax.trainers.flamingo import train
from flamingo_jax.training import loop
from flamingo_jax.training.metrics import MetricsWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not jax.config.jax_compilation_cache_dir:  # the same cache as test_train_loop.py
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "FLAMINGO_JAX_TEST_CACHE",
      os.path.join(tempfile.gettempdir(), f"flamingo_jax_test_jit_cache_{os.getuid()}")))


class FakeSteps:
  """train_step for run_loop: metrics as device scalars; nonfinite from `bad` steps on."""

  def __init__(self, bad_from=None):
    self.dispatched, self.bad_from = 0, bad_from

  def __call__(self, state, step):
    self.dispatched = step + 1
    run = 0 if self.bad_from is None else max(0, step + 2 - self.bad_from)
    metrics = {"loss": jnp.float32(step), "update_skipped": jnp.float32(run > 0),
               "nonfinite_consecutive": jnp.float32(run), "nonfinite_total": jnp.float32(run)}
    return state, metrics, None


@pytest.fixture
def fetches(monkeypatch):
  """(steps dispatched, steps fetched) of every device_get the loop makes."""
  calls = []
  real = jax.device_get

  def spy(tree):
    calls.append([float(m["loss"]) + 1 for m in tree])
    return real(tree)

  monkeypatch.setattr(loop.jax, "device_get", spy)
  return calls


def handler(tmp_path, on_step=None, total=7, log_every=3, max_nonfinite=3):
  return loop.StepHandler(total_steps=total, log_every=log_every,
                          max_consecutive_nonfinite=max_nonfinite,
                          writer=MetricsWriter(tmp_path), start_step=0, on_step=on_step)


def test_one_transfer_per_log_window_while_the_next_step_runs(tmp_path, fetches):
  seen, steps = [], FakeSteps()
  h = handler(tmp_path, on_step=lambda k, m: seen.append((k, steps.dispatched, m["loss"])))
  _, step, stopped = loop.run_loop(None, step=0, total_steps=7, train_step=steps, handler=h)
  assert (step, stopped) == (7, "done")
  # Steps 1-3 fetched once step 4 was dispatched, 4-6 with step 7 in flight, 7 at the end.
  assert fetches == [[1, 2, 3], [4, 5, 6], [7]]
  assert [(k, d) for k, d, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 7), (5, 7), (6, 7),
                                          (7, 7)]
  assert [m["loss"] for m in h.history] == [float(k) for k in range(7)]
  h.writer.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [3, 6, 7] and all("step_time" in r for r in rows)


def test_non_finite_stop_is_noticed_at_the_flush_and_names_the_step(tmp_path, fetches):
  steps = FakeSteps(bad_from=2)  # steps 2, 3, 4 ... skipped: 3 in a row at step 4
  h = handler(tmp_path, total=100)
  with pytest.raises(FloatingPointError, match="stopping at step 4"):
    loop.run_loop(None, step=0, total_steps=100, train_step=steps, handler=h)
  assert steps.dispatched == 7  # the window 4-6 was fetched with step 7 in flight
  assert [m["nonfinite_consecutive"] for m in h.history] == [0, 1, 2, 3]


class FakeCheckpointer:
  def __init__(self, handler):
    self.handler, self.saves = handler, []

  def all_steps(self):
    return []

  def due(self, step):
    return step == 5

  def save(self, step, state, data_states):
    self.saves.append((step, len(self.handler.history)))

  def mark_good(self, step):  # a saved step that a finite step followed (never rotated out)
    assert step in [s for s, _ in self.saves], step


def test_checkpoint_follows_its_steps_handling(tmp_path, fetches):
  h = handler(tmp_path)
  ckpt = FakeCheckpointer(h)
  _, step, stopped = loop.run_loop(None, step=0, total_steps=7, train_step=FakeSteps(),
                                   handler=h, checkpointer=ckpt)
  assert ckpt.saves == [(5, 5), (7, 7)]  # every saved step already in the history
  assert fetches == [[1, 2, 3], [4, 5], [6], [7]]


def small_config(*overrides):
  return train.load(os.path.join(REPO, "configs", "tiny.py"), [
      "model.lm.num_layers=1", "model.resampler.depth=1",
      "synthetic.datasets.interleaved.seq_len=16", "synthetic.datasets.interleaved.max_images=2",
      "synthetic.datasets.pairs.seq_len=8", "train.total_steps=1000",
      "train.peak_flops_per_device=1e11", "checkpoint.every=0", *overrides])


def test_resume_with_sparse_logging_repeats_the_run_exactly(tmp_path):
  one = jax.devices()[:1]
  ref = train.run(small_config("train.log_every=1"), str(tmp_path / "ref"), stop_at=5,
                  devices=one)
  first = train.run(small_config("train.log_every=4"), str(tmp_path / "b"), stop_at=3,
                    devices=one)
  second = train.run(small_config("train.log_every=4"), str(tmp_path / "b"), stop_at=5,
                     devices=one)
  assert [len(first["history"]), len(second["history"])] == [3, 2]
  keys = ("loss", "grad_norm", "learning_rate", "nonfinite_total")
  pick = lambda hs: [{k: h[k] for k in keys} for h in hs]  # noqa: E731
  assert pick(first["history"] + second["history"]) == pick(ref["history"])
  rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [4]  # log steps only
