"""Pixels: decode, aspect-preserving resize with mean padding, augment, normalise.

The paper resizes preserving the aspect ratio and pads with the mean colour,
so after normalisation the padding is exactly 0 and carries no signal. Order:
decode -> resize the longer side to `size` -> colour jitter and flip of the
content (training only) -> paste centred on a mean-coloured square ->
(x - mean) / std. All frames of one video share one augmentation.
"""
from __future__ import annotations

import io
import warnings
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from flamingo_jax.data.config import ImageConfig
from flamingo_jax.errors import DataError

ImageLike = Union[bytes, np.ndarray]


class BadImage(ValueError):
  """An image that cannot be decoded; the pipeline skips and counts it."""


def read_file(path: str, what: str = "image") -> bytes:
  """The bytes of a media file, or DataError "cannot read {what} PATH: CAUSE" (one line)."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError(f"cannot read {what} {path!r}: {e.strerror or e}") from None


def decode(data: ImageLike, size: Optional[int] = None) -> np.ndarray:
  """Bytes (any PIL format) or an array -> uint8 [H, W, 3].

  With `size`, JPEG decoding is allowed to downscale by a power of two (PIL's
  draft mode) while staying >= size, which makes large photos cheap.
  """
  if isinstance(data, np.ndarray):
    arr = data
    if arr.ndim == 2:
      arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape[:2]) == 0:
      raise BadImage(f"image array has shape {arr.shape}; expected [H, W, 1|3|4]")
    if arr.dtype != np.uint8:
      raise BadImage(f"image array has dtype {arr.dtype}; expected uint8")
    if arr.shape[-1] == 1:
      arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])
  if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
    raise BadImage("empty or non-bytes image data")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      if size is not None and img.format == "JPEG":
        img.draft("RGB", (size, size))
      img = img.convert("RGB")
      arr = np.asarray(img)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, bomb errors...
    raise BadImage(f"cannot decode image: {type(e).__name__}: {e}") from e
  if min(arr.shape[:2]) == 0:
    raise BadImage("image has a zero-sized side")
  return arr


def resize_longer(img: np.ndarray, size: int) -> np.ndarray:
  """uint8 [h, w, 3] -> [h', w', 3] with max(h', w') == size, aspect preserved."""
  h, w = img.shape[:2]
  scale = size / max(h, w)
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  if (nh, nw) == (h, w):
    return img
  return np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))


def jitter_factors(strength: float, rng: np.random.Generator) -> np.ndarray:
  """Brightness, contrast and saturation factors, each uniform in 1 +- strength."""
  return rng.uniform(1 - strength, 1 + strength, size=3).astype(np.float32)


def colour_jitter(x: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """float32 [H, W, 3] in 0..255 -> the same with brightness, contrast, saturation scaled."""
  b, c, s = factors
  x = x * b
  mean = x.mean()
  x = (x - mean) * c + mean
  gray = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
  x = gray + (x - gray) * s
  return np.clip(x, 0, 255)


def process(frames: Sequence[np.ndarray], cfg: ImageConfig, rng: Optional[np.random.Generator],
            train: bool) -> np.ndarray:
  """T decoded frames of one image/video -> float32 [T, size, size, 3], normalised.

  rng is only used when train is True.
  """
  size = cfg.size
  flip, factors = False, None
  if train:
    flip = cfg.flip and bool(rng.random() < 0.5)
    if cfg.colour_jitter > 0:
      factors = jitter_factors(cfg.colour_jitter, rng)
  mean = np.asarray(cfg.mean, np.float32)
  std = np.asarray(cfg.std, np.float32)
  out = np.empty((len(frames), size, size, 3), np.float32)
  for t, frame in enumerate(frames):
    x = resize_longer(frame, size).astype(np.float32)
    if factors is not None:
      x = colour_jitter(x, factors)
    if flip:
      x = x[:, ::-1]
    h, w = x.shape[:2]
    top, left = (size - h) // 2, (size - w) // 2
    out[t] = mean
    out[t, top:top + h, left:left + w] = x
  out -= mean
  out /= std
  return out
