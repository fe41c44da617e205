"""CLIP vision transformer (OpenCLIP / OpenAI layout), registered as vision encoder "vit".

images [B, H, W, 3] -> patchify (conv, no bias) -> [CLS; patches] + positions -> ln_pre
-> depth x pre-LN blocks (MHA with biases, MLP 4x) -> ln_post -> patch tokens as a
feature grid [B, H/p, W/p, width]. This is what OpenFlamingo feeds its resampler
(ViT-L/14 at 224 px: 16 x 16 x 1024); the CLIP projection is not used.

IDEFICS feeds its resampler the last block's output instead: the class token
kept and no ln_post (`include_class_token`, `post_layernorm=False`), returned as
one row of tokens [B, 1, 1 + P, width].
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flamingo_jax.models.config import ViTConfig
from flamingo_jax.models import layers
from flamingo_jax.models.vision_registry import register_vision_encoder


class ViTBlock(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x [B, 1 + P, D] -> [B, 1 + P, D]."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = dict(num_heads=c.num_heads, head_dim=c.width // c.num_heads, use_bias=True, **kw)
    h = layers.LayerNorm(name="ln_1", eps=c.layernorm_eps, **kw)(x)
    q = layers.HeadProjection(name="query", **proj)(h)
    k = layers.HeadProjection(name="key", **proj)(h)
    v = layers.HeadProjection(name="value", **proj)(h)
    x = x + layers.OutProjection(c.width, use_bias=True, name="out", **kw)(
        layers.dot_product_attention(q, k, v))
    h = layers.LayerNorm(name="ln_2", eps=c.layernorm_eps, **kw)(x)
    return x + layers.FeedForward(int(c.width * c.mlp_ratio), c.activation, use_bias=True,
                                  name="mlp", **kw)(h)


class VisionTransformer(nn.Module):
  config: ViTConfig
  image_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images [B, H, W, 3] -> patch features [B, H/p, W/p, width].

    With config.include_class_token: [B, 1, 1 + P, width], the class token first.
    """
    del train
    c = self.config
    layers.check_rank("images", images, 4, "[B, H, W, 3]")
    b, h, w, _ = images.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"the ViT was built for {self.image_size}x{self.image_size} images "
                       f"(model.vision.image_size), got {h}x{w}")
    x = layers.patchify(images.astype(self.dtype), c.patch_size)
    gh, gw = x.shape[1], x.shape[2]
    x = x.reshape(b, gh * gw, x.shape[-1])
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.Dense(c.width, ("conv_in", "embed"), name="patch_embed", **kw)(x)
    cls = layers.param_with_axes(self, "class_embedding", nn.initializers.normal(c.width ** -0.5),
                                 (c.width,), self.param_dtype, ("embed",))
    pos = layers.param_with_axes(self, "positional_embedding",
                                 nn.initializers.normal(c.width ** -0.5),
                                 (1 + gh * gw, c.width), self.param_dtype, (None, "embed"))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.width)), x], axis=1)
    x = x + pos.astype(self.dtype)[None]
    x = layers.LayerNorm(name="ln_pre", eps=c.layernorm_eps, **kw)(x)
    for i in range(c.depth):
      x = ViTBlock(c, name=f"blocks_{i}", **kw)(x)
    if c.post_layernorm:
      x = layers.LayerNorm(name="ln_post", eps=c.layernorm_eps, **kw)(x)
    if c.include_class_token:
      return x.reshape(b, 1, 1 + gh * gw, c.width)
    return x[:, 1:].reshape(b, gh, gw, c.width)


@register_vision_encoder("vit", feature_dim=lambda vision_config: vision_config.vit.width)
def make_vit(vision_config, dtype=jnp.float32, param_dtype=jnp.float32):
  return VisionTransformer(vision_config.vit, vision_config.image_size, dtype=dtype,
                           param_dtype=param_dtype)
