"""Components of the Flamingo parameter tree (vision, resampler, xattn, lm, new_tokens) as their
own checkpoints: the trainer's `model_init.<component>` and workdir/frozen/<component>, read
from a component's own tree or from a whole Flamingo tree (a converter's OUT/params).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from flamingo_jax.errors import CheckpointError
from flamingo_jax.models.labels import component_of
from flamingo_jax.runtime.params_io import (check_params, params_exist, restore_params,
                                            stored_top_keys)
# Components spread over several top-level keys (xattn_block_{i}, new_token_*).
MULTI_KEY_COMPONENTS = ("xattn", "new_tokens")


def top_keys_of(params: Mapping, components) -> list[str]:
  """Top-level param keys belonging to `components` (see models.labels.component_of)."""
  return [k for k in params if component_of(k) in components]


def component_tree(params: Mapping, component: str) -> Any:
  """A component's own checkpoint tree: params[component], or {top key: subtree}
  for the components spread over several keys (xattn, new_tokens)."""
  if component in MULTI_KEY_COMPONENTS:
    return {k: params[k] for k in top_keys_of(params, [component])}
  return params[component]


def with_component(params: Mapping, component: str, tree: Any) -> dict:
  """params with `component` set to `tree` (the inverse of component_tree)."""
  params = dict(params)
  if component in MULTI_KEY_COMPONENTS:
    params.update(tree)
  else:
    params[component] = tree
  return params


def _component_target(directory: str, component: str, abstract: Any, what: str):
  """(target tree, whole Flamingo tree?) for either checkpoint layout of a component."""
  if not params_exist(directory):
    raise CheckpointError(f"{what}: checkpoint directory {os.path.abspath(directory)!r} does "
                          "not exist or is empty")
  stored = stored_top_keys(directory, what)
  if component in MULTI_KEY_COMPONENTS:
    whole_tree = any(component_of(k) != component for k in stored)
  else:
    whole_tree = component in stored
  if whole_tree and component not in MULTI_KEY_COMPONENTS:
    return {component: abstract}, True
  return abstract, whole_tree


def check_component(directory: str, component: str, abstract: Any, what: str = "") -> None:
  """restore_component's checks (tensors and shapes, from metadata) without reading arrays."""
  what = what or f"model_init / frozen weights of {component!r}"
  check_params(directory, _component_target(directory, component, abstract, what)[0], what)


def restore_component(directory: str, component: str, abstract: Any) -> Any:
  """One component's weights, from either checkpoint layout:
    * the component's own tree (`python -m flamingo_jax.convert nfnet`, the
      trainer's workdir/frozen/<component>), or
    * a whole Flamingo parameter tree (the converters' OUT/params), from which
      only this component is read.
  abstract: component_tree of ShapeDtypeStructs with target shardings/dtypes.
  """
  what = f"model_init / frozen weights of {component!r}"
  target, whole_tree = _component_target(directory, component, abstract, what)
  restored = restore_params(directory, target, what, quiet_extra=whole_tree)
  return restored[component] if whole_tree and component not in MULTI_KEY_COMPONENTS \
      else restored
