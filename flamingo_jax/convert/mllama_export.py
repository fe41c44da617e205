"""A Llama 3.2 Vision model directory (converted with `convert mllama`, fine-tuned here)
-> a transformers `mllama` directory: config.json and safetensors (sharded, with
model.safetensors.index.json, above --max_shard_gb) in transformers >= 4.52's key
layout (`model.language_model.*`, `model.vision_model.*`,
`model.multi_modal_projector.*`, `lm_head.*`), which MllamaForConditionalGeneration
loads with the logits the model computes here (the inverse of convert/mllama.py).

The config must have mllama's structure (vision encoder `mllama`, resampler
`linear`, explicit GQA cross-attention with per-head q/k RMSNorm and SwiGLU, 8
extra input rows); anything else is one error naming the key. transformers has
one row mask, its own: a model run here with Meta's (`no_image=skip`) computes
transformers' behaviour there, which the command says. Token ids that our config
does not hold (bos, pad) come from `--hf_config` (the original config.json; its
shapes must agree) or are Llama 3's (where the vocabulary holds them). The
tokenizer files of the model directory are copied.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from flamingo_jax.convert import hf_lm, weights_io
from flamingo_jax.convert.mllama import EXTRA_ROWS
from flamingo_jax.errors import CheckpointError, ConfigError
from flamingo_jax.models import layer_stack
from flamingo_jax.models.config import FlamingoConfig

LLAMA3_TOKENS = dict(bos_token_id=128000, pad_token_id=128004)


def check_structure(c: FlamingoConfig) -> None:
  """ConfigError naming the first key that has no place in transformers' mllama."""
  x, lm, r = c.xattn, c.lm, c.resampler
  wants = [
      ("model.vision.name", c.vision.name, "mllama"),
      ("model.resampler.kind", r.kind, "linear"), ("model.resampler.use_bias", r.use_bias, True),
      ("model.xattn.kind", x.kind, "gated_dense"), ("model.xattn.placement", x.placement,
                                                    "explicit"),
      ("model.xattn.attend_previous", x.attend_previous, "group"),
      ("model.xattn.num_heads", x.num_heads, lm.num_heads),
      ("model.xattn.head_dim", x.head_dim, lm.head_dim),
      ("model.xattn.num_kv_heads", x.num_kv_heads or x.num_heads, lm.num_kv_heads or lm.num_heads),
      ("model.xattn.ffw_dim", x.ffw_dim, lm.ffw_dim), ("model.xattn.activation", x.activation,
                                                       "swiglu"),
      ("model.xattn.norm", x.norm, "rmsnorm"), ("model.xattn.qk_norm", x.qk_norm, True),
      ("model.xattn.query_layernorm", x.query_layernorm, True),
      ("model.xattn.kv_layernorm", x.kv_layernorm, False),
      ("model.xattn.ffw_layernorm", x.ffw_layernorm, True),
      ("model.xattn.gating", x.gating, "tanh"), ("model.xattn.gate_shape", x.gate_shape, "scalar"),
      ("model.xattn.use_bias", x.use_bias, False), ("model.lm.family", lm.family, "llama"),
      ("model.lm.tie_embeddings", lm.tie_embeddings, False),
      ("model.extra_token_rows", c.extra_token_rows, EXTRA_ROWS),
      ("model.train_new_token_embeddings", c.train_new_token_embeddings, False),
      ("model.image_reset_token_id", c.image_reset_token_id, -1),
  ]
  for key, have, want in wants:
    if have != want:
      raise ConfigError(f"config key {key!r} is {have!r}; transformers' mllama needs {want!r}")
  if x.no_image not in ("attend_all", "skip"):
    raise ConfigError(f"config key 'model.xattn.no_image' is {x.no_image!r}; transformers' "
                      "mllama has 'attend_all' (Meta's 'skip' exports as it)")


