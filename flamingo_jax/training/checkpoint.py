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

A committed checkpoint can still be unreadable (a disk error, bytes overwritten,
a file deleted by hand). `Checkpointer.restore_latest` reports such a step in one
line (step, path, cause) and, with `checkpoint.on_corrupt='fallback'` (the
default), renames it `<step>.corrupt` and restores the newest intact step;
`'refuse'` stops with that line instead.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from flamingo_jax.config import from_config_dict
from flamingo_jax.errors import CheckpointError, ConfigError, one_line
from flamingo_jax.runtime.params_io import check_ocdbt, plain_tree

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"  # written by orbax when a step is complete
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
    self._file(directory).write_text(json.dumps(args.states, sort_keys=True))

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


class Checkpointer:
  """Step checkpoints of one run: `directory/<step>/{state,data}`."""

  def __init__(self, directory: str, cfg: CheckpointConfig):
    self.cfg = cfg
    self.directory = os.path.abspath(directory)
    # Created here, synchronously: orbax's own creation runs in a thread that a
    # process exiting on an error leaves to fail at interpreter shutdown.
    epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
    self._discard_uncommitted()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True,
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
    """Starts saving `state` (sharded jax arrays) and the data state at `step`."""
    if step in self.manager.all_steps():
      return False
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=DataStateSave(data_states)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """-> (state laid out as abstract_state's shardings/dtypes, data states)."""
    self.check_files(step)
    self.check_shapes(step, abstract_state)
    try:
      out = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data=DataStateRestore()))
    except ValueError as e:  # an intact checkpoint of another state layout is not corrupt
      if STRUCTURE_MISMATCH not in str(e):
        raise
      where = one_line(e).split(STRUCTURE_MISMATCH, 1)[1].split(" If this mismatch")[0]
      raise _ConfigMismatch(
          f"checkpoint {step} at {self.directory}/{step} holds another state layout than this "
          f"run's (the config or the code changed the optimizer or its labels){where.rstrip()}; "
          "resume it with the config and code that wrote it, or use a new workdir") from None
    return out["state"], out["data"]

  def check_files(self, step: int) -> None:
    """The JSON files of a step parse and its items exist: checked here, since orbax
    fed a garbage metadata file leaves its event loop to fail again at exit."""
    root = epath.Path(self.directory) / str(step)
    for item in ("state", "data"):
      if not (root / item).is_dir():
        raise CheckpointError(f"{root / item} is missing")
    for path in [root / "state" / "_METADATA", *(root / "data").glob("*.json")]:
      if path.exists():
        try:
          json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
          raise CheckpointError(f"{path} is not JSON: {one_line(e)}") from None
    try:
      check_ocdbt(root / "state")
    except Exception as e:  # noqa: BLE001 - tensorstore's errors of damaged files
      raise CheckpointError(f"{root / 'state'}: {one_line(e)}") from None

  def check_shapes(self, step: int, abstract_state: Any) -> None:
    """Stored shapes vs the config's (a changed config is not a corrupt checkpoint):
    a mismatch is a CheckpointError naming the tensor, before any array is read."""
    try:
      with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(str(epath.Path(self.directory) / str(step) / "state"))
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
    want = traverse_util.flatten_dict(dict(abstract_state["params"]), sep="/")
    bad = [f"params/{k}: checkpoint {tuple(have[k].shape)} vs config {tuple(w.shape)}"
           for k, w in want.items() if k in have and hasattr(have[k], "shape")
           and tuple(have[k].shape) != tuple(w.shape)]
    missing = [f"params/{k}: missing" for k in sorted(set(want) - set(have))]
    if bad or missing:
      raise _ConfigMismatch(f"checkpoint {step} at {self.directory}/{step} does not fit the "
                            f"config: {'; '.join((bad + missing)[:6])}")

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """(step, state, data states) of the newest intact checkpoint; None without any.

    A step that cannot be read is reported in one line (step, path, cause); with
    on_corrupt='fallback' it is renamed `<step>.corrupt` (so the run saves that step
    again) and the next older one is tried, with 'refuse' the line is an error.
    """
    steps = sorted(self.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        return (step, *self.restore(step, abstract_state))
      except _ConfigMismatch as e:
        raise CheckpointError(str(e)) from None
      except Exception as e:  # noqa: BLE001 - orbax, tensorstore and json raise many types
        where = f"{self.directory}/{step}"
        line = f"checkpoint {step} at {where} is corrupt or partial: {one_line(e)}"
        if self.cfg.on_corrupt == "refuse":
          raise CheckpointError(f"{line} (checkpoint.on_corrupt='refuse'; 'fallback' restores "
                                "the newest intact checkpoint)") from None
        older = steps[i + 1:]
        log.warning("%s; %s", line, f"falling back to checkpoint {older[0]}" if older
                    else "no older checkpoint")
        self._set_aside(step)
    if steps:
      raise CheckpointError(f"no intact checkpoint in {self.directory}: steps {sorted(steps)} "
                            "are all corrupt or partial (renamed <step>.corrupt)")
    return None

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

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class _ConfigMismatch(Exception):
  """A readable checkpoint whose shapes are not the config's (never a fallback)."""
