"""Config machinery: ConfigDict <-> frozen dataclass (the dataclasses are the schema, so an
unknown or misspelled key or a wrong type fails with an error naming the key), config files
(`configs/*.py` exposing `get_config(arg=None)`), `--config.a.b=value` overrides and section
defaults. The model schema is flamingo_jax/models/config.py; each other section's dataclass
lives with the code that reads it.
"""
from __future__ import annotations

import ast
import collections.abc
import copy
import dataclasses
import importlib.util
import inspect
import os
import re
import typing
from typing import Any, Optional, Sequence

import ml_collections

from flamingo_jax.errors import ConfigError


def check(cond: bool, msg: str) -> None:
  """Raises ConfigError(msg) unless cond: the one-line form every section's validation uses."""
  if not cond:
    raise ConfigError(msg)


def choice(value, choices, key: str) -> None:
  check(value in choices, f"config key {key!r} is {value!r}; expected one of {list(choices)}")


# --------------------------------------------------------------------------
# ConfigDict <-> dataclass


def _fields(cls) -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(cls)}


def to_config_dict(obj) -> ml_collections.ConfigDict:
  """A dataclass (and nested ones) as a ConfigDict with the same keys."""
  out = {}
  for name in _fields(type(obj)):
    value = getattr(obj, name)
    if isinstance(value, typing.Mapping):  # a dict of sections (data.datasets, eval.tasks)
      value = {k: to_config_dict(v) if dataclasses.is_dataclass(v) else v
               for k, v in value.items()}
    out[name] = to_config_dict(value) if dataclasses.is_dataclass(value) else value
  return ml_collections.ConfigDict(out)


def from_config_dict(cls, cfg: Any, prefix: str = "model"):
  """Builds dataclass `cls` from a ConfigDict/dict, rejecting unknown keys.

  Nested dataclass fields are sections, `Mapping[str, Section]` fields dicts of sections
  (`data.datasets.NAME`, `eval.tasks.NAME`), each key's errors naming its full path.
  """
  if dataclasses.is_dataclass(cfg):
    cfg = to_config_dict(cfg)
  items = cfg.items() if hasattr(cfg, "items") else None
  if items is None:
    raise ConfigError(f"config {prefix!r} must be a mapping, got {type(cfg).__name__}")
  fields = _fields(cls)
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for key, value in items:
    path = f"{prefix}.{key}"
    if key not in fields:
      raise ConfigError(
          f"unknown config key {path!r}; valid keys under {prefix!r}: "
          f"{', '.join(sorted(fields))}")
    hint = hints[key]
    if dataclasses.is_dataclass(hint):
      kwargs[key] = from_config_dict(hint, value, path)
    else:
      kwargs[key] = _coerce(value, hint, path)
  return cls(**kwargs)


def _coerce(value, hint, path):
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if origin is typing.Union and type(None) in args:  # Optional[X]
    if value is None:
      return None
    (hint,) = [a for a in args if a is not type(None)]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (dict, typing.Mapping, collections.abc.Mapping) or hint in (dict, typing.Mapping):
    if not args:  # a bare dict / Mapping: any values
      args = (str, typing.Any)
    if not hasattr(value, "items"):
      raise ConfigError(f"config key {path!r} must map names to "
                        f"{getattr(args[1], '__name__', args[1])}, got {value!r}")
    return {str(k): (from_config_dict(args[1], v, f"{path}.{k}")
                     if dataclasses.is_dataclass(args[1]) else _coerce(v, args[1], f"{path}.{k}"))
            for k, v in value.items()}
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"config key {path!r} must be a sequence, got {value!r}")
    return tuple(_coerce(v, args[0], path) for v in value)
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint in (int, float, str, bool) and not isinstance(value, hint) or (
      hint is int and isinstance(value, bool)):
    raise ConfigError(
        f"config key {path!r} must be {hint.__name__}, got {value!r}")
  return value


# --------------------------------------------------------------------------
# Config files (`configs/*.py` exposing `get_config(arg=None)`) and
# `--config.a.b=value` overrides, with errors that name the bad key


def configs_dir() -> str:
  """The configs/ folder apps (demo, ablations) load: the copy a wheel ships as
  flamingo_jax/configs (setup.py package_dir), else the checkout's configs/ beside
  the package (a clone or an editable install)."""
  package = os.path.dirname(os.path.abspath(__file__))
  candidates = (os.path.join(package, "configs"), os.path.join(os.path.dirname(package), "configs"))
  for path in candidates:
    if os.path.isfile(os.path.join(path, "demo.py")):
      return path
  raise ConfigError(f"no configs/ folder with demo.py at {' or '.join(candidates)} "
                    "(reinstall flamingo_jax or run from a checkout)")


