"""The grain transformation: raw example -> model example, or a skip marker.

Runs in the worker processes (decoding is the expensive part). Randomness
(window start, p_next, the caption space, flips, colour jitter, video clip
start) comes only from the per-element generator grain derives from the seed
and the element's index, so the output does not depend on the worker count.

A model example (before batching):
  tokens int32 [L], targets int32 [L], loss_mask float32 [L],
  images float32 [N, T, H, W, 3] (slots past image_count are zeros),
  image_count int32 [], next_image bool [], plus "_stats" (informational
  counts, removed by the accounting step before batching).
"""
from __future__ import annotations

import logging
import traceback
from typing import Any

import grain
import numpy as np

from flamingo_jax.data import images as images_lib
from flamingo_jax.data import layouts, video
from flamingo_jax.data.config import DatasetConfig, ImageConfig, dataset_config
from flamingo_jax.data.records import STATS_KEY, skip, skip_reason
from flamingo_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class ProcessExample(grain.transforms.RandomMap):
  """Tokenises, lays out and decodes one raw example (records.py)."""

  def __init__(self, cfg: DatasetConfig, image_cfg: ImageConfig, tokenizer: Tokenizer,
               train: bool):
    cfg = dataset_config(cfg)
    self.cfg, self.image_cfg, self.tok, self.train = cfg, image_cfg, tokenizer, train
    self.info = tokenizer.info

  def random_map(self, record: Any, rng: np.random.Generator) -> dict:
    if skip_reason(record) is not None:
      return record
    key = record.get("key", "") if isinstance(record, dict) else ""
    if not isinstance(record, dict):
      return skip("unreadable_record", key)
    try:
      if self.cfg.kind == "interleaved":
        out = self._interleaved(record, rng)
      else:
        out = self._captioned(record, rng)
    except Exception:  # a bug or data nobody anticipated: never stop the run
      log.warning("processing_error on %s:\n%s", key, traceback.format_exc())
      return skip("processing_error", key)
    if skip_reason(out) is None:
      stats = dict(record.get(STATS_KEY, {}))
      for k, v in out.pop("_layout_stats", {}).items():
        stats[k] = stats.get(k, 0) + v
      out[STATS_KEY] = stats
    return out

  # ---------------------------------------------------------------- pieces

  def _text(self, record: dict, field: str, rng: np.random.Generator):
    """The caption (one of several, at random in training) or a skip."""
    text = record.get(field)
    if isinstance(text, (list, tuple)):
      text = [t for t in text if isinstance(t, str) and t.strip()]
      if not text:
        return None, "empty_text"
      text = text[int(rng.integers(len(text)))] if self.train else text[0]
    if not isinstance(text, str):
      return None, "missing_field"
    if not text.strip():
      return None, "empty_text"
    if len(text) > self.cfg.max_text_chars:
      return None, "text_too_long"
    return text, None

  def _empty_images(self) -> np.ndarray:
    c = self.cfg
    s = self.image_cfg.size
    return np.zeros((c.max_images, c.num_frames, s, s, 3), np.float32)

  def _example(self, layout: layouts.Layout, images: np.ndarray, next_image: bool) -> dict:
    return {
        "tokens": layout.tokens, "targets": layout.targets, "loss_mask": layout.loss_mask,
        "images": images, "image_count": np.int32(len(layout.images)),
        "next_image": np.bool_(next_image), "_layout_stats": layout.stats,
    }

  def _frames(self, record: dict, rng: np.random.Generator) -> list[np.ndarray]:
    c = self.cfg
    size = self.image_cfg.size
    if "image" in record:
      return [images_lib.decode(record["image"], size)] * c.num_frames
    if "frames" in record:
      frames = record["frames"]
      if not isinstance(frames, (list, tuple)) or not frames:
        raise images_lib.BadImage("empty frame list")
      fps = float(record.get("fps") or 1.0)
      start = video.clip_start(len(frames) / fps, c.fps, c.num_frames, rng, self.train,
                               1 / fps)
      idx = video.frame_indices(len(frames), fps, c.fps, c.num_frames, start)
      decoded = {i: images_lib.decode(frames[i], size) for i in sorted(set(idx))}
      return [decoded[i] for i in idx]
    return video.decode_file(record["video"], c.fps, c.num_frames, rng, self.train)

  # ---------------------------------------------------------------- kinds

  def _captioned(self, record: dict, rng: np.random.Generator) -> dict:
    c, key = self.cfg, record.get("key", "")
    needed = ("image",) if c.kind == "pairs" else ("frames", "video")
    if not any(record.get(f) is not None for f in needed) or "text" not in record:
      return skip("missing_field", key)
    text, reason = self._text(record, "text", rng)
    if reason:
      return skip(reason, key)
    if self.train and rng.random() < c.space_prob:
      text = " " + text
    layout = layouts.captioned(self.tok.encode(text), self.info, c.seq_len, c.overlong_text)
    if layout is None:
      return skip("text_too_long", key)
    try:
      frames = self._frames(record, rng)
    except images_lib.BadImage:
      return skip("corrupt_image", key)
    except video.VideoDecoderUnavailable:
      return skip("video_decoder_unavailable", key)
    except video.BadVideo:
      return skip("corrupt_video", key)
    images = self._empty_images()
    images[0] = images_lib.process(frames, self.image_cfg, rng, self.train)
    next_image = bool(rng.random() < c.p_next)
    if not layout.loss_mask.any():
      return skip("all_labels_masked", key)
    return self._example(layout, images, next_image)

  def _interleaved(self, record: dict, rng: np.random.Generator) -> dict:
    c, key = self.cfg, record.get("key", "")
    texts, raw_images = record.get("texts"), record.get("images")
    if not isinstance(texts, list) or not isinstance(raw_images, list):
      return skip("missing_field", key)
    if len(texts) != len(raw_images):
      return skip("malformed_json", key)
    pieces: list[Any] = []  # str or image index
    doc_images: list[Any] = []
    chars = 0
    for t, im in zip(texts, raw_images):
      if im is not None:
        pieces.append(len(doc_images))
        doc_images.append(im)
      if isinstance(t, str) and t:
        pieces.append(t)
        chars += len(t)
    if chars > c.max_text_chars:
      return skip("text_too_long", key)
    if not doc_images:
      return skip("no_image", key)
    encoded = [p if isinstance(p, int) else self.tok.encode(p) for p in pieces]
    next_image = bool(rng.random() < c.p_next)
    size = self.image_cfg.size
    bad: set[int] = set()
    decoded: dict[int, np.ndarray] = {}
    stats: dict[str, int] = {}
    while True:
      items = [p for p in encoded if not (isinstance(p, int) and p in bad)]
      layout = layouts.interleaved(items, self.info, c.seq_len, c.max_images,
                                   c.mask_text_before_first_image, next_image,
                                   rng if self.train else None)
      if layout is None:  # every image failed to decode
        return skip("corrupt_image", key)
      failed = False
      for i in layout.images:
        if i in decoded:
          continue
        try:
          decoded[i] = images_lib.decode(doc_images[i], size)
        except images_lib.BadImage:
          bad.add(i)
          stats["dropped_image/corrupt_image"] = stats.get("dropped_image/corrupt_image", 0) + 1
          failed = True
      if not failed:
        break
    if not layout.loss_mask.any():
      return skip("all_labels_masked", key)
    images = self._empty_images()
    for slot, i in enumerate(layout.images):
      images[slot] = images_lib.process([decoded[i]], self.image_cfg, rng, self.train)
    for k, v in stats.items():
      layout.stats[k] = layout.stats.get(k, 0) + v
    return self._example(layout, images, next_image)


def example_spec(cfg: DatasetConfig, image_cfg: ImageConfig) -> dict[str, tuple]:
  """(shape, dtype) of each field of one model example (no batch dimension)."""
  cfg = dataset_config(cfg)
  s = image_cfg.size
  return {
      "tokens": ((cfg.seq_len,), np.int32), "targets": ((cfg.seq_len,), np.int32),
      "loss_mask": ((cfg.seq_len,), np.float32),
      "images": ((cfg.max_images, cfg.num_frames, s, s, 3), np.float32),
      "image_count": ((), np.int32), "next_image": ((), np.bool_),
  }

