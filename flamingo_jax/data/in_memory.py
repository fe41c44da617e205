"""What the trainer reads: one batch iterator per dataset, plus their shapes.

The trainer only relies on this interface, so it runs whether the input is
the grain pipeline of `flamingo_jax.data` (`train.input = "pipeline"`) or the
small deterministic in-memory dataset below (`train.input = "synthetic"`, used
by tests, the tiny config and benchmarks):

  iterator = iterators[name]
  batch = next(iterator)        # dict of numpy arrays, this process's rows
  state = iterator.get_state()  # JSON-serialisable dict, saved in checkpoints
  iterator.set_state(state)

Batch keys: see objective.py. Each process produces the rows of the global
batch that its devices hold (`rows=(start, stop)`), so N processes feed
exactly the global batch that one process would.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Optional, Protocol

import numpy as np

from flamingo_jax.config import FlamingoConfig

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


SYNTHETIC_KEYS = tuple(f.name for f in dataclasses.fields(DatasetSpec) if f.name != "name")

# The paper's mixture (appendix B.1.2: ablation batch sizes, lambda_m) as
# synthetic shapes: what a config without a `synthetic` section trains on,
# e.g. to check with --compile_only that a paper model fits a topology.
PAPER_MIXTURE = (
    DatasetSpec("m3w", "interleaved", batch_size=256, seq_len=256, max_images=5, weight=1.0),
    DatasetSpec("align", "pairs", batch_size=512, seq_len=32, weight=0.2),
    DatasetSpec("ltip", "pairs", batch_size=512, seq_len=64, weight=0.2),
    DatasetSpec("vtp", "pairs", batch_size=64, seq_len=64, num_frames=8, weight=0.03),
)


def synthetic_specs(cfg: Any) -> list[DatasetSpec]:
  """Specs from the `synthetic.datasets` ConfigDict (None: PAPER_MIXTURE); errors name the key."""
  if cfg is None:
    return list(PAPER_MIXTURE)
  datasets = getattr(cfg, "datasets", None) if not isinstance(cfg, dict) else cfg.get("datasets")
  if not datasets or not hasattr(datasets, "items"):
    raise ValueError("config key 'synthetic.datasets' must map dataset names to "
                     f"{{{', '.join(SYNTHETIC_KEYS)}}}, got {datasets!r}")
  specs = []
  for name, d in datasets.items():
    prefix = f"synthetic.datasets.{name}"
    if not hasattr(d, "items"):
      raise ValueError(f"config key {prefix!r} must be a mapping, got {d!r}")
    for key in d.keys():
      if key not in SYNTHETIC_KEYS:
        raise ValueError(f"unknown config key '{prefix}.{key}'; valid keys: "
                         f"{', '.join(SYNTHETIC_KEYS)}")
    spec = DatasetSpec(name=str(name), **dict(d.items()))
    validate_spec(spec, prefix)
    specs.append(spec)
  return specs


def validate_spec(spec: DatasetSpec, prefix: str) -> None:
  if spec.kind not in KINDS:
    raise ValueError(f"config key '{prefix}.kind' is {spec.kind!r}; expected one of "
                     f"{list(KINDS)}")
  for key in ("batch_size", "max_images", "num_frames"):
    v = getattr(spec, key)
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"config key '{prefix}.{key}' must be a positive int, got {v!r}")
  if spec.seq_len < 4:
    raise ValueError(f"config key '{prefix}.seq_len' must be >= 4, got {spec.seq_len}")
  if not spec.weight >= 0:
    raise ValueError(f"config key '{prefix}.weight' (lambda) must be >= 0, got {spec.weight}")


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
  non-finite skip).
  """

  def __init__(self, spec: DatasetSpec, model: FlamingoConfig, *, seed: int = 0,
               dataset_index: int = 0, rows: Optional[tuple[int, int]] = None,
               num_classes: int = 8, nan_batches: tuple[int, ...] = (),
               image_size: Optional[int] = None,
               feature_shape: Optional[tuple[int, int]] = None):
    self.spec = spec
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
    rows = [self._example(self.batch_index, r) for r in range(*self.rows)]
    batch = {k: np.stack([ex[k] for ex in rows]) for k in rows[0]}
    if self.batch_index in self.nan_batches:
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


def synthetic_iterators(cfg: Any, specs: list[DatasetSpec], model: FlamingoConfig,
                        rows: Mapping[str, tuple[int, int]]) -> dict[str, SyntheticIterator]:
  """One SyntheticIterator per spec, feeding this process's `rows[name]`."""
  get = (lambda k, d: cfg.get(k, d)) if hasattr(cfg, "get") else (
      lambda k, d: getattr(cfg, k, d))
  feature_shape = None
  if model.vision.name == "none":
    positions = int(get("feature_positions", 16))
    if not model.vision_feature_dim:
      raise ValueError("model.vision.name is 'none': set model.vision_feature_dim so the "
                       "synthetic data can make visual_features")
    feature_shape = (positions, model.vision_feature_dim)
  return {
      spec.name: SyntheticIterator(
          spec, model, seed=int(get("seed", 0)), dataset_index=i, rows=rows[spec.name],
          num_classes=int(get("num_classes", 8)), nan_batches=tuple(get("nan_batches", ())),
          feature_shape=feature_shape)
      for i, spec in enumerate(specs)
  }
