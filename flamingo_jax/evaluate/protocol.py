"""The Flamingo paper's evaluation protocol, shared by the configs in configs/eval/.

Appendix A.2 / B.1.4-5: shots 0 / 4 / 32 (OpenFlamingo also reports 8 and 16:
`--shots 0,4,8,16,32`), one trial (OpenFlamingo averages 3: `--num_trials 3`),
beam search with 3 beams to the first `<EOC>` (the eval section's `num_beams` /
`decode_method`), the paper's prompts (`prompt_style="open_flamingo"` gives
OpenFlamingo's wording). Each benchmark config's get_config(data_root) takes the
benchmark's directory as released and returns {"tasks": {name: task}}, every
path relative to that root.

Videos (VATEX, MSVD-QA, MSRVTT-QA): the paper trains on 8 frames at 1 FPS and
evaluates on 30 frames at 3 FPS, the resampler's learned temporal embeddings
linearly interpolated (`VIDEO_CLIP`; `--config.eval.tasks.NAME.num_frames=8
--config.eval.tasks.NAME.fps=1` evaluates as trained). A clip starts at the
video's start; a shorter video repeats its last frame.
"""
import os

import ml_collections

SHOTS = (0, 4, 32)
VIDEO_CLIP = {"num_frames": 30, "fps": 3.0}  # the paper's inference clips
# ImageNet-1k's class names in sorted-wnid order (OpenFlamingo's
# open_flamingo/eval/classification_utils.py IMAGENET_CLASSNAMES, MIT), shipped so that
# neither open_flamingo nor its open_clip dependency is needed to evaluate ImageNet.
IMAGENET_CLASSNAMES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   "imagenet_classnames.txt")


def benchmark(name: str, data_root: str, default_root: str, **task) -> ml_collections.ConfigDict:
  """{"tasks": {name: task}} with the shared protocol; data_root "" -> default_root."""
  task.setdefault("shots", SHOTS)
  task.setdefault("num_trials", 1)
  task.setdefault("prompt_style", "flamingo")
  task["data_root"] = os.path.expanduser(data_root or default_root)
  return ml_collections.ConfigDict({"tasks": {name: task}})
