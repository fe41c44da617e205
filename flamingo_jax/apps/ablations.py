"""`make ablations`: every paper ablation (Tables 3 and 10) this codebase can
express, each a small override of configs/demo.py, trained and evaluated at demo
scale, in one table laid out like paper Table 3.

  python -m flamingo_jax.ablations --workdir demo_workdir [--only a,b] [--scale demo|smoke]

Each configs/ablations/NAME.py has TABLE ("3" or "10"), GROUP (Table 3's
"Ablated setting" column), CHANGE ("control -> ablated"), PAPER_OVERALL (the
paper's overall score for that row over its control's, e.g. 67.3 / 70.7) and
get_config(workdir). The table sets each row's overall beside the paper's and
counts the rows that move the same way as the paper's (agreement by code, not by
hand: the paper's every ablation scores below its control, except where the demo's
control departs from the paper's, as p_next 0 does: those rows compare with the
paper's row that matches the demo's control).
The demo's data, pretrained LM and vision tower (its stages data, lm, vision)
are shared; each ablation trains its own Flamingo into
WORKDIR/ablations/NAME/ and is evaluated on the held-out split with the
demo's few-shot tasks. The control row is the demo's own model (its flamingo
stage). Results: WORKDIR/ablations/results.json and ablations.md; each run
resumes like the demo (finished ablations are skipped).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

import ml_collections

from flamingo_jax.apps.demo import stages as demo
from flamingo_jax.config import configs_dir
from flamingo_jax.errors import UserError, run_cli

ABLATION_DIR = os.path.join(configs_dir(), "ablations")
REQUIRED = ("TABLE", "GROUP", "CHANGE", "PAPER_OVERALL", "get_config")
# Paper Table 3's Flamingo-3B control: the "Overall" score every ablation row there (and in
# Table 10) is compared with; a config's PAPER_OVERALL is its row's score / PAPER_BASELINE.
PAPER_BASELINE = 70.7

log = logging.getLogger("flamingo_jax.apps.ablations")


def demo_base(workdir: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """configs/demo.py for `workdir`, with `--config`-style overrides applied."""
  return demo.demo_config(workdir, overrides)


def remove_datasets(config: ml_collections.ConfigDict, *names: str) -> ml_collections.ConfigDict:
  """The config without these training datasets (Table 3 "w/o ..." rows)."""
  for name in names:
    if name not in config.data.datasets:
      raise ValueError(f"remove_datasets: no dataset {name!r} in data.datasets "
                       f"({sorted(config.data.datasets)})")
    with config.data.datasets.unlocked():
      del config.data.datasets[name]
  if not config.data.datasets:
    raise ValueError("remove_datasets: no training dataset left")
  return config


def load_ablation(path: str):
  """An ablation module, checked for TABLE, GROUP, CHANGE and get_config."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"_ablation_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  missing = [k for k in REQUIRED if not hasattr(module, k)]
  if missing:
    raise ValueError(f"ablation {path}: missing {missing} (each needs {list(REQUIRED)})")
  if str(module.TABLE) not in ("3", "10"):
    raise ValueError(f"ablation {path}: TABLE must be '3' or '10', got {module.TABLE!r}")
  paper = module.PAPER_OVERALL
  if isinstance(paper, bool) or not isinstance(paper, (int, float)) or not 0 < paper < 2:
    raise ValueError(f"ablation {path}: PAPER_OVERALL must be the paper's score ratio "
                     f"(a number in (0, 2), e.g. 67.3 / {PAPER_BASELINE}), got {paper!r}")
  return module


def ablation_paths() -> list[str]:
  return sorted(p for p in glob.glob(os.path.join(ABLATION_DIR, "*.py"))
                if not os.path.basename(p).startswith("_"))


