"""The evaluation run: few-shot prompts -> decoding or scoring -> metrics -> a Table 1.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR \
      --eval configs/eval/coco.py:/data/coco --eval configs/eval/vqav2.py:/data/vqav2 \
      [--shots 0,4,32] [--num_trials 3] [--rices] [--mesh.tensor=4] --out OUT

MODEL_DIR is a model directory (flamingo_jax/model_dir.py: our exports and the
converted OpenFlamingo / IDEFICS checkpoints). Each `--eval` file names one
benchmark's files under its data root and its protocol (shots, trials, beam,
max new tokens, prompt); `--config FILE` may add an `eval` (and `mesh`)
section instead. For each task, trial and shot count: read the local files,
pick the demonstrations (random from the fixed 2048-example query set, or RICES
on the cached vision features), build the prompts, then decode (beam 3 to
`<EOC>`) and score with CIDEr / VQA accuracy, or rank the options by mean
log-likelihood per token and report top-1 / ROC-AUC. Video benchmarks feed
each clip [T, H, W, 3] (evaluate/video.py) as one image slot. Vision features of
each image or clip, and the resampler's tokens of them that generation takes, are
computed once per run and cached on disk; predictions are appended
per batch, so a rerun continues. Writes results.json, results_open_flamingo.json,
results.md and predictions/. docs/evaluation.md describes all of it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from flamingo_jax import model_dir
from flamingo_jax.config import from_config_dict
from flamingo_jax.models.config import FlamingoConfig, model_config
from flamingo_jax.errors import ArgumentParser, ConfigError
from flamingo_jax.evaluate import classification, datasets, prompts, rices, video
from flamingo_jax.evaluate.cider import cider_d
from flamingo_jax.evaluate.decode import DEFAULT_BUCKETS, DecodeConfig, Generator, Placement
from flamingo_jax.evaluate.features import FeatureCache, latents_supported, params_fingerprint
from flamingo_jax.evaluate.predictions import PredictionLog, file_stem
from flamingo_jax.evaluate.scoring import Scorer
from flamingo_jax.evaluate.vqa import (ANSWER_POSTPROCESS, GT_NORMALISATIONS,
                                       check_answer_postprocess, normalize_answer,
                                       postprocess_answer, vqa_accuracy)

log = logging.getLogger(__name__)

KINDS = ("captioning", "vqa", "video_qa", "classification", "hateful_memes")
FORMATS = {
    # Karpathy split file; COCO captions_*.json; VATEX's vatex_*_v1.0.json (videos)
    "captioning": ("karpathy", "coco", "vatex"),
    "vqa": ("vqa", "textvqa", "vizwiz"),  # VQAv2 pair (also OK-VQA); the released files
    "video_qa": ("msvd_qa", "msrvtt_qa"),  # the released {train,val,test}_qa.json
    "classification": ("list", "folder"),  # JSON list of {image, label}; class folders
    "hateful_memes": ("jsonl",),
}
METRICS = {"captioning": "CIDEr", "vqa": "VQA acc.", "video_qa": "top-1",
           "classification": "top-1", "hateful_memes": "ROC-AUC"}
# OpenFlamingo's (TextVQA: 10)
DEFAULT_MAX_NEW_TOKENS = {"captioning": 20, "vqa": 5, "video_qa": 5}
VIDEO_FORMATS = ("vatex", "msvd_qa", "msrvtt_qa")  # their examples are video clips
QA_KINDS = ("vqa", "video_qa")  # open-ended answers (answer_postprocess applies)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# Path-valued task keys, resolved against the task's data_root when relative.
PATH_KEYS = ("train", "train_annotations", "test", "test_annotations", "image_root",
             "train_image_root", "test_image_root", "class_names", "video_mapping")


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class EvalTaskConfig:
  """One benchmark: where its files are, how it is prompted and scored."""
  kind: str = "captioning"  # captioning | vqa | video_qa | classification | hateful_memes
  format: str = ""  # "" = the kind's first in FORMATS
  data_root: str = ""  # relative paths below are under it
  train: str = ""  # the support set (demonstrations): file or folder
  train_annotations: str = ""  # vqa format: the support set's annotations
  test: str = ""  # the evaluated examples ("" = `train`, for one Karpathy file)
  test_annotations: str = ""  # vqa format: required, the answers to score against
  train_splits: tuple[str, ...] = ("train", "restval")  # karpathy
  test_splits: tuple[str, ...] = ("test",)  # karpathy
  image_root: str = ""  # prefix of image (video formats: video) paths of both sets
  train_image_root: str = ""  # overrides image_root for the support set
  test_image_root: str = ""  # overrides image_root for the evaluated set
  image_naming: str = "coco"  # vqa format: datasets.VQA_IMAGE_NAMING key or format string
  class_names: str = ""  # classification: .txt / JSON list of names in label order
  # Video formats (vatex, msvd_qa, msrvtt_qa): each example is a clip of num_frames
  # frames at fps from the start of its video (a file, or a folder of frames extracted
  # at frames_fps; 0 = fps), through the resampler's temporal embeddings.
  num_frames: int = 0
  fps: float = 0.0
  frames_fps: float = 0.0
  video_ext: str = ""  # "" = the release's (.avi for MSVD, .mp4 for MSR-VTT and VATEX)
  video_mapping: str = ""  # msvd_qa: youtube_mapping.txt (video_id N -> clip name)
  max_new_tokens: int = 0  # 0: 20 for captioning, 5 for VQA
  prompt_style: str = "flamingo"  # flamingo | open_flamingo (prompts.STYLES)
  # Overrides the style's template, e.g. "a {class_name}" (slots: the kind's fields,
  # the answer slot last; see prompts.custom_template).
  template: str = ""
  vqa_demo_answer: str = "most_common"  # or "first" (OpenFlamingo)
  answer_postprocess: str = "none"  # vqa: none | vqa (OpenFlamingo's cuts) | ok_vqa (+ stems)
  gt_normalisation: str = "official"  # vqa: official | open_flamingo
  # The protocol; 0 / () take the eval section's value.
  shots: tuple[int, ...] = ()
  num_trials: int = 0
  num_beams: int = 0
  ensemble: int = 0  # close-ended: shot orders whose log-likelihoods are averaged


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The composed `eval` section."""
  tasks: Mapping[str, EvalTaskConfig] = dataclasses.field(default_factory=dict)
  tokenizer: str = ""  # "" = the model directory's (or the config's data.tokenizer)
  batch_size: int = 8
  prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS
  decode_method: str = "beam"  # beam | greedy (open-ended tasks)
  num_beams: int = 3
  length_penalty: float = 0.0
  option_chunk: int = 64  # option prefix-tree nodes scored at once per prompt (close-ended)
  query_set_size: int = 2048  # the random demonstrations' pool
  rices_pool: int = 0  # RICES searches this many training examples (0: all)
  seed: int = 42  # trial t uses trial_seeds[t], else seed + t
  shots: tuple[int, ...] = (0, 4, 32)  # the paper's
  num_trials: int = 1
  trial_seeds: tuple[int, ...] = ()
  ensemble: int = 1
  feature_cache: str = ""  # "" = OUT/features; "memory": no files; "off": encode per prompt
  image_mean: tuple[float, ...] = IMAGENET_MEAN  # 0..255 units; also the padding colour
  image_std: tuple[float, ...] = IMAGENET_STD


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def _rooted(root: str, path: str) -> str:
  return os.path.join(root, path) if root and path and not os.path.isabs(path) else path


