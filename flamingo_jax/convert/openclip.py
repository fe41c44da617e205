"""OpenCLIP / OpenAI CLIP vision tower state dict -> our `vit` encoder params.

Keys (optionally under a "visual." prefix, as in a full CLIP model):
conv1.weight [D, 3, p, p], class_embedding [D], positional_embedding [1+P, D],
ln_pre, transformer.resblocks.{i}.{ln_1, attn.in_proj_weight [3D, D],
attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj
(the CLIP projection, unused: OpenFlamingo feeds the patch tokens).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from flamingo_jax.models.config import ViTConfig
from flamingo_jax.convert.weights_io import StateDict


def _ln(sd: StateDict, name: str, d: int) -> dict:
  return {"scale": sd.get(f"{name}.weight", (d,)), "bias": sd.get(f"{name}.bias", (d,))}


def convert_vit(tensors: Mapping[str, np.ndarray], config: ViTConfig, image_size: int,
                prefix: str = "", source: str = "") -> dict:
  """Returns the params of `models.vit.VisionTransformer`; source (the file) is named
  in errors."""
  if not prefix and any(k.startswith("visual.") for k in tensors):
    prefix = "visual."
  sd = StateDict({k: v for k, v in tensors.items() if k.startswith(prefix)}, prefix, source)
  d, p, h = config.width, config.patch_size, config.num_heads
  dh, hidden = d // h, int(d * config.mlp_ratio)
  grid = (image_size // p) ** 2
  conv = sd.get("conv1.weight", (d, 3, p, p))
  params = {
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(p * p * 3, d)},
      "class_embedding": sd.get("class_embedding", (d,)),
      "positional_embedding": sd.get("positional_embedding", (1 + grid, d)),
      "ln_pre": _ln(sd, "ln_pre", d),
      "ln_post": _ln(sd, "ln_post", d),
  }
  if sd.has("proj"):
    sd.get("proj")  # the CLIP projection: not part of the feature extractor
  for i in range(config.depth):
    pre = f"transformer.resblocks.{i}."
    w = sd.get(pre + "attn.in_proj_weight", (3 * d, d))
    b = sd.get(pre + "attn.in_proj_bias", (3 * d,))
    block = {"ln_1": _ln(sd, pre + "ln_1", d), "ln_2": _ln(sd, pre + "ln_2", d)}
    for j, name in enumerate(("query", "key", "value")):
      block[name] = {"kernel": w[j * d:(j + 1) * d].T.reshape(d, h, dh),
                     "bias": b[j * d:(j + 1) * d].reshape(h, dh)}
    block["out"] = {"kernel": sd.get(pre + "attn.out_proj.weight", (d, d)).T.reshape(h, dh, d),
                    "bias": sd.get(pre + "attn.out_proj.bias", (d,))}
    block["mlp"] = {"up": {"kernel": sd.get(pre + "mlp.c_fc.weight", (hidden, d)).T,
                           "bias": sd.get(pre + "mlp.c_fc.bias", (hidden,))},
                    "down": {"kernel": sd.get(pre + "mlp.c_proj.weight", (d, hidden)).T,
                             "bias": sd.get(pre + "mlp.c_proj.bias", (d,))}}
    params[f"blocks_{i}"] = block
  sd.check_all_used("OpenCLIP vision tower")
  return params
