"""Contrastive pretraining of Flamingo's vision encoder (paper appendix B.1.3).

  python -m flamingo_jax.data.synthetic --out /tmp/synth
  python -m flamingo_jax.contrastive --config configs/contrastive_tiny.py:data=/tmp/synth \
      --workdir /tmp/contrastive_tiny
  python -m flamingo_jax.contrastive --config configs/contrastive_tiny.py:data=/tmp/synth \
      --workdir /tmp/contrastive_tiny --eval_only [--step N]
  python -m flamingo_jax.contrastive --config configs/contrastive_f6.py:align=...,ltip=... \
      --workdir gs://b/run --compile_only --fake_devices=256

A dual encoder (models/dual_encoder.py) trained with the two-term contrastive
loss; every update draws one batch from *each* image-text dataset (ALIGN and
LTIP in the paper) and sums their gradients ("accumulation", Table 11), then
Adam with the learning rate decayed linearly to 0, after per-tower clipping:
AGC (0.01) on the vision tower, global-norm clipping (10) on the text tower.
At the end the vision tower is exported as a parameter checkpoint
(`workdir/export/vision`) that a Flamingo config loads with
`model_init.vision`, frozen.

Built on the training library (flamingo_jax/training/): mesh and sharding
rules, the state and update step (the non-finite skip included), step
checkpoints with the data-iterator state and resume, the loop with its
SIGTERM checkpoint, metrics; the grain input pipeline (flamingo_jax.data) and
the evaluator (evaluate.py). What is specific here: the loss, the
per-tower optimizer, the temperature clip, the export.
Resume order: this workdir's latest checkpoint, else `model_init` (towers
from parameter checkpoints), else random init. docs/contrastive.md has every
option.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flamingo_jax.config import check, from_config_dict, to_config_dict
from flamingo_jax.data.config import DataConfig, data_config
from flamingo_jax.errors import CheckpointError, ConfigError, DataError, run_cli
from flamingo_jax.models.dual_encoder import (TEMPERATURE, DualEncoder, DualEncoderConfig,
                                              clip_temperature, contrastive_loss,
                                              validate_dual_encoder_config)
from flamingo_jax.models.labels import TRAINABLE, TRAINABLE_NO_DECAY
from flamingo_jax.runtime import distributed, params_io, sharding
from flamingo_jax.trainers.contrastive import evaluate as contrastive_eval
from flamingo_jax.trainers.contrastive.evaluate import batch_from_pairs
from flamingo_jax.training import checkpoint as ckpt_lib
from flamingo_jax.training import cli, objective, optim
from flamingo_jax.training import state as state_lib
from flamingo_jax.training.agc import adaptive_grad_clip
from flamingo_jax.training.loop import (LoopConfig, StepHandler, batch_shardings,
                                        check_batch_sizes, pipeline_stats, prepare_workdir,
                                        process_rows, put_batch, run_loop, workdir_path)
from flamingo_jax.training.metrics import MetricsWriter

log = logging.getLogger("flamingo_jax.trainers.contrastive.train")

# Towers, by top-level parameter key: the optimizer clips each its own way.
VISION_KEYS = ("vision", "vision_projection")
TEXT_KEYS = ("text", "text_projection")
INIT_COMPONENTS = ("vision", "text")  # what model_init may provide


# --------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class TrainConfig(LoopConfig):
  """`train` section."""
  label_smoothing: float = 0.1  # paper


@dataclasses.dataclass(frozen=True)
class TowerOptimConfig(optim.OptimConfig):
  """`optim` section: Adam, linear decay to end_learning_rate, per-tower clipping
  (the fields of optim.OptimConfig with this trainer's defaults, plus the towers')."""
  learning_rate: float = 1e-3
  warmup_steps: int = 0  # linear from 0; the paper states none
  schedule: str = "linear"
  weight_decay: float = 0.0  # Adam (paper); > 0 decays the towers' weights (AdamW)
  clip_norm: float = 0.0  # global norm over both towers after their own clipping; 0: off
  vision_agc: float = 0.01  # AGC lambda on the vision tower; 0 disables
  vision_agc_eps: float = 1e-3
  # Vision parameters AGC leaves alone (a regex over 'key/.../leaf'): the final
  # linear layer, as the NFNet paper leaves its classifier unclipped.
  vision_agc_exclude: str = r"^vision_projection/|(^|/)classifier(/|$)"
  text_clip_norm: float = 10.0  # global norm over the text tower; 0 disables


# This trainer's sections beside cli.RUN_SECTIONS (defaults filled before overrides).
SECTIONS = {"train": TrainConfig, "optim": TowerOptimConfig, "eval": contrastive_eval.EvalConfig}
OPEN_KEYS = ("model_init", "export")


@dataclasses.dataclass(frozen=True)
class Setup(cli.RunSetup):
  """Every section of a config, validated once, before anything touches a device."""
  model: DualEncoderConfig
  train: TrainConfig
  optim: TowerOptimConfig
  data: DataConfig
  eval: contrastive_eval.EvalConfig
  model_init: Mapping[str, str]
  export: Mapping[str, str]


def model_config(cfg) -> DualEncoderConfig:
  """The validated DualEncoderConfig of a config's `model` section."""
  if isinstance(cfg, DualEncoderConfig):
    c = cfg
  else:
    section = cfg.model if hasattr(cfg, "model") and not isinstance(cfg, dict) else cfg
    c = from_config_dict(DualEncoderConfig, section, "model")
  validate_dual_encoder_config(c)
  return c


