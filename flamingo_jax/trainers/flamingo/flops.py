"""Analytic FLOPs of a training step, frozen-aware.

Counted as MaxText does: a matmul [m, k] x [k, n] is 2mkn FLOPs, embedding
gathers, norms and elementwise ops are 0, causal self-attention is halved.
Cross-attention and resampler attention are full (every visual token is
computed, then masked).

Training cost per component, as multiples of its forward pass:
  3x  trainable components (forward + activation grads + weight grads)
  2x  frozen components that gradients must cross (forward + activation grads):
      frozen LM blocks at or above the first trainable input (the first
      cross-attention block, or block 0 when the `<image>`/`<EOC>` rows of the
      input embedding train), the frozen unembedding
  1x  frozen components below every trainable one (frozen vision encoder,
      LM blocks below the first cross-attention)
The visual path (vision -> resampler) and the text path (embedding -> LM
blocks) meet at each cross-attention block, so a trainable resampler makes LM
blocks above the first cross-attention 2x but leaves the frozen vision encoder 1x.
`frozen_aware` is the honest numerator for MFU. Beside it:
  `all_3x`  3x the forward pass (every parameter trained, the usual MFU);
  `6n`      6 * parameters * text tokens (the coarse convention; it ignores
            attention and per-image work and counts frozen weights as trained).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from flamingo_jax.models.config import (FlamingoConfig, LMConfig, ResamplerConfig, XAttnConfig,
                                        xattn_layer_indices)


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """One dataset's global batch as the model sees it."""
  batch_size: int
  seq_len: int
  num_images: int  # N image slots per example
  num_frames: int = 1  # T frames per slot
  image_size: int = 0  # H = W in pixels (encoder runs), or 0 with precomputed features
  feature_positions: int = 0  # S per frame when features are precomputed


def dense(m: int, k: int, n: int) -> int:
  return 2 * m * k * n


# --------------------------------------------------------------------------
# Forward FLOPs of each component


def lm_block(lm: LMConfig, length: int) -> int:
  """One decoder block, one sequence."""
  d, h, dh = lm.width, lm.num_heads, lm.head_dim
  hkv = lm.num_kv_heads or h
  f = lm.ffw_dim or lm.ffw_mult * d
  proj = dense(length, d, h * dh) + 2 * dense(length, d, hkv * dh) + dense(length, h * dh, d)
  attn = 2 * dense(length, dh, length) * h // 2  # QK^T and AV, causal half
  gated = lm.activation in ("swiglu", "geglu")
  ffw = (3 if gated else 2) * dense(length, d, f)
  return proj + attn + ffw


def lm_head(config: FlamingoConfig, length: int) -> int:
  """Unembedding (plus the 2 new-token rows), one sequence."""
  flops = dense(length, config.lm.width, config.lm.vocab_size)
  if config.train_new_token_embeddings:
    flops += dense(length, config.lm.width, 2)
  return flops


def xattn_block(x: XAttnConfig, width: int, visual_width: int, length: int,
                visual_tokens: int) -> int:
  """One GATED XATTN-DENSE block, one sequence attending over visual_tokens."""
  inner = x.num_heads * x.head_dim
  flops = (dense(length, width, inner) + 2 * dense(visual_tokens, visual_width, inner)
           + 2 * dense(length, x.head_dim, visual_tokens) * x.num_heads
           + dense(length, inner, width))
  if x.kind == "gated_dense":
    flops += 2 * dense(length, width, x.ffw_mult * width)
  return flops


def resampler(r: ResamplerConfig, feature_dim: int, positions: int) -> int:
  """One image (or clip) of `positions` = T * S feature vectors."""
  w, n, inner = r.width, r.num_latents, r.num_heads * r.head_dim
  flops = dense(positions, feature_dim, w) if r.input_proj else 0
  ffw = lambda tokens: 2 * dense(tokens, w, r.ffw_mult * w)  # noqa: E731
  for _ in range(r.depth):
    if r.kind == "mlp":
      flops += ffw(positions)
    elif r.kind == "transformer":
      seq = positions + n
      flops += 3 * dense(seq, w, inner) + 2 * dense(seq, r.head_dim, seq) * r.num_heads
      flops += dense(seq, inner, w) + ffw(seq)
    else:
      kv = positions + n
      flops += dense(n, w, inner) + 2 * dense(kv, w, inner)
      flops += 2 * dense(n, r.head_dim, kv) * r.num_heads + dense(n, inner, w) + ffw(n)
  return flops


