"""Reading weight files (safetensors, torch .pt / .bin, HF model directories) into
float32 numpy arrays, with one-line `CheckpointError`s for bad files.

Every converter reads through here, so a truncated download, an HTML error page
saved as `model.safetensors` or a tower saved without its expected prefix fails
with the file, the tensor and what is wrong, instead of a reshape error, a
MemoryError (a garbage 8-byte header size) or a traceback from torch's zip reader.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Optional

import numpy as np

from flamingo_jax.errors import CheckpointError

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": "bfloat16", "I64": np.int64, "I32": np.int32, "I16": np.int16,
                       "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
# A safetensors header is JSON naming every tensor: far below this even for 70B shards.
_MAX_HEADER_BYTES = 100 * 2**20


def _safetensors_header(path: str) -> tuple[dict, int, int]:
  """(header, data offset, data bytes) of a .safetensors file; CheckpointError if the
  first 8 bytes and the JSON after them are not a safetensors header."""
  try:
    total = os.path.getsize(path)
    with open(path, "rb") as f:
      size = int.from_bytes(f.read(8), "little")
      if total < 8 or size > min(total - 8, _MAX_HEADER_BYTES):
        raise CheckpointError(
            f"{path}: not a safetensors file, or truncated (it is {total} bytes; its first 8 "
            f"bytes give a header of {size} bytes)")
      raw = f.read(size)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read weights file ({e.strerror or e})") from None
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, ValueError) as e:
    raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON: {e})") \
        from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: not a safetensors file (its header is a "
                          f"{type(header).__name__}, not a mapping of tensors)")
  return header, 8 + size, total - 8 - size


def read_safetensors(path: str, names: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
  """One .safetensors file -> {name: float32 array} (only `names` when given).

  Read directly (an 8-byte header size, a JSON header, raw little-endian
  tensors) because safetensors.numpy cannot represent bfloat16, the dtype of
  most released LMs; ml_dtypes (a jax dependency) can. Each tensor's byte range
  is checked against its shape and the file's size before it is read.
  """
  import ml_dtypes
  header, offset, body = _safetensors_header(path)
  wanted = None if names is None else set(names)
  data = np.memmap(path, np.uint8, mode="r", offset=offset) if body > 0 else np.zeros(0, np.uint8)
  out = {}
  for name, meta in header.items():
    if name == "__metadata__" or (wanted is not None and name not in wanted):
      continue
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
      raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {meta!r}")
    dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
    if dtype is None:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']!r}")
    dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    shape = tuple(int(s) for s in meta["shape"])
    begin, stop = (int(x) for x in meta["data_offsets"])
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if stop - begin != need or begin < 0:
      raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} {meta['dtype']} needs "
                            f"{need} bytes but its header gives bytes [{begin}, {stop})")
    if stop > body:
      raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} needs bytes [{begin}, "
                            f"{stop}) of the data, but the file holds only {max(body, 0)}: "
                            "the file is truncated")
    out[name] = np.asarray(data[begin:stop]).view(dtype).reshape(shape).astype(np.float32)
  return out


def read_torch(path: str) -> object:
  """torch.load(weights_only=True) of a .pt / .bin (never unpickles code); a
  truncated or non-torch file is a CheckpointError naming it."""
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{path}: reading torch checkpoints needs torch; install it or "
                          "convert the file to safetensors") from None
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: weights file does not exist")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises RuntimeError / EOFError / UnpicklingError / ...
    msg = " ".join(str(e).split())
    if len(msg) > 200:
      msg = msg[:200] + "..."
    raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated, or not "
                          f"written by torch.save: {type(e).__name__}: {msg})") from None


def torch_state_dict(path: str, wrappers: tuple[str, ...] = ("model_state_dict",)
                     ) -> dict[str, np.ndarray]:
  """A torch state dict file -> {name: float32 array}: the first of `wrappers`
  found is unwrapped, a DDP "module." prefix dropped, non-tensor entries skipped."""
  obj = read_torch(path)
  for wrapper in wrappers:
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
      break
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  out = {}
  for key, value in obj.items():
    if hasattr(value, "numpy") and hasattr(value, "float"):
      out[str(key).removeprefix("module.")] = value.detach().float().numpy()
  return out


def read_weights(path: str, wrappers: tuple[str, ...] = ("model_state_dict",)
                 ) -> dict[str, np.ndarray]:
  """A .safetensors file or a torch file (by extension) -> {name: float32 array}."""
  if path.endswith(".safetensors"):
    if not os.path.isfile(path):
      raise CheckpointError(f"{path}: weights file does not exist")
    return read_safetensors(path)
  return torch_state_dict(path, wrappers)


def load_hf_weights_dir(path: str) -> dict[str, np.ndarray]:
  """All tensors of a HF model directory as float32: single or sharded safetensors, or,
  when there are none, pytorch_model.bin (sharded or not; MPT-7B and RedPajama-INCITE
  ship only those)."""
  formats = [("model.safetensors", read_safetensors), ("pytorch_model.bin", torch_state_dict)]
  listed_in = ""
  for single, reader in formats:
    index = os.path.join(path, single + ".index.json")
    if os.path.exists(index):
      listed_in = index
      try:
        with open(index) as f:
          files = sorted(set(json.load(f)["weight_map"].values()))
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a shard index with a weight_map ({e})") from None
      break
    if os.path.exists(os.path.join(path, single)):
      files = [single]
      break
  else:
    raise CheckpointError(f"{path!r} holds none of model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin, "
                          "pytorch_model.bin.index.json")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    shard = os.path.join(path, name)
    if not os.path.isfile(shard):
      raise CheckpointError(f"{shard}: listed in {listed_in} but missing")
    tensors.update(reader(shard))
  return tensors


class StateDict:
  """A name -> array mapping that reports missing, unused and misshapen tensors."""

  def __init__(self, tensors: Mapping[str, np.ndarray], prefix: str = "", source: str = ""):
    """source: the file the tensors came from, named in every error."""
    self.tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    self.prefix = prefix
    self.source = f"{source}: " if source else ""
    self.used: set[str] = set()

  def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    key = self.prefix + name
    if key not in self.tensors:
      raise CheckpointError(f"{self.source}missing tensor {key!r} in the source checkpoint"
                            + (f" (expected shape {shape})" if shape else ""))
    value = self.tensors[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise CheckpointError(f"{self.source}tensor {key!r} has shape {tuple(value.shape)}, "
                            f"expected {tuple(shape)}")
    self.used.add(key)
    return value

  def has(self, name: str) -> bool:
    return self.prefix + name in self.tensors

  def check_all_used(self, what: str) -> None:
    unused = sorted(k for k in self.tensors if k.startswith(self.prefix) and k not in self.used)
    if unused:
      raise CheckpointError(f"{self.source}{len(unused)} tensors of the {what} were not "
                            f"converted: {unused[:8]}")


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], dtype: str = "float32"
                      ) -> None:
  """{name: array} -> one .safetensors file (F32 or BF16), the layout read_safetensors
  reads and transformers' loaders expect (header padded to 8 bytes, metadata format pt)."""
  import ml_dtypes
  code, np_dtype = {"float32": ("F32", np.float32),
                    "bfloat16": ("BF16", ml_dtypes.bfloat16)}[dtype]
  header: dict = {"__metadata__": {"format": "pt"}}
  blobs, offset = [], 0
  for name in sorted(tensors):
    data = np.ascontiguousarray(np.asarray(tensors[name], np.float32).astype(np_dtype)).tobytes()
    header[name] = {"dtype": code, "shape": list(np.shape(tensors[name])),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for data in blobs:
      f.write(data)


def write_safetensors_dir(out: str, tensors: Mapping[str, np.ndarray], dtype: str = "float32",
                          max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """tensors -> out/model.safetensors, or shards model-0000i-of-0000n.safetensors of at
  most max_shard_bytes (a tensor larger than that alone) with model.safetensors.index.json;
  -> the file names."""
  size = 4 if dtype == "float32" else 2
  shards: list[list[str]] = [[]]
  used = 0
  for name in sorted(tensors):
    nbytes = int(np.prod(np.shape(tensors[name]))) * size
    if shards[-1] and used + nbytes > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += nbytes
  if len(shards) == 1:
    write_safetensors(os.path.join(out, "model.safetensors"), tensors, dtype)
    return ["model.safetensors"]
  names, weight_map = [], {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(os.path.join(out, file), {k: tensors[k] for k in shard}, dtype)
    names.append(file)
    weight_map.update({k: file for k in shard})
  total = sum(int(np.prod(np.shape(v))) * size for v in tensors.values())
  with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names