def validate_task(t: EvalTaskConfig, prefix: str) -> EvalTaskConfig:
  """Fills the kind's defaults, resolves paths under data_root and checks every
  field; returns the completed config."""
  _check(t.kind in KINDS, f"config key '{prefix}.kind' is {t.kind!r}; expected one of "
         f"{list(KINDS)}")
  fmt = t.format or FORMATS[t.kind][0]
  _check(fmt in FORMATS[t.kind], f"config key '{prefix}.format' is {t.format!r}; for kind "
         f"{t.kind!r} expected one of {list(FORMATS[t.kind])}")
  t = dataclasses.replace(t, **{k: _rooted(t.data_root, getattr(t, k)) for k in PATH_KEYS})
  _check(bool(t.train), f"config key '{prefix}.train' is empty: the support set file "
         "(demonstrations) is needed")
  test = t.test or (t.train if fmt == "karpathy" else "")
  _check(bool(test), f"config key '{prefix}.test' is empty: the evaluated examples' file is "
         "needed")
  if t.kind == "vqa" and fmt == "vqa":
    _check(bool(t.train_annotations), f"config key '{prefix}.train_annotations' is empty: "
           "demonstrations need answers")
    _check(bool(t.test_annotations), f"config key '{prefix}.test_annotations' is empty: "
           "VQA accuracy needs the human answers")
  if t.kind == "classification":
    _check(bool(t.class_names) or fmt == "folder", f"config key '{prefix}.class_names' is "
           "empty: a .txt or JSON list of class names in label order is needed")
  for key in ("max_new_tokens", "num_trials", "num_beams", "ensemble"):
    _check(getattr(t, key) >= 0, f"config key '{prefix}.{key}' must be >= 0, got "
           f"{getattr(t, key)}")
  _check(all(isinstance(s, int) and s >= 0 for s in t.shots), f"config key '{prefix}.shots' "
         f"must be shot counts >= 0, got {list(t.shots)}")
  _check(t.prompt_style in prompts.STYLES, f"config key '{prefix}.prompt_style' is "
         f"{t.prompt_style!r}; expected one of {list(prompts.STYLES)}")
  if fmt in VIDEO_FORMATS:
    _check(t.num_frames >= 1, f"config key '{prefix}.num_frames' must be >= 1 for the video "
           f"format {fmt!r}, got {t.num_frames}")
    _check(t.fps > 0 and t.frames_fps >= 0, f"config keys '{prefix}.fps' / "
           f"'{prefix}.frames_fps' must be > 0 / >= 0, got {t.fps} / {t.frames_fps}")
  else:
    _check(t.num_frames == 0, f"config key '{prefix}.num_frames' is for the video formats "
           f"{list(VIDEO_FORMATS)}; format {fmt!r} reads still images")
  if fmt == "msvd_qa":
    _check(bool(t.video_mapping), f"config key '{prefix}.video_mapping' is empty: MSVD-QA's "
           "youtube_mapping.txt names each video_id's clip")
  if t.template:
    try:
      prompts.custom_template(template_kind(t.kind), t.template)
    except ValueError as e:
      raise ConfigError(f"config key '{prefix}.template': {e}") from None
  _check(t.vqa_demo_answer in ("most_common", "first"), f"config key "
         f"'{prefix}.vqa_demo_answer' must be 'most_common' or 'first', got "
         f"{t.vqa_demo_answer!r}")
  _check(t.answer_postprocess in ANSWER_POSTPROCESS, f"config key "
         f"'{prefix}.answer_postprocess' is {t.answer_postprocess!r}; expected one of "
         f"{list(ANSWER_POSTPROCESS)}")
  _check(t.gt_normalisation in GT_NORMALISATIONS, f"config key '{prefix}.gt_normalisation' "
         f"is {t.gt_normalisation!r}; expected one of {list(GT_NORMALISATIONS)}")
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


def template_kind(kind: str) -> str:
  """The prompt templates a task kind uses (video QA is prompted as VQA)."""
  return "vqa" if kind == "video_qa" else kind


