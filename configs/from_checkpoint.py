"""The model config written next to a converted checkpoint.

  python -m flamingo_jax.tools.count_params --config configs/from_checkpoint.py:DIR

DIR is a model directory (`python -m flamingo_jax.convert openflamingo|hf-lm|idefics ...
--out DIR`, or an export). The evaluation and generation CLIs read DIR itself:
`python -m flamingo_jax.evaluate --checkpoint DIR --eval configs/eval/coco.py:DATA_ROOT
--out OUT` (docs/evaluation.md).
"""
import ml_collections

from flamingo_jax.config import to_config_dict
from flamingo_jax.model_dir import read_model_config


def get_config(directory):
  model = read_model_config(directory)  # validated: unknown keys are errors
  return ml_collections.ConfigDict({"model": to_config_dict(model)})
