"""Frozen vision features of evaluation images, computed once per run and cached on disk.

An n-shot prompt holds n + 1 images, and the same support images come back
in every prompt, shot count, trial and ensembling order; RICES needs the
features of the whole support pool. The vision encoder is frozen, so each
image's features [T, S, C] (`Flamingo.encode_images`) are computed once,
kept in memory (a bounded LRU) and written to `cache_dir/<key>.npy`; the
prompts then go to the model as `visual_features` (the resampler and the LM
run as before). The key hashes the image file (path, size, mtime), the
preprocessing and a fingerprint of the model's vision weights, so a cache
directory is safe to share between runs and models.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.config import FlamingoConfig


def params_fingerprint(params: Any, salt: str = "") -> str:
  """A short hash of every leaf's shape and first values (of its first local shard):
  cheap on any mesh, and different for retrained or other weights."""
  h = hashlib.sha1(salt.encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    data = leaf.addressable_shards[0].data if hasattr(leaf, "addressable_shards") else leaf
    arr = np.asarray(jax.device_get(data.reshape(-1)[:64]), np.float32)
    h.update(f"{jax.tree_util.keystr(path)}{tuple(np.shape(leaf))}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()[:16]


def vision_fingerprint(params: Any, config: FlamingoConfig) -> str:
  """The vision config and weights: what an image's features depend on."""
  return params_fingerprint(params.get("vision", {}), repr(config.vision))


def _encode_fn(config: FlamingoConfig, shardings: Any = None):
  """jit: params, images [B, 1, T, H, W, 3] -> features [B, T, S, C] float32 (shared
  between caches on one device, so its compilations are reused)."""
  if shardings is None:
    return _shared_encode_fn(config)
  return _make_encode_fn(config, shardings)


@functools.lru_cache(maxsize=None)
def _shared_encode_fn(config: FlamingoConfig):
  return _make_encode_fn(config, None)


def _make_encode_fn(config: FlamingoConfig, shardings: Any):
  from flamingo_jax.models.flamingo import Flamingo
  model = Flamingo(dataclasses.replace(config, remat="none"))

  def encode(params, images):
    return model.apply({"params": params}, images, method="encode_images")[:, 0].astype(
        jnp.float32)

  if shardings is None:
    return jax.jit(encode)
  return jax.jit(encode, in_shardings=shardings)


class FeatureCache:
  """image path -> vision features [T, S, C] float32, each computed once.

  load_image: path -> preprocessed [T, H, W, 3]; batch_size: images encoded
  at once (the last batch padded with copies); cache_dir: "" keeps them in
  memory only. shardings / run / fetch: place the encoder on a mesh and bring its
  output back from every host (`decode.Placement`).
  """

  def __init__(self, params, config: FlamingoConfig, load_image: Callable[[str], np.ndarray],
               *, batch_size: int, cache_dir: str = "", preprocess_key: str = "",
               memory_items: int = 4096, shardings: Any = None,
               run: Optional[Callable] = None, fetch: Optional[Callable] = None):
    self.params, self.config, self.load_image = params, config, load_image
    self.batch_size, self.cache_dir = batch_size, cache_dir
    self._fn = _encode_fn(config, shardings)
    self._run = run or (lambda f, *a: f(*a))
    self._fetch = fetch or jax.device_get
    self._memory: collections.OrderedDict = collections.OrderedDict()
    self._memory_items = memory_items
    self._salt = f"{vision_fingerprint(params, config)}|{preprocess_key}"
    self.computed = self.loaded = 0  # images encoded / read from disk (for the logs)
    if cache_dir:
      os.makedirs(cache_dir, exist_ok=True)

  def _key(self, path: str) -> str:
    try:
      st = os.stat(path)
      stamp = f"{st.st_size}|{st.st_mtime_ns}"
    except OSError:
      stamp = "missing"  # load_image reports it
    return hashlib.sha1(f"{os.path.abspath(path)}|{stamp}|{self._salt}".encode()).hexdigest()

  def _remember(self, path: str, feats: np.ndarray) -> None:
    self._memory[path] = feats
    self._memory.move_to_end(path)
    while len(self._memory) > self._memory_items:
      self._memory.popitem(last=False)

  def get(self, paths: Sequence[str]) -> list[np.ndarray]:
    """Features of each path, [T, S, C] float32, in order."""
    missing = []
    for p in dict.fromkeys(paths):
      if p in self._memory:
        self._memory.move_to_end(p)
        continue
      file = os.path.join(self.cache_dir, self._key(p) + ".npy") if self.cache_dir else ""
      if file and os.path.exists(file):
        try:
          self._remember(p, np.load(file))
          self.loaded += 1
          continue
        except (OSError, ValueError):  # a torn write: compute it again
          pass
      missing.append(p)
    for start in range(0, len(missing), self.batch_size):
      chunk = missing[start:start + self.batch_size]
      images = [self.load_image(p) for p in chunk]
      images += [images[0]] * (self.batch_size - len(chunk))
      out = np.asarray(self._fetch(self._run(self._fn, self.params,
                                             np.stack(images)[:, None])))
      for i, p in enumerate(chunk):
        feats = np.ascontiguousarray(out[i])
        if self.cache_dir:
          file = os.path.join(self.cache_dir, self._key(p) + ".npy")
          tmp = f"{file}.{os.getpid()}.tmp"
          with open(tmp, "wb") as f:
            np.save(f, feats)
          os.replace(tmp, file)
        self._remember(p, feats)
        self.computed += 1
    return [self._memory[p] if p in self._memory else self.get([p])[0] for p in paths]

  def pooled(self, paths: Sequence[str]) -> np.ndarray:
    """[len(paths), C]: features mean-pooled over frames and positions (RICES)."""
    out = []
    for start in range(0, len(paths), 256):
      out.extend(f.mean(axis=(0, 1)) for f in self.get(paths[start:start + 256]))
    return np.stack(out).astype(np.float32)
