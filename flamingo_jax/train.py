"""Trains Flamingo: frozen vision encoder and LM, trained resampler and cross-attention.

  python -m flamingo_jax.train --config configs/tiny.py --workdir /tmp/tiny
  python -m flamingo_jax.train --config configs/flamingo_9b.py --workdir gs://b/run \
      --config.mesh.tensor=16 --compile_only --fake_devices=256

One main() read top to bottom: config, distributed start-up, mesh, model and
optimizer, abstract state and its shardings, input pipeline, the compiled
update step, initialise-or-restore, the loop. Resume order: this workdir's
latest checkpoint, else `model_init` (pretrained components), else random init.
Every option is in docs/training.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from flamingo_jax.training import checkpoint as ckpt_lib
from flamingo_jax.training import distributed, flops, objective, optim, sharding
from flamingo_jax.data import in_memory as train_data
from flamingo_jax.config import COMPONENTS, FlamingoConfig, from_config_dict, model_config
from flamingo_jax.config import apply_overrides, load_config, split_config_args
from flamingo_jax.training.metrics import MetricsWriter, progress_line
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.models.labels import component_of

log = logging.getLogger("flamingo_jax.train")


# --------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """`train` section of a config."""
  total_steps: int = 500_000
  seed: int = 0
  input: str = "synthetic"  # synthetic (train_data.py) | pipeline (flamingo_jax.data)
  mixing: str = "accumulate"  # accumulate (paper) | round_robin (one dataset per step)
  micro_batches: Mapping[str, int] = dataclasses.field(default_factory=dict)
  frozen_dtype: str = "bfloat16"  # storage of frozen weights: bfloat16 | float32
  log_every: int = 10
  max_consecutive_nonfinite: int = 10  # stop after this many skipped updates in a row
  peak_flops_per_device: float = 0.0  # MFU denominator; 0: datasheet, else a measured matmul
  # At the end of the run, write the whole model (trainable + frozen weights,
  # model_config.json and, with train.input='pipeline', the data tokenizer) as
  # a model directory that `python -m flamingo_jax.generate` and evaluation load.
  export_dir: str = ""


@dataclasses.dataclass(frozen=True)
class Setup:
  """Every section of a config, validated before anything touches a device."""
  model: FlamingoConfig
  train: TrainConfig
  optim: optim.OptimConfig
  mesh: sharding.MeshConfig
  checkpoint: ckpt_lib.CheckpointConfig
  distributed: distributed.DistributedConfig
  datasets: tuple  # train_data.DatasetSpec per dataset
  model_init: Mapping[str, str]
  image_size: int


def _section(config, name):
  return config.get(name) if name in config else None


def train_config(cfg: Any) -> TrainConfig:
  items = dict(cfg.items()) if cfg is not None else {}
  micro = items.pop("micro_batches", {}) or {}
  if not hasattr(micro, "items"):
    raise ValueError(f"config key 'train.micro_batches' must map dataset names to counts, "
                     f"got {micro!r}")
  c = from_config_dict(TrainConfig, items, "train")
  for name, k in micro.items():
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
      raise ValueError(f"config key 'train.micro_batches.{name}' must be a positive int, "
                       f"got {k!r}")
  c = dataclasses.replace(c, micro_batches=dict(micro))
  checks = [
      (c.input in ("synthetic", "pipeline"), "train.input", "'synthetic' or 'pipeline'"),
      (c.mixing in ("accumulate", "round_robin"), "train.mixing",
       "'accumulate' or 'round_robin'"),
      (c.frozen_dtype in ("bfloat16", "float32"), "train.frozen_dtype",
       "'bfloat16' or 'float32'"),
      (c.total_steps >= 1, "train.total_steps", "a positive int"),
      (c.log_every >= 1, "train.log_every", "a positive int"),
      (c.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", "a positive int"),
      (c.peak_flops_per_device >= 0, "train.peak_flops_per_device", ">= 0"),
  ]
  for ok, key, want in checks:
    if not ok:
      raise ValueError(f"config key {key!r} is {getattr(c, key.split('.')[1])!r}; "
                       f"expected {want}")
  return c


def dataset_specs(config, train: TrainConfig, model: FlamingoConfig):
  """(specs, image size) from `synthetic` or, with train.input=pipeline, `data`."""
  if train.input == "synthetic":  # no `synthetic` section: the paper's mixture shapes
    return train_data.synthetic_specs(_section(config, "synthetic")), model.vision.image_size
  from flamingo_jax.data.config import data_config
  data = data_config(config)
  specs = [train_data.DatasetSpec(name=n, kind=d.kind, batch_size=d.batch_size,
                                  seq_len=d.seq_len, max_images=d.max_images,
                                  num_frames=d.num_frames, weight=d.weight)
           for n, d in data.datasets.items()]
  return specs, data.image.size


def with_default_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the trainer's sections (and keys) a config leaves out, with their
  defaults, so that `--config.mesh.tensor=16` works on a model-only config
  (configs/flamingo_*.py) and config.json shows every value the run used."""
  defaults = {
      "train": TrainConfig(), "optim": optim.OptimConfig(), "mesh": sharding.MeshConfig(),
      "checkpoint": ckpt_lib.CheckpointConfig(), "distributed": distributed.DistributedConfig(),
  }
  config = ml_collections.ConfigDict(config)
  with config.unlocked():
    for name, value in defaults.items():
      section = dataclasses.asdict(value)
      if name == "mesh":
        section["rules"] = [list(rule) for rule in section["rules"]]
      if name not in config:
        config[name] = ml_collections.ConfigDict(section)
      else:  # keys the config leaves out get their defaults too
        for key, default in section.items():
          if key not in config[name]:
            config[name][key] = default
    if "model_init" not in config:
      config.model_init = ml_collections.ConfigDict()
    if config.train.input == "synthetic" and "synthetic" not in config:
      config.synthetic = ml_collections.ConfigDict({"datasets": {
          d.name: {k: getattr(d, k) for k in train_data.SYNTHETIC_KEYS}
          for d in train_data.PAPER_MIXTURE}})
  return config


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Parses and cross-checks every section; errors name the offending key."""
  model = model_config(config)
  train = train_config(_section(config, "train"))
  specs, image_size = dataset_specs(config, train, model)
  names = {s.name for s in specs}
  for name in train.micro_batches:
    if name not in names:
      raise ValueError(f"config key 'train.micro_batches.{name}' names no dataset; datasets: "
                       f"{sorted(names)}")
  if train.input == "pipeline" and model.vision.name == "none":
    raise ValueError("train.input is 'pipeline' (images) but model.vision.name is 'none' "
                     "(precomputed features): only train.input='synthetic' makes features")
  model_init = dict(_section(config, "model_init") or {})
  for comp, path in model_init.items():
    if comp not in COMPONENTS:
      raise ValueError(f"config key 'model_init.{comp}' is not a component; expected one of "
                       f"{list(COMPONENTS)}")
    if not isinstance(path, str) or not path:
      raise ValueError(f"config key 'model_init.{comp}' must be a checkpoint directory")
  return Setup(
      model=model, train=train, optim=optim.optim_config(_section(config, "optim")),
      mesh=sharding.mesh_config(_section(config, "mesh")),
      checkpoint=ckpt_lib.checkpoint_config(_section(config, "checkpoint")),
      distributed=distributed.distributed_config(_section(config, "distributed")),
      datasets=tuple(specs), model_init=model_init, image_size=image_size)


# --------------------------------------------------------------------------
# Helpers of main(), in the order it uses them


def code_version() -> str:
  """`git describe` of the source tree when available."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                         capture_output=True, text=True, timeout=10)
    if out.returncode == 0 and out.stdout.strip():
      return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  import flamingo_jax
  return f"flamingo_jax {flamingo_jax.__version__} (no git revision)"


