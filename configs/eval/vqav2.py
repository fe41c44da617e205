"""VQAv2 val2014 (214k questions), VQA accuracy.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR --eval configs/eval/vqav2.py:DATA_ROOT --out OUT

DATA_ROOT as released (the VQAv2 files and the COCO 2014 images):
  v2_OpenEnded_mscoco_train2014_questions.json   v2_mscoco_train2014_annotations.json
  v2_OpenEnded_mscoco_val2014_questions.json     v2_mscoco_val2014_annotations.json
  train2014/COCO_train2014_{image_id:012d}.jpg   val2014/COCO_val2014_{image_id:012d}.jpg
At most 5 new tokens; answers cut as OpenFlamingo does (first ", ", a new "Question").
"""
from flamingo_jax.evaluate.protocol import benchmark


def get_config(data_root=""):
  return benchmark("vqav2", data_root, "data/vqav2", kind="vqa", format="vqa",
                   train="v2_OpenEnded_mscoco_train2014_questions.json",
                   train_annotations="v2_mscoco_train2014_annotations.json",
                   test="v2_OpenEnded_mscoco_val2014_questions.json",
                   test_annotations="v2_mscoco_val2014_annotations.json",
                   train_image_root="train2014", test_image_root="val2014",
                   image_naming="coco", max_new_tokens=5, answer_postprocess="vqa")
