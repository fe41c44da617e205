"""The training loop every trainer runs, and the host-side pieces around it.

  workdir = prepare_workdir(path, config)        # config.json, version.txt (process 0)
  handler = StepHandler(...)                     # counters, logs, metrics at log steps
  state, step, stopped = run_loop(state, ...)    # SIGTERM -> checkpoint -> exit

Metrics leave the devices only at log steps: the handler keeps each step's
metrics as device arrays and, once a log step is done, fetches the whole
window in one `jax.device_get` while the device already runs the next step
(nothing syncs in between), then handles every step of it in order (history,
on_step, non-finite warnings and stop, the log line). The loop also flushes
before a checkpoint (so what was handled matches what was saved), when
after_step asks, and before it returns. Paths go through etils.epath so `gs://`
workdirs work as local ones do.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from flamingo_jax.errors import ConfigError, require_remote_support
from flamingo_jax.runtime import distributed
from flamingo_jax.runtime import sharding
from flamingo_jax.training.metrics import MetricsWriter, progress_line

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# The loop's part of a trainer's `train` section


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Fields every trainer's `train` section has (each trainer's TrainConfig extends it)."""
  total_steps: int = 500_000
  seed: int = 0
  log_every: int = 10
  max_consecutive_nonfinite: int = 10  # stop after this many skipped updates in a row


def check_loop_config(c: LoopConfig, section: str = "train") -> None:
  for key in ("total_steps", "log_every", "max_consecutive_nonfinite"):
    if getattr(c, key) < 1:
      raise ConfigError(f"config key '{section}.{key}' must be a positive int, got "
                        f"{getattr(c, key)!r}")


# --------------------------------------------------------------------------
# Workdir


def workdir_path(workdir: str) -> epath.Path:
  """A local workdir made absolute (orbax wants absolute paths); URIs untouched."""
  require_remote_support(workdir, "the workdir")
  path = epath.Path(workdir)
  return path if "://" in str(workdir) else path.resolve()


def code_version() -> str:
  """`git describe` of the source tree when available."""
  here = epath.Path(__file__).resolve().parent
  try:
    out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=str(here),
                         capture_output=True, text=True, timeout=10)
    if out.returncode == 0 and out.stdout.strip():
      return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  import flamingo_jax
  return f"flamingo_jax {flamingo_jax.__version__} (no git revision)"


def prepare_workdir(workdir: str, config) -> epath.Path:
  """Creates the workdir and writes config.json and version.txt (process 0 only)."""
  path = workdir_path(workdir)
  if path.exists() and not path.is_dir():
    raise ConfigError(f"--workdir {workdir} exists and is not a directory")
  if jax.process_index() == 0:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    (path / "version.txt").write_text(code_version() + "\n")
  return path


# --------------------------------------------------------------------------
# Batches: this process's rows of each global batch


def process_rows(mesh, global_batch: int) -> tuple[int, int]:
  """The contiguous rows of a global batch that this process's devices hold."""
  index = NamedSharding(mesh, P(sharding.BATCH_AXES)).addressable_devices_indices_map(
      (global_batch,))
  rows = sorted({r for (sl,) in index.values() for r in range(*sl.indices(global_batch))})
  if rows != list(range(rows[0], rows[-1] + 1)):
    raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}; "
                     "order the mesh devices by process")
  return rows[0], rows[-1] + 1


def batch_shardings(mesh, batch_abs: Mapping[str, Any]) -> dict:
  """Every batch array sharded over the batch axes on its first dimension."""
  return {k: NamedSharding(mesh, sharding.batch_spec(len(a.shape))) for k, a in batch_abs.items()}


def check_batch_sizes(batch_sizes: Mapping[str, int], mesh, prefix: str,
                      micro_batches: Optional[Mapping[str, int]] = None) -> None:
  """Every global batch splits evenly over the data-parallel devices (and micro-batches)."""
  shards = sharding.batch_shards(mesh)
  for name, b in batch_sizes.items():
    k = (micro_batches or {}).get(name, 1)
    if b % (shards * k):
      extra = (f" times its {k} micro-batches (train.micro_batches.{name})"
               if micro_batches is not None else "")
      raise ValueError(f"config key '{prefix.format(name=name)}' ({b}) must be divisible by "
                       f"the {shards} data-parallel devices (mesh slice*data*fsdp){extra}")


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


