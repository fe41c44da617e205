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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from flamingo_jax.config import check, choice
from flamingo_jax.data import in_memory
from flamingo_jax.data.config import DataConfig, DatasetConfig, data_config
from flamingo_jax.errors import CheckpointError, ConfigError, DataError, one_line, run_cli
from flamingo_jax.model_dir import check_tokenizer, export_model_dir
from flamingo_jax.models.config import COMPONENTS, FlamingoConfig, model_config
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.models.labels import component_of
from flamingo_jax.runtime import distributed, params_io, sharding
from flamingo_jax.trainers.flamingo import components, flops, objective
from flamingo_jax.trainers.flamingo.layout import (StateLayout, abstract_batch,
                                                   make_init_params, make_optimizer,
                                                   memory_report, state_layout)
from flamingo_jax.training import checkpoint as ckpt_lib
from flamingo_jax.training import cli, mfu, optim
from flamingo_jax.training import objective as step_lib
from flamingo_jax.training import state as state_lib
from flamingo_jax.training.loop import (LoopConfig, StepHandler, batch_shardings,
                                        check_batch_sizes, pipeline_stats, prepare_workdir,
                                        process_rows, put_batch, run_loop)
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


# This trainer's sections beside cli.RUN_SECTIONS (defaults filled before overrides).
SECTIONS = {"train": TrainConfig, "optim": optim.OptimConfig}
# Dict-valued fields: dotted overrides add keys (--config.model_init.lm=PATH).
OPEN_KEYS = ("model_init", "train.micro_batches")


@dataclasses.dataclass(frozen=True)
class Setup(cli.RunSetup):
  """Every section of a config, validated once, before anything touches a device."""
  model: FlamingoConfig
  train: TrainConfig
  optim: optim.OptimConfig
  datasets: tuple  # in_memory.DatasetSpec per dataset
  model_init: Mapping[str, str]
  image_size: int
  synthetic: Optional[in_memory.SyntheticConfig]  # train.input = 'synthetic'
  data: Optional[DataConfig]  # train.input = 'pipeline'


def train_config(config: Any) -> TrainConfig:
  """The validated `train` section of a config."""
  c = cli.train_section(config, TrainConfig)
  for name, k in c.micro_batches.items():
    check(k >= 1, f"config key 'train.micro_batches.{name}' must be a positive int, got {k!r}")
  choice(c.input, ("synthetic", "pipeline"), "train.input")
  choice(c.mixing, ("accumulate", "round_robin"), "train.mixing")
  choice(c.frozen_dtype, ("bfloat16", "float32"), "train.frozen_dtype")
  check(c.peak_flops_per_device >= 0, "config key 'train.peak_flops_per_device' is "
        f"{c.peak_flops_per_device!r}; expected >= 0")
  return c