def resolve_config_path(path: str) -> str:
  """A config file named as the docs name it (`configs/tiny.py`, `configs/eval/coco.py`):
  relative to the working directory first, then to the packaged configs/ (configs_dir(), a
  leading `configs/` dropped), so the commands run from any directory."""
  if os.path.exists(path) or os.path.isabs(path):
    if not os.path.exists(path):
      raise ConfigError(f"config file {path!r} does not exist")
    return path
  try:
    packaged = os.path.join(configs_dir(), os.path.normpath(path).removeprefix("configs" + os.sep))
  except ConfigError:
    packaged = ""
  if packaged and os.path.isfile(packaged):
    return packaged
  raise ConfigError(f"config file {path!r} does not exist (relative to {os.getcwd()}"
                    + (f" or to the packaged {configs_dir()}" if packaged else "") + ")")


def load_config(path: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
  """Imports `path` and returns its `get_config(arg)`.

  The argument may also follow the file name after a colon, and may itself be
  a path: "configs/from_checkpoint.py:/ckpts/of9b". `path` resolves from any working
  directory (resolve_config_path).
  """
  match = re.fullmatch(r"(.+?\.py):(.*)", path)
  if match:
    path, arg = match.group(1), match.group(2)
  path = resolve_config_path(path)
  spec = importlib.util.spec_from_file_location(
      "flamingo_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config() function")
  takes_arg = len(inspect.signature(module.get_config).parameters) > 0
  if arg is not None and not takes_arg:
    raise ConfigError(f"config file {path!r} takes no argument but got {arg!r}")
  return module.get_config(arg) if takes_arg else module.get_config()


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str],
                    open_keys: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Applies "a.b.c=value" strings (Python literals, or bare strings).

  open_keys: dotted paths of dict-valued fields (`model_init`,
  `train.micro_batches`) that take new keys, so `--config.model_init.lm=PATH`
  adds an entry; anywhere else an unknown key is an error naming it.
  """
  config = copy.deepcopy(config)  # never modify the caller's config
  for item in overrides:
    item = item.removeprefix("--config.").removeprefix("config.")
    if "=" not in item:
      raise ConfigError(f"override {item!r} must look like key.path=value")
    key, text = item.split("=", 1)
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
      prefix = ".".join(parts[:i + 1])
      if part not in node and prefix in open_keys:
        with node.unlocked():
          node[part] = ml_collections.ConfigDict()
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ConfigError(f"unknown config key {prefix!r} in override {item!r}")
      node = node[part]
    value = _parse_value(text)
    if parts[-1] not in node:
      if ".".join(parts[:-1]) not in open_keys:
        valid = ", ".join(sorted(node.keys())) or "none (this section takes no keys)"
        raise ConfigError(f"unknown config key {key!r} in override {item!r}; valid keys "
                          f"here: {valid}")
      with node.unlocked():
        node[parts[-1]] = value
      continue
    old = node[parts[-1]]
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    try:
      with node.unlocked():
        node[parts[-1]] = value
    except TypeError as e:  # ml_collections names only the last key
      raise ConfigError(f"config key {key!r} must be {type(old).__name__} (as its default "
                        f"{old!r}), got {value!r} in override {item!r}") from e
  return config


def _section_value(value):
  """A dataclass field's default as a ConfigDict value (nested dataclasses as dicts,
  tuples of tuples as lists)."""
  if dataclasses.is_dataclass(value):
    return {f.name: _section_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, tuple) and value and all(isinstance(v, tuple) for v in value):
    return [list(v) for v in value]
  if isinstance(value, typing.Mapping):
    return dict(value)
  return value


def _fill(node: ml_collections.ConfigDict, defaults: typing.Mapping) -> None:
  for key, value in defaults.items():
    if key not in node or node[key] is None and isinstance(value, dict) and value:
      node[key] = value
    elif isinstance(value, dict) and value and isinstance(node[key], ml_collections.ConfigDict):
      _fill(node[key], value)


def with_defaults(config: ml_collections.ConfigDict,
                  defaults: typing.Mapping[str, Any]) -> ml_collections.ConfigDict:
  """config with every section of `defaults` (name -> dataclass instance or dict)
  present and every key a section leaves out (nested ones too) set to its default.

  Runs before the command-line overrides, so `--config.mesh.tensor=16` works on
  a model-only config, and config.json shows every value the run used.
  """
  config = ml_collections.ConfigDict(config)
  with config.unlocked():
    _fill(config, {name: _section_value(d) for name, d in defaults.items()})
  return config


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.x=y` overrides from other arguments."""
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  return rest, overrides
