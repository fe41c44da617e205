"""Hugging Face causal LMs (local directory: config.json + safetensors) -> our DecoderLM.

Supported families: GPT-2, the Llama family (Llama 2/3/3.1 with its rope
scaling, Mistral with its sliding window), Qwen2, Gemma, GPT-NeoX (Pythia,
RedPajama-INCITE) and MPT (model_type "mpt", e.g. MPT-7B, and MosaicML's older
"mosaic_gpt", MPT-1B-RedPajama in OpenFlamingo-3B).
A mapping table per family names, for each of our parameters, the HF tensor
and the transform (transpose / head split); `convert_state_dict` reports
missing, unused and misshapen tensors by name.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from flamingo_jax.config import to_config_dict
from flamingo_jax.convert import weights_io
from flamingo_jax.convert.weights_io import StateDict
from flamingo_jax.models.config import LMConfig, lm_preset


def lm_config_from_hf(hf: Mapping) -> LMConfig:
  """Our LMConfig from a HF config.json dict."""
  model_type = hf.get("model_type")
  if model_type == "gpt2":
    d, h = hf["n_embd"], hf["n_head"]
    return lm_preset("gpt2", vocab_size=hf["vocab_size"], num_layers=hf["n_layer"], width=d,
                     num_heads=h, head_dim=d // h, ffw_dim=hf.get("n_inner") or 4 * d,
                     norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                     max_length=hf["n_positions"],
                     activation={"gelu_new": "gelu_tanh", "gelu": "gelu"}[
                         hf.get("activation_function", "gelu_new")])
  if model_type in ("llama", "mistral", "qwen2", "gemma"):
    return _llama_config(hf, model_type)
  if model_type == "gpt_neox":
    return _gpt_neox_config(hf)
  if model_type == "mpt":
    return _mpt_config(hf)
  if model_type == "mosaic_gpt":
    return _mosaic_gpt_config(hf)
  raise ValueError(f"unsupported HF model_type {model_type!r}; supported: gpt2, llama, "
                   "mistral, qwen2, gemma, gpt_neox, mpt, mosaic_gpt")


def _rope_config(hf: Mapping, model_type: str) -> dict:
  """Rotary base and scaling as LMConfig fields, from `rope_parameters` (transformers
  >= 5: rope_theta inside) or the older `rope_scaling` (+ top-level rope_theta)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  key = "rope_parameters" if params else "rope_scaling"
  rope = {**scaling, **params}
  base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  out = dict(rotary_base=float(base))
  if kind == "default":
    return out
  if kind == "linear":
    return dict(out, rope_scaling="linear", rope_scaling_factor=float(rope["factor"]))
  if kind == "llama3":
    try:
      return dict(out, rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                  rope_low_freq_factor=float(rope["low_freq_factor"]),
                  rope_high_freq_factor=float(rope["high_freq_factor"]),
                  rope_original_max_length=int(rope["original_max_position_embeddings"]))
    except KeyError as e:
      raise ValueError(f"{model_type} {key} with rope_type 'llama3' lacks {e.args[0]!r}") \
          from None
  raise ValueError(f"{model_type} {key}.rope_type {kind!r} is not supported; supported: "
                   "default, linear, llama3")


def _sliding_window(hf: Mapping, model_type: str) -> int:
  """Mistral: `sliding_window` (null: none). Qwen2 uses it only with use_sliding_window,
  and then only from layer max_window_layers on, which we do not implement."""
  if model_type == "qwen2":
    if hf.get("use_sliding_window"):
      raise ValueError("qwen2 use_sliding_window=true is not supported (a window on only "
                       "some layers, from max_window_layers on)")
    return 0
  if model_type != "mistral":
    return 0
  types = set(hf.get("layer_types") or ())
  if len(types) > 1:
    raise ValueError(f"mistral layer_types {sorted(types)} (alternating attention) is not "
                     "supported")
  return int(hf.get("sliding_window") or 0)


