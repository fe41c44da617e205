"""`make demo`: the whole Flamingo recipe in miniature, on the embedded shapes world.

  python -m flamingo_jax.demo --workdir demo_workdir [--scale demo|short|smoke]
      [--force STAGE] [--seeds 0,1,2]

Stages (each skipped when its output exists, each resumable when interrupted:
the trainers restart from their last checkpoint):
  data      the synthetic dataset (flamingo_jax/data/synthetic.py) and its
            sentencepiece tokenizer, trained on the text corpus
  lm        a tiny Chinchilla-style LM pretrained on that corpus (lm_pretrain.py on
            configs/lm_pretrain_demo.py)
  vision    a tiny NFNet + text tower pretrained contrastively on the image-text
            pairs (contrastive.py, configs/contrastive_tiny.py:vision=nfnet)
  flamingo  both frozen; the resampler and gated cross-attention trained on the
            weighted mixture of documents, pairs, VQA pairs and videos
            (train.py on configs/demo.py), exported as a model directory
  eval      few-shot captioning and VQA (0/4/8 shots), classification and name
            binding (evaluate/names.py) on the held-out split, for the trained
            model, the same model with every gate at 0 (its LM alone) and chance
            (evaluate/baselines.py)
  report    report.md (results table, per-stage times) and PNG plots: loss per
            dataset, |tanh(alpha)| per layer, metric vs shots

Everything lands in one work directory; `python -m flamingo_jax.generate
--checkpoint WORKDIR/model --image x.png --prompt "<image>"` then captions
any image.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

STAGES = ("data", "lm", "vision", "flamingo", "eval", "report")
RESULT = "result.json"  # a stage's marker, written last

from flamingo_jax.config import configs_dir
from flamingo_jax.errors import UserError, run_cli
from flamingo_jax.training.metrics import Progress

log = logging.getLogger("flamingo_jax.apps.demo.stages")


@dataclasses.dataclass(frozen=True)
class Scale:
  """How much each stage does. `demo` is what `make demo` runs (docs/demo.md gives
  its measured time); `short` the same with 300 Flamingo updates; `smoke` every stage
  at toy size (the tests)."""
  pairs: tuple[int, int] = (2000, 200)
  documents: tuple[int, int] = (1600, 100)
  videos: tuple[int, int] = (300, 50)
  corpus_lines: int = 20_000
  samples_per_shard: int = 1000  # >= 2 pair shards: contrastive "ALIGN" and "LTIP"
  lm_steps: int = 120
  vision_steps: int = 120
  flamingo_steps: int = 1200
  eval_samples: int = 64  # evaluated examples per task
  shots: tuple[int, ...] = (0, 4, 8)


SCALES = {
    "demo": Scale(),
    # The demo's data, LM and vision, a quarter of its Flamingo updates (a loaded machine).
    "short": Scale(flamingo_steps=300),
    "smoke": Scale(pairs=(96, 24), documents=(48, 8), videos=(8, 4), corpus_lines=2000,
                   samples_per_shard=48, lm_steps=8, vision_steps=4, flamingo_steps=40,
                   eval_samples=8, shots=(0, 2)),
}


# ------------------------------------------------------------------------------ plumbing


def _write_json(path: str, obj) -> None:
  """Atomic: a crash never leaves a half-written marker behind."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


class Bar(Progress):
  """Progress over a trainer's steps (its on_step callback): a bar on a terminal, one
  line per tenth of the stage when the output is a file or a pipe."""

  def __call__(self, step: int, metrics: dict) -> None:
    loss = metrics.get("loss")
    self.set(step, **({"loss": f"{loss:.3f}"} if loss is not None else {}))


def demo_config(workdir: str, overrides: Sequence[str] = (), config_path: str = ""):
  """configs/demo.py (or an ablation file) for this workdir, with overrides."""
  from flamingo_jax.config import apply_overrides, load_config
  path = config_path or os.path.join(configs_dir(), "demo.py")
  return apply_overrides(load_config(f"{path}:{os.path.abspath(workdir)}"), list(overrides))