def pipeline_stats(iterators: Any) -> dict[str, float]:
  """The input pipeline's data counters as `data/<dataset>/<counter>` scalars (and
  `data/<dataset>/skip_rate`). iterators: {name: iterator} (read synchronously by the
  step), or a Prefetcher (its stats(): the consumed batches', not the read-ahead);
  iterators without stats() (in-memory data) add none."""
  from flamingo_jax.data.accounting import scalar_metrics
  if callable(getattr(iterators, "stats", None)):
    return scalar_metrics(iterators.stats())
  return scalar_metrics({name: it.stats() for name, it in iterators.items()
                         if callable(getattr(it, "stats", None))})


# --------------------------------------------------------------------------
# Signals


class StopSignal:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly."""
  last_received: Optional[int] = None  # the signal that stopped the latest loop (exit 128+N)

  def __init__(self):
    self.received: Optional[int] = None
    self._previous = {}

  def __enter__(self):
    StopSignal.last_received = None
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = StopSignal.last_received = signum
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


# --------------------------------------------------------------------------
# The host side of a finished step


class StepHandler:
  """Counters, the non-finite stop, logs and metrics of each finished step.

  add(step, metrics, info) keeps a step's metrics on the devices; flush()
  fetches every kept step in one transfer and handles them in order; due()
  says whether the newest kept step is a log step (the loop then flushes once
  the next step is dispatched). Calling the handler is add + flush.
  A run of max_consecutive_nonfinite skipped updates is therefore noticed at
  the next flush (a log step, a checkpoint, the end): the parameters are
  still those of the last finite update, and the error names the step.

  throughput(info, seconds_per_step) -> extra scalars at the log cadence
  (tokens/s, MFU); suffix(metrics) -> text appended to the progress line;
  data_stats() -> the data counters of the batches consumed so far, logged at the same
  cadence: read when a log step is added (right after its batches were taken, before the
  next step's), so step N's counters are those of steps 1..N whatever is read ahead.

  watch: steps whose next step's outcome run_loop wants (checkpoints); finite_next
  gets {step: the next step was finite} as they are handled. restored: the checkpoint
  the run resumed from, named by the non-finite stop when the skips began right after it.
  """

  def __init__(self, *, total_steps: int, log_every: int, max_consecutive_nonfinite: int,
               writer: MetricsWriter, start_step: int,
               on_step: Optional[Callable[[int, dict], None]] = None,
               throughput: Optional[Callable[[Any, float], dict]] = None,
               suffix: Optional[Callable[[dict], str]] = None,
               data_stats: Optional[Callable[[], dict]] = None):
    self.total_steps, self.log_every = total_steps, log_every
    self.max_nonfinite = max_consecutive_nonfinite
    self.writer, self.on_step = writer, on_step
    self.throughput, self.suffix, self.data_stats = throughput, suffix, data_stats
    self.history: list[dict] = []
    self.is_main = jax.process_index() == 0
    self._pending: list[tuple[int, Mapping, Any, Optional[dict]]] = []
    self.watch: set[int] = set()
    self.finite_next: dict[int, bool] = {}
    self.restored: Optional[tuple[int, str]] = None  # (step, path) the run resumed from
    self._time, self._step, self._cpu = time.perf_counter(), start_step, time.process_time()

  def is_log_step(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.total_steps

  def add(self, done_step: int, metrics: Mapping, info: Any = None) -> None:
    """Keeps step done_step's metrics (device arrays: nothing is transferred) and, at a
    log step, the data counters as they are now (the batches of steps 1..done_step)."""
    data = self.data_stats() if self.data_stats is not None and \
        self.is_log_step(done_step) else None
    self._pending.append((done_step, metrics, info, data))

  def due(self) -> bool:
    return bool(self._pending) and self.is_log_step(self._pending[-1][0])

  def flush(self) -> None:
    """The kept steps' metrics to the host in one transfer, each step handled in order."""
    if not self._pending:
      return
    pending, self._pending = self._pending, []
    values = jax.device_get([m for _, m, _, _ in pending])
    for (done_step, _, info, data), metrics in zip(pending, values):
      self._handle(done_step, metrics, info, data)

  def __call__(self, done_step: int, metrics: Mapping, info: Any = None) -> None:
    self.add(done_step, metrics, info)
    self.flush()

  def _handle(self, done_step: int, metrics: Mapping, info: Any,
              data: Optional[dict] = None) -> None:
    metrics = {k: float(v) for k, v in metrics.items()}
    if done_step - 1 in self.watch:
      self.watch.discard(done_step - 1)
      self.finite_next[done_step - 1] = not metrics["update_skipped"]
    self.history.append(metrics)
    metrics["step"] = done_step
    self.writer.write_step(done_step, metrics)  # history.jsonl, when the trainer keeps one
    if self.on_step is not None:  # progress bars (the demo), per-step logs
      self.on_step(done_step, metrics)
    if metrics["nonfinite_consecutive"] >= self.max_nonfinite:
      first = done_step - int(metrics["nonfinite_consecutive"]) + 1
      after_restore = "" if self.restored is None or first != self.restored[0] + 1 else (
          f" The non-finite steps began right after the restore of checkpoint "
          f"{self.restored[0]} ({self.restored[1]}): it may hold damaged state; rename it "
          f"{self.restored[0]}.corrupt to resume from the checkpoint before it.")
      raise NonFiniteStop(
          first,
          f"{int(metrics['nonfinite_consecutive'])} consecutive updates had non-finite "
          f"gradients or loss (train.max_consecutive_nonfinite={self.max_nonfinite}); "
          f"stopping at step {done_step}. Parameters are those of the last finite update; "
          f"{int(metrics['nonfinite_total'])} updates were skipped in total. Check the data "
          "and the learning rate." + after_restore)
    if metrics["update_skipped"]:
      log.warning("step %d: non-finite gradient, update skipped (%d in a row, %d in total)",
                  done_step, int(metrics["nonfinite_consecutive"]),
                  int(metrics["nonfinite_total"]))
    if not self.is_log_step(done_step):
      return
    now, cpu = time.perf_counter(), time.process_time()
    steps = max(done_step - self._step, 1)
    dt = (now - self._time) / steps
    # Host CPU seconds per step: on a CPU backend the compute itself; on
    # accelerators a high value flags an input-bound run.
    metrics.update(step_time=dt, host_cpu_time=(cpu - self._cpu) / steps)
    if self.throughput is not None:
      metrics.update(self.throughput(info, dt))
    if data is not None:
      metrics.update(data)
    if self.is_main:
      line = progress_line(done_step, self.total_steps, metrics, dt, metrics.get("mfu"))
      log.info(line + (self.suffix(metrics) if self.suffix else ""))
    self.writer.write(done_step, {k: v for k, v in metrics.items() if k != "step"})
    self._time, self._step, self._cpu = now, done_step, cpu


class NonFiniteStop(FloatingPointError):
  """max_consecutive_nonfinite skipped updates in a row; first_step: the first of them."""

  def __init__(self, first_step: int, message: str):
    super().__init__(message)
    self.first_step = first_step


# --------------------------------------------------------------------------
# The loop


def run_loop(state: Any, *, step: int, total_steps: int,
             train_step: Callable[[Any, int], tuple[Any, Any, Any]], handler: StepHandler,
             checkpointer=None, data_states: Callable[[], dict] = dict,
             stop_at: Optional[int] = None,
             after_step: Optional[Callable[[int, Any, Callable[[], None]], None]] = None
             ) -> tuple[Any, int, str]:
  """Runs train_step(state, step) -> (state, metrics, info) until total_steps.

  Checkpoints (with the data-iterator states) when due, at the end, at
  `stop_at` and on SIGTERM/SIGINT; after_step(step, state, flush) runs after
  each step (evaluation; flush() hands the kept metrics to the handler
  first). Metrics reach the handler at log steps, one step late (see
  StepHandler). Returns (state, step, 'done' | 'stop_at' | 'signal').
  """
  stopped = "done"
  saved = set(checkpointer.all_steps()) if checkpointer is not None else set()
  restored = getattr(checkpointer, "restored_step", None)
  restored = restored if restored == step else None
  if restored is not None:  # is the restored state good? the next step tells
    handler.watch.add(step)
    handler.restored = (restored, f"{checkpointer.directory}/{restored}")
  distributed.barrier("first_step")  # every process has compiled before any steps

  def confirm():  # checkpoints a finite step followed: never rotated out for newer ones
    for s, finite in handler.finite_next.items():
      if finite and checkpointer is not None:
        checkpointer.mark_good(s)
    handler.finite_next.clear()

  with StopSignal() as stop:
    while step < total_steps:
      state, metrics, info = train_step(state, step)
      step += 1
      if handler.due():  # the previous step was a log step; this one is in flight
        handler.flush()
      handler.add(step, metrics, info)
      halt = step == stop_at or stop.agreed()
      if checkpointer is not None and step not in saved and (
          checkpointer.due(step) or halt or step == total_steps):
        handler.flush()  # what was handled (history, non-finite stop) is what is saved
        confirm()
        checkpointer.save(step, state, data_states())
        saved.add(step)
        handler.watch.add(step)
      if after_step is not None:
        after_step(step, state, handler.flush)
      if halt:
        stopped = "signal" if stop.received is not None else "stop_at"
        break
    handler.flush()
    confirm()
  if stopped == "signal":
    log.warning("stopped by a signal at step %d; checkpoint saved, resume with the same "
                "command", step)
  return state, step, stopped
