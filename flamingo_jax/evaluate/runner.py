"""The evaluation run: few-shot prompts -> decoding or scoring -> metrics -> a Table 1.

  python -m flamingo_jax.evaluate --config configs/X.py --checkpoint DIR \
      --tasks coco,vqav2 --shots 0,4,32 [--num_samples N] [--rices] --out DIR

For each task and shot count: read the local benchmark files named in the
config's `eval` section (`EvalConfig`), pick the demonstrations (random from
the fixed 2048-example query set, or RICES on mean-pooled frozen vision
features), build the prompts (`prompts.build_prompt`), then either decode
(`decode.Generator`, beam 3 to `<EOC>`) and score with CIDEr / VQA accuracy,
or rank the options by length-normalised log-likelihood (`scoring.Scorer`)
and report top-1 / ROC-AUC. Writes results.json, results.md (rows tasks,
columns shots, as paper Table 1) and predictions/{task}_{shots}shot.json.
docs/evaluation.md describes the config section and the outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax import model_dir
from flamingo_jax.config import FlamingoConfig, from_config_dict, model_config
from flamingo_jax.evaluate import classification, datasets, prompts, rices
from flamingo_jax.evaluate.cider import cider_d
from flamingo_jax.evaluate.decode import DEFAULT_BUCKETS, DecodeConfig, Generator
from flamingo_jax.evaluate.scoring import Scorer
from flamingo_jax.evaluate.vqa import vqa_accuracy

log = logging.getLogger(__name__)

KINDS = ("captioning", "vqa", "classification", "hateful_memes")
FORMATS = {
    "captioning": ("karpathy", "coco"),  # Karpathy split file; COCO captions_*.json
    "vqa": ("vqa",),  # VQAv2 questions (+ annotations) pair
    "classification": ("list", "folder"),  # JSON list of {image, label}; class folders
    "hateful_memes": ("jsonl",),
}
METRICS = {"captioning": "CIDEr", "vqa": "VQA acc.", "classification": "top-1",
           "hateful_memes": "ROC-AUC"}
DEFAULT_MAX_NEW_TOKENS = {"captioning": 20, "vqa": 5}  # OpenFlamingo's (TextVQA: 10)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class EvalTaskConfig:
  """One benchmark: where its files are and how it is scored."""
  kind: str = "captioning"  # captioning | vqa | classification | hateful_memes
  format: str = ""  # "" = the kind's first in FORMATS
  train: str = ""  # the support set (demonstrations): file or folder
  train_annotations: str = ""  # vqa: the support set's annotations
  test: str = ""  # the evaluated examples ("" = `train`, for one Karpathy file)
  test_annotations: str = ""  # vqa: required, the answers to score against
  train_splits: tuple[str, ...] = ("train", "restval")  # karpathy
  test_splits: tuple[str, ...] = ("test",)  # karpathy
  image_root: str = ""  # prefix of image paths of both sets
  train_image_root: str = ""  # overrides image_root for the support set
  test_image_root: str = ""  # overrides image_root for the evaluated set
  image_naming: str = "coco"  # vqa: datasets.VQA_IMAGE_NAMING key or format string
  class_names: str = ""  # classification: .txt / JSON list of names in label order
  max_new_tokens: int = 0  # 0: 20 for captioning, 5 for VQA
  prompt_style: str = "flamingo"  # flamingo | open_flamingo (prompts.STYLES)
  # Overrides the style's template, e.g. "a {class_name}" (slots: the kind's fields,
  # the answer slot last; see prompts.custom_template).
  template: str = ""
  vqa_demo_answer: str = "most_common"  # or "first" (OpenFlamingo)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The config file's `eval` section."""
  tasks: Mapping[str, EvalTaskConfig] = dataclasses.field(default_factory=dict)
  tokenizer: str = ""  # sentencepiece model; "" = the config's data.tokenizer
  batch_size: int = 8
  prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS
  decode_method: str = "beam"  # beam | greedy (open-ended tasks)
  num_beams: int = 3
  length_penalty: float = 0.0
  option_chunk: int = 32  # options scored at once per prompt (close-ended tasks)
  query_set_size: int = 2048  # the random demonstrations' pool
  rices_pool: int = 0  # RICES searches this many training examples (0: all)
  seed: int = 42
  image_mean: tuple[float, ...] = IMAGENET_MEAN  # 0..255 units; also the padding colour
  image_std: tuple[float, ...] = IMAGENET_STD


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