def with_default_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the sections (and keys) a config leaves out, with their defaults, so that
  `--config.mesh.tensor=16` works on any config and config.json shows every value."""
  config = ml_collections.ConfigDict(config)
  extra = {"model_init": {}}
  train_input = config.train.get("input", "synthetic") if "train" in config else "synthetic"
  if train_input == "synthetic" and "synthetic" in config:
    extra["synthetic"] = in_memory.SyntheticConfig()
  if train_input == "pipeline" and "data" in config:  # --config.data.worker_count=8 etc.
    names = list(config.data.get("datasets", None) or {})
    extra["data"] = {**dataclasses.asdict(DataConfig()), "datasets": {
        n: dataclasses.asdict(DatasetConfig()) for n in names}}
  return cli.with_default_sections(config, SECTIONS, extra)


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`configs/X.py[:arg]`, defaults filled, then `--config.a.b=v` overrides: run's input."""
  return cli.load(spec, overrides, with_default_sections, OPEN_KEYS)


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Parses and cross-checks every section once; errors name the offending key."""
  model = model_config(config)
  train = train_config(config)
  synthetic = data = None
  if train.input == "synthetic":
    check(cli.section(config, "synthetic") is not None, "train.input is 'synthetic' but the "
          "config has no 'synthetic' section (synthetic.datasets gives each dataset's batch "
          "shape)")
    synthetic = in_memory.synthetic_config(config.synthetic)
    specs, image_size = list(synthetic.datasets.values()), model.vision.image_size
  else:
    data = data_config(config)
    specs = [in_memory.DatasetSpec.of(n, d) for n, d in data.datasets.items()]
    image_size = data.image.size
  names = {s.name for s in specs}
  # A recipe's micro-batch counts may name datasets of its other input section
  # (a fit check on a subset of the synthetic mixture); a typo is still an error.
  other = cli.section(config, "data" if train.input == "synthetic" else "synthetic")
  known = names | set((other.get("datasets", None) or {}) if other is not None else {})
  for name in train.micro_batches:
    check(name in known, f"config key 'train.micro_batches.{name}' names no dataset; "
          f"datasets: {sorted(names)}")
  check(train.input != "pipeline" or model.vision.name != "none", "train.input is "
        "'pipeline' (images) but model.vision.name is 'none' (precomputed features): only "
        "train.input='synthetic' makes features")
  model_init = dict(cli.section(config, "model_init") or {})
  for comp, path in model_init.items():
    choice(comp, COMPONENTS, f"model_init.{comp}")
    check(isinstance(path, str) and bool(path),
          f"config key 'model_init.{comp}' must be a checkpoint directory")
  return Setup(model=model, train=train, optim=optim.optim_config(cli.section(config, "optim")),
               datasets=tuple(specs), model_init=model_init, image_size=image_size,
               synthetic=synthetic, data=data, **cli.run_sections(config))


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
      components.check_component(directory, comp,
                                 components.component_tree(lay.frozen_abs, comp),
                                 f"model_init / frozen weights of {comp!r}")


def frozen_weights(s: Setup, workdir: epath.Path, lay: StateLayout, mesh,
                   init_params: Callable, resuming: bool) -> dict:
  """Every frozen component: from model_init, else workdir/frozen/<c> (a previous run's
  random init), else a random init written there so a resumed run finds the same weights.
  One jitted function makes only the random ones (XLA prunes the rest)."""
  names = sorted({component_of(k) for k in lay.frozen_abs})
  dirs = {c: s.model_init.get(c) or str(workdir / "frozen" / c) for c in names}
  to_init = [c for c in names if c not in s.model_init and not (
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
  for c in names:
    if c in to_init:
      log.info("frozen %s: random init (no model_init.%s)", c, c)
      if s.checkpoint.enabled:
        params_io.save_params(dirs[c], components.component_tree(frozen, c), {"component": c})
      continue
    log.info("frozen %s: loading %s", c, dirs[c])
    target = sharding.with_shardings(components.component_tree(lay.frozen_abs, c),
                                     components.component_tree(lay.frozen_sh, c))
    frozen = components.with_component(frozen, c,
                                       components.restore_component(dirs[c], c, target))
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

  config: as `load` returns it. stop_at: stop after this step with a checkpoint, as a
  preemption would. on_step(step, metrics): called on the host for every finished step.
  devices: the devices of the mesh (default: all).
  Returns {'step', 'stopped', 'history': [metrics per step], 'memory', 'flops'}.
  """
  # ------------------------------------------------------------------ Config, workdir, mesh
  s = setup(config)
  distributed.initialize(s.distributed)
  workdir = prepare_workdir(workdir, config)
  mesh = sharding.make_mesh(s.mesh, devices)
  log.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size,
           jax.process_count())

  # ------------------------------------------------------------------ Model, optimizer, layout
  model = Flamingo(s.model)
  tx = make_optimizer(s.optim, s.model, s.train.total_steps)
  frozen_dtype = jnp.dtype(s.train.frozen_dtype)
  init_params = make_init_params(model, s.model, frozen_dtype)
  # --compile_only is a fit check that may take minutes: one line per phase on stderr
  phase = (lambda line: print(f"[compile_only] {line}", file=sys.stderr, flush=True)) \
      if compile_only else None
  t_layout = time.perf_counter()
  lay = state_layout(model, s.model, tx, mesh, s.mesh, frozen_dtype)
  if jax.process_index() == 0:  # parameter -> PartitionSpec: a change of layout is a diff
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

  # -------------------------------------------------------------- Inputs, checked before compiling
  # A wrong tokenizer, a missing shard or misshapen frozen weights fail here, in
  # seconds, not after the step has compiled.
  if not compile_only:
    rows = {d.name: process_rows(mesh, d.batch_size) for d in s.datasets}
    iterators = input_iterators(s, rows)
    check_weights(s, workdir, lay)

    # ---------------------------------------------------------------- Initialise or restore
    # Also before compiling: a corrupt or mismatched checkpoint is reported in seconds.
    t0 = time.perf_counter()
    checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), s.checkpoint)
    state = (state_lib.restore_latest(checkpointer, sharding.with_shardings(
        lay.state_abs, lay.state_sh), iterators) if s.checkpoint.enabled else None)
    frozen = frozen_weights(s, workdir, lay, mesh, init_params, resuming=state is not None)
    if state is None:
      state = initial_state(s, lay, tx, mesh, init_params)
    log.info("state ready in %.1f s", time.perf_counter() - t0)

  # ------------------------------------------------------------------ Compile, then the loop
  steps = compile_steps(s, model, tx, lay, mesh, batch_abs, batch_sh, n_train + n_frozen,
                        phase=phase, fit_check=compile_only)
  summary = {"step": None, "stopped": None, "history": [], "memory": steps.memory,
             "flops": {"+".join(v): f for v, f in steps.flops.items()}}
  if compile_only:
    return summary
  try:
    summary.update(train_loop(s, config, workdir, mesh, steps, state, frozen, iterators,
                              lambda n, b: put_batch(b, batch_abs[n], batch_sh[n], n, rows[n]),
                              checkpointer, stop_at=stop_at, on_step=on_step))
  finally:
    checkpointer.close()
  return summary


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
  """The compiled update of each step variant (the datasets one step draws)."""
  variants: list  # [tuple of dataset names]: all of them (accumulate) or one each
  compiled: dict  # variant -> executable(state, frozen, batches) -> (state, metrics)
  memory: dict  # 'a+b' -> bytes per device
  flops: dict  # variant -> flops.step_flops(...)


