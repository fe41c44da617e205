"""Checksums of array trees, computed on the devices where the arrays live (sharded), so that
a checkpoint whose bytes were damaged on disk is never restored as if it were intact.

Every element's bits (viewed as uint32 words: float32 / int32 as they are, 16- and 8-bit
types widened) are mixed with their global position by a bijective integer hash (murmur3's
finalizer) and summed modulo 2**32, in two lanes of different position weights: 64 bits
per array. A change of one element always changes lane 0 (the hash is a bijection for a
fixed position); random damage of several elements goes unseen with probability ~2**-64.
The sum does not depend on how the array is sharded (restoring onto another mesh verifies),
and each device reads only its own shard once: the cost is one pass over the state's bytes
(memory bandwidth), then one all-reduce of two words per array. The same jitted function
flags arrays holding NaN or inf (a state that must never be saved).

  record = tree_record(state)          # {name: {"shape", "dtype", "sum"}}, nonfinite names
  verify(record, restored, where)      # a mismatch raises CorruptError(name, cause)
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models.labels import path_str

log = logging.getLogger(__name__)

ALGORITHM = "fmix32-position-sum-x2-v1"  # stored beside the sums; another value: unverifiable
_LANES = ((0x9E3779B1, 0x7F4A7C15), (0x85EBCA77, 0xC2B2AE3D))  # (position weight, offset)


class CorruptError(Exception):
  """An array (or file) of a checkpoint whose content is not what was written."""

  def __init__(self, name: str, cause: str, kind: str = "array"):
    super().__init__(f"{kind} {name}: {cause}")
    self.name, self.cause, self.kind = name, cause, kind


def named_leaves(tree: Any) -> dict[str, Any]:
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words, one per element (a trailing axis of 2 for 64-bit)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f"no checksum for dtype {x.dtype}")


def _sums(x: jax.Array) -> jax.Array:
  """uint32[2]: the two lanes of one array (see the module docstring)."""
  w = _words(x)
  pos = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(w.ndim)):  # the global row-major index, without a reshape
    pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2 ** 32)
    stride *= w.shape[d]
  lanes = []
  for weight, offset in _LANES:
    h = _fmix32(w ^ (pos * jnp.uint32(weight) + jnp.uint32(offset)))
    lanes.append(jnp.sum(h, dtype=jnp.uint32))
  return jnp.stack(lanes)


def _finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.bool_(True)


@jax.jit
def _device_sums(leaves: list) -> tuple[list, list]:
  return [_sums(x) for x in leaves], [_finite(x) for x in leaves]


def _np_words(x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    x = x.view(np.uint8)
  size = x.dtype.itemsize
  if size in (1, 2):
    return x.view(np.dtype(f"uint{8 * size}")).reshape(-1).astype(np.uint32)
  if size in (4, 8):
    return x.view(np.uint32).reshape(-1)
  raise TypeError(f"no checksum for dtype {x.dtype}")


def _np_sums(x: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
  """_sums of a host array, on the host (an export or a converter's tree may not fit
  one device), in chunks of the flat words: equal to the device result."""
  w = _np_words(x)
  out = np.zeros(len(_LANES), np.uint64)
  with np.errstate(over="ignore"):
    for start in range(0, w.size, chunk):
      part = w[start:start + chunk]
      pos = (np.arange(start, start + part.size, dtype=np.uint64) % 2 ** 32).astype(np.uint32)
      for i, (weight, offset) in enumerate(_LANES):
        h = part ^ (pos * np.uint32(weight) + np.uint32(offset))
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
        out[i] = (out[i] + np.sum(h, dtype=np.uint64)) % 2 ** 32
  return out.astype(np.uint32)


def _tree_sums(leaves: list) -> tuple[list, list]:
  """(sums, all finite) per leaf: jax arrays on their devices in one jitted call, host
  arrays on the host."""
  on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
  sums, finite = [None] * len(leaves), [None] * len(leaves)
  if on_device:
    dev_sums, dev_finite = jax.device_get(_device_sums([leaves[i] for i in on_device]))
    for j, i in enumerate(on_device):
      sums[i], finite[i] = dev_sums[j], bool(dev_finite[j])
  for i, x in enumerate(leaves):
    if sums[i] is None:
      x = np.asarray(x)
      sums[i] = _np_sums(x)
      finite[i] = not np.issubdtype(x.dtype, np.inexact) or bool(np.isfinite(x).all())
  return sums, finite


def _hex(lanes) -> str:
  return "".join(f"{int(v):08x}" for v in np.asarray(lanes, np.uint32))


def tree_record(tree: Any) -> tuple[dict, list[str]]:
  """({"algorithm", "arrays": {name: {"shape", "dtype", "sum"}}}, names of arrays holding
  NaN or inf). tree: jax arrays (any sharding; every process calls it, the sums are
  global) and / or host arrays (summed on the host)."""
  named = named_leaves(tree)
  names = list(named)
  sums, finite = _tree_sums([named[n] for n in names])
  arrays = {n: {"shape": list(np.shape(named[n])), "dtype": np.dtype(named[n].dtype).name,
                "sum": _hex(s)} for n, s in zip(names, sums)}
  return ({"algorithm": ALGORITHM, "arrays": arrays},
          [n for n, ok in zip(names, finite) if not bool(ok)])


def stored_dtypes(record: Optional[Mapping]) -> dict[str, str]:
  """{name: dtype as written} of a record (restore in these, verify, then cast)."""
  return {n: a.get("dtype", "") for n, a in ((record or {}).get("arrays") or {}).items()
          if isinstance(a, Mapping)}


def verify(record: Mapping, tree: Any) -> None:
  """Every array of `tree` (as restored, in its stored dtype) equals what was written:
  shape, dtype and sums as in `record`; else CorruptError naming the first that differs.
  Arrays the record has beyond the tree (a partial restore) are not checked."""
  if not isinstance(record, Mapping) or not isinstance(record.get("arrays"), Mapping):
    raise CorruptError("checksums", "the checksum record is not a mapping of arrays", "file")
  if record.get("algorithm") != ALGORITHM:
    raise CorruptError("checksums", f"unknown checksum algorithm {record.get('algorithm')!r}",
                       "file")
  stored = record["arrays"]
  named = named_leaves(tree)
  for name, x in named.items():
    want = stored.get(name)
    if not isinstance(want, Mapping):
      raise CorruptError(name, "no checksum recorded for it (the record or the tree is damaged)")
    if list(want.get("shape", ())) != list(np.shape(x)) or want.get("dtype") != np.dtype(
        x.dtype).name:
      raise CorruptError(name, f"read as {np.dtype(x.dtype).name}{list(np.shape(x))}, written "
                         f"as {want.get('dtype')}{want.get('shape')}")
  names = list(named)
  sums, _ = _tree_sums([named[n] for n in names])
  for name, s in zip(names, sums):
    if _hex(s) != stored[name].get("sum"):
      raise CorruptError(name, f"checksum mismatch (read {_hex(s)}, written "
                         f"{stored[name].get('sum')})")
