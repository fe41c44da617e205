"""Evaluation clips: a video file or a folder of extracted frames -> [T, size, size, 3].

A clip is T frames shown at times k / fps, k = 0..T-1, from the start of the
video (the training pipeline's evaluation clip, `data.video`); a video
shorter than the clip repeats its last frame. Video files (.mp4, .avi,
.webm, ...) are decoded with PyAV (`av`, an install requirement whose wheels
bundle FFmpeg). A folder holds one video's extracted frames (any PIL format,
in file-name order) recorded at `frames_fps`, the layout the training
pipeline reads as a record's `frames`. Each frame is preprocessed as an
evaluation image (`data.images.process`: the longer side to `size`, centred
on a mean-coloured square, normalised).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from flamingo_jax.data import images as images_lib
from flamingo_jax.data import video as video_lib
from flamingo_jax.data.config import ImageConfig
from flamingo_jax.errors import DataError

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def read_frames(path: str, num_frames: int, fps: float, frames_fps: float = 0.0,
                size: int = 0) -> list[np.ndarray]:
  """num_frames uint8 [H, W, 3] frames of the clip at `path` (a file or a frame folder).

  frames_fps: the rate a frame folder was extracted at (0: `fps`, one frame per
  clip step). Raises DataError naming the file when it cannot be read.
  """
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_EXTENSIONS))
    if not names:
      raise DataError(f"video frame folder {path!r} has no frames ({', '.join(FRAME_EXTENSIONS)})")
    idx = video_lib.frame_indices(len(names), frames_fps or fps, fps, num_frames)
    decoded = {}
    for i in sorted(set(idx)):
      file = os.path.join(path, names[i])
      try:
        with open(file, "rb") as f:
          decoded[i] = images_lib.decode(f.read(), size or None)
      except (OSError, images_lib.BadImage) as e:
        raise DataError(f"video frame {file!r}: {e}") from None
    return [decoded[i] for i in idx]
  data = images_lib.read_file(path, "video")
  try:
    return video_lib.decode_file(data, fps, num_frames, None, train=False)
  except video_lib.VideoDecoderUnavailable as e:
    raise DataError(f"video {path!r}: {e}") from None
  except video_lib.BadVideo as e:
    raise DataError(f"video {path!r}: {e}") from None


@functools.lru_cache(maxsize=16)  # 30 frames at 224 px: 18 MB a clip
def load_clip(path: str, size: int, num_frames: int, fps: float, frames_fps: float,
              mean: tuple, std: tuple) -> np.ndarray:
  """A clip -> float32 [num_frames, size, size, 3], preprocessed as evaluation images
  (mean / std: RGB in 0..255 units, the mean also the padding colour)."""
  frames = read_frames(path, num_frames, fps, frames_fps, size)
  cfg = ImageConfig(size=size, mean=tuple(mean), std=tuple(std), flip=False, colour_jitter=0.0)
  return images_lib.process(frames, cfg, None, train=False)
