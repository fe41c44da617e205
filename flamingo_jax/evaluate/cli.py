"""Few-shot evaluation of a model directory on local benchmark files -> a Table 1.

  python -m flamingo_jax.evaluate --checkpoint MODEL_DIR \
      --eval configs/eval/coco.py:/data/coco --eval configs/eval/vqav2.py:/data/vqav2 \
      [--shots 0,4,32] [--num_trials 3] [--rices] [--mesh.tensor=4] --out OUT

MODEL_DIR is a model directory (flamingo_jax/model_dir.py: our exports and the
converted OpenFlamingo / IDEFICS checkpoints). Each `--eval` file names one
benchmark's files under its data root and its protocol (shots, trials, beam,
max new tokens, prompt); `--config FILE` may add an `eval` (and `mesh`)
section instead. The run (evaluate/run.py) writes results.json,
results_open_flamingo.json, results.md and predictions/ under OUT; a rerun
continues it. docs/evaluation.md describes all of it.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import jax

from flamingo_jax import model_dir
from flamingo_jax.config import check, load_config, split_config_args
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.errors import ArgumentParser, ConfigError
from flamingo_jax.evaluate.config import compose, eval_config, protocol
from flamingo_jax.evaluate.decode import Placement
from flamingo_jax.evaluate.run import evaluate, results_markdown
from flamingo_jax.runtime import distributed

MODEL_OVERRIDE = "--config.model."  # applied to the model's config, the rest to the eval's


def _int_list(text: str, what: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ConfigError(f"--{what} must be comma-separated integers, got {text!r}") from None


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
  p.add_argument("--init_seed", type=int, default=None, help="with --random_init: the seed "
                 "of the random params (default 0); the trials' seeds are --trial_seeds / "
                 "eval.seed")
  p.add_renamed("--seed", "--init_seed", type=int)
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--fake_devices", type=int, default=0, metavar="N",
                 help="run on N fake CPU devices (try a --mesh.* sharding without them)")
  return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """The CLI (`python -m flamingo_jax.evaluate`); returns the results dict."""
  argv = list(sys.argv[1:] if argv is None else argv)
  argv, mesh_overrides = model_dir.mesh_flags(argv)
  rest, overrides = split_config_args(argv)
  overrides = list(overrides) + mesh_overrides
  model_overrides = [o for o in overrides if o.startswith(MODEL_OVERRIDE)]
  a = build_parser().parse_args(rest)
  distributed.fake_cpu_devices(a.fake_devices)
  check(bool(a.checkpoint) or a.random_init, "pass --checkpoint MODEL_DIR (or --random_init "
        "with a --config that has a model section)")
  check(a.init_seed is None or a.random_init, f"--init_seed {a.init_seed} seeds random params "
        "and needs --random_init; the trials' seeds are --trial_seeds (or "
        "--config.eval.seed=N)")
  init_seed = a.init_seed or 0
  check(not (a.checkpoint and os.path.basename(os.path.normpath(a.checkpoint))
             == model_dir.PARAMS and not os.path.exists(
                 os.path.join(a.checkpoint, model_dir.MODEL_CONFIG))),
        f"--checkpoint {a.checkpoint!r} is the params checkpoint; pass the model directory "
        "that holds it (and model_config.json)")
  file_cfg = load_config(a.config) if a.config else None
  if a.checkpoint:
    model_dir.check_not_lm_only(a.checkpoint)
    config = model_dir.read_model_config(a.checkpoint, model_overrides)
  else:
    check(file_cfg is not None and "model" in file_cfg, "--random_init without --checkpoint "
          "needs a --config with a model section")
    config = model_dir.with_overrides(file_cfg.model, model_overrides)
  check(bool(a.eval) or (file_cfg is not None and "eval" in file_cfg),
        "no benchmarks: pass one or more --eval configs/eval/<benchmark>.py:DATA_ROOT "
        "(or a --config with an eval section)")
  cfg, order = compose(config=file_cfg, eval_files=a.eval,
                       overrides=[o for o in overrides if o not in model_overrides])
  ec = eval_config(cfg)
  # Several processes (hosts): before anything touches a device, as the trainer does.
  distributed.initialize(distributed.distributed_config(cfg.get("distributed")))
  tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] or order
  unknown = [t for t in tasks if t not in ec.tasks]
  check(not unknown, f"unknown eval task(s) {unknown}; the eval configs define "
        f"{sorted(ec.tasks)}")
  shots = _int_list(a.shots, "shots")
  trial_seeds = _int_list(a.trial_seeds, "trial_seeds")
  for key in ("num_trials", "ensemble", "num_samples"):
    check(getattr(a, key) >= 0, f"--{key} must be >= 0, got {getattr(a, key)}")
  for name in tasks:  # trial and shot counts are checked before any model runs
    protocol(ec, ec.tasks[name], shots=shots, num_trials=a.num_trials,
             trial_seeds=trial_seeds, ensemble=a.ensemble)
  mesh, mesh_cfg = model_dir.device_mesh(cfg.mesh)
  tok_path = a.tokenizer or ec.tokenizer
  if not a.random_init:
    _, params, tokenizer = model_dir.load(a.checkpoint, mesh=mesh, mesh_cfg=mesh_cfg,
                                          tokenizer=tok_path or None, config=config)
    model_id = os.path.abspath(a.checkpoint)
  else:
    if a.checkpoint:
      tokenizer = model_dir.load_tokenizer(a.checkpoint, config, tok_path or None)
    else:
      tok_path = tok_path or (cfg.data.get("tokenizer", "") if "data" in cfg else "")
      check(bool(tok_path), "no tokenizer: pass --tokenizer or set eval.tokenizer to the "
            "model's sentencepiece model")
      tokenizer = Tokenizer.load(tok_path)
      model_dir.check_tokenizer(config, tokenizer, f"tokenizer {tok_path!r}")
    params = model_dir.init_params(config, init_seed)
    if mesh is not None:
      params = jax.device_put(params, jax.tree.map(
          lambda x: x.sharding, model_dir.abstract_params(config, mesh, mesh_cfg)))
    model_id = f"random_init:{init_seed}"
  metadata = dict(config=os.path.abspath(a.config) if a.config else None,
                  eval_configs=list(a.eval), overrides=overrides,
                  random_init=bool(a.random_init),
                  checkpoint=None if a.random_init else os.path.abspath(a.checkpoint),
                  devices=len(jax.devices()), processes=jax.process_count())
  report = evaluate(config, ec, params, tokenizer, tasks=tasks, shots=shots,
                    num_samples=a.num_samples, use_rices=a.rices, out_dir=a.out,
                    progress=not a.no_progress, metadata=metadata, num_trials=a.num_trials,
                    trial_seeds=trial_seeds, ensemble=a.ensemble,
                    placement=Placement.of(params, mesh, mesh_cfg), model_id=model_id)
  if jax.process_index() == 0:
    print(results_markdown(report))
  return report