def hf_config(c: FlamingoConfig, template: Optional[Mapping] = None) -> dict:
  """config.json (model_type mllama) of our config; template: the original one, whose
  other fields are kept and whose shapes must equal ours."""
  check_structure(c)
  lm, v = c.lm, c.vision.mllama
  vocab = lm.embedding_rows
  cross = [i + k for k, i in enumerate(c.xattn.layers)]  # inverse of mllama_layer_indices
  rope = dict(rope_type="default", rope_theta=lm.rotary_base)
  if lm.rope_scaling == "llama3":
    rope = dict(rope, rope_type="llama3", factor=lm.rope_scaling_factor,
                low_freq_factor=lm.rope_low_freq_factor,
                high_freq_factor=lm.rope_high_freq_factor,
                original_max_position_embeddings=lm.rope_original_max_length)
  elif lm.rope_scaling == "linear":
    rope = dict(rope, rope_type="linear", factor=lm.rope_scaling_factor)
  text = dict(vocab_size=vocab, hidden_size=lm.width, num_attention_heads=lm.num_heads,
              num_key_value_heads=lm.num_kv_heads or lm.num_heads,
              intermediate_size=lm.ffw_dim, num_hidden_layers=lm.num_layers + len(cross),
              cross_attention_layers=cross, rms_norm_eps=lm.norm_eps, rope_parameters=rope,
              max_position_embeddings=lm.max_length, hidden_act="silu",
              tie_word_embeddings=False, eos_token_id=c.eoc_token_id,
              model_type="mllama_text_model")
  vision = dict(hidden_size=v.width, attention_heads=v.num_heads, intermediate_size=v.mlp_dim,
                num_hidden_layers=v.depth, num_global_layers=v.global_depth,
                image_size=c.vision.image_size, patch_size=v.patch_size, norm_eps=v.layernorm_eps,
                max_num_tiles=v.max_num_tiles, hidden_act=v.activation,
                supported_aspect_ratios=[list(a) for a in v.aspect_ratios],
                intermediate_layers_indices=list(v.intermediate_layers),
                vision_output_dim=v.width * (1 + len(v.intermediate_layers)),
                model_type="mllama_vision_model")
  if template is None:  # Llama 3's where the vocabulary holds them (else no pad, bos unset)
    text.update({k: v for k, v in LLAMA3_TOKENS.items() if v < vocab})
    text.setdefault("pad_token_id", None)
    return dict(model_type="mllama", architectures=["MllamaForConditionalGeneration"],
                image_token_index=c.image_token_id, text_config=text, vision_config=vision)
  out = json.loads(json.dumps(template))
  for section, ours in (("text_config", text), ("vision_config", vision)):
    theirs = out.setdefault(section, {})
    for key, value in ours.items():
      if key in ("rope_parameters", "eos_token_id") and key in theirs:
        continue  # ours came from theirs; the template keeps its spelling
      if key in theirs and theirs[key] != value and key not in ("model_type",):
        raise CheckpointError(f"--hf_config {section}.{key} is {theirs[key]!r} but the model "
                              f"has {value!r}")
      theirs.setdefault(key, value)
  out["image_token_index"] = c.image_token_id
  return out


def _unbox(tree):
  return {k: _unbox(v) for k, v in tree.items()} if hasattr(tree, "items") else \
      np.asarray(getattr(tree, "value", tree), np.float32)


def _heads_out(kernel: np.ndarray) -> np.ndarray:
  """Our HeadProjection kernel [D_in, H, Dh] -> torch Linear weight [H * Dh, D_in]."""
  return kernel.reshape(kernel.shape[0], -1).T


def _attention_and_mlp(pre: str, kind: str, attn: Mapping, ffw: Mapping,
                       width: int) -> dict[str, np.ndarray]:
  """One decoder layer's q/k/v/o projections (`self_attn` or `cross_attn`) and SwiGLU MLP."""
  out = {f"{pre}{kind}.{n}_proj.weight": _heads_out(attn[ours]["kernel"])
         for n, ours in (("q", "query"), ("k", "key"), ("v", "value"))}
  out[f"{pre}{kind}.o_proj.weight"] = attn["out"]["kernel"].reshape(-1, width).T
  out.update({f"{pre}mlp.{n}_proj.weight": ffw[n]["kernel"].T for n in ("gate", "up", "down")})
  return out


