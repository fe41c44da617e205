"""MSRVTT-QA test split (72,821 questions on 2,990 clips), top-1 accuracy.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR --eval configs/eval/msrvtt_qa.py:DATA_ROOT --out OUT

DATA_ROOT as released (MSRVTT-QA's question files, MSR-VTT's videos):
  train_qa.json  val_qa.json  test_qa.json   [{"answer", "category_id", "id", "question",
                                               "video_id": N}]
  TrainValVideo/video<N>.mp4                 train and val videos (video0 ... video7009)
  TestVideo/video<N>.mp4                     test videos (video7010 ... video9999)
(a folder video<N>/ of extracted frames may stand for a video). Clips of 30 frames at
3 FPS (the paper's inference clips); prompted as VQA, at most 5 new tokens, answers cut
as OpenFlamingo does; right when equal to the one answer (both VQA-normalised).
"""
from flamingo_jax.evaluate.protocol import VIDEO_CLIP, benchmark


def get_config(data_root=""):
  return benchmark("msrvtt_qa", data_root, "data/msrvtt_qa", kind="video_qa",
                   format="msrvtt_qa", train="train_qa.json", test="test_qa.json",
                   train_image_root="TrainValVideo", test_image_root="TestVideo",
                   max_new_tokens=5, answer_postprocess="vqa", **VIDEO_CLIP)