def validate(c: EvalConfig) -> None:
  for key in ("batch_size", "num_beams", "option_chunk", "query_set_size", "num_trials",
              "ensemble"):
    _check(getattr(c, key) >= 1, f"config key 'eval.{key}' must be >= 1, got "
           f"{getattr(c, key)}")
  _check(c.rices_pool >= 0, f"config key 'eval.rices_pool' must be >= 0, got {c.rices_pool}")
  _check(c.decode_method in ("beam", "greedy"), f"config key 'eval.decode_method' is "
         f"{c.decode_method!r}; expected 'beam' or 'greedy'")
  _check(bool(c.prompt_buckets) and min(c.prompt_buckets) >= 1,
         f"config key 'eval.prompt_buckets' must be positive lengths, got {c.prompt_buckets}")
  _check(all(isinstance(s, int) and s >= 0 for s in c.shots) and bool(c.shots),
         f"config key 'eval.shots' must be shot counts >= 0, got {list(c.shots)}")
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
      _check("eval" in cfg, "the config has no 'eval' section: pass one or more "
             "--eval configs/eval/<benchmark>.py:DATA_ROOT (see docs/evaluation.md)")
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


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What one task runs: shot counts, trial seeds, decoding, ensembling."""
  shots: tuple[int, ...]
  seeds: tuple[int, ...]
  num_beams: int
  ensemble: int


def protocol(ec: EvalConfig, t: EvalTaskConfig, *, shots: Sequence[int] = (),
             num_trials: int = 0, trial_seeds: Sequence[int] = (),
             ensemble: int = 0) -> Protocol:
  """The task's protocol: CLI values first, then the task config, then the eval section."""
  n = num_trials or t.num_trials or ec.num_trials
  seeds = tuple(trial_seeds) or tuple(ec.trial_seeds)
  _check(not seeds or len(seeds) >= n, f"{n} trials but only {len(seeds)} trial seeds "
         f"({list(seeds)}); give one per trial")
  seeds = seeds[:n] if seeds else tuple(ec.seed + i for i in range(n))
  return Protocol(shots=tuple(shots) or t.shots or ec.shots, seeds=seeds,
                  num_beams=t.num_beams or ec.num_beams,
                  ensemble=ensemble or t.ensemble or ec.ensemble)