def compile_steps(s: Setup, model: Flamingo, tx, lay: StateLayout, mesh, batch_abs: Mapping,
                  batch_sh: Mapping, num_params: int, *, phase: Optional[Callable] = None,
                  fit_check: bool = False) -> CompiledSteps:
  """The update step (Flamingo's loss, the library's update, the gate metric) compiled
  for every variant, with its memory per device and analytic FLOPs."""
  grad_fn = objective.make_grad_fn(
      model, weights={d.name: d.weight for d in s.datasets},
      micro_batches=s.train.micro_batches, train_vision="vision" not in s.model.frozen,
      mesh=mesh)
  schedule = optim.learning_rate_schedule(s.optim, s.train.total_steps)
  step_fn = step_lib.make_train_step(grad_fn, tx, schedule, lay.grad_sh,
                                     extra_metrics=objective.gate_metrics(s.model))
  names = [d.name for d in s.datasets]
  variants = [tuple(names)] if s.train.mixing == "accumulate" else [(n,) for n in names]
  features = s.model.vision.name == "none"
  positions = s.synthetic.feature_positions if s.synthetic else 0
  shapes = {d.name: flops.BatchShape(
      d.batch_size, d.seq_len, d.max_images, d.num_frames,
      image_size=0 if features else s.image_size,
      feature_positions=positions if features else 0) for d in s.datasets}
  state_in = sharding.with_shardings(lay.state_abs, lay.state_sh)
  frozen_in = sharding.with_shardings(lay.frozen_abs, lay.frozen_sh)
  compiled, memory, step_flops = {}, {}, {}
  for variant in variants:
    key = "+".join(variant)
    compiled[variant] = state_lib.compile_step(
        step_fn, mesh, s.mesh.rules,
        (lay.state_sh, lay.frozen_sh, {n: batch_sh[n] for n in variant}),
        (lay.state_sh, sharding.replicated(mesh)),
        (state_in, frozen_in,
         {n: sharding.with_shardings(batch_abs[n], batch_sh[n]) for n in variant}),
        what=f"the step for {key}", phase=phase, fit_check=fit_check)
    memory[key] = memory_report(compiled[variant], lay.state_abs, lay.state_sh, lay.frozen_abs,
                                lay.frozen_sh)
    step_flops[variant] = flops.step_flops(s.model, [shapes[n] for n in variant],
                                           num_params=num_params)
    if phase:
      phase(f"memory per device for {key}: " + ", ".join(
          f"{k} {state_lib.gib(v)}" for k, v in memory[key].items()))
    log.info("memory per device for %s: %s", key,
             {k: state_lib.gib(v) for k, v in memory[key].items()})
  return CompiledSteps(variants, compiled, memory, step_flops)


