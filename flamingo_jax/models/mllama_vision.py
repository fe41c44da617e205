"""Llama 3.2 Vision's tiled ViT (transformers' MllamaVisionModel), registered as vision
encoder "mllama".

An image arrives as up to T = max_num_tiles tiles of image_size px in one of the
aspect-ratio layouts (aspect_ratio_id, 0 = a padded image); tiles past the layout's
count are padding (tile_mask False). Per image:

  tiles -> 14x14 patches (conv, no bias) -> + tanh(g_pre) * pre-tile embedding[ar]
  -> [CLS; patches] (P + 1 tokens per tile) -> + (1 - tanh g) * position table
  + tanh g * tile position table[ar] -> ln_pre -> pad each tile to a multiple of 8
  tokens -> `depth` layers over all tiles' tokens at once (the outputs of the
  `intermediate_layers` kept) -> ln_post -> + tanh(g_post) * post-tile embedding[ar]
  -> `global_depth` layers with tanh-gated attention and MLP -> drop the padding
  tokens -> concat(final, intermediate outputs interleaved per channel: channel d of
  layer j at d * n + j, transformers' stack(-1) + reshape) -> [T, P + 1, width * (1 + n)].

Attention in both stacks uses transformers' mask: a pair of tokens is masked only
when both are padding (a padded tile, or a token padded to a multiple of 8). Tile 0
always counts as real: MllamaImageProcessor's aspect_ratio_mask marks it so even for
a padded image slot.
"""
from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from flamingo_jax.models import layers
from flamingo_jax.models.config import MllamaVisionConfig
from flamingo_jax.models.vision_registry import register_vision_encoder


