"""Flamingo-3B: paper Table 4's model and appendix B.1.2's training recipe
(configs/flamingo_recipe.py states every value and where it comes from).

  python -m flamingo_jax.tools.count_params --config configs/flamingo_3b.py
  python -m flamingo_jax.tools.count_params --config configs/flamingo_3b.py:v1  # head size 128
  python -m flamingo_jax.train --config configs/flamingo_3b.py:local --workdir /tmp/3b_local
  python -m flamingo_jax.train --config configs/flamingo_3b.py:data=gs://b/flamingo \
      --workdir gs://b/runs/3b

The argument: `v1` (paper v1 head sizes; default v2), `local` (the recipe shrunk
to run on a CPU in about a minute), `data=ROOT` (datasets and tokenizer), comma-separated.
"""
import importlib.util
import os


def get_config(arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flamingo_recipe.py")
  spec = importlib.util.spec_from_file_location("_flamingo_recipe", path)
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  return recipe.get_config(",".join(["3b"] + ([arg] if arg else [])))
