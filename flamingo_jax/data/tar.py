"""Random access into WebDataset tar shards, for grain's global shuffle.

A tar is sequential, but an uncompressed one can be indexed: reading only the
512-byte member headers gives each member's offset and size, and a sample is
then a few `pread`s away. Indexing reads one header per member of every
shard (microseconds each, parsed here rather than by tarfile, which is 20x
slower), so it suits up to millions of samples; for LAION/MMC4-scale data convert the
shards to ArrayRecord once (convert.py). Members are grouped WebDataset-style:
"dir/KEY.EXT" where KEY stops at the first dot of the file name.

A shard with nothing readable is counted as "shards/unreadable"; one that
breaks partway (ends early, or a corrupt header) keeps the samples before the
break and counts as "shards/truncated". Neither stops indexing the others.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
from typing import Optional, Sequence

import numpy as np

from flamingo_jax.data import formats
from flamingo_jax.data.records import skip

log = logging.getLogger(__name__)

Span = tuple[int, int]  # (offset of the data, size)


@dataclasses.dataclass
class ShardIndex:
  path: str
  samples: list[tuple[str, dict[str, Span]]]  # (key, {ext: span}) in file order
  names: dict[str, Span]  # every member by full name and by basename
  error: Optional[str] = None  # None | "unreadable" | "truncated"
  message: str = ""


def split_name(name: str) -> tuple[str, str]:
  """'dir/000012.0003.jpg' -> ('dir/000012', '0003.jpg')."""
  head, _, base = name.rpartition("/")
  key, _, ext = base.partition(".")
  return (f"{head}/{key}" if head else key), ext


class TarFormatError(ValueError):
  """A tar header that does not parse (corruption, or not a tar)."""


def _number(field: bytes) -> int:
  if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
    return int.from_bytes(field[1:], "big")
  field = field.split(b"\0", 1)[0].strip()
  return int(field, 8) if field else 0


def _pax(data: bytes) -> dict[str, str]:
  out, i = {}, 0
  while i < len(data):
    sp = data.index(b" ", i)
    n = int(data[i:sp])
    key, _, value = data[sp + 1:i + n - 1].partition(b"=")
    out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    i += n
  return out


def iter_members(path: str):
  """Yields (name, data offset, size) of the regular files of an uncompressed tar.

  Reads only the 512-byte headers (ustar, GNU long names, PAX), a few
  microseconds each where tarfile spends ~100; raises TarFormatError at a
  corrupt header and EOFError where the file ends early.
  """
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    pos, long_name, pax = 0, None, {}
    while True:
      f.seek(pos)
      header = f.read(512)
      if len(header) < 512:
        if header or pos == 0:
          raise EOFError(f"file ends inside the header at offset {pos}")
        raise EOFError("no end-of-archive marker: the file was probably cut short")
      if header == bytes(512):
        return
      stored = _number(header[148:156])
      if stored != sum(header[:148]) + 256 + sum(header[156:]):
        raise TarFormatError(f"bad header checksum at offset {pos}")
      size = _number(header[124:136])
      kind = header[156:157]
      data = pos + 512
      pos = data + (size + 511) // 512 * 512
      if kind == b"L":
        f.seek(data)
        long_name = f.read(size).split(b"\0", 1)[0].decode("utf-8", "replace")
        continue
      if kind == b"x":
        f.seek(data)
        pax = _pax(f.read(size))
        continue
      if kind == b"g":
        continue
      name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
      if header[257:263] == b"ustar\0":
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        name = f"{prefix}/{name}" if prefix else name
      name = pax.get("path", long_name or name)
      size = int(pax.get("size", size))
      long_name, pax = None, {}
      if kind in (b"0", b"\0", b"7"):
        if data + size > file_size:
          raise EOFError(f"member {name!r} runs past the end of the file")
        yield name, data, size


def index_shard(path: str, documents_only: bool = False) -> ShardIndex:
  """Member spans of one uncompressed tar; never raises on a bad shard.

  documents_only: a sample is a key with a "json" member (interleaved
  shards, whose other members are images the documents refer to by name).
  """
  out = ShardIndex(path, [], {})
  groups: dict[str, dict[str, Span]] = {}
  try:
    with open(path, "rb") as f:
      magic = f.read(2)
    if magic == b"\x1f\x8b":
      raise TarFormatError("gzip-compressed; random access needs an uncompressed tar "
                           "(gunzip it, or use convert.py)")
    for name, offset, size in iter_members(path):
      span = (offset, size)
      base = name.rpartition("/")[2]
      if documents_only:  # documents refer to their images by member name
        out.names.setdefault(name, span)
        out.names.setdefault(base, span)
      if base.startswith((".", "_")):
        continue  # hidden files, img2dataset's _stats
      key, ext = split_name(name)
      if ext:
        groups.setdefault(key, {})[ext.lower()] = span
  except (EOFError, TarFormatError, OSError, ValueError) as e:
    readable = bool(groups)
    out.error = "truncated" if readable else "unreadable"
    out.message = f"{type(e).__name__}: {e}"
  out.samples = [(k, v) for k, v in groups.items() if not documents_only or "json" in v]
  return out


class _FileCache:
  """Open file descriptors, a few per reading thread (thousands of shards may exist).

  Per thread, so a descriptor is never closed (and its number reused for
  another shard) while another thread is reading through it.
  """

  def __init__(self, capacity: int = 32):
    self._capacity = capacity
    self._local = threading.local()
    self._caches: list[collections.OrderedDict[str, int]] = []
    self._lock = threading.Lock()

  def read(self, path: str, span: Span) -> bytes:
    fds = getattr(self._local, "fds", None)
    if fds is None:
      fds = self._local.fds = collections.OrderedDict()
      with self._lock:
        self._caches.append(fds)
    fd = fds.pop(path, None)
    if fd is None:
      fd = os.open(path, os.O_RDONLY)
    fds[path] = fd
    while len(fds) > self._capacity:
      os.close(fds.popitem(last=False)[1])
    data = os.pread(fd, span[1], span[0])
    if len(data) != span[1]:
      raise OSError(f"{path}: short read at offset {span[0]}")
    return data

  def close(self) -> None:
    with self._lock:
      for fds in self._caches:
        for fd in fds.values():
          os.close(fd)
        fds.clear()


class TarSource:
  """grain RandomAccessDataSource over tar shards; items are raw examples or skips."""

  def __init__(self, kind: str, paths: Sequence[str], *, min_similarity: float = 0.24):
    if kind not in ("pairs", "interleaved", "video"):
      raise ValueError(f"unknown dataset kind {kind!r}; expected pairs, interleaved or video")
    if not paths:
      raise ValueError("TarSource: no shard paths given")
    self.kind = kind
    self.min_similarity = min_similarity
    self.shards = [index_shard(p, documents_only=kind == "interleaved") for p in paths]
    self.num_files = len(self.shards)
    self.counts: dict[str, int] = {}
    for s in self.shards:
      if s.error:
        name = f"shards/{s.error}"
        self.counts[name] = self.counts.get(name, 0) + 1
        log.warning("tar shard %s is %s: %s", s.path, s.error, s.message)
    self._ends = np.cumsum([len(s.samples) for s in self.shards])
    self._files = _FileCache()

  @property
  def bad_shards(self) -> dict[str, str]:
    return {s.path: f"{s.error}: {s.message}" for s in self.shards if s.error}

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"TarSource index {index} out of range [0, {len(self)})")
    si = int(np.searchsorted(self._ends, index, side="right"))
    shard = self.shards[si]
    start = int(self._ends[si - 1]) if si else 0
    key, spans = shard.samples[index - start]
    name = f"{os.path.basename(shard.path)}/{key}"
    try:
      if self.kind == "interleaved":
        members = {"json": self._files.read(shard.path, spans["json"])}
      else:
        members = {ext: self._files.read(shard.path, span) for ext, span in spans.items()}
    except OSError as e:
      log.warning("cannot read sample %s: %s", name, e)
      return skip("unreadable_record", name)

    def lookup(member: str) -> Optional[bytes]:
      span = shard.names.get(member) or shard.names.get(f"{key}.{member}")
      if span is None:
        return None
      try:
        return self._files.read(shard.path, span)
      except OSError:
        return None

    return formats.parse_sample(self.kind, name, members, lookup, self.min_similarity)

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_files"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._files = _FileCache()

  def __del__(self):
    if "_files" in self.__dict__:
      self._files.close()

  def __repr__(self) -> str:
    return f"TarSource(kind={self.kind!r}, shards={len(self.shards)}, samples={len(self)})"
