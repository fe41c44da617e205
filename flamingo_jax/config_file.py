"""Loading config files (`configs/*.py` exposing `get_config(arg=None)`) and
applying `--config.a.b=value` overrides, with errors that name the bad key."""
from __future__ import annotations

import ast
import copy
import importlib.util
import inspect
import os
import re
from typing import Optional, Sequence

import ml_collections


def load_config(path: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
  """Imports `path` and returns its `get_config(arg)`.

  The argument may also follow the file name after a colon, and may itself be
  a path: "configs/from_checkpoint.py:/ckpts/of9b".
  """
  match = re.fullmatch(r"(.+?\.py):(.*)", path)
  if match:
    path, arg = match.group(1), match.group(2)
  if not os.path.exists(path):
    raise ValueError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(
      "flamingo_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} has no get_config() function")
  takes_arg = len(inspect.signature(module.get_config).parameters) > 0
  if arg is not None and not takes_arg:
    raise ValueError(f"config file {path!r} takes no argument but got {arg!r}")
  return module.get_config(arg) if takes_arg else module.get_config()


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies "a.b.c=value" strings (Python literals, or bare strings)."""
  config = copy.deepcopy(config)  # never modify the caller's config
  for item in overrides:
    item = item.removeprefix("--config.").removeprefix("config.")
    if "=" not in item:
      raise ValueError(f"override {item!r} must look like key.path=value")
    key, text = item.split("=", 1)
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ValueError(f"unknown config key {'.'.join(parts[:i + 1])!r} in override {item!r}")
      node = node[part]
    if parts[-1] not in node:
      raise ValueError(f"unknown config key {key!r} in override {item!r}; valid keys here: "
                       f"{', '.join(sorted(node.keys()))}")
    value = _parse_value(text)
    old = node[parts[-1]]
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    with node.unlocked():
      node[parts[-1]] = value
  return config


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.x=y` overrides from other arguments."""
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  return rest, overrides