# ------------------------------------------------------------------------------ stages


def _configs_demo():
  """configs/demo.py as a module (paths, sizes shared with the config)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("_flamingo_demo_config",
                                                os.path.join(configs_dir(), "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_data(paths: dict, scale: Scale) -> dict:
  from flamingo_jax.data import synthetic
  cfg = _configs_demo()
  sizes = synthetic.Sizes(pairs=scale.pairs, documents=scale.documents, videos=scale.videos,
                          corpus_lines=scale.corpus_lines,
                          samples_per_shard=scale.samples_per_shard)
  manifest = synthetic.write_synthetic(paths["data"], image_size=cfg.IMAGE_SIZE, sizes=sizes,
                                       arrayrecord=False)
  return {"examples": manifest["examples"], "tokenizer": manifest["tokenizer"],
          "corpus_lines": manifest["corpus_lines"], "seconds": manifest["seconds"]}


def run_lm(paths: dict, scale: Scale) -> dict:
  import jax
  from flamingo_jax.trainers.lm import train as lm_pretrain
  config = lm_pretrain.load(os.path.join(configs_dir(), "lm_pretrain_demo.py") + ":"
                            + paths["root"], [f"train.total_steps={scale.lm_steps}"])
  bar = Bar("lm pretraining", scale.lm_steps)
  try:  # one device: the tiny LM's batch of 16 rows gains nothing from fake devices
    out = lm_pretrain.run(config, paths["lm"], on_step=bar, devices=jax.devices()[:1])
  finally:
    bar.close()
  if out["stopped"] != "done":
    raise RuntimeError(f"LM pretraining stopped early ({out['stopped']})")
  losses = [r["loss"] for r in out["history"]]
  return {"steps": out["step"], "first_loss": losses[0] if losses else None,
          "final_loss": losses[-1] if losses else None, "val_loss": out["val_loss"],
          "export": out["export"]}


def vision_config(data: str, kind: str, steps: int, export: str):
  """configs/contrastive_tiny.py for the demo's data: `kind` (nfnet | patch) tower,
  `steps` updates, exported to `export` (the demo's stage and the encoder swap)."""
  from flamingo_jax.trainers.contrastive import train as contrastive
  return contrastive.load(
      os.path.join(configs_dir(), "contrastive_tiny.py") + f":data={data},vision={kind}",
      [f"train.total_steps={steps}", "train.log_every=10", f"export.vision='{export}'",
       "eval.retrieval.max_examples=200", "eval.classification.max_examples=200"])


def run_vision(paths: dict, scale: Scale) -> dict:
  from flamingo_jax.trainers.contrastive import train as contrastive
  config = vision_config(paths["data"], "nfnet", scale.vision_steps, paths["vision_export"])
  bar = Bar("contrastive vision", scale.vision_steps)
  try:
    summary = contrastive.run(config, paths["vision"], on_step=bar)
  finally:
    bar.close()
  if summary.get("stopped") not in (None, "done"):
    raise RuntimeError(f"contrastive pretraining stopped early ({summary['stopped']})")
  return {"steps": summary["step"], "eval": summary.get("eval", {}),
          "final_loss": summary["history"][-1]["loss"] if summary["history"] else None,
          "export": summary.get("export") or paths["vision_export"]}


def train_devices(config) -> list:
  """The first n devices, n the largest count that divides every dataset's batch
  (the demo's batches are small; 8 fake test devices must not break it)."""
  import math
  import jax
  n = len(jax.devices())
  for d in config.data.datasets.values():
    n = math.gcd(n, int(d.batch_size))
  return jax.devices()[:n]


def seed_overrides(seed: int) -> list[str]:
  """What a demo seed changes in the Flamingo stage: its initialisation and data order
  (train.seed, data.seed); run_eval's seed picks the held-out examples and the
  demonstrations (eval.seed). The data, LM and vision stages are shared by every seed."""
  return [f"train.seed={seed}", f"data.seed={seed}"] if seed else []


def run_flamingo(paths: dict, scale: Scale, config_path: str = "",
                 overrides: Sequence[str] = (), seed: int = 0) -> dict:
  from flamingo_jax.trainers.flamingo import train
  config = demo_config(paths["root"], [
      f"train.total_steps={scale.flamingo_steps}", "train.log_every=10",
      f"train.export_dir='{paths['model']}'", *seed_overrides(seed), *overrides], config_path)
  bar = Bar("flamingo training", scale.flamingo_steps)
  t0 = time.perf_counter()
  try:
    summary = train.run(config, paths["flamingo"], on_step=bar, devices=train_devices(config))
  finally:
    bar.close()
  if summary["stopped"] != "done":
    raise RuntimeError(f"Flamingo training stopped early ({summary['stopped']})")
  times = [r["step_time"] for r in summary["history"] if "step_time" in r]
  return {"steps": summary["step"], "model": paths["model"],
          "final_losses": {k[5:]: v for k, v in summary["history"][-1].items()
                           if k.startswith("loss/")} if summary["history"] else {},
          "median_step_time_s": sorted(times)[len(times) // 2] if times else None,
          "seconds": time.perf_counter() - t0}


# Prefixes of the evaluation's progress and score lines: the baseline's never read as a
# second result of the trained model.
EVAL_LABELS = {"flamingo": "trained model: ",
               "gates_zero": "gates-zero baseline (every tanh gate 0, the LM alone): "}


def run_eval(paths: dict, scale: Scale, model_dir: str = "", out_dir: str = "",
             baselines: bool = True, names: bool = False, seed: int = 0) -> dict:
  """Evaluates the exported model (and, with baselines, gates-zero and chance); with
  names, also the name-binding task (evaluate/names.py) under the key "names"."""
  from flamingo_jax.evaluate import baselines as baselines_lib
  from flamingo_jax.evaluate import names as names_lib
  from flamingo_jax import model_dir as model_dir_lib
  from flamingo_jax.evaluate.config import METRICS, eval_config
  from flamingo_jax.evaluate.run import evaluate
  model = model_dir_lib.load(model_dir or paths["model"])
  config = demo_config(paths["root"], [f"eval.seed={seed}"] if seed else [])
  ec = eval_config(config)
  tasks = list(ec.tasks)
  out_dir = out_dir or paths["eval"]
  runs = {"flamingo": model.params}
  if baselines:
    runs["gates_zero"] = baselines_lib.zero_gates(model.params)
  results = {}
  for name, params in runs.items():
    report = evaluate(model.config, ec, params, model.tokenizer, tasks=tasks,
                      shots=list(scale.shots), num_samples=scale.eval_samples,
                      out_dir=os.path.join(out_dir, name), progress=True,
                      label=EVAL_LABELS[name])
    results[name] = {t: {s: r["score"] for s, r in report["results"][t]["shots"].items()}
                     for t in tasks}
  metrics = {t: METRICS[ec.tasks[t].kind] for t in tasks}
  out = {"results": results, "metrics": metrics, "shots": list(scale.shots),
         "num_examples": scale.eval_samples}
  if names:
    named = {name: names_lib.evaluate_names(
        model.config, ec, params, model.tokenizer, classes_task="classes",
        shots=scale.shots, num_samples=scale.eval_samples, label=EVAL_LABELS[name])
        for name, params in runs.items()}
    # The frozen LM alone on the same episodes with the pictures in words: the most the
    # Flamingo can bind through that LM (evaluate/names.py `words_prompt`).
    words = names_lib.evaluate_names(
        model.config, ec, model.params, model.tokenizer, classes_task="classes",
        shots=scale.shots, num_samples=scale.eval_samples, words=True,
        label="the frozen LM alone: ")
    out["names"] = {"metric": names_lib.METRIC, "chance": names_lib.CHANCE,
                    "results": {name: r["shots"] for name, r in named.items()},
                    "words": words["shots"]}
  if baselines:
    out["chance"] = {t: r["score"] for t, r in baselines_lib.chance(
        model.config, ec, tasks, scale.eval_samples).items()}
  return out


# ------------------------------------------------------------------------------ report


def with_names(ev: dict) -> dict:
  """The eval result with the name-binding task as a fourth task (report, plots);
  kept apart in run_eval's result so the ablations' tables keep their three tasks."""
  if "names" not in ev:
    return ev
  n = ev["names"]
  out = dict(ev, metrics={**ev["metrics"], "names": n["metric"]},
             results={m: {**r, "names": n["results"][m]} for m, r in ev["results"].items()})
  if "chance" in ev:
    out["chance"] = {**ev["chance"], "names": n["chance"]}
  return out


NAMES_TEXT = (
    "`names` is the name-binding task (`flamingo_jax/evaluate/names.py`): every prompt "
    "names the three shape kinds with fresh made-up words shown only in its shots "
    "(`<image>This is a blicket<EOC>`), the query is a held-out one-shape picture and the "
    "prompt's three names are the options (top-1 by option scoring); chance is 33.3%, "
    "and so is the best the LM alone can do.")


def results_table(ev: dict) -> str:
  """Rows task x model, columns shots (scores in percent; CIDEr x 100)."""
  ev = with_names(ev)
  shots = ev["shots"]
  lines = ["| task | metric | model | " + " | ".join(f"{s}-shot" for s in shots) + " |",
           "|---|---|---|" + "---:|" * len(shots)]
  for task, metric in ev["metrics"].items():
    for name, res in ev["results"].items():
      cells = [f"{res[task][str(s)]:.1f}" for s in shots]
      lines.append(f"| {task} | {metric} | {name} | " + " | ".join(cells) + " |")
    if "chance" in ev:
      lines.append(f"| {task} | {metric} | chance | " +
                   " | ".join(f"{ev['chance'][task]:.1f}" for _ in shots) + " |")
  return "\n".join(lines) + "\n"


def _metrics_rows(path: str) -> list[dict]:
  """metrics.jsonl rows, the last row per step (a resumed run logs some twice)."""
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        by_step[row["step"]] = row
  return [by_step[s] for s in sorted(by_step)]


def write_plots(paths: dict, ev: dict) -> list[str]:
  """loss.png, gates.png, shots.png under the workdir; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = _metrics_rows(os.path.join(paths["flamingo"], "metrics.jsonl"))
  out = []
  steps = [r["step"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))
  for key in sorted({k for r in rows for k in r if k.startswith("loss/")}):
    ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key[5:])
  ax.set(xlabel="step", ylabel="token NLL", title="Flamingo training loss per dataset")
  ax.legend()
  fig.tight_layout()
  out.append(os.path.join(paths["out"], "loss.png"))
  fig.savefig(out[-1], dpi=100)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  gate_keys = sorted({k for r in rows for k in r if k.startswith("gates/")},
                     key=lambda k: int(k.split("/")[1].rsplit("_", 1)[1]))
  for ax, gate in zip(axes, ("attn_gate", "ffw_gate")):
    for key in [k for k in gate_keys if k.endswith(gate)]:
      layer = key.split("/")[1].rsplit("_", 1)[1]
      ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=f"layer {layer}")
    ax.set(xlabel="step", title=f"|tanh({gate.replace('_gate', '')} gate)|")
    ax.legend()
  axes[0].set_ylabel("|tanh(alpha)|")
  fig.tight_layout()
  out.append(os.path.join(paths["out"], "gates.png"))
  fig.savefig(out[-1], dpi=100)
  plt.close(fig)

  out.append(shots_plot(os.path.join(paths["out"], "shots.png"), {0: ev}))
  return out


def seed_spread(views: Sequence[dict], name: str, task: str):
  """-> (mean, min, max) over the seeds' eval results (`with_names` views) of one model's
  scores on one task, each [len(shots)]."""
  shots = views[0]["shots"]
  v = np.array([[ev["results"][name][task][str(n)] for n in shots] for ev in views])
  return v.mean(0), v.min(0), v.max(0)


def shots_plot(path: str, evs: dict) -> str:
  """Metric vs shots per task, one line per model (evs: {seed: eval result}); with
  several seeds each point is their mean with a bar from the lowest seed to the highest.
  Returns path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  views = [with_names(ev) for ev in evs.values()]
  first = views[0]
  shots, tasks = first["shots"], list(first["metrics"])
  fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5))
  for ax, task in zip(axes if len(tasks) > 1 else [axes], tasks):
    for name in first["results"]:
      mean, lo, hi = seed_spread(views, name, task)
      ax.errorbar(shots, mean, yerr=[mean - lo, hi - mean] if len(views) > 1 else None,
                  marker="o", capsize=4, label=name)
    if "chance" in first:
      ax.axhline(float(np.mean([ev["chance"][task] for ev in views])), color="grey",
                 linestyle="--", label="chance")
    ax.set(xlabel="shots", ylabel=first["metrics"][task], xticks=shots,
           title=task if len(views) == 1 else f"{task}: mean [min, max] of {len(views)} seeds")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_seeds_plot(paths: dict, evs: dict) -> str:
  """shots_seeds.png: shots_plot over every seed (one seed's line says little)."""
  return shots_plot(os.path.join(paths["out"], "shots_seeds.png"), evs)


