"""Contrastive pretraining of Flamingo's vision encoder (paper appendix B.1.3).

  python -m flamingo_jax.data.synthetic --out /tmp/synth
  python -m flamingo_jax.contrastive --config configs/contrastive_tiny.py:data=/tmp/synth \
      --workdir /tmp/contrastive_tiny
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

Built on the Flamingo training system: its mesh and sharding rules
(sharding.py), state and update step (objective.init_state /
make_train_step, the non-finite skip included), step checkpoints with the
data-iterator state and resume (checkpoint.Checkpointer), the grain input
pipeline (flamingo_jax.data), metrics (metrics_writer.py). What is specific
here: the loss, the per-tower optimizer, the temperature clip, the export.
Resume order: this workdir's latest checkpoint, else `model_init` (towers
from parameter checkpoints), else random init. docs/contrastive.md has every
option.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
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
from jax.sharding import NamedSharding

from flamingo_jax.training import checkpoint as ckpt_lib
from flamingo_jax.training import distributed, objective, optim, sharding
from flamingo_jax.training.agc import adaptive_grad_clip
from flamingo_jax.config import from_config_dict, to_config_dict
from flamingo_jax.config import apply_overrides, load_config, split_config_args
from flamingo_jax.data.config import DataConfig, data_config
from flamingo_jax.training.metrics import MetricsWriter, progress_line
from flamingo_jax.models.dual_encoder import (TEMPERATURE, DualEncoder, DualEncoderConfig,
                                              clip_temperature, contrastive_loss,
                                              validate_dual_encoder_config)

log = logging.getLogger("flamingo_jax.contrastive")

# Towers, by top-level parameter key: the optimizer clips each its own way.
VISION_KEYS = ("vision", "vision_projection")
TEXT_KEYS = ("text", "text_projection")
INIT_COMPONENTS = ("vision", "text")  # what model_init may provide


# --------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """`train` section."""
  total_steps: int = 500_000
  seed: int = 0
  label_smoothing: float = 0.1  # paper
  log_every: int = 10
  max_consecutive_nonfinite: int = 10  # stop after this many skipped updates in a row


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """`optim` section: Adam, linear decay to end_learning_rate, per-tower clipping."""
  learning_rate: float = 1e-3
  warmup_steps: int = 0  # linear from 0; the paper states none
  end_learning_rate: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0  # Adam (paper); > 0 decays the towers' weights (AdamW)
  vision_agc: float = 0.01  # AGC lambda on the vision tower; 0 disables
  vision_agc_eps: float = 1e-3
  # Vision parameters AGC leaves alone (a regex over 'key/.../leaf'): the final
  # linear layer, as the NFNet paper leaves its classifier unclipped.
  vision_agc_exclude: str = r"^vision_projection/|(^|/)classifier(/|$)"
  text_clip_norm: float = 10.0  # global norm over the text tower; 0 disables


@dataclasses.dataclass(frozen=True)
class Setup:
  """Every section of a config, validated before anything touches a device."""
  model: DualEncoderConfig
  train: TrainConfig
  optim: OptimConfig
  mesh: sharding.MeshConfig
  checkpoint: ckpt_lib.CheckpointConfig
  distributed: distributed.DistributedConfig
  data: DataConfig
  model_init: Mapping[str, str]
  export: Mapping[str, str]


def _section(config, name):
  return config.get(name) if name in config else None


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


def model_config(cfg) -> DualEncoderConfig:
  """The validated DualEncoderConfig of a config's `model` section."""
  if isinstance(cfg, DualEncoderConfig):
    c = cfg
  else:
    section = cfg.model if hasattr(cfg, "model") and not isinstance(cfg, dict) else cfg
    c = from_config_dict(DualEncoderConfig, section, "model")
  validate_dual_encoder_config(c)
  return c


def train_config(cfg) -> TrainConfig:
  c = from_config_dict(TrainConfig, cfg or {}, "train")
  for key in ("total_steps", "log_every", "max_consecutive_nonfinite"):
    _check(getattr(c, key) >= 1, f"config key 'train.{key}' must be a positive int, got "
           f"{getattr(c, key)}")
  _check(0.0 <= c.label_smoothing < 1.0, f"config key 'train.label_smoothing' must be in "
         f"[0, 1), got {c.label_smoothing}")
  return c


