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

from flamingo_jax.data.records import add_stat, skip

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
    return skip("malformed_json", key)
  image = next((members[e] for e in IMAGE_EXTS if e in members), None)
  text = _caption(members, doc)
  if image is None or text is None:
    return skip("missing_field", key)
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


def _resolve_image(entry: Any, lookup: Lookup, rec: dict) -> Optional[bytes]:
  """Image bytes of an OBELICS/MMC4 entry, or None (counted) when unusable."""
  if isinstance(entry, dict):  # HF datasets style {"bytes": ..., "path": ...}
    if isinstance(entry.get("bytes"), (bytes, bytearray)):
      return bytes(entry["bytes"])
    entry = entry.get("bytes") or entry.get("path")
  if isinstance(entry, (bytes, bytearray)):
    return bytes(entry)
  if not isinstance(entry, str) or not entry:
    add_stat(rec, "dropped_image/missing_image")
    return None
  data = lookup(entry)
  if data is not None:
    return data
  if entry.startswith(("http://", "https://")):  # never downloaded
    add_stat(rec, "dropped_image/missing_image")
    return None
  data = _decode_b64(entry)
  if data is None:
    add_stat(rec, "dropped_image/missing_image")
  return data


def _obelics(key: str, doc: dict, lookup: Lookup) -> dict:
  texts, images = doc.get("texts"), doc.get("images")
  if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
    return skip("malformed_json", key)
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
  return rec


def _mmc4(key: str, doc: dict, lookup: Lookup, min_similarity: float) -> dict:
  sents, infos = doc.get("text_list"), doc.get("image_info", [])
  if not isinstance(sents, list) or not isinstance(infos, list):
    return skip("malformed_json", key)
  rec: dict[str, Any] = {"key": key, "texts": [], "images": []}
  before: dict[int, list[bytes]] = {}
  for info in infos:
    if not isinstance(info, dict):
      return skip("malformed_json", key)
    sim = info.get("matched_sim")
    if isinstance(sim, (int, float)) and sim < min_similarity:
      add_stat(rec, "dropped_image/low_similarity")
      continue
    idx = info.get("matched_text_index")
    if not isinstance(idx, int) or not 0 <= idx < len(sents):
      add_stat(rec, "dropped_image/bad_text_index")
      continue
    entry = info.get("image_base64") or info.get("image_name")
    data = _resolve_image(entry, lookup, rec)
    if data is not None:
      before.setdefault(idx, []).append(data)
  for i, s in enumerate(sents):
    for data in before.get(i, []):
      rec["texts"].append(None)
      rec["images"].append(data)
    if isinstance(s, str) and s:
      rec["texts"].append(s)
      rec["images"].append(None)
  return rec


def parse_interleaved(key: str, members: dict[str, bytes], lookup: Lookup,
                      min_similarity: float = 0.24) -> dict:
  doc, ok = _json(members)
  if not ok:
    return skip("malformed_json", key)
  if doc is None:
    return skip("missing_field", key)
  if "texts" in doc:
    return _obelics(key, doc, lookup)
  if "text_list" in doc:
    return _mmc4(key, doc, lookup, min_similarity)
  return skip("malformed_json", key)


def parse_video(key: str, members: dict[str, bytes]) -> dict:
  doc, ok = _json(members)
  if not ok:
    return skip("malformed_json", key)
  text = _caption(members, doc)
  if text is None:
    return skip("missing_field", key)
  frames = sorted((int(m.group(1)), ext) for ext in members
                  if (m := FRAME_RE.match(ext)) is not None)
  if frames:
    fps = doc.get("fps", 1.0) if doc is not None else 1.0
    if not isinstance(fps, (int, float)) or fps <= 0:
      return skip("malformed_json", key)
    return {"key": key, "frames": [members[ext] for _, ext in frames], "fps": float(fps),
            "text": text}
  ext = next((e for e in VIDEO_EXTS if e in members), None)
  if ext is None:
    return skip("missing_field", key)
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
