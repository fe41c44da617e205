"""The evaluation run: few-shot prompts -> decoding or scoring -> metrics -> a Table 1.

For each task, trial and shot count: pick the demonstrations (random from the fixed
2048-example query set, or RICES on the cached vision features), build the prompts,
then decode (beam 3 to `<EOC>`) and score with CIDEr / VQA accuracy, or rank the
options by mean log-likelihood per token and report top-1 / ROC-AUC. Video
benchmarks feed each clip [T, H, W, 3] (evaluate/video.py) as one image slot.
Vision features of each image or clip, and the resampler's tokens of them that
generation takes, are computed once per run and cached on disk; predictions are
appended per batch, so a rerun continues. Writes results.json,
results_open_flamingo.json, results.md and predictions/. The schema is
evaluate/config.py, the inputs evaluate/inputs.py, the CLI evaluate/cli.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np

from flamingo_jax import model_dir
from flamingo_jax.config import check
from flamingo_jax.evaluate import classification, datasets, prompts, rices, video
from flamingo_jax.evaluate.cider import cider_d
from flamingo_jax.evaluate.config import (METRICS, QA_KINDS, EvalConfig, EvalTaskConfig,
                                          Protocol, protocol, template_kind)
from flamingo_jax.evaluate.decode import DecodeConfig, Generator, Placement
from flamingo_jax.evaluate.features import FeatureCache, latents_supported, params_fingerprint
from flamingo_jax.evaluate.inputs import (continuation_ids, encode_prompt, load_image,
                                          load_task_data, prompt_fields)
from flamingo_jax.evaluate.predictions import PredictionLog, file_stem
from flamingo_jax.evaluate.scoring import Scorer
from flamingo_jax.evaluate.vqa import (check_answer_postprocess, normalize_answer,
                                       postprocess_answer, vqa_accuracy)
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.training.metrics import Progress

log = logging.getLogger(__name__)


def select_queries(num: int, num_samples: int, seed: int) -> np.ndarray:
  """Indices of the evaluated examples: all, or a seeded random subset of num_samples."""
  if num_samples <= 0 or num_samples >= num:
    return np.arange(num)
  return np.sort(np.random.default_rng(seed).permutation(num)[:num_samples])


class Task:
  """One benchmark's data, prompts and scoring, for every shot count and trial."""

  def __init__(self, name: str, t: EvalTaskConfig, ec: EvalConfig, config: FlamingoConfig):
    self.name, self.t, self.ec, self.config = name, t, ec, config
    self.support, self.test, self.classes = load_task_data(t)
    check(len(self.support) > 0, f"eval task {name!r}: the support set {t.train} is empty")
    check(len(self.test) > 0, f"eval task {name!r}: the evaluated set {t.test} is empty")
    if t.kind == "vqa":
      unanswered = [ex.question_id for ex in self.test if len(ex.answers) < 2]
      check(not unanswered, f"eval task {name!r}: {len(unanswered)} evaluated questions of "
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
    check(n <= len(self.query_set), f"eval task {self.name!r}: {num_shots} shots need {n} "
          f"demonstrations but the support set has {len(self.query_set)} examples")
    if not use_rices:
      seed = getattr(self, "seed", self.ec.seed)
      return np.stack([prompts.random_shots(self.query_set, n, int(q), seed=seed)
                       for q in queries])
    pool, pool_feats, query_feats = rices_fn(self, queries)
    return pool[rices.rices_shots(pool_feats, query_feats, n)]

  def prompt(self, query: int, shot_idx: Sequence[int], num_shots: int) -> prompts.Prompt:
    return prompts.build_prompt(self.template,
                                [prompt_fields(self.support[i], self.t) for i in shot_idx],
                                prompt_fields(self.test[query], self.t), zero_shot=num_shots == 0)

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

  def __call__(self, task: Task, queries: np.ndarray):
    if task.name not in self._pools:
      pool = np.arange(len(task.support))
      if self.ec.rices_pool and self.ec.rices_pool < len(pool):
        pool = np.sort(np.random.default_rng(self.ec.seed).permutation(len(pool))
                       [:self.ec.rices_pool])
      self._pools[task.name] = (pool, self.features(task).pooled(
          [task.support[i].image_path for i in pool]))
    pool, feats = self._pools[task.name]
    return pool, feats, self.features(task).pooled([task.test[q].image_path for q in queries])


def score_predictions(task: Task, predictions: dict, option_scores: Optional[np.ndarray],
                      queries: np.ndarray, top5: Optional[np.ndarray] = None
                      ) -> tuple[float, dict]:
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
    if ec.decode_method == "beam" and proto.num_beams > 1:
      how = f"beam search ({proto.num_beams} beams, length penalty {ec.length_penalty:g})"
    else:  # one beam keeps the most likely token at each step: greedy
      how = "greedy" + (" (beam search with 1 beam)" if ec.decode_method == "beam" else "")
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

  def features_for(self, task: Optional[Task]) -> Optional[FeatureCache]:
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

  def visual(self, built: Sequence[prompts.Prompt], task: Task, latents: bool = False
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
    check(self.features is not None, "RICES needs the vision features: eval.feature_cache "
          "must not be 'off'")
    return _Rices(self.features_for, self.ec)


def _option_ids(task: Task, tokenizer) -> list[list[int]]:
  label = task.template.labels[-1] if task.template.labels else ""
  cut = task.template.text[:-len("{" + task.template.answer_field + "}")]
  sep = cut[len(cut.rstrip(" ")):]
  return [continuation_ids(tokenizer, label, sep + c) for c in task.classes]


def _run_batch(m: _Model, task: Task, batch: np.ndarray, shot_idx: np.ndarray,
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


def _score_rows(task: Task, rows: list[dict], queries: np.ndarray) -> tuple[float, dict]:
  predictions = {int(r["index"]): r["prediction"] for r in rows}
  if task.t.kind == "classification":
    width = min(len(r["top5"]) for r in rows)
    return score_predictions(task, predictions, None, queries,
                      top5=np.array([r["top5"][:width] for r in rows]))
  if task.t.kind == "hateful_memes":
    return score_predictions(task, predictions, np.array([r["scores"] for r in rows]), queries)
  return score_predictions(task, predictions, None, queries)


def _fingerprint(task: Task, ec: EvalConfig, proto: Protocol, num_shots: int, seed: int,
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
  check(config.vision.name != "none", "evaluation reads images, but model.vision.name is "
        "'none' (a model without a vision encoder)")
  model_dir.check_tokenizer(config, tokenizer)
  unknown = [t for t in tasks if t not in ec.tasks]
  check(not unknown, f"unknown eval task(s) {unknown}; the eval configs define "
        f"{sorted(ec.tasks)}")
  check(bool(tasks), "need at least one task")
  check(all(s >= 0 for s in shots), f"shot counts must be >= 0, got {list(shots)}")
  placement = placement or Placement()
  check(ec.batch_size % placement.batch_shards == 0, f"config key 'eval.batch_size' "
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
    task = Task(name, ec.tasks[name], ec, config)
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
