"""Llama 3.2 Vision (transformers' `mllama`, local files) -> our Flamingo model.

mllama is a Flamingo: a frozen Llama 3.1 with gated cross-attention layers. Each
of its conventions is a config option, so the converted model computes its logits:

  LM          Llama 3.1 (llama3 rope scaling): HF's merged layer list without the
              cross-attention layers. embed_tokens has vocab_size + 8 rows: the
              LM keeps the first vocab_size (lm.embedding_rows), the 8 trainable
              rows (`<|image|>` = vocab_size the first) are
              `new_token_extra_embeddings` (model.extra_token_rows); lm_head has
              vocab_size rows, so those ids are never emitted.
  xattn       MllamaCrossAttentionDecoderLayer at merged index c_k is our block
              before LM block c_k - k (placement "explicit",
              config.mllama_layer_indices): RMSNorm pre-norms, the LM's GQA
              heads (xattn.num_kv_heads), no rotary, per-head RMSNorm of queries
              and keys (qk_norm), no norm of the visual tokens, the LM's SwiGLU
              MLP at full width, scalar tanh gates.
  masking     a token sees the image of the last `<|image|>` at or before it and,
              when that token ends a run of consecutive `<|image|>` tokens, the
              run's earlier images too (attend_previous "group"); padded tiles
              are hidden (the model's `tile_mask`): the cross_attention_mask
              MllamaProcessor builds.
  row mask    text with no image: row_mask "transformers" (attention over every
              visual token unmasked, FFW output zeroed: no_image "attend_all") or
              "meta" (attention and FFW outputs zeroed: the identity, no_image
              "skip"); they differ for text before the first image and for
              text-only rows batched with image rows (transformers issue #39379).
  projector   multi_modal_projector, Linear(vision_output_dim -> width, bias):
              resampler kind "linear"; an image's T tiles of P tokens are its
              T * P visual tokens.
  vision      MllamaVisionModel: vision encoder "mllama" (models/mllama_vision.py);
              the model takes images [B, N, T, H, W, 3] with aspect_ratio_ids
              [B, N] and tile_mask [B, N, T], or precomputed visual_features
              [B, N, T, P, vision_output_dim] (the tower's output) and tile_mask.

Both key layouts load: the hub's (`language_model.model.*`,
`language_model.lm_head.*`, `multi_modal_projector.*`, `vision_model.*`) and
transformers >= 4.52's (`model.language_model.*`, `lm_head.*`,
`model.multi_modal_projector.*`, `model.vision_model.*`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from flamingo_jax.config import to_config_dict
from flamingo_jax.convert import hf_lm, weights_io
from flamingo_jax.convert.weights_io import StateDict
from flamingo_jax.errors import CheckpointError
from flamingo_jax.models.config import (MLLAMA_ASPECT_RATIOS, FlamingoConfig,
                                        MllamaVisionConfig, ResamplerConfig, VisionConfig,
                                        XAttnConfig, mllama_layer_indices, validate)

ROW_MASKS = {"transformers": "attend_all", "meta": "skip"}
EXTRA_ROWS = 8  # MllamaTextModel's embed_tokens: vocab_size + 8 rows
# transformers >= 4.52 prefix -> the hub's
_RENAMES = (("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.vision_model.", "vision_model."))


def canonical_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Either key layout -> the hub's (`language_model.model.*`, ...)."""
  out = {}
  for name, value in tensors.items():
    for new, old in _RENAMES:
      if name.startswith(new):
        name = old + name[len(new):]
        break
    if name in out:
      raise CheckpointError(f"tensor {name!r} appears in both the hub and the transformers "
                            ">= 4.52 key layouts")
    out[name] = value
  return out


def _text_config(hf: Mapping) -> Mapping:
  text = hf.get("text_config")
  if not isinstance(text, Mapping):
    raise CheckpointError("mllama config.json has no text_config")
  return text


