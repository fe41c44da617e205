"""NFNet weights from timm (`dm_nfnet_f*`) and DeepMind's Haiku checkpoints.

  python -m flamingo_jax.convert nfnet --source timm --input model.safetensors --out DIR
  python -m flamingo_jax.convert nfnet --source haiku --input F0_haiku.npz --out DIR

The output DIR is an orbax StandardCheckpointer checkpoint of the params pytree
(what `NFNet(config).apply({'params': params}, images)` takes); the config that
reproduces the source's numerics is stored in its custom metadata and printed.
The architecture (depths, widths, classes) is read from the checkpoint itself.

Conversion is a table, our path -> (source key, layout): the mapping is the
only model knowledge here; every tensor is checked against the shape our model
expects and a missing, unexpected or misshapen tensor is a ValueError naming it.

Source layouts relied on (docs/nfnet.md):
  timm  state dict of timm.models.nfnet.NormFreeNet: stem.conv{1..4},
        stages.{s}.{b}.{conv1,conv2,conv2b,conv3,downsample.conv,attn_last.fc1,
        attn_last.fc2,skipinit_gain}, final_conv, head.fc; conv weights OIHW,
        gains [O, 1, 1, 1], SE 1x1 convs [O, I, 1, 1], head.fc.weight [classes, D].
  haiku DeepMind deepmind-research/nfnets/nfnet.py module names: 'NFNet/~/stem_conv{i}',
        'NFNet/~/nf_block' then 'NFNet/~/nf_block_{i}' (i >= 1) with submodules
        '/~/conv0', 'conv1', 'conv1b', 'conv2', 'conv_shortcut',
        'squeeze_excite/~/linear', 'squeeze_excite/~/linear_1', the block's own
        'skip_gain', 'NFNet/~/final_conv', 'NFNet/~/linear'; convs HWIO 'w' with
        'gain' and 'bias' [O], linears 'w' [in, out] and 'b'.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pickle
import re
from typing import Any, Callable, Mapping, Optional

import numpy as np

from flamingo_jax.convert import weights_io
from flamingo_jax.models.config import NFNetConfig

HAIKU_PREFIX = "NFNet/~/"


# --------------------------------------------------------------------------
# Expected tree


def expected_shapes(config: NFNetConfig) -> dict[str, tuple[int, ...]]:
  """Flat 'a/b/c' path -> shape of every parameter of NFNet(config), via eval_shape."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from flamingo_jax.models.nfnet import NFNet

  model = NFNet(config)
  tree = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32)))
  return {path: tuple(leaf.shape) for path, leaf in
          flatten(nn.meta.unbox(tree["params"])).items()}


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


# --------------------------------------------------------------------------
# Layouts: how a source tensor becomes ours.
# Each layout maps our shape to the source shape and a source array to ours.


def _conv_oihw(shape):  # ours [kh, kw, I, O] <- torch [O, I, kh, kw]
  return (shape[3], shape[2], shape[0], shape[1]), lambda a: a.transpose(2, 3, 1, 0)


def _gain_o111(shape):  # ours [O] <- timm [O, 1, 1, 1]
  return (shape[0], 1, 1, 1), lambda a: a.reshape(shape)


def _linear_conv1x1(shape):  # ours [I, O] <- torch 1x1 conv [O, I, 1, 1]
  return (shape[1], shape[0], 1, 1), lambda a: a.reshape(shape[1], shape[0]).T


def _linear_oi(shape):  # ours [I, O] <- torch Linear [O, I]
  return (shape[1], shape[0]), lambda a: a.T


def _same(shape):
  return tuple(shape), lambda a: a


Layout = Callable[[tuple], tuple[tuple, Callable[[np.ndarray], np.ndarray]]]


def _block_map(config: NFNetConfig, block_name: Callable, sub: Mapping[str, tuple],
               top: Mapping[str, tuple]) -> dict[str, tuple[str, Layout]]:
  """our path -> (source key, layout), given source names for each part."""
  from flamingo_jax.models.nfnet import block_specs

  table = {}
  for ours, (src, layout) in top.items():
    table[ours] = (src, layout)
  for spec in block_specs(config):
    for ours, (src, layout) in sub.items():
      if ours.startswith("conv_shortcut/") and not spec.projection:
        continue
      table[f"block_{spec.index}/{ours}"] = (src.format(block=block_name(spec)), layout)
  return table


