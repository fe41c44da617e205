"""Flamingo-80B (paper Table 4: cross-attention before every 7 LM block(s)) with the
training recipe of appendix B.1.2, which configs/flamingo_recipe.py states value by value.

  python -m flamingo_jax.tools.count_params --config configs/flamingo_80b.py[:v1]
  python -m flamingo_jax.train --config configs/flamingo_80b.py:local --workdir /tmp/80b_local
  python -m flamingo_jax.train --config configs/flamingo_80b.py:data=gs://b/flamingo \
      --workdir gs://b/runs/80b

Argument (comma-separated): v1 (paper v1 head sizes), local (a minute on a CPU), data=ROOT.
"""
import os

from flamingo_jax.config import load_config


def get_config(arg=None):
  recipe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flamingo_recipe.py")
  return load_config(recipe, ",".join(["80b"] + ([arg] if arg else [])))