def init_inputs(model: FlamingoConfig) -> dict:
  """Smallest inputs that create every parameter."""
  if model.vision.name == "none":
    return {"visual_features": jnp.zeros((1, 1, 1, 4, model.vision_feature_dim), jnp.float32)}
  size = model.vision.image_size
  return {"images": jnp.zeros((1, 1, 1, size, size, 3), jnp.float32)}


def abstract_batch(spec: train_data.DatasetSpec, model: FlamingoConfig, image_size: int,
                   feature_positions: int) -> dict:
  """ShapeDtypeStructs of one dataset's global batch."""
  b, length, n, t = spec.batch_size, spec.seq_len, spec.max_images, spec.num_frames
  sds = jax.ShapeDtypeStruct
  out = {"tokens": sds((b, length), jnp.int32), "targets": sds((b, length), jnp.int32),
         "loss_mask": sds((b, length), jnp.float32), "image_count": sds((b,), jnp.int32),
         "next_image": sds((b,), jnp.bool_)}
  if model.vision.name == "none":
    out["visual_features"] = sds((b, n, t, feature_positions, model.vision_feature_dim),
                                 jnp.float32)
  else:
    out["images"] = sds((b, n, t, image_size, image_size, 3), jnp.float32)
  return out


def process_rows(mesh, global_batch: int) -> tuple[int, int]:
  """The contiguous rows of a global batch that this process's devices hold."""
  index = NamedSharding(mesh, P(sharding.BATCH_AXES)).addressable_devices_indices_map(
      (global_batch,))
  rows = sorted({r for (sl,) in index.values() for r in range(*sl.indices(global_batch))})
  if rows != list(range(rows[0], rows[-1] + 1)):
    raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}; "
                     "order the mesh devices by process")
  return rows[0], rows[-1] + 1


