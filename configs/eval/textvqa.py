"""TextVQA v0.5.1 val (5,000 questions), VQA accuracy.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR --eval configs/eval/textvqa.py:DATA_ROOT --out OUT

DATA_ROOT as released (read directly: no conversion to the VQAv2 layout):
  TextVQA_0.5.1_train.json      {"data": [{"question_id", "image_id", "question", "answers"}]}
  TextVQA_0.5.1_val.json
  train_images/{image_id}.jpg   (train and val images; train_val_images.zip)
At most 10 new tokens (OpenFlamingo's), answers cut as OpenFlamingo does.
"""
from flamingo_jax.evaluate.protocol import benchmark


def get_config(data_root=""):
  return benchmark("textvqa", data_root, "data/textvqa", kind="vqa", format="textvqa",
                   train="TextVQA_0.5.1_train.json", test="TextVQA_0.5.1_val.json",
                   image_root="train_images", max_new_tokens=10, answer_postprocess="vqa")