class MllamaVisionBlock(nn.Module):
  """Pre-LayerNorm block; gated: attention and MLP outputs scaled by tanh(gate)."""
  config: MllamaVisionConfig
  gated: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def gate(self, name: str):
    if not self.gated:
      return jnp.ones((), self.dtype)
    init = nn.initializers.constant(math.pi / 4)  # transformers' initial value
    return jnp.tanh(layers.param_with_axes(self, name, init, (1,), jnp.float32,
                                           (None,))).astype(self.dtype)

  @nn.compact
  def __call__(self, x, mask):
    """x [B, S, D], mask [B, 1, S, S] bool (True = attend) -> [B, S, D]."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = dict(num_heads=c.num_heads, head_dim=c.width // c.num_heads, **kw)
    h = layers.LayerNorm(name="ln_1", eps=c.layernorm_eps, **kw)(x)
    q = layers.HeadProjection(name="query", **proj)(h)
    k = layers.HeadProjection(name="key", **proj)(h)
    v = layers.HeadProjection(name="value", **proj)(h)
    out = layers.OutProjection(c.width, name="out", **kw)(
        layers.dot_product_attention(q, k, v, mask))
    x = x + self.gate("attn_gate") * out
    h = layers.LayerNorm(name="ln_2", eps=c.layernorm_eps, **kw)(x)
    h = layers.FeedForward(c.mlp_dim, c.activation, use_bias=True, name="mlp", **kw)(h)
    return x + self.gate("ffw_gate") * h


class MllamaVisionEncoder(nn.Module):
  """tiles [B, T, H, W, 3] (+ aspect_ratio_ids, tile_mask) -> [B, T, P + 1, C]."""
  config: MllamaVisionConfig
  image_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  # Flamingo hands a tiled encoder an image's tiles together (models/flamingo.py).
  tiled: ClassVar[bool] = True

  def _aspect_table(self, name: str, shape_per_id, ids, gated: bool = True):
    """A per-aspect-ratio table [R + 1, prod(shape)] looked up at ids [B] -> [B, *shape]."""
    c = self.config
    size = math.prod(shape_per_id)
    table = layers.param_with_axes(self, name, nn.initializers.normal(0.02),
                                   (len(c.aspect_ratios) + 1, size), self.param_dtype,
                                   (None, None))
    return jnp.take(table, ids, axis=0).reshape((ids.shape[0],) + shape_per_id).astype(
        self.dtype)

  def _gate(self, name: str):
    return jnp.tanh(layers.param_with_axes(self, name, nn.initializers.zeros, (1,),
                                           jnp.float32, (None,))).astype(self.dtype)

  @nn.compact
  def __call__(self, tiles, aspect_ratio_ids, tile_mask=None, train: bool = False):
    """tiles [B, T, H, W, 3], aspect_ratio_ids [B] int (0: a padded image), tile_mask
    [B, T] bool (None: all real) -> features [B, T, P + 1, width * (1 + n_intermediate)]."""
    del train
    c = self.config
    layers.check_rank("tiles", tiles, 5, "[B, T, H, W, 3]")
    b, t, h, w, _ = tiles.shape
    if t != c.max_num_tiles or (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"the mllama vision tower takes {c.max_num_tiles} tiles of "
                       f"{self.image_size}x{self.image_size} px per image "
                       f"(model.vision.mllama.max_num_tiles, model.vision.image_size), got "
                       f"{t} of {h}x{w}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = c.width
    x = layers.patchify(tiles.reshape(b * t, h, w, 3).astype(self.dtype), c.patch_size)
    patches = x.shape[1] * x.shape[2]
    x = layers.Dense(d, ("conv_in", "embed"), name="patch_embed", **kw)(
        x.reshape(b, t, patches, x.shape[-1]))
    x = x + self._gate("pre_tile_gate") * self._aspect_table(
        "pre_tile_embedding", (t, 1, d), aspect_ratio_ids)
    cls = layers.param_with_axes(self, "class_embedding", nn.initializers.normal(d ** -0.5),
                                 (d,), self.param_dtype, ("embed",))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, t, 1, d)), x], axis=2)
    n = patches + 1
    pos = layers.param_with_axes(self, "positional_embedding", nn.initializers.normal(d ** -0.5),
                                 (n, d), self.param_dtype, (None, "embed"))
    g = self._gate("positional_gate")
    x = x + (1 - g) * pos.astype(self.dtype) + g * self._aspect_table(
        "tile_positional_embedding", (t, n, d), aspect_ratio_ids)
    x = layers.LayerNorm(name="ln_pre", eps=1e-5, **kw)(x)

    padded = n + (-n % 8)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, padded - n), (0, 0))).reshape(b, t * padded, d)
    real_tile = jnp.ones((b, t), bool) if tile_mask is None else jnp.asarray(tile_mask, bool)
    real_tile = real_tile.at[:, 0].set(True)
    real = (real_tile[:, :, None] & (jnp.arange(padded) < n)[None, None]).reshape(b, -1)
    mask = (real[:, :, None] | real[:, None, :])[:, None]  # masked: both padding

    outputs = {}
    for i in range(c.depth):
      x = MllamaVisionBlock(c, name=f"blocks_{i}", **kw)(x, mask)
      if i in c.intermediate_layers:
        outputs[i] = x
    x = layers.LayerNorm(name="ln_post", eps=1e-5, **kw)(x).reshape(b, t, padded, d)
    x = x + self._gate("post_tile_gate") * self._aspect_table(
        "post_tile_embedding", (t, 1, d), aspect_ratio_ids)
    x = x.reshape(b, t * padded, d)
    for i in range(c.global_depth):
      x = MllamaVisionBlock(c, gated=True, name=f"global_blocks_{i}", **kw)(x, mask)
    out = x.reshape(b, t, padded, d)
    if c.intermediate_layers:  # [B, S, D, n] -> channel d of the j-th at D + d * n + j
      inter = jnp.stack([outputs[i] for i in c.intermediate_layers], axis=-1)
      out = jnp.concatenate([out, inter.reshape(b, t, padded, -1)], axis=-1)
    return out[:, :, :n]


def feature_dim(vision_config) -> int:
  mv = vision_config.mllama
  return mv.width * (1 + len(mv.intermediate_layers))


@register_vision_encoder("mllama", feature_dim=feature_dim)
def make_mllama_vision(vision_config, dtype=jnp.float32, param_dtype=jnp.float32):
  return MllamaVisionEncoder(vision_config.mllama, vision_config.image_size, dtype=dtype,
                             param_dtype=param_dtype)

