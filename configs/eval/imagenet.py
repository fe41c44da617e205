"""ImageNet-1k val (50,000 images), top-1 / top-5 by ranking the 1,000 class names.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR --eval configs/eval/imagenet.py:DATA_ROOT --out OUT

DATA_ROOT as torchvision's ImageFolder reads it (val sorted into class folders):
  train/n01440764/*.JPEG ...   val/n01440764/*.JPEG ...
  classnames.txt               1,000 names, one a line, in sorted-wnid order, e.g.
                               OpenFlamingo's list: python -c "from open_flamingo.eval.
                               classification_utils import IMAGENET_CLASSNAMES as n;
                               print('\n'.join(n))" > DATA_ROOT/classnames.txt
The prompt is scored once per query and all 1,000 names in batches against its
cache. The paper ranks ImageNet with RICES and prompt ensembling: add --rices
--ensemble 6 (and bound the RICES pool with --config.eval.rices_pool=N).
"""
from flamingo_jax.evaluate.protocol import benchmark


def get_config(data_root=""):
  return benchmark("imagenet", data_root, "data/imagenet", kind="classification",
                   format="folder", train="train", test="val", class_names="classnames.txt")