def validate_task(t: EvalTaskConfig, prefix: str) -> EvalTaskConfig:
  """Fills the kind's defaults and checks every field; returns the completed config."""
  _check(t.kind in KINDS, f"config key '{prefix}.kind' is {t.kind!r}; expected one of "
         f"{list(KINDS)}")
  fmt = t.format or FORMATS[t.kind][0]
  _check(fmt in FORMATS[t.kind], f"config key '{prefix}.format' is {t.format!r}; for kind "
         f"{t.kind!r} expected one of {list(FORMATS[t.kind])}")
  _check(bool(t.train), f"config key '{prefix}.train' is empty: the support set file "
         "(demonstrations) is needed")
  test = t.test or (t.train if fmt == "karpathy" else "")
  _check(bool(test), f"config key '{prefix}.test' is empty: the evaluated examples' file is "
         "needed")
  if t.kind == "vqa":
    _check(bool(t.train_annotations), f"config key '{prefix}.train_annotations' is empty: "
           "demonstrations need answers")
    _check(bool(t.test_annotations), f"config key '{prefix}.test_annotations' is empty: "
           "VQA accuracy needs the human answers")
  if t.kind == "classification":
    _check(bool(t.class_names) or fmt == "folder", f"config key '{prefix}.class_names' is "
           "empty: a .txt or JSON list of class names in label order is needed")
  _check(t.max_new_tokens >= 0, f"config key '{prefix}.max_new_tokens' must be >= 0, got "
         f"{t.max_new_tokens}")
  _check(t.prompt_style in prompts.STYLES, f"config key '{prefix}.prompt_style' is "
         f"{t.prompt_style!r}; expected one of {list(prompts.STYLES)}")
  if t.template:
    try:
      prompts.custom_template(t.kind, t.template)
    except ValueError as e:
      raise ValueError(f"config key '{prefix}.template': {e}") from None
  _check(t.vqa_demo_answer in ("most_common", "first"), f"config key "
         f"'{prefix}.vqa_demo_answer' must be 'most_common' or 'first', got "
         f"{t.vqa_demo_answer!r}")
  if fmt == "karpathy":
    for key in ("train_splits", "test_splits"):
      bad = [s for s in getattr(t, key) if s not in datasets.KARPATHY_SPLITS]
      _check(not bad and bool(getattr(t, key)), f"config key '{prefix}.{key}' has "
             f"{list(getattr(t, key))}; splits are {list(datasets.KARPATHY_SPLITS)}")
  return dataclasses.replace(
      t, format=fmt, test=test,
      max_new_tokens=t.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(t.kind, 0),
      train_image_root=t.train_image_root or t.image_root,
      test_image_root=t.test_image_root or t.image_root)


def validate(c: EvalConfig) -> None:
  for key in ("batch_size", "num_beams", "option_chunk", "query_set_size"):
    _check(getattr(c, key) >= 1, f"config key 'eval.{key}' must be >= 1, got "
           f"{getattr(c, key)}")
  _check(c.rices_pool >= 0, f"config key 'eval.rices_pool' must be >= 0, got {c.rices_pool}")
  _check(c.decode_method in ("beam", "greedy"), f"config key 'eval.decode_method' is "
         f"{c.decode_method!r}; expected 'beam' or 'greedy'")
  _check(bool(c.prompt_buckets) and min(c.prompt_buckets) >= 1,
         f"config key 'eval.prompt_buckets' must be positive lengths, got {c.prompt_buckets}")
  for key in ("image_mean", "image_std"):
    _check(len(getattr(c, key)) == 3, f"config key 'eval.{key}' needs 3 values (RGB), got "
           f"{getattr(c, key)}")
  _check(all(s > 0 for s in c.image_std), f"config key 'eval.image_std' must be positive, "
         f"got {c.image_std}")