def _llama_config(hf: Mapping, model_type: str) -> LMConfig:
  """Llama, Mistral, Qwen2 and Gemma share the Llama layout (and tensor names)."""
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  family = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma": "gemma"}[model_type]
  extra = {}
  if model_type == "gemma":
    act = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
    if _HF_ACTIVATIONS.get(act) != "gelu_tanh":
      raise ValueError(f"gemma hidden_activation {act!r} is not supported (GeGLU with the "
                       "tanh GELU only)")
    if hf.get("use_bidirectional_attention"):
      raise ValueError("gemma use_bidirectional_attention=true is not supported")
    extra = dict(embedding_scale=float(d) ** 0.5)
  else:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"{model_type} hidden_act {act!r} is not supported (SwiGLU only)")
  if model_type != "qwen2":  # Qwen2: q/k/v biases always (the preset), o_proj and MLP none
    for key in ("attention_bias", "mlp_bias"):
      if hf.get(key):
        raise ValueError(f"{model_type} {key}=true is not supported")
  tie = hf.get("tie_word_embeddings", model_type == "gemma")
  return lm_preset(family, vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
                   width=d, num_heads=h, head_dim=hf.get("head_dim") or d // h,
                   num_kv_heads=hf.get("num_key_value_heads") or h,
                   ffw_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                   tie_embeddings=bool(tie), max_length=hf.get("max_position_embeddings", 2048),
                   sliding_window=_sliding_window(hf, model_type),
                   **_rope_config(hf, model_type), **extra)


_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}


def _gpt_neox_config(hf: Mapping) -> LMConfig:
  """GPT-NeoX: rotary settings live in rope_parameters (transformers >= 5) or, in
  older configs (Pythia, RedPajama-INCITE on the Hub), in rotary_pct / rotary_emb_base."""
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  dh = d // h
  rope = dict(hf.get("rope_parameters") or {})
  if hf.get("rope_scaling"):
    raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not supported")
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"rope_parameters.rope_type {rope['rope_type']!r} is not supported")
  pct = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor",
                                                  hf.get("rotary_pct", 0.25)))
  base = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
  act = hf.get("hidden_act", "gelu")
  if act not in _HF_ACTIVATIONS:
    raise ValueError(f"gpt_neox hidden_act {act!r} is not supported; expected one of "
                     f"{sorted(_HF_ACTIVATIONS)}")
  if not hf.get("attention_bias", True):
    raise ValueError("gpt_neox attention_bias=false is not supported (the MLP keeps its "
                     "biases, our LM has one use_bias for both)")
  rotary_dim = int(dh * pct)
  if rotary_dim % 2:
    raise ValueError(f"gpt_neox rotary dims int(head_dim {dh} * rotary_pct {pct}) = "
                     f"{rotary_dim} must be even")
  return lm_preset("gpt_neox", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
                   width=d, num_heads=h, head_dim=dh, ffw_dim=hf.get("intermediate_size") or 4 * d,
                   norm_eps=hf.get("layer_norm_eps", 1e-5), rotary_base=float(base),
                   rotary_dim=0 if rotary_dim == dh else rotary_dim,
                   activation=_HF_ACTIVATIONS[act],
                   parallel_residual=bool(hf.get("use_parallel_residual", True)),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   max_length=hf.get("max_position_embeddings", 2048))


def _mpt_config(hf: Mapping) -> LMConfig:
  """MPT (transformers' MptForCausalLM and MosaicML's own model_type "mpt" code).

  Options that change the forward pass and that we do not implement are refused
  by name; defaults are transformers' MptConfig's.
  """
  d, h = hf["d_model"], hf["n_heads"]
  attn = dict(hf.get("attn_config") or {})
  refused = {"attn_config.alibi": not attn.get("alibi", True),
             "attn_config.qk_ln": bool(attn.get("qk_ln", False)),
             "attn_config.clip_qkv": attn.get("clip_qkv") is not None,
             "attn_config.prefix_lm": bool(attn.get("prefix_lm", False)),
             "attn_config.attn_type": attn.get("attn_type", "multihead_attention")
             != "multihead_attention",
             "logit_scale": hf.get("logit_scale") is not None,
             "norm_type": hf.get("norm_type", "low_precision_layernorm")
             not in ("layernorm", "low_precision_layernorm")}
  bad = [k for k, v in refused.items() if v]
  if bad:
    values = {k: (attn if k.startswith("attn_config.") else hf).get(k.split(".")[-1])
              for k in bad}
    raise ValueError(f"mpt config options not supported: {values}")
  no_bias = bool(hf.get("no_bias", True))
  return lm_preset("mpt", vocab_size=hf["vocab_size"], num_layers=hf["n_layers"], width=d,
                   num_heads=h, head_dim=d // h, ffw_dim=hf.get("expansion_ratio", 4) * d,
                   norm_eps=hf.get("layer_norm_epsilon", 1e-5), use_bias=not no_bias,
                   norm_bias=not no_bias, alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
                   attention_scale=float(attn.get("softmax_scale") or 0.0),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                   max_length=hf.get("max_seq_len", 2048))


