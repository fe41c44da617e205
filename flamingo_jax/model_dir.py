"""The model directory: the one on-disk form of a whole Flamingo model.

  DIR/params             orbax params checkpoint (the unboxed tree Flamingo.init returns)
  DIR/model_config.json  the config's `model` section that produced it
  DIR/tokenizer.model    sentencepiece model (optional; or a Hugging Face DIR/tokenizer.json)

The converters (`flamingo_jax/convert`), the trainer's export and the demo
write it; `python -m flamingo_jax.generate` and `python -m flamingo_jax.evaluate`
read it with `load` (`--checkpoint DIR` in every CLI). Params are restored
straight into their target shardings: one device by default, or a mesh's tensor /
FSDP layout (`abstract_params(config, mesh, mesh_cfg)`), so no host ever needs the
whole tree on one device. Orbax is only used through `flamingo_jax.runtime.params_io`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from flamingo_jax.config import apply_overrides, with_defaults
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.errors import CheckpointError, DataError
from flamingo_jax.models.config import FlamingoConfig, model_config
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.runtime import params_io, sharding

log = logging.getLogger(__name__)

PARAMS = "params"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.model"
HF_TOKENIZER = "tokenizer.json"


class Model(NamedTuple):
  config: FlamingoConfig
  params: Any  # the unboxed Flamingo param tree
  tokenizer: Tokenizer


# ------------------------------------------------------------------------------ init


def init_inputs(config: FlamingoConfig, abstract: bool = False) -> dict:
  """The smallest inputs that create every parameter: tokens [1, 4] (one `<image>`)
  and images [1, 1, 1, S, S, 3], or visual_features [1, 1, 1, 4, C] for a model on
  precomputed features. abstract: ShapeDtypeStructs instead of arrays."""
  make = jax.ShapeDtypeStruct if abstract else jnp.zeros
  if config.vision.name == "none":
    width = config.vision_feature_dim or config.resampler.width
    visual = {"visual_features": make((1, 1, 1, 4, width), jnp.float32)}
  elif config.vision.name == "mllama":  # a tiled encoder: every tile of an image, its layout
    size, tiles = config.vision.image_size, config.vision.mllama.max_num_tiles
    visual = {"images": make((1, 1, tiles, size, size, 3), jnp.float32),
              "aspect_ratio_ids": (jax.ShapeDtypeStruct((1, 1), jnp.int32) if abstract
                                   else jnp.ones((1, 1), jnp.int32))}
  else:
    size = config.vision.image_size
    visual = {"images": make((1, 1, 1, size, size, 3), jnp.float32)}
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32) if abstract else \
      jnp.array([[1, config.image_token_id, 2, 3]], jnp.int32)
  return {"tokens": tokens, **visual}


def _init_fn(config: FlamingoConfig, boxed: bool = False):
  model = Flamingo(dataclasses.replace(config, remat="none"))
  inputs = init_inputs(config)
  tokens = inputs.pop("tokens")

  def init(rng):
    params = model.init(rng, tokens, **inputs)["params"]
    return params if boxed else nn.unbox(params)

  return init


def init_params(config: FlamingoConfig, seed: int = 0, abstract: bool = False):
  """Random params (or their ShapeDtypeStructs) of the unboxed Flamingo param tree."""
  init = _init_fn(config)
  if abstract:
    return jax.eval_shape(init, jax.random.key(seed))
  return jax.jit(init)(jax.random.key(seed))


def abstract_params(config: FlamingoConfig, mesh: Optional[Mesh] = None,
                    mesh_cfg: Optional[sharding.MeshConfig] = None):
  """ShapeDtypeStructs of the unboxed param tree carrying their target shardings (restore
  targets): the first local device, or `mesh` by the trainer's rules (tensor / FSDP /
  fallback, `sharding.param_specs` under mesh_cfg, default MeshConfig()). One abstract
  trace of the init: its boxes give the layout, their values the shapes."""
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        init_params(config, abstract=True))
  with jax.set_mesh(mesh):
    boxed = jax.eval_shape(_init_fn(config, boxed=True), jax.random.key(0))
  specs = sharding.param_specs(boxed, mesh, mesh_cfg or sharding.MeshConfig())
  return sharding.with_shardings(nn.unbox(boxed), sharding.named(mesh, specs))


# ------------------------------------------------------------------------------ tokenizer


def check_tokenizer(config: FlamingoConfig, tokenizer, what: str = "") -> None:
  """DataError when the tokenizer's `<image>`/`<EOC>` ids or vocabulary differ from
  the model's: the model would read the wrong rows and never see its images."""
  info = tokenizer.info
  problems = []
  for name, key, tok_id, model_id in (
      ("<image>", "image", info.image_token_id, config.image_token_id),
      ("<EOC>", "eoc", info.eoc_token_id, config.eoc_token_id)):
    if tok_id != model_id:
      problems.append(f"the tokenizer's {name} id is {tok_id} but model.{key}_token_id is "
                      f"{model_id}")
  if not problems and info.vocab_size > config.lm.vocab_size:
    problems.append(f"the tokenizer has {info.vocab_size} ids but the model's vocabulary "
                    f"(model.lm.vocab_size) is {config.lm.vocab_size}")
  if problems:
    raise DataError((f"{what}: " if what else "") + problems[0])