def eval_config(cfg: Any) -> EvalConfig:
  """The validated `eval` section of a ConfigDict (or a dict / EvalConfig)."""
  if isinstance(cfg, EvalConfig):
    c = cfg
  else:
    if not isinstance(cfg, dict) and hasattr(cfg, "model"):
      _check("eval" in cfg, "the config has no 'eval' section (benchmark files, batch size; "
             "see docs/evaluation.md)")
      cfg = cfg.eval
    _check(hasattr(cfg, "items"), f"config 'eval' must be a mapping, got {type(cfg).__name__}")
    items = dict(cfg.items())
    tasks = items.pop("tasks", {})
    _check(hasattr(tasks, "items"), "config key 'eval.tasks' must map task names to task "
           f"configs, got {type(tasks).__name__}")
    c = from_config_dict(EvalConfig, items, "eval")
    c = dataclasses.replace(c, tasks={
        str(n): from_config_dict(EvalTaskConfig, t, f"eval.tasks.{n}")
        for n, t in tasks.items()})
  c = dataclasses.replace(c, tasks={
      n: validate_task(t, f"eval.tasks.{n}") for n, t in c.tasks.items()})
  validate(c)
  return c


# ------------------------------------------------------------------------------ inputs


@functools.lru_cache(maxsize=4096)
def load_image(path: str, size: int, mean: tuple = IMAGENET_MEAN,
               std: tuple = IMAGENET_STD) -> np.ndarray:
  """An image file -> float32 [1, size, size, 3]: the longer side resized to `size`
  (aspect kept), centred on a mean-coloured square, (x - mean) / std."""
  from flamingo_jax.data import images as images_lib
  from flamingo_jax.data.config import ImageConfig
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"cannot read image {path!r}: {e}") from None
  try:
    arr = images_lib.decode(data, size)
  except images_lib.BadImage as e:
    raise ValueError(f"image {path!r}: {e}") from None
  cfg = ImageConfig(size=size, mean=tuple(mean), std=tuple(std), flip=False, colour_jitter=0.0)
  return images_lib.process([arr], cfg, None, train=False)


_MARKERS = re.compile("(" + re.escape(prompts.IMAGE_MARKER) + "|" + re.escape(prompts.EOC_MARKER)
                      + ")")


def encode_prompt(text: str, tokenizer) -> list[int]:
  """`<BOS>` (unless the tokenizer's `add_bos` says none: OpenFlamingo's GPT-NeoX / MPT
  tokenizers) + the prompt's text pieces tokenized one by one, markers as their ids
  (as the training pipeline does, so text never encodes to `<image>`/`<EOC>`)."""
  info = tokenizer.info
  ids = [info.bos_id] if getattr(tokenizer, "add_bos", True) else []
  for piece in _MARKERS.split(text):
    if piece == prompts.IMAGE_MARKER:
      ids.append(info.image_token_id)
    elif piece == prompts.EOC_MARKER:
      ids.append(info.eoc_token_id)
    elif piece:
      ids.extend(tokenizer.encode(piece))
  return ids


def continuation_ids(tokenizer, context: str, continuation: str) -> list[int]:
  """The ids `continuation` gets when it follows `context` in one text piece.

  Options are scored as the tokens they would have after the prompt, not as
  a separately tokenized string (which would start a new word differently).
  """
  ctx = tokenizer.encode(context)
  full = tokenizer.encode(context + continuation)
  if full[:len(ctx)] == ctx and len(full) > len(ctx):
    return full[len(ctx):]
  return tokenizer.encode(continuation)


def _read_coco_captions(path: str, image_root: str) -> list:
  """COCO's captions_*.json ({"images": [{id, file_name}], "annotations":
  [{image_id, caption}]}) -> CaptionExamples, one per image with a caption."""
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"evaluation file not found: {path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  for key in ("images", "annotations"):
    _check(isinstance(data, dict) and isinstance(data.get(key), list),
           f"{path}: the top level is missing list field {key!r} (COCO captions layout)")
  files = {}
  for i, img in enumerate(data["images"]):
    _check(isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str),
           f"{path}: images[{i}] needs 'id' and 'file_name'")
    files[img["id"]] = img["file_name"]
  caps: dict = {}
  for i, ann in enumerate(data["annotations"]):
    _check(isinstance(ann, dict) and isinstance(ann.get("caption"), str)
           and ann.get("image_id") in files,
           f"{path}: annotations[{i}] needs a 'caption' and an 'image_id' listed in images")
    caps.setdefault(ann["image_id"], []).append(ann["caption"])
  return [datasets.CaptionExample(image_id=k, image_path=os.path.join(image_root, files[k]),
                                  captions=tuple(v), split="all") for k, v in caps.items()]


