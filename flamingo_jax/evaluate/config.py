"""The `eval` section: each benchmark's files and protocol, validated, and its composition
from a config file, eval files (`configs/eval/*.py`) and `--config.a.b=value` overrides.

A task names its benchmark's files under a data root and how it is prompted and
scored; the section holds the protocol every task shares (shots, trials, beam,
batch, caches). docs/evaluation.md lists every key.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import ml_collections

from flamingo_jax.config import apply_overrides, check, choice, from_config_dict, load_config
from flamingo_jax.data.config import IMAGENET_MEAN, IMAGENET_STD
from flamingo_jax.errors import ConfigError
from flamingo_jax.evaluate import datasets, prompts
from flamingo_jax.evaluate.decode import DEFAULT_BUCKETS
from flamingo_jax.evaluate.vqa import ANSWER_POSTPROCESS, GT_NORMALISATIONS
from flamingo_jax.runtime.distributed import DistributedConfig

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
# Path-valued task keys, resolved against the task's data_root when relative.
PATH_KEYS = ("train", "train_annotations", "test", "test_annotations", "image_root",
             "train_image_root", "test_image_root", "class_names", "video_mapping")


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


def _rooted(root: str, path: str) -> str:
  return os.path.join(root, path) if root and path and not os.path.isabs(path) else path


def validate_task(t: EvalTaskConfig, prefix: str) -> EvalTaskConfig:
  """Fills the kind's defaults, resolves paths under data_root and checks every
  field; returns the completed config."""
  choice(t.kind, KINDS, f"{prefix}.kind")
  fmt = t.format or FORMATS[t.kind][0]
  check(fmt in FORMATS[t.kind], f"config key '{prefix}.format' is {t.format!r}; for kind "
        f"{t.kind!r} expected one of {list(FORMATS[t.kind])}")
  t = dataclasses.replace(t, **{k: _rooted(t.data_root, getattr(t, k)) for k in PATH_KEYS})
  check(bool(t.train), f"config key '{prefix}.train' is empty: the support set file "
        "(demonstrations) is needed")
  test = t.test or (t.train if fmt == "karpathy" else "")
  check(bool(test), f"config key '{prefix}.test' is empty: the evaluated examples' file is "
        "needed")
  if t.kind == "vqa" and fmt == "vqa":
    check(bool(t.train_annotations), f"config key '{prefix}.train_annotations' is empty: "
          "demonstrations need answers")
    check(bool(t.test_annotations), f"config key '{prefix}.test_annotations' is empty: "
          "VQA accuracy needs the human answers")
  if t.kind == "classification":
    check(bool(t.class_names) or fmt == "folder", f"config key '{prefix}.class_names' is "
          "empty: a .txt or JSON list of class names in label order is needed")
  for key in ("max_new_tokens", "num_trials", "num_beams", "ensemble"):
    check(getattr(t, key) >= 0, f"config key '{prefix}.{key}' must be >= 0, got "
          f"{getattr(t, key)}")
  check(all(isinstance(s, int) and s >= 0 for s in t.shots), f"config key '{prefix}.shots' "
        f"must be shot counts >= 0, got {list(t.shots)}")
  choice(t.prompt_style, prompts.STYLES, f"{prefix}.prompt_style")
  if fmt in VIDEO_FORMATS:
    check(t.num_frames >= 1, f"config key '{prefix}.num_frames' must be >= 1 for the video "
          f"format {fmt!r}, got {t.num_frames}")
    check(t.fps > 0 and t.frames_fps >= 0, f"config keys '{prefix}.fps' / "
          f"'{prefix}.frames_fps' must be > 0 / >= 0, got {t.fps} / {t.frames_fps}")
  else:
    check(t.num_frames == 0, f"config key '{prefix}.num_frames' is for the video formats "
          f"{list(VIDEO_FORMATS)}; format {fmt!r} reads still images")
  if fmt == "msvd_qa":
    check(bool(t.video_mapping), f"config key '{prefix}.video_mapping' is empty: MSVD-QA's "
          "youtube_mapping.txt names each video_id's clip")
  if t.template:
    try:
      prompts.custom_template(template_kind(t.kind), t.template)
    except ValueError as e:
      raise ConfigError(f"config key '{prefix}.template': {e}") from None
  check(t.vqa_demo_answer in ("most_common", "first"), f"config key "
        f"'{prefix}.vqa_demo_answer' must be 'most_common' or 'first', got "
        f"{t.vqa_demo_answer!r}")
  choice(t.answer_postprocess, ANSWER_POSTPROCESS, f"{prefix}.answer_postprocess")
  choice(t.gt_normalisation, GT_NORMALISATIONS, f"{prefix}.gt_normalisation")
  if fmt == "karpathy":
    for key in ("train_splits", "test_splits"):
      bad = [s for s in getattr(t, key) if s not in datasets.KARPATHY_SPLITS]
      check(not bad and bool(getattr(t, key)), f"config key '{prefix}.{key}' has "
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
    check(getattr(c, key) >= 1, f"config key 'eval.{key}' must be >= 1, got "
          f"{getattr(c, key)}")
  check(c.rices_pool >= 0, f"config key 'eval.rices_pool' must be >= 0, got {c.rices_pool}")
  check(c.decode_method in ("beam", "greedy"), f"config key 'eval.decode_method' is "
        f"{c.decode_method!r}; expected 'beam' or 'greedy'")
  check(bool(c.prompt_buckets) and min(c.prompt_buckets) >= 1,
        f"config key 'eval.prompt_buckets' must be positive lengths, got {c.prompt_buckets}")
  check(all(isinstance(s, int) and s >= 0 for s in c.shots) and bool(c.shots),
        f"config key 'eval.shots' must be shot counts >= 0, got {list(c.shots)}")
  for key in ("image_mean", "image_std"):
    check(len(getattr(c, key)) == 3, f"config key 'eval.{key}' needs 3 values (RGB), got "
          f"{getattr(c, key)}")
  check(all(s > 0 for s in c.image_std), f"config key 'eval.image_std' must be positive, "
        f"got {c.image_std}")


def eval_config(cfg: Any) -> EvalConfig:
  """The validated `eval` section of a whole config (one with an `eval` or `model`
  section), or of the section itself (a mapping or an EvalConfig)."""
  if not isinstance(cfg, EvalConfig):
    if hasattr(cfg, "items") and ("eval" in cfg or "model" in cfg):
      check("eval" in cfg, "the config has no 'eval' section: pass one or more "
            "--eval configs/eval/<benchmark>.py:DATA_ROOT (see docs/evaluation.md)")
      cfg = cfg["eval"]
    cfg = from_config_dict(EvalConfig, cfg, "eval")
  c = dataclasses.replace(cfg, tasks={
      n: validate_task(t, f"eval.tasks.{n}") for n, t in cfg.tasks.items()})
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
  check(not seeds or len(seeds) >= n, f"{n} trials but only {len(seeds)} trial seeds "
        f"({list(seeds)}); give one per trial")
  seeds = seeds[:n] if seeds else tuple(ec.seed + i for i in range(n))
  return Protocol(shots=tuple(shots) or t.shots or ec.shots, seeds=seeds,
                  num_beams=t.num_beams or ec.num_beams,
                  ensemble=ensemble or t.ensemble or ec.ensemble)


def task_section(task: Any) -> ml_collections.ConfigDict:
  """A task's ConfigDict with every EvalTaskConfig key a config file leaves out at its
  schema default, so `--config.eval.tasks.NAME.KEY=VALUE` sets any documented key
  (unknown keys stay and are refused, naming them, when the section is validated)."""
  given = task.to_dict() if hasattr(task, "to_dict") else dict(task)
  defaults = {f.name: f.default for f in dataclasses.fields(EvalTaskConfig)}
  return ml_collections.ConfigDict(dict(defaults, **given))


def compose(*, config: Optional[ml_collections.ConfigDict] = None,
            eval_files: Sequence[str] = (), overrides: Sequence[str] = ()
            ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """One config from an optional config file's `eval` / `mesh` / `data` sections (its
  `model` section is the model's, not read here) and any number of eval files (each a
  `{"tasks": {...}}`), then the `--config.a.b=value` overrides. Task names must not
  repeat. Returns the config and the task names in the order given."""
  defaults = {f.name: getattr(EvalConfig, f.name) for f in dataclasses.fields(EvalConfig)
              if f.name != "tasks"}
  eval_section = ml_collections.ConfigDict(dict(defaults, tasks={}))
  out = ml_collections.ConfigDict()
  if config is not None:
    for key in config:
      if key != "model":
        out[key] = config[key]
    if "eval" in config:
      given = config.eval.to_dict()
      unknown = sorted(set(given) - set(defaults) - {"tasks"})
      check(not unknown, f"unknown config key 'eval.{unknown[0] if unknown else ''}'; valid "
            f"keys: {', '.join(sorted(defaults))}, tasks")
      eval_section.update(given)
      eval_section.tasks = {n: task_section(t) for n, t in given.get("tasks", {}).items()}
  order = list(eval_section.tasks)
  for spec in eval_files:
    part = load_config(spec)
    unknown = sorted(set(part) - {"tasks"})
    check(not unknown, f"eval config {spec!r} has keys {unknown}: an eval file holds only "
          "'tasks' (set eval-wide keys with --config.eval.KEY=VALUE)")
    for name, task in part.tasks.items():
      check(name not in eval_section.tasks, f"eval task {name!r} of {spec!r} is already "
            "defined by another eval config")
      eval_section.tasks[name] = task_section(task)
      order.append(name)
  out.eval = eval_section
  if "mesh" not in out:
    out.mesh = ml_collections.ConfigDict()
  if "distributed" not in out:  # as in training: --config.distributed.KEY=VALUE
    out.distributed = ml_collections.ConfigDict(dataclasses.asdict(DistributedConfig()))
  return apply_overrides(out, overrides, open_keys=("mesh",)), order
