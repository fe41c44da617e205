"""Hugging Face causal LMs (local directory: config.json + safetensors) -> our DecoderLM.

Supported families: GPT-2 and the Llama family (Llama, Mistral-style GQA).
A mapping table per family names, for each of our parameters, the HF tensor
and the transform (transpose / head split); `convert_state_dict` reports
missing, unused and misshapen tensors by name.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from flamingo_jax.config import LMConfig, lm_preset
from flamingo_jax.convert.openflamingo import StateDict


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
  if model_type in ("llama", "mistral"):
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    if hf.get("rope_scaling"):
      raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not supported")
    return lm_preset("llama", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
                     width=d, num_heads=h, head_dim=hf.get("head_dim") or d // h,
                     num_kv_heads=hf.get("num_key_value_heads") or h,
                     ffw_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                     rotary_base=float(rope),
                     tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                     use_bias=bool(hf.get("attention_bias", False)))
  raise ValueError(f"unsupported HF model_type {model_type!r}; supported: gpt2, llama, mistral")


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
  d, h, dh, ff = c.width, c.num_heads, c.head_dim, c.ffw_dim
  hkv = c.num_kv_heads or h
  p = {"embedding": sd.get("model.embed_tokens.weight", (c.vocab_size, d)),
       "final_norm": {"scale": sd.get("model.norm.weight", (d,))}}
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
      if c.use_bias:
        attn[name]["bias"] = sd.get(pre + f"self_attn.{proj}.bias", (heads * dh,)).reshape(
            heads, dh)
    attn["out"] = {"kernel": sd.get(pre + "self_attn.o_proj.weight", (d, h * dh)).T.reshape(
        h, dh, d)}
    if c.use_bias and sd.has(pre + "self_attn.o_proj.bias"):
      attn["out"]["bias"] = sd.get(pre + "self_attn.o_proj.bias", (d,))
    p[f"blocks_{i}"] = {
        "attn_norm": {"scale": sd.get(pre + "input_layernorm.weight", (d,))},
        "attn": attn,
        "ffw_norm": {"scale": sd.get(pre + "post_attention_layernorm.weight", (d,))},
        "ffw": {"gate": {"kernel": sd.get(pre + "mlp.gate_proj.weight", (ff, d)).T},
                "up": {"kernel": sd.get(pre + "mlp.up_proj.weight", (ff, d)).T},
                "down": {"kernel": sd.get(pre + "mlp.down_proj.weight", (d, ff)).T}},
    }
  return p


_FAMILIES = {"gpt2": _gpt2, "llama": _llama}


def convert_state_dict(tensors: Mapping[str, np.ndarray], config: LMConfig) -> dict:
  """A HF state dict (name -> array) -> our DecoderLM params."""
  sd = StateDict({k: v for k, v in tensors.items() if not k.endswith(".attn.bias")
                  and not k.endswith("masked_bias") and "rotary_emb.inv_freq" not in k})
  params = _FAMILIES[config.family](sd, config)
  sd.check_all_used(f"HF {config.family} checkpoint")
  return params


def load_safetensors_dir(path: str) -> dict[str, np.ndarray]:
  """All tensors of a HF model directory (single or sharded safetensors)."""
  from safetensors.numpy import load_file
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise ValueError(f"{path!r} holds neither model.safetensors nor "
                     "model.safetensors.index.json")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    for k, v in load_file(os.path.join(path, name)).items():
      tensors[k] = v.astype(np.float32) if v.dtype != np.float32 else v
  return tensors


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


def main(args) -> int:
  from flamingo_jax.config import to_config_dict
  config, params = load_hf_lm(args.input)
  write_converted(args.out, params, {"lm": to_config_dict(config).to_dict()})
  count = sum(int(np.prod(v.shape)) for v in _leaves(params))
  print(f"wrote {count:,} {config.family} LM parameters to {args.out}/params and its "
        f"model.lm config to {args.out}/model_config.json")
  return 0


def _leaves(tree):
  for v in tree.values():
    yield from (_leaves(v) if isinstance(v, dict) else [v])


def write_converted(out: str, params: dict, model_config: dict) -> None:
  """DIR/params (orbax params checkpoint) + DIR/model_config.json (the `model` section)."""
  from flamingo_jax import checkpoint
  os.makedirs(out, exist_ok=True)
  checkpoint.save_params(os.path.join(out, "params"), params)
  with open(os.path.join(out, "model_config.json"), "w") as f:
    json.dump(model_config, f, indent=1, default=list)
