"""Tiny Flamingo: a forward/backward in well under a second on a CPU (tests, demo).

  python -m flamingo_jax.tools.count_params --config configs/tiny.py
  python -m flamingo_jax.train --config configs/tiny.py --workdir /tmp/tiny
  python -m flamingo_jax.train --config configs/tiny.py --workdir /tmp/tiny \
      --fake_devices=8 --config.mesh.fsdp=2 --config.mesh.tensor=2 --config.mesh.zero1=True

Trains on the deterministic synthetic image-text data of flamingo_jax/data/in_memory.py
(two datasets, combined by gradient accumulation as in the paper); the loss falls
within a few dozen steps.
"""
import ml_collections

from flamingo_jax.config import to_config_dict
from flamingo_jax.models.config import FlamingoConfig, PatchEncoderConfig, ResamplerConfig, VisionConfig, XAttnConfig, lm_preset

VOCAB = 512


def get_config():
  model = FlamingoConfig(
      vision=VisionConfig(name="patch", image_size=32,
                          patch=PatchEncoderConfig(patch_size=8, width=32, depth=1)),
      vision_feature_dim=32,
      resampler=ResamplerConfig(depth=2, width=64, num_heads=4, head_dim=16, num_latents=8,
                                max_frames=4),
      xattn=XAttnConfig(every=1, num_heads=4, head_dim=16),
      lm=lm_preset("chinchilla", vocab_size=VOCAB, num_layers=2, width=64, num_heads=4,
                   head_dim=16, max_length=128),
      image_token_id=VOCAB - 2,
      eoc_token_id=VOCAB - 1,
  )
  config = ml_collections.ConfigDict({"model": to_config_dict(model)})

  # The other keys of train, optim, mesh, checkpoint and distributed at their defaults
  # (`train.load` fills them). log_every, peak_flops_per_device and checkpoint.enabled
  # stay because benchmarks/train_step.py overrides them on this file as written.
  config.train = dict(total_steps=200, log_every=10, peak_flops_per_device=0.0)
  config.optim = dict(learning_rate=1e-3, warmup_steps=10)
  config.checkpoint = dict(every=50, keep=2, enabled=True)
  # Batch sizes are global (over all processes); weight is lambda_m of the loss.
  config.synthetic = dict(
      seed=0,
      num_classes=8,
      nan_batches=(),
      feature_positions=16,
      datasets=dict(
          interleaved=dict(kind="interleaved", batch_size=8, seq_len=32, max_images=3,
                           num_frames=1, weight=1.0),
          pairs=dict(kind="pairs", batch_size=8, seq_len=16, max_images=1, num_frames=1,
                     weight=0.2),
      ),
  )
  return config
