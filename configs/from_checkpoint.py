"""The model config written next to a converted checkpoint.

  python -m flamingo_jax.evaluate --config configs/from_checkpoint.py:DIR --checkpoint DIR/params

DIR is what `python -m flamingo_jax.convert openflamingo|hf-lm ... --out DIR` wrote.
"""
import json
import os

import ml_collections

from flamingo_jax.config import model_config, to_config_dict


def get_config(directory):
  path = os.path.join(directory, "model_config.json")
  if not os.path.exists(path):
    raise ValueError(f"{path!r} does not exist: convert a checkpoint into {directory!r} first")
  with open(path) as f:
    model = model_config(json.load(f))  # validated: unknown keys are errors
  return ml_collections.ConfigDict({"model": to_config_dict(model)})
