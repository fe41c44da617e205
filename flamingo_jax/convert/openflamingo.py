"""OpenFlamingo checkpoints -> a flamingo_jax model directory.

  python -m flamingo_jax.convert openflamingo --input checkpoint.pt --lm BASE_LM
      --vision OPENCLIP.safetensors --cross_attn_every_n_layers N --tokenizer_dir TOK --out OUT

checkpoint.pt is OpenFlamingo's delta in either layout (with the
`gated_cross_attn_layers` aliases, or as its train script saves it), a raw state
dict or {"model_state_dict": ...}; BASE_LM the HF LM it was trained on; TOK its
tokenizer (or the base LM's), which gives the `<image>` / `<|endofchunk|>` ids and
is written to OUT. docs/checkpoints.md has the conventions. (--input and
--tokenizer_dir were --checkpoint and --tokenizer, still accepted for a release.)

Weights of OpenFlamingo / flamingo-pytorch modules -> our params. Both peers name
their Perceiver Resampler and gated cross-attention weights the same way
(OpenFlamingo started from flamingo-pytorch):

  resampler:  latents [n, d]; frame_embs [F, d]; media_time_embs [M, 1, d]
              (flamingo-pytorch: media_pos_emb [M, 1, d]); norm.{weight,bias};
              layers.{i}.0.{norm_media,norm_latents}.{weight,bias},
              layers.{i}.0.{to_q,to_kv,to_out}.weight;
              layers.{i}.1.{0: LayerNorm, 1: Linear up, 3: Linear down}
  xattn block: attn.norm, attn.{to_q,to_kv,to_out}.weight, attn_gate [1],
               ff.{0,1,3}, ff_gate [1]

torch Linear weights are [out, in]; ours are [in, out] (heads split out for
attention). Arrays come in as numpy; torch is imported only to read .pt files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Mapping

import numpy as np

from flamingo_jax.config import to_config_dict
from flamingo_jax.convert import hf_lm, weights_io
from flamingo_jax.convert.openclip import convert_vit
from flamingo_jax.convert.weights_io import StateDict
from flamingo_jax.errors import CheckpointError, DataError, UserError
from flamingo_jax.models.config import (FlamingoConfig, ResamplerConfig, ViTConfig, VisionConfig,
                                        XAttnConfig)

log = logging.getLogger(__name__)


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


def convert_resampler(tensors: Mapping[str, np.ndarray], config, prefix: str = "",
                      source: str = "") -> dict:
  """A peer PerceiverResampler state dict -> our `resampler` params.

  `config` is our ResamplerConfig configured like the peer (input_proj=False,
  gelu, ffw_mult, num_media_embeddings, temporal_embeddings/max_frames).
  """
  sd = StateDict(tensors, prefix, source)
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
                        visual_width: int, prefix: str = "", source: str = "") -> dict:
  """A peer GatedCrossAttentionBlock state dict -> our block params.

  `config` is our XAttnConfig configured like the peer (kv_layernorm=False,
  gelu, scalar gates); width is the LM width, visual_width the resampler's.
  """
  sd = StateDict(tensors, prefix, source)
  attn = _attention(sd, "attn", width, visual_width, config.num_heads, config.head_dim)
  attn["norm_query"] = _layernorm(sd, "attn.norm", width)
  norm, ffw = _ffw(sd, "ff", width, config.ffw_mult * width)
  params = {"attn": attn, "attn_gate": sd.get("attn_gate", (1,)),
            "norm_ffw": norm, "ffw": ffw, "ffw_gate": sd.get("ff_gate", (1,))}
  sd.check_all_used("gated cross-attention block")
  return params


# --------------------------------------------------------------------------
# A whole OpenFlamingo model: delta checkpoint.pt + base HF LM + OpenCLIP vision

# The LM's input embedding as OpenFlamingo names it (lang_encoder.<HF name>).
_EMBED_KEYS = ("lang_encoder.model.embed_tokens.weight",  # Llama
               "lang_encoder.transformer.wte.weight",  # MPT, mosaic_gpt, GPT-2
               "lang_encoder.gpt_neox.embed_in.weight")  # GPT-NeoX
# An untied output embedding, when the checkpoint has it: filter_state_dict_to_trainable
# keeps every name containing "embed", so GPT-NeoX's embed_out (transformers < 5) is saved.
_HEAD_KEYS = ("lang_encoder.embed_out.weight", "lang_encoder.lm_head.weight")
OPENFLAMINGO_HEADS, OPENFLAMINGO_HEAD_DIM = 8, 64  # fixed in OpenFlamingo's factory
# The two places a gated cross-attention block of LM layer i is saved under:
# the alias module list, and inside the FlamingoLayer that wraps decoder layer i
# (the only one left after the train script's filter_state_dict_to_trainable).
_ALIAS_XATTN = re.compile(r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)$")
_LAYER_XATTN = re.compile(r"^lang_encoder\.(.+)\.(\d+)\.gated_cross_attn_layer\.(.+)$")


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """An OpenFlamingo checkpoint.pt (a raw state dict, or the train script's
  {"model_state_dict": ..., "optimizer_state_dict": ...}) as float32 arrays;
  loaded with weights_only=True (never unpickles objects)."""
  return weights_io.torch_state_dict(path, ("model_state_dict",))


def gated_xattn_layers(checkpoint: Mapping[str, np.ndarray], source: str = "the OpenFlamingo "
                       "checkpoint") -> dict[int, dict[str, np.ndarray]]:
  """LM layer index -> that layer's gated cross-attention tensors (names relative to
  the block), from either layout; where a file holds both, they must agree."""
  layers: dict[int, dict[str, np.ndarray]] = {}
  origin: dict[tuple[int, str], str] = {}
  wrappers = set()
  for key, value in checkpoint.items():
    m = _ALIAS_XATTN.match(key)
    if m:
      i, name = int(m.group(1)), m.group(2)
    else:
      m = _LAYER_XATTN.match(key)
      if not m:
        continue
      wrappers.add(m.group(1))
      i, name = int(m.group(2)), m.group(3)
    block = layers.setdefault(i, {})
    if name in block:
      if not np.array_equal(np.asarray(block[name]), np.asarray(value)):
        first, second = sorted((origin[i, name], key))
        raise CheckpointError(f"{source}: tensors {first!r} and {second!r} hold the same "
                              "cross-attention weight but differ")
      continue
    block[name], origin[i, name] = value, key
  if len(wrappers) > 1:
    raise CheckpointError(f"{source}: gated cross-attention blocks are saved under several "
                          f"decoder layer lists {sorted(wrappers)}; expected one")
  return layers


def _output_embedding(checkpoint, lm_params: dict, lm_config, vocab: int, source: str):
  """[D, vocab] output kernel of an untied LM: the checkpoint's when it has one, else the
  base LM's resized to `vocab` as OpenFlamingo's resize_token_embeddings does (rows cut
  when the base matrix is larger, as RedPajama-INCITE's 50,432 > 50,280 tokens)."""
  key = next((k for k in _HEAD_KEYS if k in checkpoint), None)
  if key is not None:
    head = np.asarray(checkpoint[key], np.float32)
    if head.shape != (vocab, lm_config.width):
      raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(head.shape)}, expected "
                            f"({vocab}, {lm_config.width}) (the input embedding's vocabulary)")
    return head.T
  base = lm_params["unembed"]["kernel"]  # [D, V_base]
  if vocab <= base.shape[1]:
    return base[:, :vocab]
  # OpenFlamingo never saves the new output rows of an untied head (they stay at their
  # random initialisation): start them from the mean output row, as transformers' mean
  # resizing does.
  log.warning("%s has no output embedding for the %d rows the tokenizer added; using the "
              "mean of the base LM's rows (OpenFlamingo's are random and unsaved)", source,
              vocab - base.shape[1])
  extra = np.repeat(base.mean(axis=1, keepdims=True), vocab - base.shape[1], axis=1)
  return np.concatenate([base, extra], axis=1)