def optim_config(cfg) -> OptimConfig:
  c = from_config_dict(OptimConfig, cfg or {}, "optim")
  for key in ("learning_rate", "end_learning_rate", "eps", "weight_decay", "vision_agc",
              "text_clip_norm"):
    _check(getattr(c, key) >= 0, f"config key 'optim.{key}' must be >= 0, got "
           f"{getattr(c, key)}")
  _check(c.vision_agc_eps > 0, f"config key 'optim.vision_agc_eps' must be positive, got "
         f"{c.vision_agc_eps}")
  _check(c.warmup_steps >= 0, f"config key 'optim.warmup_steps' must be >= 0, got "
         f"{c.warmup_steps}")
  for key in ("b1", "b2"):
    _check(0.0 <= getattr(c, key) < 1.0, f"config key 'optim.{key}' must be in [0, 1), got "
           f"{getattr(c, key)}")
  try:
    re.compile(c.vision_agc_exclude)
  except re.error as e:
    raise ValueError(f"config key 'optim.vision_agc_exclude' is not a valid regex: {e}") from e
  return c


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Parses and cross-checks every section; errors name the offending key."""
  model = model_config(config)
  data = data_config(_section(config, "data") or {})
  for name, d in data.datasets.items():
    _check(d.kind == "pairs", f"config key 'data.datasets.{name}.kind' is {d.kind!r}; "
           "contrastive pretraining reads image-text pairs ('pairs')")
    _check(d.seq_len <= model.text.max_length,
           f"config key 'data.datasets.{name}.seq_len' ({d.seq_len}) exceeds "
           f"model.text.max_length ({model.text.max_length})")
  _check(data.image.size == model.vision.image_size,
         f"config key 'data.image.size' ({data.image.size}) differs from "
         f"model.vision.image_size ({model.vision.image_size}); train at the model's size")
  model_init = dict(_section(config, "model_init") or {})
  for comp, path in model_init.items():
    _check(comp in INIT_COMPONENTS, f"config key 'model_init.{comp}' is not a tower; expected "
           f"one of {list(INIT_COMPONENTS)}")
    _check(isinstance(path, str) and bool(path),
           f"config key 'model_init.{comp}' must be a checkpoint directory")
  export = dict(_section(config, "export") or {})
  for key, value in export.items():
    _check(key == "vision", f"config key 'export.{key}' is unknown; only 'export.vision' "
           "(directory of the exported vision tower; '' = workdir/export/vision)")
    _check(isinstance(value, str), "config key 'export.vision' must be a string path")
  return Setup(
      model=model, train=train_config(_section(config, "train")),
      optim=optim_config(_section(config, "optim")),
      mesh=sharding.mesh_config(_section(config, "mesh")),
      checkpoint=ckpt_lib.checkpoint_config(_section(config, "checkpoint")),
      distributed=distributed.distributed_config(_section(config, "distributed")),
      data=data, model_init=model_init, export=export)


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


def learning_rate_schedule(c: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then linear decay to end_learning_rate at total_steps."""
  return optim.learning_rate_schedule(
      optim.OptimConfig(learning_rate=c.learning_rate, warmup_steps=c.warmup_steps,
                        schedule="linear", end_learning_rate=c.end_learning_rate),
      total_steps)


def make_optimizer(c: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """Per tower: vision AGC -> Adam; text global-norm clip -> Adam; temperature Adam.

  Clipping happens on each tower's own gradient (the sum over datasets), so
  one tower's large gradient never shrinks the other's step.
  """
  lr = learning_rate_schedule(c, total_steps)
  adam = lambda wd: optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps,  # noqa: E731
                                weight_decay=wd)
  vision = [adam(c.weight_decay)]
  if c.vision_agc:
    vision.insert(0, adaptive_grad_clip(c.vision_agc, c.vision_agc_eps, c.vision_agc_exclude))
  text = [adam(c.weight_decay)]
  if c.text_clip_norm:
    text.insert(0, optax.clip_by_global_norm(c.text_clip_norm))
  return optax.multi_transform(
      {"vision": optax.chain(*vision), "text": optax.chain(*text), "temperature": adam(0.0)},
      tower_labels)


# --------------------------------------------------------------------------
# Batches