def export_tensors(c: FlamingoConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our params (either layer layout) -> transformers >= 4.52's mllama state dict."""
  check_structure(c)
  p = _unbox(layer_stack.to_unrolled(dict(params), c.xattn.layers))
  lm, x = p["lm"], c.xattn
  cross = [i + k for k, i in enumerate(x.layers)]
  out = {"model.language_model.embed_tokens.weight": np.concatenate(
      [lm["embedding"], p["new_token_extra_embeddings"]]),
         "model.language_model.norm.weight": lm["final_norm"]["scale"],
         "lm_head.weight": lm["unembed"]["kernel"].T}
  self_layers = [i for i in range(c.lm.num_layers + len(cross)) if i not in set(cross)]
  for j, i in enumerate(self_layers):
    b, pre = lm[f"blocks_{j}"], f"model.language_model.layers.{i}."
    a = b["attn"]
    out.update({
        pre + "input_layernorm.weight": b["attn_norm"]["scale"],
        pre + "post_attention_layernorm.weight": b["ffw_norm"]["scale"],
        **_attention_and_mlp(pre, "self_attn", a, b["ffw"], c.lm.width)})
  for k, i in enumerate(cross):
    b, pre = p[f"xattn_block_{x.layers[k]}"], f"model.language_model.layers.{i}."
    a = b["attn"]
    out.update({
        pre + "input_layernorm.weight": a["norm_query"]["scale"],
        pre + "post_attention_layernorm.weight": b["norm_ffw"]["scale"],
        **_attention_and_mlp(pre, "cross_attn", a, b["ffw"], c.lm.width),
        pre + "cross_attn.q_norm.weight": a["query_norm"]["scale"],
        pre + "cross_attn.k_norm.weight": a["key_norm"]["scale"],
        pre + "cross_attn_attn_gate": b["attn_gate"].reshape(1),
        pre + "cross_attn_mlp_gate": b["ffw_gate"].reshape(1)})
  proj = p["resampler"]["projection"]
  out["model.multi_modal_projector.weight"] = proj["kernel"].T
  out["model.multi_modal_projector.bias"] = proj["bias"]
  out.update({"model.vision_model." + k: v for k, v in export_vision(c, p["vision"]).items()})
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def export_vision(c: FlamingoConfig, v: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our `MllamaVisionEncoder` params -> MllamaVisionModel's state dict (no prefix)."""
  m = c.vision.mllama
  d, p = m.width, m.patch_size
  ln = lambda name, t: {f"{name}.weight": t["scale"], f"{name}.bias": t["bias"]}  # noqa: E731
  out = {"patch_embedding.weight": v["patch_embed"]["kernel"].reshape(p, p, 3, d).transpose(
      3, 2, 0, 1),
         "class_embedding": v["class_embedding"],
         "pre_tile_positional_embedding.embedding.weight": v["pre_tile_embedding"],
         "pre_tile_positional_embedding.gate": v["pre_tile_gate"],
         "post_tile_positional_embedding.embedding.weight": v["post_tile_embedding"],
         "post_tile_positional_embedding.gate": v["post_tile_gate"],
         "gated_positional_embedding.embedding": v["positional_embedding"],
         "gated_positional_embedding.gate": v["positional_gate"],
         "gated_positional_embedding.tile_embedding.weight": v["tile_positional_embedding"],
         **ln("layernorm_pre", v["ln_pre"]), **ln("layernorm_post", v["ln_post"])}
  stacks = [(f"transformer.layers.{i}.", v[f"blocks_{i}"], False) for i in range(m.depth)]
  stacks += [(f"global_transformer.layers.{i}.", v[f"global_blocks_{i}"], True)
             for i in range(m.global_depth)]
  for pre, b, gated in stacks:
    out.update({**ln(pre + "input_layernorm", b["ln_1"]),
                **ln(pre + "post_attention_layernorm", b["ln_2"]),
                pre + "self_attn.q_proj.weight": _heads_out(b["query"]["kernel"]),
                pre + "self_attn.k_proj.weight": _heads_out(b["key"]["kernel"]),
                pre + "self_attn.v_proj.weight": _heads_out(b["value"]["kernel"]),
                pre + "self_attn.o_proj.weight": b["out"]["kernel"].reshape(-1, d).T,
                pre + "mlp.fc1.weight": b["mlp"]["up"]["kernel"].T,
                pre + "mlp.fc1.bias": b["mlp"]["up"]["bias"],
                pre + "mlp.fc2.weight": b["mlp"]["down"]["kernel"].T,
                pre + "mlp.fc2.bias": b["mlp"]["down"]["bias"]})
    if gated:
      out[pre + "gate_attn"] = b["attn_gate"].reshape(1)
      out[pre + "gate_ffn"] = b["ffw_gate"].reshape(1)
  return out


def write_hf_dir(out: str, config: FlamingoConfig, params: Mapping[str, Any],
                 template: Optional[Mapping] = None, dtype: str = "float32",
                 max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes config.json and the safetensors (sharded above max_shard_bytes, with the
  index) into `out`; -> the weight files written."""
  hf = hf_config(config, template)
  tensors = export_tensors(config, params)
  os.makedirs(out, exist_ok=True)
  hf["dtype"] = dtype
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  return weights_io.write_safetensors_dir(out, tensors, dtype, max_shard_bytes)


# --------------------------------------------------------------------------
# CLI: python -m flamingo_jax.convert mllama-export --input MODEL_DIR --out HF_DIR


def add_arguments(parser) -> None:
  parser.add_argument("--input", required=True, help="model directory (model_config.json + "
                      "params) of an mllama model")
  parser.add_argument("--out", required=True, help="directory to write (transformers layout)")
  parser.add_argument("--hf_config", default=None, help="the original config.json: its other "
                      "fields (token ids, ...) are kept, its shapes must equal the model's")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="tensor dtype of the safetensors (the hub's: bfloat16)")
  parser.add_argument("--max_shard_gb", type=float, default=5.0,
                      help="largest safetensors file; more: shards with an index")


def main(args) -> int:
  from flamingo_jax.model_dir import MODEL_CONFIG, PARAMS, read_model_config
  from flamingo_jax.runtime.params_io import read_params
  config = read_model_config(args.input)
  template = None
  if args.hf_config:
    try:
      with open(args.hf_config) as f:
        template = json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"--hf_config {args.hf_config}: not a readable JSON file ({e})") \
          from None
  check_structure(config)
  params, _ = read_params(os.path.join(args.input, PARAMS))
  files = write_hf_dir(args.out, config, params, template, args.dtype,
                       int(args.max_shard_gb * 2**30))
  copied = hf_lm.copy_tokenizer(args.input, args.out)
  note = ("; the model ran Meta's row mask here, transformers computes its own"
          if config.xattn.no_image == "skip" else "")
  print(f"wrote {args.out}/config.json and {len(files)} safetensors file(s) from "
        f"{args.input}/{MODEL_CONFIG}"
        + (f", tokenizer {', '.join(copied)}" if copied else "") + note)
  return 0
