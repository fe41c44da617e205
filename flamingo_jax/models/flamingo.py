"""The Flamingo model: frozen vision encoder -> Perceiver Resampler -> frozen LM
with GATED XATTN-DENSE blocks inserted before some of its blocks.

Inputs
  tokens           [B, L] int32, `<image>` tokens mark where images are
  images           [B, N, T, H, W, 3] (N image slots, T frames) or
  visual_features  [B, N, T, S, C] precomputed vision features
  next_image       [B] bool: text attends to the next image instead of the
                   previous one (p_next, paper appendix)
  attention_mask   [B, L] (1 = real token; left or right padding)
Output
  logits [B, L, V] float32 and an aux dict with namespaced entries.

Parameter tree (top level = component, used by labels and sharding rules):
  vision/ resampler/ xattn_block_{i}/ lm/ new_token_embeddings
  (+ new_token_unembeddings when the LM's embeddings are untied)
The two new tokens `<image>` and `<EOC>` have trainable rows in both the input
and the output embedding (`new_tokens/`), so an LM with untied embeddings can
still learn to emit `<EOC>` (OpenFlamingo never trains its output rows).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.config import FlamingoConfig
from flamingo_jax.models import layers, masking
from flamingo_jax.models.lm import DecoderLM, causal_mask, default_positions
from flamingo_jax.models.resampler import PerceiverResampler
from flamingo_jax.models.vision import build_vision_encoder
from flamingo_jax.models.xattn import GatedCrossAttentionBlock


def xattn_layer_indices(num_layers: int, every: int, placement: str) -> list[int]:
  """LM block indices that get a GATED XATTN-DENSE block *before* them.

  paper:        0, N, 2N, ...        (9B: 0, 4, ..., 36; 80B: 0, 7, ..., 77)
  openflamingo: i with (i + 1) % N == 0  (N-1, 2N-1, ...)
  middle:       one block before num_layers // 2 (Table 3 "single in middle")
  """
  if placement == "paper":
    return list(range(0, num_layers, every))
  if placement == "openflamingo":
    return [i for i in range(num_layers) if (i + 1) % every == 0]
  if placement == "middle":
    return [num_layers // 2]
  raise ValueError(f"unknown model.xattn.placement {placement!r}")


def _is_concrete(x) -> bool:
  return x is not None and not isinstance(x, jax.core.Tracer)


class Flamingo(nn.Module):
  config: FlamingoConfig

  def setup(self):
    c = self.config
    kw = dict(dtype=layers.dtype_of(c.dtype), param_dtype=layers.dtype_of(c.param_dtype))
    # name "none": the model runs on precomputed features only.
    self.vision = None if c.vision.name == "none" else build_vision_encoder(c.vision, **kw)
    self.resampler = PerceiverResampler(c.resampler, **kw)
    self.lm = DecoderLM(c.lm, remat=c.remat, **kw)
    self.xattn_indices = xattn_layer_indices(c.lm.num_layers, c.xattn.every, c.xattn.placement)
    block = GatedCrossAttentionBlock
    if c.remat == "block":
      block = nn.remat(GatedCrossAttentionBlock)
    elif c.remat == "dots":
      block = nn.remat(GatedCrossAttentionBlock, policy=jax.checkpoint_policies.dots_saveable)
    self.xattn = [block(c.xattn, name=f"xattn_block_{i}", **kw) for i in self.xattn_indices]
    if c.train_new_token_embeddings:
      init = nn.with_logical_partitioning(nn.initializers.normal(1.0 / c.lm.width ** 0.5),
                                          (None, "embed"))
      self.new_token_embeddings = self.param("new_token_embeddings", init, (2, c.lm.width),
                                             kw["param_dtype"])
      if c.lm.tie_embeddings:  # tied like the LM's own rows
        self.new_token_unembeddings = self.new_token_embeddings
      else:
        self.new_token_unembeddings = self.param("new_token_unembeddings", init,
                                                 (2, c.lm.width), kw["param_dtype"])

  @property
  def new_token_ids(self) -> tuple[int, int]:
    return (self.config.image_token_id, self.config.eoc_token_id)

  # ------------------------------------------------------------------ vision
  def encode_images(self, images, train: bool = False):
    """images [B, N, T, H, W, 3] -> features [B, N, T, S, C] (S = h * w)."""
    layers.check_rank("images", images, 6, "[B, N, T, H, W, 3]")
    b, n, t, h, w, ch = images.shape
    if self.vision is None:
      raise ValueError("model.vision.name is 'none': pass visual_features, not images")
    if ch != 3:
      raise ValueError(f"images must have 3 channels in the last axis, got shape {images.shape}")
    grid = self.vision(images.reshape(b * n * t, h, w, ch), train=train)
    feats = grid.reshape(b, n, t, -1, grid.shape[-1])
    if "vision" in self.config.frozen:
      feats = jax.lax.stop_gradient(feats)
    return feats

  def resample(self, features):
    """features [B, N, T, S, C] -> visual tokens [B, N, n_latents, D_r]."""
    c = self.config
    layers.check_rank("visual_features", features, 5, "[B, N, T, S, C]")
    if c.vision_feature_dim and features.shape[-1] != c.vision_feature_dim:
      raise ValueError(
          f"visual features are {features.shape[-1]} wide but model.vision_feature_dim is "
          f"{c.vision_feature_dim} (shape {tuple(features.shape)})")
    return self.resampler(features)

  # ------------------------------------------------------------------ text
  def embed_tokens(self, tokens, positions):
    x = self.lm.embed(tokens, positions)
    if self.config.train_new_token_embeddings:
      for k, tid in enumerate(self.new_token_ids):
        row = self.new_token_embeddings[k].astype(x.dtype)
        x = jnp.where((tokens == tid)[..., None], row, x)
    return x

  def logits_from_hidden(self, h):
    h, logits = self.lm.hidden_to_logits(h)
    if self.config.train_new_token_embeddings:
      new = jnp.einsum("bld,kd->blk", h, self.new_token_unembeddings.astype(h.dtype))
      logits = logits.at[..., np.array(self.new_token_ids)].set(new.astype(logits.dtype))
    return logits

  # ------------------------------------------------------------------ model
  def __call__(self, tokens, images=None, visual_features=None, next_image=None,
               attention_mask=None, image_count=None, train: bool = False):
    """-> (logits [B, L, V] float32, aux dict). See module docstring."""
    c = self.config
    check_inputs(c, tokens, images, visual_features, next_image, attention_mask, image_count)
    b, length = tokens.shape
    dtype = layers.dtype_of(c.dtype)

    if images is not None:
      visual_features = self.encode_images(images, train=train)
    if visual_features is not None:
      visual = self.resample(visual_features)  # [B, N, n, D_r]
      n_img, n_tok = visual.shape[1], visual.shape[2]
      phi = masking.phi(tokens, c.image_token_id, next_image)
    else:  # text only: no token has an image
      n_img, n_tok = 1, 1
      visual = jnp.zeros((b, 1, 1, c.resampler.width), dtype)
      phi = jnp.zeros((b, length), jnp.int32)
    visual = visual.reshape(b, n_img * n_tok, visual.shape[-1])
    xmask = masking.visual_attention_mask(phi, n_img, n_tok, c.xattn.attend_previous)
    has_image = phi > 0

    if attention_mask is not None:
      attention_mask = attention_mask.astype(bool)
    positions = default_positions(attention_mask, b, length)
    mask = causal_mask(attention_mask, length, b)
    x = self.embed_tokens(tokens, positions)
    xattn_at = dict(zip(self.xattn_indices, self.xattn))
    for i in range(c.lm.num_layers):
      if i in xattn_at:
        x = xattn_at[i](x, visual, xmask, has_image)
      x = self.lm.block(i, x, positions, mask)
    logits = self.logits_from_hidden(x)
    aux = {"xattn/phi": phi, "resampler/num_visual_tokens": n_tok}
    return logits, aux


def check_inputs(c: FlamingoConfig, tokens, images, visual_features, next_image,
                 attention_mask, image_count) -> None:
  """Shape checks always; value checks when the arrays are concrete (not traced)."""
  layers.check_rank("tokens", tokens, 2, "[B, L]")
  b = tokens.shape[0]
  if images is not None and visual_features is not None:
    raise ValueError("pass either images or visual_features, not both")
  visual = images if images is not None else visual_features
  name = "images" if images is not None else "visual_features"
  if visual is not None and visual.shape[0] != b:
    raise ValueError(f"{name} has batch size {visual.shape[0]} but tokens has {b}")
  for arr_name, arr in [("next_image", next_image), ("image_count", image_count)]:
    if arr is not None and tuple(arr.shape) != (b,):
      raise ValueError(f"{arr_name} must have shape [B] = ({b},), got {tuple(arr.shape)}")
  if attention_mask is not None and attention_mask.shape != tokens.shape:
    raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape "
                     f"{tuple(tokens.shape)}")
  if not _is_concrete(tokens):
    return
  tok = np.asarray(tokens)
  if tok.size and (tok.min() < 0 or tok.max() >= c.lm.vocab_size):
    raise ValueError(f"token ids must lie in [0, {c.lm.vocab_size}); got min {tok.min()} "
                     f"max {tok.max()}")
  counts = (tok == c.image_token_id).sum(-1)
  slots = 0 if visual is None else visual.shape[1]
  if (counts > slots).any():
    bad = int(np.argmax(counts > slots))
    raise ValueError(
        f"example {bad} has {counts[bad]} <image> tokens (id {c.image_token_id}) but only "
        f"{slots} image slots were given ({name if visual is not None else 'no images'})")
  if _is_concrete(image_count):
    ic = np.asarray(image_count)
    if (ic != counts).any():
      bad = int(np.argmax(ic != counts))
      raise ValueError(f"example {bad}: image_count is {ic[bad]} but the tokens hold "
                       f"{counts[bad]} <image> tokens")


def merged_lm_params(params: dict[str, Any], config: FlamingoConfig) -> dict[str, Any]:
  """The LM's params with the trained `<image>`/`<EOC>` rows written in.

  With the gates at zero, Flamingo equals this LM; also what a text-only
  export of a trained model needs.
  """
  lm = jax.tree.map(lambda a: a, params["lm"])
  if not config.train_new_token_embeddings:
    return lm
  ids = np.array([config.image_token_id, config.eoc_token_id])
  unbox = lambda v: getattr(v, "value", v)  # noqa: E731
  emb = unbox(lm["embedding"]).at[ids].set(unbox(params["new_token_embeddings"]))
  lm["embedding"] = emb
  if not config.lm.tie_embeddings:
    kernel = unbox(lm["unembed"]["kernel"])
    lm["unembed"] = dict(lm["unembed"],
                         kernel=kernel.at[:, ids].set(unbox(params["new_token_unembeddings"]).T))
  return lm