def timm_key_map(config: NFNetConfig) -> dict[str, tuple[str, Layout]]:
  """our param path -> (timm state-dict key, layout)."""
  top = {}
  for i in range(4):
    top.update(_conv_entries(f"stem_conv{i}", f"stem.conv{i + 1}", "timm"))
  if config.final_conv:
    top.update(_conv_entries("final_conv", "final_conv", "timm"))
  if config.num_classes:
    top["classifier/kernel"] = ("head.fc.weight", _linear_oi)
    top["classifier/bias"] = ("head.fc.bias", _same)
  sub = {}
  for ours, theirs in [("conv0", "conv1"), ("conv1", "conv2"), ("conv1b", "conv2b"),
                       ("conv2", "conv3"), ("conv_shortcut", "downsample.conv")]:
    sub.update(_conv_entries(ours, "{block}." + theirs, "timm"))
  for ours, theirs in [("se/fc0", "attn_last.fc1"), ("se/fc1", "attn_last.fc2")]:
    sub[f"{ours}/kernel"] = ("{block}." + theirs + ".weight", _linear_conv1x1)
    sub[f"{ours}/bias"] = ("{block}." + theirs + ".bias", _same)
  sub["skip_gain"] = ("{block}.skipinit_gain", _same)
  return _block_map(config, lambda s: f"stages.{s.stage}.{s.index - _stage_start(config, s.stage)}",
                    sub, top)


def haiku_key_map(config: NFNetConfig) -> dict[str, tuple[str, Layout]]:
  """our param path -> (flat Haiku key 'module/param', layout)."""
  top = {}
  for i in range(4):
    top.update(_conv_entries(f"stem_conv{i}", f"{HAIKU_PREFIX}stem_conv{i}", "haiku"))
  if config.final_conv:
    top.update(_conv_entries("final_conv", f"{HAIKU_PREFIX}final_conv", "haiku"))
  if config.num_classes:
    top["classifier/kernel"] = (f"{HAIKU_PREFIX}linear/w", _same)
    top["classifier/bias"] = (f"{HAIKU_PREFIX}linear/b", _same)
  sub = {}
  for name in ("conv0", "conv1", "conv1b", "conv2", "conv_shortcut"):
    sub.update(_conv_entries(name, "{block}/~/" + name, "haiku"))
  for ours, theirs in [("se/fc0", "linear"), ("se/fc1", "linear_1")]:
    sub[f"{ours}/kernel"] = ("{block}/~/squeeze_excite/~/" + theirs + "/w", _same)
    sub[f"{ours}/bias"] = ("{block}/~/squeeze_excite/~/" + theirs + "/b", _same)
  sub["skip_gain"] = ("{block}/skip_gain", _same)
  return _block_map(config, lambda s: HAIKU_PREFIX + _haiku_block(s.index), sub, top)


def _haiku_block(index: int) -> str:
  # Haiku names the first instance 'nf_block' and later ones 'nf_block_1', ...
  return "nf_block" if index == 0 else f"nf_block_{index}"


def _conv_entries(ours: str, theirs: str, source: str) -> dict[str, tuple[str, Layout]]:
  if source == "timm":
    return {f"{ours}/kernel": (f"{theirs}.weight", _conv_oihw),
            f"{ours}/gain": (f"{theirs}.gain", _gain_o111),
            f"{ours}/bias": (f"{theirs}.bias", _same)}
  return {f"{ours}/kernel": (f"{theirs}/w", _same),
          f"{ours}/gain": (f"{theirs}/gain", _same),
          f"{ours}/bias": (f"{theirs}/bias", _same)}


def _stage_start(config: NFNetConfig, stage: int) -> int:
  from flamingo_jax.models.nfnet import variant_depths
  return sum(variant_depths(config)[:stage])


def _head_keys(source: str) -> tuple[str, ...]:
  if source == "timm":
    return ("head.fc.weight", "head.fc.bias")
  return (f"{HAIKU_PREFIX}linear/w", f"{HAIKU_PREFIX}linear/b")


