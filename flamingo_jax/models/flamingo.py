"""The Flamingo model: frozen vision encoder -> Perceiver Resampler -> frozen LM
with GATED XATTN-DENSE blocks inserted before some of its blocks.

Inputs
  tokens           [B, L] int32, `<image>` tokens mark where images are
  images           [B, N, T, H, W, 3] (N image slots, T frames) or
  visual_features  [B, N, T, S, C] precomputed vision features, or
  visual_latents   [B, N, n, D_r] precomputed resampler outputs (the visual
                   tokens; evaluation caches them per image)
  next_image       [B] bool: text attends to the next image instead of the
                   previous one (p_next, paper appendix)
  tile_mask        [B, N, T] bool: the frames (mllama: tiles) of each image
                   that exist; a padded one's visual tokens are hidden from
                   the cross-attention (resampler kind 'linear', whose T * S
                   visual tokens per image are per frame)
  aspect_ratio_ids [B, N] int: each image's tile layout (0 = a padded image
                   slot), for a tiled vision encoder (mllama) given images
  attention_mask   [B, L] (1 = real token; left or right padding)
Output
  logits [B, L, V] float32 and an aux dict with namespaced entries.

Parameter tree (top level = component, used by labels and sharding rules):
  vision/ resampler/ xattn_block_{i}/ lm/ new_token_embeddings
  (+ new_token_unembeddings when the LM's embeddings are untied;
  + new_token_extra_embeddings with `model.extra_token_rows`, mllama's 8)
The two new tokens `<image>` and `<EOC>` have trainable rows in both the input
and the output embedding (`new_tokens/`), so an LM with untied embeddings can
still learn to emit `<EOC>` (OpenFlamingo never trains its output rows).

Decoding (methods `prefill` and `extend`, state `DecodeCache`): the vision
encoder, the resampler and every cross-attention block's keys/values run once
per prompt; each new token then costs one query against cached self-attention
keys/values and the cached visual keys/values. New tokens use previous-image
mode: their image index phi is the number of `<image>` tokens so far, kept in
the cache (with whether a reset token, `model.image_reset_token_id`, has cut
the text off from it since). Equal to the full forward (`__call__`) on the
whole sequence.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models.config import FlamingoConfig, xattn_indices
from flamingo_jax.models import layer_stack, layers, masking
from flamingo_jax.models.lm import (DecoderLM, default_positions, self_attention_mask,
                                    sequence_mask)
from flamingo_jax.models.resampler import PerceiverResampler
from flamingo_jax.models.vision import build_vision_encoder
from flamingo_jax.models.xattn import GatedCrossAttentionBlock


def _is_concrete(x) -> bool:
  return x is not None and not isinstance(x, jax.core.Tracer)


@flax.struct.dataclass
class DecodeCache:
  """What decoding keeps between steps; a pytree of arrays, batch-major (row b).

  keys/values: per LM block [B, S, Hkv, Dh], S slots (prompt + new tokens).
  xattn_keys/xattn_values: per GATED XATTN-DENSE block [B, H, N, n, Dh]
    (N images of n visual tokens; head-major, the layout the attention reads,
    so a step does not transpose them), computed once per prompt; or () when the
    cache holds `visual` instead and they are recomputed every step (the
    OpenFlamingo behaviour, kept for benchmarks).
  visual: [B, N, n, D_r] resampled visual tokens, only when xattn_* are ().
  key_mask: [B, S] bool, slots holding real tokens (left padding and unwritten
    slots are False).
  index: [] int32, the next slot to write (shared by the batch: left padding).
  num_tokens: [B] int32, real tokens so far = the next token's position.
  image_count: [B] int32, `<image>` tokens so far = phi of the next token.
  image_reset: [B] bool, a reset token came after the last `<image>`, so the
    next text token sees no image (always False without a reset token).
  image_group: [B] int32, the first image of the last token's run of `<image>`
    tokens (`masking.group_first`; attend_previous "group").
  image_run: [B] bool, the last real token was an `<image>` (a next one joins its run).
  visual_mask: [B, N * n] bool, visual tokens that exist (tile_mask), or None: all.
  """
  keys: tuple
  values: tuple
  xattn_keys: tuple
  xattn_values: tuple
  visual: Optional[jax.Array]
  key_mask: jax.Array
  index: jax.Array
  num_tokens: jax.Array
  image_count: jax.Array
  image_reset: jax.Array
  image_group: Optional[jax.Array] = None
  image_run: Optional[jax.Array] = None
  visual_mask: Optional[jax.Array] = None

  @property
  def length(self) -> int:
    """S, the number of slots."""
    return self.key_mask.shape[1]

  def take_rows(self, rows, cross: bool = True) -> "DecodeCache":
    """The cache of rows `rows` [R] int (beam reordering, replicating prompts).

    cross=False leaves the per-prompt visual part alone (a beam reorder within
    each prompt's own rows does not change it).
    """
    take = lambda tree: jax.tree.map(lambda a: jnp.take(a, rows, axis=0), tree)  # noqa: E731
    new = self.replace(keys=take(self.keys), values=take(self.values),
                       key_mask=take(self.key_mask), num_tokens=take(self.num_tokens),
                       image_count=take(self.image_count),
                       image_reset=take(self.image_reset), image_group=take(self.image_group),
                       image_run=take(self.image_run))
    if cross:
      new = new.replace(xattn_keys=take(self.xattn_keys), xattn_values=take(self.xattn_values),
                        visual=take(self.visual), visual_mask=take(self.visual_mask))
    return new


class Flamingo(nn.Module):
  config: FlamingoConfig

  def setup(self):
    c = self.config
    kw = dict(dtype=layers.dtype_of(c.dtype), param_dtype=layers.dtype_of(c.param_dtype))
    # name "none": the model runs on precomputed features only.
    self.vision = None if c.vision.name == "none" else build_vision_encoder(c.vision, **kw)
    self.resampler = PerceiverResampler(c.resampler, **kw)
    self.lm = DecoderLM(c.lm, remat=c.remat, scan=c.scan_layers, attention=c.attention, **kw)
    self.xattn_indices = xattn_indices(c)
    if c.scan_layers:  # one stacked tree `xattn_blocks`, leaves [num_xattn, ...]
      example = (jnp.zeros((1, 1, c.lm.width), kw["dtype"]),
                 jnp.zeros((1, 1, c.resampler.width), kw["dtype"]), jnp.ones((1, 1, 1), bool),
                 jnp.ones((1, 1), bool))
      self.xattn_stack = layer_stack.stacked_param(
          self, layer_stack.XATTN_STACK, self.xattn_template(), len(self.xattn_indices), example)
    else:
      block = layer_stack.remat_module(GatedCrossAttentionBlock, c.remat)
      attention = layers.resolve_attention(c.attention)
      self.xattn = [block(c.xattn, name=f"xattn_block_{i}", attention=attention, **kw)
                    for i in self.xattn_indices]
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
    if c.extra_token_rows:  # input rows only: the head cannot emit these ids
      init = nn.with_logical_partitioning(nn.initializers.normal(1.0 / c.lm.width ** 0.5),
                                          (None, "embed"))
      self.new_token_extra_embeddings = self.param(
          "new_token_extra_embeddings", init, (c.extra_token_rows, c.lm.width),
          kw["param_dtype"])

  def xattn_template(self) -> GatedCrossAttentionBlock:
    """The unbound block the stacked `xattn_blocks` are applied with (scan_layers)."""
    c = self.config
    return GatedCrossAttentionBlock(c.xattn, dtype=layers.dtype_of(c.dtype),
                                    param_dtype=layers.dtype_of(c.param_dtype),
                                    attention=layers.resolve_attention(c.attention), parent=None)

  def xattn_block(self, k: int, x, visual, xmask, has_image):
    """The k-th GATED XATTN-DENSE block (before LM block xattn_indices[k]), either layout."""
    if self.config.scan_layers:
      return layer_stack.apply_block(self.xattn_template(), layer_stack.take(self.xattn_stack, k),
                                     x, visual, xmask, has_image)
    return self.xattn[k](x, visual, xmask, has_image)

  def scanned_layers(self, x, visual, xmask, has_image, positions, mask):
    """The LM and cross-attention blocks on x [B, L, D] with the scanned layout: the
    steps of `layer_stack.plan` (regular placements: one scan over groups of one
    xattn block and its LM blocks), `model.remat` inside the scan bodies."""
    c = self.config
    template = self.xattn_template()
    xattn = layer_stack.remat_policy(c.remat)(
        lambda h, p: layer_stack.apply_block(template, p, h, visual, xmask, has_image))
    lm_block = self.lm.block_fn(positions, mask)

    def group(h, ps):
      return layer_stack.scan(lm_block, xattn(h, ps[0]), ps[1])

    for step in layer_stack.plan(c.lm.num_layers, self.xattn_indices):
      if step[0] == "lm":
        x = self.lm.run_blocks(step[1], step[2], x, positions, mask)
      elif step[0] == "xattn":
        x = xattn(x, layer_stack.take(self.xattn_stack, step[1]))
      else:
        _, k0, count, start, n = step
        xs = (layer_stack.take_range(self.xattn_stack, k0, k0 + count),
              layer_stack.take_range(self.lm.stacked_blocks(), start, start + count * n,
                                     groups=count))
        x = layer_stack.scan(group, x, xs)
    return x

  @property
  def new_token_ids(self) -> tuple[int, int]:
    return (self.config.image_token_id, self.config.eoc_token_id)

  # ------------------------------------------------------------------ vision
  def encode_images(self, images, train: bool = False, aspect_ratio_ids=None, tile_mask=None):
    """images [B, N, T, H, W, 3] -> features [B, N, T, S, C] (S = h * w).

    A tiled encoder (mllama) sees an image's T tiles together, with
    aspect_ratio_ids [B, N] and tile_mask [B, N, T] (None: every tile real).
    """
    layers.check_rank("images", images, 6, "[B, N, T, H, W, 3]")
    b, n, t, h, w, ch = images.shape
    if self.vision is None:
      raise ValueError("model.vision.name is 'none': pass visual_features, not images")
    if ch != 3:
      raise ValueError(f"images must have 3 channels in the last axis, got shape {images.shape}")
    if getattr(self.vision, "tiled", False):
      if aspect_ratio_ids is None:
        raise ValueError(f"model.vision.name {self.config.vision.name!r} is a tiled encoder: "
                         "pass aspect_ratio_ids [B, N] with the images")
      if tuple(aspect_ratio_ids.shape) != (b, n):
        raise ValueError(f"aspect_ratio_ids must have shape [B, N] = {(b, n)}, got "
                         f"{tuple(aspect_ratio_ids.shape)}")
      grid = self.vision(images.reshape(b * n, t, h, w, ch), aspect_ratio_ids.reshape(b * n),
                         None if tile_mask is None else tile_mask.reshape(b * n, t), train=train)
    else:
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
    """tokens [B, L], positions [B, L] -> [B, L, D], with the trainable `<image>` /
    `<EOC>` rows in place of the LM's (positions still added: GPT-2)."""
    c = self.config
    new_rows = ()
    if c.train_new_token_embeddings:
      new_rows = tuple((tid, self.new_token_embeddings[k])
                       for k, tid in enumerate(self.new_token_ids))
    if c.extra_token_rows:  # ids vocab_size - extra_token_rows ..
      base = c.lm.vocab_size - c.extra_token_rows
      new_rows = tuple((base + k, self.new_token_extra_embeddings[k])
                       for k in range(c.extra_token_rows)) + new_rows
    return self.lm.embed(tokens, positions, new_rows)

  def logits_from_hidden(self, h):
    h, logits = self.lm.hidden_to_logits(h)
    if self.config.train_new_token_embeddings:
      new = jnp.einsum("bld,kd->blk", h, self.new_token_unembeddings.astype(h.dtype))
      logits = logits.at[..., np.array(self.new_token_ids)].set(new.astype(logits.dtype))
    return logits

  # ------------------------------------------------------------------ model
  def __call__(self, tokens, images=None, visual_features=None, next_image=None,
               attention_mask=None, image_count=None, train: bool = False,
               visual_latents=None, tile_mask=None, aspect_ratio_ids=None):
    """-> (logits [B, L, V] float32, aux dict). See module docstring."""
    c = self.config
    check_inputs(c, tokens, images, visual_features, next_image, attention_mask, image_count,
                 visual_latents, tile_mask)
    b, length = tokens.shape
    dtype = layers.dtype_of(c.dtype)

    if images is not None:
      visual_features = self.encode_images(images, train, aspect_ratio_ids, tile_mask)
    if visual_features is not None or visual_latents is not None:
      visual = (self.resample(visual_features) if visual_latents is None
                else self.latents_in(visual_latents))  # [B, N, n, D_r]
      n_img, n_tok = visual.shape[1], visual.shape[2]
      phi = masking.phi(tokens, c.image_token_id, next_image, c.image_reset_token_id)
    else:  # text only: no token has an image
      n_img, n_tok = 1, 1
      visual = jnp.zeros((b, 1, 1, c.resampler.width), dtype)
      phi = jnp.zeros((b, length), jnp.int32)
      tile_mask = None
    visual = visual.reshape(b, n_img * n_tok, visual.shape[-1])
    if attention_mask is not None:
      attention_mask = attention_mask.astype(bool)
    first = None
    if c.xattn.attend_previous == "group":
      first = masking.group_first(tokens, c.image_token_id, phi, attention_mask)[0]
    xmask = masking.visual_attention_mask(phi, n_img, n_tok, c.xattn.attend_previous, first,
                                          visual_token_mask(tile_mask, n_img, n_tok))
    has_image = phi > 0

    positions = default_positions(attention_mask, b, length)
    mask = sequence_mask(attention_mask, positions, c.lm.sliding_window)
    x = self.embed_tokens(tokens, positions)
    if c.scan_layers:
      x = self.scanned_layers(x, visual, xmask, has_image, positions, mask)
    else:
      xattn_at = dict(zip(self.xattn_indices, self.xattn))
      for i in range(c.lm.num_layers):
        if i in xattn_at:
          x = xattn_at[i](x, visual, xmask, has_image)
        x = self.lm.block(i, x, positions, mask)
    logits = self.logits_from_hidden(x)
    aux = {"xattn/phi": phi, "resampler/num_visual_tokens": n_tok}
    return logits, aux

  # ------------------------------------------------------------------ decoding
  def latents_in(self, latents):
    """Precomputed visual tokens [B, N, n, D_r] (`resample`'s output, e.g. cached per
    image) -> the same in the compute dtype, checked."""
    c = self.config
    layers.check_rank("visual_latents", latents, 4, "[B, N, n, D_r]")
    if latents.shape[-1] != c.resampler.width:
      raise ValueError(f"visual_latents are {latents.shape[-1]} wide but model.resampler.width "
                       f"is {c.resampler.width} (shape {tuple(latents.shape)})")
    return latents.astype(layers.dtype_of(c.dtype))

  def visual_tokens(self, batch: int, images=None, visual_features=None, visual_latents=None,
                    aspect_ratio_ids=None, tile_mask=None):
    """images, features or latents (or none: text only) -> visual tokens [B, N, n, D_r]."""
    if visual_latents is not None:
      return self.latents_in(visual_latents)
    if images is not None:
      visual_features = self.encode_images(images, False, aspect_ratio_ids, tile_mask)
    if visual_features is None:  # as __call__: one zero token no text attends to
      return jnp.zeros((batch, 1, 1, self.config.resampler.width),
                       layers.dtype_of(self.config.dtype))
    return self.resample(visual_features)

  def cross_kv(self, visual):
    """visual [B, N, n, D_r] -> per xattn block (keys, values), each [B, H, N, n, Dh].

    Head-major: the attention reads them as [B, H, V, Dh], so decoding steps use
    the cache as it is (stored [B, N, n, H, Dh], every step transposed it whole).
    """
    b, n_img, n_tok, d = visual.shape
    flat = visual.reshape(b, n_img * n_tok, d)
    out = []
    for j in range(len(self.xattn_indices)):
      k, v = self.xattn_block(j, None, flat, None, None)  # [B, V, H, Dh]
      out.append(tuple(a.transpose(0, 2, 1, 3).reshape(b, a.shape[2], n_img, n_tok, a.shape[3])
                       for a in (k, v)))
    return tuple(out)

  def prefill(self, tokens, images=None, visual_features=None, attention_mask=None, *,
              cache_length: int, cache_cross_kv: bool = True, visual_latents=None,
              tile_mask=None, aspect_ratio_ids=None):
    """Runs the prompt and returns (logits [B, L, V] f32, DecodeCache).

    tokens [B, L] (left padded, attention_mask [B, L] 1 = real token), images
    [B, N, T, H, W, 3], visual_features [B, N, T, S, C] or visual_latents
    [B, N, n, D_r] as in `__call__`.
    cache_length: S >= L, slots for the prompt and every token to come.
    cache_cross_kv=False keeps the visual tokens instead of their keys/values,
    so `extend` recomputes them each step (the peers' way; benchmarks only).
    """
    c = self.config
    check_inputs(c, tokens, images, visual_features, None, attention_mask, None, visual_latents,
                 tile_mask)
    b, length = tokens.shape
    if cache_length < length:
      raise ValueError(f"cache_length {cache_length} is shorter than the prompt ({length} "
                       "tokens)")
    dtype = layers.dtype_of(c.dtype)
    visual = self.visual_tokens(b, images, visual_features, visual_latents, aspect_ratio_ids,
                                tile_mask)
    given = any(v is not None for v in (images, visual_features, visual_latents))
    visual_mask = (visual_token_mask(tile_mask, visual.shape[1], visual.shape[2])
                   if given else None)
    kv_heads = c.lm.num_kv_heads or c.lm.num_heads
    zeros = lambda: jnp.zeros((b, cache_length, kv_heads, c.lm.head_dim), dtype)  # noqa: E731
    if cache_cross_kv:
      # The barrier keeps them head-major in the cache: XLA would otherwise sink the
      # layout change into the decoding loop, and transpose them at every step.
      kv = jax.lax.optimization_barrier(self.cross_kv(visual))
      xk, xv, visual = tuple(k for k, _ in kv), tuple(v for _, v in kv), None
    else:
      xk, xv = (), ()
    cache = DecodeCache(
        keys=tuple(zeros() for _ in range(c.lm.num_layers)),
        values=tuple(zeros() for _ in range(c.lm.num_layers)),
        xattn_keys=xk, xattn_values=xv, visual=visual,
        key_mask=jnp.zeros((b, cache_length), bool), index=jnp.zeros((), jnp.int32),
        num_tokens=jnp.zeros((b,), jnp.int32), image_count=jnp.zeros((b,), jnp.int32),
        image_reset=jnp.zeros((b,), bool), image_group=jnp.zeros((b,), jnp.int32),
        image_run=jnp.zeros((b,), bool), visual_mask=visual_mask)
    return self.extend(tokens, cache, attention_mask)

  def extend(self, tokens, cache: DecodeCache, attention_mask=None):
    """Appends tokens [B, L] to the cache -> (logits [B, L, V] f32, new DecodeCache).

    attention_mask [B, L] marks real tokens (left padding of a prompt); the
    tokens' positions, image indices phi (previous-image mode) and the
    attention over earlier slots all continue from the cache.
    """
    c = self.config
    layers.check_rank("tokens", tokens, 2, "[B, L]")
    b, length = tokens.shape
    if cache.key_mask.shape[0] != b:
      raise ValueError(f"tokens has batch size {b} but the cache {cache.key_mask.shape[0]}")
    if length > cache.length:
      raise ValueError(f"{length} tokens do not fit a cache of {cache.length} slots")
    if attention_mask is not None and attention_mask.shape != tokens.shape:
      raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape "
                       f"{tuple(tokens.shape)}")
    real = (jnp.ones(tokens.shape, bool) if attention_mask is None
            else attention_mask.astype(bool))
    is_image = (tokens == c.image_token_id) & real
    phi = cache.image_count[:, None] + jnp.cumsum(is_image, axis=-1, dtype=jnp.int32)
    image_reset = cache.image_reset
    if c.image_reset_token_id >= 0:
      is_reset = (tokens == c.image_reset_token_id) & real
      cut, image_reset = masking.after_reset(is_image, is_reset, cache.image_reset)
      phi = jnp.where(cut, 0, phi)
    first, (image_group, image_run) = masking.group_first(
        tokens, c.image_token_id, phi, real, (cache.image_group, cache.image_run))
    counts = jnp.cumsum(real, axis=-1, dtype=jnp.int32)
    positions = jnp.maximum(cache.num_tokens[:, None] + counts - 1, 0)
    key_mask = jax.lax.dynamic_update_slice(cache.key_mask, real, (0, cache.index))
    mask = self_attention_mask(cache.index + jnp.arange(length), key_mask, positions,
                               default_positions(key_mask, b, cache.length),
                               c.lm.sliding_window)

    logits, keys, values = self.extend_layers(tokens, positions, mask, phi, cache, first)
    new = cache.replace(
        keys=keys, values=values, key_mask=key_mask,
        index=cache.index + length,
        num_tokens=cache.num_tokens + counts[:, -1],
        image_count=cache.image_count + jnp.sum(is_image, axis=-1, dtype=jnp.int32),
        image_reset=image_reset, image_group=image_group, image_run=image_run)
    return logits, new

  def extend_layers(self, tokens, positions, mask, phi, cache: DecodeCache, first=None):
    """The layers of `extend` under a given self-attention mask [B, 1, L, S] (also
    used by evaluate/decode.py's `masked_extend`) -> (logits [B, L, V], each LM
    layer's keys and values with the L new ones written at cache.index).
    first [B, L]: `masking.group_first` of the tokens (attend_previous "group");
    None: the cache's, right for tokens without `<image>` (generated text)."""
    c = self.config
    b = tokens.shape[0]
    if cache.xattn_keys:
      kv = list(zip(cache.xattn_keys, cache.xattn_values))
    else:
      kv = self.cross_kv(cache.visual)
    n_img, n_tok = kv[0][0].shape[2:4]
    if first is None and cache.image_group is not None:
      first = jnp.broadcast_to(cache.image_group[:, None], phi.shape)
    xmask = masking.visual_attention_mask(phi, n_img, n_tok, c.xattn.attend_previous, first,
                                          cache.visual_mask)
    has_image = phi > 0
    # [B, H, N, n, Dh] -> the attention's [B, V, H, Dh] (XLA folds this transpose into
    # the attention's own, so the cache is read in place)
    flat = lambda a: a.reshape(b, a.shape[1], n_img * n_tok, a.shape[4]).transpose(  # noqa: E731
        0, 2, 1, 3)

    x = self.embed_tokens(tokens, positions)
    xattn_at = {i: j for j, i in enumerate(self.xattn_indices)}
    keys, values = [], []
    for i in range(c.lm.num_layers):
      if i in xattn_at:
        k, v = kv[xattn_at[i]]
        x = self.xattn_block(xattn_at[i], x, (flat(k), flat(v)), xmask, has_image)
      x, (k, v) = self.lm.block(i, x, positions, mask,
                                (cache.keys[i], cache.values[i], cache.index))
      keys.append(k)
      values.append(v)
    return self.logits_from_hidden(x), tuple(keys), tuple(values)