def compose(model_section: Mapping, *, config: Optional[ml_collections.ConfigDict] = None,
            eval_files: Sequence[str] = (), overrides: Sequence[str] = ()
            ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """One config from a model section, an optional config file's `eval` / `mesh` /
  `data` sections and any number of eval files (each a `{"tasks": {...}}`), then
  the `--config.a.b=value` overrides. Task names must not repeat. Returns the
  config and the task names in the order given."""
  from flamingo_jax.config import apply_overrides, load_config
  defaults = {f.name: getattr(EvalConfig, f.name) for f in dataclasses.fields(EvalConfig)
              if f.name != "tasks"}
  eval_section = ml_collections.ConfigDict(dict(defaults, tasks={}))
  out = ml_collections.ConfigDict({"model": dict(model_section)})
  if config is not None:
    for key in config:
      if key != "model":
        out[key] = config[key]
    if "eval" in config:
      given = config.eval.to_dict()
      unknown = sorted(set(given) - set(defaults) - {"tasks"})
      _check(not unknown, f"unknown config key 'eval.{unknown[0] if unknown else ''}'; valid "
             f"keys: {', '.join(sorted(defaults))}, tasks")
      eval_section.update(given)
      if "tasks" not in given:
        eval_section.tasks = {}
  order = list(eval_section.tasks)
  for spec in eval_files:
    part = load_config(spec)
    unknown = sorted(set(part) - {"tasks"})
    _check(not unknown, f"eval config {spec!r} has keys {unknown}: an eval file holds only "
           "'tasks' (set eval-wide keys with --config.eval.KEY=VALUE)")
    for name, task in part.tasks.items():
      _check(name not in eval_section.tasks, f"eval task {name!r} of {spec!r} is already "
             "defined by another eval config")
      eval_section.tasks[name] = task
      order.append(name)
  out.eval = eval_section
  if "mesh" not in out:
    out.mesh = ml_collections.ConfigDict()
  if "distributed" not in out:  # as in training: --config.distributed.KEY=VALUE
    from flamingo_jax.runtime.distributed import DistributedConfig
    out.distributed = ml_collections.ConfigDict(dataclasses.asdict(DistributedConfig()))
  return apply_overrides(out, overrides, open_keys=("mesh",)), order


# ------------------------------------------------------------------------------ inputs


@functools.lru_cache(maxsize=256)
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
  if t.format == "vatex":
    ext = t.video_ext or datasets.VIDEO_EXTENSIONS["vatex"]
    return (datasets.read_vatex(t.train, t.train_image_root, ext),
            datasets.read_vatex(t.test, t.test_image_root, ext), ())
  if t.kind == "captioning":
    if t.format == "karpathy":
      return (datasets.read_karpathy_captions(t.train, t.train_splits, t.train_image_root),
              datasets.read_karpathy_captions(t.test, t.test_splits, t.test_image_root), ())
    return (_read_coco_captions(t.train, t.train_image_root),
            _read_coco_captions(t.test, t.test_image_root), ())
  if t.format == "msvd_qa":
    ext = t.video_ext or datasets.VIDEO_EXTENSIONS["msvd_qa"]
    return (datasets.read_msvd_qa(t.train, t.video_mapping, t.train_image_root, ext),
            datasets.read_msvd_qa(t.test, t.video_mapping, t.test_image_root, ext), ())
  if t.format == "msrvtt_qa":
    ext = t.video_ext or datasets.VIDEO_EXTENSIONS["msrvtt_qa"]
    return (datasets.read_msrvtt_qa(t.train, t.train_image_root, ext),
            datasets.read_msrvtt_qa(t.test, t.test_image_root, ext), ())
  if t.kind == "vqa" and t.format == "textvqa":
    return (datasets.read_textvqa(t.train, t.train_image_root),
            datasets.read_textvqa(t.test, t.test_image_root), ())
  if t.kind == "vqa" and t.format == "vizwiz":
    return (datasets.read_vizwiz(t.train, t.train_image_root),
            datasets.read_vizwiz(t.test, t.test_image_root), ())
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
  """One benchmark's data, prompts and scoring, for every shot count and trial."""

  def __init__(self, name: str, t: EvalTaskConfig, ec: EvalConfig, config: FlamingoConfig):
    self.name, self.t, self.ec, self.config = name, t, ec, config
    self.support, self.test, self.classes = load_task_data(t)
    _check(len(self.support) > 0, f"eval task {name!r}: the support set {t.train} is empty")
    _check(len(self.test) > 0, f"eval task {name!r}: the evaluated set {t.test} is empty")
    if t.kind == "vqa":
      unanswered = [ex.question_id for ex in self.test if len(ex.answers) < 2]
      _check(not unanswered, f"eval task {name!r}: {len(unanswered)} evaluated questions of "
             f"{t.test} have no human answers (first: {unanswered[:3]}); VQA accuracy needs "
             "them (a test split without answers cannot be scored here)")
    kind = template_kind(t.kind)
    self.template = (prompts.custom_template(kind, t.template) if t.template else
                     prompts.get_template(kind, t.prompt_style))  # templates are per kind
    self.query_set = prompts.random_query_set(
        len(self.support), min(ec.query_set_size, len(self.support)), ec.seed)

  def reseed(self, seed: int) -> None:
    """The query set of a trial (the shots of every query follow from it and the seed)."""
    self.seed = seed
    self.query_set = prompts.random_query_set(
        len(self.support), min(self.ec.query_set_size, len(self.support)), seed)

  def image(self, path: str) -> np.ndarray:
    """An example's pixels [T, H, W, 3]: a still image (T = 1) or a video clip."""
    size, mean, std = self.config.vision.image_size, tuple(self.ec.image_mean), \
        tuple(self.ec.image_std)
    t = self.t
    if t.num_frames:
      return video.load_clip(path, size, t.num_frames, t.fps, t.frames_fps, mean, std)
    return load_image(path, size, mean, std)

  @property
  def clip_key(self) -> str:
    """What an example's features depend on beyond the file: "" for images, else the
    clip (frames, rate, frame-folder rate); keys the feature caches."""
    t = self.t
    return f"clip|{t.num_frames}|{t.fps:g}|{t.frames_fps:g}" if t.num_frames else ""

  def shots(self, queries: np.ndarray, num_shots: int, use_rices: bool, rices_fn=None
            ) -> np.ndarray:
    """[Q, n] support indices per query (n = 2 text-only demonstrations at 0 shots)."""
    n = prompts.num_demonstrations(num_shots)
    _check(n <= len(self.query_set), f"eval task {self.name!r}: {num_shots} shots need {n} "
           f"demonstrations but the support set has {len(self.query_set)} examples")
    if not use_rices:
      seed = getattr(self, "seed", self.ec.seed)
      return np.stack([prompts.random_shots(self.query_set, n, int(q), seed=seed)
                       for q in queries])
    pool, pool_feats, query_feats = rices_fn(self, queries)
    return pool[rices.rices_shots(pool_feats, query_feats, n)]

  def prompt(self, query: int, shot_idx: Sequence[int], num_shots: int) -> prompts.Prompt:
    return prompts.build_prompt(self.template,
                                [_fields(self.support[i], self.t) for i in shot_idx],
                                _fields(self.test[query], self.t), zero_shot=num_shots == 0)

  def references(self, query: int) -> dict:
    """What a prediction is scored against, for the predictions files."""
    ex = self.test[query]
    if isinstance(ex, datasets.CaptionExample):
      return {"references": list(ex.captions)}
    if isinstance(ex, datasets.VQAExample):
      return {"question": ex.question, "answers": list(ex.answers)}
    return {"label": ex.label, "label_name": self.classes[ex.label]}

  def example_id(self, query: int):
    ex = self.test[query]
    return next((getattr(ex, f) for f in ("question_id", "image_id", "id") if hasattr(ex, f)),
                ex.image_path)


class _Rices:
  """RICES on the cached vision features: the support pool's once per task."""

  def __init__(self, features, ec: EvalConfig):
    self.features, self.ec = features, ec  # features: task -> its FeatureCache
    self._pools: dict = {}

  def __call__(self, task: _Task, queries: np.ndarray):
    if task.name not in self._pools:
      pool = np.arange(len(task.support))
      if self.ec.rices_pool and self.ec.rices_pool < len(pool):
        pool = np.sort(np.random.default_rng(self.ec.seed).permutation(len(pool))
                       [:self.ec.rices_pool])
      self._pools[task.name] = (pool, self.features(task).pooled(
          [task.support[i].image_path for i in pool]))
    pool, feats = self._pools[task.name]
    return pool, feats, self.features(task).pooled([task.test[q].image_path for q in queries])


def _score_run(task: _Task, predictions: dict, option_scores: Optional[np.ndarray],
               queries: np.ndarray, top5: Optional[np.ndarray] = None) -> tuple[float, dict]:
  """-> (headline score in percent, extra metrics). Classification takes the option
  scores [Q, O] or, from saved rows, each query's five best classes [Q, <=5]."""
  kind = task.t.kind
  if kind == "captioning":
    refs = {task.test[q].image_id: task.test[q].captions for q in queries}
    cands = {task.test[q].image_id: predictions[int(q)] for q in queries}
    return 100.0 * cider_d(refs, cands).corpus, {}
  if kind == "video_qa":  # top-1: the one answer, both sides VQA-normalised
    hits = [normalize_answer(predictions[int(q)]) == normalize_answer(task.test[q].answers[0])
            for q in queries]
    return 100.0 * float(np.mean(hits)), {}
  if kind == "vqa":
    exs = [task.test[q] for q in queries]
    res = vqa_accuracy({task.test[q].question_id: predictions[int(q)] for q in queries}, exs,
                       gt_normalisation=task.t.gt_normalisation)
    return res.overall, {"per_answer_type": res.per_answer_type}
  labels = np.array([task.test[q].label for q in queries])
  if kind == "classification":
    if top5 is None:
      top5 = classification.rank_options(option_scores)[:, :5]
    extra = {}
    if top5.shape[1] >= 5:
      extra["top-5"] = 100.0 * float(np.mean((top5[:, :5] == labels[:, None]).any(1)))
    return 100.0 * float(np.mean(top5[:, 0] == labels)), extra
  return 100.0 * classification.roc_auc(labels,
                                        classification.positive_probability(option_scores)), {}


def decoding_text(kind: str, ec: EvalConfig, t: EvalTaskConfig, proto: Protocol) -> str:
  """How a task's predictions were made, in words (for results.md)."""
  if kind in ("captioning",) + QA_KINDS:
    how = (f"beam search ({proto.num_beams} beams, length penalty {ec.length_penalty:g})"
           if ec.decode_method == "beam" else "greedy")
    post = f", answers post-processed '{t.answer_postprocess}'" if kind in QA_KINDS and \
        t.answer_postprocess != "none" else ""
    return f"{how}, at most {t.max_new_tokens} new tokens, stop at <EOC>{post}"
  ens = f", log-likelihoods averaged over {proto.ensemble} shot orders" \
      if proto.ensemble > 1 else ""
  return f"options ranked by mean log-likelihood per token{ens}"


class _Model:
  """The model side of a run: decoding / scoring on a placement, cached features."""

  def __init__(self, config: FlamingoConfig, ec: EvalConfig, params, tokenizer,
               placement: Placement, out_dir: Optional[str]):
    self.config, self.ec, self.params, self.tokenizer = config, ec, params, tokenizer
    self.placement = placement
    info = tokenizer.info
    self.common = dict(batch_size=ec.batch_size, prompt_buckets=ec.prompt_buckets,
                       placement=placement)
    self.scorer = Scorer(config, option_chunk=ec.option_chunk, pad_token_id=info.pad_id,
                         **self.common)
    self._generators: dict = {}
    self._out_dir = out_dir
    self._caches: dict = {}  # task.clip_key -> FeatureCache (images share "")
    self.features = self.features_for(None)  # the still images' cache (None when off)

  def features_for(self, task: Optional["_Task"]) -> Optional[FeatureCache]:
    """The feature cache of a task's examples: one for still images, one per clip
    setting (frames, fps), each keyed by file, preprocessing and vision weights."""
    ec, config, placement = self.ec, self.config, self.placement
    if ec.feature_cache == "off":
      return None
    key = task.clip_key if task is not None else ""
    if key not in self._caches:
      cache_dir = "" if ec.feature_cache == "memory" else (
          ec.feature_cache or (os.path.join(self._out_dir, "features")
                               if self._out_dir else ""))
      shardings = None
      if placement.mesh is not None:
        shardings = (placement.param_shardings, placement.data_sharding)
      extra = {}
      if key:  # a clip's features are T images': keep about as many bytes in memory,
        # but at least one batch of 32-shot prompts' clips
        extra["memory_items"] = max(4096 // task.t.num_frames, 33 * ec.batch_size)
      self._caches[key] = FeatureCache(
          self.params, config, task.image if key else self._image, batch_size=ec.batch_size,
          cache_dir=cache_dir, **extra,
          preprocess_key=f"{config.vision.image_size}|{ec.image_mean}|{ec.image_std}"
          + (f"|{key}" if key else ""),
          shardings=shardings, run=placement.run, fetch=placement.fetch)
    return self._caches[key]

  def feature_counts(self) -> Optional[dict]:
    """{computed, loaded} features and latents over every cache (None when it is off)."""
    if not self._caches:
      return None
    total = lambda name: sum(getattr(c, name) for c in self._caches.values())  # noqa: E731
    return {"computed": total("computed"), "loaded": total("loaded"),
            "latents_computed": total("latents_computed"),
            "latents_loaded": total("latents_loaded")}

  def _image(self, path: str) -> np.ndarray:
    return load_image(path, self.config.vision.image_size, tuple(self.ec.image_mean),
                      tuple(self.ec.image_std))

  def generator(self, max_new_tokens: int, num_beams: int) -> Generator:
    key = (max_new_tokens, num_beams)
    if key not in self._generators:
      info, ec = self.tokenizer.info, self.ec
      options = DecodeConfig(method=ec.decode_method, max_new_tokens=max_new_tokens,
                             num_beams=num_beams, length_penalty=ec.length_penalty,
                             stop_token_ids=(info.eos_id,), vocab_limit=info.vocab_size,
                             pad_token_id=info.pad_id)
      self._generators[key] = Generator(self.config, options, **self.common)
    return self._generators[key]

  def visual(self, built: Sequence[prompts.Prompt], task: "_Task", latents: bool = False
             ) -> dict:
    """The prompts' images (or clips) as the model takes them: cached latents
    [N, n, D_r] (latents=True, where the resampler allows: the generator takes
    them), cached features [N, T, S, C] or pixels [N, T, H, W, 3] per prompt."""
    features = self.features_for(task)
    if features is not None:
      # all the batch's images in one call: the missing ones are computed in full batches
      # (per prompt, each prompt's few new images filled a padded batch of their own)
      paths = [path for p in built for path in p.images]
      if latents and latents_supported(self.config):
        kind, values = "visual_latents", features.latents(paths)
      else:
        kind, values = "visual_features", features.get(paths)
      ends = np.cumsum([len(p.images) for p in built])
      return {kind: [np.stack(values[end - len(p.images):end]) for p, end in zip(built, ends)]}
    return {"images": [np.stack([task.image(path) for path in p.images]) for p in built]}

  def rices(self) -> _Rices:
    _check(self.features is not None, "RICES needs the vision features: eval.feature_cache "
           "must not be 'off'")
    return _Rices(self.features_for, self.ec)


def _option_ids(task: _Task, tokenizer) -> list[list[int]]:
  label = task.template.labels[-1] if task.template.labels else ""
  cut = task.template.text[:-len("{" + task.template.answer_field + "}")]
  sep = cut[len(cut.rstrip(" ")):]
  return [continuation_ids(tokenizer, label, sep + c) for c in task.classes]


def _run_batch(m: _Model, task: _Task, batch: np.ndarray, shot_idx: np.ndarray,
               num_shots: int, proto: Protocol, option_ids) -> list[dict]:
  """One batch of queries -> their prediction rows."""
  t = task.t
  orders = [tuple(range(shot_idx.shape[1]))]
  if option_ids is not None and proto.ensemble > 1:
    orders = prompts.shot_orders(shot_idx.shape[1], proto.ensemble, seed=task.seed)
  built = [task.prompt(int(q), [shots[i] for i in order], num_shots)
           for q, shots in zip(batch, shot_idx) for order in orders]
  ids = [encode_prompt(p.text, m.tokenizer) for p in built]
  visual = m.visual(built, task, latents=option_ids is None)  # the generator takes latents
  rows = [{"index": int(q), "id": task.example_id(int(q)),
           "shots": [int(s) for s in shots], **task.references(int(q))}
          for q, shots in zip(batch, shot_idx)]
  if option_ids is None:
    outs = m.generator(t.max_new_tokens, proto.num_beams)(m.params, ids, **visual)
    for row, out in zip(rows, outs):
      text = m.tokenizer.decode(out)
      answer = prompts.postprocess_generation(text, task.template)
      if t.kind in QA_KINDS:
        answer = postprocess_answer(answer, t.answer_postprocess).strip()
      row.update(prediction=answer, generated=text)
    return rows
  scores = m.scorer(m.params, ids, option_ids, **visual)  # [Q * E, O]
  scores = scores.reshape(len(batch), len(orders), -1).mean(axis=1)
  ranked = classification.rank_options(scores)
  for row, r, s in zip(rows, ranked, scores):
    row.update(prediction=task.classes[int(r[0])], top5=[int(i) for i in r[:5]])
    if len(task.classes) <= 10:
      row["scores"] = [float(x) for x in s]
  return rows


def _score_rows(task: _Task, rows: list[dict], queries: np.ndarray) -> tuple[float, dict]:
  predictions = {int(r["index"]): r["prediction"] for r in rows}
  if task.t.kind == "classification":
    width = min(len(r["top5"]) for r in rows)
    return _score_run(task, predictions, None, queries,
                      top5=np.array([r["top5"][:width] for r in rows]))
  if task.t.kind == "hateful_memes":
    return _score_run(task, predictions, np.array([r["scores"] for r in rows]), queries)
  return _score_run(task, predictions, None, queries)


def _fingerprint(task: _Task, ec: EvalConfig, proto: Protocol, num_shots: int, seed: int,
                 num_samples: int, use_rices: bool, model_id: str) -> dict:
  t = task.t
  return {"model": model_id, "task": dataclasses.asdict(t), "shots": num_shots, "seed": seed,
          "num_samples": num_samples, "rices": use_rices, "num_beams": proto.num_beams,
          "ensemble": proto.ensemble, "decode_method": ec.decode_method,
          "length_penalty": ec.length_penalty, "query_set_size": ec.query_set_size,
          "rices_pool": ec.rices_pool, "image_mean": list(ec.image_mean),
          "image_std": list(ec.image_std)}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and population standard deviation, as OpenFlamingo reports trials."""
  arr = np.asarray(values, np.float64)
  if np.isnan(arr).all():  # processes other than 0 do not score (no empty-slice warnings)
    return float("nan"), float("nan")
  return float(np.nanmean(arr)), float(np.nanstd(arr))


def evaluate(config: FlamingoConfig, ec: EvalConfig, params, tokenizer, *,
             tasks: Sequence[str], shots: Sequence[int] = (), num_samples: int = 0,
             use_rices: bool = False, out_dir: Optional[str] = None,
             progress: bool = True, metadata: Optional[dict] = None,
             num_trials: int = 0, trial_seeds: Sequence[int] = (), ensemble: int = 0,
             placement: Optional[Placement] = None, model_id: str = "",
             label: str = "") -> dict:
  """Runs every (task, shots, trial); returns the results dict (and writes it under out_dir).

  params: the unboxed Flamingo param tree (placed as `placement` says, default one
  device); tokenizer: `data.tokenizer.Tokenizer` (its `<image>`/`<EOC>` ids must
  be the model's); shots / num_trials / ensemble: override the tasks' protocol;
  model_id: names the params in the predictions' fingerprint, beside a hash of
  the weights (a rerun with other params never continues these files); label: prefixes
  the progress and score lines (a baseline's read apart from the model's); metadata: extra
  entries for results.json (the CLI records the config and checkpoint paths).
  """
  _check(config.vision.name != "none", "evaluation reads images, but model.vision.name is "
         "'none' (a model without a vision encoder)")
  model_dir.check_tokenizer(config, tokenizer)
  unknown = [t for t in tasks if t not in ec.tasks]
  _check(not unknown, f"unknown eval task(s) {unknown}; the eval configs define "
         f"{sorted(ec.tasks)}")
  _check(bool(tasks), "need at least one task")
  _check(all(s >= 0 for s in shots), f"shot counts must be >= 0, got {list(shots)}")
  placement = placement or Placement()
  _check(ec.batch_size % placement.batch_shards == 0, f"config key 'eval.batch_size' "
         f"({ec.batch_size}) must be a multiple of the mesh's data-parallel size "
         f"({placement.batch_shards})")
  for name in tasks:
    if ec.tasks[name].kind in QA_KINDS:
      check_answer_postprocess(ec.tasks[name].answer_postprocess)
  m = _Model(config, ec, params, tokenizer, placement, out_dir)
  model_id = (f"{model_id}|{params_fingerprint(params)}|"
              f"{hashlib.sha1(repr(config).encode()).hexdigest()[:12]}")
  rices_fn = m.rices() if use_rices else None
  results: dict = {}
  protocols: dict = {}
  for name in tasks:
    task = _Task(name, ec.tasks[name], ec, config)
    t = task.t
    proto = protocols[name] = protocol(ec, t, shots=shots, num_trials=num_trials,
                                       trial_seeds=trial_seeds, ensemble=ensemble)
    option_ids = _option_ids(task, tokenizer) if task.classes else None
    entry = results[name] = {"kind": t.kind, "metric": METRICS[t.kind],
                             "decoding": decoding_text(t.kind, ec, t, proto),
                             "seeds": list(proto.seeds), "shots": {}}
    for num_shots in proto.shots:
      trials, extras, seconds, evaluated = [], [], 0.0, 0
      for trial, seed in enumerate(proto.seeds):
        task.reseed(seed)
        queries = select_queries(len(task.test), num_samples, seed)
        entry["num_examples"] = int(len(queries))
        start = time.time()
        shot_idx = task.shots(queries, num_shots, use_rices, rices_fn)
        plog = PredictionLog(out_dir, file_stem(name, num_shots, trial), _fingerprint(
            task, ec, proto, num_shots, seed, num_samples, use_rices, model_id))
        todo = [i for i, q in enumerate(queries) if int(q) not in plog.done()]
        bar = _progress(len(queries), f"{label}{name} {num_shots}-shot"
                        + (f" trial {trial}" if len(proto.seeds) > 1 else ""), progress,
                        initial=len(queries) - len(todo))
        for b in range(0, len(todo), ec.batch_size):
          pick = todo[b:b + ec.batch_size]
          plog.add(_run_batch(m, task, queries[pick], shot_idx[pick], num_shots, proto,
                              option_ids))
          if bar is not None:
            bar.update(len(pick),
                       examples_per_s=f"{(b + len(pick)) / (time.time() - start):.2f}")
        if bar is not None:
          bar.close()
        rows = plog.finish(queries)
        seconds += time.time() - start
        evaluated += len(todo)
        if jax.process_index() == 0:
          score, extra = _score_rows(task, rows, queries)
        else:
          score, extra = float("nan"), {}
        trials.append(score)
        extras.append(extra)
        log.info("%s%s %d-shot trial %d (seed %d): %s %.2f", label, name, num_shots, trial,
                 seed, METRICS[t.kind], score)
      mean, std = _mean_std(trials)
      run = {"score": mean, "stddev": std, "trials": trials, "seconds": seconds,
             "evaluated": evaluated,
             "examples_per_s": evaluated / seconds if evaluated and seconds else None}
      if "top-5" in extras[0]:
        run["top-5"] = _mean_std([e["top-5"] for e in extras])[0]
      if "per_answer_type" in extras[0]:
        run["per_answer_type"] = extras[0]["per_answer_type"] if len(extras) == 1 else {
            k: _mean_std([e["per_answer_type"][k] for e in extras])[0]
            for k in extras[0]["per_answer_type"]}
      entry["shots"][str(num_shots)] = run
  all_shots = sorted({s for p in protocols.values() for s in p.shots})
  report = {"results": results, "shots": all_shots, "tasks": list(tasks),
            "num_samples": num_samples, "rices": use_rices, "seed": ec.seed,
            "decode": {"method": ec.decode_method, "num_beams": ec.num_beams,
                       "length_penalty": ec.length_penalty},
            "features": m.feature_counts(), **(metadata or {})}
  if out_dir and jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(report, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "results_open_flamingo.json"), "w") as f:
      json.dump(open_flamingo_results(report), f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
      f.write(results_markdown(report))
  return report


def open_flamingo_results(report: dict) -> dict:
  """results.json in OpenFlamingo's layout: {task: [{"shots", "trials", "mean", "stddev"}]}."""
  return {name: [{"shots": int(s), "trials": run["trials"], "mean": run["score"],
                  "stddev": run["stddev"]}
                 for s, run in sorted(report["results"][name]["shots"].items(),
                                      key=lambda kv: int(kv[0]))]
          for name in report["tasks"]}


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
  if not enabled or jax.process_index() != 0:
    return None
  from flamingo_jax.training.metrics import Progress
  return Progress(desc, total, initial=initial, unit="example")


def results_markdown(report: dict) -> str:
  """Rows tasks, columns shots, like paper Table 1; scores in percent (CIDEr x100),
  mean ± std over trials; then how each task was decoded."""
  shots = report["shots"]
  lines = ["| task | metric | " + " | ".join(f"{s}-shot" for s in shots) + " |",
           "| --- | --- | " + " | ".join("---:" for _ in shots) + " |"]
  for name in report["tasks"]:
    entry = report["results"][name]
    cells = []
    for s in shots:
      run = entry["shots"].get(str(s))
      if run is None:
        cells.append("")
      elif len(run.get("trials", [])) > 1:
        cells.append(f"{run['score']:.1f} ± {run['stddev']:.1f}")
      else:
        cells.append(f"{run['score']:.1f}")
    lines.append(f"| {name} | {entry['metric']} | " + " | ".join(cells) + " |")
  lines.append("")
  subset = " (seeded subset)" if report["num_samples"] else ""
  lines.append(f"Demonstrations: {'RICES' if report['rices'] else 'random'}.")
  for name in report["tasks"]:
    entry = report["results"][name]
    trials = len(entry["seeds"])
    lines.append(f"- {name}: {entry.get('num_examples', 0)} examples{subset}; "
                 f"{entry['decoding']}; {trials} trial{'s' if trials > 1 else ''} "
                 f"(seed{'s' if trials > 1 else ''} {', '.join(map(str, entry['seeds']))}).")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ CLI

# The model directory's init and restore (kept importable here).
init_params = model_dir.init_params


def load_params(config: FlamingoConfig, directory: str, mesh=None, mesh_cfg=None):
  """Params from an orbax params directory, restored into their shardings."""
  from flamingo_jax.runtime.params_io import restore_params
  return restore_params(directory, model_dir.abstract_params(config, mesh, mesh_cfg),
                        what=f"checkpoint {directory}")


def _int_list(text: str, what: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ConfigError(f"--{what} must be comma-separated integers, got {text!r}") from None


def make_placement(mesh_section: Any, config: FlamingoConfig) -> Placement:
  """One device for an empty `mesh` section; else the mesh it describes, with the
  params' shardings from the trainer's rules (tensor / FSDP)."""
  if not mesh_section:
    return Placement()
  from flamingo_jax.runtime import sharding
  mesh_cfg = sharding.mesh_config(mesh_section)
  mesh = sharding.make_mesh(mesh_cfg)
  return Placement(mesh, mesh_cfg.rules, model_dir.param_shardings(config, mesh, mesh_cfg))


def mesh_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """`--mesh.AXIS=N` flags -> `--config.mesh.AXIS=N` overrides (and the other args)."""
  rest, overrides = [], []
  for a in argv:
    if a.startswith("--mesh."):
      overrides.append("--config." + a[2:])
    else:
      rest.append(a)
  return rest, overrides


def build_parser() -> ArgumentParser:
  p = ArgumentParser(
      prog="python -m flamingo_jax.evaluate", description=__doc__.split("\n\n")[0],
      epilog="--config.a.b=VALUE overrides any key of the composed config (model.*, eval.*, "
      "eval.tasks.NAME.*); --mesh.AXIS=N (data, fsdp, tensor, slice) shards the model and "
      "splits the queries over the devices (docs/evaluation.md).")
  p.add_argument("--checkpoint", metavar="MODEL_DIR", help="model directory: params/, "
                 "model_config.json and tokenizer.model (export_model_dir or a converter "
                 "wrote it)")
  p.add_argument("--eval", action="append", default=[], metavar="FILE[:DATA_ROOT]",
                 help="an eval config (configs/eval/*.py), its data root after a colon; "
                 "repeat for several benchmarks")
  p.add_argument("--config", help="optional config file with an `eval` section (and `mesh`, "
                 "`data`); its `model` section is used only with --random_init and no "
                 "--checkpoint")
  p.add_argument("--random_init", action="store_true", help="random params (smoke tests)")
  p.add_argument("--tasks", default="", help="comma-separated task names (default: every "
                 "task of the eval configs)")
  p.add_argument("--shots", default="", help="comma-separated shot counts (default: each "
                 "task's protocol)")
  p.add_argument("--num_trials", type=int, default=0, help="trials per shot count, each with "
                 "its own seed (default: each task's protocol); mean ± std reported")
  p.add_argument("--trial_seeds", default="", help="comma-separated seeds, one per trial "
                 "(default: eval.seed, eval.seed + 1, ...)")
  p.add_argument("--ensemble", type=int, default=0, help="close-ended tasks: average the "
                 "log-likelihoods over this many shot orders (default: each task's)")
  p.add_argument("--num_samples", type=int, default=0, help="evaluate a seeded random subset "
                 "of this many examples per task (0: all)")
  p.add_argument("--rices", action="store_true", help="RICES demonstrations (else random)")
  p.add_argument("--tokenizer", default="", help="the model's tokenizer (default: "
                 "eval.tokenizer, else MODEL_DIR/tokenizer.model)")
  p.add_argument("--out", required=True, help="output directory (a rerun continues it)")
  p.add_argument("--seed", type=int, default=0, help="--random_init seed")
  p.add_argument("--no_progress", action="store_true")
  return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """The CLI (`python -m flamingo_jax.evaluate`); returns the results dict."""
  from flamingo_jax.config import load_config, split_config_args, to_config_dict
  from flamingo_jax.data.tokenizer import Tokenizer
  argv = list(sys.argv[1:] if argv is None else argv)
  argv, mesh_overrides = mesh_args(argv)
  rest, overrides = split_config_args(argv)
  a = build_parser().parse_args(rest)
  _check(bool(a.checkpoint) or a.random_init, "pass --checkpoint MODEL_DIR (or --random_init "
         "with a --config that has a model section)")
  _check(not (a.checkpoint and os.path.basename(os.path.normpath(a.checkpoint))
              == model_dir.PARAMS and not os.path.exists(
                  os.path.join(a.checkpoint, model_dir.MODEL_CONFIG))),
         f"--checkpoint {a.checkpoint!r} is the params checkpoint; pass the model directory "
         "that holds it (and model_config.json)")
  file_cfg = load_config(a.config) if a.config else None
  if a.checkpoint:
    model = model_dir.read_model_config(a.checkpoint)
  else:
    _check(file_cfg is not None and "model" in file_cfg, "--random_init without --checkpoint "
           "needs a --config with a model section")
    model = model_config(file_cfg)
  _check(bool(a.eval) or (file_cfg is not None and "eval" in file_cfg),
         "no benchmarks: pass one or more --eval configs/eval/<benchmark>.py:DATA_ROOT "
         "(or a --config with an eval section)")
  cfg, order = compose(to_config_dict(model).to_dict(), config=file_cfg, eval_files=a.eval,
                       overrides=list(overrides) + mesh_overrides)
  config = model_config(cfg)
  ec = eval_config(cfg)
  from flamingo_jax.runtime import distributed
  # Several processes (hosts): before anything touches a device, as the trainer does.
  distributed.initialize(distributed.distributed_config(cfg.get("distributed")))
  tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] or order
  unknown = [t for t in tasks if t not in ec.tasks]
  _check(not unknown, f"unknown eval task(s) {unknown}; the eval configs define "
         f"{sorted(ec.tasks)}")
  shots = _int_list(a.shots, "shots")
  trial_seeds = _int_list(a.trial_seeds, "trial_seeds")
  for key in ("num_trials", "ensemble", "num_samples"):
    _check(getattr(a, key) >= 0, f"--{key} must be >= 0, got {getattr(a, key)}")
  for name in tasks:  # trial and shot counts are checked before any model runs
    protocol(ec, ec.tasks[name], shots=shots, num_trials=a.num_trials,
             trial_seeds=trial_seeds, ensemble=a.ensemble)
  data_tok = cfg.data.get("tokenizer", "") if "data" in cfg else ""
  if a.tokenizer or ec.tokenizer or not a.checkpoint:
    tok_path = a.tokenizer or ec.tokenizer or data_tok
    _check(bool(tok_path), "no tokenizer: pass --tokenizer or set eval.tokenizer to the "
           "model's sentencepiece model")
    tokenizer = Tokenizer.load(tok_path)
    model_dir.check_tokenizer(config, tokenizer, f"tokenizer {tok_path!r}")
  else:
    tokenizer = model_dir.load_tokenizer(a.checkpoint, config)
  placement = make_placement(cfg.mesh, config)
  if a.random_init:
    params = jax.device_put(init_params(config, a.seed), placement.param_shardings) \
        if placement.mesh is not None else init_params(config, a.seed)
    model_id = f"random_init:{a.seed}"
  else:
    params = model_dir.load_params(a.checkpoint, config, placement.mesh,
                                   cfg.mesh if placement.mesh is not None else None)
    model_id = os.path.abspath(a.checkpoint)
  metadata = dict(config=os.path.abspath(a.config) if a.config else None,
                  eval_configs=list(a.eval), overrides=list(overrides) + mesh_overrides,
                  random_init=bool(a.random_init),
                  checkpoint=None if a.random_init else os.path.abspath(a.checkpoint),
                  devices=len(jax.devices()), processes=jax.process_count())
  report = evaluate(config, ec, params, tokenizer, tasks=tasks, shots=shots,
                    num_samples=a.num_samples, use_rices=a.rices, out_dir=a.out,
                    progress=not a.no_progress, metadata=metadata, num_trials=a.num_trials,
                    trial_seeds=trial_seeds, ensemble=a.ensemble, placement=placement,
                    model_id=model_id)
  if jax.process_index() == 0:
    print(results_markdown(report))
  return report
