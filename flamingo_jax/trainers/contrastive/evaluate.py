"""Evaluation of the contrastive dual encoder: zero-shot classification and retrieval.

  python -m flamingo_jax.contrastive --config configs/contrastive_tiny.py:data=/tmp/synth \
      --workdir /tmp/contrastive_tiny --eval_only [--step N]

The trainer evaluates during and after training (eval.every) and, with
--eval_only, a run's checkpoint (the command above: the evaluation CLI is the
trainer's, which parses the config); this module is the evaluator it calls and
imports no trainer.

Zero-shot classification (CLIP's protocol): every class name is put into each
prompt template ("a photo of a {}."), the text embeddings of a class's
prompts are averaged and re-normalised, and an image is assigned the class
with the highest cosine similarity; top-1 and top-5 accuracy.

Retrieval: embeddings of a held-out split of image-text pairs, R@K in both
directions. A text that is word for word another pair's caption describes
that pair's image as well as its own, so identical captions count as correct
matches (as COCO's five captions per image do for image->text); with unique
captions this is the usual one-positive R@K. The split's number of distinct
captions is reported beside.

Texts are tokenised exactly as the training pipeline lays out captions
(`<BOS><image>caption<EOC><EOS>`, read through targets/loss_mask, see
batch_from_pairs below), without the training-time random space.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding

from flamingo_jax.runtime import sharding
from flamingo_jax.config import from_config_dict
from flamingo_jax.errors import ConfigError, DataError
from flamingo_jax.data import images as images_lib
from flamingo_jax.data import layouts
from flamingo_jax.data.config import DataConfig, DatasetConfig
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.models.dual_encoder import DualEncoder

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
  """Held-out image-text pairs (read with the training pipeline, train=False)."""
  paths: tuple[str, ...] = ()  # glob patterns; empty: no retrieval evaluation
  source: str = "tar"  # tar | arrayrecord
  seq_len: int = 32
  max_examples: int = 0  # 0: the whole split


@dataclasses.dataclass(frozen=True)
class ClassificationConfig:
  """A labelled image list (evaluate.datasets.read_classification_list layout)."""
  examples: str = ""  # JSON list of {"image", "label"}; empty: no classification
  class_names: str = ""  # JSON list / .txt of names in label order
  image_root: str = ""  # prefix of the "image" paths
  templates: tuple[str, ...] = ("a photo of a {}.",)
  seq_len: int = 32
  max_examples: int = 0  # 0: all


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """`eval` section of a contrastive config."""
  every: int = 0  # steps between evaluations while training (0: only at the end)
  batch_size: int = 64  # per embedding call; padded, so every call has one shape
  recall_at: tuple[int, ...] = (1, 5, 10)
  retrieval: RetrievalConfig = RetrievalConfig()
  classification: ClassificationConfig = ClassificationConfig()


def eval_config(cfg: Any) -> EvalConfig:
  c = from_config_dict(EvalConfig, cfg or {}, "eval")
  if c.every < 0:
    raise ConfigError(f"config key 'eval.every' must be >= 0, got {c.every}")
  if c.batch_size < 1:
    raise ConfigError(f"config key 'eval.batch_size' must be positive, got {c.batch_size}")
  if not c.recall_at or any(k < 1 for k in c.recall_at):
    raise ConfigError(f"config key 'eval.recall_at' must be positive ints, got {c.recall_at}")
  if c.retrieval.source not in ("tar", "arrayrecord"):
    raise ConfigError(f"config key 'eval.retrieval.source' is {c.retrieval.source!r}; "
                     "expected 'tar' or 'arrayrecord'")
  cls = c.classification
  if cls.examples:
    if not cls.class_names:
      raise ConfigError("config key 'eval.classification.class_names' is empty but "
                       "eval.classification.examples is set")
    if not cls.templates:
      raise ConfigError("config key 'eval.classification.templates' is empty")
    for t in cls.templates:
      if t.count("{}") != 1:
        raise ConfigError(f"config key 'eval.classification.templates' entry {t!r} must hold "
                         "exactly one '{}' for the class name")
  for key, n in (("retrieval.max_examples", c.retrieval.max_examples),
                 ("classification.max_examples", cls.max_examples)):
    if n < 0:
      raise ConfigError(f"config key 'eval.{key}' must be >= 0, got {n}")
  return c


# --------------------------------------------------------------------------
# Metrics (numpy; tested by hand)


def retrieval_recall(similarity: np.ndarray, positives: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """similarity [Ni, Nt] (image i vs text j), positives [Ni, Nt] bool -> R@K.

  image_to_text/RK (R@K): fraction of images with a positive text among
  their K most similar texts; text_to_image/RK: the same per text. Every row and
  column needs at least one positive.
  """
  similarity = np.asarray(similarity, np.float64)
  positives = np.asarray(positives, bool)
  if similarity.ndim != 2 or similarity.shape != positives.shape:
    raise ValueError(f"similarity {similarity.shape} and positives {positives.shape} must be "
                     "the same [images, texts] matrix")
  if not positives.any(axis=1).all() or not positives.any(axis=0).all():
    raise ValueError("every image and every text needs at least one positive")
  out = {}
  for direction, sim, pos in (("image_to_text", similarity, positives),
                              ("text_to_image", similarity.T, positives.T)):
    # rank of the best positive = number of candidates scoring strictly higher
    best = np.where(pos, sim, -np.inf).max(axis=1, keepdims=True)
    rank = (sim > best).sum(axis=1)
    for k in ks:
      out[f"{direction}/R{k}"] = float(np.mean(rank < k))
  return out


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """image_emb [N, E], class_emb [K, E], labels [N] -> top-k accuracy for k <= K."""
  scores = np.asarray(image_emb, np.float64) @ np.asarray(class_emb, np.float64).T
  labels = np.asarray(labels)
  if labels.shape != (scores.shape[0],):
    raise ValueError(f"labels {labels.shape} do not match {scores.shape[0]} images")
  if labels.min() < 0 or labels.max() >= scores.shape[1]:
    raise ValueError(f"labels must be in [0, {scores.shape[1]}), got {labels.min()}.."
                     f"{labels.max()}")
  true = scores[np.arange(len(labels)), labels][:, None]
  rank = (scores > true).sum(axis=1)
  return {f"top{k}": float(np.mean(rank < k)) for k in ks if k <= scores.shape[1]}


def caption_positives(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """tokens, mask [N, L] -> [N, N] bool: pairs whose captions are identical."""
  rows = np.where(np.asarray(mask, bool), np.asarray(tokens), -1)
  _, ids = np.unique(rows, axis=0, return_inverse=True)
  ids = ids.reshape(-1)
  return ids[:, None] == ids[None, :]


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], seq_len: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Texts -> (tokens [N, L] int32, mask [N, L] bool), laid out as training captions."""
  tokens, masks = [], []
  for text in texts:
    layout = layouts.captioned(tokenizer.encode(text), tokenizer.info, seq_len, "truncate")
    tokens.append(layout.targets)
    masks.append(layout.loss_mask > 0)
  return np.stack(tokens).astype(np.int32), np.stack(masks)