def tokenizer_path(directory: str, override: Optional[str] = None) -> str:
  """`override`, else DIR/tokenizer.model, else DIR/tokenizer.json (Hugging Face)."""
  if override:
    return override
  sp = os.path.join(directory, TOKENIZER)
  hf = os.path.join(directory, HF_TOKENIZER)
  return hf if not os.path.isfile(sp) and os.path.isfile(hf) else sp


def load_tokenizer(directory: str, config: FlamingoConfig, override: Optional[str] = None):
  """The directory's tokenizer (or `override`), checked against the model config."""
  path = tokenizer_path(directory, override)
  if not os.path.isfile(path):
    raise DataError(f"tokenizer {path!r} does not exist" + (
        "" if override else f": model directory {directory!r} lacks {TOKENIZER}; pass the "
        "model's sentencepiece model with --tokenizer"))
  tokenizer = Tokenizer.load(path)
  check_tokenizer(config, tokenizer, f"tokenizer {path!r} does not fit "
                  f"{os.path.join(directory, MODEL_CONFIG)}")
  return tokenizer


# ------------------------------------------------------------------------------ write


def write_model_dir(out_dir: str, params: Any, model_section: dict) -> str:
  """DIR/params + DIR/model_config.json (a `model` section as a plain dict); the
  converters' writer. Returns out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  params_io.save_params(os.path.join(out_dir, PARAMS), params)
  with open(os.path.join(out_dir, MODEL_CONFIG), "w") as f:
    json.dump(model_section, f, indent=1, default=list)
  return out_dir


def export_model_dir(out_dir: str, config: Any, params: Any,
                     tokenizer: Union[str, Any, None] = None) -> str:
  """Writes a whole model directory from params in memory; returns it.

  config: FlamingoConfig (or a config / `model` section); params: the unboxed
  Flamingo param tree (host arrays); tokenizer: a sentencepiece model path or
  a Tokenizer, copied to DIR/tokenizer.model (None: pass --tokenizer when
  loading). The tokenizer is checked against the config before anything is written.
  """
  config = model_config(config)
  tok = Tokenizer.load(tokenizer) if isinstance(tokenizer, str) else tokenizer
  if tok is not None:
    if not hasattr(tok, "model_proto"):
      raise DataError(f"export_model_dir: tokenizer {tokenizer!r} is not a sentencepiece "
                      "model; export without it and pass it with --tokenizer")
    check_tokenizer(config, tok, f"export_model_dir: tokenizer {tokenizer!r}")
  write_model_dir(out_dir, params, dataclasses.asdict(config))
  tok_path = os.path.join(out_dir, TOKENIZER)
  if tok is not None:
    with open(tok_path, "wb") as f:
      f.write(tok.model_proto)
  elif os.path.exists(tok_path):  # a previous export's, not checked against this config
    os.remove(tok_path)
  log.info("wrote model directory %s", out_dir)
  return out_dir


# ------------------------------------------------------------------------------ read


def read_model_config(directory: str, overrides: Sequence[str] = ()) -> FlamingoConfig:
  """DIR/model_config.json -> the validated FlamingoConfig (unknown keys are errors).

  overrides: `--config.model.KEY=VALUE` strings, applied to the file's dict (the keys
  it leaves out at their defaults) before it is parsed, e.g. model.dtype=bfloat16.
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"model directory {directory!r} does not exist")
  path = os.path.join(directory, MODEL_CONFIG)
  if not os.path.isfile(path):
    hint = (f"; {directory!r} looks like the params checkpoint itself: pass its parent "
            "directory" if os.path.basename(os.path.normpath(directory)) == PARAMS else "")
    raise CheckpointError(f"model directory {directory!r} lacks {MODEL_CONFIG} (the config's "
                          f"`model` section); export_model_dir and the converters write it"
                          + hint)
  try:
    with open(path) as f:
      section = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  return with_overrides(section, overrides)