def put_batch(local: Mapping[str, np.ndarray], abstract: Mapping, shardings: Mapping,
              dataset: str, rows: tuple[int, int]) -> dict:
  """This process's numpy rows -> global sharded arrays, checking the batch contract."""
  out = {}
  for key, want in abstract.items():
    if key not in local:
      raise ValueError(f"dataset {dataset!r} batch has no {key!r}; it has {sorted(local)}")
    x = np.asarray(local[key])
    if x.shape[:1] != (rows[1] - rows[0],):
      raise ValueError(f"dataset {dataset!r} batch[{key!r}] has {x.shape[0] if x.ndim else 0} "
                       f"rows; this process feeds rows {rows[0]}..{rows[1] - 1} of the global "
                       f"batch of {want.shape[0]}")
    if x.shape[1:] != want.shape[1:] or x.dtype != want.dtype:
      raise ValueError(f"dataset {dataset!r} batch[{key!r}] is {x.dtype}{list(x.shape)}; "
                       f"expected {np.dtype(want.dtype)}[B, {', '.join(map(str, want.shape[1:]))}]"
                       f" (global B = {want.shape[0]})")
    out[key] = jax.make_array_from_process_local_data(shardings[key], x, want.shape)
  return out


class StopSignal:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.received: Optional[int] = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signum
    log.warning("received %s: saving a checkpoint after this step, then exiting",
                signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self) -> bool:
    """True on every process once any process got a signal (same step everywhere)."""
    flag = self.received is not None
    if jax.process_count() > 1:
      flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
    return flag


