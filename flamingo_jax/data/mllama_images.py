"""Llama 3.2 Vision's image tiling, equal to transformers' MllamaImageProcessor (PIL).

An image [H, W, 3] uint8 goes to the tile layout (rows x cols, rows * cols <=
max_tiles) that needs the least upscaling (or, when every layout must shrink it,
the least downscaling; ties: the smallest canvas), is resized (bilinear, aspect
ratio kept, no side below one tile) to fit that canvas, padded with zeros at the
bottom and right, scaled to [0, 1], normalised by mean / std and cut into tiles in
row-major order. A batch of rows of images becomes

  images            [B, N, T, tile, tile, 3] float32 (padded tiles and slots zero)
  aspect_ratio_ids  [B, N] int32: layout index + 1, 0 for a padded image slot
  tile_mask         [B, N, T] bool: real tiles (the model's `tile_mask`)
  num_tiles         per row, per image

the inputs of `Flamingo(images=..., aspect_ratio_ids=..., tile_mask=...)`.
transformers' aspect_ratio_mask is tile_mask with tile 0 always set, which the
vision encoder applies itself (models/mllama_vision.py).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # mllama's preprocessor_config.json
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
  """Every (rows, cols) with rows * cols <= max_tiles, rows-major: 4 -> (1, 1), (1, 2),
  (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1) (mllama's aspect_ratio_id - 1)."""
  return [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1)
          if r * c <= max_tiles]


def optimal_canvas(height: int, width: int, tile: int,
                   layouts: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """The layout (rows, cols) whose canvas fits the image with the smallest scale >= 1,
  else the largest < 1; ties: the smallest canvas area."""
  sizes = np.array(layouts) * tile  # [K, 2] canvas (height, width)
  scale_h, scale_w = sizes[:, 0] / height, sizes[:, 1] / width
  scales = np.where(scale_w > scale_h, scale_h, scale_w)
  up = scales[scales >= 1]
  chosen = np.min(up) if len(up) else np.max(scales[scales < 1])
  candidates = np.flatnonzero(scales == chosen)
  best = candidates[np.argmin(sizes[candidates, 0] * sizes[candidates, 1])]
  return int(sizes[best, 0]) // tile, int(sizes[best, 1]) // tile


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int,
                  tile: int) -> tuple[int, int]:
  """The resized (height, width): each side clipped to [tile, canvas], the aspect ratio
  kept along the side that shrinks more."""
  target_w = int(np.clip(width, tile, canvas_w))
  target_h = int(np.clip(height, tile, canvas_h))
  scale_h, scale_w = target_h / height, target_w / width
  if scale_w < scale_h:
    return min(math.floor(height * scale_w) or 1, target_h), target_w
  return target_h, min(math.floor(width * scale_h) or 1, target_w)


def tile_image(image: np.ndarray, tile: int, max_tiles: int = 4,
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
               layouts: Optional[Sequence[tuple[int, int]]] = None
               ) -> tuple[np.ndarray, tuple[int, int]]:
  """image [H, W, 3] uint8 -> (tiles [rows * cols, tile, tile, 3] float32, (rows, cols))."""
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
  layouts = list(layouts or supported_aspect_ratios(max_tiles))
  h, w = image.shape[:2]
  rows, cols = optimal_canvas(h, w, tile, layouts)
  nh, nw = fit_to_canvas(h, w, rows * tile, cols * tile, tile)
  resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  canvas = np.zeros((rows * tile, cols * tile, 3), np.float32)
  canvas[:nh, :nw] = resized.astype(np.float32) / 255.0
  canvas = (canvas - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  tiles = canvas.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
  return tiles.reshape(rows * cols, tile, tile, 3), (rows, cols)


def pack(batch: Sequence[Sequence[np.ndarray]], tile: int, max_tiles: int = 4,
         mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
         layouts: Optional[Sequence[tuple[int, int]]] = None) -> dict:
  """Rows of images (uint8 [H, W, 3]) -> the model's image inputs (module docstring)."""
  layouts = list(layouts or supported_aspect_ratios(max_tiles))
  b, n = len(batch), max([len(row) for row in batch] + [1])
  out = dict(images=np.zeros((b, n, max_tiles, tile, tile, 3), np.float32),
             aspect_ratio_ids=np.zeros((b, n), np.int32),
             tile_mask=np.zeros((b, n, max_tiles), bool), num_tiles=[])
  for r, row in enumerate(batch):
    counts = []
    for i, image in enumerate(row):
      tiles, layout = tile_image(image, tile, max_tiles, mean, std, layouts)
      out["images"][r, i, :len(tiles)] = tiles
      out["aspect_ratio_ids"][r, i] = layouts.index(layout) + 1
      out["tile_mask"][r, i, :len(tiles)] = True
      counts.append(len(tiles))
    out["num_tiles"].append(counts)
  return out
