"""COCO captions, Karpathy test split (5,000 images), CIDEr.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR --eval configs/eval/coco.py:DATA_ROOT --out OUT

DATA_ROOT as released (Karpathy's split file and the COCO 2014 images):
  dataset_coco.json                  Karpathy's splits: train / restval / val / test
  train2014/COCO_train2014_*.jpg     (each entry's "filepath" names its folder)
  val2014/COCO_val2014_*.jpg
Demonstrations from train + restval (113,287 images); at most 20 new tokens.
"""
from flamingo_jax.evaluate.protocol import benchmark


def get_config(data_root=""):
  return benchmark("coco", data_root, "data/coco", kind="captioning", format="karpathy",
                   train="dataset_coco.json", train_splits=("train", "restval"),
                   test_splits=("test",), image_root=".", max_new_tokens=20)