def make_init_params(model: Flamingo, model_cfg: FlamingoConfig, frozen_dtype):
  """rng -> (trainable params in float32, frozen params in frozen_dtype)."""

  def init_params(rng):
    params = nn.unbox(model.init(rng, jnp.zeros((1, 4), jnp.int32), **init_inputs(model_cfg))
                      ["params"])
    trainable, frozen = optim.split_params(params, model_cfg)
    return optim.cast_tree(trainable, jnp.float32), optim.cast_tree(frozen, frozen_dtype)

  return init_params


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Shapes and shardings of everything the step touches, nothing allocated."""
  train_abs: Any  # trainable params (ShapeDtypeStruct tree)
  frozen_abs: Any  # frozen params
  state_abs: Any  # objective.init_state(...) tree
  state_sh: Any  # NamedSharding trees, same structures
  frozen_sh: Any
  grad_sh: Any  # accumulated-gradient layout under ZeRO-1, else None
  param_specs: Any  # PartitionSpec per parameter (full tree), for logs and golden files


def state_layout(model: Flamingo, model_cfg: FlamingoConfig, tx, mesh, mesh_cfg,
                 frozen_dtype=jnp.bfloat16) -> StateLayout:
  """eval_shape of init -> logical axes -> mesh shardings (rules, fallback, ZeRO-1)."""
  init_params = make_init_params(model, model_cfg, frozen_dtype)
  with jax.set_mesh(mesh):
    boxed = jax.eval_shape(
        lambda r: model.init(r, jnp.zeros((1, 4), jnp.int32), **init_inputs(model_cfg))
        ["params"], jax.random.key(0))
  param_specs = sharding.param_specs(boxed, mesh, mesh_cfg)
  train_specs, frozen_specs = optim.split_params(param_specs, model_cfg)
  train_abs, frozen_abs = jax.eval_shape(init_params, jax.random.key(0))
  state_abs = jax.eval_shape(lambda p: objective.init_state(p, tx, jax.random.key(0)), train_abs)
  zero1 = (lambda spec, shape: sharding.zero1_spec(spec, shape, mesh)) if mesh_cfg.zero1 else None
  opt_specs = optim.state_specs(state_abs["opt_state"], train_abs, train_specs, zero1)
  state_specs = {k: P() for k in state_abs}
  state_specs.update(params=train_specs, opt_state=opt_specs)
  grad_sh = None
  if mesh_cfg.zero1:
    grad_sh = sharding.named(mesh, jax.tree.map(
        lambda spec, a: sharding.zero1_spec(spec, a.shape, mesh), train_specs, train_abs,
        is_leaf=lambda x: isinstance(x, P)))
  return StateLayout(train_abs=train_abs, frozen_abs=frozen_abs, state_abs=state_abs,
                     state_sh=sharding.named(mesh, state_specs),
                     frozen_sh=sharding.named(mesh, frozen_specs), grad_sh=grad_sh,
                     param_specs=param_specs)


def memory_report(compiled, state_abs, state_sh, frozen_abs, frozen_sh) -> dict:
  """Bytes per device: parameters, optimizer state (from shardings), compiled buffers."""
  report = {
      "trainable_params": sharding.bytes_per_device(state_abs["params"], state_sh["params"]),
      "optimizer_state": sharding.bytes_per_device(state_abs["opt_state"],
                                                   state_sh["opt_state"]),
      "frozen_params": sharding.bytes_per_device(frozen_abs, frozen_sh),
  }
  mem = compiled.memory_analysis()
  if mem is not None:
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes"):
      report[key.replace("_size_in_bytes", "")] = int(getattr(mem, key, 0) or 0)
    report["peak_estimate"] = (report.get("argument", 0) + report.get("output", 0)
                               - report.get("alias", 0) + report.get("temp", 0))
  return report


def _gib(n: int) -> str:
  return f"{n / 2 ** 30:.3f} GiB"


# --------------------------------------------------------------------------
# main


def run(config: ml_collections.ConfigDict, workdir: str, *, compile_only: bool = False,
        stop_at: Optional[int] = None, devices: Optional[Sequence[jax.Device]] = None,
        on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
  """Trains (or, with compile_only, only compiles) and returns a summary.

  stop_at: stop after this step with a checkpoint, as a preemption would.
  on_step(step, metrics): called on the host for every finished step.
  devices: the devices of the mesh (default: all).
  Returns {'step', 'stopped', 'history': [metrics per step], 'memory', 'flops'}.
  """
  # ------------------------------------------------------------------ Config
  config = with_default_sections(config)
  s = setup(config)
  distributed.initialize(s.distributed)
  is_main = jax.process_index() == 0
  names = [d.name for d in s.datasets]
  weights = {d.name: d.weight for d in s.datasets}
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
  rules = s.mesh.rules
  log.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size,
           jax.process_count())

  # ------------------------------------------------------------------ Model, optimizer
  model = Flamingo(s.model)
  schedule = optim.learning_rate_schedule(s.optim, total_steps)
  tx = optim.make_optimizer(s.optim, s.model, total_steps)
  frozen_dtype = jnp.dtype(s.train.frozen_dtype)

  init_params = make_init_params(model, s.model, frozen_dtype)

  # ------------------------------------------------------------------ Abstract state, shardings
  lay = state_layout(model, s.model, tx, mesh, s.mesh, frozen_dtype)
  train_abs, frozen_abs, state_abs = lay.train_abs, lay.frozen_abs, lay.state_abs
  state_sh, frozen_sh, grad_sh = lay.state_sh, lay.frozen_sh, lay.grad_sh
  if is_main:  # parameter -> PartitionSpec, so a change of layout is a visible diff
    with open(os.path.join(workdir, "shardings.json"), "w") as f:
      json.dump({"mesh": dict(mesh.shape), "params": sharding.describe(lay.param_specs)}, f,
                indent=1, sort_keys=True)
  n_train = sum(x.size for x in jax.tree.leaves(train_abs))
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen_abs))
  log.info("parameters: %s trainable (float32), %s frozen (%s)", f"{n_train:,}",
           f"{n_frozen:,}", frozen_dtype.name)

  # ------------------------------------------------------------------ Input shapes
  shards = sharding.batch_shards(mesh)
  for d in s.datasets:
    k = s.train.micro_batches.get(d.name, 1)
    if d.batch_size % (shards * k):
      raise ValueError(
          f"dataset {d.name!r}: batch_size {d.batch_size} must be divisible by the "
          f"{shards} data-parallel devices (mesh slice*data*fsdp) times its "
          f"{k} micro-batches (train.micro_batches.{d.name})")
  section = _section(config, "synthetic") or {}
  feature_positions = int(section.get("feature_positions", 16)) if hasattr(section, "get") else 16
  batch_abs = {d.name: abstract_batch(d, s.model, s.image_size, feature_positions)
               for d in s.datasets}
  batch_sh = {n: {k: NamedSharding(mesh, sharding.batch_spec(len(a.shape)))
                  for k, a in b.items()} for n, b in batch_abs.items()}
  shapes = {d.name: flops.BatchShape(
      d.batch_size, d.seq_len, d.max_images, d.num_frames,
      image_size=0 if s.model.vision.name == "none" else s.image_size,
      feature_positions=feature_positions if s.model.vision.name == "none" else 0)
            for d in s.datasets}

  # ------------------------------------------------------------------ Compile the update step
  grad_fn = objective.make_grad_fn(
      model, weights=weights, micro_batches=s.train.micro_batches,
      train_vision="vision" not in s.model.frozen, mesh=mesh)
  step_fn = objective.make_train_step(grad_fn, tx, schedule, grad_sh)
  variants = [tuple(names)] if s.train.mixing == "accumulate" else [(n,) for n in names]
  compiled, memory, step_flops = {}, {}, {}
  state_in = sharding.with_shardings(state_abs, state_sh)
  frozen_in = sharding.with_shardings(frozen_abs, frozen_sh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for variant in variants:
      t0 = time.perf_counter()
      jitted = jax.jit(
          step_fn, donate_argnums=(0,),
          in_shardings=(state_sh, frozen_sh, {n: batch_sh[n] for n in variant}),
          out_shardings=(state_sh, sharding.replicated(mesh)))
      lowered = jitted.lower(state_in, frozen_in, {
          n: sharding.with_shardings(batch_abs[n], batch_sh[n]) for n in variant})
      compiled[variant] = lowered.compile()
      memory["+".join(variant)] = memory_report(compiled[variant], state_abs, state_sh,
                                                frozen_abs, frozen_sh)
      step_flops[variant] = flops.step_flops(s.model, [shapes[n] for n in variant],
                                             num_params=n_train + n_frozen)
      log.info("compiled the step for %s in %.1f s; memory per device: %s", "+".join(variant),
               time.perf_counter() - t0,
               {k: _gib(v) for k, v in memory["+".join(variant)].items()})
  summary = {"step": None, "stopped": None, "history": [], "memory": memory,
             "flops": {"+".join(v): f for v, f in step_flops.items()}}
  if compile_only:
    return summary

  # ------------------------------------------------------------------ Input pipeline
  rows = {d.name: process_rows(mesh, d.batch_size) for d in s.datasets}
  if s.train.input == "synthetic":
    iterators = train_data.synthetic_iterators(section, list(s.datasets), s.model, rows)
  else:
    iterators = pipeline_iterators(config, rows)

  # ------------------------------------------------------------------ Initialise or restore
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), s.checkpoint)
  latest = checkpointer.latest_step() if s.checkpoint.enabled else None
  frozen_components = sorted({component_of(k) for k in frozen_abs})
  frozen_dirs = {c: s.model_init.get(c) or os.path.join(workdir, "frozen", c)
                 for c in frozen_components}
  to_init = [c for c in frozen_components
             if c not in s.model_init and not (s.checkpoint.enabled and
                                               ckpt_lib.params_exist(frozen_dirs[c]))]
  if latest is not None and to_init:
    raise ValueError(f"workdir has checkpoint {latest} but no weights for the frozen "
                     f"components {to_init}: set model_init.<component> or restore "
                     f"{workdir}/frozen/")
  # Trainable components come from the checkpoint, else model_init, else init.
  train_components = sorted({component_of(k) for k in train_abs})
  train_init = [] if latest is not None else [c for c in train_components if c in s.model_init]
  needed_train = [] if latest is not None else ckpt_lib.top_keys_of(
      train_abs, [c for c in train_components if c not in train_init])
  needed_frozen = ckpt_lib.top_keys_of(frozen_abs, to_init)
  init_out_sh = (state_sh, {k: frozen_sh[k] for k in needed_frozen})

  # One jitted function makes the fresh state and the frozen weights no
  # checkpoint provides; XLA prunes everything else, so a frozen LM loaded
  # from disk is never randomly initialised.
  def init_fresh(rng, loaded):
    init_rng, state_rng = jax.random.split(rng)
    trainable, frozen = init_params(init_rng)
    params = {k: trainable[k] for k in needed_train}
    params.update(loaded)
    return objective.init_state(params, tx, state_rng), {k: frozen[k] for k in needed_frozen}

  t0 = time.perf_counter()
  loaded = {}
  for c in train_init:
    log.info("trainable %s: initialising from %s", c, s.model_init[c])
    target = sharding.with_shardings(ckpt_lib.component_tree(train_abs, c),
                                     ckpt_lib.component_tree(state_sh["params"], c))
    loaded = ckpt_lib.with_component(loaded, c, ckpt_lib.restore_component(
        s.model_init[c], c, target))
  state, frozen = None, {}
  if latest is None:  # (resuming needs no init: every frozen component exists on disk)
    # Init runs once: on CPU, optimising its PRNG code costs more than it saves.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    with jax.set_mesh(mesh):
      state, frozen = jax.jit(init_fresh, out_shardings=init_out_sh, compiler_options=options)(
          jax.random.key(s.train.seed), loaded)
  frozen = dict(frozen)
  for c in frozen_components:
    if c in to_init:
      log.info("frozen %s: random init (no model_init.%s)", c, c)
      if s.checkpoint.enabled:  # so that a resumed run finds the same weights
        ckpt_lib.save_params(frozen_dirs[c], ckpt_lib.component_tree(frozen, c), {"component": c})
    else:
      log.info("frozen %s: loading %s", c, frozen_dirs[c])
      target = sharding.with_shardings(ckpt_lib.component_tree(frozen_abs, c),
                                       ckpt_lib.component_tree(frozen_sh, c))
      frozen = ckpt_lib.with_component(frozen, c, ckpt_lib.restore_component(
          frozen_dirs[c], c, target))
  if latest is not None:
    log.info("resuming from %s/checkpoints/%d", workdir, latest)
    state, data_states = checkpointer.restore(latest, state_in)
    for name, it in iterators.items():
      if name not in data_states:
        raise ValueError(f"checkpoint {latest} has no data state for dataset {name!r} "
                         f"(it has {sorted(data_states)})")
      it.set_state(data_states[name])
  log.info("state ready in %.1f s", time.perf_counter() - t0)

  # ------------------------------------------------------------------ Loop
  writer = MetricsWriter(workdir, enabled=is_main)
  writer.write_text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
  peak = s.train.peak_flops_per_device or flops.peak_flops_per_device() or \
      flops.measure_peak_flops(s.model.dtype, size=1024)
  step = int(jax.device_get(state["step"]))
  history, pending, saved = [], None, set(checkpointer.all_steps())
  last_log_time, last_log_step, last_cpu = time.perf_counter(), step, time.process_time()
  stopped = None

  def handle(done_step, metrics, variant):
    """Host side of a finished step: counters, history, logs (one step behind)."""
    nonlocal last_log_time, last_log_step, last_cpu
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    history.append(metrics)
    metrics["step"] = done_step
    if on_step is not None:  # progress bars (the demo)
      on_step(done_step, metrics)
    if metrics["nonfinite_consecutive"] >= s.train.max_consecutive_nonfinite:
      raise FloatingPointError(
          f"{int(metrics['nonfinite_consecutive'])} consecutive updates had non-finite "
          f"gradients or loss (train.max_consecutive_nonfinite="
          f"{s.train.max_consecutive_nonfinite}); stopping at step {done_step}. Parameters "
          f"are those of the last finite update; {int(metrics['nonfinite_total'])} updates "
          "were skipped in total. Check the data and the learning rate.")
    if metrics["update_skipped"]:
      log.warning("step %d: non-finite gradient, update skipped (%d in a row, %d in total)",
                  done_step, int(metrics["nonfinite_consecutive"]),
                  int(metrics["nonfinite_total"]))
    if done_step % s.train.log_every and done_step != total_steps:
      return
    now, cpu = time.perf_counter(), time.process_time()
    dt = (now - last_log_time) / max(done_step - last_log_step, 1)
    # Host CPU seconds per step: on a CPU backend the compute itself; on
    # accelerators a high value flags an input-bound run.
    metrics["host_cpu_time"] = (cpu - last_cpu) / max(done_step - last_log_step, 1)
    f = step_flops[variant]
    tokens = f["text_tokens"]
    metrics.update(step_time=dt, tokens_per_second=tokens / dt,
                   mfu=f["frozen_aware"] / dt / (peak * mesh.size),
                   mfu_all_3x=f["all_3x"] / dt / (peak * mesh.size))
    if is_main:
      log.info(progress_line(done_step, total_steps, metrics, dt, metrics["mfu"]))
    writer.write(done_step, {k: v for k, v in metrics.items() if k != "step"})
    last_log_time, last_log_step, last_cpu = now, done_step, cpu

  try:
    with StopSignal() as stop:
      while step < total_steps:
        variant = variants[0] if len(variants) == 1 else variants[step % len(variants)]
        batches = {n: put_batch(next(iterators[n]), batch_abs[n], batch_sh[n], n, rows[n])
                   for n in variant}
        with jax.transfer_guard("disallow"):
          state, metrics = compiled[variant](state, frozen, batches)
        step += 1
        if pending is not None:
          handle(*pending)
        pending = (step, metrics, variant)
        halt = step == stop_at or stop.agreed()
        if s.checkpoint.enabled and step not in saved and (
            checkpointer.due(step) or halt or step == total_steps):
          checkpointer.save(step, state, {n: it.get_state() for n, it in iterators.items()})
          saved.add(step)
        if halt:
          stopped = "signal" if stop.received is not None else "stop_at"
          break
      if pending is not None:
        handle(*pending)
      if stopped is None and s.train.export_dir and step == total_steps:
        export_model(s, config, state["params"], frozen)
  finally:
    checkpointer.close()
    writer.close()
  if stopped == "signal":
    log.warning("stopped by a signal at step %d; checkpoint saved, resume with the same "
                "command", step)
  summary.update(step=step, stopped=stopped or "done", history=history)
  return summary


def export_model(s: Setup, config, trainable: Mapping, frozen: Mapping) -> None:
  """Writes train.export_dir: every weight in float32 (gathered to the host), the
  model config and the data tokenizer, as `flamingo_jax.generate` reads them."""
  from flamingo_jax.model_dir import export_model_dir
  def host(a):
    if jax.process_count() > 1:  # shards live on other hosts too
      return np.asarray(multihost_utils.process_allgather(a, tiled=True), np.float32)
    return np.asarray(jax.device_get(a), np.float32)

  params = jax.tree.map(host, {**dict(trainable), **dict(frozen)})
  tokenizer = None
  if s.train.input == "pipeline":
    from flamingo_jax.data.config import data_config
    tokenizer = data_config(config).tokenizer or None
  if jax.process_index() == 0:
    export_model_dir(s.train.export_dir, s.model, params, tokenizer)
  log.info("exported the model to %s", s.train.export_dir)


def pipeline_iterators(config, rows: Mapping[str, tuple[int, int]]):
  """The grain pipelines of flamingo_jax.data (train.input = 'pipeline', reads config.data)."""
  from flamingo_jax.data import make_train_iterators
  return make_train_iterators(config, rows=rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = split_config_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="configs/X.py[:arg]")
  parser.add_argument("--workdir", required=True, help="checkpoints, logs and metrics go here")
  parser.add_argument("--compile_only", action="store_true",
                      help="lower and compile the step for the configured mesh, print memory "
                           "per device and exit")
  parser.add_argument("--fake_devices", type=int, default=0,
                      help="run on this many fake CPU devices (with --compile_only: check "
                           "that a config fits a topology without the hardware)")
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
  config = apply_overrides(with_default_sections(load_config(args.config)), overrides)
  summary = run(config, args.workdir, compile_only=args.compile_only, stop_at=args.stop_at)
  if args.compile_only:
    print(json.dumps({"memory_per_device": summary["memory"],
                      "flops_per_step": {k: {n: v for n, v in f.items() if n != "by_component"}
                                         for k, f in summary["flops"].items()}}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
