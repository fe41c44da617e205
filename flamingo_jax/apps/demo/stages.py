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
import shlex
import shutil
import signal
import sys
import time
from typing import Callable, Optional, Sequence


from flamingo_jax.apps.demo import report
from flamingo_jax.apps.demo.scale import RESULT, SCALES, STAGES, Scale
from flamingo_jax.config import configs_dir
from flamingo_jax.errors import Interrupted, UserError, run_cli
from flamingo_jax.training.metrics import Progress

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ plumbing


def write_json(path: str, obj) -> None:
  """Atomic: a crash never leaves a half-written marker behind."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_json(path: str):
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


def check_finished(what: str, summary: dict) -> None:
  """A stage's trainer that stopped before its last step: by SIGINT / SIGTERM (its
  checkpoint saved) an Interrupted, which main ends with the resume command and status
  130 / 143; any other early stop is a bug."""
  stopped = summary.get("stopped")
  if stopped in (None, "done"):
    return
  if stopped == "signal":
    from flamingo_jax.training.loop import StopSignal
    signum = StopSignal.last_received or signal.SIGINT
    raise Interrupted(signum, f"{what} stopped by {signal.Signals(signum).name} at step "
                      f"{summary.get('step')}, its checkpoint saved")
  raise RuntimeError(f"{what} stopped early ({stopped})")


def _signal_during(stage: str) -> Optional[int]:
  """The signal a trainer's loop caught during this stage, if any (None: none)."""
  if stage not in ("lm", "vision", "flamingo"):
    return None
  from flamingo_jax.training.loop import StopSignal
  return StopSignal.last_received


def resume_command(argv: Sequence[str]) -> str:
  """The command that continues an interrupted demo: the same one without --force (which
  would start the forced stages afresh again)."""
  args, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == "--force":
      skip = True
    elif not a.startswith("--force="):
      args.append(a)
  return shlex.join(["python", "-m", "flamingo_jax.demo", *args])


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
  check_finished("LM pretraining", out)
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
  check_finished("contrastive pretraining", summary)
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
  config = train.with_default_sections(config)  # config.json shows every value the run used
  bar = Bar("flamingo training", scale.flamingo_steps)
  t0 = time.perf_counter()
  try:
    summary = train.run(config, paths["flamingo"], on_step=bar, devices=train_devices(config))
  finally:
    bar.close()
  check_finished("Flamingo training", summary)
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
  if os.path.exists(scale_file) and read_json(scale_file) != want and "data" not in force:
    # Every stage depends on the data: only redoing them all makes the workdir one scale.
    names = {json.dumps(dataclasses.asdict(v), sort_keys=True): k for k, v in SCALES.items()}
    had = read_json(scale_file)
    raise UserError(f"{workdir} was made with --scale "
                    f"{names.get(json.dumps(had, sort_keys=True), had)}, not "
                    f"{names.get(json.dumps(want, sort_keys=True), want)}; use a new --workdir "
                    "or --force data (redoes every stage at the new scale)")
  write_json(scale_file, dataclasses.asdict(scale))
  forced = False
  for stage in STAGES:
    if stage not in stages:  # still read its result: the report needs every stage's
      marker = os.path.join(paths.get(stage, ""), RESULT)
      if stage != "report" and os.path.exists(marker):
        results[stage] = read_json(marker)
        seconds[stage] = results[stage].get("_seconds", 0.0)
      continue
    if stage == "report":
      missing = [s for s in STAGES[:-1] if s not in results]
      if missing:
        raise ValueError(f"the report needs the results of stages {missing}: run them first")
      path = report.write_report(paths, results, seconds, seeds)
      results["report"] = {"path": path}
      continue
    marker = os.path.join(paths[stage], RESULT)
    forced = forced or stage in force  # a forced stage invalidates the later ones
    if os.path.exists(marker) and not forced:
      log.info("stage %s: done (%s), skipped", stage, marker)
      results[stage] = read_json(marker)
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
    write_json(marker, results[stage])
    log.info("stage %s: done in %.0f s", stage, seconds[stage])
    signum = _signal_during(stage)
    if signum is not None:  # it came as the last steps ran: the stage is done, stop here
      raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after stage "
                        f"{stage} finished")
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
  argv = list(sys.argv[1:] if argv is None else argv)
  a = p.parse_args(argv)
  try:
    return _main(a)
  except Interrupted as e:
    raise Interrupted(e.signum, f"{e}; resume with: {resume_command(argv)}") from None


def _main(a: argparse.Namespace) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                      stream=sys.stderr)
  for name in ("flamingo_jax.trainers.flamingo.train", "flamingo_jax.trainers.contrastive.train", "flamingo_jax.trainers.lm.train",
               "absl", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  from flamingo_jax.training.cli import quiet_checkpoint_metadata_warning
  quiet_checkpoint_metadata_warning()  # a resumed stage would warn for every checkpoint read
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
      print(report.seeds_table({s: r["eval"] for s, r in runs.items()}))
      print(f"\nSeed {seeds[0]} alone (the first seed's run; report.md has both):")
  else:
    results = run(a.workdir, SCALES[a.scale], force, stages)
  if "eval" in results:
    print(report.results_table(results["eval"]))
    for task, m in report.margins(results["eval"]).items():
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