def _mosaic_gpt_config(hf: Mapping) -> LMConfig:
  """MosaicML's mosaic_gpt (MPT-1B-RedPajama; config.json keys flat, defaults those of
  its MosaicGPTConfig). The same network as MPT, plus attn_qk_ln (our qk_norm)."""
  d, h = hf["d_model"], hf["n_heads"]
  refused = {"alibi": not hf.get("alibi", False),
             "attn_clip_qkv": hf.get("attn_clip_qkv") is not None,
             "prefix_lm": bool(hf.get("prefix_lm", False)),
             "logit_scale": hf.get("logit_scale") is not None}
  bad = {k: hf.get(k) for k, v in refused.items() if v}
  if bad:
    raise ValueError(f"mosaic_gpt config options not supported: {bad}")
  if h & (h - 1):  # its slopes 2^(-i * max / H) skip MPT's interleave for such H
    raise ValueError(f"mosaic_gpt n_heads {h} is not a power of 2: its ALiBi slopes differ "
                     "from MPT's there and are not implemented")
  no_bias = bool(hf.get("no_bias", False))
  return lm_preset("mpt", vocab_size=hf["vocab_size"], num_layers=hf["n_layers"], width=d,
                   num_heads=h, head_dim=d // h, ffw_dim=hf.get("mlp_ratio", 4) * d,
                   norm_eps=1e-5, use_bias=not no_bias, norm_bias=not no_bias,
                   qk_norm=bool(hf.get("attn_qk_ln", False)),
                   alibi_bias_max=float(hf.get("alibi_bias_max", 8)),
                   attention_scale=float(hf.get("softmax_scale") or 0.0),
                   tie_embeddings=True, max_length=hf.get("max_seq_len", 2048))


