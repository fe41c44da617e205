"""Parameter trees on disk (orbax): write one, check it against a model's abstract tree from
metadata alone, and restore it straight into target shardings and dtypes, so no host ever
holds a full copy. Used by every reader of weights: the trainers' frozen components and
exports, model directories (evaluate, generate), the converters.

A checkpoint of either layer layout (`model.scan_layers` stacked or unrolled) restores into
both (models/layer_stack.adapt_target). Damaged files are one-line CheckpointErrors.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from flamingo_jax.errors import CheckpointError, one_line
from flamingo_jax.models import layer_stack

log = logging.getLogger(__name__)


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
  abstract = layer_stack.adapt_target(abstract, plain_tree(stored))[0]
  have = traverse_util.flatten_dict(plain_tree(stored), sep="/")
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
      abstract, plain_tree(_stored_tree(directory, what)))
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


def check_ocdbt(directory) -> None:
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
    check_ocdbt(directory)
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
  return sorted(plain_tree(_stored_tree(directory, what)))


def plain_tree(tree):
  """Orbax metadata tree -> nested dicts with leaves that have .shape."""
  if hasattr(tree, "items"):
    return {k: plain_tree(v) for k, v in tree.items()}
  return tree