def load_task_data(t: EvalTaskConfig) -> tuple[list, list, tuple]:
  """-> (support examples, evaluated examples, class names or ())."""
  if t.kind == "captioning":
    if t.format == "karpathy":
      return (datasets.read_karpathy_captions(t.train, t.train_splits, t.train_image_root),
              datasets.read_karpathy_captions(t.test, t.test_splits, t.test_image_root), ())
    return (_read_coco_captions(t.train, t.train_image_root),
            _read_coco_captions(t.test, t.test_image_root), ())
  if t.kind == "vqa":
    kw = dict(image_naming=t.image_naming)
    return (datasets.read_vqa(t.train, t.train_annotations, image_root=t.train_image_root, **kw),
            datasets.read_vqa(t.test, t.test_annotations, image_root=t.test_image_root, **kw),
            ())
  if t.kind == "classification":
    names = datasets.read_class_names(t.class_names) if t.class_names else None
    if t.format == "folder":
      train = datasets.read_image_folder(t.train, names)
      test = datasets.read_image_folder(t.test, names)
      names = names or tuple(dict.fromkeys(ex.class_name for ex in train))
      return train, test, tuple(names)
    return (datasets.read_classification_list(t.train, names, t.train_image_root),
            datasets.read_classification_list(t.test, names, t.test_image_root), tuple(names))
  return (datasets.read_hateful_memes(t.train, t.train_image_root),
          datasets.read_hateful_memes(t.test, t.test_image_root),
          datasets.HATEFUL_MEMES_CLASS_NAMES)


# ------------------------------------------------------------------------------ model


@functools.lru_cache(maxsize=None)
def _pooled_features_fn(config: FlamingoConfig):
  """jit: params, images [B, N, T, H, W, 3] -> vision features mean-pooled to [B, C]."""
  from flamingo_jax.models.flamingo import Flamingo
  model = Flamingo(dataclasses.replace(config, remat="none"))
  return jax.jit(lambda p, x: jnp.mean(model.apply({"params": p}, x, method="encode_images"),
                                       axis=(1, 2, 3)))


class VisionFeatures:
  """Mean-pooled frozen vision features [C] of images, for RICES."""

  def __init__(self, config: FlamingoConfig, batch_size: int):
    self.batch_size = batch_size
    self._fn = _pooled_features_fn(config)

  def __call__(self, params, images: Sequence[np.ndarray]) -> np.ndarray:
    """images: each [T, H, W, 3] -> [len(images), C] float32."""
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = list(images[start:start + self.batch_size])
      real = len(chunk)
      chunk += [chunk[0]] * (self.batch_size - real)
      x = np.stack(chunk)[:, None]  # [B, 1, T, H, W, 3]
      out.append(np.asarray(self._fn(params, x))[:real])
    return np.concatenate(out).astype(np.float32)


# ------------------------------------------------------------------------------ run


def _fields(ex, t: EvalTaskConfig) -> dict:
  if isinstance(ex, datasets.VQAExample):
    return ex.prompt_fields(answer=t.vqa_demo_answer)
  return ex.prompt_fields()


def select_queries(num: int, num_samples: int, seed: int) -> np.ndarray:
  """Indices of the evaluated examples: all, or a seeded random subset of num_samples."""
  if num_samples <= 0 or num_samples >= num:
    return np.arange(num)
  return np.sort(np.random.default_rng(seed).permutation(num)[:num_samples])


