"""Checkpoints (the one module that talks to orbax about training state).

Layout of a workdir:
  checkpoints/<step>/state   trainable params, optimizer state, step, RNG and
                             counters: sharded arrays (orbax StandardSave)
  checkpoints/<step>/data    data-iterator state, one JSON file per process
  frozen/<component>/        frozen weights a run started from when they did not
                             come from `model_init` (so resuming never depends
                             on re-running a random init)
Frozen base weights are never part of the step checkpoints: they are loaded
from their own directories (`model_init.<component>`, e.g. the output of
`python -m flamingo_jax.convert nfnet`), straight into their target shardings
and dtype (ShapeDtypeStruct leaves), so no host ever holds a full copy.

Saves are asynchronous (device->host copy blocks; the write does not) and
atomic: orbax writes into `<step>.orbax-checkpoint-tmp-*`, renames it on commit
and marks it with commit_success.txt; a temporary directory is never listed as
a step, and a step directory without the marker (an interrupted save on a
filesystem without atomic renames) is removed, never restored. Restoring onto a
different mesh is a restore with other target shardings.

A committed checkpoint can still be damaged (a disk error, bytes overwritten,
a file deleted by hand), and damaged array bytes often still decode. So every save
records a checksum per array, computed on the devices (runtime/checksum.py), in the
step's orbax custom metadata (`<step>/_CHECKPOINT_METADATA`, committed with the step),
and a SHA-256 beside each data-state file; restore verifies both on every process
before the first step. `Checkpointer.restore_latest` reports a damaged step in one
line, `checkpoint STEP at PATH: array NAME: CAUSE`, and, with
`checkpoint.on_corrupt='fallback'` (the default), renames it `<step>.corrupt` and
restores the newest intact step; `'refuse'` stops with that line instead. A step
written before checksums existed restores with one warning.

Good state is never replaced by bad: a state holding NaN or inf in any array is
never saved (NonFiniteStateError), and rotation (`checkpoint.keep`) never deletes
the newest checkpoint that training continued from with a finite step (marked by
`<step>/FINITE_NEXT`, written once that step is known) while only newer, unconfirmed
ones remain, nor the step this run restored until a finite step has followed it or a
newer step: up to keep + 2 steps stay on disk. Restoring a step drops its mark until a finite step
follows it again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from flamingo_jax.config import from_config_dict
from flamingo_jax.errors import (CORRUPT_LINE_LIMIT, CheckpointError, ConfigError, brief,
                                 corrupt_line, one_line)
from flamingo_jax.runtime import checksum
from flamingo_jax.runtime.params_io import (CHECKSUMS, check_ocdbt, checksum_record,
                                            plain_tree, restore_error, warn_unverified)

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"  # written by orbax when a step is complete
FINITE_NEXT = "FINITE_NEXT"  # <step>/FINITE_NEXT: a finite step followed this checkpoint
# orbax's words when the stored tree is not the target's (readable, but another layout)
STRUCTURE_MISMATCH = "tree structures do not match"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """`checkpoint` section of a config."""
  every: int = 1000  # steps between saves (0: only at the end / on a signal)
  keep: int = 3  # most recent checkpoints kept
  async_save: bool = True
  enabled: bool = True  # False: never write or read checkpoints (benchmarks)
  # The newest checkpoint cannot be read: 'fallback' warns and restores the newest
  # intact one; 'refuse' stops with a one-line error.
  on_corrupt: str = "fallback"


def checkpoint_config(cfg: Any) -> CheckpointConfig:
  c = cfg if isinstance(cfg, CheckpointConfig) else from_config_dict(
      CheckpointConfig, cfg or {}, "checkpoint")
  if c.every < 0:
    raise ConfigError(f"config key 'checkpoint.every' must be >= 0, got {c.every}")
  if c.keep < 1:
    raise ConfigError(f"config key 'checkpoint.keep' must be >= 1, got {c.keep}")
  if c.on_corrupt not in ("fallback", "refuse"):
    raise ConfigError(f"config key 'checkpoint.on_corrupt' is {c.on_corrupt!r}; expected "
                      "'fallback' or 'refuse'")
  return c


# --------------------------------------------------------------------------
# Data-iterator state: one JSON file per process


class DataStateHandler(ocp.CheckpointHandler):
  """Saves {dataset: iterator state} of *this* process (each process reads its own shard)."""

  def _file(self, directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "DataStateSave"):
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(args.states, sort_keys=True)
    path = self._file(directory)
    path.write_text(text)
    digest_path(path).write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")

  def restore(self, directory: epath.Path, args: Optional["DataStateRestore"] = None) -> dict:
    path = self._file(epath.Path(directory))
    if not path.exists():
      found = sorted(p.name for p in epath.Path(directory).iterdir())
      raise CheckpointError(f"no data-iterator state for this process at {path} (found "
                            f"{found}); was the checkpoint written with a different number "
                            "of processes?")
    try:
      states = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(f"data-iterator state {path} is not JSON: {one_line(e)}") from None
    if not isinstance(states, dict):
      raise CheckpointError(f"data-iterator state {path} is not a mapping of datasets")
    return states

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


def digest_path(path: epath.Path) -> epath.Path:
  """The SHA-256 of a data-state file, beside it (one per process)."""
  return path.parent / (path.name + ".sha256")


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  states: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# --------------------------------------------------------------------------
# Step checkpoints


class NonFiniteStateError(FloatingPointError):
  """A state with NaN or inf in its parameters or optimizer state: never saved."""


class Checkpointer:
  """Step checkpoints of one run: `directory/<step>/{state,data}`, verified on restore."""

  def __init__(self, directory: str, cfg: CheckpointConfig):
    self.cfg = cfg
    self.directory = os.path.abspath(directory)
    self.restored_step: Optional[int] = None  # the step restore_latest returned
    self._restored_confirmed = False  # a finite step followed it in this run
    self._pending_marks: set[int] = set()  # FINITE_NEXT to write once the step is committed
    # Created here, synchronously: orbax's own creation runs in a thread that a
    # process exiting on an error leaves to fail at interpreter shutdown.
    epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
    self._discard_uncommitted()
    options = ocp.CheckpointManagerOptions(
        # rotation is ours (_rotate): it keeps the newest confirmed-good step too
        max_to_keep=None, enable_async_checkpointing=cfg.async_save, create=True,
        # Temporary directories are removed above, synchronously: orbax's cleanup runs
        # in a thread that a process exiting on an error leaves to fail at shutdown.
        cleanup_tmp_directories=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def _discard_uncommitted(self):
    """Step directories without orbax's commit marker are leftovers of an
    interrupted save on a filesystem without atomic renames: never restore them."""
    root = epath.Path(self.directory)
    if jax.process_index() == 0 and root.exists():
      for path in root.iterdir():
        if path.name.isdigit() and not (path / COMMIT_MARKER).exists():
          log.warning("removing unfinished checkpoint %s (no %s)", path, COMMIT_MARKER)
          path.rmtree()
        elif ".orbax-checkpoint-tmp" in path.name:  # a save killed before its rename
          path.rmtree()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("flamingo_jax checkpoint cleanup")

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def due(self, step: int) -> bool:
    return self.cfg.every > 0 and step % self.cfg.every == 0

  def save(self, step: int, state: Any, data_states: dict) -> bool:
    """Starts saving `state` (sharded jax arrays) and the data state at `step`, with the
    checksum of every array; a state holding NaN or inf is a NonFiniteStateError."""
    if step in self.manager.all_steps():
      return False
    record, nonfinite = checksum.tree_record(state)
    if nonfinite:
      newest = self.manager.latest_step()
      raise NonFiniteStateError(
          f"step {step}: the state holds NaN or inf in {len(nonfinite)} arrays "
          f"({', '.join(nonfinite[:3])}{' ...' if len(nonfinite) > 3 else ''}); it is not saved "
          f"as a checkpoint ({'checkpoint ' + str(newest) if newest is not None else 'nothing'}"
          f" in {self.directory} stays the newest). Check the data and the learning rate.")
    self._write_marks()
    saved = self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=DataStateSave(data_states)),
        custom_metadata={CHECKSUMS: record}, force=True)
    self._rotate()
    return saved

  # ---------------------------------------------------------------- good marks, rotation
  def mark_good(self, step: int) -> None:
    """Training continued from checkpoint `step` with a finite step: FINITE_NEXT is
    written once the step is committed (at the next save, wait or close)."""
    self._pending_marks.add(step)
    if step == self.restored_step:
      self._restored_confirmed = True

  def _write_marks(self) -> None:
    if not self._pending_marks:
      return
    self.manager.wait_until_finished()
    steps, self._pending_marks = self._pending_marks, set()
    if jax.process_index() == 0:
      for step in steps & set(self.manager.all_steps()):
        (epath.Path(self.directory) / str(step) / FINITE_NEXT).write_text(f"{step + 1}\n")

  def newest_good_step(self) -> Optional[int]:
    """The newest step marked FINITE_NEXT (see the module docstring); process 0's view,
    so that every process rotates out the same steps."""
    root, good = epath.Path(self.directory), -1
    if jax.process_index() == 0:
      good = next((step for step in sorted(self.manager.all_steps(), reverse=True)
                   if (root / str(step) / FINITE_NEXT).exists()), -1)
    if jax.process_count() > 1:
      import numpy as np
      from jax.experimental import multihost_utils
      good = int(multihost_utils.broadcast_one_to_all(np.int64(good)))
    return None if good < 0 else good

  def _rotate(self) -> None:
    """Keeps the newest `keep` steps, the newest good one (never deleted while only
    newer, unconfirmed steps remain) and the restored one until it or a newer step is
    confirmed."""
    steps = sorted(self.manager.all_steps())
    keep = set(steps[-self.cfg.keep:])
    good = self.newest_good_step()
    if good is not None:
      keep.add(good)
    if self.restored_step is not None and not self._restored_confirmed and (
        good is None or good < self.restored_step):
      keep.add(self.restored_step)
    for step in steps:
      if step not in keep:
        self.manager.delete(step)

  # ---------------------------------------------------------------- restore
  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """-> (state laid out as abstract_state's shardings/dtypes, data states), every
    array verified against the checksums written with it."""
    where = f"{self.directory}/{step}"
    self.check_files(step)
    record = checksum_record(epath.Path(where), step)
    self.check_shapes(step, abstract_state, record)
    try:
      out = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data=DataStateRestore()))
    except ValueError as e:  # an intact checkpoint of another state layout is not corrupt
      if STRUCTURE_MISMATCH not in str(e):
        raise
      if isinstance(record, Mapping) and isinstance(record.get("arrays"), Mapping) and set(
          record["arrays"]) == set(checksum.named_leaves(abstract_state)):
        # written with this run's tree: the stored tree metadata is what changed
        raise CheckpointError(corrupt_line(where, "state/_METADATA", "its tree is not the one "
                                           "written (the checksums name this run's)", step,
                                           "file")) from None
      mismatch = one_line(e).split(STRUCTURE_MISMATCH, 1)[1].split(" If this mismatch")[0]
      raise _ConfigMismatch(
          f"checkpoint {step} at {where} holds another state layout than this "
          f"run's (the config or the code changed the optimizer or its labels)"
          f"{mismatch.rstrip()}; resume it with the config and code that wrote it, or use a "
          "new workdir") from None
    data_file = DataStateHandler()._file(epath.Path(where) / "data")
    if record is None or not digest_path(data_file).exists():
      warn_unverified(where)
    if record is not None:
      try:
        checksum.verify(record, out["state"])
      except checksum.CorruptError as e:
        raise CheckpointError(corrupt_line(where, f"state/{e.name}" if e.kind == "array"
                                           else e.name, e.cause, step, e.kind)) from None
    return out["state"], out["data"]

  def check_files(self, step: int) -> None:
    """The JSON files of a step parse, its data-state files match their SHA-256 and its
    items exist: checked here, before orbax reads them (orbax fed a garbage metadata file
    leaves its event loop to fail again at exit)."""
    root = epath.Path(self.directory) / str(step)
    where = str(root)

    def bad(path, cause):
      return CheckpointError(corrupt_line(where, str(path.relative_to(root)), cause, step,
                                          "file"))

    for item in ("state", "data"):
      if not (root / item).is_dir():
        raise bad(root / item, "missing")
    for path in [root / "state" / "_METADATA", root / "state" / "_sharding",
                 *(root / "state" / "array_metadatas").glob("process_*"),
                 *(root / "data").glob("*.json")]:
      if path.exists():
        try:
          text = path.read_text()
          json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
          raise bad(path, f"not JSON ({brief(e, 60)})") from None
    data_file = DataStateHandler()._file(root / "data")
    digest = digest_path(data_file)
    if data_file.exists() and digest.exists():
      want = digest.read_bytes().decode(errors="replace").strip()
      if hashlib.sha256(data_file.read_bytes()).hexdigest() != want:
        raise bad(data_file, "SHA-256 mismatch")
    try:
      check_ocdbt(root / "state", step, root)
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - tensorstore's errors of damaged files
      raise bad(root / "state", brief(e, 90)) from None

  def check_shapes(self, step: int, abstract_state: Any, record: Optional[dict] = None) -> None:
    """Stored shapes vs the config's (a changed config is not a corrupt checkpoint):
    a mismatch is a CheckpointError naming the tensor, before any array is read. With
    a checksum record, metadata that disagrees with it is damage, not a config change."""
    where = f"{self.directory}/{step}"
    try:
      with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(str(epath.Path(where) / "state"))
      stored = stored.item_metadata.tree
    except Exception:  # noqa: BLE001 - unreadable metadata: left to restore() to report
      return
    stored = plain_tree(stored) if stored is not None else {}
    if not (isinstance(stored, dict) and isinstance(stored.get("params"), dict)
            and isinstance(abstract_state, Mapping)
            and "params" in abstract_state):
      return
    # The parameters only: their tree is plain dicts in both (optimizer states are not).
    have = traverse_util.flatten_dict(stored["params"], sep="/")
    recorded = (record or {}).get("arrays") if isinstance(record, Mapping) else None
    if isinstance(recorded, Mapping):
      for k, v in have.items():
        want = recorded.get(f"params/{k}")
        if hasattr(v, "shape") and isinstance(want, Mapping) and \
            list(want.get("shape", ())) != list(v.shape):
          raise CheckpointError(corrupt_line(where, "state/_METADATA", f"array params/{k} is "
                                             f"{tuple(v.shape)} there but was written as "
                                             f"{tuple(want.get('shape', ()))}", step, "file"))
    want = traverse_util.flatten_dict(dict(abstract_state["params"]), sep="/")
    bad = [f"params/{k}: checkpoint {tuple(have[k].shape)} vs config {tuple(w.shape)}"
           for k, w in want.items() if k in have and hasattr(have[k], "shape")
           and tuple(have[k].shape) != tuple(w.shape)]
    missing = [f"params/{k}: missing" for k in sorted(set(want) - set(have))]
    if bad or missing:
      raise _ConfigMismatch(f"checkpoint {step} at {where} does not fit the "
                            f"config: {'; '.join((bad + missing)[:6])}")

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """(step, state, data states) of the newest intact checkpoint; None without any.

    A damaged step is reported in one line (`checkpoint STEP at PATH: array NAME:
    CAUSE`); with on_corrupt='fallback' it is renamed `<step>.corrupt` (so the run
    saves that step again) and the next older one is tried, with 'refuse' the line is
    an error. Every process agrees: damage one of them finds is damage for all.
    """
    steps = sorted(self.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      where = f"{self.directory}/{step}"
      line = None
      try:
        found = (step, *self.restore(step, abstract_state))
      except _ConfigMismatch as e:
        raise CheckpointError(str(e)) from None
      except CheckpointError as e:
        line = str(e) if str(e).startswith(f"checkpoint {step} at ") else \
            corrupt_line(where, "?", brief(e, 90), step, "file")
      except Exception as e:  # noqa: BLE001 - orbax, tensorstore and json raise many types
        line = restore_error(e, where, step, "state/")
      if not _all_processes(line is None):
        line = line or f"checkpoint {step} at {where}: damaged on another process"
      if line is None:
        self.restored_step = step
        self._unmark(step)
        return found
      if self.cfg.on_corrupt == "refuse":
        suffix = " (refused: checkpoint.on_corrupt='refuse')"
        room = CORRUPT_LINE_LIMIT - len(suffix)
        line = line if len(line) <= room else line[:room - 3].rstrip() + "..."
        raise CheckpointError(line + suffix)
      older = steps[i + 1:]
      log.warning("%s; set aside as %d.corrupt, %s", line, step,
                  f"falling back to checkpoint {older[0]}" if older else "no older checkpoint")
      self._set_aside(step)
    if steps:
      raise CheckpointError(f"no intact checkpoint in {self.directory}: steps {sorted(steps)} "
                            "are all corrupt or partial (renamed <step>.corrupt)")
    return None

  def _unmark(self, step: int) -> None:
    """A restored step earns its FINITE_NEXT again (its first step may not be finite)."""
    path = epath.Path(self.directory) / str(step) / FINITE_NEXT
    if jax.process_index() == 0 and path.exists():
      path.unlink()

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      path = epath.Path(self.directory) / str(step)
      target = epath.Path(self.directory) / f"{step}.corrupt"
      if target.exists():
        target.rmtree()
      path.rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"flamingo_jax checkpoint {step} set aside")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()
    self._write_marks()

  def close(self):
    self.manager.wait_until_finished()
    self._write_marks()
    self.manager.close()


def _all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (one allgather; a single process: ok)."""
  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


class _ConfigMismatch(Exception):
  """A readable checkpoint whose shapes are not the config's (never a fallback)."""