def train_config(config) -> TrainConfig:
  c = cli.train_section(config, TrainConfig)
  check(0.0 <= c.label_smoothing < 1.0, f"config key 'train.label_smoothing' must be in "
         f"[0, 1), got {c.label_smoothing}")
  return c


def optim_config(cfg) -> TowerOptimConfig:
  c = optim.optim_config(cfg, TowerOptimConfig)
  for key in ("vision_agc", "text_clip_norm"):
    check(getattr(c, key) >= 0, f"config key 'optim.{key}' must be >= 0, got "
          f"{getattr(c, key)}")
  check(c.vision_agc_eps > 0, f"config key 'optim.vision_agc_eps' must be positive, got "
        f"{c.vision_agc_eps}")
  try:
    re.compile(c.vision_agc_exclude)
  except re.error as e:
    raise ConfigError(f"config key 'optim.vision_agc_exclude' is not a valid regex: {e}") from e
  return c


def with_default_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The sections and keys a config leaves out, with their defaults (before overrides)."""
  return cli.with_default_sections(config, SECTIONS, {"model_init": {}, "export": {"vision": ""}})


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Parses and cross-checks every section once; errors name the offending key."""
  model = model_config(config)
  data = data_config(cli.section(config, "data") or {})
  for name, d in data.datasets.items():
    check(d.kind == "pairs", f"config key 'data.datasets.{name}.kind' is {d.kind!r}; "
           "contrastive pretraining reads image-text pairs ('pairs')")
    check(d.seq_len <= model.text.max_length,
           f"config key 'data.datasets.{name}.seq_len' ({d.seq_len}) exceeds "
           f"model.text.max_length ({model.text.max_length})")
  check(data.image.size == model.vision.image_size,
         f"config key 'data.image.size' ({data.image.size}) differs from "
         f"model.vision.image_size ({model.vision.image_size}); train at the model's size")
  model_init = dict(cli.section(config, "model_init") or {})
  for comp, path in model_init.items():
    check(comp in INIT_COMPONENTS, f"config key 'model_init.{comp}' is not a tower; expected "
           f"one of {list(INIT_COMPONENTS)}")
    check(isinstance(path, str) and bool(path),
           f"config key 'model_init.{comp}' must be a checkpoint directory")
  export = dict(cli.section(config, "export") or {})
  for key, value in export.items():
    check(key == "vision", f"config key 'export.{key}' is unknown; only 'export.vision' "
           "(directory of the exported vision tower; '' = workdir/export/vision)")
    check(isinstance(value, str), "config key 'export.vision' must be a string path")
  return Setup(
      model=model, train=train_config(config), optim=optim_config(cli.section(config, "optim")),
      data=data, eval=contrastive_eval.eval_config(cli.section(config, "eval")),
      model_init=model_init, export=export, **cli.run_sections(config))


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`configs/X.py[:arg]`, defaults filled, then `--config.a.b=v` overrides: run's input."""
  return cli.load(spec, overrides, with_default_sections, OPEN_KEYS)


