"""The training loop end to end (in-process, small config): an interrupted and
resumed run repeats the uninterrupted one exactly; SIGTERM saves a checkpoint
and exits cleanly; non-finite updates are skipped and stop the run after K in a
row; the step sharded over 8 devices (data x FSDP x tensor, ZeRO-1) matches one
device."""
import json
import os
import signal
import tempfile
import threading
import time

import jax
import numpy as np
import pytest

from flamingo_jax.trainers.flamingo import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Reuse compiled programs across runs and test sessions (same HLO -> same binary).
if not jax.config.jax_compilation_cache_dir:
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "FLAMINGO_JAX_TEST_CACHE",
      os.path.join(tempfile.gettempdir(), f"flamingo_jax_test_jit_cache_{os.getuid()}")))

LOSS_KEYS = ("loss", "loss/interleaved", "loss/pairs", "grad_norm", "learning_rate",
             "gates/xattn_block_0/attn_gate")


def small_config(*overrides):
  """configs/tiny.py made smaller: 1 LM block, resampler depth 1, short sequences."""
  return train.load(os.path.join(REPO, "configs", "tiny.py"), [
      "model.lm.num_layers=1", "model.resampler.depth=1",
      "synthetic.datasets.interleaved.seq_len=16", "synthetic.datasets.interleaved.max_images=2",
      "synthetic.datasets.pairs.seq_len=8", "train.micro_batches={'interleaved': 2}",
      "train.total_steps=1000", "train.log_every=1", "train.peak_flops_per_device=1e11",
      "optim.schedule='cosine'", "optim.warmup_steps=4", "checkpoint.every=2", *overrides])


def losses(history, keys=LOSS_KEYS):
  return {k: [h[k] for h in history] for k in keys}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The first 6 steps of a run on one device, uninterrupted."""
  workdir = tmp_path_factory.mktemp("reference")
  summary = train.run(small_config(), str(workdir), stop_at=6, devices=jax.devices()[:1])
  assert summary["stopped"] == "stop_at" and summary["step"] == 6
  return summary, workdir


def test_resume_repeats_the_uninterrupted_run_exactly(reference, tmp_path):
  ref, ref_dir = reference
  first = train.run(small_config(), str(tmp_path), stop_at=3, devices=jax.devices()[:1])
  assert first["stopped"] == "stop_at" and first["step"] == 3
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
  second = train.run(small_config(), str(tmp_path), stop_at=6, devices=jax.devices()[:1])
  assert second["step"] == 6 and len(second["history"]) == 3
  # Bit-identical: params, optimizer state (mid warm-up), step, RNG and data
  # position all resumed.
  assert losses(first["history"] + second["history"]) == losses(ref["history"])
  # Workdir artefacts: resolved config, code version, JSONL and TensorBoard events.
  assert json.load(open(ref_dir / "config.json"))["model"]["lm"]["num_layers"] == 1
  assert (ref_dir / "version.txt").read_text().strip()
  layout = json.load(open(ref_dir / "shardings.json"))
  assert layout["params"]["lm/embedding"] == "P(None, None)"
  rows = [json.loads(line) for line in open(ref_dir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert {"tokens_per_second", "mfu", "mfu_all_3x", "gates/xattn_block_0/ffw_gate"} <= set(rows[0])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(ref_dir / "tensorboard"))


def test_frozen_weights_load_from_model_init(reference, tmp_path):
  """Frozen LM and vision encoder restored from their own checkpoints (no random
  init, nothing written to workdir/frozen): the same run as the reference."""
  ref, ref_dir = reference
  run = train.run(small_config(f"model_init={{'lm': '{ref_dir}/frozen/lm', "
                               f"'vision': '{ref_dir}/frozen/vision'}}"),
                  str(tmp_path), stop_at=2, devices=jax.devices()[:1])
  assert losses(run["history"]) == losses(ref["history"][:2])
  assert not (tmp_path / "frozen").exists()
  with pytest.raises(ValueError, match="model_init / frozen weights of 'lm'.*does not exist"):
    train.run(small_config(f"model_init={{'lm': '{tmp_path}/nowhere'}}"), str(tmp_path / "b"),
              stop_at=1, devices=jax.devices()[:1])


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  """Also round-robin mixing: one dataset per step, cycling, across a resume."""
  metrics = tmp_path / "metrics.jsonl"

  def send_sigterm_after_two_steps():
    deadline = time.time() + 600
    while time.time() < deadline:
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.02)

  before = signal.getsignal(signal.SIGTERM)
  killer = threading.Thread(target=send_sigterm_after_two_steps, daemon=True)
  killer.start()
  config = small_config("train.mixing='round_robin'", "checkpoint.every=0")
  summary = train.run(config, str(tmp_path), devices=jax.devices()[:1])
  killer.join()
  assert summary["stopped"] == "signal"
  step = summary["step"]
  assert 2 <= step < 1000
  assert os.listdir(tmp_path / "checkpoints") == [str(step)]
  assert signal.getsignal(signal.SIGTERM) == before  # handler restored
  resumed = train.run(config, str(tmp_path), stop_at=step + 1, devices=jax.devices()[:1])
  assert resumed["step"] == step + 1 and len(resumed["history"]) == 1
  names = [sorted(k for k in h if k.startswith("loss/"))
           for h in summary["history"] + resumed["history"]]
  expected = [["loss/interleaved"], ["loss/pairs"]] * (step + 1)
  assert names == expected[:step + 1]


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path):
  config = small_config("synthetic.nan_batches=(2, 3, 4)", "train.max_consecutive_nonfinite=3",
                        "checkpoint.every=0")
  with pytest.raises(FloatingPointError, match="3 consecutive updates had non-finite"):
    train.run(config, str(tmp_path), devices=jax.devices()[:1])
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["update_skipped"] for r in rows] == [0, 0, 1, 1]  # step 5 raised before logging
  assert all(np.isfinite(r["loss/pairs"]) or r["update_skipped"] for r in rows)
  assert rows[3]["gates/xattn_block_0/attn_gate"] == rows[1]["gates/xattn_block_0/attn_gate"]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sharded_step_matches_one_device(reference, tmp_path):
  ref, _ = reference
  sharded = train.run(small_config(
      "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.zero1=True", "mesh.fsdp_min_size=64",
      "checkpoint.enabled=False"), str(tmp_path), stop_at=3)
  got, want = losses(sharded["history"]), losses(ref["history"][:3])
  for key in LOSS_KEYS:
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-7, err_msg=key)
