"""VATEX English captioning, validation split (3,000 clips), CIDEr.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR --eval configs/eval/vatex.py:DATA_ROOT --out OUT

DATA_ROOT as released (VATEX's caption files, the clips downloaded from YouTube):
  vatex_training_v1.0.json  vatex_validation_v1.0.json   [{"videoID", "enCap": [10], "chCap"}]
  videos/<videoID>.mp4      the 10 s clip <youtube id>_<start>_<end>
                            (or videos/<videoID>/ of extracted frames)
Demonstrations from training; each clip 30 frames at 3 FPS (the paper's inference clips);
"Output: {caption}", at most 20 new tokens; scored against the 10 English captions.
"""
from flamingo_jax.evaluate.protocol import VIDEO_CLIP, benchmark


def get_config(data_root=""):
  return benchmark("vatex", data_root, "data/vatex", kind="captioning", format="vatex",
                   train="vatex_training_v1.0.json", test="vatex_validation_v1.0.json",
                   image_root="videos", max_new_tokens=20, **VIDEO_CLIP)
