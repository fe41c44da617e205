"""Damage at the newest checkpoint, through the trainer (in-process, the small config of
tests/test_train_loop.py): the damaged step is set aside, the run resumes from the older
one and trains no step on damaged state; when the steps after that restore are
non-finite, the stop names the restored checkpoint and rotation has kept it on disk.
The training loop's side: which checkpoints a finite step followed, and data counters
read when a step is added, not when it is flushed."""
import glob
import os

import jax
import numpy as np
import pytest

from flamingo_jax.trainers.flamingo import train
from flamingo_jax.training import checkpoint as ckpt_lib
from flamingo_jax.training.loop import NonFiniteStop, StepHandler, run_loop
from flamingo_jax.training.metrics import MetricsWriter
from test_train_loop import small_config


def _damage_arrays(step_dir, seed=0):
  """Random bytes in the middle of the largest array data file (zstd chunks)."""
  files = [f for f in glob.glob(f"{step_dir}/state/**/d/*", recursive=True)]
  big = max(files, key=os.path.getsize)
  rng = np.random.default_rng(seed)
  size = os.path.getsize(big)
  with open(big, "r+b") as f:
    f.seek(size // 3)
    f.write(rng.integers(0, 256, min(4096, size // 3), dtype=np.uint8).tobytes())


@pytest.mark.slow
def test_damaged_newest_checkpoint_through_the_trainer(tmp_path):
  one = jax.devices()[:1]
  config = small_config("checkpoint.keep=1", "checkpoint.every=2")
  first = train.run(config, str(tmp_path), stop_at=4, devices=one)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # 2: step 3 was finite
  assert (tmp_path / "checkpoints" / "2" / ckpt_lib.FINITE_NEXT).exists()
  _damage_arrays(tmp_path / "checkpoints" / "4")

  # Set aside, resumed from 2: steps 3-4 replayed bit-identically (no step on damaged state).
  again = train.run(config, str(tmp_path), stop_at=4, devices=one)
  keys = ("loss", "grad_norm", "learning_rate")
  assert [[r[k] for k in keys] for r in again["history"]] == \
      [[r[k] for k in keys] for r in first["history"][2:4]]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "4.corrupt"]

  # Damaged again, and the steps after the fallback are non-finite (NaN pixels in batches
  # 2-4): the stop names checkpoint 2, which rotation (keep=1) has kept beside the new 4.
  _damage_arrays(tmp_path / "checkpoints" / "4", seed=1)
  bad = small_config("checkpoint.keep=1", "checkpoint.every=2", "synthetic.nan_batches=(2, 3, 4)",
                     "train.max_consecutive_nonfinite=3")
  with pytest.raises(NonFiniteStop, match=r"stopping at step 5\..* began right after the "
                     r"restore of checkpoint 2 \("):
    train.run(bad, str(tmp_path), devices=one)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "4.corrupt"]
  assert not (tmp_path / "checkpoints" / "2" / ckpt_lib.FINITE_NEXT).exists()


class _Data:
  """An iterator's counters, moved by the step that reads a batch."""

  def __init__(self):
    self.seen = 0

  def stats(self):
    return {"examples_seen": self.seen}


def _loop(tmp_path, checkpointer, start, total, finite, data=None):
  handler = StepHandler(total_steps=total, log_every=2, max_consecutive_nonfinite=2,
                        writer=MetricsWriter(tmp_path, enabled=False), start_step=start,
                        data_stats=(lambda: {"seen": data.stats()["examples_seen"]})
                        if data else None)

  run = [0]  # non-finite steps in a row

  def step_fn(state, step):
    if data is not None:
      data.seen += 4
    ok = finite(step + 1)
    run[0] = 0 if ok else run[0] + 1
    return state, {"loss": np.float32(1.0 if ok else np.nan), "update_skipped": np.int32(not ok),
                   "nonfinite_consecutive": np.int32(run[0]),
                   "nonfinite_total": np.int32(0)}, None

  state = {"w": jax.numpy.ones(4)}
  run_loop(state, step=start, total_steps=total, train_step=step_fn, handler=handler,
           checkpointer=checkpointer)
  return handler


def test_loop_marks_checkpoints_a_finite_step_followed(tmp_path):
  cfg = ckpt_lib.checkpoint_config({"every": 2, "keep": 1})
  c = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), cfg)
  data = _Data()
  handler = _loop(tmp_path, c, 0, 6, lambda s: s != 5, data)
  c.close()
  # Step 3 was finite, 5 was not: 2 is confirmed, 4 is not, so keep=1 keeps 2 beside 6.
  marked = sorted(s for s in c.all_steps()
                  if (tmp_path / "ckpt" / str(s) / ckpt_lib.FINITE_NEXT).exists())
  assert marked == [2] and c.all_steps() == [2, 6]
  # Counters read when the log step was added: those of steps 1..N, not of N+1.
  assert [h.get("seen") for h in handler.history] == [None, 8, None, 16, None, 24]


def test_nonfinite_steps_right_after_a_restore_name_the_checkpoint(tmp_path):
  cfg = ckpt_lib.checkpoint_config({"every": 2, "keep": 3})
  c = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), cfg)
  c.save(2, {"w": jax.numpy.ones(4)}, {})
  c.close()
  c = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), cfg)
  assert c.restore_latest({"w": jax.ShapeDtypeStruct((4,), np.float32)})[0] == 2
  with pytest.raises(NonFiniteStop, match=r"began right after the restore of checkpoint 2 "):
    _loop(tmp_path, c, 2, 10, lambda s: False)
  c.close()
  # Not right after a restore: the plain message.
  c = ckpt_lib.Checkpointer(str(tmp_path / "other"), cfg)
  with pytest.raises(NonFiniteStop) as e:
    _loop(tmp_path, c, 0, 10, lambda s: s < 4)
  assert "restore of" not in str(e.value) and "stopping at step 5." in str(e.value)
  c.close()
