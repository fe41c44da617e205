"""VizWiz-VQA val (4,319 questions), VQA accuracy.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR --eval configs/eval/vizwiz.py:DATA_ROOT --out OUT

DATA_ROOT as released (read directly: no conversion to the VQAv2 layout):
  Annotations/train.json   [{"image", "question", "answers": [{"answer", ...} x 10], ...}]
  Annotations/val.json
  train/VizWiz_train_*.jpg   val/VizWiz_val_*.jpg
At most 5 new tokens, answers cut as OpenFlamingo does.
"""
from flamingo_jax.evaluate.protocol import benchmark


def get_config(data_root=""):
  return benchmark("vizwiz", data_root, "data/vizwiz", kind="vqa", format="vizwiz",
                   train="Annotations/train.json", test="Annotations/val.json",
                   train_image_root="train", test_image_root="val", max_new_tokens=5,
                   answer_postprocess="vqa")