def train_loop(s: Setup, config, workdir: epath.Path, mesh, steps: CompiledSteps, state,
               frozen, iterators: Mapping, put: Callable, checkpointer, *,
               stop_at: Optional[int], on_step: Optional[Callable]) -> dict:
  """The loop from the state's step to the end (or stop_at / a signal), batches put on
  the devices by put(name, local batch) ahead of the step; exports the model when done.
  Returns {'step', 'stopped', 'history'}."""
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  writer.write_text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
  peak = s.train.peak_flops_per_device or mfu.peak_flops_per_device() or \
      mfu.measure_peak_flops(s.model.dtype, size=1024)

  def throughput(variant, dt):
    f = steps.flops[variant]
    return {"tokens_per_second": f["text_tokens"] / dt,
            "mfu": f["frozen_aware"] / dt / (peak * mesh.size),
            "mfu_all_3x": f["all_3x"] / dt / (peak * mesh.size)}

  variants = steps.variants
  step = int(jax.device_get(state["step"]))
  # Batches are read and put on the devices ahead of the step, on a background
  # thread; checkpoints get the data state of the batches consumed (exact resume).
  prefetcher = Prefetcher(iterators, put, schedule=lambda i: variants[i % len(variants)],
                          start_step=step, depth=2)

  def train_step(state, step):
    variant = variants[step % len(variants)]
    batches = next(prefetcher)
    with jax.transfer_guard("disallow"):
      state, metrics = steps.compiled[variant](state, frozen, batches)
    return state, metrics, variant

  handler = StepHandler(total_steps=s.train.total_steps, log_every=s.train.log_every,
                        max_consecutive_nonfinite=s.train.max_consecutive_nonfinite,
                        writer=writer, start_step=step, on_step=on_step, throughput=throughput,
                        data_stats=lambda: pipeline_stats(prefetcher))
  try:
    state, step, stopped = run_loop(
        state, step=step, total_steps=s.train.total_steps, train_step=train_step,
        handler=handler, checkpointer=checkpointer if s.checkpoint.enabled else None,
        data_states=prefetcher.get_state, stop_at=stop_at)
    if stopped == "done" and s.train.export_dir:
      export_model(s, state["params"], frozen)
  finally:
    prefetcher.close()
    writer.close()
  return {"step": step, "stopped": stopped, "history": handler.history}


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
  summary = run(load(args.config, overrides), args.workdir, compile_only=args.compile_only,
                stop_at=args.stop_at)
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