# --------------------------------------------------------------------------
# Data

def batch_from_pairs(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A pairs batch of flamingo_jax.data -> the dual encoder's inputs.

  The pipeline lays captions out for the LM as <BOS><image>caption<EOC><EOS>;
  its `targets` row is that sequence shifted by one and `loss_mask` marks its
  real text (caption, <EOC>, <EOS>; not <image>, not padding). So the text
  tower reads tokens = targets under mask = loss_mask > 0: the caption in the
  pipeline's own tokenisation, padding masked out.
    images [B, 1, 1, H, W, 3] -> images [B, H, W, 3]
    targets [B, L], loss_mask [B, L] -> tokens [B, L] int32, mask [B, L] bool
  """
  for key in ("images", "targets", "loss_mask"):
    if key not in batch:
      raise ValueError(f"pairs batch has no {key!r}; it has {sorted(batch)}")
  images = np.asarray(batch["images"])
  if images.ndim != 6 or images.shape[1:3] != (1, 1):
    raise ValueError(f"pairs batch images must be [B, 1, 1, H, W, 3], got {images.shape}")
  return {"images": images[:, 0, 0], "tokens": np.asarray(batch["targets"], np.int32),
          "mask": np.asarray(batch["loss_mask"]) > 0}



def load_retrieval(cfg: RetrievalConfig, data: DataConfig, tokenizer: Tokenizer,
                   batch_size: int) -> dict[str, np.ndarray]:
  """The held-out pairs: images [N, H, W, 3], tokens [N, L], mask [N, L]."""
  from flamingo_jax.data import make_dataset
  dcfg = DatasetConfig(kind="pairs", source=cfg.source, paths=tuple(cfg.paths),
                       batch_size=batch_size, seq_len=cfg.seq_len)
  dcfg_data = dataclasses.replace(data, datasets={"retrieval": dcfg}, train=False,
                                  num_epochs=1, shard_index=0, shard_count=1, worker_count=0)
  parts = []
  seen = 0
  for batch in make_dataset("retrieval", dcfg, dcfg_data, tokenizer, 0, 1):
    parts.append(batch_from_pairs(batch))
    seen += len(parts[-1]["tokens"])
    if cfg.max_examples and seen >= cfg.max_examples:
      break
  if not parts:
    raise DataError(f"eval.retrieval.paths {list(cfg.paths)} hold no usable pairs")
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  if cfg.max_examples:
    out = {k: v[:cfg.max_examples] for k, v in out.items()}
  return out


def load_classification(cfg: ClassificationConfig, data: DataConfig
                        ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """(images [N, H, W, 3] normalised as in training, labels [N], class names)."""
  from flamingo_jax.evaluate.datasets import read_class_names, read_classification_list
  names = read_class_names(cfg.class_names)
  examples = read_classification_list(cfg.examples, names, cfg.image_root)
  if cfg.max_examples:
    examples = examples[:cfg.max_examples]
  if not examples:
    raise DataError(f"eval.classification.examples {cfg.examples!r} lists no images")
  images = []
  for ex in examples:
    try:
      with open(ex.image_path, "rb") as f:
        raw = f.read()
    except OSError as e:
      raise DataError(f"eval.classification: cannot read image {ex.image_path!r}: {e}") from e
    img = images_lib.decode(raw, data.image.size)
    images.append(images_lib.process([img], data.image, None, train=False)[0])
  return np.stack(images), np.array([ex.label for ex in examples], np.int32), names


# --------------------------------------------------------------------------
# The evaluator


class Evaluator:
  """Loads the evaluation data once; `evaluate(params)` -> {metric: value}.

  Embedding calls are jitted once per input kind, with a batch of
  eval.batch_size rows sharded over the data-parallel devices (the last
  batch padded) and parameters in their training layout.
  """

  def __init__(self, model: DualEncoder, cfg: EvalConfig, data: DataConfig, mesh,
               param_shardings, tokenizer: Optional[Tokenizer] = None,
               rules: Sequence = sharding.DEFAULT_RULES):
    self.model, self.cfg, self.data, self.mesh, self.rules = model, cfg, data, mesh, rules
    if tokenizer is None:
      if not data.tokenizer:
        raise ConfigError("config key 'data.tokenizer' is empty; the evaluator needs it to "
                         "tokenise prompts")
      tokenizer = Tokenizer.load(data.tokenizer)
    self.tokenizer = tokenizer
    max_length = model.config.text.max_length
    for key, length in (("retrieval.seq_len", cfg.retrieval.seq_len),
                        ("classification.seq_len", cfg.classification.seq_len)):
      if not 4 <= length <= max_length:
        raise ConfigError(f"config key 'eval.{key}' ({length}) must be in [4, "
                         f"model.text.max_length={max_length}]")
    shards = sharding.batch_shards(mesh)
    if cfg.batch_size % shards:
      raise ConfigError(f"config key 'eval.batch_size' ({cfg.batch_size}) must be divisible by "
                       f"the {shards} data-parallel devices")
    batch_sh = lambda ndim: NamedSharding(mesh, sharding.batch_spec(ndim))  # noqa: E731
    out_sh = sharding.replicated(mesh)
    self._embed_images = jax.jit(
        lambda p, x: model.apply({"params": p}, x, method=DualEncoder.embed_images),
        in_shardings=(param_shardings, batch_sh(4)), out_shardings=out_sh)
    self._embed_texts = jax.jit(
        lambda p, t, m: model.apply({"params": p}, t, m, method=DualEncoder.embed_texts),
        in_shardings=(param_shardings, batch_sh(2), batch_sh(2)), out_shardings=out_sh)
    self.retrieval = None
    if cfg.retrieval.paths:
      self.retrieval = load_retrieval(cfg.retrieval, data, tokenizer, cfg.batch_size)
      self.retrieval["positives"] = caption_positives(self.retrieval["tokens"],
                                                      self.retrieval["mask"])
      log.info("eval: %d retrieval pairs (%d distinct captions)",
               len(self.retrieval["tokens"]), self._unique_captions())
    self.classification = None
    c = cfg.classification
    if c.examples:
      images, labels, names = load_classification(c, data)
      prompts = [t.format(name) for name in names for t in c.templates]
      tokens, mask = encode_texts(tokenizer, prompts, c.seq_len)
      self.classification = {"images": images, "labels": labels, "num_classes": len(names),
                             "tokens": tokens, "mask": mask}
      log.info("eval: %d images of %d classes, %d prompt templates", len(labels), len(names),
               len(c.templates))

  def _unique_captions(self) -> int:
    return int(len(np.unique(np.where(self.retrieval["mask"], self.retrieval["tokens"], -1),
                             axis=0)))

  def _batched(self, fn: Callable, params, *arrays) -> np.ndarray:
    """Runs fn(params, *batch) over rows in eval.batch_size chunks (last one padded).

    Every process holds all the evaluation data; each batch becomes a global
    array sharded over the data-parallel devices (make_array_from_callback),
    so the same code runs on one host or many.
    """
    n, b = len(arrays[0]), self.cfg.batch_size
    outs = []
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for start in range(0, n, b):
        chunk = [a[start:start + b] for a in arrays]
        rows = len(chunk[0])
        if rows < b:
          chunk = [np.concatenate([a, np.zeros((b - rows,) + a.shape[1:], a.dtype)])
                   for a in chunk]
        chunk = [jax.make_array_from_callback(
            a.shape, NamedSharding(self.mesh, sharding.batch_spec(a.ndim)),
            lambda index, a=a: a[index]) for a in chunk]
        outs.append(np.asarray(jax.device_get(fn(params, *chunk)))[:rows])
    return np.concatenate(outs)

  def embed_images(self, params, images: np.ndarray) -> np.ndarray:
    """images [N, H, W, 3] -> [N, E] unit norm."""
    return self._batched(self._embed_images, params, images)

  def embed_texts(self, params, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """tokens, mask [N, L] -> [N, E] unit norm."""
    return self._batched(self._embed_texts, params, tokens, mask)

  def class_embeddings(self, params) -> np.ndarray:
    """[K, E]: the mean of each class's prompt embeddings, re-normalised."""
    c = self.classification
    emb = self.embed_texts(params, c["tokens"], c["mask"])
    emb = emb.reshape(c["num_classes"], -1, emb.shape[-1]).mean(axis=1)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-6)

  def evaluate(self, params) -> dict[str, float]:
    out: dict[str, float] = {}
    if self.retrieval is not None:
      r = self.retrieval
      image_emb = self.embed_images(params, r["images"])
      text_emb = self.embed_texts(params, r["tokens"], r["mask"])
      recall = retrieval_recall(image_emb @ text_emb.T, r["positives"], self.cfg.recall_at)
      out.update({f"retrieval/{k}": v for k, v in recall.items()})
      out["retrieval/pairs"] = float(len(r["tokens"]))
      out["retrieval/distinct_captions"] = float(self._unique_captions())
    if self.classification is not None:
      c = self.classification
      acc = zero_shot_accuracy(self.embed_images(params, c["images"]),
                               self.class_embeddings(params), c["labels"])
      out.update({f"zero_shot/{k}": v for k, v in acc.items()})
      out["zero_shot/images"] = float(len(c["labels"]))
      out["zero_shot/classes"] = float(c["num_classes"])
    return out