def convert(tensors: Mapping[str, np.ndarray], config: NFNetConfig, source: str,
            drop_head: bool = False) -> dict:
  """Source tensors -> our params pytree (nested dicts of float32 numpy arrays).

  drop_head: ignore the source's classifier (use with config.num_classes == 0).
  """
  if source not in ("timm", "haiku"):
    raise ValueError(f"unknown NFNet source {source!r}; expected 'timm' or 'haiku'")
  table = timm_key_map(config) if source == "timm" else haiku_key_map(config)
  shapes = expected_shapes(config)
  if set(table) != set(shapes):  # the table must cover our model exactly
    raise ValueError(f"internal: {source} key map and the model disagree on "
                     f"{sorted(set(table) ^ set(shapes))[:5]}")
  ignored = set(_head_keys(source)) if drop_head else set()
  used = {src for src, _ in table.values()}
  unexpected = sorted(set(tensors) - used - ignored)
  if unexpected:
    raise ValueError(f"unexpected {source} tensors (not part of NFNet with depths "
                     f"{_depths_str(config)}, num_classes={config.num_classes}): "
                     f"{_preview(unexpected)}")
  flat = {}
  for ours, (src, layout) in table.items():
    if src not in tensors:
      raise ValueError(f"missing {source} tensor {src!r} for parameter {ours!r} "
                       f"(expected shape {layout(shapes[ours])[0]})")
    source_shape, to_ours = layout(shapes[ours])
    array = np.asarray(tensors[src])
    if tuple(array.shape) != tuple(source_shape):
      raise ValueError(f"{source} tensor {src!r} for parameter {ours!r} has shape "
                       f"{tuple(array.shape)}, expected {tuple(source_shape)}")
    flat[ours] = np.array(to_ours(array.astype(np.float32)), order="C")
  return unflatten(flat)


def _depths_str(config):
  from flamingo_jax.models.nfnet import variant_depths
  return variant_depths(config)


def _preview(keys, n=8):
  more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
  return ", ".join(repr(k) for k in keys[:n]) + more


# --------------------------------------------------------------------------
# Architecture from a checkpoint


def _match_variant(depths: tuple[int, ...], variant: Optional[str]) -> tuple[str, Optional[tuple]]:
  from flamingo_jax.models.nfnet import VARIANTS
  if variant is not None:
    if variant not in VARIANTS:
      raise ValueError(f"unknown NFNet variant {variant!r}; expected one of {list(VARIANTS)}")
    if VARIANTS[variant]["depths"] != depths:
      raise ValueError(f"--variant {variant} has depths {VARIANTS[variant]['depths']} but the "
                       f"checkpoint has {depths}")
    return variant, None
  for name, v in VARIANTS.items():
    if v["depths"] == depths:
      return name, None
  return "F0", depths  # a custom model: depths override


def _shape(tensors, key, source):
  if key not in tensors:
    raise ValueError(f"missing {source} tensor {key!r}; is this an NFNet checkpoint?")
  return tuple(np.shape(tensors[key]))


def timm_config(tensors: Mapping[str, np.ndarray], variant: Optional[str] = None,
                drop_head: bool = False, **overrides) -> NFNetConfig:
  """The NFNetConfig of a timm state dict, with timm's numerics (exact GELU, timm WS)."""
  stage_blocks: dict[int, set] = {}
  for key in tensors:
    m = re.match(r"stages\.(\d+)\.(\d+)\.", key)
    if m:
      stage_blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  if sorted(stage_blocks) != [0, 1, 2, 3]:
    raise ValueError(f"timm state dict has stages {sorted(stage_blocks)}; NFNet has 4 "
                     f"(keys 'stages.<s>.<b>.*')")
  depths = tuple(len(stage_blocks[s]) for s in range(4))
  widths = tuple(_shape(tensors, f"stages.{s}.0.conv3.weight", "timm")[0] for s in range(4))
  stem = tuple(_shape(tensors, f"stem.conv{i}.weight", "timm")[0] for i in range(1, 5))
  mid_shape = _shape(tensors, "stages.0.0.conv2.weight", "timm")
  se_hidden = _shape(tensors, "stages.0.0.attn_last.fc1.weight", "timm")[0]
  final = "final_conv.weight" in tensors
  num_classes = 0
  if "head.fc.weight" in tensors and not drop_head:
    num_classes = _shape(tensors, "head.fc.weight", "timm")[0]
  name, depth_override = _match_variant(depths, variant)
  kwargs = dict(
      variant=name, depths=depth_override, widths=widths, stem_widths=stem,
      group_width=mid_shape[1], bottleneck_ratio=mid_shape[0] / widths[0],
      se_ratio=se_hidden / widths[0], activation="gelu", ws_style="timm",
      final_conv=final, num_classes=num_classes)
  if final:
    kwargs["final_conv_mult"] = _shape(tensors, "final_conv.weight", "timm")[0] // widths[-1]
  kwargs.update(overrides)
  return NFNetConfig(**kwargs)


