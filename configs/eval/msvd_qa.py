"""MSVD-QA test split (13,157 questions on 520 clips), top-1 accuracy.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR --eval configs/eval/msvd_qa.py:DATA_ROOT --out OUT

DATA_ROOT as released (MSVD-QA's question files and mapping, MSVD's YouTubeClips):
  train_qa.json  val_qa.json  test_qa.json   [{"answer", "id", "question", "video_id": N}]
  youtube_mapping.txt                        "<clip name> vid<N>" per line
  YouTubeClips/<clip name>.avi               (or YouTubeClips/<clip name>/ of extracted frames)
Each video is a clip of 30 frames at 3 FPS (the paper's inference clips); prompted as VQA
("Question: {q} Answer: {a}"), at most 5 new tokens, answers cut as OpenFlamingo does; a
prediction is right when it equals the one answer (both VQA-normalised).
"""
from flamingo_jax.evaluate.protocol import VIDEO_CLIP, benchmark


def get_config(data_root=""):
  return benchmark("msvd_qa", data_root, "data/msvd_qa", kind="video_qa", format="msvd_qa",
                   train="train_qa.json", test="test_qa.json",
                   video_mapping="youtube_mapping.txt", image_root="YouTubeClips",
                   max_new_tokens=5, answer_postprocess="vqa", **VIDEO_CLIP)