def _split_heads(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
  """torch Linear [H*Dh, D] -> [D, H, Dh]."""
  return w.T.reshape(w.shape[1], heads, head_dim)


def _gpt2(sd: StateDict, c: LMConfig) -> dict:
  d, h, dh, ff = c.width, c.num_heads, c.head_dim, c.ffw_dim or 4 * c.width
  p = {"embedding": sd.get("transformer.wte.weight", (c.vocab_size, d)),
       "position_embedding": sd.get("transformer.wpe.weight", (c.max_length, d)),
       "final_norm": {"scale": sd.get("transformer.ln_f.weight", (d,)),
                      "bias": sd.get("transformer.ln_f.bias", (d,))}}
  for i in range(c.num_layers):
    pre = f"transformer.h.{i}."
    qkv_w = sd.get(pre + "attn.c_attn.weight", (d, 3 * d))  # Conv1D: [in, out]
    qkv_b = sd.get(pre + "attn.c_attn.bias", (3 * d,))
    attn = {}
    for j, name in enumerate(("query", "key", "value")):
      attn[name] = {"kernel": qkv_w[:, j * d:(j + 1) * d].reshape(d, h, dh),
                    "bias": qkv_b[j * d:(j + 1) * d].reshape(h, dh)}
    attn["out"] = {"kernel": sd.get(pre + "attn.c_proj.weight", (d, d)).reshape(h, dh, d),
                   "bias": sd.get(pre + "attn.c_proj.bias", (d,))}
    p[f"blocks_{i}"] = {
        "attn_norm": {"scale": sd.get(pre + "ln_1.weight", (d,)),
                      "bias": sd.get(pre + "ln_1.bias", (d,))},
        "attn": attn,
        "ffw_norm": {"scale": sd.get(pre + "ln_2.weight", (d,)),
                     "bias": sd.get(pre + "ln_2.bias", (d,))},
        "ffw": {"up": {"kernel": sd.get(pre + "mlp.c_fc.weight", (d, ff)),
                       "bias": sd.get(pre + "mlp.c_fc.bias", (ff,))},
                "down": {"kernel": sd.get(pre + "mlp.c_proj.weight", (ff, d)),
                         "bias": sd.get(pre + "mlp.c_proj.bias", (d,))}},
    }
  if sd.has("lm_head.weight"):  # tied: the same tensor as wte
    sd.get("lm_head.weight", (c.vocab_size, d))
  return p


def _llama(sd: StateDict, c: LMConfig) -> dict:
  """Llama, Mistral, Qwen2 (q/k/v biases) and Gemma (RMSNorm scale stored as 1 + w)."""
  d, h, dh, ff = c.width, c.num_heads, c.head_dim, c.ffw_dim
  hkv = c.num_kv_heads or h
  offset = np.float32(1.0 if c.family == "gemma" else 0.0)
  norm = lambda name: {"scale": sd.get(name, (d,)) + offset}  # noqa: E731
  p = {"embedding": sd.get("model.embed_tokens.weight", (c.vocab_size, d)),
       "final_norm": norm("model.norm.weight")}
  if c.tie_embeddings:
    if sd.has("lm_head.weight"):
      sd.get("lm_head.weight", (c.vocab_size, d))
  else:
    p["unembed"] = {"kernel": sd.get("lm_head.weight", (c.vocab_size, d)).T}
  for i in range(c.num_layers):
    pre = f"model.layers.{i}."
    attn = {}
    for name, proj, heads in (("query", "q_proj", h), ("key", "k_proj", hkv),
                              ("value", "v_proj", hkv)):
      attn[name] = {"kernel": _split_heads(
          sd.get(pre + f"self_attn.{proj}.weight", (heads * dh, d)), heads, dh)}
      if c.qkv_bias:
        attn[name]["bias"] = sd.get(pre + f"self_attn.{proj}.bias", (heads * dh,)).reshape(
            heads, dh)
    attn["out"] = {"kernel": sd.get(pre + "self_attn.o_proj.weight", (d, h * dh)).T.reshape(
        h, dh, d)}
    p[f"blocks_{i}"] = {
        "attn_norm": norm(pre + "input_layernorm.weight"),
        "attn": attn,
        "ffw_norm": norm(pre + "post_attention_layernorm.weight"),
        "ffw": {"gate": {"kernel": sd.get(pre + "mlp.gate_proj.weight", (ff, d)).T},
                "up": {"kernel": sd.get(pre + "mlp.up_proj.weight", (ff, d)).T},
                "down": {"kernel": sd.get(pre + "mlp.down_proj.weight", (d, ff)).T}},
    }
  return p


def _layernorm(sd: StateDict, name: str, d: int, bias: bool) -> dict:
  out = {"scale": sd.get(name + ".weight", (d,))}
  if bias:
    out["bias"] = sd.get(name + ".bias", (d,))
  return out


def _unembed(sd: StateDict, c: LMConfig, name: str) -> dict:
  """{"unembed": ...} when untied; a tied copy of the embedding is consumed."""
  if not c.tie_embeddings:
    return {"unembed": {"kernel": sd.get(name, (c.vocab_size, c.width)).T}}
  if sd.has(name):
    sd.get(name, (c.vocab_size, c.width))
  return {}


def _dense(sd: StateDict, name: str, out_dim: int, in_dim: int, bias: bool) -> dict:
  """torch Linear [out, in] (+ bias [out]) -> our Dense {kernel [in, out], bias}."""
  p = {"kernel": sd.get(name + ".weight", (out_dim, in_dim)).T}
  if bias:
    p["bias"] = sd.get(name + ".bias", (out_dim,))
  return p


def _gpt_neox(sd: StateDict, c: LMConfig) -> dict:
  """query_key_value's output rows are per head [H, 3, Dh] (q, k, v of head 0 first)."""
  d, h, dh, ff = c.width, c.num_heads, c.head_dim, c.ffw_dim or c.ffw_mult * c.width
  p = {"embedding": sd.get("gpt_neox.embed_in.weight", (c.vocab_size, d)),
       "final_norm": _layernorm(sd, "gpt_neox.final_layer_norm", d, True),
       # transformers >= 5 saves embed_out but names it lm_head in memory
       **_unembed(sd, c, "lm_head.weight" if sd.has("lm_head.weight")
                  and not sd.has("embed_out.weight") else "embed_out.weight")}
  for i in range(c.num_layers):
    pre = f"gpt_neox.layers.{i}."
    qkv_w = sd.get(pre + "attention.query_key_value.weight", (3 * h * dh, d))
    qkv_b = sd.get(pre + "attention.query_key_value.bias", (3 * h * dh,))
    qkv_w = qkv_w.reshape(h, 3, dh, d)
    qkv_b = qkv_b.reshape(h, 3, dh)
    attn = {name: {"kernel": qkv_w[:, j].transpose(2, 0, 1), "bias": qkv_b[:, j]}
            for j, name in enumerate(("query", "key", "value"))}
    attn["out"] = {
        "kernel": sd.get(pre + "attention.dense.weight", (d, h * dh)).T.reshape(h, dh, d),
        "bias": sd.get(pre + "attention.dense.bias", (d,))}
    p[f"blocks_{i}"] = {
        "attn_norm": _layernorm(sd, pre + "input_layernorm", d, True),
        "attn": attn,
        "ffw_norm": _layernorm(sd, pre + "post_attention_layernorm", d, True),
        "ffw": {"up": _dense(sd, pre + "mlp.dense_h_to_4h", ff, d, True),
                "down": _dense(sd, pre + "mlp.dense_4h_to_h", d, ff, True)},
    }
  return p


# MPT module names -> mosaic_gpt's (MPT-1B-RedPajama; the rest, wte / Wqkv /
# out_proj / q_ln / k_ln, are shared).
_MPT_NAMES = {"norm_1": "norm_1", "norm_2": "norm_2", "up": "ffn.up_proj",
              "down": "ffn.down_proj", "norm_f": "norm_f"}
_MOSAIC_GPT_NAMES = {"norm_1": "ln_1", "norm_2": "ln_2", "up": "mlp.mlp_up",
                     "down": "mlp.mlp_down", "norm_f": "ln_f"}


def _mpt(sd: StateDict, c: LMConfig) -> dict:
  """MPT or mosaic_gpt tensor names (told apart by block 0's first norm). Wqkv's output
  rows are [q; k; v], each [H * Dh]; q_ln / k_ln norm the whole [H * Dh] width."""
  d, h, dh, ff = c.width, c.num_heads, c.head_dim, c.ffw_dim or c.ffw_mult * c.width
  bias = c.use_bias
  names = _MOSAIC_GPT_NAMES if sd.has("transformer.blocks.0.ln_1.weight") else _MPT_NAMES
  p = {"embedding": sd.get("transformer.wte.weight", (c.vocab_size, d)),
       "final_norm": _layernorm(sd, "transformer." + names["norm_f"], d, c.norm_bias),
       **_unembed(sd, c, "lm_head.weight")}
  for i in range(c.num_layers):
    pre = f"transformer.blocks.{i}."
    qkv_w = sd.get(pre + "attn.Wqkv.weight", (3 * h * dh, d))
    qkv_b = sd.get(pre + "attn.Wqkv.bias", (3 * h * dh,)) if bias else None
    attn = {}
    for j, name in enumerate(("query", "key", "value")):
      attn[name] = {"kernel": _split_heads(qkv_w[j * h * dh:(j + 1) * h * dh], h, dh)}
      if bias:
        attn[name]["bias"] = qkv_b[j * h * dh:(j + 1) * h * dh].reshape(h, dh)
    if c.qk_norm:
      attn["query_norm"] = _layernorm(sd, pre + "attn.q_ln", h * dh, c.norm_bias)
      attn["key_norm"] = _layernorm(sd, pre + "attn.k_ln", h * dh, c.norm_bias)
    attn["out"] = {"kernel": sd.get(pre + "attn.out_proj.weight", (d, h * dh)).T.reshape(
        h, dh, d)}
    if bias:
      attn["out"]["bias"] = sd.get(pre + "attn.out_proj.bias", (d,))
    p[f"blocks_{i}"] = {
        "attn_norm": _layernorm(sd, pre + names["norm_1"], d, c.norm_bias),
        "attn": attn,
        "ffw_norm": _layernorm(sd, pre + names["norm_2"], d, c.norm_bias),
        "ffw": {"up": _dense(sd, pre + names["up"], ff, d, bias),
                "down": _dense(sd, pre + names["down"], d, ff, bias)},
    }
  return p


_FAMILIES = {"gpt2": _gpt2, "llama": _llama, "qwen2": _llama, "gemma": _llama,
             "gpt_neox": _gpt_neox, "mpt": _mpt}
# Non-parameter buffers some checkpoints carry (causal masks, rotary tables).
_BUFFERS = (".attn.bias", ".attention.bias", "masked_bias", "rotary_emb.inv_freq")


def convert_state_dict(tensors: Mapping[str, np.ndarray], config: LMConfig) -> dict:
  """A HF state dict (name -> array) -> our DecoderLM params."""
  sd = StateDict({k: v for k, v in tensors.items()
                  if not any(k.endswith(b) for b in _BUFFERS)})
  params = _FAMILIES[config.family](sd, config)
  sd.check_all_used(f"HF {config.family} checkpoint")
  return params


# The low-level file reading (truncated / non-safetensors files named) lives in weights_io.
read_safetensors = weights_io.read_safetensors
load_safetensors_dir = weights_io.load_hf_weights_dir


def load_hf_lm(path: str) -> tuple[LMConfig, dict]:
  """(LMConfig, params) from a local HF model directory."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"{path!r} has no config.json")
  with open(cfg_path) as f:
    config = lm_config_from_hf(json.load(f))
  return config, convert_state_dict(load_safetensors_dir(path), config)


# --------------------------------------------------------------------------
# CLI: python -m flamingo_jax.convert hf-lm --input DIR --out DIR


def add_arguments(parser) -> None:
  parser.add_argument("--input", required=True, help="HF model directory (config.json + "
                      "safetensors, sharded or not)")
  parser.add_argument("--out", required=True, help="directory to write")


# The LM's own tokenizer, copied next to its weights (configs/from_hf_lm.py reads
# it there); tokenizer.model (sentencepiece) only when there is no tokenizer.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(src: str, out: str) -> list[str]:
  """Copies the tokenizer files of HF model directory `src` into `out`; -> their names."""
  import shutil
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
  if "tokenizer.json" not in names and os.path.isfile(os.path.join(src, "tokenizer.model")):
    names.append("tokenizer.model")
  for n in names:
    shutil.copyfile(os.path.join(src, n), os.path.join(out, n))
  return names


def main(args) -> int:
  config, params = load_hf_lm(args.input)
  write_converted(args.out, params, {"lm": to_config_dict(config).to_dict()})
  copied = copy_tokenizer(args.input, args.out)
  count = sum(int(np.prod(v.shape)) for v in _leaves(params))
  print(f"wrote {count:,} {config.family} LM parameters to {args.out}/params, its "
        f"model.lm config to {args.out}/model_config.json"
        + (f" and its tokenizer ({', '.join(copied)})" if copied else
           " (no tokenizer files in the input)"))
  return 0


def _leaves(tree):
  for v in tree.values():
    yield from (_leaves(v) if isinstance(v, dict) else [v])


def write_converted(out: str, params: dict, model_config: dict) -> None:
  """DIR/params (orbax params checkpoint) + DIR/model_config.json (the `model` section):
  a model directory, written by flamingo_jax.model_dir."""
  from flamingo_jax.model_dir import write_model_dir
  write_model_dir(out, params, model_config)