def haiku_config(tensors: Mapping[str, np.ndarray], variant: Optional[str] = None,
                 drop_head: bool = False, **overrides) -> NFNetConfig:
  """The NFNetConfig of a flat Haiku checkpoint, with DeepMind's numerics.

  DeepMind's code used jax.nn.gelu's default tanh approximation and its own
  weight standardisation, so activation='gelu_tanh', ws_style='deepmind'.
  Stage boundaries are the blocks with a shortcut conv (the first block of
  each stage; stage 0's only when the stem width differs from widths[0]).
  """
  blocks = sorted({int(m.group(1) or 0) for key in tensors
                   for m in [re.match(rf"{re.escape(HAIKU_PREFIX)}nf_block(?:_(\d+))?/", key)]
                   if m})
  if not blocks or blocks != list(range(len(blocks))):
    raise ValueError("Haiku checkpoint has no consecutive 'NFNet/~/nf_block[_i]/...' "
                     "modules; is this an NFNet checkpoint?")
  starts = [i for i in blocks
            if f"{HAIKU_PREFIX}{_haiku_block(i)}/~/conv_shortcut/w" in tensors]
  if 0 not in starts:
    starts = [0] + starts
  if len(starts) != 4:
    raise ValueError(f"Haiku checkpoint has shortcut convs at blocks {starts}; expected "
                     "the first block of each of 4 stages")
  ends = starts[1:] + [len(blocks)]
  depths = tuple(e - s for s, e in zip(starts, ends))

  def conv(i, name):
    return _shape(tensors, f"{HAIKU_PREFIX}{_haiku_block(i)}/~/{name}/w", "haiku")

  widths = tuple(conv(s, "conv2")[-1] for s in starts)
  stem = tuple(_shape(tensors, f"{HAIKU_PREFIX}stem_conv{i}/w", "haiku")[-1] for i in range(4))
  mid_shape = conv(0, "conv1")
  se_hidden = _shape(tensors, f"{HAIKU_PREFIX}nf_block/~/squeeze_excite/~/linear/w", "haiku")[-1]
  final = f"{HAIKU_PREFIX}final_conv/w" in tensors
  num_classes = 0
  if f"{HAIKU_PREFIX}linear/w" in tensors and not drop_head:
    num_classes = _shape(tensors, f"{HAIKU_PREFIX}linear/w", "haiku")[-1]
  name, depth_override = _match_variant(depths, variant)
  kwargs = dict(
      variant=name, depths=depth_override, widths=widths, stem_widths=stem,
      group_width=mid_shape[2], bottleneck_ratio=mid_shape[3] / widths[0],
      se_ratio=se_hidden / widths[0], activation="gelu_tanh", ws_style="deepmind",
      final_conv=final, num_classes=num_classes)
  if final:
    kwargs["final_conv_mult"] = _shape(tensors, f"{HAIKU_PREFIX}final_conv/w", "haiku")[-1] \
        // widths[-1]
  kwargs.update(overrides)
  return NFNetConfig(**kwargs)


# --------------------------------------------------------------------------
# Reading files