def margins(ev: dict) -> dict:
  """Per task: the trained model's best-shot score minus each baseline's best."""
  ev = with_names(ev)
  out = {}
  for task in ev["metrics"]:
    best = max(ev["results"]["flamingo"][task].values())
    row = {"flamingo": best}
    if "gates_zero" in ev["results"]:
      row["over_gates_zero"] = best - max(ev["results"]["gates_zero"][task].values())
    if "chance" in ev:
      row["over_chance"] = best - ev["chance"][task]
    out[task] = row
  return out


def seeds_table(evs: dict) -> str:
  """Mean and [min, max] over seeds of every task x shots, for the trained model and
  gates-zero (evs: {seed: eval result})."""
  views = [with_names(ev) for ev in evs.values()]
  first = views[0]
  shots = first["shots"]
  lines = [f"Mean and [min, max] over {len(views)} seeds ({', '.join(map(str, evs))}).", "",
           "| task | metric | model | " + " | ".join(f"{n}-shot" for n in shots) + " |",
           "|---|---|---|" + "---:|" * len(shots)]
  for task, metric in first["metrics"].items():
    for name in first["results"]:
      cells = [f"{m:.1f} [{lo:.1f}, {hi:.1f}]"
               for m, lo, hi in zip(*seed_spread(views, name, task))]
      lines.append(f"| {task} | {metric} | {name} | " + " | ".join(cells) + " |")
    if "chance" in first:
      v = np.array([ev["chance"][task] for ev in views])
      lines.append(f"| {task} | {metric} | chance | " +
                   " | ".join(f"{v.mean():.1f}" for _ in shots) + " |")
  return "\n".join(lines) + "\n"


