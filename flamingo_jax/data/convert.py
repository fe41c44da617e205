"""Converts WebDataset tar shards to ArrayRecord, for global shuffling at any scale.

  python -m flamingo_jax.data.convert --kind pairs --input 'laion/*.tar' --out DIR

Each sample is parsed once (formats.py: img2dataset pairs, MMC4/OBELICS
documents with their images resolved to bytes, video frame lists or files)
and written as one msgpack record (records.py). Images stay encoded; they are
decoded at training time, where a bad one is skipped and counted, or here
with --check_images. Samples that cannot be parsed are counted, not written.
Output: DIR/PREFIX-00000-of-000NN.array_record and DIR/PREFIX.json (counts).
ArrayRecord files are written with group_size:1, so any record can be read
alone: grain's shuffle is then global, not per shard.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional, Sequence

from flamingo_jax.data import images as images_lib
from flamingo_jax.data.records import encode_record, skip_reason
from flamingo_jax.data.sources import expand_paths
from flamingo_jax.data.tar import TarSource
from flamingo_jax.errors import ArgumentParser, run_cli

log = logging.getLogger(__name__)


def _images_ok(kind: str, rec: dict) -> bool:
  if kind == "pairs":
    blobs = [rec["image"]]
  elif kind == "interleaved":
    blobs = [im for im in rec["images"] if im is not None]
  else:
    blobs = rec.get("frames", [])
  try:
    for b in blobs:
      images_lib.decode(b)
  except images_lib.BadImage:
    return False
  return True


def write_arrayrecord(records, out_dir: str, prefix: str, kind: str,
                      records_per_file: int = 10_000) -> list[str]:
  """Writes raw examples (an iterable of dicts) to numbered ArrayRecord files."""
  from array_record.python.array_record_module import ArrayRecordWriter
  if records_per_file <= 0:
    raise ValueError(f"records_per_file must be positive, got {records_per_file}")
  os.makedirs(out_dir, exist_ok=True)
  tmp: list[str] = []
  writer, n = None, 0
  for rec in records:
    if writer is None or n == records_per_file:
      if writer is not None:
        writer.close()
      tmp.append(os.path.join(out_dir, f".{prefix}-{len(tmp):05d}.tmp"))
      writer, n = ArrayRecordWriter(tmp[-1], "group_size:1"), 0
    writer.write(encode_record(rec, kind))
    n += 1
  if writer is not None:
    writer.close()
  paths = []
  for i, t in enumerate(tmp):
    final = os.path.join(out_dir, f"{prefix}-{i:05d}-of-{len(tmp):05d}.array_record")
    os.replace(t, final)
    paths.append(final)
  return paths


def convert(kind: str, inputs: Sequence[str], out_dir: str, *, prefix: str = "data",
            records_per_file: int = 10_000, min_similarity: float = 0.24,
            check_images: bool = False) -> dict:
  """Tar shards (glob patterns) -> ArrayRecord files; returns the summary it writes."""
  if records_per_file <= 0:
    raise ValueError(f"records_per_file must be positive, got {records_per_file}")
  paths = expand_paths(inputs, "tar shards")
  src = TarSource(kind, paths, min_similarity=min_similarity)
  counts: dict[str, int] = dict(src.counts)
  written = 0

  def good_records():
    nonlocal written
    for i in range(len(src)):
      rec = src[i]
      reason = skip_reason(rec)
      if reason is None and check_images and not _images_ok(kind, rec):
        reason = "corrupt_image"
      if reason is not None:
        counts[f"skipped/{reason}"] = counts.get(f"skipped/{reason}", 0) + 1
        continue
      written += 1
      yield rec

  files = write_arrayrecord(good_records(), out_dir, prefix, kind, records_per_file)
  summary = {"kind": kind, "records": written, "files": [os.path.basename(f) for f in files],
             "inputs": [os.path.relpath(p, out_dir) for p in paths],
             "counts": dict(sorted(counts.items())),
             "bad_shards": {os.path.relpath(p, out_dir): m for p, m in src.bad_shards.items()}}
  with open(os.path.join(out_dir, f"{prefix}.json"), "w") as f:
    json.dump(summary, f, indent=2)
  if not written:
    raise ValueError(f"no usable samples in {list(inputs)}: {summary['counts']}")
  return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
  p = ArgumentParser(prog="python -m flamingo_jax.data.convert",
                     description=__doc__.split("\n\n")[0])
  p.add_argument("--kind", required=True, choices=["pairs", "interleaved", "video"])
  p.add_argument("--input", nargs="+", required=True, help="glob patterns of .tar shards")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--prefix", default="data", help="output file name prefix, e.g. train")
  p.add_argument("--records_per_file", type=int, default=10_000)
  p.add_argument("--min_similarity", type=float, default=0.24,
                 help="MMC4: drop images matched to their sentence below this score")
  p.add_argument("--check_images", action="store_true",
                 help="decode every image now and skip the corrupt ones")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  summary = convert(a.kind, a.input, a.out, prefix=a.prefix,
                    records_per_file=a.records_per_file, min_similarity=a.min_similarity,
                    check_images=a.check_images)
  print(json.dumps({k: v for k, v in summary.items() if k != "inputs"}, sort_keys=True))


if __name__ == "__main__":
  sys.exit(run_cli(main))
