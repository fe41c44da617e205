"""What the Flamingo trainer reads: one batch iterator per dataset, plus their shapes.

The trainer only relies on this interface, so it runs whether the input is
the grain pipeline of `flamingo_jax.data` (`train.input = "pipeline"`) or the
small deterministic in-memory dataset below (`train.input = "synthetic"`, used
by tests, the tiny config and benchmarks):

  iterator = iterators[name]
  batch = next(iterator)        # dict of numpy arrays, this process's rows
  state = iterator.get_state()  # JSON-serialisable dict, saved in checkpoints
  iterator.set_state(state)

Batch keys: see trainers/flamingo/objective.py. Each process produces the rows of
the global batch that its devices hold (`rows=(start, stop)`), so N processes feed
exactly the global batch that one process would. A pipeline dataset's shape is its
DatasetConfig's fields of the same names (`DatasetSpec.of`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Optional, Protocol

import numpy as np

from flamingo_jax.config import from_config_dict
from flamingo_jax.data.config import DatasetConfig
from flamingo_jax.errors import ConfigError
from flamingo_jax.models.config import FlamingoConfig

PAD, BOS, EOS = 0, 1, 2
KINDS = ("pairs", "interleaved")


class BatchIterator(Protocol):
  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """The shape of one dataset's global batch and its loss weight lambda_m."""
  name: str
  kind: str = "pairs"  # pairs | interleaved (synthetic: layout of the examples)
  batch_size: int = 8  # global, over all processes
  seq_len: int = 32
  max_images: int = 1  # N image slots per example
  num_frames: int = 1  # T frames per slot
  weight: float = 1.0

  @classmethod
  def of(cls, name: str, dataset: DatasetConfig) -> "DatasetSpec":
    """The batch shape and weight of a pipeline dataset (its DatasetConfig's same fields)."""
    return cls(name, **{key: getattr(dataset, key) for key in SYNTHETIC_KEYS})


SYNTHETIC_KEYS = tuple(f.name for f in dataclasses.fields(DatasetSpec) if f.name != "name")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """`synthetic` section: the in-memory datasets (train.input = 'synthetic')."""
  seed: int = 0
  num_classes: int = 8
  nan_batches: tuple[int, ...] = ()  # batch indices whose pixels are NaN (non-finite skip)
  feature_positions: int = 16  # S of visual_features when the model has no vision encoder
  # > 0: only batches 0..N-1 are made; batch i is batch i % N, reused (benchmarks: the
  # input is made once, so the host does no per-step NumPy work). 0: every batch new.
  distinct_batches: int = 0
  # name -> {kind, batch_size, seq_len, max_images, num_frames, weight}
  datasets: Mapping[str, DatasetSpec] = dataclasses.field(default_factory=dict)


def synthetic_config(cfg: Any) -> SyntheticConfig:
  """The validated `synthetic` section; unknown keys and bad values name the key."""
  if isinstance(cfg, SyntheticConfig):
    return cfg
  if cfg is None or not hasattr(cfg, "items"):
    raise ConfigError(f"config section 'synthetic' must be a mapping, got {cfg!r}")
  items = dict(cfg.items())
  datasets = items.pop("datasets", None)
  if not datasets or not hasattr(datasets, "items"):
    raise ConfigError("config key 'synthetic.datasets' must map dataset names to "
                      f"{{{', '.join(SYNTHETIC_KEYS)}}}, got {datasets!r}")
  c = from_config_dict(SyntheticConfig, items, "synthetic")
  if c.num_classes < 1 or c.feature_positions < 1:
    raise ConfigError("config keys 'synthetic.num_classes' and 'synthetic.feature_positions' "
                      f"must be positive, got {c.num_classes} and {c.feature_positions}")
  if c.distinct_batches < 0:
    raise ConfigError(f"config key 'synthetic.distinct_batches' must be >= 0 (0: every batch "
                      f"new), got {c.distinct_batches}")
  specs = {}
  for name, d in datasets.items():
    prefix = f"synthetic.datasets.{name}"
    if not hasattr(d, "items"):
      raise ConfigError(f"config key {prefix!r} must be a mapping, got {d!r}")
    spec = from_config_dict(DatasetSpec, {"name": str(name), **dict(d.items())}, prefix)
    validate_spec(spec, prefix)
    specs[str(name)] = spec
  return dataclasses.replace(c, datasets=specs)


def validate_spec(spec: DatasetSpec, prefix: str) -> None:
  if spec.kind not in KINDS:
    raise ConfigError(f"config key '{prefix}.kind' is {spec.kind!r}; expected one of "
                     f"{list(KINDS)}")
  for key in ("batch_size", "max_images", "num_frames"):
    v = getattr(spec, key)
    if not isinstance(v, int) or v < 1:
      raise ConfigError(f"config key '{prefix}.{key}' must be a positive int, got {v!r}")
  if spec.seq_len < 4:
    raise ConfigError(f"config key '{prefix}.seq_len' must be >= 4, got {spec.seq_len}")
  if not spec.weight >= 0:
    raise ConfigError(f"config key '{prefix}.weight' (lambda) must be >= 0, got {spec.weight}")


# --------------------------------------------------------------------------
# Synthetic data


