"""Llama 3.2 90B Vision (transformers' mllama; Meta's Llama-3.2-90B-Vision[-Instruct]) as a
Flamingo config: Llama 3.1 70B (80 layers) with 20 gated cross-attention blocks before LM
blocks 3, 7, ..., 79, the tiled ViT-H/14 (560 px tiles, 32 + 8 layers, 7680-wide
features) and a linear projector. The shapes are the hub's config.json
(configs/mllama_shapes.py); docs/checkpoints.md has the conversion.

  python -m flamingo_jax.tools.count_params --config configs/mllama_90b.py

Argument: the row mask, transformers (default) or meta (transformers issue #39379).
"""
import os

from flamingo_jax.config import load_config


def get_config(arg=None):
  shapes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mllama_shapes.py")
  return load_config(shapes, ",".join(["90b"] + ([arg] if arg else [])))