def conv(size_out: int, k: int, c_in: int, c_out: int, groups: int = 1) -> int:
  return 2 * size_out * size_out * k * k * (c_in // groups) * c_out


def nfnet(config, image_size: int) -> int:
  """NFNet forward on one square image (no classifier): stem, blocks, final conv."""
  from flamingo_jax.models import nfnet as nf
  c = config.vision.nfnet
  size, ch, flops = image_size, 3, 0
  for width, stride in zip(c.stem_widths, nf.STEM_STRIDES):
    size = math.ceil(size / stride)
    flops += conv(size, 3, ch, width)
    ch = width
  for s in nf.block_specs(c):
    out = math.ceil(size / s.stride)
    flops += conv(size, 1, s.in_ch, s.mid_ch)  # conv0
    flops += conv(out, 3, s.mid_ch, s.mid_ch, s.groups)  # conv1 (strided)
    flops += conv(out, 3, s.mid_ch, s.mid_ch, s.groups)  # conv1b
    flops += conv(out, 1, s.mid_ch, s.out_ch)  # conv2
    if s.stride > 1 or s.projection:
      flops += conv(out, 1, s.in_ch, s.out_ch)  # shortcut
    hidden = max(1, int(s.out_ch * c.se_ratio))
    flops += dense(1, s.out_ch, hidden) + dense(1, hidden, s.out_ch)  # squeeze-excite
    size, ch = out, s.out_ch
  if c.final_conv:
    flops += conv(size, 1, ch, nf.nfnet_feature_dim(c))
  return flops


def patch_encoder(config, image_size: int) -> int:
  p = config.vision.patch
  positions = (image_size // p.patch_size) ** 2
  return dense(positions, p.patch_size ** 2 * 3, p.width) + p.depth * 2 * dense(
      positions, p.width, 4 * p.width)


def vision(config: FlamingoConfig, image_size: int) -> int:
  """One frame through the vision encoder."""
  name = config.vision.name
  if name == "nfnet":
    return nfnet(config, image_size)
  if name == "patch":
    return patch_encoder(config, image_size)
  raise ValueError(f"no FLOP formula for vision encoder {name!r}")


def feature_grid(config: FlamingoConfig, shape: BatchShape) -> tuple[int, int]:
  """(S positions per frame, C channels) entering the resampler."""
  from flamingo_jax.models.vision import vision_feature_dim
  if shape.feature_positions:
    return shape.feature_positions, config.vision_feature_dim
  if config.vision.name == "nfnet":
    s = math.ceil(shape.image_size / 32) ** 2
  elif config.vision.name == "patch":
    s = (shape.image_size // config.vision.patch.patch_size) ** 2
  else:
    raise ValueError(f"no feature grid for vision encoder {config.vision.name!r}; "
                     "give BatchShape.feature_positions")
  return s, config.vision_feature_dim or vision_feature_dim(config.vision)


# --------------------------------------------------------------------------
# A training step


def _xattn_indices(config: FlamingoConfig) -> list[int]:
  x = config.xattn
  return xattn_layer_indices(config.lm.num_layers, x.every, x.placement, x.layers)


def forward_by_component(config: FlamingoConfig, shape: BatchShape) -> list[tuple[str, int]]:
  """[(component, forward FLOPs)] in the order the forward pass runs them."""
  b, length = shape.batch_size, shape.seq_len
  images = b * shape.num_images
  s, c = feature_grid(config, shape)
  out = []
  if not shape.feature_positions:
    out.append(("vision", images * shape.num_frames * vision(config, shape.image_size)))
  out.append(("resampler", images * resampler(config.resampler, c, shape.num_frames * s)))
  out.append(("new_tokens/embed", 0))
  visual = shape.num_images * config.resampler.num_latents
  at = set(_xattn_indices(config))
  for i in range(config.lm.num_layers):
    if i in at:
      out.append((f"xattn/{i}", b * xattn_block(config.xattn, config.lm.width,
                                                config.resampler.width, length, visual)))
    out.append((f"lm/{i}", b * lm_block(config.lm, length)))
  out.append(("lm/head", b * lm_head(config, length)))
  return out


def _trainable(config: FlamingoConfig, component: str) -> bool:
  top = component.split("/", 1)[0]
  if component == "lm/head":  # unembedding rows of the new tokens train, the rest not
    return "lm" not in config.frozen
  return top not in config.frozen


def step_flops(config: FlamingoConfig, shapes: Sequence[BatchShape],
               num_params: Optional[int] = None) -> dict:
  """FLOPs of one update over all `shapes` (one per dataset drawn that step).

  Returns {'forward', 'frozen_aware', 'all_3x', '6n', 'text_tokens',
  'by_component': {component: frozen-aware FLOPs}}; '6n' is 0 unless
  num_params is given.
  """
  totals = {"forward": 0, "frozen_aware": 0, "text_tokens": 0}
  by_component: dict[str, int] = {}
  for shape in shapes:
    totals["text_tokens"] += shape.batch_size * shape.seq_len
    # Does a trainable parameter sit below this point (so gradients must cross it)?
    # Two paths meet at each cross-attention: visual (vision -> resampler) and
    # text (embedding -> LM blocks).
    visual_grads = text_grads = False
    for name, fwd in forward_by_component(config, shape):
      trainable = _trainable(config, name)
      if name == "new_tokens/embed":
        trainable = config.train_new_token_embeddings and "new_tokens" not in config.frozen
      if name in ("vision", "resampler"):
        below = visual_grads
        visual_grads = visual_grads or trainable
      elif name.startswith("xattn/"):
        below = text_grads or visual_grads
        text_grads = text_grads or trainable or visual_grads
      else:
        below = text_grads
        text_grads = text_grads or trainable
      mult = 3 if trainable else (2 if below else 1)
      totals["forward"] += fwd
      totals["frozen_aware"] += mult * fwd
      key = name.split("/", 1)[0] if name != "lm/head" else "lm"
      by_component[key] = by_component.get(key, 0) + mult * fwd
  totals["all_3x"] = 3 * totals["forward"]
  totals["6n"] = 6 * (num_params or 0) * totals["text_tokens"]
  totals["by_component"] = by_component
  return totals