class _Task:
  """One benchmark's data, prompts and scoring, for every shot count."""

  def __init__(self, name: str, t: EvalTaskConfig, ec: EvalConfig, config: FlamingoConfig):
    self.name, self.t, self.ec, self.config = name, t, ec, config
    self.support, self.test, self.classes = load_task_data(t)
    _check(len(self.support) > 0, f"eval task {name!r}: the support set {t.train} is empty")
    _check(len(self.test) > 0, f"eval task {name!r}: the evaluated set {t.test} is empty")
    self.template = (prompts.custom_template(t.kind, t.template) if t.template else
                     prompts.get_template(t.kind, t.prompt_style))  # templates are per kind
    self.query_set = prompts.random_query_set(
        len(self.support), min(ec.query_set_size, len(self.support)), ec.seed)

  def image(self, path: str) -> np.ndarray:
    return load_image(path, self.config.vision.image_size, tuple(self.ec.image_mean),
                      tuple(self.ec.image_std))

  def shots(self, queries: np.ndarray, num_shots: int, use_rices: bool, features) -> np.ndarray:
    """[Q, n] support indices per query (n = 2 text-only demonstrations at 0 shots)."""
    n = prompts.num_demonstrations(num_shots)
    _check(n <= len(self.query_set), f"eval task {self.name!r}: {num_shots} shots need {n} "
           f"demonstrations but the support set has {len(self.query_set)} examples")
    if not use_rices:
      return np.stack([prompts.random_shots(self.query_set, n, int(q), seed=self.ec.seed)
                       for q in queries])
    pool, pool_feats, query_feats = features(self, queries)
    return pool[rices.rices_shots(pool_feats, query_feats, n)]

  def prompt(self, query: int, shot_idx: Sequence[int], num_shots: int) -> prompts.Prompt:
    return prompts.build_prompt(self.template,
                                [_fields(self.support[i], self.t) for i in shot_idx],
                                _fields(self.test[query], self.t), zero_shot=num_shots == 0)


class _Rices:
  """Pooled features of the support pool (computed once per task) and of the queries."""

  def __init__(self, params, features: VisionFeatures, ec: EvalConfig):
    self.params, self.features, self.ec = params, features, ec
    self._pools: dict = {}

  def __call__(self, task: _Task, queries: np.ndarray):
    if task.name not in self._pools:
      pool = np.arange(len(task.support))
      if self.ec.rices_pool and self.ec.rices_pool < len(pool):
        pool = np.sort(np.random.default_rng(self.ec.seed).permutation(len(pool))
                       [:self.ec.rices_pool])
      feats = self.features(self.params, [task.image(task.support[i].image_path) for i in pool])
      self._pools[task.name] = (pool, feats)
    pool, feats = self._pools[task.name]
    query_feats = self.features(self.params, [task.image(task.test[q].image_path)
                                              for q in queries])
    return pool, feats, query_feats


def _score_run(task: _Task, predictions: dict, option_scores: Optional[np.ndarray],
               queries: np.ndarray) -> tuple[float, dict]:
  """-> (headline score in percent, extra metrics)."""
  kind = task.t.kind
  if kind == "captioning":
    refs = {task.test[q].image_id: task.test[q].captions for q in queries}
    cands = {task.test[q].image_id: predictions[int(q)] for q in queries}
    return 100.0 * cider_d(refs, cands).corpus, {}
  if kind == "vqa":
    exs = [task.test[q] for q in queries]
    res = vqa_accuracy({task.test[q].question_id: predictions[int(q)] for q in queries}, exs)
    return res.overall, {"per_answer_type": res.per_answer_type}
  labels = np.array([task.test[q].label for q in queries])
  if kind == "classification":
    extra = {}
    if option_scores.shape[1] >= 5:
      extra["top-5"] = 100.0 * classification.top_k_accuracy(option_scores, labels, 5)
    return 100.0 * classification.top_k_accuracy(option_scores, labels, 1), extra
  return 100.0 * classification.roc_auc(labels,
                                        classification.positive_probability(option_scores)), {}


