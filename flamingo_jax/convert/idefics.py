"""IDEFICS (transformers' IdeficsForVisionText2Text, local files) -> our Flamingo model.

IDEFICS re-implements Flamingo with its own conventions; each becomes a config
option, so the converted model computes IDEFICS's logits:

  vision     IdeficsVisionTransformer (a CLIP ViT). The resampler reads its
             last_hidden_state: the class token kept, no post_layernorm (that
             only normalises the unused pooled token): vision.vit
             include_class_token=True, post_layernorm=False.
  resampler  latents as wide as the vision tower (no input projection, no
             temporal embeddings), queries and keys LayerNormed per head with
             qk_layer_norms_perceiver (resampler.qk_layernorm), ReLU MLP 4x,
             no biases.
  xattn      IdeficsGatedCrossAttentionLayer before LM layer i when
             i % cross_layer_interval == 0 (placement "paper"): RMSNorm
             (xattn.norm), no K/V norm, per-head RMSNorm of queries and keys
             with qk_layer_norms (xattn.qk_norm), the LM's heads and SwiGLU MLP
             (xattn.ffw_dim = intermediate_size), tanh(alpha) gates with
             alpha_type float/vector (gate_shape scalar/vector), the output
             zeroed for text with no image (no_image "zero_output",
             cross_attention_gate).
  masking    a token sees the last image at or before it (an `<image>` token
             its own) and none after `</s>` until the next `<image>`
             (image_reset_token_id = eos_token_id): the image_attention_mask
             IDEFICS's processor builds.
  LM         Llama. The decoupled rows (embed_tokens.additional_embedding,
             lm_head.additional_fc) are appended to the vocabulary, ids
             vocab_size.. in order: `<fake_token_around_image>`, `<image>`.

IDEFICS has no end-of-chunk token; `<fake_token_around_image>`, which it reads
right before every image, plays our `<EOC>`. token_ids="flamingo" swaps the two
rows so `<image>` = vocab_size and `<EOC>` = vocab_size + 1, the ids
flamingo_jax's Tokenizer appends to IDEFICS's (Llama's) tokenizer.model.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from flamingo_jax.config import to_config_dict
from flamingo_jax.convert import hf_lm
from flamingo_jax.convert.weights_io import StateDict
from flamingo_jax.models.config import (FlamingoConfig, ResamplerConfig, ViTConfig, VisionConfig,
                                        XAttnConfig, lm_preset, validate, xattn_layer_indices)

TOKEN_IDS = ("idefics", "flamingo")
# transformers' ACT2FN names -> ours (the vision tower's MLP).
_VISION_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
                       "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ALPHA_INIT = {"zeros": "zeros", "ones": "ones", "normal": "normal", "gaussian": "normal",
               "random": "normal"}


def _field(hf: Mapping, key: str, default: Any) -> Any:
  """hf[key], or IdeficsConfig's default when absent or null (older config.json files)."""
  value = hf.get(key)
  return default if value is None else value


def _square(value, key: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"IDEFICS {key} {value!r}: only square sizes are supported")
    value = value[0]
  return int(value)


def _token_ids(hf: Mapping, token_ids: str, image_token_id: Optional[int],
               eoc_token_id: Optional[int]) -> tuple[int, int, np.ndarray]:
  """(our <image> id, our <EOC> id, vocabulary order: our row r is IDEFICS's row order[r])."""
  if token_ids not in TOKEN_IDS:
    raise ValueError(f"token_ids must be one of {list(TOKEN_IDS)}, got {token_ids!r}")
  base = int(_field(hf, "vocab_size", 32000))
  total = base + int(_field(hf, "additional_vocab_size", 0))
  image = base + 1 if image_token_id is None else image_token_id
  eoc = base if eoc_token_id is None else eoc_token_id
  for name, tid in (("image_token_id", image), ("eoc_token_id", eoc)):
    if not 0 <= tid < total:
      raise ValueError(f"{name}={tid} is outside IDEFICS's vocabulary of {total} (vocab_size "
                       f"{base} + additional_vocab_size {total - base}); IDEFICS's tokenizer "
                       "puts <fake_token_around_image> and <image> at vocab_size, "
                       "vocab_size + 1")
  if image == eoc:
    raise ValueError(f"image_token_id and eoc_token_id are both {image}")
  order = np.arange(total)
  if token_ids == "idefics":
    return image, eoc, order
  if total < base + 2:
    raise ValueError(f"token_ids='flamingo' puts <image> and <EOC> at {base} and {base + 1}, "
                     f"but the vocabulary has only {total} ids")
  for new, old in ((base, image), (base + 1, eoc)):
    j = int(np.flatnonzero(order == old)[0])
    order[[new, j]] = order[[j, new]]
  return base, base + 1, order


