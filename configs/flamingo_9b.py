"""Flamingo-9B as in paper Table 4 (NFNet-F6 at 320 px, Perceiver Resampler
6 x 1536, GATED XATTN-DENSE, frozen Chinchilla-style LM).

  python -m flamingo_jax.tools.count_params --config configs/flamingo_9b.py
  python -m flamingo_jax.tools.count_params --config configs/flamingo_9b.py:v1  # head size 128

The argument selects the paper version for head sizes (v2 default; see docs/architecture.md).
"""
import ml_collections

from flamingo_jax.config import paper_model, to_config_dict


def get_config(version=None):
  model = paper_model("9b", version or "v2")
  return ml_collections.ConfigDict({"model": to_config_dict(model)})
