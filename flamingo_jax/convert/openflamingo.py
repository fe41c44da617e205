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


# --------------------------------------------------------------------------
# A whole OpenFlamingo model: delta checkpoint.pt + base HF LM + OpenCLIP vision

_EMBED_KEYS = ("lang_encoder.model.embed_tokens.weight",  # Llama
               "lang_encoder.transformer.wte.weight",  # MPT
               "lang_encoder.gpt_neox.embed_in.weight")  # GPT-NeoX
OPENFLAMINGO_HEADS, OPENFLAMINGO_HEAD_DIM = 8, 64  # fixed in OpenFlamingo's factory


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch checkpoint loaded with weights_only=True (never unpickles objects)."""
  import torch  # only needed for .pt files
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "model_state_dict" in obj:
    obj = obj["model_state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
  return {k.removeprefix("module."): v.float().numpy() for k, v in obj.items()
          if hasattr(v, "numpy")}


def _vit_config_from_weights(vision: Mapping[str, np.ndarray], activation: str,
                             num_heads: int | None):
  """Shapes from the weights; heads default to open_clip's width // 64 (not in the weights)."""
  from flamingo_jax.config import ViTConfig
  conv = np.asarray(vision["visual.conv1.weight"])
  width, patch = conv.shape[0], conv.shape[-1]
  depth = len({k.split(".")[3] for k in vision if k.startswith("visual.transformer.resblocks.")})
  grid = int(round((vision["visual.positional_embedding"].shape[0] - 1) ** 0.5))
  hidden = vision["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
  return ViTConfig(patch_size=patch, width=width, depth=depth,
                   num_heads=num_heads or max(width // 64, 1),
                   mlp_ratio=hidden / width, activation=activation), grid * patch


def convert_openflamingo(checkpoint: Mapping[str, np.ndarray], lm_dir: str,
                         vision: Mapping[str, np.ndarray], *, cross_attn_every_n_layers: int,
                         media_token_id: int, eoc_token_id: int,
                         vision_activation: str = "quick_gelu",
                         vision_heads: int | None = None):
  """(FlamingoConfig, params) of an OpenFlamingo model.

  checkpoint: the released delta (resampler, gated cross-attention, input
  embeddings); lm_dir: the base HF LM directory; vision: the OpenCLIP model's
  state dict ("visual.*"). OpenFlamingo's conventions are carried into the
  config: cross-attention before LM block i where (i + 1) % N == 0, 8 x 64
  heads, GELU, no K/V LayerNorm, zeroed attention for text before any image,
  the `<image>` token seeing its own image.
  """
  import dataclasses
  import json
  import os

  from flamingo_jax.config import FlamingoConfig, ResamplerConfig, VisionConfig, XAttnConfig
  from flamingo_jax.convert import hf_lm
  from flamingo_jax.convert.openclip import convert_vit

  with open(os.path.join(lm_dir, "config.json")) as f:
    lm_config = hf_lm.lm_config_from_hf(json.load(f))
  lm_params = hf_lm.convert_state_dict(hf_lm.load_safetensors_dir(lm_dir), lm_config)
  embed_key = next((k for k in _EMBED_KEYS if k in checkpoint), None)
  if embed_key is None:
    raise ValueError(f"the OpenFlamingo checkpoint has no input embeddings (looked for "
                     f"{list(_EMBED_KEYS)})")
  embedding = np.asarray(checkpoint[embed_key], np.float32)
  vocab = embedding.shape[0]
  for name, tid in (("media_token_id", media_token_id), ("eoc_token_id", eoc_token_id)):
    if not 0 <= tid < vocab:
      raise ValueError(f"{name}={tid} is outside the checkpoint's vocabulary of {vocab}")
  lm_config = dataclasses.replace(lm_config, vocab_size=vocab)
  lm_params["embedding"] = embedding  # OpenFlamingo trains the whole input matrix
  ids = np.array([media_token_id, eoc_token_id])
  params: dict = {"lm": lm_params, "new_token_embeddings": embedding[ids]}
  if not lm_config.tie_embeddings:
    base = lm_params["unembed"]["kernel"]  # [D, V_base]
    head = checkpoint.get("lang_encoder.lm_head.weight")
    if head is None:
      # OpenFlamingo never saves the resized output rows (they are frozen at
      # their random initialisation): use the mean output row, as
      # transformers' mean resizing starts from.
      extra = np.repeat(base.mean(axis=1, keepdims=True), vocab - base.shape[1], axis=1)
      kernel = np.concatenate([base, extra], axis=1)
    else:
      kernel = np.asarray(head, np.float32).T
    lm_params["unembed"] = {"kernel": kernel}
    params["new_token_unembeddings"] = kernel[:, ids].T

  vit_config, image_size = _vit_config_from_weights(vision, vision_activation, vision_heads)
  latents = checkpoint.get("perceiver.latents")
  if latents is None:
    raise ValueError("missing tensor 'perceiver.latents' in the OpenFlamingo checkpoint")
  depth = len({k.split(".")[2] for k in checkpoint if k.startswith("perceiver.layers.")})
  resampler = ResamplerConfig(depth=depth, width=latents.shape[1], num_heads=OPENFLAMINGO_HEADS,
                              head_dim=OPENFLAMINGO_HEAD_DIM, num_latents=latents.shape[0],
                              activation="gelu", input_proj=False, temporal_embeddings=False)
  params["resampler"] = convert_resampler(
      {k: v for k, v in checkpoint.items() if k.startswith("perceiver.")}, resampler,
      prefix="perceiver.")
  xattn = XAttnConfig(every=cross_attn_every_n_layers, placement="openflamingo",
                      num_heads=OPENFLAMINGO_HEADS, head_dim=OPENFLAMINGO_HEAD_DIM, activation="gelu",
                      kv_layernorm=False, no_image="zero_attention")
  for i in range(lm_config.num_layers):
    prefix = f"lang_encoder.gated_cross_attn_layers.{i}."
    present = any(k.startswith(prefix) for k in checkpoint)
    expected = (i + 1) % cross_attn_every_n_layers == 0
    if present != expected:
      raise ValueError(f"cross-attention layer {i} is {'present' if present else 'missing'} in "
                       f"the checkpoint, but cross_attn_every_n_layers="
                       f"{cross_attn_every_n_layers} says it should "
                       f"{'' if expected else 'not '}exist")
    if expected:
      params[f"xattn_block_{i}"] = convert_gated_xattn(
          {k: v for k, v in checkpoint.items() if k.startswith(prefix)}, xattn,
          width=lm_config.width, visual_width=resampler.width, prefix=prefix)
  params["vision"] = convert_vit(vision, vit_config, image_size)
  config = FlamingoConfig(
      vision=VisionConfig(name="vit", image_size=image_size, vit=vit_config),
      vision_feature_dim=vit_config.width, resampler=resampler, xattn=xattn, lm=lm_config,
      image_token_id=media_token_id, eoc_token_id=eoc_token_id)
  return config, params


# --------------------------------------------------------------------------
# CLI: python -m flamingo_jax.convert openflamingo ...


def add_arguments(parser) -> None:
  parser.add_argument("--checkpoint", required=True, help="OpenFlamingo checkpoint.pt")
  parser.add_argument("--lm", required=True, help="base HF LM directory (safetensors)")
  parser.add_argument("--vision", required=True,
                      help="OpenCLIP weights (.safetensors, or a torch file loaded with "
                      "weights_only=True)")
  parser.add_argument("--cross_attn_every_n_layers", type=int, required=True)
  parser.add_argument("--media_token_id", type=int, required=True, help="id of <image>")
  parser.add_argument("--eoc_token_id", type=int, required=True, help="id of <|endofchunk|>")
  parser.add_argument("--vision_activation", default="quick_gelu",
                      help="quick_gelu for OpenAI-pretrained CLIP, gelu for open_clip's own")
  parser.add_argument("--out", required=True)


def main(args) -> int:
  from flamingo_jax.config import to_config_dict
  from flamingo_jax.convert.hf_lm import write_converted
  checkpoint = load_torch_state_dict(args.checkpoint)
  if args.vision.endswith(".safetensors"):
    from safetensors.numpy import load_file
    vision = load_file(args.vision)
  else:
    vision = load_torch_state_dict(args.vision)
  config, params = convert_openflamingo(
      checkpoint, args.lm, vision, cross_attn_every_n_layers=args.cross_attn_every_n_layers,
      media_token_id=args.media_token_id, eoc_token_id=args.eoc_token_id,
      vision_activation=args.vision_activation)
  write_converted(args.out, params, to_config_dict(config).to_dict())
  print(f"wrote the OpenFlamingo model to {args.out}/params and its model config to "
        f"{args.out}/model_config.json (load it with configs/from_checkpoint.py:{args.out})")
  return 0