def flamingo_config(hf: Mapping, row_mask: str = "transformers") -> FlamingoConfig:
  """Our FlamingoConfig of an mllama config.json dict (MllamaConfig.to_dict())."""
  if row_mask not in ROW_MASKS:
    raise ValueError(f"row_mask must be one of {sorted(ROW_MASKS)}, got {row_mask!r}")
  text = _text_config(hf)
  vision = hf.get("vision_config") or {}
  total = int(text["num_hidden_layers"])
  cross = sorted(int(c) for c in text.get("cross_attention_layers") or ())
  vocab = int(text["vocab_size"])
  lm = hf_lm.lm_config_from_hf(dict(text, model_type="llama", num_hidden_layers=total - len(cross)))
  lm = dataclasses.replace(lm, vocab_size=vocab + EXTRA_ROWS, embedding_rows=vocab)
  image_token = int(hf.get("image_token_index", hf.get("image_token_id", vocab)))
  eos = text.get("eos_token_id", vocab - 1)
  eos = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
  vc = vision_config(hf)
  out_dim = vc.mllama.width * (1 + len(vc.mllama.intermediate_layers))
  if int(vision.get("vision_output_dim", out_dim)) != out_dim:
    raise CheckpointError(f"mllama vision_config.vision_output_dim "
                          f"{vision.get('vision_output_dim')} != hidden_size x (1 + "
                          f"{len(vc.mllama.intermediate_layers)} intermediate layers) = {out_dim}")
  config = FlamingoConfig(
      vision=vc, vision_feature_dim=out_dim,
      resampler=ResamplerConfig(kind="linear", width=lm.width, use_bias=True,
                                temporal_embeddings=False, num_media_embeddings=0),
      xattn=XAttnConfig(
          kind="gated_dense", placement="explicit",
          layers=mllama_layer_indices(cross, lm.num_layers), num_heads=lm.num_heads,
          head_dim=lm.head_dim, num_kv_heads=lm.num_kv_heads, ffw_dim=lm.ffw_dim,
          activation="swiglu", gating="tanh", gate_shape="scalar", attend_previous="group",
          no_image=ROW_MASKS[row_mask], query_layernorm=True, kv_layernorm=False,
          ffw_layernorm=True, norm="rmsnorm", qk_norm=True, use_bias=False,
          layernorm_eps=lm.norm_eps, gate_init="zeros"),
      lm=lm, image_token_id=image_token, eoc_token_id=eos,
      train_new_token_embeddings=False, extra_token_rows=EXTRA_ROWS,
      frozen=("vision", "lm"), no_weight_decay=())
  validate(config)
  return config


def vision_config(hf: Mapping) -> VisionConfig:
  """model.vision (name "mllama") of an mllama config.json's vision_config."""
  v = hf.get("vision_config") or {}
  act = v.get("hidden_act", "gelu")
  if act != "gelu":
    raise CheckpointError(f"mllama vision_config.hidden_act {act!r} is not supported (gelu)")
  size = v.get("image_size", 448)
  size = int(size[0] if isinstance(size, (list, tuple)) else size)
  patch = v.get("patch_size", 14)
  patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
  ratios = v.get("supported_aspect_ratios") or MLLAMA_ASPECT_RATIOS
  return VisionConfig(name="mllama", image_size=size, mllama=MllamaVisionConfig(
      patch_size=patch, width=int(v.get("hidden_size", 1280)),
      depth=int(v.get("num_hidden_layers", 32)), global_depth=int(v.get("num_global_layers", 8)),
      num_heads=int(v.get("attention_heads", v.get("num_attention_heads", 16))),
      mlp_dim=int(v.get("intermediate_size", 5120)), activation="gelu",
      layernorm_eps=float(v.get("norm_eps", 1e-5)),
      max_num_tiles=int(v.get("max_num_tiles", 4)),
      aspect_ratios=tuple((int(a), int(b)) for a, b in ratios),
      intermediate_layers=tuple(int(i) for i in v.get("intermediate_layers_indices",
                                                      (3, 7, 15, 23, 30)))))


