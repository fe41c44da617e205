"""Vision encoders by name.

A vision encoder maps images [B, H, W, 3] to a feature grid [B, h, w, C].
Encoders register themselves (models/vision_registry.py) so a config selects one
with `model.vision.name`, and each module keeps one encoder (one concept per module).
"""
from __future__ import annotations

import flax.linen as nn

# Imported for their registration.
from flamingo_jax.models import mllama_vision, nfnet, patch_encoder, vit  # noqa: F401
from flamingo_jax.models.vision_registry import FEATURE_DIMS, REGISTRY


def vision_encoder_names() -> list[str]:
  return sorted(REGISTRY)


def build_vision_encoder(vision_config, **kwargs) -> nn.Module:
  name = vision_config.name
  if name not in REGISTRY:
    raise ValueError(
        f"unknown vision encoder {name!r} (model.vision.name); "
        f"registered: {', '.join(sorted(REGISTRY))}")
  return REGISTRY[name](vision_config, **kwargs)


def vision_feature_dim(vision_config) -> int:
  """Channels C of the encoder's feature grid."""
  if vision_config.name == "none":
    raise ValueError("model.vision.name is 'none': set model.vision_feature_dim")
  if vision_config.name not in FEATURE_DIMS:
    raise ValueError(f"vision encoder {vision_config.name!r} does not declare its feature width")
  return FEATURE_DIMS[vision_config.name](vision_config)