def flamingo_config(hf: Mapping, *, token_ids: str = "idefics",
                    image_token_id: Optional[int] = None,
                    eoc_token_id: Optional[int] = None) -> FlamingoConfig:
  """Our FlamingoConfig of an IDEFICS config.json dict (IdeficsConfig.to_dict())."""
  if hf.get("model_type", "idefics") != "idefics":
    raise ValueError(f"model_type is {hf.get('model_type')!r}, expected 'idefics'")
  if not _field(hf, "use_resampler", False):
    raise ValueError("use_resampler=False (cross-attention straight to the vision tokens) is "
                     "not supported; the released IDEFICS models use the resampler")
  act = _field(hf, "hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"IDEFICS hidden_act {act!r} is not supported (the LM and gated "
                     "cross-attention MLPs are SwiGLU: hidden_act 'silu')")
  rope = dict(_field(hf, "rope_parameters", {}))
  if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
    raise ValueError(f"rope {rope or hf.get('rope_scaling')!r} is not supported (default "
                     "rotary only)")
  d, heads = int(_field(hf, "hidden_size", 4096)), int(_field(hf, "num_attention_heads", 32))
  layers_ = int(_field(hf, "num_hidden_layers", 32))
  every = int(_field(hf, "cross_layer_interval", 1))
  if every < 1 or layers_ % every:
    raise ValueError(f"num_hidden_layers {layers_} is not a multiple of cross_layer_interval "
                     f"{every}: IDEFICS's forward would index a cross-attention layer it does "
                     "not have")
  alpha_type = _field(hf, "alpha_type", "float")
  if alpha_type not in ("float", "vector"):
    raise ValueError(f"IDEFICS alpha_type {alpha_type!r}: expected 'float' or 'vector'")
  alpha_init = _field(hf, "alpha_initializer", "zeros")
  if alpha_init not in _ALPHA_INIT:
    raise ValueError(f"IDEFICS alpha_initializer {alpha_init!r}: expected one of "
                     f"{sorted(_ALPHA_INIT)}")
  rms_eps = float(_field(hf, "rms_norm_eps", 1e-6))

  v = dict(_field(hf, "vision_config", {}))
  vd = int(v.get("embed_dim", v.get("hidden_size", 768)))
  vact = v.get("hidden_act", "gelu")
  if vact not in _VISION_ACTIVATIONS:
    raise ValueError(f"IDEFICS vision_config.hidden_act {vact!r}: expected one of "
                     f"{sorted(_VISION_ACTIVATIONS)}")
  inter = int(v.get("intermediate_size", 5120))
  vit = ViTConfig(patch_size=_square(v.get("patch_size", 14), "vision_config.patch_size"),
                  width=vd, depth=int(v.get("num_hidden_layers", 32)),
                  num_heads=int(v.get("num_attention_heads", 16)), mlp_ratio=inter / vd,
                  activation=_VISION_ACTIVATIONS[vact],
                  layernorm_eps=float(v.get("layer_norm_eps", 1e-5)),
                  include_class_token=True, post_layernorm=False)
  if int(vit.width * vit.mlp_ratio) != inter or vd % vit.num_heads:
    raise ValueError(f"IDEFICS vision_config: intermediate_size {inter} / embed_dim {vd} / "
                     f"num_attention_heads {vit.num_heads} do not fit our ViT")
  image_size = _square(v.get("image_size", 224), "vision_config.image_size")

  p = dict(_field(hf, "perceiver_config", {}))
  resampler = ResamplerConfig(
      kind="perceiver", depth=int(p.get("resampler_depth", 6)), width=vd,
      num_heads=int(p.get("resampler_n_heads", 16)),
      head_dim=int(p.get("resampler_head_dim", 96)),
      num_latents=int(p.get("resampler_n_latents", 64)), ffw_mult=4, activation="relu",
      input_proj=False, temporal_embeddings=False, num_media_embeddings=0, use_bias=False,
      layernorm_eps=1e-5, qk_layernorm=bool(p.get("qk_layer_norms_perceiver", False)))
  xattn = XAttnConfig(
      kind="gated_dense", every=every, placement="paper", num_heads=heads,
      head_dim=d // heads, ffw_dim=int(_field(hf, "intermediate_size", 11008)),
      activation="swiglu", gating="tanh",
      gate_shape="vector" if alpha_type == "vector" else "scalar", attend_previous="last",
      no_image="zero_output", query_layernorm=True, kv_layernorm=False, ffw_layernorm=True,
      norm="rmsnorm", qk_norm=bool(_field(hf, "qk_layer_norms", False)), use_bias=False,
      layernorm_eps=rms_eps, gate_init=_ALPHA_INIT[alpha_init],
      gate_init_std=float(_field(hf, "alphas_initializer_range", 0.0)))
  image, eoc, order = _token_ids(hf, token_ids, image_token_id, eoc_token_id)
  lm = lm_preset("llama", vocab_size=len(order), num_layers=layers_, width=d, num_heads=heads,
                 head_dim=d // heads, ffw_dim=xattn.ffw_dim, norm_eps=rms_eps,
                 rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                 tie_embeddings=bool(_field(hf, "tie_word_embeddings", False)),
                 max_length=int(_field(hf, "max_position_embeddings", 2048)))
  eos = _field(hf, "eos_token_id", 2)
  eos = eos[0] if isinstance(eos, (list, tuple)) else eos
  reset = int(order.tolist().index(eos)) if 0 <= eos < len(order) else -1
  config = FlamingoConfig(
      vision=VisionConfig(name="vit", image_size=image_size, vit=vit), vision_feature_dim=vd,
      resampler=resampler, xattn=xattn, lm=lm, image_token_id=image, eoc_token_id=eoc,
      image_reset_token_id=reset)
  validate(config)
  return config


# --------------------------------------------------------------------------
# Tensors


def _ln(sd: StateDict, name: str, d: int, bias: bool = True) -> dict:
  out = {"scale": sd.get(f"{name}.weight", (d,))}
  if bias:
    out["bias"] = sd.get(f"{name}.bias", (d,))
  return out


def _heads_in(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
  """torch Linear [H*Dh, D_in] -> ours [D_in, H, Dh]."""
  return w.T.reshape(w.shape[1], heads, head_dim)


def _heads_out(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
  """torch Linear [D, H*Dh] -> ours [H, Dh, D]."""
  return w.T.reshape(heads, head_dim, w.shape[0])


def convert_vision(sd: StateDict, vit: ViTConfig, image_size: int) -> dict:
  """model.vision_model.* -> `models.vit.VisionTransformer` params."""
  d, p, h = vit.width, vit.patch_size, vit.num_heads
  dh, hidden = d // h, int(d * vit.mlp_ratio)
  pre = "model.vision_model."
  conv = sd.get(pre + "embeddings.patch_embedding.weight", (d, 3, p, p))
  params = {
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(p * p * 3, d)},
      "class_embedding": sd.get(pre + "embeddings.class_embedding", (d,)),
      "positional_embedding": sd.get(pre + "embeddings.position_embedding.weight",
                                     (1 + (image_size // p) ** 2, d)),
      "ln_pre": _ln(sd, pre + "pre_layrnorm", d),
  }
  # post_layernorm only normalises the pooled class token, which IDEFICS never reads.
  _ln(sd, pre + "post_layernorm", d)
  for i in range(vit.depth):
    b = f"{pre}encoder.layers.{i}."
    block = {"ln_1": _ln(sd, b + "layer_norm1", d), "ln_2": _ln(sd, b + "layer_norm2", d)}
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      block[ours] = {"kernel": _heads_in(sd.get(b + f"self_attn.{theirs}.weight", (d, d)), h, dh),
                     "bias": sd.get(b + f"self_attn.{theirs}.bias", (d,)).reshape(h, dh)}
    block["out"] = {"kernel": _heads_out(sd.get(b + "self_attn.out_proj.weight", (d, d)), h, dh),
                    "bias": sd.get(b + "self_attn.out_proj.bias", (d,))}
    block["mlp"] = {"up": {"kernel": sd.get(b + "mlp.fc1.weight", (hidden, d)).T,
                           "bias": sd.get(b + "mlp.fc1.bias", (hidden,))},
                    "down": {"kernel": sd.get(b + "mlp.fc2.weight", (d, hidden)).T,
                             "bias": sd.get(b + "mlp.fc2.bias", (d,))}}
    params[f"blocks_{i}"] = block
  return params


def convert_resampler(sd: StateDict, r: ResamplerConfig) -> dict:
  """model.perceiver_resampler.* -> `models.resampler.PerceiverResampler` params."""
  d, h, dh, inner = r.width, r.num_heads, r.head_dim, r.num_heads * r.head_dim
  pre = "model.perceiver_resampler."
  params: dict = {"latents": sd.get(pre + "latents", (r.num_latents, d)),
                  "norm": _ln(sd, pre + "layer_norm", d)}
  for i in range(r.depth):
    b = f"{pre}blocks.{i}."
    attn = {"norm_media": _ln(sd, b + "0.context_layer_norm", d),
            "norm_latents": _ln(sd, b + "0.latents_layer_norm", d),
            "out": {"kernel": _heads_out(sd.get(b + "0.output_proj.weight", (d, inner)), h, dh)}}
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      attn[ours] = {"kernel": _heads_in(sd.get(b + f"0.{theirs}.weight", (inner, d)), h, dh)}
    if r.qk_layernorm:
      attn["query_norm"] = _ln(sd, b + "0.q_layer_norm", dh)
      attn["key_norm"] = _ln(sd, b + "0.k_layer_norm", dh)
    hidden = r.ffw_mult * d
    params[f"layers_{i}_attn"] = attn
    params[f"layers_{i}_ffw"] = {
        "norm": _ln(sd, b + "1.ln", d),
        "ffw": {"up": {"kernel": sd.get(b + "1.fc.weight", (hidden, d)).T},
                "down": {"kernel": sd.get(b + "1.c_proj.weight", (d, hidden)).T}}}
  return params


def convert_gated_xattn(sd: StateDict, j: int, x: XAttnConfig, width: int,
                        visual_width: int) -> dict:
  """model.gated_cross_attn_layers.{j}.* -> `models.xattn.GatedCrossAttentionBlock` params."""
  h, dh, hidden = x.num_heads, x.head_dim, x.ffw_dim
  b = f"model.gated_cross_attn_layers.{j}."
  inner = h * dh
  attn = {"norm_query": _ln(sd, b + "input_layernorm", width, bias=False),
          "query": {"kernel": _heads_in(sd.get(b + "cross_attn.q_proj.weight", (inner, width)),
                                        h, dh)},
          "key": {"kernel": _heads_in(sd.get(b + "cross_attn.k_proj.weight",
                                             (inner, visual_width)), h, dh)},
          "value": {"kernel": _heads_in(sd.get(b + "cross_attn.v_proj.weight",
                                               (inner, visual_width)), h, dh)},
          "out": {"kernel": _heads_out(sd.get(b + "cross_attn.o_proj.weight", (width, inner)),
                                       h, dh)}}
  if x.qk_norm:
    attn["query_norm"] = _ln(sd, b + "cross_attn.q_layer_norm", dh, bias=False)
    attn["key_norm"] = _ln(sd, b + "cross_attn.k_layer_norm", dh, bias=False)
  alpha = (1,) if x.gate_shape == "scalar" else (1, 1, width)
  return {
      "attn": attn,
      "attn_gate": sd.get(b + "alpha_cross_attn", alpha).reshape(-1),
      "norm_ffw": _ln(sd, b + "post_attention_layernorm", width, bias=False),
      "ffw": {"gate": {"kernel": sd.get(b + "mlp.gate_proj.weight", (hidden, width)).T},
              "up": {"kernel": sd.get(b + "mlp.up_proj.weight", (hidden, width)).T},
              "down": {"kernel": sd.get(b + "mlp.down_proj.weight", (width, hidden)).T}},
      "ffw_gate": sd.get(b + "alpha_dense", alpha).reshape(-1),
  }


def _decoupled(sd: StateDict, name: str, extra: str, base: int, total: int,
               d: int) -> np.ndarray:
  """IdeficsDecoupledEmbedding / IdeficsDecoupledLinear rows -> one [total, D] matrix."""
  rows = [sd.get(name, (base, d))]
  if total > base:
    rows.append(sd.get(extra, (total - base, d)))
  return np.concatenate(rows, axis=0)


def convert_idefics(tensors: Mapping[str, np.ndarray], hf: Mapping, *,
                    token_ids: str = "idefics", image_token_id: Optional[int] = None,
                    eoc_token_id: Optional[int] = None,
                    source: str = "") -> tuple[FlamingoConfig, dict]:
  """(FlamingoConfig, params) of an IDEFICS state dict and its config.json dict.

  token_ids: "idefics" keeps IDEFICS's ids; "flamingo" moves `<image>` and
  `<EOC>` (by default `<fake_token_around_image>`) to vocab_size, vocab_size + 1.
  image_token_id / eoc_token_id: their ids in IDEFICS's vocabulary (default
  vocab_size + 1 and vocab_size, as IDEFICS's tokenizer adds them).
  source: the directory, named in tensor errors.
  """
  config = flamingo_config(hf, token_ids=token_ids, image_token_id=image_token_id,
                           eoc_token_id=eoc_token_id)
  _, _, order = _token_ids(hf, token_ids, image_token_id, eoc_token_id)
  lm, x = config.lm, config.xattn
  sd = StateDict(tensors, source=source)
  base = int(_field(hf, "vocab_size", 32000))
  embedding = _decoupled(sd, "model.embed_tokens.weight",
                         "model.embed_tokens.additional_embedding.weight", base, lm.vocab_size,
                         lm.width)[order]
  # The Llama decoder goes through the HF LM converter (same tensor names).
  lm_tensors = {k: v for k, v in sd.tensors.items()
                if k.startswith("model.layers.") or k == "model.norm.weight"}
  lm_tensors["model.embed_tokens.weight"] = embedding
  if not lm.tie_embeddings:
    lm_tensors["lm_head.weight"] = _decoupled(sd, "lm_head.weight", "lm_head.additional_fc.weight",
                                              base, lm.vocab_size, lm.width)[order]
  else:  # tied: a checkpoint may still hold copies of the embedding
    for name in ("lm_head.weight", "lm_head.additional_fc.weight"):
      if sd.has(name):
        sd.get(name)
  lm_params = hf_lm.convert_state_dict(lm_tensors, lm)
  sd.used.update(k for k in lm_tensors if k in sd.tensors)

  ids = np.array([config.image_token_id, config.eoc_token_id])
  params: dict = {"lm": lm_params, "new_token_embeddings": embedding[ids]}
  if not lm.tie_embeddings:
    params["new_token_unembeddings"] = lm_params["unembed"]["kernel"][:, ids].T
  params["vision"] = convert_vision(sd, config.vision.vit, config.vision.image_size)
  params["resampler"] = convert_resampler(sd, config.resampler)
  indices = xattn_layer_indices(lm.num_layers, x.every, x.placement)
  for j, i in enumerate(indices):
    params[f"xattn_block_{i}"] = convert_gated_xattn(sd, j, x, lm.width, config.resampler.width)
  sd.check_all_used("IDEFICS checkpoint")
  return config, params


def load_idefics(path: str, **kwargs) -> tuple[FlamingoConfig, dict]:
  """(FlamingoConfig, params) of a local IDEFICS directory (config.json + safetensors)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"{path!r} has no config.json")
  with open(cfg_path) as f:
    hf = json.load(f)
  return convert_idefics(hf_lm.load_safetensors_dir(path), hf, source=path, **kwargs)


# --------------------------------------------------------------------------
# CLI: python -m flamingo_jax.convert idefics --input DIR --out OUT


def add_arguments(parser) -> None:
  parser.add_argument("--input", required=True, help="IDEFICS model directory (config.json + "
                      "safetensors, sharded or not)")
  parser.add_argument("--out", required=True, help="directory to write")
  parser.add_argument("--token_ids", choices=TOKEN_IDS, default="idefics",
                      help="idefics: keep IDEFICS's ids; flamingo: <image> = vocab_size, "
                      "<EOC> = vocab_size + 1, what flamingo_jax's Tokenizer gives IDEFICS's "
                      "tokenizer.model (use this to evaluate)")
  parser.add_argument("--image_token_id", type=int, default=None,
                      help="id of <image> in IDEFICS's vocabulary (default vocab_size + 1)")
  parser.add_argument("--eoc_token_id", type=int, default=None,
                      help="id of the token used as <EOC> in IDEFICS's vocabulary (default "
                      "vocab_size, <fake_token_around_image>)")


def main(args) -> int:
  config, params = load_idefics(args.input, token_ids=args.token_ids,
                                image_token_id=args.image_token_id,
                                eoc_token_id=args.eoc_token_id)
  hf_lm.write_converted(args.out, params, to_config_dict(config).to_dict())
  print(f"wrote the IDEFICS model to {args.out}/params and its model config to "
        f"{args.out}/model_config.json (<image> = {config.image_token_id}, <EOC> = "
        f"{config.eoc_token_id}; load it with configs/from_checkpoint.py:{args.out})")
  return 0