def write_report(paths: dict, results: dict, seconds: dict,
                 seeds: Optional[dict] = None) -> str:
  """report.md (and the plots) under paths["out"]; seeds: {seed: (eval result,
  {stage: seconds})} of every seed run (the first is `results`'), for the spread
  table and the total time."""
  ev = results["eval"]
  plots = write_plots(paths, ev)
  lm, vision, fl = results["lm"], results["vision"], results["flamingo"]
  total = sum(seconds.get(stage, 0.0) for stage in STAGES)
  many = bool(seeds) and len(seeds) > 1
  if many:
    total = sum(seconds.get(stage, 0.0) for stage in ("data", "lm", "vision")) + sum(
        t.get(stage, 0.0) for _, t in seeds.values() for stage in ("flamingo", "eval"))
  lines = [
      "# flamingo_jax demo report", "",
      "The Flamingo recipe in miniature on the synthetic shapes world "
      "(`python -m flamingo_jax.demo`).", "",
      "## Results on the held-out split", "",
      f"{ev['num_examples']} evaluated examples per task; demonstrations drawn at random "
      "from the training split; greedy decoding. `gates_zero` is the trained model with "
      "every tanh gate set to 0 (its frozen LM alone); `chance` ignores the image. "
      + NAMES_TEXT, "",
      results_table(ev),
      "| task | best trained score | over gates-zero | over chance |",
      "|---|---:|---:|---:|"]
  for task, m in margins(ev).items():
    lines.append(f"| {task} | {m['flamingo']:.1f} | {m.get('over_gates_zero', 0):+.1f} | "
                 f"{m.get('over_chance', 0):+.1f} |")
  if "words" in ev.get("names", {}):
    w = ev["names"]["words"]
    lines += ["", "Name binding in words (the same episodes, every picture replaced by its "
              "class, `a red circle This is a blicket ...`, scored by the frozen LM alone): "
              + " / ".join(f"{w[str(s)]:.1f}" for s in ev["shots"]) + " top-1 at "
              + " / ".join(str(s) for s in ev["shots"]) + " shots. The Flamingo can bind "
              "names only through its frozen LM's self-attention, so this is about the most "
              "the pictures can give."]
  lines += [
      "", "## Stages", "",
      "| stage | result | seconds |", "|---|---|---:|",
      f"| data | train examples: " + ", ".join(
          f"{k} {v}" for k, v in sorted(results["data"]["examples"]["train"].items()))
      + f"; tokenizer {results['data']['tokenizer']['vocab_size']} ids | "
      f"{seconds.get('data', 0):.0f} |",
      f"| lm | {lm['steps']} steps, loss {lm['first_loss']:.2f} -> {lm['final_loss']:.2f}, "
      f"held-out {lm['val_loss']:.2f} | {seconds.get('lm', 0):.0f} |",
      f"| vision | {vision['steps']} steps; held-out retrieval R@1 image->text "
      f"{vision['eval'].get('retrieval/image_to_text/R1', float('nan')):.2f}, text->image "
      f"{vision['eval'].get('retrieval/text_to_image/R1', float('nan')):.2f}; zero-shot "
      f"classification top-1 {vision['eval'].get('zero_shot/top1', float('nan')):.2f} | "
      f"{seconds.get('vision', 0):.0f} |",
      f"| flamingo | {fl['steps']} steps, final losses "
      + ", ".join(f"{k} {v:.2f}" for k, v in sorted(fl["final_losses"].items()))
      + f" | {seconds.get('flamingo', 0):.0f} |",
      f"| eval | {len(with_names(ev)['metrics'])} tasks x {len(ev['shots'])} shot counts x "
      f"2 models | {seconds.get('eval', 0):.0f} |"]
  if many:
    lines.append(f"| other seeds | Flamingo stage + eval of seeds "
                 f"{', '.join(str(k) for k in list(seeds)[1:])} | "
                 f"{total - sum(seconds.get(stage, 0.0) for stage in STAGES):.0f} |")
  lines += [
      f"| total | wall time of the stages above, end to end | {total:.0f} |", "",
      f"Total wall time: {total / 60:.1f} min ({total:.0f} s; a resumed run adds up the "
      "stages each run did).", ""]
  if many:
    lines += ["## Seeds", "",
              "Each seed reruns the Flamingo stage (its initialisation and data order: "
              "train.seed, data.seed) and the evaluation (its held-out examples and "
              "demonstrations: eval.seed) on the shared data, LM and vision stages; the "
              f"tables above are seed {next(iter(seeds))}'s.", "",
              seeds_table({k: e for k, (e, _) in seeds.items()})]
    plots.append(write_seeds_plot(paths, {k: e for k, (e, _) in seeds.items()}))
  lines += ["## Plots", ""]
  lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
  lines += ["", "Model directory: `model/` (`python -m flamingo_jax.generate --checkpoint "
            f"{paths['model']} --image IMAGE.png --prompt '<image>'`)."]
  path = os.path.join(paths["out"], "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


# ------------------------------------------------------------------------------ main


SEEDED = ("flamingo", "eval", "model")  # the per-seed directories


def demo_paths(workdir: str, seed: int = 0) -> dict:
  """configs/demo.py's paths; seed s > 0 keeps its Flamingo stage, model, evaluation and
  report under WORKDIR/seed_s/ (seed 0's are the plain `make demo` ones)."""
  paths = _configs_demo().paths(workdir)
  paths["out"] = paths["root"]
  if seed:
    paths["out"] = os.path.join(paths["root"], f"seed_{seed}")
    paths.update({k: os.path.join(paths["out"], k) for k in SEEDED})
  return paths


def run(workdir: str, scale: Scale, force: Sequence[str] = (),
        stages: Sequence[str] = STAGES, seed: int = 0, seeds: Optional[dict] = None) -> dict:
  """Runs the stages in order, skipping those whose result.json exists; `seed` is the
  Flamingo stage's and the evaluation's (`seed_overrides`), `seeds` what `write_report`
  takes."""
  paths = demo_paths(workdir, seed)
  os.makedirs(paths["out"], exist_ok=True)
  runners: dict[str, Callable[[], dict]] = {
      "data": lambda: run_data(paths, scale), "lm": lambda: run_lm(paths, scale),
      "vision": lambda: run_vision(paths, scale),
      "flamingo": lambda: run_flamingo(paths, scale, seed=seed),
      "eval": lambda: run_eval(paths, scale, names=True, seed=seed)}
  results, seconds = {}, {}
  scale_file = os.path.join(paths["root"], "scale.json")
  want = json.loads(json.dumps(dataclasses.asdict(scale)))
  if os.path.exists(scale_file) and _read_json(scale_file) != want and not force:
    raise ValueError(f"{workdir} was made with another scale ({_read_json(scale_file)}); use "
                     "a new --workdir or --force data")
  _write_json(scale_file, dataclasses.asdict(scale))
  forced = False
  for stage in STAGES:
    if stage not in stages:  # still read its result: the report needs every stage's
      marker = os.path.join(paths.get(stage, ""), RESULT)
      if stage != "report" and os.path.exists(marker):
        results[stage] = _read_json(marker)
        seconds[stage] = results[stage].get("_seconds", 0.0)
      continue
    if stage == "report":
      missing = [s for s in STAGES[:-1] if s not in results]
      if missing:
        raise ValueError(f"the report needs the results of stages {missing}: run them first")
      path = write_report(paths, results, seconds, seeds)
      results["report"] = {"path": path}
      continue
    marker = os.path.join(paths[stage], RESULT)
    forced = forced or stage in force  # a forced stage invalidates the later ones
    if os.path.exists(marker) and not forced:
      log.info("stage %s: done (%s), skipped", stage, marker)
      results[stage] = _read_json(marker)
      seconds[stage] = results[stage].get("_seconds", 0.0)
      continue
    if forced:  # start the stage afresh: its checkpoints belong to the old run
      for d in (paths[stage], paths["model"] if stage == "flamingo" else None):
        if d and os.path.exists(d):
          shutil.rmtree(d)
    log.info("stage %s ...", stage)
    t0 = time.perf_counter()
    os.makedirs(paths[stage], exist_ok=True)
    results[stage] = runners[stage]()
    seconds[stage] = results[stage]["_seconds"] = time.perf_counter() - t0
    _write_json(marker, results[stage])
    log.info("stage %s: done in %.0f s", stage, seconds[stage])
  return results


def run_seeds(workdir: str, scale: Scale, seeds: Sequence[int], force: Sequence[str] = ()
              ) -> dict:
  """The demo once per seed, the data, LM and vision stages shared (made by the first
  seed's run); the first seed's report.md gets the mean and spread over all of them.
  Returns {seed: that seed's results}."""
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise UserError(f"--seeds must be distinct integers >= 0, got {list(seeds)}")
  redo = any(s in force for s in ("data", "lm", "vision", "flamingo"))
  later = ["flamingo"] if redo else [s for s in force if s in ("eval", "report")]
  out: dict = {}
  for i, seed in enumerate(seeds):
    log.info("seed %d (%d of %d)", seed, i + 1, len(seeds))
    out[seed] = run(workdir, scale, force if i == 0 else later,
                    stages=[s for s in STAGES if s != "report"], seed=seed)
  runs = {seed: (r["eval"], {k: r[k].get("_seconds", 0.0) for k in ("flamingo", "eval")})
          for seed, r in out.items()}
  first = seeds[0]
  out[first] = run(workdir, scale, stages=("report",), seed=first, seeds=runs)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m flamingo_jax.demo",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="demo_workdir")
  p.add_argument("--scale", default="demo", choices=sorted(SCALES),
                 help="demo: make demo; short: 300 Flamingo updates; smoke: toy sizes")
  p.add_argument("--force", default="", help="comma-separated stages to redo (and all "
                 f"later ones); stages: {','.join(STAGES)}")
  p.add_argument("--stages", default=",".join(STAGES), help="run only these stages")
  p.add_argument("--seeds", default="", help="comma-separated seeds, e.g. 0,1,2: the "
                 "Flamingo stage and the evaluation once per seed (seed s > 0 under "
                 "WORKDIR/seed_s), the data, LM and vision stages shared; report.md gets "
                 "the mean and [min, max] over the seeds")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                      stream=sys.stderr)
  for name in ("flamingo_jax.trainers.flamingo.train", "flamingo_jax.trainers.contrastive.train", "flamingo_jax.trainers.lm.train",
               "absl", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  force = [s for s in a.force.split(",") if s]
  stages = [s for s in a.stages.split(",") if s]
  bad = [s for s in force + stages if s not in STAGES]
  if bad:
    raise UserError(f"unknown stage(s) {bad}; stages are {list(STAGES)}")
  # Compiled steps persist under the workdir: every seed, rerun and --force reuses them
  # (compiling is a large part of a stage's time on 2 CPU cores).
  import jax
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.abspath(a.workdir), "jax_cache"))
  t0 = time.perf_counter()
  if a.seeds:
    try:
      seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
      raise UserError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if a.stages != ",".join(STAGES):
      raise UserError("--seeds runs every stage; leave out --stages")
    runs = run_seeds(a.workdir, SCALES[a.scale], seeds, force)
    results = runs[seeds[0]]
    if len(seeds) > 1:
      print(seeds_table({s: r["eval"] for s, r in runs.items()}))
  else:
    results = run(a.workdir, SCALES[a.scale], force, stages)
  if "eval" in results:
    print(results_table(results["eval"]))
    for task, m in margins(results["eval"]).items():
      print(f"{task}: trained {m['flamingo']:.1f}, {m.get('over_gates_zero', 0):+.1f} over "
            f"gates-zero, {m.get('over_chance', 0):+.1f} over chance")
  if "report" in results:
    print(f"report: {results['report']['path']}")
  print(f"total {time.perf_counter() - t0:.0f} s")
  return 0


def cli_main() -> int:
  """`python -m flamingo_jax.demo`: exit status 0, or 2 with one `error:` line for bad input."""
  return run_cli(main)


if __name__ == "__main__":
  sys.exit(cli_main())
