"""Parses one WebDataset sample (its tar members) into a raw example (records.py).

Layouts understood:
  pairs        img2dataset: KEY.jpg|png|webp + KEY.txt (caption) and/or KEY.json
               ({"caption"|"text": ..., "label"?: int}).
  interleaved  KEY.json holding either an OBELICS document
               {"texts": [str|null], "images": [img|null]} or an MMC4 document
               {"text_list": [...], "image_info": [{"matched_text_index",
               "matched_sim", "image_base64" | "image_name"}]}. An image is
               base64 (or a data: URI), or the name of another member of the
               same shard. MMC4 images go before their matched sentence, as in
               OpenFlamingo; those below `min_similarity` are dropped.
  video        KEY.json ({"caption"|"text", "fps"}) and/or KEY.txt, plus either
               pre-extracted frames KEY.0000.jpg, KEY.0001.jpg, ... (or
               KEY.frame_0000.jpg) recorded at "fps" (default 1), or one
               video file KEY.mp4|webm|mkv|avi|mov|gif (decoded with PyAV).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Callable, Optional

from flamingo_jax.data.records import STATS_KEY, add_stat, skip

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "gif")
FRAME_RE = re.compile(r"^(?:frames?[._-]?)?(\d+)\.(jpg|jpeg|png|webp|bmp)$")

Lookup = Callable[[str], Optional[bytes]]


def _json(members: dict[str, bytes]) -> tuple[Optional[dict], bool]:
  """(parsed json or None, ok); ok=False when present but malformed."""
  raw = members.get("json")
  if raw is None:
    return None, True
  try:
    doc = json.loads(raw)
  except (ValueError, UnicodeDecodeError):
    return None, False
  return (doc, True) if isinstance(doc, dict) else (None, False)


def _caption(members: dict[str, bytes], doc: Optional[dict]) -> Optional[str]:
  if "txt" in members:
    return members["txt"].decode("utf-8", errors="replace")
  if doc is not None:
    for k in ("caption", "text"):
      if isinstance(doc.get(k), str):
        return doc[k]
  return None


def parse_pairs(key: str, members: dict[str, bytes]) -> dict:
  doc, ok = _json(members)
  if not ok:
    return skip("malformed_json", key, "the .json member does not parse as an object")
  image = next((members[e] for e in IMAGE_EXTS if e in members), None)
  text = _caption(members, doc)
  if image is None or text is None:
    return skip("missing_field", key, "no image member" if image is None else
                "no caption (.txt, or 'caption'/'text' in the .json)")
  rec: dict[str, Any] = {"key": key, "image": image, "text": text}
  if doc is not None and isinstance(doc.get("label"), int):
    rec["label"] = doc["label"]
  return rec


def _decode_b64(s: str) -> Optional[bytes]:
  if s.startswith("data:"):
    s = s.partition(",")[2]
  try:
    out = base64.b64decode(s, validate=True)
  except (binascii.Error, ValueError):
    return None
  return out or None


def _looks_like_name(s: str) -> bool:
  """A member name or URL rather than base64 (whose alphabet has no '.')."""
  return not s.startswith("data:") and "." in s


def _resolve_image(entry: Any, lookup: Lookup, rec: dict, encoding: str = "auto"
                   ) -> Optional[bytes]:
  """Image bytes of an OBELICS/MMC4 entry, or None (counted by cause) when unusable.

  encoding: "base64" (MMC4 image_base64), "name" (MMC4 image_name: a shard
  member) or "auto" (OBELICS: a member name, a URL, or base64).
  Causes: dropped_image/missing_image (no data), image_not_found (a URL or a
  name the shard does not hold), bad_base64 (inline data that does not decode).
  """
  if isinstance(entry, dict):  # HF datasets style {"bytes": ..., "path": ...}
    if isinstance(entry.get("bytes"), (bytes, bytearray)):
      return bytes(entry["bytes"])
    entry = entry.get("bytes") or entry.get("path")
  if isinstance(entry, (bytes, bytearray)):
    return bytes(entry)
  if not isinstance(entry, str) or not entry:
    add_stat(rec, "dropped_image/missing_image")
    return None
  if encoding != "base64":
    data = lookup(entry)
    if data is not None:
      return data
    if encoding == "name" or entry.startswith(("http://", "https://")) or \
        _looks_like_name(entry):  # URLs are never downloaded
      add_stat(rec, "dropped_image/image_not_found")
      return None
  data = _decode_b64(entry)
  if data is None:
    add_stat(rec, "dropped_image/bad_base64")
  return data


# A document left without images is skipped for the cause that removed them.
_DROP_TO_SKIP = {"dropped_image/missing_image": "no_image",
                 "dropped_image/image_not_found": "image_not_found",
                 "dropped_image/bad_base64": "bad_base64",
                 "dropped_image/bad_text_index": "bad_text_index",
                 "dropped_image/low_similarity": "low_similarity"}


def _without_images(key: str, rec: dict, detail: str = "") -> Optional[dict]:
  """The skip for a document with no usable image (its commonest drop cause), or None."""
  if any(im is not None for im in rec["images"]):
    return None
  drops = {k: v for k, v in rec.get(STATS_KEY, {}).items() if k in _DROP_TO_SKIP}
  if not drops:
    return skip("no_image", key, detail)
  cause = max(drops, key=drops.get)  # ties: the first cause met
  counts = ", ".join(f"{k.partition('/')[2]}={v}" for k, v in drops.items())
  return skip(_DROP_TO_SKIP[cause], key, "; ".join(filter(None, [f"images: {counts}",
                                                                 detail])))


def _obelics(key: str, doc: dict, lookup: Lookup) -> dict:
  texts, images = doc.get("texts"), doc.get("images")
  if images is None:
    return skip("missing_field", key, "OBELICS document without 'images'")
  if not isinstance(texts, list) or not isinstance(images, list):
    return skip("malformed_json", key, "'texts' and 'images' must be lists")
  if len(texts) != len(images):
    return skip("malformed_json", key, f"{len(texts)} texts but {len(images)} images")
  rec: dict[str, Any] = {"key": key, "texts": [], "images": []}
  for t, im in zip(texts, images):
    if im is not None:
      data = _resolve_image(im, lookup, rec)
      if data is not None:
        rec["texts"].append(None)
        rec["images"].append(data)
    if isinstance(t, str) and t:
      rec["texts"].append(t)
      rec["images"].append(None)
  return _without_images(key, rec) or rec


def _mmc4(key: str, doc: dict, lookup: Lookup, min_similarity: float) -> dict:
  sents, infos = doc.get("text_list"), doc.get("image_info", [])
  if not isinstance(sents, list) or not isinstance(infos, list):
    return skip("malformed_json", key, "'text_list' and 'image_info' must be lists")
  rec: dict[str, Any] = {"key": key, "texts": [], "images": []}
  before: dict[int, list[bytes]] = {}
  bad_index = None
  for info in infos:
    if not isinstance(info, dict):
      return skip("malformed_json", key, "an 'image_info' entry is not an object")
    sim = info.get("matched_sim")
    if isinstance(sim, (int, float)) and sim < min_similarity:
      add_stat(rec, "dropped_image/low_similarity")
      continue
    idx = info.get("matched_text_index")
    if not isinstance(idx, int) or not 0 <= idx < len(sents):
      add_stat(rec, "dropped_image/bad_text_index")
      bad_index = bad_index or (f"matched_text_index {idx!r} is not in [0, {len(sents)})")
      continue
    if info.get("image_base64"):
      data = _resolve_image(info["image_base64"], lookup, rec, "base64")
    else:
      data = _resolve_image(info.get("image_name"), lookup, rec, "name")
    if data is not None:
      before.setdefault(idx, []).append(data)
  for i, s in enumerate(sents):
    for data in before.get(i, []):
      rec["texts"].append(None)
      rec["images"].append(data)
    if isinstance(s, str) and s:
      rec["texts"].append(s)
      rec["images"].append(None)
  return _without_images(key, rec, bad_index or "") or rec


def parse_interleaved(key: str, members: dict[str, bytes], lookup: Lookup,
                      min_similarity: float = 0.24) -> dict:
  doc, ok = _json(members)
  if not ok:
    return skip("malformed_json", key, "the .json member does not parse as an object")
  if doc is None:
    return skip("missing_field", key, "no .json member")
  if "texts" in doc:
    return _obelics(key, doc, lookup)
  if "text_list" in doc:
    return _mmc4(key, doc, lookup, min_similarity)
  if "image_info" in doc:
    return skip("missing_field", key, "MMC4 document without 'text_list'")
  return skip("missing_field", key, "document has neither 'texts' (OBELICS) nor "
              "'text_list' (MMC4)")


def parse_video(key: str, members: dict[str, bytes]) -> dict:
  doc, ok = _json(members)
  if not ok:
    return skip("malformed_json", key, "the .json member does not parse as an object")
  text = _caption(members, doc)
  if text is None:
    return skip("missing_field", key, "no caption (.txt, or 'caption'/'text' in the .json)")
  frames = sorted((int(m.group(1)), ext) for ext in members
                  if (m := FRAME_RE.match(ext)) is not None)
  if frames:
    fps = doc.get("fps", 1.0) if doc is not None else 1.0
    if not isinstance(fps, (int, float)) or fps <= 0:
      return skip("malformed_json", key, f"fps {fps!r} is not a positive number")
    return {"key": key, "frames": [members[ext] for _, ext in frames], "fps": float(fps),
            "text": text}
  ext = next((e for e in VIDEO_EXTS if e in members), None)
  if ext is None:
    return skip("missing_field", key, "neither frames KEY.0000.jpg... nor a video file")
  return {"key": key, "video": members[ext], "video_format": ext, "text": text}


def parse_sample(kind: str, key: str, members: dict[str, bytes], lookup: Lookup,
                 min_similarity: float = 0.24) -> dict:
  if kind == "pairs":
    return parse_pairs(key, members)
  if kind == "interleaved":
    return parse_interleaved(key, members, lookup, min_similarity)
  if kind == "video":
    return parse_video(key, members)
  raise ValueError(f"unknown dataset kind {kind!r}; expected pairs, interleaved or video")