class SyntheticIterator:
  """Deterministic, learnable image-text batches, generated on the fly.

  Every example has image classes c; an image is its class prototype plus
  noise and the text after an `<image>` token is a fixed token sequence of
  that class, so the loss can only fall if the model learns to read the image
  through the resampler and cross-attention. Example (batch i, row r) depends
  only on (seed, dataset, i, r): any split of the rows over processes yields
  the same global batch, and the state is just the batch index.
  `nan_batches` fills those batches' pixels with NaN (to exercise the
  non-finite skip). `distinct_batches` = N > 0 makes batch i equal to batch
  i % N and makes each only once (benchmark input).
  """

  def __init__(self, spec: DatasetSpec, model: FlamingoConfig, *, seed: int = 0,
               dataset_index: int = 0, rows: Optional[tuple[int, int]] = None,
               num_classes: int = 8, nan_batches: tuple[int, ...] = (),
               image_size: Optional[int] = None,
               feature_shape: Optional[tuple[int, int]] = None, distinct_batches: int = 0):
    self.spec = spec
    self.distinct_batches = distinct_batches
    self._made: dict[int, dict[str, np.ndarray]] = {}  # distinct_batches: index -> batch
    self.seed, self.dataset_index = seed, dataset_index
    self.rows = rows or (0, spec.batch_size)
    self.num_classes = num_classes
    self.nan_batches = frozenset(nan_batches)
    self.image_token, self.eoc_token = model.image_token_id, model.eoc_token_id
    special = {PAD, BOS, EOS, self.image_token, self.eoc_token}
    self.text_ids = np.array([t for t in range(model.lm.vocab_size) if t not in special][:64])
    if len(self.text_ids) < 8:
      raise ValueError(f"vocabulary of {model.lm.vocab_size} is too small for synthetic text")
    self.image_size = image_size or model.vision.image_size
    # Precomputed features [S, C] instead of pixels when the model has no encoder.
    self.feature_shape = feature_shape
    proto = np.random.default_rng([seed, 7919])
    shape = feature_shape or (self.image_size, self.image_size, 3)
    self.prototypes = proto.standard_normal((num_classes,) + tuple(shape)).astype(np.float32)
    self.batch_index = 0

  def get_state(self) -> dict:
    return {"batch_index": int(self.batch_index)}

  def set_state(self, state: dict) -> None:
    if set(state) != {"batch_index"}:
      raise ValueError(f"synthetic iterator state must be {{'batch_index': int}}, got {state}")
    self.batch_index = int(state["batch_index"])

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    index = self.batch_index % self.distinct_batches if self.distinct_batches else \
        self.batch_index
    batch = self._made.get(index)
    if batch is None:
      rows = [self._example(index, r) for r in range(*self.rows)]
      batch = {k: np.stack([ex[k] for ex in rows]) for k in rows[0]}
      if self.distinct_batches:
        self._made[index] = batch
    if self.batch_index in self.nan_batches:
      batch = dict(batch)
      visual = "visual_features" if self.feature_shape else "images"
      batch[visual] = np.full_like(batch[visual], np.nan)
    self.batch_index += 1
    return batch

  def caption(self, c: int) -> list[int]:
    n = len(self.text_ids)
    return [int(self.text_ids[(5 * c + j * (c + 1)) % n]) for j in range(3 + c % 4)]

  def _example(self, batch_index: int, row: int) -> dict[str, np.ndarray]:
    s = self.spec
    rng = np.random.default_rng([self.seed, self.dataset_index, batch_index, row])
    n_img = 1 if s.kind == "pairs" else int(rng.integers(1, s.max_images + 1))
    classes = rng.integers(0, self.num_classes, n_img)
    seq = [BOS]
    for c in classes:
      seq += [self.image_token] + self.caption(int(c)) + [self.eoc_token]
    seq.append(EOS)
    seq = seq[:s.seq_len]
    tokens = np.full(s.seq_len, PAD, np.int32)
    tokens[:len(seq)] = seq
    targets = np.concatenate([tokens[1:], [PAD]]).astype(np.int32)
    loss_mask = ((targets != PAD) & (targets != self.image_token)).astype(np.float32)
    count = int((tokens == self.image_token).sum())
    shape = self.feature_shape or (self.image_size, self.image_size, 3)
    visual = np.zeros((s.max_images, s.num_frames) + tuple(shape), np.float32)
    for i in range(count):
      noise = rng.standard_normal((s.num_frames,) + tuple(shape)).astype(np.float32)
      visual[i] = self.prototypes[classes[i]] + 0.5 * noise
    return {
        "tokens": tokens, "targets": targets, "loss_mask": loss_mask,
        "visual_features" if self.feature_shape else "images": visual,
        "image_count": np.int32(count), "next_image": np.bool_(False),
    }


def synthetic_iterators(cfg: SyntheticConfig, model: FlamingoConfig,
                        rows: Mapping[str, tuple[int, int]]) -> dict[str, SyntheticIterator]:
  """One SyntheticIterator per dataset of `cfg`, feeding this process's `rows[name]`."""
  feature_shape = None
  if model.vision.name == "none":
    if not model.vision_feature_dim:
      raise ConfigError("model.vision.name is 'none': set model.vision_feature_dim so the "
                        "synthetic data can make visual_features")
    feature_shape = (cfg.feature_positions, model.vision_feature_dim)
  return {
      spec.name: SyntheticIterator(
          spec, model, seed=cfg.seed, dataset_index=i, rows=rows[spec.name],
          num_classes=cfg.num_classes, nan_batches=cfg.nan_batches,
          feature_shape=feature_shape, distinct_batches=cfg.distinct_batches)
      for i, spec in enumerate(cfg.datasets.values())
  }
