"""The data configuration schema: one `DatasetConfig` per dataset of the mixture.

Like the model config (flamingo_jax/models/config.py), users write a ConfigDict
(the `data` field of a config file) and `data_config` turns it into frozen
dataclasses (`data.datasets` a dict of sections), rejecting unknown keys and
inconsistent values with a ConfigError that names the key, before any file is
opened. docs/data.md explains every option.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from flamingo_jax.config import check, choice, from_config_dict

KINDS = ("pairs", "interleaved", "video")
SOURCES = ("tar", "arrayrecord", "tfds")
MASK_MODES = ("always", "unless_next_image", "never")
OVERLONG = ("truncate", "skip")

# The paper's numbers: M3W windows of 256 tokens with up to 5 images and
# p_next = 0.5; captions of 32 tokens (64 for some datasets: set seq_len);
# videos of 8 frames at 1 FPS.
KIND_DEFAULTS = {
    "pairs": {"seq_len": 32, "max_images": 1, "num_frames": 1, "p_next": 0.0},
    "interleaved": {"seq_len": 256, "max_images": 5, "num_frames": 1, "p_next": 0.5},
    "video": {"seq_len": 32, "max_images": 1, "num_frames": 8, "p_next": 0.0},
}

# ImageNet statistics in 0..255 pixel units: NFNet's normalisation.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """Pixels: aspect-preserving resize + mean padding, augmentation, normalisation."""
  size: int = 320  # square side after resize and padding
  mean: tuple[float, ...] = IMAGENET_MEAN  # padding colour and normalisation mean
  std: tuple[float, ...] = IMAGENET_STD
  flip: bool = True  # random left/right flip (training only)
  colour_jitter: float = 0.2  # max relative brightness/contrast/saturation change; 0: off


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """One dataset of the mixture; the train step draws one batch of it per update."""
  kind: str = "pairs"  # pairs | interleaved | video
  source: str = "tar"  # tar | arrayrecord | tfds
  paths: tuple[str, ...] = ()  # glob patterns of .tar or .array_record files
  tfds_name: str = ""  # source=tfds: a dataset prepared with file_format=array_record
  tfds_split: str = "train"
  tfds_data_dir: str = ""
  # source=tfds: our field -> TFDS feature path ("captions/text"); fields:
  # pairs image,text; interleaved texts,images; video frames,text,fps.
  tfds_fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
  batch_size: int = 8
  # None: the kind's default (KIND_DEFAULTS), filled in by dataset_config.
  seq_len: Optional[int] = None  # L: tokens per example fed to the model
  max_images: Optional[int] = None  # N: image slots per example
  num_frames: Optional[int] = None  # T: frames per image slot
  p_next: Optional[float] = None  # probability that text attends to the next image
  fps: float = 1.0  # video: frames are sampled at this rate
  space_prob: float = 0.5  # pairs/video: prepend a space to the caption
  mask_text_before_first_image: str = "always"  # always | unless_next_image | never
  overlong_text: str = "truncate"  # pairs/video captions longer than seq_len
  max_text_chars: int = 50_000  # longer raw texts are skipped as garbage
  min_similarity: float = 0.24  # MMC4: drop images matched below this CLIP score
  weight: float = 1.0  # lambda_m of the loss, read by the trainer


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The whole input pipeline: datasets, tokenizer, workers, sharding, bad data."""
  datasets: Mapping[str, DatasetConfig] = dataclasses.field(default_factory=dict)
  tokenizer: str = ""  # sentencepiece .model, or a Hugging Face tokenizer.json / directory
  image: ImageConfig = ImageConfig()
  seed: int = 0
  train: bool = True  # False: no shuffle, no augmentation, earliest windows
  num_epochs: int = 0  # 0: repeat forever
  worker_count: int = 0  # grain worker processes per dataset (0: in-process)
  worker_buffer_size: int = 16  # examples buffered per worker
  read_threads: int = 2  # threads per process reading and transforming
  read_buffer_size: int = 32  # examples buffered per process
  shard_index: int = -1  # -1: jax.process_index()
  shard_count: int = -1  # -1: jax.process_count()
  max_skip_rate: float = 0.1  # raise when more of the examples seen are skipped
  skip_check_after: int = 1000  # examples seen before the rate is checked
  log_every: int = 10_000  # log the bad-data counts every this many examples


def with_kind_defaults(c: DatasetConfig, prefix: str = "data.datasets.?") -> DatasetConfig:
  """Fills the fields left None with the defaults of the dataset's kind."""
  choice(c.kind, KINDS, f"{prefix}.kind")
  fill = {k: v for k, v in KIND_DEFAULTS[c.kind].items() if getattr(c, k) is None}
  return dataclasses.replace(c, **fill) if fill else c


