"""Where vision encoders register by name (a module of its own, so that the encoders
import it and `models/vision.py` imports the encoders, without a circle)."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn

REGISTRY: dict[str, Callable[..., nn.Module]] = {}
FEATURE_DIMS: dict[str, Callable[..., int]] = {}


def register_vision_encoder(name: str, feature_dim: Callable[..., int] | None = None):
  """Class decorator: `@register_vision_encoder("nfnet")`.

  The decorated factory is called as `factory(vision_config, dtype=...)` and
  must return a linen Module whose `__call__(images [B, H, W, 3],
  train: bool = False)` returns features [B, h, w, C]. `feature_dim(vision_config)`
  returns C without building anything.
  """

  def wrap(factory):
    if name in REGISTRY:
      raise ValueError(f"vision encoder {name!r} is registered twice")
    REGISTRY[name] = factory
    if feature_dim is not None:
      FEATURE_DIMS[name] = feature_dim
    return factory

  return wrap
