"""Which parameters train, and which of those get weight decay.

Each leaf gets one label:
  frozen              no update and no optimizer state (vision encoder, LM)
  trainable           AdamW with weight decay (cross-attention, new token rows)
  trainable_no_decay  AdamW without weight decay (the resampler, in the paper)

Decided by `FlamingoConfig.frozen` (components) and `no_weight_decay`
(regexes over "top_key/.../leaf" paths), so every paper ablation that
unfreezes a tower is a config override.
"""
from __future__ import annotations

import re
from typing import Any

import jax

from flamingo_jax.models.config import FlamingoConfig

FROZEN = "frozen"
TRAINABLE = "trainable"
TRAINABLE_NO_DECAY = "trainable_no_decay"


def component_of(top_key: str) -> str:
  """Top-level param key -> component name (see config.COMPONENTS)."""
  if top_key.startswith("xattn_block_") or top_key == "xattn_blocks":  # unrolled / scanned
    return "xattn"
  if top_key.startswith("new_token_"):
    return "new_tokens"
  return top_key


def path_str(path) -> str:
  parts = []
  for p in path:
    key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
    parts.append(str(key))
  return "/".join(parts)


def param_labels(params: Any, config: FlamingoConfig) -> Any:
  """A tree like `params` with a label string per leaf."""
  no_decay = [re.compile(p) for p in config.no_weight_decay]

  def label(path, _):
    name = path_str(path)
    if component_of(name.split("/", 1)[0]) in config.frozen:
      return FROZEN
    if any(p.fullmatch(name) for p in no_decay):
      return TRAINABLE_NO_DECAY
    return TRAINABLE

  return jax.tree_util.tree_map_with_path(label, params)


def count_by_label(params: Any, config: FlamingoConfig) -> dict[str, int]:
  labels = jax.tree.leaves(param_labels(params, config))
  sizes = [x.size for x in jax.tree.leaves(params)]
  out = {FROZEN: 0, TRAINABLE: 0, TRAINABLE_NO_DECAY: 0}
  for lab, n in zip(labels, sizes):
    out[lab] += int(n)
  return out


def partition(params: Any, labels: Any) -> tuple[dict, dict]:
  """Splits params into (trainable, frozen) flat dicts keyed by path tuples.

  Differentiating a loss with respect to the trainable dict only means
  frozen leaves get no gradient at all (not a zero gradient).
  """
  from flax import traverse_util
  flat = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(labels)
  trainable = {k: v for k, v in flat.items() if flat_labels[k] != FROZEN}
  frozen = {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}
  return trainable, frozen


def merge(trainable: dict, frozen: dict) -> dict:
  """Inverse of `partition`."""
  from flax import traverse_util
  return traverse_util.unflatten_dict({**frozen, **trainable})