def evaluate(config: FlamingoConfig, ec: EvalConfig, params, tokenizer, *,
             tasks: Sequence[str], shots: Sequence[int], num_samples: int = 0,
             use_rices: bool = False, out_dir: Optional[str] = None,
             progress: bool = True, metadata: Optional[dict] = None) -> dict:
  """Runs every (task, shots); returns the results dict (and writes it under out_dir).

  params: the unboxed Flamingo param tree; tokenizer: `data.tokenizer.Tokenizer`
  (its `<image>`/`<EOC>` ids must be the model's); metadata: extra entries for
  results.json (the CLI records the config and checkpoint paths).
  """
  _check(config.vision.name != "none", "evaluation reads images, but model.vision.name is "
         "'none' (a model without a vision encoder)")
  model_dir.check_tokenizer(config, tokenizer)
  unknown = [t for t in tasks if t not in ec.tasks]
  _check(not unknown, f"unknown eval task(s) {unknown}; the config's eval.tasks has "
         f"{sorted(ec.tasks)}")
  _check(bool(tasks) and bool(shots), "need at least one task and one shot count")
  _check(all(s >= 0 for s in shots), f"shot counts must be >= 0, got {list(shots)}")
  info = tokenizer.info
  common = dict(batch_size=ec.batch_size, prompt_buckets=ec.prompt_buckets)
  scorer = Scorer(config, option_chunk=ec.option_chunk, pad_token_id=info.pad_id, **common)
  generators: dict = {}
  rices_features = _Rices(params, VisionFeatures(config, ec.batch_size), ec) if use_rices \
      else None
  results: dict = {}
  for name in tasks:
    task = _Task(name, ec.tasks[name], ec, config)
    t = task.t
    queries = select_queries(len(task.test), num_samples, ec.seed)
    entry = results.setdefault(name, {"kind": t.kind, "metric": METRICS[t.kind],
                                      "num_examples": int(len(queries)), "shots": {}})
    if t.kind in ("captioning", "vqa") and t.max_new_tokens not in generators:
      options = DecodeConfig(method=ec.decode_method, max_new_tokens=t.max_new_tokens,
                             num_beams=ec.num_beams, length_penalty=ec.length_penalty,
                             stop_token_ids=(info.eos_id,), vocab_limit=info.vocab_size,
                             pad_token_id=info.pad_id)
      generators[t.max_new_tokens] = Generator(config, options, **common)
    option_ids = None
    if task.classes:
      label = task.template.labels[-1] if task.template.labels else ""
      cut = task.template.text[:-len("{" + task.template.answer_field + "}")]
      sep = cut[len(cut.rstrip(" ")):]
      option_ids = [continuation_ids(tokenizer, label, sep + c) for c in task.classes]
    for num_shots in shots:
      start = time.time()
      shot_idx = task.shots(queries, num_shots, use_rices, rices_features)
      bar = _progress(len(queries), f"{name} {num_shots}-shot", progress)
      predictions, scores = {}, []
      model_seconds = 0.0
      for b in range(0, len(queries), ec.batch_size):
        batch = queries[b:b + ec.batch_size]
        built = [task.prompt(int(q), shot_idx[b + i], num_shots) for i, q in enumerate(batch)]
        ids = [encode_prompt(p.text, tokenizer) for p in built]
        images = [np.stack([task.image(path) for path in p.images]) for p in built]
        t0 = time.time()
        if option_ids is None:
          outs = generators[t.max_new_tokens](params, ids, images)
          for q, out in zip(batch, outs):
            text = tokenizer.decode(out)
            predictions[int(q)] = prompts.postprocess_generation(text, task.template)
        else:
          scores.append(scorer(params, ids, option_ids, images))
        model_seconds += time.time() - t0
        if bar is not None:
          bar.update(len(batch))
          bar.set_postfix(examples_per_s=f"{(b + len(batch)) / (time.time() - start):.2f}")
      if bar is not None:
        bar.close()
      option_scores = np.concatenate(scores) if scores else None
      if option_scores is not None:
        for q, row in zip(queries, option_scores):
          predictions[int(q)] = task.classes[int(np.argmax(row))]
      score, extra = _score_run(task, predictions, option_scores, queries)
      seconds = time.time() - start
      entry["shots"][str(num_shots)] = {
          "score": score, **extra, "seconds": seconds,
          "examples_per_s": len(queries) / seconds,
          "model_examples_per_s": len(queries) / max(model_seconds, 1e-9)}
      log.info("%s %d-shot: %s %.2f (%.1f s)", name, num_shots, METRICS[t.kind], score, seconds)
      if out_dir:
        _write_predictions(out_dir, name, num_shots, task, predictions, shot_idx, queries)
  report = {"results": results, "shots": [int(s) for s in shots], "tasks": list(tasks),
            "num_samples": num_samples, "rices": use_rices, "seed": ec.seed,
            "decode": {"method": ec.decode_method, "num_beams": ec.num_beams,
                       "length_penalty": ec.length_penalty}, **(metadata or {})}
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(report, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
      f.write(results_markdown(report))
  return report


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr)


def _write_predictions(out_dir, name, num_shots, task, predictions, shot_idx, queries):
  os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
  rows = []
  for i, q in enumerate(queries):
    ex = task.test[int(q)]
    key = next((getattr(ex, f) for f in ("question_id", "image_id", "id") if hasattr(ex, f)),
               ex.image_path)
    rows.append({"id": key, "prediction": predictions[int(q)],
                 "shots": [int(s) for s in shot_idx[i]]})
  path = os.path.join(out_dir, "predictions", f"{name}_{num_shots}shot.json")
  with open(path, "w") as f:
    json.dump(rows, f, indent=1)


