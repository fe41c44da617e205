"""Video clips: T frames sampled at a fixed rate (1 FPS, 8 frames in training).

Frames come either pre-extracted (a list recorded at some `source_fps`) or
decoded from a video file with PyAV, whose PyPI wheels bundle the FFmpeg
libraries (no ffmpeg binary needed). PyAV is optional: without it a sample
that only has a video file is skipped as "video_decoder_unavailable".

A clip is the frames shown at times start + k / fps, k = 0..T-1. Training
draws `start` uniformly over the positions where the clip fits; evaluation
starts at 0. A video shorter than the clip repeats its last frame.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np


class VideoDecoderUnavailable(RuntimeError):
  """PyAV is not installed."""


class BadVideo(ValueError):
  """A video file that cannot be decoded."""


def clip_start(duration: Optional[float], fps: float, num_frames: int,
               rng: Optional[np.random.Generator], train: bool,
               frame_period: float = 0.0) -> float:
  """Start time (s) of a clip of num_frames at fps inside [0, duration)."""
  if not train or duration is None:
    return 0.0
  latest = duration - frame_period - (num_frames - 1) / fps
  return float(rng.uniform(0.0, latest)) if latest > 0 else 0.0


def frame_indices(num_available: int, source_fps: float, fps: float, num_frames: int,
                  start: float = 0.0) -> list[int]:
  """Indices into frames recorded at source_fps shown at start + k / fps."""
  if num_available <= 0:
    raise ValueError("frame_indices: a video needs at least one frame")
  times = start + np.arange(num_frames) / fps
  idx = np.floor(times * source_fps + 1e-6).astype(np.int64)
  return np.clip(idx, 0, num_available - 1).tolist()


def decode_file(data: bytes, fps: float, num_frames: int, rng: Optional[np.random.Generator],
                train: bool) -> list[np.ndarray]:
  """A video file's bytes -> num_frames uint8 [H, W, 3] frames of one clip."""
  try:
    import av
  except ImportError as e:
    raise VideoDecoderUnavailable("decoding video files needs PyAV: pip install av") from e
  try:
    with av.open(io.BytesIO(data), mode="r") as container:
      if not container.streams.video:
        raise BadVideo("no video stream")
      stream = container.streams.video[0]
      duration = None
      if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
      elif container.duration:
        duration = container.duration / 1e6
      rate = float(stream.average_rate or 0) or None
      start = clip_start(duration, fps, num_frames, rng, train, 1 / rate if rate else 0.0)
      targets = start + np.arange(num_frames) / fps
      out: list[np.ndarray] = []
      prev, prev_rgb = None, None  # the frame on screen, converted only when used

      def take():
        nonlocal prev_rgb
        if prev_rgb is None:
          prev_rgb = prev.to_ndarray(format="rgb24")
        out.append(prev_rgb)

      for i, frame in enumerate(container.decode(stream)):
        t = frame.time if frame.time is not None else (i / rate if rate else float(i))
        while len(out) < num_frames and prev is not None and t > targets[len(out)] + 1e-6:
          take()
        if len(out) == num_frames:
          break
        prev, prev_rgb = frame, None
      while len(out) < num_frames and prev is not None:
        take()
  except (VideoDecoderUnavailable, BadVideo):
    raise
  except Exception as e:  # av.error.* and friends
    raise BadVideo(f"cannot decode video: {type(e).__name__}: {e}") from e
  if not out:
    raise BadVideo("video has no frames")
  return out

