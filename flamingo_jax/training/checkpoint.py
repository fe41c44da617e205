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
filesystem without atomic renames) is removed, never restored. Restoring onto a different mesh is a restore
with other target shardings.
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


def checkpoint_config(cfg: Any) -> CheckpointConfig:
  c = cfg if isinstance(cfg, CheckpointConfig) else from_config_dict(
      CheckpointConfig, cfg or {}, "checkpoint")
  if c.every < 0:
    raise ValueError(f"config key 'checkpoint.every' must be >= 0, got {c.every}")
  if c.keep < 1:
    raise ValueError(f"config key 'checkpoint.keep' must be >= 1, got {c.keep}")
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
      raise ValueError(f"no data-iterator state for this process at {path} (found {found}); "
                       "was the checkpoint written with a different number of processes?")
    return json.loads(path.read_text())

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
    self._discard_uncommitted()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True,
        cleanup_tmp_directories=True)
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
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=DataStateRestore()))
    return out["state"], out["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# --------------------------------------------------------------------------
# Parameter trees (frozen base weights, pretrained components)


def save_params(directory: str, params: Any, metadata: Optional[dict] = None) -> None:
  """Writes a parameter tree (e.g. one component's weights) synchronously."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), params, force=True,
               custom_metadata=metadata or {})


def params_exist(directory: str) -> bool:
  return os.path.isdir(directory) and bool(os.listdir(directory))


def restore_params(directory: str, abstract: Any, what: str = "parameters",
                   quiet_extra: bool = False) -> Any:
  """Restores a parameter tree into abstract's shardings and dtypes.

  abstract: tree of jax.ShapeDtypeStruct with .sharding. Tensors the checkpoint
  has beyond `abstract` (say an NFNet classifier head) are skipped with a
  warning; missing or misshapen ones are a ValueError naming them.
  """
  directory = os.path.abspath(directory)
  if not params_exist(directory):
    raise ValueError(f"{what}: checkpoint directory {directory!r} does not exist or is empty")
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(directory).item_metadata.tree
  have = traverse_util.flatten_dict(_plain(stored), sep="/")
  want = traverse_util.flatten_dict(abstract, sep="/")
  missing = sorted(set(want) - set(have))
  if missing:
    raise ValueError(f"{what}: {len(missing)} tensors missing from {directory}: "
                     f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; it holds "
                     f"{sorted(have)[:8]}")
  bad = [f"{k}: checkpoint {tuple(have[k].shape)} vs model {tuple(want[k].shape)}"
         for k in want if tuple(have[k].shape) != tuple(want[k].shape)]
  if bad:
    raise ValueError(f"{what}: shape mismatch in {directory}: {bad[:8]}")
  extra = sorted(set(have) - set(want))
  if extra and not quiet_extra:
    log.warning("%s: ignoring %d tensors of %s the model does not use: %s", what, len(extra),
                directory, extra[:8])
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(directory, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=restore_args, partial_restore=bool(extra)))


def stored_top_keys(directory: str) -> list[str]:
  """Top-level keys of a parameter checkpoint (without reading any array)."""
  with ocp.StandardCheckpointer() as ckptr:
    return sorted(_plain(ckptr.metadata(os.path.abspath(directory)).item_metadata.tree))


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


def restore_component(directory: str, component: str, abstract: Any) -> Any:
  """One component's weights, from either checkpoint layout:
    * the component's own tree (`python -m flamingo_jax.convert nfnet`, the
      trainer's workdir/frozen/<component>), or
    * a whole Flamingo parameter tree (the converters' OUT/params), from which
      only this component is read.
  abstract: component_tree of ShapeDtypeStructs with target shardings/dtypes.
  """
  if not params_exist(directory):
    raise ValueError(f"model_init / frozen weights of {component!r}: checkpoint directory "
                     f"{os.path.abspath(directory)!r} does not exist or is empty")
  stored = stored_top_keys(directory)
  if component in MULTI_KEY_COMPONENTS:
    whole_tree = any(component_of(k) != component for k in stored)
  else:
    whole_tree = component in stored
  what = f"model_init / frozen weights of {component!r}"
  if not whole_tree:
    return restore_params(directory, abstract, what)
  target = {component: abstract} if component not in MULTI_KEY_COMPONENTS else abstract
  restored = restore_params(directory, target, what, quiet_extra=True)
  return restored[component] if component not in MULTI_KEY_COMPONENTS else restored


def _plain(tree):
  """Orbax metadata tree -> nested dicts with leaves that have .shape."""
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree
