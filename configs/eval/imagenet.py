"""ImageNet-1k val (50,000 images), top-1 / top-5 by ranking the 1,000 class names.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR --eval configs/eval/imagenet.py:DATA_ROOT --out OUT

DATA_ROOT as torchvision's ImageFolder reads it (val sorted into class folders):
  train/n01440764/*.JPEG ...   val/n01440764/*.JPEG ...
Class names in sorted-wnid order: DATA_ROOT/classnames.txt (one a line) when present, else
the 1,000 that ship with flamingo_jax (OpenFlamingo's list,
flamingo_jax/evaluate/imagenet_classnames.txt); or --config.eval.tasks.imagenet.class_names=FILE.
The prompt is scored once per query and all 1,000 names in batches against its
cache. The paper ranks ImageNet with RICES and prompt ensembling: add --rices
--ensemble 6 (and bound the RICES pool with --config.eval.rices_pool=N).
"""
import os

from flamingo_jax.evaluate.protocol import IMAGENET_CLASSNAMES, benchmark


def get_config(data_root=""):
  root = os.path.expanduser(data_root or "data/imagenet")
  own = os.path.isfile(os.path.join(root, "classnames.txt"))
  return benchmark("imagenet", root, "data/imagenet", kind="classification", format="folder",
                   train="train", test="val",
                   class_names="classnames.txt" if own else IMAGENET_CLASSNAMES)
