"""Trains Flamingo: frozen vision encoder and LM, trained resampler and cross-attention.

  python -m flamingo_jax.train --config configs/tiny.py --workdir /tmp/tiny
  python -m flamingo_jax.train --config configs/flamingo_3b.py:local --workdir /tmp/3b_local
  python -m flamingo_jax.train --config configs/flamingo_9b.py --workdir gs://b/run \
      --config.mesh.tensor=16 --compile_only --fake_devices=256

run() reads top to bottom: config, distributed start-up, workdir, mesh, model
and optimizer, abstract state and its shardings, input shapes, input pipeline
and weights checked, initialise-or-restore, the compiled update step, the loop (the training
library, flamingo_jax/training/). Resume order: this workdir's latest
checkpoint, else `model_init` (pretrained components), else random init.
Every option is in docs/training.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from flamingo_jax.trainers.flamingo import components
from flamingo_jax.runtime import params_io
from flamingo_jax.config import from_config_dict, with_defaults
from flamingo_jax.models.config import (COMPONENTS, FlamingoConfig, model_config,
                                        xattn_layer_indices)
from flamingo_jax.data import in_memory
from flamingo_jax.data.config import DataConfig, DatasetConfig, data_config
from flamingo_jax.errors import CheckpointError, ConfigError, DataError, one_line, run_cli
from flamingo_jax.model_dir import check_tokenizer, export_model_dir, init_inputs
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.models.labels import component_of
from flamingo_jax.training import checkpoint as ckpt_lib
from flamingo_jax.training import cli, objective, optim
from flamingo_jax.runtime import distributed
from flamingo_jax.trainers.flamingo import flops
from flamingo_jax.runtime import sharding
from flamingo_jax.training import state as state_lib
from flamingo_jax.training.loop import (LoopConfig, StepHandler, batch_shardings,
                                        check_batch_sizes, check_loop_config, pipeline_stats,
                                        prepare_workdir, process_rows, put_batch, run_loop)
from flamingo_jax.training.metrics import MetricsWriter
from flamingo_jax.training.prefetch import Prefetcher

log = logging.getLogger("flamingo_jax.trainers.flamingo.train")


# --------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class TrainConfig(LoopConfig):
  """`train` section of a config."""
  input: str = "synthetic"  # synthetic (data/in_memory.py) | pipeline (flamingo_jax.data)
  mixing: str = "accumulate"  # accumulate (paper) | round_robin (one dataset per step)
  micro_batches: Mapping[str, int] = dataclasses.field(default_factory=dict)
  frozen_dtype: str = "bfloat16"  # storage of frozen weights: bfloat16 | float32
  peak_flops_per_device: float = 0.0  # MFU denominator; 0: datasheet, else a measured matmul
  # At the end of the run, write the whole model (trainable + frozen weights,
  # model_config.json and, with train.input='pipeline', the data tokenizer) as
  # a model directory that `python -m flamingo_jax.generate` and evaluation load.
  export_dir: str = ""


# Sections every Flamingo config has once defaults are filled (before overrides).
SECTIONS = {"train": TrainConfig, "optim": optim.OptimConfig, **cli.RUN_SECTIONS}
# Dict-valued fields: dotted overrides add keys (--config.model_init.lm=PATH).
OPEN_KEYS = ("model_init", "train.micro_batches")


@dataclasses.dataclass(frozen=True)
class Setup:
  """Every section of a config, validated once, before anything touches a device."""
  model: FlamingoConfig
  train: TrainConfig
  optim: optim.OptimConfig
  mesh: sharding.MeshConfig
  checkpoint: ckpt_lib.CheckpointConfig
  distributed: distributed.DistributedConfig
  datasets: tuple  # in_memory.DatasetSpec per dataset
  model_init: Mapping[str, str]
  image_size: int
  synthetic: Optional[in_memory.SyntheticConfig]  # train.input = 'synthetic'
  data: Optional[DataConfig]  # train.input = 'pipeline'


def train_config(cfg: Any) -> TrainConfig:
  items = dict(cfg.items()) if cfg is not None else {}
  micro = items.pop("micro_batches", {}) or {}
  if not hasattr(micro, "items"):
    raise ConfigError(f"config key 'train.micro_batches' must map dataset names to counts, "
                      f"got {micro!r}")
  c = from_config_dict(TrainConfig, items, "train")
  for name, k in micro.items():
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
      raise ConfigError(f"config key 'train.micro_batches.{name}' must be a positive int, "
                        f"got {k!r}")
  c = dataclasses.replace(c, micro_batches=dict(micro))
  check_loop_config(c)
  for ok, key, want in [
      (c.input in ("synthetic", "pipeline"), "input", "'synthetic' or 'pipeline'"),
      (c.mixing in ("accumulate", "round_robin"), "mixing", "'accumulate' or 'round_robin'"),
      (c.frozen_dtype in ("bfloat16", "float32"), "frozen_dtype", "'bfloat16' or 'float32'"),
      (c.peak_flops_per_device >= 0, "peak_flops_per_device", ">= 0")]:
    if not ok:
      raise ConfigError(f"config key 'train.{key}' is {getattr(c, key)!r}; expected {want}")
  return c


def with_default_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the sections (and keys) a config leaves out, with their defaults, so that
  `--config.mesh.tensor=16` works on any config and config.json shows every value."""
  config = ml_collections.ConfigDict(config)
  defaults = {name: cls() for name, cls in SECTIONS.items()}
  defaults["model_init"] = {}
  train_input = config.train.get("input", "synthetic") if "train" in config else "synthetic"
  if train_input == "synthetic" and "synthetic" in config:
    defaults["synthetic"] = in_memory.SyntheticConfig()
  if train_input == "pipeline" and "data" in config:  # --config.data.worker_count=8 etc.
    names = list(config.data.get("datasets", None) or {})
    defaults["data"] = {**dataclasses.asdict(DataConfig()), "datasets": {
        n: dataclasses.asdict(DatasetConfig()) for n in names}}
  return with_defaults(config, defaults)


def _section(config, name):
  return config.get(name) if name in config else None


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Parses and cross-checks every section once; errors name the offending key."""
  model = model_config(config)
  train = train_config(_section(config, "train"))
  synthetic = data = None
  if train.input == "synthetic":
    if _section(config, "synthetic") is None:
      raise ConfigError("train.input is 'synthetic' but the config has no 'synthetic' "
                        "section (synthetic.datasets gives each dataset's batch shape)")
    synthetic = in_memory.synthetic_config(config.synthetic)
    specs, image_size = list(synthetic.datasets.values()), model.vision.image_size
  else:
    data = data_config(config)
    specs = [in_memory.DatasetSpec(name=n, kind=d.kind, batch_size=d.batch_size,
                                   seq_len=d.seq_len, max_images=d.max_images,
                                   num_frames=d.num_frames, weight=d.weight)
             for n, d in data.datasets.items()]
    image_size = data.image.size
  names = {s.name for s in specs}
  # A recipe's micro-batch counts may name datasets of its other input section
  # (a fit check on a subset of the synthetic mixture); a typo is still an error.
  other = _section(config, "data" if train.input == "synthetic" else "synthetic")
  known = names | set((other.get("datasets", None) or {}) if other is not None else {})
  for name in train.micro_batches:
    if name not in known:
      raise ConfigError(f"config key 'train.micro_batches.{name}' names no dataset; datasets: "
                        f"{sorted(names)}")
  if train.input == "pipeline" and model.vision.name == "none":
    raise ConfigError("train.input is 'pipeline' (images) but model.vision.name is 'none' "
                      "(precomputed features): only train.input='synthetic' makes features")
  model_init = dict(_section(config, "model_init") or {})
  for comp, path in model_init.items():
    if comp not in COMPONENTS:
      raise ConfigError(f"config key 'model_init.{comp}' is not a component; expected one of "
                        f"{list(COMPONENTS)}")
    if not isinstance(path, str) or not path:
      raise ConfigError(f"config key 'model_init.{comp}' must be a checkpoint directory")
  return Setup(
      model=model, train=train, optim=optim.optim_config(_section(config, "optim")),
      mesh=sharding.mesh_config(_section(config, "mesh")),
      checkpoint=ckpt_lib.checkpoint_config(_section(config, "checkpoint")),
      distributed=distributed.distributed_config(_section(config, "distributed")),
      datasets=tuple(specs), model_init=model_init, image_size=image_size,
      synthetic=synthetic, data=data)


# --------------------------------------------------------------------------
# Model, state layout, batch shapes


def _init(model: Flamingo, model_cfg: FlamingoConfig) -> Callable:
  """rng -> boxed params, from the model directory's init inputs (one definition)."""
  inputs = init_inputs(model_cfg)
  tokens = inputs.pop("tokens")
  return lambda rng: model.init(rng, tokens, **inputs)["params"]


def make_init_params(model: Flamingo, model_cfg: FlamingoConfig, frozen_dtype):
  """rng -> (trainable params in float32, frozen params in frozen_dtype)."""
  init = _init(model, model_cfg)

  return lambda rng: split_and_cast(init(rng), model_cfg, frozen_dtype)


def split_and_cast(boxed: Any, model_cfg: FlamingoConfig, frozen_dtype) -> tuple[dict, dict]:
  """Boxed params (arrays or ShapeDtypeStructs) -> (trainable in float32, frozen in
  frozen_dtype)."""
  trainable, frozen = optim.split_params(nn.unbox(boxed), model_cfg)
  return optim.cast_tree(trainable, jnp.float32), optim.cast_tree(frozen, frozen_dtype)


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
  boxed = state_lib.boxed_params(_init(model, model_cfg), mesh)
  param_specs = sharding.param_specs(boxed, mesh, mesh_cfg)
  train_specs, frozen_specs = optim.split_params(param_specs, model_cfg)
  # the shapes of the one eval_shape above (tracing init again cost as much again)
  train_abs, frozen_abs = split_and_cast(boxed, model_cfg, frozen_dtype)
  ts = state_lib.train_state(train_abs, train_specs, tx, mesh, mesh_cfg)
  return StateLayout(train_abs=train_abs, frozen_abs=frozen_abs, state_abs=ts.abstract,
                     state_sh=ts.shardings, frozen_sh=sharding.named(mesh, frozen_specs),
                     grad_sh=ts.grad_shardings, param_specs=param_specs)


def abstract_batch(spec: in_memory.DatasetSpec, model: FlamingoConfig, image_size: int,
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


def memory_report(compiled, state_abs, state_sh, frozen_abs, frozen_sh) -> dict:
  """Bytes per device: parameters, optimizer state (from shardings), compiled buffers."""
  return state_lib.memory_report(compiled, {
      "trainable_params": (state_abs["params"], state_sh["params"]),
      "optimizer_state": (state_abs["opt_state"], state_sh["opt_state"]),
      "frozen_params": (frozen_abs, frozen_sh)})


# --------------------------------------------------------------------------
# Inputs and weights (checked before compiling), initialise or restore


def input_iterators(s: Setup, rows: Mapping[str, tuple[int, int]]) -> dict:
  """{dataset: iterator of this process's rows}: the in-memory data, or the grain
  pipelines with their tokenizer checked against the model first."""
  if s.synthetic is not None:
    return in_memory.synthetic_iterators(s.synthetic, s.model, rows)
  from flamingo_jax.data import make_train_iterators
  from flamingo_jax.data.tokenizer import Tokenizer
  if not s.data.tokenizer:
    raise ConfigError("config key 'data.tokenizer' is empty (train.input is 'pipeline')")
  try:
    tokenizer = Tokenizer.load(s.data.tokenizer)
  except (OSError, ValueError) as e:
    raise DataError(f"config key 'data.tokenizer': {one_line(e)}") from None
  check_tokenizer(s.model, tokenizer, f"data.tokenizer {s.data.tokenizer} vs the model config")
  return make_train_iterators(s.data, rows=rows, tokenizer=tokenizer)


def check_weights(s: Setup, workdir: epath.Path, lay: StateLayout) -> None:
  """Every model_init / workdir/frozen checkpoint holds the tensors the config makes,
  in its shapes (from the checkpoint metadata; no array is read)."""
  for comp, directory in sorted(s.model_init.items()):
    abstract = lay.frozen_abs if comp in s.model.frozen else lay.train_abs
    components.check_component(directory, comp, components.component_tree(abstract, comp),
                             f"model_init / frozen weights of {comp!r} (model_init.{comp})")
  for comp in sorted({component_of(k) for k in lay.frozen_abs} - set(s.model_init)):
    directory = str(workdir / "frozen" / comp)
    if s.checkpoint.enabled and params_io.params_exist(directory):
      components.check_component(directory, comp, components.component_tree(lay.frozen_abs, comp),
                               f"model_init / frozen weights of {comp!r}")



def frozen_weights(s: Setup, workdir: epath.Path, lay: StateLayout, mesh,
                   init_params: Callable, resuming: bool) -> dict:
  """Every frozen component: from model_init, else workdir/frozen/<c> (a previous run's
  random init), else a random init written there so a resumed run finds the same weights.
  One jitted function makes only the random ones (XLA prunes the rest)."""
  components = sorted({component_of(k) for k in lay.frozen_abs})
  dirs = {c: s.model_init.get(c) or str(workdir / "frozen" / c) for c in components}
  to_init = [c for c in components if c not in s.model_init and not (
      s.checkpoint.enabled and params_io.params_exist(dirs[c]))]
  if resuming and to_init:
    raise CheckpointError(f"workdir {workdir} has step checkpoints but no weights for the "
                          f"frozen components {to_init}: set model_init.<component> or "
                          f"restore {workdir}/frozen/")
  needed = components.top_keys_of(lay.frozen_abs, to_init)
  frozen = {}
  if needed:  # the init key of state_lib.fresh_state: trainable and frozen from one init
    frozen = dict(state_lib.init_once(
        lambda rng: {k: init_params(rng)[1][k] for k in needed}, mesh, s.mesh.rules,
        {k: lay.frozen_sh[k] for k in needed})(jax.random.split(jax.random.key(s.train.seed))[0]))
  for c in components:
    if c in to_init:
      log.info("frozen %s: random init (no model_init.%s)", c, c)
      if s.checkpoint.enabled:
        params_io.save_params(dirs[c], components.component_tree(frozen, c), {"component": c})
      continue
    log.info("frozen %s: loading %s", c, dirs[c])
    target = sharding.with_shardings(components.component_tree(lay.frozen_abs, c),
                                     components.component_tree(lay.frozen_sh, c))
    frozen = components.with_component(frozen, c, components.restore_component(dirs[c], c, target))
  return frozen


def initial_state(s: Setup, lay: StateLayout, tx, mesh, init_params: Callable) -> Any:
  """A fresh state: trainable components from model_init, the rest random."""
  loaded = {}
  train_components = sorted({component_of(k) for k in lay.train_abs})
  for c in [c for c in train_components if c in s.model_init]:
    log.info("trainable %s: initialising from %s", c, s.model_init[c])
    target = sharding.with_shardings(components.component_tree(lay.train_abs, c),
                                     components.component_tree(lay.state_sh["params"], c))
    loaded = components.with_component(loaded, c, components.restore_component(
        s.model_init[c], c, target))
  # The same key split as the frozen init: trainable and frozen come from one init.
  return state_lib.fresh_state(lambda rng: init_params(rng)[0], tx, s.train.seed, mesh,
                               s.mesh.rules, lay.state_sh, loaded)


# --------------------------------------------------------------------------
# The run


def run(config: ml_collections.ConfigDict, workdir: str, *, compile_only: bool = False,
        stop_at: Optional[int] = None, devices: Optional[Sequence[jax.Device]] = None,
        on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
  """Trains (or, with compile_only, only compiles) and returns a summary.

  stop_at: stop after this step with a checkpoint, as a preemption would.
  on_step(step, metrics): called on the host for every finished step.
  devices: the devices of the mesh (default: all).
  Returns {'step', 'stopped', 'history': [metrics per step], 'memory', 'flops'}.
  """
  # ------------------------------------------------------------------ Config, workdir, mesh
  config = with_default_sections(config)
  s = setup(config)
  distributed.initialize(s.distributed)
  is_main = jax.process_index() == 0
  names = [d.name for d in s.datasets]
  total_steps = s.train.total_steps
  workdir = prepare_workdir(workdir, config)
  mesh = sharding.make_mesh(s.mesh, devices)
  log.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size,
           jax.process_count())

  # ------------------------------------------------------------------ Model, optimizer, layout
  model = Flamingo(s.model)
  schedule = optim.learning_rate_schedule(s.optim, total_steps)
  tx = optim.make_optimizer(s.optim, s.model, total_steps)
  frozen_dtype = jnp.dtype(s.train.frozen_dtype)
  init_params = make_init_params(model, s.model, frozen_dtype)
  # --compile_only is a fit check that may take minutes: one line per phase on stderr
  phase = (lambda line: print(f"[compile_only] {line}", file=sys.stderr, flush=True)) \
      if compile_only else None
  t_layout = time.perf_counter()
  lay = state_layout(model, s.model, tx, mesh, s.mesh, frozen_dtype)
  if is_main:  # parameter -> PartitionSpec, so a change of layout is a visible diff
    (workdir / "shardings.json").write_text(json.dumps(
        {"mesh": dict(mesh.shape), "params": sharding.describe(lay.param_specs)}, indent=1,
        sort_keys=True))
  n_train = sum(x.size for x in jax.tree.leaves(lay.train_abs))
  n_frozen = sum(x.size for x in jax.tree.leaves(lay.frozen_abs))
  log.info("parameters: %s trainable (float32), %s frozen (%s)", f"{n_train:,}",
           f"{n_frozen:,}", frozen_dtype.name)
  if phase:
    phase(f"abstract state and shardings for {mesh.size} devices in "
          f"{time.perf_counter() - t_layout:.1f} s: {n_train:,} trainable, {n_frozen:,} frozen "
          f"parameters (scan_layers={s.model.scan_layers})")

  # ------------------------------------------------------------------ Input shapes
  prefix = ("synthetic" if s.synthetic else "data") + ".datasets.{name}.batch_size"
  check_batch_sizes({d.name: d.batch_size for d in s.datasets}, mesh, prefix,
                    s.train.micro_batches)
  positions = s.synthetic.feature_positions if s.synthetic else 0
  batch_abs = {d.name: abstract_batch(d, s.model, s.image_size, positions) for d in s.datasets}
  batch_sh = {n: batch_shardings(mesh, b) for n, b in batch_abs.items()}
  features = s.model.vision.name == "none"
  shapes = {d.name: flops.BatchShape(
      d.batch_size, d.seq_len, d.max_images, d.num_frames,
      image_size=0 if features else s.image_size,
      feature_positions=positions if features else 0) for d in s.datasets}

  # -------------------------------------------------------------- Inputs, checked before compiling
  # A wrong tokenizer, a missing shard or misshapen frozen weights fail here, in
  # seconds, not after the step has compiled.
  state_in = sharding.with_shardings(lay.state_abs, lay.state_sh)
  frozen_in = sharding.with_shardings(lay.frozen_abs, lay.frozen_sh)
  if not compile_only:
    rows = {d.name: process_rows(mesh, d.batch_size) for d in s.datasets}
    iterators = input_iterators(s, rows)
    check_weights(s, workdir, lay)

    # ---------------------------------------------------------------- Initialise or restore
    # Also before compiling: a corrupt or mismatched checkpoint is reported in seconds.
    t0 = time.perf_counter()
    checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), s.checkpoint)
    state = (state_lib.restore_latest(checkpointer, state_in, iterators)
             if s.checkpoint.enabled else None)
    frozen = frozen_weights(s, workdir, lay, mesh, init_params, resuming=state is not None)
    if state is None:
      state = initial_state(s, lay, tx, mesh, init_params)
    log.info("state ready in %.1f s", time.perf_counter() - t0)

  # ------------------------------------------------------------------ Compile the update step
  grad_fn = objective.make_grad_fn(
      model, weights={d.name: d.weight for d in s.datasets},
      micro_batches=s.train.micro_batches, train_vision="vision" not in s.model.frozen,
      mesh=mesh)
  step_fn = objective.make_train_step(grad_fn, tx, schedule, lay.grad_sh, xattn_layer_indices(
      s.model.lm.num_layers, s.model.xattn.every, s.model.xattn.placement))
  variants = [tuple(names)] if s.train.mixing == "accumulate" else [(n,) for n in names]
  compiled, memory, step_flops = {}, {}, {}
  for variant in variants:
    key = "+".join(variant)
    compiled[variant] = state_lib.compile_step(
        step_fn, mesh, s.mesh.rules,
        (lay.state_sh, lay.frozen_sh, {n: batch_sh[n] for n in variant}),
        (lay.state_sh, sharding.replicated(mesh)),
        (state_in, frozen_in,
         {n: sharding.with_shardings(batch_abs[n], batch_sh[n]) for n in variant}),
        what=f"the step for {key}", phase=phase, fit_check=compile_only)
    memory[key] = memory_report(compiled[variant], lay.state_abs, lay.state_sh, lay.frozen_abs,
                                lay.frozen_sh)
    step_flops[variant] = flops.step_flops(s.model, [shapes[n] for n in variant],
                                           num_params=n_train + n_frozen)
    if phase:
      phase(f"memory per device for {key}: " + ", ".join(
          f"{k} {state_lib.gib(v)}" for k, v in memory[key].items()))
    log.info("memory per device for %s: %s", key,
             {k: state_lib.gib(v) for k, v in memory[key].items()})
  summary = {"step": None, "stopped": None, "history": [], "memory": memory,
             "flops": {"+".join(v): f for v, f in step_flops.items()}}
  if compile_only:
    return summary


  # ------------------------------------------------------------------ Loop
  writer = MetricsWriter(workdir, enabled=is_main)
  writer.write_text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
  peak = s.train.peak_flops_per_device or flops.peak_flops_per_device() or \
      flops.measure_peak_flops(s.model.dtype, size=1024)

  def throughput(variant, dt):
    f = step_flops[variant]
    return {"tokens_per_second": f["text_tokens"] / dt,
            "mfu": f["frozen_aware"] / dt / (peak * mesh.size),
            "mfu_all_3x": f["all_3x"] / dt / (peak * mesh.size)}

  step = int(jax.device_get(state["step"]))
  # Batches are read and put on the devices ahead of the step, on a background
  # thread; checkpoints get the data state of the batches consumed (exact resume).
  prefetcher = Prefetcher(
      iterators, lambda n, b: put_batch(b, batch_abs[n], batch_sh[n], n, rows[n]),
      schedule=lambda i: variants[i % len(variants)], start_step=step, depth=2)

  def train_step(state, step):
    variant = variants[step % len(variants)]
    batches = next(prefetcher)
    with jax.transfer_guard("disallow"):
      state, metrics = compiled[variant](state, frozen, batches)
    return state, metrics, variant

  handler = StepHandler(total_steps=total_steps, log_every=s.train.log_every,
                        max_consecutive_nonfinite=s.train.max_consecutive_nonfinite,
                        writer=writer, start_step=step, on_step=on_step, throughput=throughput,
                        data_stats=lambda: pipeline_stats(iterators))
  try:
    state, step, stopped = run_loop(
        state, step=step, total_steps=total_steps, train_step=train_step, handler=handler,
        checkpointer=checkpointer if s.checkpoint.enabled else None,
        data_states=prefetcher.get_state,
        stop_at=stop_at)
    if stopped == "done" and s.train.export_dir:
      export_model(s, state["params"], frozen)
  finally:
    prefetcher.close()
    checkpointer.close()
    writer.close()
  summary.update(step=step, stopped=stopped, history=handler.history)
  return summary


def export_model(s: Setup, trainable: Mapping, frozen: Mapping) -> None:
  """Writes train.export_dir: every weight in float32 (gathered to the host), the
  model config and the data tokenizer, as `flamingo_jax.generate` reads them."""
  def host(a):
    if jax.process_count() > 1:  # shards live on other hosts too
      return np.asarray(multihost_utils.process_allgather(a, tiled=True), np.float32)
    return np.asarray(jax.device_get(a), np.float32)

  params = jax.tree.map(host, {**dict(trainable), **dict(frozen)})
  tokenizer = (s.data.tokenizer or None) if s.data is not None else None
  if jax.process_index() == 0:
    export_model_dir(s.train.export_dir, s.model, params, tokenizer)
  log.info("exported the model to %s", s.train.export_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, overrides = cli.parse_args(argv, __doc__, workdir_help="checkpoints, logs and metrics "
                                   "go here")
  config = cli.load(args.config, overrides, with_default_sections, OPEN_KEYS)
  summary = run(config, args.workdir, compile_only=args.compile_only, stop_at=args.stop_at)
  if args.compile_only:
    print(json.dumps({"memory_per_device": summary["memory"],
                      "flops_per_step": {k: {n: v for n, v in f.items() if n != "by_component"}
                                         for k, f in summary["flops"].items()}}, indent=2))
  return 0


def cli_main() -> int:
  """`python -m flamingo_jax.train`: exit status 0, or 2 with one `error:` line for bad input."""
  return run_cli(main)


if __name__ == "__main__":
  sys.exit(cli_main())
