"""OK-VQA v1.1 val2014 (5,046 questions), VQA accuracy on stemmed answers.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR --eval configs/eval/ok_vqa.py:DATA_ROOT --out OUT

DATA_ROOT as released (the OK-VQA files in the VQAv2 layout and the COCO 2014 images):
  OpenEnded_mscoco_train2014_questions.json   mscoco_train2014_annotations.json
  OpenEnded_mscoco_val2014_questions.json     mscoco_val2014_annotations.json
  train2014/COCO_train2014_*.jpg              val2014/COCO_val2014_*.jpg
OK-VQA's annotations hold stemmed answers, so predictions are stemmed as OpenFlamingo
does (answer_postprocess="ok_vqa", flamingo_jax/evaluate/ok_vqa_stem.py): needs
`pip install 'flamingo_jax[okvqa]'` and NLTK's data (python -m nltk.downloader punkt_tab
averaged_perceptron_tagger_eng wordnet); without them pass
--config.eval.tasks.ok_vqa.answer_postprocess=vqa. At most 5 new tokens.
"""
from flamingo_jax.evaluate.protocol import benchmark


def get_config(data_root=""):
  return benchmark("ok_vqa", data_root, "data/ok_vqa", kind="vqa", format="vqa",
                   train="OpenEnded_mscoco_train2014_questions.json",
                   train_annotations="mscoco_train2014_annotations.json",
                   test="OpenEnded_mscoco_val2014_questions.json",
                   test_annotations="mscoco_val2014_annotations.json",
                   train_image_root="train2014", test_image_root="val2014",
                   image_naming="coco", max_new_tokens=5, answer_postprocess="ok_vqa")
