"""The train state's layout, its compiled update step, and restoring it.

Every trainer holds the same state (objective.init_state: params, optimizer
state, step, RNG, non-finite counters) and builds it the same way: shapes by
eval_shape (nothing allocated), logical axes -> mesh shardings, the optimizer
moments laid out like their parameters (or ZeRO-1), the step compiled ahead
of time against those layouts, then initialise-or-restore. Resume order:
this workdir's latest checkpoint, else the trainer's `model_init`, else random init.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import optax
from jax.sharding import PartitionSpec as P

from flamingo_jax.errors import CheckpointError
from flamingo_jax.training import objective, optim
from flamingo_jax.runtime import sharding

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainState:
  """Shapes and shardings of the train state, nothing allocated."""
  abstract: Any  # objective.init_state(...) tree of ShapeDtypeStructs
  shardings: Any  # NamedSharding tree, same structure
  grad_shardings: Any  # accumulated-gradient layout under ZeRO-1, else None

  def target(self) -> Any:
    """ShapeDtypeStructs with shardings: the compile and restore target."""
    return sharding.with_shardings(self.abstract, self.shardings)


def train_state(params_abs: Any, param_specs: Any, tx: optax.GradientTransformation, mesh,
                mesh_cfg: sharding.MeshConfig) -> TrainState:
  """The state's layout: params as param_specs, Adam moments alike (or ZeRO-1), rest replicated."""
  state_abs = jax.eval_shape(lambda p: objective.init_state(p, tx, jax.random.key(0)),
                             params_abs)
  zero1 = (lambda spec, shape: sharding.zero1_spec(spec, shape, mesh)) if mesh_cfg.zero1 else None
  specs = {k: P() for k in state_abs}
  specs.update(params=param_specs,
               opt_state=optim.state_specs(state_abs["opt_state"], params_abs, param_specs,
                                           zero1))
  grad_sh = None
  if mesh_cfg.zero1:
    grad_sh = sharding.named(mesh, jax.tree.map(
        lambda spec, a: sharding.zero1_spec(spec, a.shape, mesh), param_specs, params_abs,
        is_leaf=lambda x: isinstance(x, P)))
  return TrainState(state_abs, sharding.named(mesh, specs), grad_sh)


def boxed_params(init: Callable[[jax.Array], Any], mesh) -> Any:
  """eval_shape of a model's init (rng -> boxed params): shapes and logical axes."""
  with jax.set_mesh(mesh):
    return jax.eval_shape(init, jax.random.key(0))


# --compile_only never runs the executable: LLVM's optimisation passes are skipped
# (about a third of XLA:CPU's compile time). XLA's HLO passes, fusion and buffer
# assignment, which memory_analysis() reads, are unchanged: the figures are
# identical (tests/test_compile_time.py compares them).
FIT_CHECK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True}


def compile_step(step_fn: Callable, mesh, rules, in_shardings: tuple, out_shardings: tuple,
                 args: tuple, what: str = "the step",
                 phase: Optional[Callable[[str], None]] = None, fit_check: bool = False):
  """jit(step_fn) lowered and compiled for these layouts, state donated (argument 0).
  phase(line): told when lowering and compiling start and end (--compile_only).
  fit_check: the executable is only measured, never run (FIT_CHECK_COMPILER_OPTIONS)."""
  phase = phase or (lambda line: None)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    phase(f"lowering {what} ...")
    lowered = jax.jit(step_fn, donate_argnums=(0,), in_shardings=in_shardings,
                      out_shardings=out_shardings).lower(*args)
    t1 = time.perf_counter()
    phase(f"lowered {what} in {t1 - t0:.1f} s; compiling ...")
    compiled = lowered.compile(FIT_CHECK_COMPILER_OPTIONS if fit_check else None)
  phase(f"compiled {what} in {time.perf_counter() - t1:.1f} s")
  log.info("compiled %s in %.1f s", what, time.perf_counter() - t0)
  return compiled


def memory_report(compiled, trees: Mapping[str, tuple[Any, Any]]) -> dict:
  """Bytes per device: each named (abstract, shardings) tree, then the compiled buffers."""
  report = {name: sharding.bytes_per_device(a, s) for name, (a, s) in trees.items()}
  mem = compiled.memory_analysis()
  if mem is not None:
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes"):
      report[key.replace("_size_in_bytes", "")] = int(getattr(mem, key, 0) or 0)
    report["peak_estimate"] = (report.get("argument", 0) + report.get("output", 0)
                               - report.get("alias", 0) + report.get("temp", 0))
  return report


def gib(n: int) -> str:
  return f"{n / 2 ** 30:.3f} GiB"


def restore_latest(checkpointer, target: Any, iterators: Mapping[str, Any]) -> Optional[Any]:
  """The newest intact checkpoint's state in target's layout, every data iterator set
  to its saved state; None when the workdir has no checkpoint (checkpoint.on_corrupt
  decides what an unreadable newest one does)."""
  found = checkpointer.restore_latest(target)
  if found is None:
    return None
  step, state, data_states = found
  log.info("resumed from %s/%d", checkpointer.directory, step)
  for name, it in iterators.items():
    if name not in data_states:
      raise CheckpointError(f"checkpoint {step} ({checkpointer.directory}/{step}) has no data "
                            f"state for dataset {name!r} (it has {sorted(data_states)})")
    it.set_state(data_states[name])
  return state


def fresh_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                seed: int, mesh, rules, state_shardings: Any,
                loaded: Optional[Mapping[str, Any]] = None) -> Any:
  """objective.init_state of a random init, its top-level entries replaced by `loaded`
  (pretrained components), made by one jitted function straight into its shardings."""

  def init(rng, loaded):
    init_rng, state_rng = jax.random.split(rng)
    params = dict(init_params(init_rng))
    params.update(loaded)
    return objective.init_state(params, tx, state_rng)

  return init_once(init, mesh, rules, state_shardings)(jax.random.key(seed), dict(loaded or {}))


def init_once(fn: Callable, mesh, rules, out_shardings: Any) -> Callable:
  """jit(fn) for a function run once (an init), its outputs made in their shardings."""
  # On CPU, optimising PRNG code costs more than it saves for a single call.
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  jitted = jax.jit(fn, out_shardings=out_shardings, compiler_options=options)

  def call(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(*args)

  return call