def batch_from_pairs(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A pairs batch of flamingo_jax.data -> the dual encoder's inputs.

  The pipeline lays captions out for the LM as <BOS><image>caption<EOC><EOS>;
  its `targets` row is that sequence shifted by one and `loss_mask` marks its
  real text (caption, <EOC>, <EOS>; not <image>, not padding). So the text
  tower reads tokens = targets under mask = loss_mask > 0: the caption in the
  pipeline's own tokenisation, padding masked out.
    images [B, 1, 1, H, W, 3] -> images [B, H, W, 3]
    targets [B, L], loss_mask [B, L] -> tokens [B, L] int32, mask [B, L] bool
  """
  for key in ("images", "targets", "loss_mask"):
    if key not in batch:
      raise ValueError(f"pairs batch has no {key!r}; it has {sorted(batch)}")
  images = np.asarray(batch["images"])
  if images.ndim != 6 or images.shape[1:3] != (1, 1):
    raise ValueError(f"pairs batch images must be [B, 1, 1, H, W, 3], got {images.shape}")
  return {"images": images[:, 0, 0], "tokens": np.asarray(batch["targets"], np.int32),
          "mask": np.asarray(batch["loss_mask"]) > 0}


def abstract_batch(batch_size: int, image_size: int, seq_len: int) -> dict:
  sds = jax.ShapeDtypeStruct
  return {"images": sds((batch_size, image_size, image_size, 3), jnp.float32),
          "tokens": sds((batch_size, seq_len), jnp.int32),
          "mask": sds((batch_size, seq_len), jnp.bool_)}


# --------------------------------------------------------------------------
# The update


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
# Export


def export_dir(s: Setup, workdir: str) -> str:
  return s.export.get("vision") or os.path.join(workdir, "export", "vision")


def export_vision(directory: str, params: Mapping, model: DualEncoderConfig, step: int) -> None:
  """Writes params['vision'] (float32) as a parameter checkpoint for Flamingo's
  `model_init.vision`; the metadata records the vision config and the step."""
  meta = {"component": "vision", "step": int(step),
          "vision_config": to_config_dict(model.vision).to_dict(),
          "source": "flamingo_jax.contrastive"}
  ckpt_lib.save_params(directory, params["vision"], json.loads(json.dumps(meta)))


# --------------------------------------------------------------------------
# main


def abstract_state(s: Setup, mesh, tx=None):
  """(model, tx, abstract state with shardings, state shardings) for a Setup.

  The same function gives the trainer its layout and the evaluator its
  restore target.
  """
  model = DualEncoder(s.model)
  tx = tx or make_optimizer(s.optim, s.train.total_steps)
  size = s.model.vision.image_size
  seq = s.model.text.max_length
  init_args = (jnp.zeros((1, size, size, 3), jnp.float32), jnp.zeros((1, seq), jnp.int32),
               jnp.ones((1, seq), bool))
  with jax.set_mesh(mesh):
    boxed = jax.eval_shape(lambda r: model.init(r, *init_args)["params"], jax.random.key(0))
  param_specs = sharding.param_specs(boxed, mesh, s.mesh)
  params_abs = nn.unbox(boxed)
  state_abs = jax.eval_shape(lambda p: objective.init_state(p, tx, jax.random.key(0)),
                             params_abs)
  zero1 = (lambda spec, shape: sharding.zero1_spec(spec, shape, mesh)) if s.mesh.zero1 else None
  specs = {k: jax.sharding.PartitionSpec() for k in state_abs}
  specs.update(params=param_specs,
               opt_state=optim.state_specs(state_abs["opt_state"], params_abs, param_specs,
                                           zero1))
  state_sh = sharding.named(mesh, specs)
  return model, tx, state_abs, state_sh, init_args


def run(config: ml_collections.ConfigDict, workdir: str, *, compile_only: bool = False,
        stop_at: Optional[int] = None, devices: Optional[Sequence[jax.Device]] = None,
        on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
  """Trains (or only compiles) and returns a summary.

  Returns {'step', 'stopped', 'history': [metrics per step], 'eval': {...},
  'export': directory or None, 'memory': bytes per device}.
  """
  # Imported here: the trainer pulls its helpers (StopSignal, put_batch,
  # process_rows) from train.py, which imports the Flamingo model.
  from flamingo_jax import contrastive_eval
  from flamingo_jax.train import StopSignal, process_rows, put_batch, code_version

  # ------------------------------------------------------------------ Config
  s = setup(config)
  eval_cfg = contrastive_eval.eval_config(_section(config, "eval"))
  distributed.initialize(s.distributed)
  is_main = jax.process_index() == 0
  names = sorted(s.data.datasets)
  weights = {n: d.weight for n, d in s.data.datasets.items()}
  total_steps = s.train.total_steps

  # ------------------------------------------------------------------ Workdir
  workdir = os.path.abspath(workdir)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(workdir, "version.txt"), "w") as f:
      f.write(code_version() + "\n")

  # ------------------------------------------------------------------ Mesh
  mesh = sharding.make_mesh(s.mesh, devices)
  log.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size,
           jax.process_count())

  # ------------------------------------------------------------------ Model, optimizer, layout
  schedule = learning_rate_schedule(s.optim, total_steps)
  model, tx, state_abs, state_sh, init_args = abstract_state(s, mesh)
  counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
            for k, v in state_abs["params"].items()}
  log.info("parameters: %s", {k: f"{v:,}" for k, v in counts.items()})

  # ------------------------------------------------------------------ Compile the update step
  shards = sharding.batch_shards(mesh)
  for n in names:
    b = s.data.datasets[n].batch_size
    _check(b % shards == 0, f"config key 'data.datasets.{n}.batch_size' ({b}) must be "
           f"divisible by the {shards} data-parallel devices (mesh slice*data*fsdp)")
  size = s.model.vision.image_size
  batch_abs = {n: abstract_batch(s.data.datasets[n].batch_size, size,
                                 s.data.datasets[n].seq_len) for n in names}
  batch_sh = {n: {k: NamedSharding(mesh, sharding.batch_spec(len(a.shape)))
                  for k, a in b.items()} for n, b in batch_abs.items()}
  step_fn = make_train_step(model, tx, schedule, weights, s.train.label_smoothing)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(s.mesh.rules):
    compiled = jax.jit(step_fn, donate_argnums=(0,), in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, sharding.replicated(mesh))).lower(
        sharding.with_shardings(state_abs, state_sh),
        {n: sharding.with_shardings(batch_abs[n], batch_sh[n]) for n in names}).compile()
  memory = {"params": sharding.bytes_per_device(state_abs["params"], state_sh["params"]),
            "optimizer_state": sharding.bytes_per_device(state_abs["opt_state"],
                                                         state_sh["opt_state"])}
  analysis = compiled.memory_analysis()
  if analysis is not None:
    memory["temp"] = int(getattr(analysis, "temp_size_in_bytes", 0) or 0)
    memory["argument"] = int(getattr(analysis, "argument_size_in_bytes", 0) or 0)
  log.info("compiled the step in %.1f s; bytes per device: %s", time.perf_counter() - t0,
           memory)
  summary = {"step": None, "stopped": None, "history": [], "eval": {}, "export": None,
             "memory": memory}
  if compile_only:
    return summary

  # ------------------------------------------------------------------ Input pipeline
  from flamingo_jax.data import make_train_iterators
  rows = {n: process_rows(mesh, s.data.datasets[n].batch_size) for n in names}
  iterators = make_train_iterators(config, rows=rows)
  evaluator = contrastive_eval.Evaluator(model, eval_cfg, s.data, mesh, state_sh["params"],
                                         rules=s.mesh.rules)
  _check(evaluator.tokenizer.info.vocab_size <= s.model.text.vocab_size,
         f"config key 'model.text.vocab_size' ({s.model.text.vocab_size}) is smaller than the "
         f"tokenizer's vocabulary ({evaluator.tokenizer.info.vocab_size}, {s.data.tokenizer})")

  # ------------------------------------------------------------------ Initialise or restore
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), s.checkpoint)
  latest = checkpointer.latest_step() if s.checkpoint.enabled else None
  t0 = time.perf_counter()
  state_in = sharding.with_shardings(state_abs, state_sh)
  if latest is not None:
    log.info("resuming from %s/checkpoints/%d", workdir, latest)
    state, data_states = checkpointer.restore(latest, state_in)
    for name, it in iterators.items():
      if name not in data_states:
        raise ValueError(f"checkpoint {latest} has no data state for dataset {name!r} "
                         f"(it has {sorted(data_states)})")
      it.set_state(data_states[name])
  else:
    loaded = {}
    for comp, path in s.model_init.items():
      log.info("%s tower: initialising from %s", comp, path)
      loaded[comp] = ckpt_lib.restore_params(path, state_in["params"][comp], f"model_init.{comp}")

    def init_fresh(rng, loaded):
      init_rng, state_rng = jax.random.split(rng)
      params = nn.unbox(model.init(init_rng, *init_args)["params"])
      params.update(loaded)
      return objective.init_state(params, tx, state_rng)

    with jax.set_mesh(mesh), nn.logical_axis_rules(s.mesh.rules):
      state = jax.jit(init_fresh, out_shardings=state_sh)(jax.random.key(s.train.seed), loaded)
  log.info("state ready in %.1f s", time.perf_counter() - t0)

  # ------------------------------------------------------------------ Loop
  writer = MetricsWriter(workdir, enabled=is_main)
  writer.write_text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
  step = int(jax.device_get(state["step"]))
  history, pending, saved = [], None, set(checkpointer.all_steps())
  last_log_time, last_log_step = time.perf_counter(), step
  stopped = None
  examples = sum(s.data.datasets[n].batch_size for n in names)

  def handle(done_step, metrics):
    """Host side of a finished step (one step behind the device)."""
    nonlocal last_log_time, last_log_step
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    history.append(metrics)
    if on_step is not None:  # progress bars (the demo)
      on_step(done_step, metrics)
    if metrics["nonfinite_consecutive"] >= s.train.max_consecutive_nonfinite:
      raise FloatingPointError(
          f"{int(metrics['nonfinite_consecutive'])} consecutive updates had non-finite "
          f"gradients or loss (train.max_consecutive_nonfinite="
          f"{s.train.max_consecutive_nonfinite}); stopping at step {done_step}")
    if metrics["update_skipped"]:
      log.warning("step %d: non-finite gradient, update skipped", done_step)
    if done_step % s.train.log_every and done_step != total_steps:
      return
    now = time.perf_counter()
    dt = (now - last_log_time) / max(done_step - last_log_step, 1)
    metrics["step_time"] = dt
    metrics["examples_per_second"] = examples / dt
    if is_main:
      log.info(progress_line(done_step, total_steps, metrics, dt, None)
               + f" | beta {metrics['inverse_temperature']:.2f}")
    writer.write(done_step, metrics)
    last_log_time, last_log_step = now, done_step

  def evaluate(at_step):
    results = evaluator.evaluate(state["params"])
    if is_main:
      log.info("eval at step %d: %s", at_step, json.dumps(results, sort_keys=True))
      writer.write(at_step, {f"eval/{k}": v for k, v in results.items()})
    summary["eval"] = dict(results, step=at_step)

  try:
    with StopSignal() as stop:
      while step < total_steps:
        batches = {n: put_batch(batch_from_pairs(next(iterators[n])), batch_abs[n],
                                batch_sh[n], n, rows[n]) for n in names}
        with jax.transfer_guard("disallow"):
          state, metrics = compiled(state, batches)
        step += 1
        if pending is not None:
          handle(*pending)
        pending = (step, metrics)
        halt = step == stop_at or stop.agreed()
        if s.checkpoint.enabled and step not in saved and (
            checkpointer.due(step) or halt or step == total_steps):
          checkpointer.save(step, state, {n: it.get_state() for n, it in iterators.items()})
          saved.add(step)
        if eval_cfg.every and step % eval_cfg.every == 0 and step != total_steps:
          handle(*pending)
          pending = None
          evaluate(step)
        if halt:
          stopped = "signal" if stop.received is not None else "stop_at"
          break
      if pending is not None:
        handle(*pending)
      if stopped is None:
        directory = export_dir(s, workdir)
        export_vision(directory, state["params"], s.model, step)
        summary["export"] = directory
        log.info("exported the vision tower (step %d) to %s", step, directory)
        evaluate(step)
  finally:
    checkpointer.close()
    writer.close()
  summary.update(step=step, stopped=stopped or "done", history=history)
  return summary


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`configs/X.py[:arg]` plus `--config.a.b=v` overrides. The argument is split
  at the first ':' after '.py', so it may hold paths (config_file.load_config
  splits at the last ':' of the basename, which a path argument breaks)."""
  path, arg = spec, None
  if ".py:" in spec:
    path, arg = spec.split(".py:", 1)
    path += ".py"
  return apply_overrides(load_config(path, arg), overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = split_config_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="configs/X.py[:arg]")
  parser.add_argument("--workdir", required=True, help="checkpoints, logs, metrics, export")
  parser.add_argument("--compile_only", action="store_true",
                      help="compile the step for the configured mesh, print memory, exit")
  parser.add_argument("--fake_devices", type=int, default=0,
                      help="run on this many fake CPU devices (with --compile_only)")
  parser.add_argument("--stop_at", type=int, default=None,
                      help="stop after this step with a checkpoint (time-boxed jobs)")
  args = parser.parse_args(rest)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  package_log = logging.getLogger("flamingo_jax")
  package_log.addHandler(handler)
  package_log.setLevel(logging.INFO)
  package_log.propagate = False
  if args.fake_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.fake_devices)
  config = load(args.config, overrides)
  summary = run(config, args.workdir, compile_only=args.compile_only, stop_at=args.stop_at)
  out = {"step": summary["step"], "stopped": summary["stopped"], "eval": summary["eval"],
         "export": summary["export"], "memory_per_device": summary["memory"]}
  if summary["history"]:
    out["loss_first"] = summary["history"][0]["loss"]
    out["loss_last"] = summary["history"][-1]["loss"]
  print(json.dumps(out, indent=2, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