# --------------------------------------------------------------------------
# Optimizer


def tower_labels(params: Mapping) -> Any:
  """'vision' | 'text' | 'temperature' per leaf, by top-level key."""
  def label(key):
    if key in VISION_KEYS:
      return "vision"
    if key in TEXT_KEYS:
      return "text"
    if key == TEMPERATURE:
      return "temperature"
    raise ValueError(f"parameter {key!r} belongs to no tower; expected one of "
                     f"{VISION_KEYS + TEXT_KEYS + (TEMPERATURE,)}")
  return {k: jax.tree.map(lambda _, k=k: label(k), v) for k, v in params.items()}


def make_optimizer(c: TowerOptimConfig, total_steps: int) -> optax.GradientTransformation:
  """The library's optimizer with per-tower clipping: vision AGC, text global-norm clip,
  then Adam(W) on both towers and Adam without decay on the temperature.

  Clipping happens on each tower's own gradient (the sum over datasets), so
  one tower's large gradient never shrinks the other's step.
  """
  vision = (adaptive_grad_clip(c.vision_agc, c.vision_agc_eps, c.vision_agc_exclude)
            if c.vision_agc else optax.identity())
  text = optax.clip_by_global_norm(c.text_clip_norm) if c.text_clip_norm else optax.identity()
  towers = optax.multi_transform(
      {"vision": vision, "text": text, "temperature": optax.identity()}, tower_labels)
  return optim.make_optimizer(c, total_steps, decay_labels, group_clip=towers)


def decay_labels(params: Mapping) -> Any:
  """The optimizer's label per leaf: the towers decay, the temperature does not."""
  return jax.tree.map(lambda t: TRAINABLE_NO_DECAY if t == "temperature" else TRAINABLE,
                      tower_labels(params))


# --------------------------------------------------------------------------
# Batches and the update


def abstract_batch(batch_size: int, image_size: int, seq_len: int) -> dict:
  sds = jax.ShapeDtypeStruct
  return {"images": sds((batch_size, image_size, image_size, 3), jnp.float32),
          "tokens": sds((batch_size, seq_len), jnp.int32),
          "mask": sds((batch_size, seq_len), jnp.bool_)}


def make_grad_fn(model: DualEncoder, weights: Mapping[str, float], label_smoothing: float):
  """-> grad_fn(params, frozen, batches, rng) -> (grads, metrics), objective's contract.

  grads = sum_m weight_m * d loss_m / d params: one contrastive loss per
  dataset, negatives from that dataset's batch only (the paper's
  accumulation). `frozen` is unused (nothing is frozen here).
  """

  def loss_fn(params, batch, rng, weight):
    logits, aux = model.apply({"params": params}, batch["images"], batch["tokens"],
                              batch["mask"], train=True, rngs={"dropout": rng})
    loss, metrics = contrastive_loss(logits, label_smoothing)
    metrics["inverse_temperature"] = aux["inverse_temperature"]
    return weight * loss, (loss, metrics)

  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

  def grad_fn(params, frozen, batches, rng):
    del frozen
    if not batches:
      raise ValueError("a contrastive step needs at least one dataset batch")
    grads, metrics, total = None, {}, jnp.zeros((), jnp.float32)
    for i, name in enumerate(sorted(batches)):
      if name not in weights:
        raise ValueError(f"dataset {name!r} has no loss weight; known: {sorted(weights)}")
      (_, (loss, m)), g = value_and_grad(params, batches[name], jax.random.fold_in(rng, i),
                                         weights[name])
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
      total = total + weights[name] * loss
      metrics[f"loss/{name}"] = loss
      for k, v in m.items():
        if k != "inverse_temperature":
          metrics[f"{k}/{name}"] = v
      metrics["inverse_temperature"] = m["inverse_temperature"]
    metrics["loss"] = total
    metrics["grad_norm/vision"] = optax.global_norm([grads[k] for k in VISION_KEYS])
    metrics["grad_norm/text"] = optax.global_norm([grads[k] for k in TEXT_KEYS])
    return grads, metrics

  return grad_fn


