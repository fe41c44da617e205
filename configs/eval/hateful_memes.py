"""HatefulMemes test_seen (1,000 memes), ROC-AUC of the "yes" probability.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR --eval configs/eval/hateful_memes.py:DATA_ROOT --out OUT

DATA_ROOT as released (phase 2, whose test_seen.jsonl has labels):
  train.jsonl   test_seen.jsonl   one {"id", "img": "img/42953.png", "text", "label"} a line
  img/*.png
The options "no" / "yes" are ranked by mean log-likelihood after the prompt.
"""
from flamingo_jax.evaluate.protocol import benchmark


def get_config(data_root=""):
  return benchmark("hateful_memes", data_root, "data/hateful_memes", kind="hateful_memes",
                   train="train.jsonl", test="test_seen.jsonl", image_root=".")
