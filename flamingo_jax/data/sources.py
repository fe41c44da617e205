"""Random-access sources of raw examples: tar shards, ArrayRecord files, TFDS.

Each is a grain RandomAccessDataSource (`__len__`, `__getitem__`) whose items
are the raw example dicts of records.py (or skip markers), so the rest of the
pipeline does not care where the data lives. `counts` holds shard-level
problems found while opening ("shards/unreadable": n); a source whose files
are all unusable is a configuration error and raises.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from flamingo_jax.data.config import DatasetConfig
from flamingo_jax.data.records import KIND_KEY, decode_record, skip
from flamingo_jax.data.tar import TarSource
from flamingo_jax.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_TFDS_FIELDS = {
    "pairs": {"image": "image", "text": "caption"},
    "interleaved": {"texts": "texts", "images": "images"},
    "video": {"frames": "video", "text": "caption"},
}


def expand_paths(patterns: Sequence[str], what: str = "files") -> list[str]:
  """Sorted, de-duplicated matches of glob patterns; an unmatched pattern is an error."""
  out: list[str] = []
  for pat in patterns:
    found = sorted(glob.glob(os.path.expanduser(pat)))
    if not found:
      raise ValueError(f"no {what} match {pat!r}")
    out.extend(found)
  return list(dict.fromkeys(out))


class ArrayRecordSource:
  """msgpack records (written by convert.py) in ArrayRecord files."""

  def __init__(self, kind: str, paths: Sequence[str]):
    from array_record.python.array_record_module import ArrayRecordReader
    import grain
    self.kind = kind
    self.num_files = len(paths)
    self.counts: dict[str, int] = {}
    good = []
    for p in paths:
      try:
        reader = ArrayRecordReader(p)
        n = reader.num_records()
        reader.close()
      except Exception as e:  # array_record raises RuntimeError/ValueError/OSError
        log.warning("ArrayRecord file %s is unreadable: %s", p, e)
        self.counts["shards/unreadable"] = self.counts.get("shards/unreadable", 0) + 1
        continue
      if n:
        good.append(p)
    if not good:
      raise ValueError(f"no readable, non-empty ArrayRecord file among {list(paths)}")
    self.paths = good
    self._source = grain.sources.ArrayRecordDataSource(good)
    first = self[0]
    if KIND_KEY in first and first[KIND_KEY] != kind:
      raise ValueError(f"{good[0]} holds {first[KIND_KEY]!r} records but the dataset is "
                       f"configured with kind={kind!r}")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    try:
      return decode_record(self._source[index])
    except Exception as e:  # I/O, corrupt chunk, bad msgpack
      log.warning("cannot read ArrayRecord record %d: %s", index, e)
      return skip("unreadable_record", f"record {index}")

  def __repr__(self) -> str:
    return f"ArrayRecordSource(kind={self.kind!r}, files={len(self.paths)}, records={len(self)})"


def _get(example: Mapping[str, Any], path: str):
  node = example
  for part in path.split("/"):
    node = node[part]
  return node


def _text(v):
  if isinstance(v, (bytes, np.bytes_)):
    return bytes(v).decode("utf-8", errors="replace")
  if isinstance(v, np.ndarray) and v.ndim == 0:
    return _text(v.item())
  if isinstance(v, (list, tuple, np.ndarray)):
    return [_text(x) for x in v]
  return v


class TfdsSource:
  """A TFDS dataset prepared with file_format=array_record, via tfds.data_source.

  `fields` maps our field names (records.py) to TFDS feature paths. TensorFlow
  is not needed to read: TFDS decodes with numpy/PIL.
  """

  def __init__(self, kind: str, name: str, split: str, data_dir: str = "",
               fields: Mapping[str, str] | None = None):
    self.kind, self.name, self.split = kind, name, split
    self.data_dir = data_dir or None
    self.fields = dict(fields or DEFAULT_TFDS_FIELDS[kind])
    self.counts: dict[str, int] = {}
    self._ds = None
    n = len(self._open())
    if n == 0:
      raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
    example = self._open()[0]
    for ours, theirs in self.fields.items():
      try:
        _get(example, theirs)
      except (KeyError, TypeError):
        raise ValueError(f"TFDS dataset {name!r} has no feature {theirs!r} (for field "
                         f"{ours!r}); its features: {sorted(example)}") from None

  def _open(self):
    if self._ds is None:
      import tensorflow_datasets as tfds
      try:
        self._ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
      except Exception as e:  # tfds raises many types for a missing dataset
        raise ValueError(f"cannot open TFDS dataset {self.name!r} split {self.split!r} in "
                         f"{self.data_dir or 'the default data_dir'}: {e}") from e
    return self._ds

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int) -> dict:
    key = f"{self.name}/{self.split}/{index}"
    try:
      example = self._open()[int(index)]
    except Exception as e:
      log.warning("cannot read TFDS record %s: %s", key, e)
      return skip("unreadable_record", key)
    rec: dict[str, Any] = {"key": key}
    try:
      for ours, theirs in self.fields.items():
        v = _get(example, theirs)
        if ours in ("text", "texts"):
          v = _text(v)
        elif ours == "frames":
          v = list(np.asarray(v))
        elif ours == "images":
          v = [None if (x is None or np.size(x) == 0) else x for x in v]
        elif ours == "fps":
          v = float(np.asarray(v))
        rec[ours] = v
    except (KeyError, TypeError, ValueError):
      return skip("missing_field", key)
    if self.kind == "interleaved":
      rec["texts"] = [t or None for t in rec.get("texts", [])]
    if self.kind == "video":
      rec.setdefault("fps", 1.0)
    return rec

  def __getstate__(self):
    return {**self.__dict__, "_ds": None}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, kind={self.kind!r})"


def make_source(cfg: DatasetConfig, where: str = ""):
  """The source a dataset config names; a DataError (prefixed with `where`, the
  config key of the dataset) when nothing readable is there."""
  try:
    return _open_source(cfg)
  except ValueError as e:
    raise DataError(f"{where}: {e}" if where else str(e)) from e


def _open_source(cfg: DatasetConfig):
  if cfg.source == "tar":
    src = TarSource(cfg.kind, expand_paths(cfg.paths, "tar shards"),
                    min_similarity=cfg.min_similarity)
    if len(src) == 0:
      problems = src.bad_shards or f"none, but no sample has the members kind={cfg.kind!r} needs"
      raise ValueError(f"no samples in the tar shards {list(cfg.paths)}; problems: {problems}")
    return src
  if cfg.source == "arrayrecord":
    return ArrayRecordSource(cfg.kind, expand_paths(cfg.paths, "ArrayRecord files"))
  if cfg.source == "tfds":
    return TfdsSource(cfg.kind, cfg.tfds_name, cfg.tfds_split, cfg.tfds_data_dir,
                      cfg.tfds_fields or None)
  raise ValueError(f"unknown source {cfg.source!r}; expected tar, arrayrecord or tfds")
