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
from flamingo_jax.models import layer_stack
from flamingo_jax.models.labels import component_of

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"  # written by orbax when a step is complete


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
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=DataStateRestore()))
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
      _check_ocdbt(root / "state")
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
    stored = _plain(stored) if stored is not None else {}
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


# --------------------------------------------------------------------------
# Parameter trees (frozen base weights, pretrained components)


def save_params(directory: str, params: Any, metadata: Optional[dict] = None) -> None:
  """Writes a parameter tree (e.g. one component's weights) synchronously."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), params, force=True,
               custom_metadata=metadata or {})


def params_exist(directory: str) -> bool:
  return os.path.isdir(directory) and bool(os.listdir(directory))


def check_params(directory: str, abstract: Any, what: str = "parameters") -> list[str]:
  """The checkpoint holds every tensor of `abstract` in its shape (metadata only, no
  array read): else a CheckpointError naming the tensors, both shapes and the
  directory. Returns the tensors it has beyond `abstract`."""
  directory = os.path.abspath(directory)
  if not params_exist(directory):
    raise CheckpointError(f"{what}: checkpoint directory {directory!r} does not exist or is "
                          "empty")
  stored = _stored_tree(directory, what)
  # either layer layout loads into both (model.scan_layers): compare in the stored one
  abstract = layer_stack.adapt_target(abstract, _plain(stored))[0]
  have = traverse_util.flatten_dict(_plain(stored), sep="/")
  want = traverse_util.flatten_dict(abstract, sep="/")
  missing = sorted(set(want) - set(have))
  if missing:
    raise CheckpointError(f"{what}: {len(missing)} tensors missing from {directory}: "
                          f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; it holds "
                          f"{sorted(have)[:8]}")
  bad = [f"{k}: checkpoint {tuple(have[k].shape)} vs model {tuple(want[k].shape)}"
         for k in want if tuple(have[k].shape) != tuple(want[k].shape)]
  if bad:
    raise CheckpointError(f"{what}: shape mismatch in {directory}: {'; '.join(bad[:8])}")
  return sorted(set(have) - set(want))


def restore_params(directory: str, abstract: Any, what: str = "parameters",
                   quiet_extra: bool = False) -> Any:
  """Restores a parameter tree into abstract's shardings and dtypes.

  abstract: tree of jax.ShapeDtypeStruct with .sharding. Tensors the checkpoint
  has beyond `abstract` (say an NFNet classifier head) are skipped with a
  warning; missing or misshapen ones are a CheckpointError naming them.
  """
  directory = os.path.abspath(directory)
  extra = check_params(directory, abstract, what)
  # a checkpoint of the other layer layout (scanned / unrolled) is converted once, here
  abstract, to_target_layout = layer_stack.adapt_target(
      abstract, _plain(_stored_tree(directory, what)))
  if extra and not quiet_extra:
    log.warning("%s: ignoring %d tensors of %s the model does not use: %s", what, len(extra),
                directory, extra[:8])
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      restored = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=restore_args, partial_restore=bool(extra)))
  except Exception as e:  # noqa: BLE001 - tensorstore / orbax errors of unreadable arrays
    raise CheckpointError(f"{what}: {directory} is corrupt or partial: {one_line(e)}") from None
  return to_target_layout(restored)


def _check_ocdbt(directory) -> None:
  """Lists an OCDBT checkpoint's keys with tensorstore directly (reads every b-tree
  node): damaged index files fail here, synchronously, instead of inside orbax's
  event loop, which fails again at interpreter exit with a cascade of tracebacks."""
  directory = epath.Path(directory)
  if not (directory / "manifest.ocdbt").exists() or "://" in str(directory):
    return
  import tensorstore as ts
  kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{directory}/"}).result()
  for key in kv.list().result():
    if key.endswith(b".zarray"):
      json.loads(kv.read(key).result().value)


def _stored_tree(directory: str, what: str) -> Any:
  """The metadata tree of a parameter checkpoint (shapes, no arrays), or a one-line
  CheckpointError (the JSON is parsed first: orbax fed garbage fails again at exit)."""
  path = epath.Path(directory) / "_METADATA"
  try:
    if path.exists():
      json.loads(path.read_text())
    _check_ocdbt(directory)
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(os.path.abspath(directory))
    cause = "orbax finds no item metadata"
    tree = getattr(getattr(meta, "item_metadata", None), "tree", None)
  except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable metadata
    tree, cause = None, one_line(e)
  if tree is None:
    raise CheckpointError(f"{what}: {os.path.abspath(directory)} is corrupt or partial: "
                          f"cannot read its metadata ({cause})")
  return tree


def read_params(directory: str) -> tuple[Any, dict]:
  """(parameter tree as saved, on the host; its custom metadata) of a save_params
  directory, for readers that have no target layout (the NFNet converter's loader)."""
  directory = os.path.abspath(directory)
  _stored_tree(directory, "parameter checkpoint")  # one-line errors for damaged files
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(directory).custom_metadata or {}
    return ckptr.restore(directory), dict(meta)


def stored_top_keys(directory: str, what: str = "parameter checkpoint") -> list[str]:
  """Top-level keys of a parameter checkpoint (without reading any array)."""
  return sorted(_plain(_stored_tree(directory, what)))


# --------------------------------------------------------------------------
# Components of the Flamingo parameter tree

# Components spread over several top-level keys (xattn_block_{i}, new_token_*).
MULTI_KEY_COMPONENTS = ("xattn", "new_tokens")


def top_keys_of(params: Mapping, components) -> list[str]:
  """Top-level param keys belonging to `components` (see models.labels.component_of)."""
  return [k for k in params if component_of(k) in components]


def component_tree(params: Mapping, component: str) -> Any:
  """A component's own checkpoint tree: params[component], or {top key: subtree}
  for the components spread over several keys (xattn, new_tokens)."""
  if component in MULTI_KEY_COMPONENTS:
    return {k: params[k] for k in top_keys_of(params, [component])}
  return params[component]


def with_component(params: Mapping, component: str, tree: Any) -> dict:
  """params with `component` set to `tree` (the inverse of component_tree)."""
  params = dict(params)
  if component in MULTI_KEY_COMPONENTS:
    params.update(tree)
  else:
    params[component] = tree
  return params


def _component_target(directory: str, component: str, abstract: Any, what: str):
  """(target tree, whole Flamingo tree?) for either checkpoint layout of a component."""
  if not params_exist(directory):
    raise CheckpointError(f"{what}: checkpoint directory {os.path.abspath(directory)!r} does "
                          "not exist or is empty")
  stored = stored_top_keys(directory, what)
  if component in MULTI_KEY_COMPONENTS:
    whole_tree = any(component_of(k) != component for k in stored)
  else:
    whole_tree = component in stored
  if whole_tree and component not in MULTI_KEY_COMPONENTS:
    return {component: abstract}, True
  return abstract, whole_tree


def check_component(directory: str, component: str, abstract: Any, what: str = "") -> None:
  """restore_component's checks (tensors and shapes, from metadata) without reading arrays."""
  what = what or f"model_init / frozen weights of {component!r}"
  check_params(directory, _component_target(directory, component, abstract, what)[0], what)


def restore_component(directory: str, component: str, abstract: Any) -> Any:
  """One component's weights, from either checkpoint layout:
    * the component's own tree (`python -m flamingo_jax.convert nfnet`, the
      trainer's workdir/frozen/<component>), or
    * a whole Flamingo parameter tree (the converters' OUT/params), from which
      only this component is read.
  abstract: component_tree of ShapeDtypeStructs with target shardings/dtypes.
  """
  what = f"model_init / frozen weights of {component!r}"
  target, whole_tree = _component_target(directory, component, abstract, what)
  restored = restore_params(directory, target, what, quiet_extra=whole_tree)
  return restored[component] if whole_tree and component not in MULTI_KEY_COMPONENTS \
      else restored


def _plain(tree):
  """Orbax metadata tree -> nested dicts with leaves that have .shape."""
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree
