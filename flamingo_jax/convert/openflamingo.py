"""Weights of OpenFlamingo / flamingo-pytorch modules -> our params.

Both peers name their Perceiver Resampler and gated cross-attention weights
the same way (OpenFlamingo started from flamingo-pytorch):

  resampler:  latents [n, d]; frame_embs [F, d]; media_time_embs [M, 1, d]
              (flamingo-pytorch: media_pos_emb [M, 1, d]); norm.{weight,bias};
              layers.{i}.0.{norm_media,norm_latents}.{weight,bias},
              layers.{i}.0.{to_q,to_kv,to_out}.weight;
              layers.{i}.1.{0: LayerNorm, 1: Linear up, 3: Linear down}
  xattn block: attn.norm, attn.{to_q,to_kv,to_out}.weight, attn_gate [1],
               ff.{0,1,3}, ff_gate [1]

torch Linear weights are [out, in]; ours are [in, out] (heads split out for
attention). Arrays come in as numpy; torch is never imported here.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


class StateDict:
  """A name -> array mapping that reports missing, unused and misshapen tensors."""

  def __init__(self, tensors: Mapping[str, np.ndarray], prefix: str = ""):
    self.tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    self.prefix = prefix
    self.used: set[str] = set()

  def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    key = self.prefix + name
    if key not in self.tensors:
      raise ValueError(f"missing tensor {key!r} in the source checkpoint"
                       + (f" (expected shape {shape})" if shape else ""))
    value = self.tensors[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ValueError(f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    self.used.add(key)
    return value

  def has(self, name: str) -> bool:
    return self.prefix + name in self.tensors

  def check_all_used(self, what: str) -> None:
    unused = sorted(k for k in self.tensors if k.startswith(self.prefix) and k not in self.used)
    if unused:
      raise ValueError(f"{len(unused)} tensors of the {what} were not converted: {unused[:8]}")


def _layernorm(sd: StateDict, name: str, d: int) -> dict:
  return {"scale": sd.get(f"{name}.weight", (d,)), "bias": sd.get(f"{name}.bias", (d,))}


def _heads_in(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
  """torch [H*Dh, D_in] -> ours [D_in, H, Dh]."""
  return w.T.reshape(w.shape[1], heads, head_dim)


def _heads_out(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
  """torch [D, H*Dh] -> ours [H, Dh, D]."""
  return w.T.reshape(heads, head_dim, w.shape[0])


def _attention(sd: StateDict, name: str, d_q: int, d_kv: int, heads: int, head_dim: int):
  inner = heads * head_dim
  kv = sd.get(f"{name}.to_kv.weight", (2 * inner, d_kv))
  return {
      "query": {"kernel": _heads_in(sd.get(f"{name}.to_q.weight", (inner, d_q)), heads,
                                    head_dim)},
      "key": {"kernel": _heads_in(kv[:inner], heads, head_dim)},
      "value": {"kernel": _heads_in(kv[inner:], heads, head_dim)},
      "out": {"kernel": _heads_out(sd.get(f"{name}.to_out.weight", (d_q, inner)), heads,
                                   head_dim)},
  }


def _ffw(sd: StateDict, name: str, d: int, hidden: int) -> tuple[dict, dict]:
  norm = _layernorm(sd, f"{name}.0", d)
  ffw = {"up": {"kernel": sd.get(f"{name}.1.weight", (hidden, d)).T},
         "down": {"kernel": sd.get(f"{name}.3.weight", (d, hidden)).T}}
  return norm, ffw


def convert_resampler(tensors: Mapping[str, np.ndarray], config, prefix: str = "") -> dict:
  """A peer PerceiverResampler state dict -> our `resampler` params.

  `config` is our ResamplerConfig configured like the peer (input_proj=False,
  gelu, ffw_mult, num_media_embeddings, temporal_embeddings/max_frames).
  """
  sd = StateDict(tensors, prefix)
  d, h, dh = config.width, config.num_heads, config.head_dim
  params: dict = {"latents": sd.get("latents", (config.num_latents, d)),
                  "norm": _layernorm(sd, "norm", d)}
  if config.temporal_embeddings:
    params["temporal_embeddings"] = sd.get("frame_embs", (config.max_frames, d))[:, None, :]
  if config.num_media_embeddings:
    name = "media_time_embs" if sd.has("media_time_embs") else "media_pos_emb"
    params["media_embeddings"] = sd.get(name, (config.num_media_embeddings, 1, d))
  for i in range(config.depth):
    attn = _attention(sd, f"layers.{i}.0", d, d, h, dh)
    attn["norm_media"] = _layernorm(sd, f"layers.{i}.0.norm_media", d)
    attn["norm_latents"] = _layernorm(sd, f"layers.{i}.0.norm_latents", d)
    norm, ffw = _ffw(sd, f"layers.{i}.1", d, config.ffw_mult * d)
    params[f"layers_{i}_attn"] = attn
    params[f"layers_{i}_ffw"] = {"norm": norm, "ffw": ffw}
  sd.check_all_used("resampler")
  return params


def convert_gated_xattn(tensors: Mapping[str, np.ndarray], config, width: int,
                        visual_width: int, prefix: str = "") -> dict:
  """A peer GatedCrossAttentionBlock state dict -> our block params.

  `config` is our XAttnConfig configured like the peer (kv_layernorm=False,
  gelu, scalar gates); width is the LM width, visual_width the resampler's.
  """
  sd = StateDict(tensors, prefix)
  attn = _attention(sd, "attn", width, visual_width, config.num_heads, config.head_dim)
  attn["norm_query"] = _layernorm(sd, "attn.norm", width)
  norm, ffw = _ffw(sd, "ff", width, config.ffw_mult * width)
  params = {"attn": attn, "attn_gate": sd.get("attn_gate", (1,)),
            "norm_ffw": norm, "ffw": ffw, "ffw_gate": sd.get("ff_gate", (1,))}
  sd.check_all_used("gated cross-attention block")
  return params