def load_timm_state_dict(path: str) -> dict[str, np.ndarray]:
  """A timm state dict from .safetensors (bfloat16 included), or a torch file (torch
  imported lazily; "state_dict_ema" / "state_dict" / "model" wrappers unwrapped).
  Truncated or foreign files are CheckpointErrors naming the file (weights_io)."""
  if not os.path.isfile(path):
    raise ValueError(f"timm checkpoint {path!r} does not exist")
  return weights_io.read_weights(path, ("state_dict_ema", "state_dict", "model"))


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles nested dicts of numpy arrays and nothing else (no code runs)."""
  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
      ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
  }

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise ValueError(
        f"the Haiku checkpoint pickles a {module}.{name}, not plain dicts of numpy arrays; "
        "re-save it as a flat .npz (see docs/nfnet.md)")


def load_haiku_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Flat {'module/param': array} from a DeepMind NFNet checkpoint.

  Accepts a real .npz with flat keys ('NFNet/~/stem_conv0/w'), or the pickled
  nested dict {module: {param: array}} that DeepMind's F*_haiku.npz files hold
  (written with dill, read by their colab with dill.load). Pickles are read with
  an unpickler that only rebuilds dicts and numpy arrays.
  """
  if not os.path.isfile(path):
    raise ValueError(f"Haiku checkpoint {path!r} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  if data[:2] == b"PK":  # a zip: numpy .npz
    import zipfile
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: np.asarray(npz[k], np.float32) for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
      raise ValueError(f"{path!r}: not a readable .npz (truncated? {e})") from None
  try:
    obj = _ArrayUnpickler(io.BytesIO(data)).load()
  except (pickle.UnpicklingError, EOFError) as e:
    raise ValueError(f"{path!r} is neither an .npz nor a pickled Haiku params dict: {e}") from e
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a Haiku params mapping")
  out = {}
  for module, params in obj.items():
    if not isinstance(params, Mapping):
      raise ValueError(f"Haiku module {module!r} in {path!r} maps to a "
                       f"{type(params).__name__}, not {{param: array}}")
    for name, value in params.items():
      out[f"{module}/{name}"] = np.asarray(value, np.float32)
  return out


# --------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--source", required=True, choices=("timm", "haiku"),
                      help="timm dm_nfnet_* state dict, or DeepMind's Haiku F*_haiku.npz")
  parser.add_argument("--input", required=True, help="checkpoint file to read")
  parser.add_argument("--out", required=True, help="orbax checkpoint directory to write")
  parser.add_argument("--variant", default=None,
                      help="F0..F7; checked against the checkpoint (default: inferred)")
  parser.add_argument("--no-head", action="store_true",
                      help="drop the ImageNet classifier (num_classes=0), as Flamingo uses")
  parser.add_argument("--force", action="store_true", help="overwrite --out")


def main(args: argparse.Namespace) -> int:
  if args.source == "timm":
    tensors = load_timm_state_dict(args.input)
    config = timm_config(tensors, args.variant, drop_head=args.no_head)
  else:
    tensors = load_haiku_checkpoint(args.input)
    config = haiku_config(tensors, args.variant, drop_head=args.no_head)
  params = convert(tensors, config, args.source, drop_head=args.no_head)
  save_params(params, args.out, config, args.source, force=args.force)
  count = sum(int(np.prod(v.shape)) for v in flatten(params).values())
  overrides = config_overrides(config)
  print(f"wrote {count:,} NFNet parameters from {args.source} {args.input} to {args.out}")
  print(f"use model.vision.nfnet = {json.dumps(overrides)}")
  return 0


def config_overrides(config: NFNetConfig) -> dict:
  """The fields of config that differ from NFNetConfig's defaults."""
  default = NFNetConfig()
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
          if getattr(config, f.name) != getattr(default, f.name)}


def save_params(params: Mapping, out: str, config: NFNetConfig, source: str,
                force: bool = False) -> None:
  """Writes params with orbax StandardCheckpointer; the config goes in its metadata."""
  from flamingo_jax.runtime import params_io

  out = os.path.abspath(out)
  if os.path.exists(out) and not force:
    raise ValueError(f"output directory {out!r} exists; pass --force to overwrite")
  params_io.save_params(out, params, {"nfnet_config": dataclasses.asdict(config),
                                       "source": source})


def load_converted(path: str) -> tuple[dict, NFNetConfig]:
  """(params, config) of a directory written by `save_params` / the CLI."""
  from flamingo_jax.runtime.params_io import read_params

  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"converted NFNet checkpoint {path!r} does not exist")
  params, meta = read_params(path)
  if "nfnet_config" not in meta:
    raise ValueError(f"{path!r} has no 'nfnet_config' in its metadata; not written by "
                     "flamingo_jax.convert nfnet")
  fields = {f.name for f in dataclasses.fields(NFNetConfig)}
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in meta["nfnet_config"].items() if k in fields}
  return params, NFNetConfig(**kwargs)