def check_not_lm_only(directory: str) -> None:
  """For the CLIs that run a whole model (evaluate, generate): a `convert hf-lm` output (its
  model_config.json only an `lm` section; every export writes every section) is named as
  such, not read as a Flamingo with default vision and cross-attention."""
  try:
    with open(os.path.join(directory, MODEL_CONFIG)) as f:
      section = json.load(f)
  except (OSError, ValueError):
    return  # read_model_config names what is wrong
  if isinstance(section, dict) and set(section) == {"lm"}:
    raise CheckpointError(
        f"{directory!r} holds a language model alone (`convert hf-lm` output: no vision "
        "encoder, resampler or cross-attention); a Flamingo model directory is needed: train "
        f"one around it with --config configs/from_hf_lm.py:{directory} (docs/checkpoints.md)")


def with_overrides(section: Any, overrides: Sequence[str] = ()) -> FlamingoConfig:
  """A `model` section (dict / ConfigDict) with `--config.model.KEY=VALUE` overrides
  applied to it, the keys it leaves out at their defaults; validated."""
  if not overrides:
    return model_config(section)
  cfg = with_defaults(ml_collections.ConfigDict({"model": section}), {"model": FlamingoConfig()})
  return model_config(apply_overrides(cfg, overrides))


def load(directory: str, *, mesh: Optional[Mesh] = None,
         mesh_cfg: Optional[sharding.MeshConfig] = None,
         tokenizer: Union[str, Tokenizer, None] = None,
         config: Optional[FlamingoConfig] = None) -> Model:
  """A model directory's config, tokenizer and params, the params restored straight into
  their shardings (the first device, or `mesh` by mesh_cfg's rules); missing or misshapen
  tensors are named. The cheap checks (config, tokenizer) come before the params are read.

  tokenizer: a path or a Tokenizer (default DIR's), checked against the config;
  config: the model's config when the caller has read it already (read_model_config,
  e.g. with overrides; default DIR's).
  """
  if config is None:
    config = read_model_config(directory)
  if tokenizer is None or isinstance(tokenizer, str):
    tokenizer = load_tokenizer(directory, config, tokenizer)
  else:
    check_tokenizer(config, tokenizer, f"the tokenizer does not fit the model of {directory}")
  params_dir = os.path.join(directory, PARAMS)
  if not params_io.params_exist(params_dir):
    raise CheckpointError(f"model directory {directory!r} lacks {PARAMS}/ (the orbax params "
                          "checkpoint); export_model_dir and the converters write it")
  t0 = time.time()
  params = params_io.restore_params(params_dir, abstract_params(config, mesh, mesh_cfg),
                                    what=f"checkpoint {params_dir}")
  log.info("loaded %s in %.1f s", params_dir, time.time() - t0)
  return Model(config, params, tokenizer)


# ------------------------------------------------------------------------------ devices


def mesh_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """argv without its `--mesh.AXIS=N` flags, and those as `--config.mesh.AXIS=N` overrides:
  the shorthand of the CLIs that load a model directory onto a mesh."""
  rest, overrides = [], []
  for a in argv:
    if a.startswith("--mesh."):
      overrides.append("--config." + a[2:])
    else:
      rest.append(a)
  return rest, overrides


def device_mesh(section: Any) -> tuple[Optional[Mesh], Optional[sharding.MeshConfig]]:
  """(None, None) for an empty `mesh` section: one device. Else the mesh it describes and
  the section parsed (once: `load` and the placement take both)."""
  if not section:
    return None, None
  mesh_cfg = sharding.mesh_config(section)
  return sharding.make_mesh(mesh_cfg), mesh_cfg