def convert_vision(sd: StateDict, vision: VisionConfig, prefix: str = "vision_model.") -> dict:
  """MllamaVisionModel tensors -> `models.mllama_vision.MllamaVisionEncoder` params."""
  c = vision.mllama
  d, p, h, t = c.width, c.patch_size, c.num_heads, c.max_num_tiles
  dh, r = d // h, len(c.aspect_ratios) + 1
  n = (vision.image_size // p) ** 2 + 1
  g = lambda name, shape=None: sd.get(prefix + name, shape)  # noqa: E731
  ln = lambda name: {"scale": g(name + ".weight", (d,)), "bias": g(name + ".bias", (d,))}  # noqa

  def block(pre: str, gated: bool) -> dict:
    out = {"ln_1": ln(pre + "input_layernorm"), "ln_2": ln(pre + "post_attention_layernorm"),
           "out": {"kernel": g(pre + "self_attn.o_proj.weight", (d, d)).T.reshape(h, dh, d)},
           "mlp": {"up": {"kernel": g(pre + "mlp.fc1.weight", (c.mlp_dim, d)).T,
                          "bias": g(pre + "mlp.fc1.bias", (c.mlp_dim,))},
                   "down": {"kernel": g(pre + "mlp.fc2.weight", (d, c.mlp_dim)).T,
                            "bias": g(pre + "mlp.fc2.bias", (d,))}}}
    for name, proj in (("query", "q"), ("key", "k"), ("value", "v")):
      out[name] = {"kernel": _heads_in(g(pre + f"self_attn.{proj}_proj.weight", (d, d)), h, dh)}
    if gated:
      out["attn_gate"] = g(pre + "gate_attn", (1,))
      out["ffw_gate"] = g(pre + "gate_ffn", (1,))
    return out

  params = {
      "patch_embed": {"kernel": g("patch_embedding.weight", (d, 3, p, p)).transpose(
          2, 3, 1, 0).reshape(p * p * 3, d)},
      "class_embedding": g("class_embedding", (d,)),
      "pre_tile_embedding": g("pre_tile_positional_embedding.embedding.weight", (r, t * d)),
      "pre_tile_gate": g("pre_tile_positional_embedding.gate", (1,)),
      "positional_embedding": g("gated_positional_embedding.embedding", (n, d)),
      "positional_gate": g("gated_positional_embedding.gate", (1,)),
      "tile_positional_embedding": g("gated_positional_embedding.tile_embedding.weight",
                                     (r, t * n * d)),
      "post_tile_embedding": g("post_tile_positional_embedding.embedding.weight", (r, t * d)),
      "post_tile_gate": g("post_tile_positional_embedding.gate", (1,)),
      "ln_pre": ln("layernorm_pre"), "ln_post": ln("layernorm_post"),
  }
  for i in range(c.depth):
    params[f"blocks_{i}"] = block(f"transformer.layers.{i}.", False)
  for i in range(c.global_depth):
    params[f"global_blocks_{i}"] = block(f"global_transformer.layers.{i}.", True)
  return params


def _heads_in(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
  """torch Linear weight [H * Dh, D_in] -> our HeadProjection kernel [D_in, H, Dh]."""
  return w.T.reshape(w.shape[1], heads, head_dim)


def convert_cross_layer(sd: StateDict, i: int, x: XAttnConfig, width: int) -> dict:
  """language_model.model.layers.{i}.* (a cross-attention layer) -> our
  `models.xattn.GatedCrossAttentionBlock` params."""
  h, hkv, dh, ff = x.num_heads, x.num_kv_heads or x.num_heads, x.head_dim, x.ffw_dim
  b = f"language_model.model.layers.{i}."
  scale = lambda name, d: {"scale": sd.get(b + name, (d,))}  # noqa: E731
  attn = {"norm_query": scale("input_layernorm.weight", width),
          "query": {"kernel": _heads_in(sd.get(b + "cross_attn.q_proj.weight", (h * dh, width)),
                                        h, dh)},
          "key": {"kernel": _heads_in(sd.get(b + "cross_attn.k_proj.weight", (hkv * dh, width)),
                                      hkv, dh)},
          "value": {"kernel": _heads_in(sd.get(b + "cross_attn.v_proj.weight",
                                               (hkv * dh, width)), hkv, dh)},
          "out": {"kernel": sd.get(b + "cross_attn.o_proj.weight", (width, h * dh)).T.reshape(
              h, dh, width)},
          "query_norm": scale("cross_attn.q_norm.weight", dh),
          "key_norm": scale("cross_attn.k_norm.weight", dh)}
  return {
      "attn": attn,
      "attn_gate": sd.get(b + "cross_attn_attn_gate", (1,)),
      "norm_ffw": scale("post_attention_layernorm.weight", width),
      "ffw": {"gate": {"kernel": sd.get(b + "mlp.gate_proj.weight", (ff, width)).T},
              "up": {"kernel": sd.get(b + "mlp.up_proj.weight", (ff, width)).T},
              "down": {"kernel": sd.get(b + "mlp.down_proj.weight", (width, ff)).T}},
      "ffw_gate": sd.get(b + "cross_attn_mlp_gate", (1,)),
  }


_SELF_LAYER = tuple(f"self_attn.{p}_proj.weight" for p in "qkvo") + tuple(
    f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")) + (
        "input_layernorm.weight", "post_attention_layernorm.weight")


def convert_mllama(tensors: Mapping[str, np.ndarray], hf: Mapping, *,
                   row_mask: str = "transformers",
                   source: str = "") -> tuple[FlamingoConfig, dict[str, Any]]:
  """(FlamingoConfig, params) of an mllama state dict (either key layout) and its
  config.json dict. source: the directory, named in tensor errors, which name the
  tensors as the input does."""
  try:
    return _convert(tensors, hf, row_mask, source)
  except CheckpointError as e:
    if not any(k.startswith(new) for k in tensors for new, _ in _RENAMES[:1]):
      raise
    message = str(e)
    for new, old in _RENAMES:  # back to transformers >= 4.52's names
      message = message.replace(f"'{old}", f"'{new}")
    raise CheckpointError(message) from None


def _convert(tensors, hf, row_mask, source):
  config = flamingo_config(hf, row_mask)
  lm, x = config.lm, config.xattn
  sd = StateDict(canonical_names(tensors), source=source)
  text = _text_config(hf)
  cross = sorted(int(c) for c in text.get("cross_attention_layers") or ())
  total, vocab, d = lm.num_layers + len(cross), lm.embedding_rows, lm.width

  embed = sd.get("language_model.model.embed_tokens.weight", (vocab + EXTRA_ROWS, d))
  lm_tensors = {"model.embed_tokens.weight": embed[:vocab],
                "model.norm.weight": sd.get("language_model.model.norm.weight", (d,)),
                "lm_head.weight": sd.get("language_model.lm_head.weight", (vocab, d))}
  self_layers = [i for i in range(total) if i not in set(cross)]
  for j, i in enumerate(self_layers):  # merged index i -> LM block j
    pre = f"language_model.model.layers.{i}."
    for name in _SELF_LAYER:  # others stay unused: the error names them as they are
      lm_tensors[f"model.layers.{j}." + name] = sd.get(pre + name)
  lm_config = dataclasses.replace(lm, vocab_size=vocab, embedding_rows=0)
  params: dict[str, Any] = {"lm": hf_lm.convert_state_dict(lm_tensors, lm_config),
                            "new_token_extra_embeddings": embed[vocab:]}
  for k, i in enumerate(cross):
    params[f"xattn_block_{x.layers[k]}"] = convert_cross_layer(sd, i, x, d)
  params["resampler"] = {"projection": {
      "kernel": sd.get("multi_modal_projector.weight", (d, config.vision_feature_dim)).T,
      "bias": sd.get("multi_modal_projector.bias", (d,))}}
  params["vision"] = convert_vision(sd, config.vision)
  sd.check_all_used("mllama checkpoint")
  return config, params


def load_mllama(path: str, **kwargs) -> tuple[FlamingoConfig, dict[str, Any]]:
  """(FlamingoConfig, params) of a local mllama directory (config.json + safetensors,
  sharded with model.safetensors.index.json or not)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"{path!r} has no config.json")
  with open(cfg_path) as f:
    hf = json.load(f)
  if hf.get("model_type") != "mllama":
    raise CheckpointError(f"{cfg_path}: model_type is {hf.get('model_type')!r}, not 'mllama'")
  return convert_mllama(weights_io.load_hf_weights_dir(path), hf, source=path, **kwargs)


# --------------------------------------------------------------------------
# CLI: python -m flamingo_jax.convert mllama --input DIR --out OUT


def add_arguments(parser) -> None:
  parser.add_argument("--input", required=True, help="mllama model directory (config.json + "
                      "safetensors, sharded or not; either key layout)")
  parser.add_argument("--out", required=True, help="directory to write")
  parser.add_argument("--row_mask", choices=sorted(ROW_MASKS), default="transformers",
                      help="text with no image: transformers (its logits: attention over "
                      "every image, FFW masked) or meta (Meta's reference: the block is the "
                      "identity); transformers issue #39379")


def main(args) -> int:
  config, params = load_mllama(args.input, row_mask=args.row_mask)
  hf_lm.write_converted(args.out, params, to_config_dict(config).to_dict())
  copied = hf_lm.copy_tokenizer(args.input, args.out)
  print(f"wrote the mllama model to {args.out}/params and its model "
        f"config to {args.out}/model_config.json (<|image|> = {config.image_token_id}, row "
        f"mask {args.row_mask}"
        + (f"; tokenizer: {', '.join(copied)}" if copied else "; no tokenizer files") + ")")
  return 0
