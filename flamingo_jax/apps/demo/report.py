"""The demo's report: report.md (results against both baselines, margins, stage times,
the seeds' mean and spread) and its plots (loss per dataset, |tanh(alpha)| per layer, metric vs
shots)."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from flamingo_jax.apps.demo.scale import STAGES


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
      "| data | train examples: " + ", ".join(
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
