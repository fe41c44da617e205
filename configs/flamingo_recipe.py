"""The Flamingo training recipe (paper appendix B.1.2) for one model size.

  python -m flamingo_jax.train --config configs/flamingo_recipe.py:9b,data=gs://b/flamingo ...

configs/flamingo_{3b,9b,80b}.py are this file for their size; the argument
is comma-separated: the size (3b | 9b | 80b), `v1` (head size 128 in the
resampler, paper v1; default v2), `data=ROOT` (where the datasets and the
tokenizer live), `local` (the same recipe shrunk to run on a CPU in about a
minute: a tiny model, the same four datasets with the same weights and kinds
at 1/64 of the batch sizes, in-memory synthetic data, no micro-batches).

What the paper states, and where it is here:
  model      Table 4 (config.paper_model): NFNet-F6 at 320 px, Perceiver Resampler
             6 x 1536, 64 latents; GATED XATTN-DENSE every 1 / 4 / 7 LM blocks;
             the frozen Chinchilla-style LM; <image> and <EOC> appended at 32000/32001
  datasets   M3W (interleaved, 256 tokens, 5 images, p_next 0.5), ALIGN (pairs, 32
             tokens), LTIP (pairs, 64 tokens), VTP (video, 8 frames at 1 FPS); one
             batch of each per update, gradients accumulated with lambda 1.0 / 0.2 /
             0.2 / 0.03; batch sizes 256 / 512 / 512 / 64 (the ablation batches)
  optimizer  AdamW, weight decay 0.1 except the resampler, global-norm clip 1.0 once
             per update, lr 0 -> 1e-4 linearly over 5,000 steps then constant, 500k steps
  precision  trainable params and Adam state float32, compute bfloat16, frozen
             weights stored in bfloat16
  memory     (not stated) remat of every block and micro-batches (REMAT,
             MICRO_BATCHES below) so that the global batch fits 32 GiB chips
  mesh       16-way Megatron tensor parallelism (NFNet unsharded) + ZeRO-1, data
             parallel over the rest
Not stated by the paper (ours): Adam betas/eps (0.9, 0.999, 1e-8), checkpoint cadence.
The `synthetic` section holds the same mixture's shapes in memory
(--config.train.input=synthetic) for --compile_only checks without the data.
"""
import ml_collections

from flamingo_jax.config import to_config_dict
from flamingo_jax.models.config import FlamingoConfig, PatchEncoderConfig, ResamplerConfig, VisionConfig, XAttnConfig, lm_preset, paper_model

# name: (kind, batch size, tokens, images per example, frames per image, lambda)
MIXTURE = {
    "m3w": ("interleaved", 256, 256, 5, 1, 1.0),
    "align": ("pairs", 512, 32, 1, 1, 0.2),
    "ltip": ("pairs", 512, 64, 1, 1, 0.2),
    "vtp": ("video", 64, 64, 1, 8, 0.03),
}
LOCAL_SHRINK = 64  # :local batch sizes are the paper's / 64 (M3W 4, ALIGN 8, LTIP 8, VTP 1)
# Fit: every LM and cross-attention block recomputed in the backward pass
# (model.remat=block) and each dataset's batch split into this many sequential
# micro-batches (train.micro_batches), so the paper's global batch fits a TPU v4
# chip (32 GiB HBM, the paper's hardware) on the meshes of docs/training.md
# (data-parallel shards 16 or 32 on 256 chips: 1-4 M3W examples per chip per
# micro-step). A batch must divide by the data-parallel shards times its count.
REMAT = "block"
MICRO_BATCHES = {"m3w": 4, "align": 4, "ltip": 4, "vtp": 2}
LOCAL_VOCAB = 512


def _parse(arg):
  size, version, local, root = None, "v2", False, "data/flamingo"
  for part in [p for p in (arg or "").split(",") if p]:
    if part in ("3b", "9b", "80b"):
      size = part
    elif part in ("v1", "v2"):
      version = part
    elif part == "local":
      local = True
    elif part.startswith("data="):
      root = part[len("data="):]
    else:
      raise ValueError(f"unknown config argument {part!r}: expected 3b|9b|80b, v1|v2, "
                       "local, data=ROOT")
  if size is None:
    raise ValueError(f"config argument {arg!r} names no model size (3b, 9b or 80b)")
  return size, version, local, root