def make_train_step(model: DualEncoder, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, weights: Mapping[str, float],
                    label_smoothing: float):
  """-> step(state, batches) -> (state, metrics): objective's update, then the
  temperature clip (the clipped parameter keeps getting gradients)."""
  inner = objective.make_train_step(make_grad_fn(model, weights, label_smoothing), tx,
                                    schedule)
  cap = model.config.max_inverse_temperature

  def step(state, batches):
    state, metrics = inner(state, {}, batches)
    state = dict(state)
    state["params"] = clip_temperature(state["params"], cap)
    return state, metrics

  return step


# --------------------------------------------------------------------------
# Layout, export


def abstract_state(s: Setup, mesh, tx=None):
  """(model, tx, TrainState, init_args): the trainer's layout and the evaluator's
  restore target."""
  model = DualEncoder(s.model)
  tx = tx or make_optimizer(s.optim, s.train.total_steps)
  size, seq = s.model.vision.image_size, s.model.text.max_length
  init_args = (jnp.zeros((1, size, size, 3), jnp.float32), jnp.zeros((1, seq), jnp.int32),
               jnp.ones((1, seq), bool))
  boxed = state_lib.boxed_params(lambda r: model.init(r, *init_args)["params"], mesh)
  ts = state_lib.train_state(nn.unbox(boxed), sharding.param_specs(boxed, mesh, s.mesh), tx,
                             mesh, s.mesh)
  return model, tx, ts, init_args


def export_dir(s: Setup, workdir) -> str:
  return s.export.get("vision") or str(workdir_path(str(workdir)) / "export" / "vision")


def export_vision(directory: str, params: Mapping, model: DualEncoderConfig, step: int) -> None:
  """Writes params['vision'] (float32) as a parameter checkpoint for Flamingo's
  `model_init.vision`; the metadata records the vision config and the step."""
  meta = {"component": "vision", "step": int(step),
          "vision_config": to_config_dict(model.vision).to_dict(),
          "source": "flamingo_jax.trainers.contrastive.train"}
  params_io.save_params(directory, params["vision"], json.loads(json.dumps(meta)))


# --------------------------------------------------------------------------
# The run