def visual_token_mask(tile_mask, num_images: int, tokens_per_image: int):
  """tile_mask [B, N, T] bool (or None) -> [B, N * n] bool, each of an image's n
  visual tokens (T frames of n / T, frame-major) masked like its frame; None: None."""
  if tile_mask is None:
    return None
  b, n, t = tile_mask.shape
  if n != num_images or tokens_per_image % t:
    raise ValueError(f"tile_mask [B, N, T] = {tuple(tile_mask.shape)} does not fit {num_images} "
                     f"images of {tokens_per_image} visual tokens")
  return jnp.repeat(tile_mask.astype(bool), tokens_per_image // t, axis=2).reshape(b, -1)


def check_inputs(c: FlamingoConfig, tokens, images, visual_features, next_image,
                 attention_mask, image_count, visual_latents=None, tile_mask=None) -> None:
  """Shape checks always; value checks when the arrays are concrete (not traced)."""
  layers.check_rank("tokens", tokens, 2, "[B, L]")
  b = tokens.shape[0]
  given = {k: v for k, v in (("images", images), ("visual_features", visual_features),
                             ("visual_latents", visual_latents)) if v is not None}
  if len(given) > 1:
    raise ValueError(f"pass one of images, visual_features and visual_latents, not "
                     f"{' and '.join(given)}")
  name, visual = next(iter(given.items()), ("visual_features", None))
  if visual is not None and visual.shape[0] != b:
    raise ValueError(f"{name} has batch size {visual.shape[0]} but tokens has {b}")
  for arr_name, arr in [("next_image", next_image), ("image_count", image_count)]:
    if arr is not None and tuple(arr.shape) != (b,):
      raise ValueError(f"{arr_name} must have shape [B] = ({b},), got {tuple(arr.shape)}")
  if attention_mask is not None and attention_mask.shape != tokens.shape:
    raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape "
                     f"{tuple(tokens.shape)}")
  if tile_mask is not None:
    layers.check_rank("tile_mask", tile_mask, 3, "[B, N, T]")
    if c.resampler.kind != "linear":
      raise ValueError("tile_mask needs model.resampler.kind 'linear' (visual tokens per "
                       f"frame); the resampler is {c.resampler.kind!r}")
    if visual is not None and tuple(tile_mask.shape[:2]) != tuple(visual.shape[:2]):
      raise ValueError(f"tile_mask [B, N, T] = {tuple(tile_mask.shape)} but {name} has "
                       f"[B, N] = {tuple(visual.shape[:2])}")
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
  """The LM's params with the trained `<image>`/`<EOC>` rows written in, for
  `DecoderLM(merged_lm_config(config))`.

  With the gates at zero, Flamingo equals this LM; also what a text-only
  export of a trained model needs. A grown vocabulary (`lm.embedding_rows`)
  gets its rows appended.
  """
  lm = layer_stack.lm_to_unrolled(jax.tree.map(lambda a: a, params["lm"]))  # either layout
  if not config.train_new_token_embeddings:
    return lm
  ids = np.array([config.image_token_id, config.eoc_token_id])
  unbox = lambda v: getattr(v, "value", v)  # noqa: E731
  emb = unbox(lm["embedding"])
  grow = config.lm.vocab_size - emb.shape[0]
  emb = jnp.pad(emb, ((0, grow), (0, 0))).at[ids].set(unbox(params["new_token_embeddings"]))
  lm["embedding"] = emb
  if not config.lm.tie_embeddings:
    kernel = jnp.pad(unbox(lm["unembed"]["kernel"]), ((0, 0), (0, grow)))
    lm["unembed"] = dict(lm["unembed"],
                         kernel=kernel.at[:, ids].set(unbox(params["new_token_unembeddings"]).T))
  return lm


def merged_lm_config(config: FlamingoConfig):
  """The LMConfig of `merged_lm_params`: every id of the vocabulary has a row."""
  return dataclasses.replace(config.lm, embedding_rows=0)