def local_model(paper: FlamingoConfig) -> FlamingoConfig:
  """The paper model's structure at CPU size: patch encoder at 32 px, resampler
  depth 2 x 64, a 4-block LM of width 64 (the size's xattn spacing kept where it fits)."""
  layers = 4
  return FlamingoConfig(
      vision=VisionConfig(name="patch", image_size=32,
                          patch=PatchEncoderConfig(patch_size=8, width=32, depth=1)),
      vision_feature_dim=32,
      resampler=ResamplerConfig(depth=2, width=64, num_heads=4, head_dim=16, num_latents=8,
                                activation=paper.resampler.activation, max_frames=8),
      xattn=XAttnConfig(every=min(paper.xattn.every, layers), placement=paper.xattn.placement,
                        num_heads=4, head_dim=16, activation=paper.xattn.activation),
      lm=lm_preset("chinchilla", vocab_size=LOCAL_VOCAB, num_layers=layers, width=64,
                   num_heads=4, head_dim=16, max_length=256),
      image_token_id=LOCAL_VOCAB - 2, eoc_token_id=LOCAL_VOCAB - 1,
      dtype=paper.dtype, param_dtype=paper.param_dtype, scan_layers=paper.scan_layers,
      attention=paper.attention)


def get_config(arg=None):
  size, version, local, root = _parse(arg)
  paper = paper_model(size, version)
  model = local_model(paper) if local else paper
  config = ml_collections.ConfigDict({"model": to_config_dict(model)})
  config.model.remat = REMAT

  shrink = LOCAL_SHRINK if local else 1
  seq = (lambda n: min(n, 32)) if local else (lambda n: n)
  frames = (lambda n: min(n, 2)) if local else (lambda n: n)
  config.data = dict(
      tokenizer=f"{root}/tokenizer.model",
      image=dict(size=model.vision.image_size, flip=True, colour_jitter=0.2),
      seed=0, worker_count=0, read_threads=2,
      datasets={name: dict(kind=kind, source="tar", paths=[f"{root}/{name}/train-*.tar"],
                           batch_size=b, seq_len=n, max_images=imgs, num_frames=t,
                           weight=w, **({"p_next": 0.5} if kind == "interleaved" else {}),
                           **({"fps": 1.0} if kind == "video" else {}))
                for name, (kind, b, n, imgs, t, w) in MIXTURE.items()})
  # The same mixture's shapes in memory (synthetic data has only pairs and
  # interleaved layouts: a video is a pair with T frames).
  config.synthetic = dict(
      seed=0, num_classes=8, nan_batches=(), feature_positions=16,
      datasets={name: dict(kind="interleaved" if kind == "interleaved" else "pairs",
                           batch_size=max(b // shrink, 1), seq_len=seq(n), max_images=imgs,
                           num_frames=frames(t), weight=w)
                for name, (kind, b, n, imgs, t, w) in MIXTURE.items()})

  config.train = dict(
      total_steps=20 if local else 500_000,
      input="synthetic" if local else "pipeline",
      mixing="accumulate", micro_batches={} if local else dict(MICRO_BATCHES),
      frozen_dtype="bfloat16",
      log_every=5 if local else 100)
  config.optim = dict(learning_rate=1e-4, warmup_steps=5 if local else 5000,
                      schedule="constant", end_learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8,
                      weight_decay=0.1, clip_norm=1.0)
  config.mesh = dict(tensor=1 if local else 16, zero1=True)
  config.checkpoint = dict(every=10 if local else 1000, keep=3)
  # Pretrained components (parameter checkpoints): the contrastively trained NFNet-F6 and
  # the LM, e.g. --config.model_init.vision=.../nfnet_f6 --config.model_init.lm=.../chinchilla.
  return config