def results_markdown(report: dict) -> str:
  """Rows tasks, columns shots, like paper Table 1; scores in percent (CIDEr x100)."""
  shots = report["shots"]
  lines = ["| task | metric | " + " | ".join(f"{s}-shot" for s in shots) + " |",
           "| --- | --- | " + " | ".join("---:" for _ in shots) + " |"]
  for name in report["tasks"]:
    entry = report["results"][name]
    cells = []
    for s in shots:
      run = entry["shots"].get(str(s))
      cells.append("" if run is None else f"{run['score']:.1f}")
    lines.append(f"| {name} | {entry['metric']} | " + " | ".join(cells) + " |")
  first = report["results"][report["tasks"][0]]
  lines.append("")
  lines.append(f"{first['num_examples']} examples per task"
               f"{' (subset)' if report['num_samples'] else ''}; demonstrations: "
               f"{'RICES' if report['rices'] else 'random'}; decoding: "
               f"{report['decode']['method']} (beam {report['decode']['num_beams']}).")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ CLI


# The model directory's init and restore (kept importable here).
init_params = model_dir.init_params


def load_params(config: FlamingoConfig, directory: str, mesh=None, mesh_cfg=None):
  """Params from an orbax params directory, restored into their shardings."""
  from flamingo_jax.training.checkpoint import restore_params
  return restore_params(directory, model_dir.abstract_params(config, mesh, mesh_cfg),
                        what=f"checkpoint {directory}")


def _int_list(text: str, what: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"--{what} must be comma-separated integers, got {text!r}") from None


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """The CLI (`python -m flamingo_jax.evaluate`); returns the results dict."""
  from flamingo_jax.config import apply_overrides, load_config, split_config_args
  from flamingo_jax.data.tokenizer import Tokenizer
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = split_config_args(argv)
  p = argparse.ArgumentParser(prog="python -m flamingo_jax.evaluate",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="config file (configs/*.py) with an eval "
                 "section; --config.a.b=value overrides")
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--checkpoint", help="orbax directory holding the params tree")
  group.add_argument("--random_init", action="store_true", help="random params (smoke tests)")
  p.add_argument("--tasks", required=True, help="comma-separated names from eval.tasks")
  p.add_argument("--shots", default="0,4,32", help="comma-separated shot counts")
  p.add_argument("--num_samples", type=int, default=0, help="evaluate a seeded random subset "
                 "of this many examples per task (0: all)")
  p.add_argument("--rices", action="store_true", help="RICES demonstrations (else random)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--seed", type=int, default=0, help="--random_init seed")
  p.add_argument("--no_progress", action="store_true")
  a = p.parse_args(rest)
  cfg = apply_overrides(load_config(a.config), overrides)
  config = model_config(cfg)
  ec = eval_config(cfg)
  tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
  unknown = [t for t in tasks if t not in ec.tasks]
  _check(not unknown, f"unknown eval task(s) {unknown}; the config's eval.tasks has "
         f"{sorted(ec.tasks)}")
  shots = _int_list(a.shots, "shots")
  tok_path = ec.tokenizer or (cfg.data.tokenizer if "data" in cfg and "tokenizer" in cfg.data
                              else "")
  _check(bool(tok_path), "no tokenizer: set eval.tokenizer (or data.tokenizer) to a "
         "sentencepiece model")
  tokenizer = Tokenizer.load(tok_path)
  model_dir.check_tokenizer(config, tokenizer)
  params = init_params(config, a.seed) if a.random_init else load_params(config, a.checkpoint)
  metadata = dict(config=os.path.abspath(a.config), overrides=overrides,
                  random_init=bool(a.random_init),
                  checkpoint=None if a.random_init else os.path.abspath(a.checkpoint))
  report = evaluate(config, ec, params, tokenizer,
                    tasks=tasks, shots=shots, num_samples=a.num_samples,
                    use_rices=a.rices, out_dir=a.out, progress=not a.no_progress,
                    metadata=metadata)
  print(results_markdown(report))
  return report