def run(config: ml_collections.ConfigDict, workdir: str, *, compile_only: bool = False,
        stop_at: Optional[int] = None, devices: Optional[Sequence[jax.Device]] = None,
        on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
  """Trains (or only compiles) the config `load` returns, and returns a summary.

  Returns {'step', 'stopped', 'history': [metrics per step], 'eval': {...},
  'export': directory or None, 'memory': bytes per device}.
  """
  # ------------------------------------------------------------------ Config, workdir, mesh
  s = setup(config)
  distributed.initialize(s.distributed)
  is_main = jax.process_index() == 0
  names = sorted(s.data.datasets)
  total_steps = s.train.total_steps
  workdir = prepare_workdir(workdir, config)
  mesh = sharding.make_mesh(s.mesh, devices)
  log.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size,
           jax.process_count())

  # ------------------------------------------------------------------ Model, optimizer, layout
  schedule = optim.learning_rate_schedule(s.optim, total_steps)
  model, tx, ts, init_args = abstract_state(s, mesh)
  counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
            for k, v in ts.abstract["params"].items()}
  log.info("parameters: %s", {k: f"{v:,}" for k, v in counts.items()})

  # ---------------------------------------------------------- Inputs, evaluator (before compiling)
  if not compile_only:  # a wrong tokenizer or a missing shard fails in seconds
    from flamingo_jax.data import make_train_iterators
    rows = {n: process_rows(mesh, s.data.datasets[n].batch_size) for n in names}
    iterators = make_train_iterators(s.data, rows=rows)
    evaluator = contrastive_eval.Evaluator(model, s.eval, s.data, mesh, ts.shardings["params"],
                                           rules=s.mesh.rules)
    vocab = evaluator.tokenizer.info.vocab_size
    if vocab > s.model.text.vocab_size:
      raise DataError(f"config key 'model.text.vocab_size' ({s.model.text.vocab_size}) is "
                      f"smaller than the tokenizer's vocabulary ({vocab}, {s.data.tokenizer})")

  # ------------------------------------------------------------------ Compile the update step
  check_batch_sizes({n: s.data.datasets[n].batch_size for n in names}, mesh,
                    "data.datasets.{name}.batch_size")
  size = s.model.vision.image_size
  batch_abs = {n: abstract_batch(s.data.datasets[n].batch_size, size,
                                 s.data.datasets[n].seq_len) for n in names}
  batch_sh = {n: batch_shardings(mesh, b) for n, b in batch_abs.items()}
  step_fn = make_train_step(model, tx, schedule, {n: d.weight for n, d in s.data.datasets.items()},
                            s.train.label_smoothing)
  compiled = state_lib.compile_step(
      step_fn, mesh, s.mesh.rules, (ts.shardings, batch_sh),
      (ts.shardings, sharding.replicated(mesh)),
      (ts.target(), {n: sharding.with_shardings(batch_abs[n], batch_sh[n]) for n in names}),
      fit_check=compile_only)
  memory = state_lib.memory_report(compiled, {
      "params": (ts.abstract["params"], ts.shardings["params"]),
      "optimizer_state": (ts.abstract["opt_state"], ts.shardings["opt_state"])})
  log.info("bytes per device: %s", memory)
  summary = {"step": None, "stopped": None, "history": [], "eval": {}, "export": None,
             "memory": memory}
  if compile_only:
    return summary

  # ------------------------------------------------------------------ Initialise or restore
  t0 = time.perf_counter()
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), s.checkpoint)
  state = (state_lib.restore_latest(checkpointer, ts.target(), iterators)
           if s.checkpoint.enabled else None)
  if state is None:
    loaded = {}
    for comp, path in s.model_init.items():
      log.info("%s tower: initialising from %s", comp, path)
      loaded[comp] = params_io.restore_params(path, ts.target()["params"][comp],
                                             f"model_init.{comp}")
    state = state_lib.fresh_state(lambda rng: nn.unbox(model.init(rng, *init_args)["params"]),
                                  tx, s.train.seed, mesh, s.mesh.rules, ts.shardings, loaded)
  log.info("state ready in %.1f s", time.perf_counter() - t0)

  # ------------------------------------------------------------------ Loop
  writer = MetricsWriter(workdir, enabled=is_main)
  writer.write_text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
  examples = sum(s.data.datasets[n].batch_size for n in names)

  def evaluate(at_step, params):
    results = evaluator.evaluate(params)
    if is_main:
      log.info("eval at step %d: %s", at_step, json.dumps(results, sort_keys=True))
      writer.write(at_step, {f"eval/{k}": v for k, v in results.items()})
    summary["eval"] = dict(results, step=at_step)

  def train_step(state, step):
    batches = {n: put_batch(batch_from_pairs(next(iterators[n])), batch_abs[n], batch_sh[n], n,
                            rows[n]) for n in names}
    with jax.transfer_guard("disallow"):
      state, metrics = compiled(state, batches)
    return state, metrics, None

  def after_step(step, state, flush):
    if s.eval.every and step % s.eval.every == 0 and step != total_steps:
      flush()
      evaluate(step, state["params"])

  step = int(jax.device_get(state["step"]))
  handler = StepHandler(
      total_steps=total_steps, log_every=s.train.log_every,
      max_consecutive_nonfinite=s.train.max_consecutive_nonfinite, writer=writer,
      start_step=step, on_step=on_step,
      throughput=lambda _, dt: {"examples_per_second": examples / dt},
      suffix=lambda m: f" | beta {m['inverse_temperature']:.2f}",
      data_stats=lambda: pipeline_stats(iterators))
  try:
    state, step, stopped = run_loop(
        state, step=step, total_steps=total_steps, train_step=train_step, handler=handler,
        checkpointer=checkpointer if s.checkpoint.enabled else None,
        data_states=lambda: {n: it.get_state() for n, it in iterators.items()},
        stop_at=stop_at, after_step=after_step)
    if stopped == "done":
      directory = export_dir(s, workdir)
      export_vision(directory, state["params"], s.model, step)
      summary["export"] = directory
      log.info("exported the vision tower (step %d) to %s", step, directory)
      evaluate(step, state["params"])
  finally:
    checkpointer.close()
    writer.close()
  summary.update(step=step, stopped=stopped, history=handler.history)
  return summary