def validate_dataset(c: DatasetConfig, prefix: str = "data.datasets.?") -> None:
  """Checks one dataset's fields; every message names the offending key."""
  choice(c.kind, KINDS, f"{prefix}.kind")
  for key in KIND_DEFAULTS[c.kind]:
    check(getattr(c, key) is not None, f"config key '{prefix}.{key}' is None; build "
          "dataset configs with dataset_config() to fill the kind's defaults")
  choice(c.source, SOURCES, f"{prefix}.source")
  choice(c.mask_text_before_first_image, MASK_MODES,
         f"{prefix}.mask_text_before_first_image")
  choice(c.overlong_text, OVERLONG, f"{prefix}.overlong_text")
  if c.source in ("tar", "arrayrecord"):
    check(len(c.paths) > 0, f"config key '{prefix}.paths' is empty; source={c.source!r} "
          "needs glob patterns of its files")
  else:
    check(bool(c.tfds_name), f"config key '{prefix}.tfds_name' is empty; source='tfds' "
          "needs a dataset name")
  for key in ("batch_size", "max_images", "num_frames", "max_text_chars"):
    check(getattr(c, key) > 0, f"config key '{prefix}.{key}' must be positive, got "
          f"{getattr(c, key)}")
  # <BOS><image> x <EOC> needs at least 4 positions to hold one target.
  check(c.seq_len >= 4, f"config key '{prefix}.seq_len' must be >= 4, got {c.seq_len}")
  check(c.fps > 0, f"config key '{prefix}.fps' must be positive, got {c.fps}")
  for key in ("p_next", "space_prob"):
    v = getattr(c, key)
    check(0.0 <= v <= 1.0, f"config key '{prefix}.{key}' must be in [0, 1], got {v}")
  if c.kind in ("pairs", "video"):
    check(c.max_images == 1, f"config key '{prefix}.max_images' must be 1 for kind="
          f"{c.kind!r} (one image or video per example), got {c.max_images}")
  if c.kind in ("pairs", "interleaved"):
    check(c.num_frames == 1, f"config key '{prefix}.num_frames' must be 1 for kind="
          f"{c.kind!r} (still images), got {c.num_frames}")


def validate(c: DataConfig) -> None:
  """Cross-field checks of the whole data config."""
  check(len(c.datasets) > 0, "config key 'data.datasets' is empty; add at least one dataset")
  check(c.image.size > 0, f"config key 'data.image.size' must be positive, got {c.image.size}")
  for key in ("mean", "std"):
    v = getattr(c.image, key)
    check(len(v) == 3, f"config key 'data.image.{key}' needs 3 values (RGB), got {v}")
  check(all(s > 0 for s in c.image.std), f"config key 'data.image.std' must be positive, "
        f"got {c.image.std}")
  check(c.image.colour_jitter >= 0, "config key 'data.image.colour_jitter' must be >= 0")
  check(0.0 <= c.max_skip_rate < 1.0, f"config key 'data.max_skip_rate' must be in [0, 1), "
        f"got {c.max_skip_rate}")
  for key in ("worker_count", "read_threads", "read_buffer_size", "num_epochs",
              "skip_check_after"):
    check(getattr(c, key) >= 0, f"config key 'data.{key}' must be >= 0, got "
          f"{getattr(c, key)}")
  for key in ("worker_buffer_size", "log_every"):
    check(getattr(c, key) > 0, f"config key 'data.{key}' must be positive")
  check((c.shard_index < 0) == (c.shard_count < 0),
        "config keys 'data.shard_index' and 'data.shard_count' must both be set or both "
        f"be -1 (from JAX), got {c.shard_index} and {c.shard_count}")
  if c.shard_count >= 0:
    check(0 <= c.shard_index < c.shard_count,
          f"config key 'data.shard_index' ({c.shard_index}) must be in "
          f"[0, data.shard_count={c.shard_count})")


def dataset_config(cfg: Any, prefix: str = "data.datasets.?") -> DatasetConfig:
  """A validated DatasetConfig, its kind's defaults filled, from a ConfigDict/dict (or a
  DatasetConfig)."""
  c = cfg if isinstance(cfg, DatasetConfig) else from_config_dict(DatasetConfig, cfg, prefix)
  c = with_kind_defaults(dataclasses.replace(c, paths=tuple(c.paths)), prefix)
  validate_dataset(c, prefix)
  return c


def data_config(cfg: Any) -> DataConfig:
  """The validated DataConfig of a ConfigDict (its `data` field), dict or DataConfig."""
  if not isinstance(cfg, DataConfig):
    if hasattr(cfg, "data") and not isinstance(cfg, dict):
      cfg = cfg.data
    cfg = from_config_dict(DataConfig, cfg, "data")
  c = dataclasses.replace(cfg, datasets={
      name: dataset_config(d, f"data.datasets.{name}") for name, d in cfg.datasets.items()})
  validate(c)
  return c