def pretrain_extra_vision(workdir: str, config: ml_collections.ConfigDict, scale) -> None:
  """Pretrains a vision tower an ablation loads but the demo did not train
  (the encoder swap), contrastively on the same pairs, into model_init.vision."""
  from flamingo_jax.trainers.contrastive import train as contrastive
  from flamingo_jax.runtime.params_io import params_exist
  from flamingo_jax.apps.demo.stages import vision_config
  target = config.model_init.get("vision", "")
  if not target or params_exist(target) or "ablation_vision" not in config:
    return
  kind = config.ablation_vision
  root = os.path.dirname(os.path.dirname(target))  # .../NAME/export/vision -> .../NAME
  data = os.path.join(os.path.abspath(workdir), "data")
  cfg = vision_config(data, kind, scale.vision_steps, target)
  log.info("pretraining the %s vision tower for the encoder swap into %s", kind, root)
  contrastive.run(cfg, root)


def eval_fields(ev: dict) -> dict:
  """A row's scores, metric names and shot counts from a demo evaluation's result."""
  return {"scores": ev["results"]["flamingo"], "metrics": ev["metrics"], "shots": ev["shots"]}


def run_one(workdir: str, path: str, scale) -> dict:
  """Trains and evaluates one ablation (skipped when its result.json exists)."""
  from flamingo_jax.trainers.flamingo import train
  name = os.path.splitext(os.path.basename(path))[0]
  out = os.path.join(os.path.abspath(workdir), "ablations", name)
  marker = os.path.join(out, "result.json")
  module = load_ablation(path)
  if os.path.exists(marker):  # the paper's number is metadata: always the config's current one
    with open(marker) as f:
      return dict(json.load(f), paper_overall=float(module.PAPER_OVERALL))
  config = module.get_config(workdir)
  pretrain_extra_vision(workdir, config, scale)
  if "ablation_vision" in config:
    with config.unlocked():
      del config["ablation_vision"]
  from flamingo_jax.config import apply_overrides
  config = apply_overrides(config, [f"train.total_steps={scale.flamingo_steps}",
                                    "train.log_every=10",
                                    f"train.export_dir='{os.path.join(out, 'model')}'"])
  config = train.with_default_sections(config)  # config.json shows every value the run used
  os.makedirs(out, exist_ok=True)
  bar = demo.Bar(f"ablation {name}", scale.flamingo_steps)
  t0 = time.perf_counter()
  try:
    summary = train.run(config, os.path.join(out, "flamingo"), on_step=bar,
                        devices=demo.train_devices(config))
  finally:
    bar.close()
  if summary["stopped"] != "done":
    raise RuntimeError(f"ablation {name}: training stopped early ({summary['stopped']})")
  train_seconds = time.perf_counter() - t0
  times = sorted(r["step_time"] for r in summary["history"] if "step_time" in r)
  paths = demo._configs_demo().paths(workdir)
  ev = demo.run_eval(paths, scale, model_dir=os.path.join(out, "model"),
                     out_dir=os.path.join(out, "eval"), baselines=False)
  result = {"name": name, "table": str(module.TABLE), "group": module.GROUP,
            "change": module.CHANGE, "paper_overall": float(module.PAPER_OVERALL),
            **eval_fields(ev),
            "step_time_s": times[len(times) // 2] if times else None,
            "train_seconds": train_seconds}
  demo.write_json(marker, result)
  return result


def control_row(workdir: str, scale) -> dict:
  """The demo's own model (runs the demo's stages up to eval when missing)."""
  results = demo.run(workdir, scale, stages=("data", "lm", "vision", "flamingo", "eval"))
  fl = results["flamingo"]
  return {"name": "demo", "table": "3", "group": "Flamingo (control)", "change": "-",
          **eval_fields(results["eval"]), "step_time_s": fl.get("median_step_time_s"),
          "train_seconds": fl.get("seconds")}


def headline(row: dict) -> dict[str, float]:
  """Per task, the mean score over the shot counts (0/4/8 at demo scale): steadier
  than one shot count on 64 examples."""
  return {task: sum(scores[str(s)] for s in row["shots"]) / len(row["shots"])
          for task, scores in row["scores"].items()}


def overall(row: dict, control: dict) -> float:
  """Paper Table 3's "Overall" at demo scale: the mean over tasks of the row's
  headline score / the control's (tasks where the control scores 0 are left out)."""
  scores, base = headline(row), headline(control)
  ratios = [scores[t] / base[t] for t in base if base[t] > 0]
  return sum(ratios) / len(ratios) if ratios else float("nan")


def direction(ratio: Optional[float]) -> str:
  """"lower" / "higher" / "same" than the control, for a ratio to it ("-" when unknown)."""
  if ratio is None or ratio != ratio:  # None or nan
    return "-"
  return "lower" if ratio < 1 else "higher" if ratio > 1 else "same"


def agrees(demo_overall: float, paper_overall: Optional[float]) -> Optional[bool]:
  """Whether the demo's row moves the same way from its control as the paper's
  (both below 1, or both above); None when the paper's row is missing or level."""
  paper, ours = direction(paper_overall), direction(demo_overall)
  if paper in ("-", "same") or ours == "-":
    return None
  return ours == paper


def with_agreement(rows: Sequence[dict]) -> list[dict]:
  """The rows (control first) with "overall" (x control) and "agrees" (with the
  paper's direction) added; the control's "agrees" is None."""
  out = []
  for i, row in enumerate(rows):
    ratio = overall(row, rows[0])
    out.append(dict(row, overall=ratio,
                    agrees=agrees(ratio, row.get("paper_overall")) if i else None))
  return out


def agreement_line(rows: Sequence[dict]) -> str:
  """"N of M ablations ... agree", counted by agrees() over the non-control rows."""
  ablated = with_agreement(rows)[1:]
  known = [r for r in ablated if r["agrees"] is not None]
  lower = sum(direction(r["paper_overall"]) == "lower" for r in known)
  return (f"{sum(r['agrees'] for r in known)} of {len(known)} ablations move the same way "
          f"from the control as in the paper (there {lower} of {len(known)} score below it)"
          + (f"; {len(ablated) - len(known)} without a paper direction"
             if len(known) < len(ablated) else "") + ".")


def seed_controls(workdir: str) -> list[dict]:
  """The control's other seeds (`python -m flamingo_jax.demo --seeds 0,1,2` writes
  WORKDIR/seed_S/eval/result.json), as rows like the control's, by seed."""
  found = []
  for path in glob.glob(os.path.join(os.path.abspath(workdir), "seed_*", "eval",
                                     "result.json")):
    seed = os.path.basename(os.path.dirname(os.path.dirname(path)))[len("seed_"):]
    if seed.isdigit():
      with open(path) as f:
        ev = json.load(f)
      found.append((int(seed), {"name": f"seed {seed}", **eval_fields(ev)}))
  return [r for _, r in sorted(found, key=lambda x: x[0])]


def seed_band(control: dict, seeds: Sequence[dict]) -> Optional[float]:
  """How far the control's own other seeds land from it: max |overall - 1| (None
  without seeds). One run of an ablation inside this band does not resolve it."""
  return max(abs(overall(s, control) - 1.0) for s in seeds) if seeds else None


def beyond_band(agreed: Sequence[dict], band: Optional[float]) -> list[Optional[bool]]:
  """Per row of with_agreement(): whether its overall lies outside the seed band
  (None for the control, and for every row without a band)."""
  return [None if band is None or not i else abs(r["overall"] - 1.0) > band
          for i, r in enumerate(agreed)]


def band_line(rows: Sequence[dict], seeds: Sequence[dict]) -> str:
  """The seed-spread sentence under the table: the band and the rows beyond it."""
  band = seed_band(rows[0], seeds)
  if band is None:
    return ("The control has one seed here: `python -m flamingo_jax.demo --workdir DIR "
            "--seeds 0,1,2` measures how far a seed moves it (the band a row must leave).")
  ratios = ", ".join(f"{s['name']} {overall(s, rows[0]):.2f}x" for s in seeds)
  agreed = with_agreement(rows)
  beyond = [r for r, out in zip(agreed, beyond_band(agreed, band)) if out]
  agree = sum(bool(r["agrees"]) for r in beyond)
  return (f"The control's other seeds score {ratios} of it, so one run does not resolve a "
          f"row within {band:.2f} of 1.00; {len(beyond)} of {len(rows) - 1} rows lie beyond "
          f"that band, {agree} of them in the paper's direction.")


def table_markdown(rows: Sequence[dict]) -> str:
  """Table 3's layout: ablated setting, control -> ablated, step time, scores
  (mean over shot counts), overall = mean over tasks of score / control score,
  then the paper's direction, whether ours agrees, and the paper's overall ratio."""
  control = headline(rows[0])
  tasks = list(control)
  shots = "/".join(str(s) for s in rows[0]["shots"])
  head = ("| Table | Ablated setting | Flamingo (control) -> ablated | Step time (s) | " +
          " | ".join(f"{t} {rows[0]['metrics'][t]} ({shots}-shot mean)" for t in tasks) +
          " | Overall (x control) | Paper direction | Agrees | Paper overall (x its control) |")
  lines = [head, "|---|---|---|---:|" + "---:|" * len(tasks) + "---:|---|---|---:|"]
  for i, row in enumerate(with_agreement(rows)):
    scores = headline(row)
    step = f"{row['step_time_s']:.3f}" if row.get("step_time_s") else "-"
    paper = 1.0 if i == 0 else row.get("paper_overall")
    verdict = {True: "yes", False: "**no**", None: "-"}[row["agrees"]]
    lines.append(f"| {row['table'] if i else ''} | {row['group']} | "
                 f"{row['change']} | {step} | " +
                 " | ".join(f"{scores[t]:.1f}" for t in tasks) + f" | {row['overall']:.2f} | "
                 f"{direction(paper) if i else '-'} | {verdict} | "
                 f"{'-' if paper is None else f'{paper:.3f}'} |")
  return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m flamingo_jax.ablations",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="demo_workdir")
  p.add_argument("--scale", default="demo", choices=sorted(demo.SCALES))
  p.add_argument("--only", default="", help="comma-separated ablation names "
                 "(configs/ablations/NAME.py); default: all")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                      stream=sys.stderr)
  for name in ("flamingo_jax.trainers.flamingo.train", "flamingo_jax.trainers.contrastive.train", "flamingo_jax.trainers.lm.train",
               "flamingo_jax.evaluate.run", "absl", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  scale = demo.SCALES[a.scale]
  available = {os.path.splitext(os.path.basename(p))[0]: p for p in ablation_paths()}
  names = [n for n in a.only.split(",") if n] or list(available)
  unknown = [n for n in names if n not in available]
  if unknown:
    raise UserError(f"unknown ablation(s) {unknown}; available: {sorted(available)}")
  rows = [control_row(a.workdir, scale)]
  for i, name in enumerate(names):
    # Rewritten before every row: a run stopped hours in still leaves the finished rows'
    # table, and what was left to run.
    write_table(a.workdir, a.scale, rows, pending=names[i:])
    log.info("ablation %s ...", name)
    rows.append(run_one(a.workdir, available[name], scale))
    log.info("ablation %s: %s", name, headline(rows[-1]))
  table, count = write_table(a.workdir, a.scale, rows)
  print(table)
  print(count)
  return 0


def write_table(workdir: str, scale_name: str, rows: Sequence[dict],
                pending: Sequence[str] = ()) -> tuple[str, str]:
  """WORKDIR/ablations/results.json and ablations.md for the rows so far (control
  first); `pending` names the ablations still to run. -> (table, agreement line)."""
  seeds = seed_controls(workdir)
  agreed = with_agreement(rows)
  table, count = table_markdown(rows), agreement_line(rows)
  count += "\n" + band_line(rows, seeds)
  out = os.path.join(os.path.abspath(workdir), "ablations")
  os.makedirs(out, exist_ok=True)
  demo.write_json(os.path.join(out, "results.json"), [
      dict(r, beyond_seed_spread=b)
      for r, b in zip(agreed, beyond_band(agreed, seed_band(rows[0], seeds)))])
  todo = (f"Not run yet ({len(pending)}): {', '.join(pending)}.\n" if pending else "")
  with open(os.path.join(out, "ablations.md"), "w") as f:
    f.write(f"# Ablations at demo scale ({scale_name})\n\n{table}\n{count}\n{todo}")
  return table, count


def cli_main() -> int:
  """`python -m flamingo_jax.ablations`: exit status 0, or 2 with one `error:` line for bad input."""
  return run_cli(main)


if __name__ == "__main__":
  sys.exit(cli_main())
