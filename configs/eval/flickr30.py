"""Flickr30k captions, Karpathy test split (1,000 images), CIDEr.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR --eval configs/eval/flickr30.py:DATA_ROOT --out OUT

DATA_ROOT as released:
  dataset_flickr30k.json             Karpathy's splits: train / val / test
  flickr30k_images/*.jpg
The task is named "flickr30", OpenFlamingo's key. At most 20 new tokens.
"""
from flamingo_jax.evaluate.protocol import benchmark


def get_config(data_root=""):
  return benchmark("flickr30", data_root, "data/flickr30k", kind="captioning",
                   format="karpathy", train="dataset_flickr30k.json", train_splits=("train",),
                   test_splits=("test",), image_root="flickr30k_images", max_new_tokens=20)
