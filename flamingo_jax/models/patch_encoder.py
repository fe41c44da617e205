"""A small patchify vision encoder for tiny configs and tests.

images [B, H, W, 3] -> conv with stride = patch size -> `depth` residual MLP
layers -> LayerNorm -> feature grid [B, H/p, W/p, width]. It is a real,
trainable encoder (the demo pretrains it contrastively when NFNet is too slow
for a CPU), not a stand-in for NFNet's numbers.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flamingo_jax.config import PatchEncoderConfig
from flamingo_jax.models import layers
from flamingo_jax.models.vision import register_vision_encoder


class PatchEncoder(nn.Module):
  config: PatchEncoderConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images [B, H, W, 3] -> [B, H/p, W/p, width]."""
    del train
    c = self.config
    layers.check_rank("images", images, 4, "[B, H, W, 3]")
    b, h, w, ch = images.shape
    p = c.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, ch)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p * ch)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.Dense(c.width, ("conv_in", "conv_out"), use_bias=True, name="patch_embed",
                     **kw)(x)
    for i in range(c.depth):
      y = layers.LayerNorm(axis_name="conv_out", name=f"block_{i}_norm", **kw)(x)
      y = layers.Dense(4 * c.width, ("conv_in", "conv_out"), use_bias=True,
                       name=f"block_{i}_up", **kw)(y)
      y = layers.Dense(c.width, ("conv_in", "conv_out"), use_bias=True,
                       name=f"block_{i}_down", **kw)(layers.activation("gelu")(y))
      x = x + y
    return layers.LayerNorm(axis_name="conv_out", name="final_norm", **kw)(x)


@register_vision_encoder("patch", feature_dim=lambda vision_config: vision_config.patch.width)
def make_patch_encoder(vision_config, dtype=jnp.float32, param_dtype=jnp.float32):
  return PatchEncoder(vision_config.patch, dtype=dtype, param_dtype=param_dtype)