def _vit_config_from_weights(vision: Mapping[str, np.ndarray], activation: str,
                             num_heads: int | None, source: str):
  """Shapes from the weights; heads default to open_clip's width // 64 (not in the weights)."""
  prefix = "visual." if any(k.startswith("visual.") for k in vision) else ""
  needed = ("conv1.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight")
  for name in needed:
    if prefix + name not in vision:
      found = sorted(vision)[:3]
      raise CheckpointError(
          f"{source}: no tensor 'visual.{name}' (nor '{name}'): expected an OpenCLIP model's "
          f"state dict (\"visual.*\") or its vision tower's; the file holds {len(vision)} "
          f"tensors such as {found}")
  conv = np.asarray(vision[prefix + "conv1.weight"])
  width, patch = conv.shape[0], conv.shape[-1]
  blocks = prefix + "transformer.resblocks."
  depth = len({k[len(blocks):].split(".")[0] for k in vision if k.startswith(blocks)})
  grid = int(round((vision[prefix + "positional_embedding"].shape[0] - 1) ** 0.5))
  hidden = vision[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
  return ViTConfig(patch_size=patch, width=width, depth=depth,
                   num_heads=num_heads or max(width // 64, 1),
                   mlp_ratio=hidden / width, activation=activation), grid * patch, prefix


def convert_openflamingo(checkpoint: Mapping[str, np.ndarray], lm_dir: str,
                         vision: Mapping[str, np.ndarray], *, cross_attn_every_n_layers: int,
                         media_token_id: int, eoc_token_id: int,
                         vision_activation: str = "quick_gelu",
                         vision_heads: int | None = None,
                         checkpoint_source: str = "the OpenFlamingo checkpoint",
                         vision_source: str = "the vision weights"):
  """(FlamingoConfig, params) of an OpenFlamingo model.

  checkpoint: the delta OpenFlamingo saves (resampler, gated cross-attention,
  the resized input embeddings; an untied GPT-NeoX output embedding too), in
  either layout: with the `lang_encoder.gated_cross_attn_layers.*` aliases, or
  as the train script writes it, only under
  `lang_encoder.<decoder layers>.{i}.gated_cross_attn_layer.*`.
  lm_dir: the base HF LM directory; vision: the OpenCLIP model's state dict
  ("visual.*", or the bare tower). The vocabulary is the checkpoint's input
  embedding's (OpenFlamingo resizes the LM to its tokenizer, which may shrink a
  padded matrix). OpenFlamingo's conventions are carried into the config:
  cross-attention before LM block i where (i + 1) % N == 0, 8 x 64 heads, GELU,
  no K/V LayerNorm, zeroed attention for text before any image, the `<image>`
  token seeing its own image. *_source name the files in errors.
  """

  cfg_path = os.path.join(lm_dir, "config.json")
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"{lm_dir}: the base LM directory has no config.json")
  with open(cfg_path) as f:
    lm_config = hf_lm.lm_config_from_hf(json.load(f))
  lm_params = hf_lm.convert_state_dict(hf_lm.load_safetensors_dir(lm_dir), lm_config)
  src = checkpoint_source
  embed_key = next((k for k in _EMBED_KEYS if k in checkpoint), None)
  if embed_key is None:
    raise CheckpointError(f"{src}: no input embedding tensor (looked for {list(_EMBED_KEYS)}); "
                          f"is it an OpenFlamingo checkpoint? It holds {len(checkpoint)} "
                          f"tensors such as {sorted(checkpoint)[:3]}")
  embedding = np.asarray(checkpoint[embed_key], np.float32)
  vocab = embedding.shape[0]
  if embedding.shape[1:] != (lm_config.width,):
    raise CheckpointError(f"{src}: tensor {embed_key!r} has shape {tuple(embedding.shape)}, "
                          f"but the base LM in {lm_dir} is {lm_config.width} wide")
  for name, tid in (("media_token_id", media_token_id), ("eoc_token_id", eoc_token_id)):
    if not 0 <= tid < vocab:
      raise CheckpointError(f"{name}={tid} is outside the vocabulary of {vocab} of {src} "
                            f"(tensor {embed_key!r})")
  lm_config = dataclasses.replace(lm_config, vocab_size=vocab)
  lm_params["embedding"] = embedding  # OpenFlamingo trains the whole input matrix
  ids = np.array([media_token_id, eoc_token_id])
  params: dict = {"lm": lm_params, "new_token_embeddings": embedding[ids]}
  if not lm_config.tie_embeddings:
    kernel = _output_embedding(checkpoint, lm_params, lm_config, vocab, src)
    lm_params["unembed"] = {"kernel": kernel}
    params["new_token_unembeddings"] = kernel[:, ids].T

  vit_config, image_size, vision_prefix = _vit_config_from_weights(
      vision, vision_activation, vision_heads, vision_source)
  latents = checkpoint.get("perceiver.latents")
  if latents is None:
    raise CheckpointError(f"{src}: missing tensor 'perceiver.latents' (the Perceiver "
                          "Resampler's)")
  depth = len({k.split(".")[2] for k in checkpoint if k.startswith("perceiver.layers.")})
  resampler = ResamplerConfig(depth=depth, width=latents.shape[1], num_heads=OPENFLAMINGO_HEADS,
                              head_dim=OPENFLAMINGO_HEAD_DIM, num_latents=latents.shape[0],
                              activation="gelu", input_proj=False, temporal_embeddings=False)
  params["resampler"] = convert_resampler(
      {k: v for k, v in checkpoint.items() if k.startswith("perceiver.")}, resampler,
      prefix="perceiver.", source=src)
  xattn = XAttnConfig(every=cross_attn_every_n_layers, placement="openflamingo",
                      num_heads=OPENFLAMINGO_HEADS, head_dim=OPENFLAMINGO_HEAD_DIM,
                      activation="gelu", kv_layernorm=False, no_image="zero_attention")
  blocks = gated_xattn_layers(checkpoint, src)
  beyond = sorted(i for i in blocks if i >= lm_config.num_layers)
  if beyond:
    raise CheckpointError(f"{src}: has cross-attention for LM layer {beyond[0]}, but the base "
                          f"LM in {lm_dir} has {lm_config.num_layers} layers")
  for i in range(lm_config.num_layers):
    present = i in blocks
    expected = (i + 1) % cross_attn_every_n_layers == 0
    if present != expected:
      raise CheckpointError(
          f"{src}: cross-attention layer {i} is {'present' if present else 'missing'} in the "
          f"checkpoint, but cross_attn_every_n_layers={cross_attn_every_n_layers} says it "
          f"should {'' if expected else 'not '}exist")
    if expected:
      params[f"xattn_block_{i}"] = convert_gated_xattn(
          blocks[i], xattn, width=lm_config.width, visual_width=resampler.width,
          source=f"{src} (cross-attention layer {i})")
  params["vision"] = convert_vit(vision, vit_config, image_size, prefix=vision_prefix,
                                 source=vision_source)
  config = FlamingoConfig(
      vision=VisionConfig(name="vit", image_size=image_size, vit=vit_config),
      vision_feature_dim=vit_config.width, resampler=resampler, xattn=xattn, lm=lm_config,
      image_token_id=media_token_id, eoc_token_id=eoc_token_id)
  return config, params


# --------------------------------------------------------------------------
# CLI: python -m flamingo_jax.convert openflamingo ...


OPENFLAMINGO_NEW_TOKENS = ("<|endofchunk|>", "<image>")  # the factory's order
OPENFLAMINGO_PAD = "<PAD>"  # added when the tokenizer has no pad token


def openflamingo_tokenizer(path: str):
  """(HFTokenizer, tokenizer_config.json dict) of the tokenizer OpenFlamingo runs, from
  `path` (a tokenizer.json or a directory holding one): OpenFlamingo's own, or its base LM's, to which the tokens it lacks are added as OpenFlamingo's
  factory adds them (`<|endofchunk|>`, `<image>`, then `<PAD>` if there is no pad
  token). `add_bos_token` records whether OpenFlamingo feeds BOS: the source's
  `add_bos_token`, else whether its post-processor puts BOS before a text
  (GPT-NeoX / MPT: no)."""
  from tokenizers import AddedToken
  from tokenizers import Tokenizer as RawTokenizer

  from flamingo_jax.data.tokenizer import HFTokenizer, read_hf_tokenizer_files
  file, text, settings = read_hf_tokenizer_files(path)
  try:
    raw = RawTokenizer.from_str(text)
  except Exception as e:  # tokenizers raises its own Exception subclasses
    raise DataError(f"{file}: not a Hugging Face tokenizer.json ({e})") from None
  vocab = raw.get_vocab(with_added_tokens=True)
  missing = [t for t in OPENFLAMINGO_NEW_TOKENS if t not in vocab]
  if missing:
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
  pad = settings.get("pad_token")
  if pad is None or pad not in raw.get_vocab(with_added_tokens=True):
    raw.add_special_tokens([AddedToken(OPENFLAMINGO_PAD, special=True, normalized=False)])
    pad = OPENFLAMINGO_PAD
  tok = HFTokenizer(raw.to_str(), bos_token=settings.get("bos_token"),
                    eos_token=settings.get("eos_token"), pad_token=pad,
                    add_bos=settings.get("add_bos"), source=file)
  config = {"bos_token": raw.id_to_token(tok.info.bos_id),
            "eos_token": raw.id_to_token(tok.info.eos_id), "pad_token": pad,
            "add_bos_token": tok.add_bos, "add_eos_token": False}
  return tok, config


def write_tokenizer(out: str, tokenizer_json: str, tokenizer_config: dict) -> None:
  """OUT/tokenizer.json + OUT/tokenizer_config.json (what `Tokenizer.load(OUT)` reads)."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "tokenizer.json"), "w") as f:
    f.write(tokenizer_json)
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(tokenizer_config, f, indent=1)


def _token_ids(args):
  """(media, eoc, tokenizer files or None): from --tokenizer_dir when given (and checked
  against --media_token_id / --eoc_token_id), else from those flags."""
  given = {"media_token_id": args.media_token_id, "eoc_token_id": args.eoc_token_id}
  if not args.tokenizer_dir:
    missing = [f"--{k}" for k, v in given.items() if v is None]
    if missing:
      raise UserError(f"pass {' and '.join(missing)} (or --tokenizer_dir, OpenFlamingo's "
                      "tokenizer, to read them from)")
    return args.media_token_id, args.eoc_token_id, None
  tok, config = openflamingo_tokenizer(args.tokenizer_dir)
  found = {"media_token_id": tok.info.image_token_id, "eoc_token_id": tok.info.eoc_token_id}
  for key, value in given.items():
    if value is not None and value != found[key]:
      piece = "<image>" if key == "media_token_id" else "<|endofchunk|>"
      raise UserError(f"--{key}={value}, but the tokenizer {args.tokenizer_dir} gives {piece} id "
                      f"{found[key]}")
  return found["media_token_id"], found["eoc_token_id"], (tok.tokenizer_json, config)


def add_arguments(parser) -> None:
  # --input / --tokenizer_dir, as the other converters' --input and as nowhere else
  # --checkpoint (a model directory) and --tokenizer (a tokenizer file) mean.
  parser.add_argument("--input", help="OpenFlamingo checkpoint.pt (required): a state dict, "
                      "or the train script's {'model_state_dict': ...}")
  parser.add_renamed("--checkpoint", "--input")
  parser.add_argument("--lm", required=True, help="base HF LM directory (safetensors or "
                      "pytorch_model.bin)")
  parser.add_argument("--vision", required=True,
                      help="OpenCLIP weights (.safetensors, or a torch file loaded with "
                      "weights_only=True)")
  parser.add_argument("--cross_attn_every_n_layers", type=int, required=True)
  parser.add_argument("--tokenizer_dir", default=None,
                      help="OpenFlamingo's tokenizer, or its base LM's (a directory with "
                      "tokenizer.json): the ids of <image> and <|endofchunk|> are read from "
                      "it (tokens OpenFlamingo adds are added the same way) and it is written "
                      "to OUT, so generate / evaluate --checkpoint OUT feed OpenFlamingo's ids")
  parser.add_renamed("--tokenizer", "--tokenizer_dir")
  parser.add_argument("--media_token_id", type=int, default=None,
                      help="id of <image> (required without --tokenizer)")
  parser.add_argument("--eoc_token_id", type=int, default=None,
                      help="id of <|endofchunk|> (required without --tokenizer)")
  parser.add_argument("--vision_activation", default="quick_gelu",
                      help="quick_gelu for OpenAI-pretrained CLIP, gelu for open_clip's own")
  parser.add_argument("--out", required=True)


def main(args) -> int:
  if not args.input:
    raise UserError("convert openflamingo: --input is required (OpenFlamingo's checkpoint.pt)")
  media, eoc, tokenizer = _token_ids(args)
  checkpoint = load_torch_state_dict(args.input)
  vision = weights_io.read_weights(args.vision, ("state_dict", "model_state_dict"))
  config, params = convert_openflamingo(
      checkpoint, args.lm, vision, cross_attn_every_n_layers=args.cross_attn_every_n_layers,
      media_token_id=media, eoc_token_id=eoc, vision_activation=args.vision_activation,
      checkpoint_source=args.input, vision_source=args.vision)
  hf_lm.write_converted(args.out, params, to_config_dict(config).to_dict())
  if tokenizer is not None:
    write_tokenizer(args.out, *tokenizer)
  print(f"wrote the OpenFlamingo model to {args.out}/params and its model config to "
        f"{args.out}/model_config.json" + (" with its tokenizer" if tokenizer else "")
        + f" (<image> = {media}, <|endofchunk|> = {eoc}; load it with "
        f"configs/from_checkpoint.py:{args.out})")
  return 0
