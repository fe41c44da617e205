"""A small patchify vision encoder for tiny configs and tests.

images [B, H, W, 3] -> conv with stride = patch size -> `depth` residual MLP
layers -> LayerNorm -> feature grid [B, H/p, W/p, width]. It is a real,
trainable encoder (the demo pretrains it contrastively when NFNet is too slow
for a CPU), not a stand-in for NFNet's numbers.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flamingo_jax.models.config import PatchEncoderConfig
from flamingo_jax.models import layers
from flamingo_jax.models.vision_registry import register_vision_encoder


class PatchEncoder(nn.Module):
  config: PatchEncoderConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images [B, H, W, 3] -> [B, H/p, W/p, width]."""
    del train
    c = self.config
    x = layers.patchify(images.astype(self.dtype), c.patch_size)
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