def evaluate_checkpoint(config, workdir: str, step: Optional[int] = None,
                        devices: Optional[Sequence[jax.Device]] = None) -> dict:
  """Restores `workdir/checkpoints/<step>` (default: latest) and evaluates it
  on a mesh of `devices` (default: all)."""
  s = setup(config)
  mesh = sharding.make_mesh(s.mesh, devices)
  model, _, ts, _ = abstract_state(s, mesh)
  directory = workdir_path(workdir) / "checkpoints"
  if not directory.exists():
    raise CheckpointError(f"no checkpoint in {directory} (the directory does not exist)")
  checkpointer = ckpt_lib.Checkpointer(str(directory), s.checkpoint)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None or step not in checkpointer.all_steps():
      what = "no checkpoint" if step is None else f"no checkpoint of step {step}"
      raise CheckpointError(f"{what} in {workdir}/checkpoints (it has "
                            f"{checkpointer.all_steps()})")
    state, _ = checkpointer.restore(step, ts.target())
  finally:
    checkpointer.close()
  evaluator = contrastive_eval.Evaluator(model, s.eval, s.data, mesh, ts.shardings["params"],
                                         rules=s.mesh.rules)
  return dict(evaluator.evaluate(state["params"]), step=int(step))


def main(argv: Optional[Sequence[str]] = None) -> int:
  def extra(parser):
    parser.add_argument("--eval_only", action="store_true",
                        help="evaluate a checkpoint of the run (no training)")
    parser.add_argument("--step", type=int, default=None,
                        help="with --eval_only: the checkpoint step (default: latest)")

  args, overrides = cli.parse_args(argv, __doc__, "checkpoints, logs, metrics, export",
                                   extra)
  config = load(args.config, overrides)
  if args.eval_only:
    print(json.dumps(evaluate_checkpoint(config, args.workdir, args.step), indent=2,
                     sort_keys=True))
    return 0
  summary = run(config, args.workdir, compile_only=args.compile_only, stop_at=args.stop_at)
  out = {"step": summary["step"], "stopped": summary["stopped"], "eval": summary["eval"],
         "export": summary["export"], "memory_per_device": summary["memory"]}
  if summary["history"]:
    out["loss_first"] = summary["history"][0]["loss"]
    out["loss_last"] = summary["history"][-1]["loss"]
  print(json.dumps(out, indent=2, sort_keys=True))
  return 0


def cli_main() -> int:
  """`python -m flamingo_jax.contrastive`: exit 0, or 2 with one `error:` line for bad input."""
  return run_cli(main)


if __name__ == "__main__":
  sys.exit(cli_main())
