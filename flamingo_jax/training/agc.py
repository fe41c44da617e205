"""Adaptive gradient clipping (AGC, Brock et al. 2021, NFNet paper section 4).

Each unit's gradient is rescaled so that ||G_i|| <= clip * max(||W_i||, eps),
where a unit is one output channel or neuron: it lets NFNets train at large
batch sizes without batch norm. Norms per unit, as DeepMind's agc_optax.py:
  scalars and vectors (after squeezing unit axes)  the whole tensor
  dense kernels [in, out], [in, heads, k]          reduce axis 0 (per output)
  conv kernels [kh, kw, in, out]                   reduce axes 0, 1, 2
The classifier is excluded by default (the paper: clipping the final linear
layer hurts), by a regex on the parameter path 'a/b/c'.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from flamingo_jax.models.labels import path_str

# Paths of the NFNet classifier (flamingo_jax.models.nfnet names it 'classifier').
DEFAULT_EXCLUDE = r"(^|/)classifier(/|$)"

Exclude = Union[None, str, "re.Pattern[str]", Callable[[str, Any], bool]]


class AdaptiveGradClipState(NamedTuple):
  """AGC is stateless."""


def unitwise_norm(x: jax.Array, name: str = "") -> jax.Array:
  """L2 norm per output unit, broadcastable against x (a scalar for vectors)."""
  squeezed = [d for d in x.shape if d != 1]
  if len(squeezed) <= 1:
    axis, keepdims = None, False
  elif x.ndim in (2, 3):
    axis, keepdims = 0, True
  elif x.ndim == 4:
    axis, keepdims = (0, 1, 2), True
  else:
    raise ValueError(f"adaptive_grad_clip: no unit-wise norm for parameter {name!r} of shape "
                     f"{x.shape} (supported: scalars, vectors, [in, out], [in, h, k], "
                     f"[kh, kw, in, out])")
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=keepdims))


def _exclusion_fn(exclude: Exclude) -> Callable[[str, Any], bool]:
  if exclude is None:
    return lambda path, leaf: False
  if isinstance(exclude, str):
    try:
      exclude = re.compile(exclude)
    except re.error as e:
      raise ValueError(f"adaptive_grad_clip: exclude regex {exclude!r} is invalid: {e}") from e
  if isinstance(exclude, re.Pattern):
    return lambda path, leaf: exclude.search(path) is not None
  if callable(exclude):
    return exclude
  raise ValueError(f"adaptive_grad_clip: exclude must be a regex string, compiled pattern, "
                   f"callable(path, param) -> bool or None, got {type(exclude).__name__}")


def adaptive_grad_clip(clip: float = 0.01, eps: float = 1e-3,
                       exclude: Exclude = DEFAULT_EXCLUDE) -> optax.GradientTransformation:
  """Clips each unit's update to at most clip * max(unit norm of the param, eps).

  Args:
    clip: largest allowed ratio ||G_i|| / ||W_i|| (lambda in the paper; 0.01 for
      NFNets at batch 4096 and for Flamingo's contrastive pretraining).
    eps: floor on the parameter norm, so zero-initialised parameters (SkipInit
      gains, biases) can still move.
    exclude: parameters left unclipped: a regex searched in the path 'a/b/c',
      a compiled pattern, a predicate (path, param) -> bool, or None. Default:
      the classifier.

  Needs params in `update(updates, state, params)`.
  """
  if not clip > 0:
    raise ValueError(f"adaptive_grad_clip: clip must be positive, got {clip}")
  if not eps > 0:
    raise ValueError(f"adaptive_grad_clip: eps must be positive, got {eps}")
  excluded = _exclusion_fn(exclude)

  def init_fn(params):
    del params
    return AdaptiveGradClipState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("adaptive_grad_clip needs params: call update(updates, state, params)")

    def clip_leaf(path, g, p):
      if g.shape != p.shape:
        raise ValueError(f"adaptive_grad_clip: update {path_str(path)!r} has shape {g.shape} "
                         f"but its parameter has {p.shape}")
      if excluded(path_str(path), p):
        return g
      name = path_str(path)
      g_norm = unitwise_norm(g, name)
      max_norm = clip * jnp.maximum(unitwise_norm(p, name), eps)
      # max(., 1e-6) only guards the division; where it would matter g is kept.
      scale = max_norm / jnp.maximum(g_norm, 1e-6)
      clipped = (g.astype(jnp.float32) * scale).astype(g.dtype)
      return jnp.where(g_norm < max_norm, g, clipped)

    updates = jax.tree_util.tree_map_with_path(clip_leaf, updates, params)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)
