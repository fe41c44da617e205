"""Frozen vision features of evaluation images, computed once per run and cached on disk.

An n-shot prompt holds n + 1 images, and the same support images come back
in every prompt, shot count, trial and ensembling order; RICES needs the
features of the whole support pool. The vision encoder is frozen, so each
image's features [T, S, C] (`Flamingo.encode_images`) are computed once,
kept in memory (a bounded LRU) and written to `cache_dir/<key>.npy`; the
prompts then go to the model as `visual_features`. The key hashes the image
file (path, size, mtime), the preprocessing and a fingerprint of the model's
vision weights, so a cache directory is safe to share between runs and models.

The Perceiver Resampler's output depends on nothing else but its own weights:
`latents` keeps each image's visual tokens [n, D_r] the same way (in memory and
in `cache_dir/latents/`, keyed by the features' key and the resampler's config
and weights), and generation takes them as `visual_latents`, so the resampler
runs once per image, not once per prompt it appears in (in the bench model it
was 5.2 of a 4-shot prompt pass's 12.3 GFLOP). Not with
`resampler.num_media_embeddings`, where the tokens depend on the image's slot.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import weakref
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models.config import FlamingoConfig


# (salt, leaf ids) -> (fingerprint, weak references to those leaves): the same
# (immutable) arrays are hashed once per process, not at every evaluate / cache.
_FINGERPRINTS: dict = {}


def params_fingerprint(params: Any, salt: str = "") -> str:
  """A short hash of every leaf's shape and first values (of its first local shard):
  cheap on any mesh, and different for retrained or other weights."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  memo = (salt, tuple(id(leaf) for _, leaf in leaves))
  hit = _FINGERPRINTS.get(memo)
  if hit is not None and all(ref() is leaf for ref, (_, leaf) in zip(hit[1], leaves)):
    return hit[0]
  h = hashlib.sha1(salt.encode())
  for path, leaf in leaves:
    data = leaf.addressable_shards[0].data if hasattr(leaf, "addressable_shards") else leaf
    arr = np.asarray(jax.device_get(data.reshape(-1)[:64]), np.float32)
    h.update(f"{jax.tree_util.keystr(path)}{tuple(np.shape(leaf))}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  digest = h.hexdigest()[:16]
  if all(isinstance(leaf, jax.Array) for _, leaf in leaves):  # immutable, weakly referable
    if len(_FINGERPRINTS) > 64:
      _FINGERPRINTS.clear()
    _FINGERPRINTS[memo] = (digest, [weakref.ref(leaf) for _, leaf in leaves])
  return digest


def vision_fingerprint(params: Any, config: FlamingoConfig) -> str:
  """The vision config and weights: what an image's features depend on."""
  return params_fingerprint(params.get("vision", {}), repr(config.vision))


def resampler_fingerprint(params: Any, config: FlamingoConfig) -> str:
  """The resampler's config and weights: what an image's latents depend on beyond
  its features."""
  return params_fingerprint(params.get("resampler", {}),
                            f"{config.resampler!r}|{config.vision_feature_dim}|{config.dtype}")


def latents_supported(config: FlamingoConfig) -> bool:
  """Whether an image's visual tokens are its own (no embedding of its slot)."""
  return not config.resampler.num_media_embeddings


def _model_fn(config: FlamingoConfig, method: str, shardings: Any = None):
  """jit: params, x [B, 1, ...] -> `Flamingo.<method>`(x)[:, 0] float32 (shared between
  caches on one device, so its compilations are reused). encode_images: images
  [B, 1, T, H, W, 3] -> features [B, T, S, C]; resample: features [B, 1, T, S, C] ->
  visual tokens [B, n, D_r]."""
  if shardings is None:
    return _shared_model_fn(config, method)
  return _make_model_fn(config, method, shardings)


@functools.lru_cache(maxsize=None)
def _shared_model_fn(config: FlamingoConfig, method: str):
  return _make_model_fn(config, method, None)


def _make_model_fn(config: FlamingoConfig, method: str, shardings: Any):
  from flamingo_jax.models.flamingo import Flamingo
  model = Flamingo(dataclasses.replace(config, remat="none"))

  def fn(params, x):
    return model.apply({"params": params}, x, method=method)[:, 0].astype(jnp.float32)

  if shardings is None:
    return jax.jit(fn)
  return jax.jit(fn, in_shardings=shardings)


class FeatureCache:
  """image path -> vision features [T, S, C] float32, each computed once; and
  (`latents`) -> its resampled visual tokens [n, D_r] float32, each computed once.

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
    self._shardings = shardings
    self._fn = _model_fn(config, "encode_images", shardings)
    self._resample = None  # compiled on first use of `latents`
    self._run = run or (lambda f, *a: f(*a))
    self._fetch = fetch or jax.device_get
    self._memory: collections.OrderedDict = collections.OrderedDict()
    self._latent_memory: collections.OrderedDict = collections.OrderedDict()
    self._memory_items = memory_items
    self._salt = f"{vision_fingerprint(params, config)}|{preprocess_key}"
    self._latent_salt = ""  # set on first use of `latents`
    self.computed = self.loaded = 0  # images encoded / read from disk (for the logs)
    self.latents_computed = self.latents_loaded = 0  # the same for the latents
    if cache_dir:
      os.makedirs(cache_dir, exist_ok=True)

  def _key(self, path: str, salt: str) -> str:
    try:
      st = os.stat(path)
      stamp = f"{st.st_size}|{st.st_mtime_ns}"
    except OSError:
      stamp = "missing"  # load_image reports it
    return hashlib.sha1(f"{os.path.abspath(path)}|{stamp}|{salt}".encode()).hexdigest()

  def _file(self, path: str, latents: bool) -> str:
    if not self.cache_dir:
      return ""
    if latents:
      return os.path.join(self.cache_dir, "latents", self._key(path, self._latent_salt) + ".npy")
    return os.path.join(self.cache_dir, self._key(path, self._salt) + ".npy")

  def _remember(self, memory: collections.OrderedDict, path: str, value: np.ndarray) -> None:
    memory[path] = value
    memory.move_to_end(path)
    while len(memory) > self._memory_items:
      memory.popitem(last=False)

  def _lookup(self, paths: Sequence[str], latents: bool) -> list[str]:
    """Brings what is on disk into memory; -> the distinct paths still to compute."""
    memory = self._latent_memory if latents else self._memory
    missing = []
    for p in dict.fromkeys(paths):
      if p in memory:
        memory.move_to_end(p)
        continue
      file = self._file(p, latents)
      if file and os.path.exists(file):
        try:
          self._remember(memory, p, np.load(file))
          if latents:
            self.latents_loaded += 1
          else:
            self.loaded += 1
          continue
        except (OSError, ValueError):  # a torn write: compute it again
          pass
      missing.append(p)
    return missing

  def _store(self, path: str, value: np.ndarray, latents: bool) -> None:
    value = np.ascontiguousarray(value)
    file = self._file(path, latents)
    if file:
      os.makedirs(os.path.dirname(file), exist_ok=True)
      tmp = f"{file}.{os.getpid()}.tmp"
      with open(tmp, "wb") as f:
        np.save(f, value)
      os.replace(tmp, file)
    self._remember(self._latent_memory if latents else self._memory, path, value)

  def _batches(self, fn, items: Sequence[np.ndarray]):
    """fn over items in fixed batches (the last padded with copies) -> its rows, in order."""
    for start in range(0, len(items), self.batch_size):
      chunk = list(items[start:start + self.batch_size])
      n = len(chunk)
      chunk += [chunk[0]] * (self.batch_size - n)
      out = np.asarray(self._fetch(self._run(fn, self.params, np.stack(chunk)[:, None])))
      yield from out[:n]

  def get(self, paths: Sequence[str]) -> list[np.ndarray]:
    """Features of each path, [T, S, C] float32, in order."""
    missing = self._lookup(paths, latents=False)
    for start in range(0, len(missing), self.batch_size):
      chunk = missing[start:start + self.batch_size]
      for p, feats in zip(chunk, self._batches(self._fn, [self.load_image(p) for p in chunk])):
        self._store(p, feats, latents=False)
        self.computed += 1
    return [self._memory[p] if p in self._memory else self.get([p])[0] for p in paths]

  def latents(self, paths: Sequence[str]) -> list[np.ndarray]:
    """The resampler's visual tokens of each path, [n, D_r] float32, in order (what
    `Flamingo.resample` makes of its features; `latents_supported` must hold)."""
    if not latents_supported(self.config):
      raise ValueError("per-image latents need model.resampler.num_media_embeddings = 0 (with "
                       "media embeddings an image's tokens depend on its slot)")
    if self._resample is None:
      self._resample = _model_fn(self.config, "resample", self._shardings)
      self._latent_salt = f"{self._salt}|{resampler_fingerprint(self.params, self.config)}"
    missing = self._lookup(paths, latents=True)
    for start in range(0, len(missing), self.batch_size * 8):
      chunk = missing[start:start + self.batch_size * 8]  # features held: 8 batches at a time
      for p, tokens in zip(chunk, self._batches(self._resample, self.get(chunk))):
        self._store(p, tokens, latents=True)
        self.latents_computed += 1
    return [self._latent_memory[p] if p in self._latent_memory else self.latents([p])[0]
            for p in paths]

  def pooled(self, paths: Sequence[str]) -> np.ndarray:
    """[len(paths), C]: features mean-pooled over frames and positions (RICES)."""
    out = []
    for start in range(0, len(paths), 256):
      out.extend(f.mean(axis=(0, 1)) for f in self.get(paths[start:start + 256]))
    return np.stack(out).astype(np.float32)
