"""The raw example every source yields, and the marker for a skipped one.

Sources (tar shards, ArrayRecord, TFDS) all produce the same plain dicts, so
the processing is written once:

  pairs:       {"key", "image": bytes | uint8 [H, W, 3], "text": str | [str], "label"?}
  interleaved: {"key", "texts": [str | None], "images": [bytes | array | None]}
               (parallel lists, OBELICS-style: position i is a text or an image)
  video:       {"key", "frames": [bytes | array], "fps": float, "text": ...}
               or {"key", "video": bytes, "video_format": "mp4", "text": ...}

An optional "_stats" dict carries informational counts found while parsing
(e.g. {"dropped_image/missing_image": 2}). Bad data is never an exception on
the data path: it becomes `skip(reason)`, which flows through the workers to
the accounting step in the main process, where it is counted and dropped.
ArrayRecord files hold these dicts as msgpack (bytes stay bytes, no pickle).
"""
from __future__ import annotations

from typing import Any, Optional

import msgpack

KIND_KEY = "kind"
SKIP_KEY = "_skip"
STATS_KEY = "_stats"

# Why an example was skipped; each counts towards the skip rate.
SKIP_REASONS = {
    "corrupt_image": "an image or video frame failed to decode (corrupt, truncated, "
                     "unsupported format)",
    "corrupt_video": "a video file failed to decode",
    "video_decoder_unavailable": "a video file needs PyAV (pip install av)",
    "missing_field": "a required field (image, caption, frames, json, a document's "
                     "texts/text_list or images) is absent",
    "malformed_json": "the sample's JSON does not parse, or a field has the wrong type "
                      "or structure",
    "empty_text": "the caption is empty",
    "text_too_long": "text longer than max_text_chars, or a caption over seq_len with "
                     "overlong_text='skip'",
    "no_image": "a document with no image (none given, or only empty entries)",
    "bad_base64": "a document whose images are all inline base64 that does not decode",
    "image_not_found": "a document whose images all name a URL (never downloaded) or a "
                       "member the shard does not hold",
    "bad_text_index": "an MMC4 document whose images all have a matched_text_index "
                      "outside text_list",
    "low_similarity": "an MMC4 document whose images are all below min_similarity",
    "all_labels_masked": "no target of the example counts in the loss",
    "unreadable_record": "a record that cannot be read or decoded",
    "processing_error": "an unexpected error while processing (logged with its traceback)",
}

# Informational counters (not skips): images dropped from a kept document,
# captions truncated to seq_len, and shards that could not be (fully) indexed.
INFO_PREFIXES = ("dropped_image/", "truncated_text", "shards/")


def skip(reason: str, key: str = "", detail: str = "") -> dict[str, str]:
  """The marker of a skipped example; `detail` (logged with the first skip of each
  reason) says what exactly was wrong, e.g. which index was out of range."""
  if reason not in SKIP_REASONS:
    raise ValueError(f"unknown skip reason {reason!r}; known: {sorted(SKIP_REASONS)}")
  out = {SKIP_KEY: reason, "key": key}
  if detail:
    out["detail"] = detail
  return out


def skip_reason(x: Any) -> Optional[str]:
  """The reason if `x` is a skip marker, else None."""
  if isinstance(x, dict) and SKIP_KEY in x:
    return x[SKIP_KEY]
  return None


def add_stat(record: dict, name: str, n: int = 1) -> None:
  stats = record.setdefault(STATS_KEY, {})
  stats[name] = stats.get(name, 0) + n


def encode_record(record: dict, kind: str) -> bytes:
  """A raw example as msgpack bytes (the ArrayRecord payload), tagged with its kind."""
  return msgpack.packb({**record, KIND_KEY: kind}, use_bin_type=True)


def decode_record(data: bytes) -> dict:
  out = msgpack.unpackb(data, raw=False, strict_map_key=False)
  if not isinstance(out, dict):
    raise ValueError(f"record is a {type(out).__name__}, not a map")
  return out
