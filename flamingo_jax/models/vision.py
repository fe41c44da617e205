"""Registry of vision encoders.

A vision encoder maps images [B, H, W, 3] to a feature grid [B, h, w, C].
Encoders register themselves by name so a config selects one with
`model.vision.name`, and each module keeps one encoder (one concept per module).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_FEATURE_DIMS: dict[str, Callable[..., int]] = {}


def register_vision_encoder(name: str, feature_dim: Callable[..., int] | None = None):
  """Class decorator: `@register_vision_encoder("nfnet")`.

  The decorated factory is called as `factory(vision_config, dtype=...)` and
  must return a linen Module whose `__call__(images [B, H, W, 3],
  train: bool = False)` returns features [B, h, w, C]. `feature_dim(vision_config)`
  returns C without building anything.
  """

  def wrap(factory):
    if name in _REGISTRY:
      raise ValueError(f"vision encoder {name!r} is registered twice")
    _REGISTRY[name] = factory
    if feature_dim is not None:
      _FEATURE_DIMS[name] = feature_dim
    return factory

  return wrap


def vision_encoder_names() -> list[str]:
  _import_builtin_encoders()
  return sorted(_REGISTRY)


def build_vision_encoder(vision_config, **kwargs) -> nn.Module:
  _import_builtin_encoders()
  name = vision_config.name
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown vision encoder {name!r} (model.vision.name); "
        f"registered: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name](vision_config, **kwargs)


def vision_feature_dim(vision_config) -> int:
  """Channels C of the encoder's feature grid."""
  _import_builtin_encoders()
  if vision_config.name == "none":
    raise ValueError("model.vision.name is 'none': set model.vision_feature_dim")
  if vision_config.name not in _FEATURE_DIMS:
    raise ValueError(f"vision encoder {vision_config.name!r} does not declare its feature width")
  return _FEATURE_DIMS[vision_config.name](vision_config)


def _import_builtin_encoders():
  # Imported for their registration side effect.
  from flamingo_jax.models import patch_encoder, vit  # noqa: F401
  try:
    from flamingo_jax.models import nfnet  # noqa: F401
  except ImportError as e:  # pragma: no cover - only while nfnet is absent
    if "nfnet" not in str(e):
      raise
