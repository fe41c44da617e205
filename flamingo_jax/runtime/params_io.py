"""Parameter trees on disk (orbax): write one, check it against a model's abstract tree from
metadata alone, and restore it straight into target shardings and dtypes, so no host ever
holds a full copy. Used by every reader of weights: the trainers' frozen components and
exports, model directories (evaluate, generate), the converters.

A checkpoint of either layer layout (`model.scan_layers` stacked or unrolled) restores into
both (models/layer_stack.adapt_target).

Every tree is written with a checksum per array (runtime/checksum.py, in the orbax custom
metadata, `checksums`) and verified when it is restored, so damaged bytes that still decode
are found too. Damage is one CheckpointError line, `checkpoint at DIR: array NAME: CAUSE`;
a directory written before checksums existed restores with one warning.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from flamingo_jax.errors import CheckpointError, brief, corrupt_line
from flamingo_jax.models import layer_stack
from flamingo_jax.runtime import checksum

log = logging.getLogger(__name__)

CHECKSUMS = "checksums"  # the custom metadata key of the record
_warned_unverified: set = set()


def save_params(directory: str, params: Any, metadata: Optional[dict] = None) -> None:
  """Writes a parameter tree (e.g. one component's weights) synchronously, with its
  checksums (computed where the arrays are: devices or host)."""
  record, _ = checksum.tree_record(params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), params, force=True,
               custom_metadata={**(metadata or {}), CHECKSUMS: record})


def checksum_record(directory, step: Optional[int] = None) -> Optional[dict]:
  """The checksum record of a checkpoint directory (DIR/_CHECKPOINT_METADATA's custom
  metadata), None for one written before checksums; unreadable: a one-line error."""
  path = epath.Path(directory) / "_CHECKPOINT_METADATA"
  if not path.exists():
    return None
  try:
    meta = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(corrupt_line(str(directory), path.name, f"not JSON ({brief(e, 60)})",
                                       step, "file")) from None
  custom = meta.get("custom_metadata") if isinstance(meta, dict) else None
  if not isinstance(custom, dict):
    raise CheckpointError(corrupt_line(str(directory), path.name, "no custom_metadata mapping",
                                       step, "file"))
  return custom.get(CHECKSUMS)


def warn_unverified(directory: str) -> None:
  """One warning per directory for a checkpoint written before checksums existed."""
  if directory not in _warned_unverified:
    _warned_unverified.add(directory)
    log.warning("%s has no checksums (written before they existed): restored unverified",
                directory)


def read_in_stored_dtypes(abstract: Any, record: Optional[dict]) -> Any:
  """abstract with each leaf in the dtype it was written in (per the record), so that the
  restored bytes can be verified before any cast; 64-bit types stay as asked."""
  stored = checksum.stored_dtypes(record)

  def leaf(name, a):
    want = stored.get(name, "")
    if not want or want == np.dtype(a.dtype).name or np.dtype(want).itemsize > 4:
      return a
    return jax.ShapeDtypeStruct(a.shape, np.dtype(want), sharding=getattr(a, "sharding", None))

  named = checksum.named_leaves(abstract)
  leaves = [leaf(n, a) for n, a in named.items()]
  return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def verify_and_cast(record: Optional[dict], restored: Any, abstract: Any, directory: str,
                    step: Optional[int] = None) -> Any:
  """Verifies restored arrays against the record (a mismatch: one-line CheckpointError),
  then casts each to abstract's dtype on its devices. Leaves of a 64-bit written dtype
  that this process restores in 32 bits cannot be verified and are skipped."""
  if record is None:
    warn_unverified(directory)
  else:
    stored = checksum.stored_dtypes(record)
    named = checksum.named_leaves(restored)
    check = {n: x for n, x in named.items()
             if stored.get(n, "") == np.dtype(x.dtype).name or n not in stored}
    try:
      checksum.verify(record, check)
    except checksum.CorruptError as e:
      raise CheckpointError(corrupt_line(directory, e.name, e.cause, step, e.kind)) from None
  return jax.tree.map(lambda x, a: x if x.dtype == a.dtype else _cast(x, a.dtype), restored,
                      abstract)


def _cast(x, dtype):
  return jax.jit(lambda y: y.astype(dtype), out_shardings=x.sharding)(x) \
      if isinstance(x, jax.Array) else np.asarray(x).astype(dtype)


def _short(msg: str, root: str, limit: int = 90) -> str:
  """A TensorStore message without its JSON specs, database paths and quoted full paths
  (files named relative to root), cut to limit characters."""
  msg = re.sub(r'(?: in OCDBT database)? at (?:local )?file "[^"]*/"', "", msg)
  msg = re.sub(r'(?:local )?file "([^"]+)"',
               lambda m: os.path.relpath(m.group(1), root) if m.group(1).startswith("/")
               else m.group(1), msg)
  return msg if len(msg) <= limit else msg[:limit - 3].rstrip() + "..."


def restore_error(e: BaseException, directory: str, step: Optional[int] = None,
                  prefix: str = "") -> str:
  """An orbax / TensorStore error of reading arrays as `checkpoint [STEP] at DIR: array
  NAME: CAUSE` (TensorStore's JSON specs and full paths left out). prefix: the item
  directory the arrays are in (`state/`)."""
  chain, x = [], e  # orbax wraps TensorStore's error (the one naming the array) in its own
  while x is not None and len(chain) < 8:
    chain.append(brief(x, 1000))
    x = x.__cause__ or x.__context__
  named = [c for c in chain if re.search(r'(?:reading|key) "', c)]
  msg = named[0] if named else chain[0]
  m = re.search(r'(?:reading|key) "([^"]+?)(?:/[0-9.]*)?"', msg)
  if m:
    name = prefix + m.group(1).replace(".", "/")
    cause = re.sub(r'^.*?[Ee]rror reading "[^"]*"(?: in OCDBT database at (?:local )?file '
                   r'"[^"]*")?: ', "", msg)
    return corrupt_line(directory, name, _short(cause, directory), step)
  m = re.search(r'local file "([^"]*[^/"])"[^:]*: ', msg)  # one file (not a database)
  if m and m.group(1).startswith("/"):
    return corrupt_line(directory, os.path.relpath(m.group(1), directory),
                        _short(msg[m.end():], directory), step, "file")
  return corrupt_line(directory, prefix + "?", _short(msg, directory), step)


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
  """Restores a parameter tree into abstract's shardings and dtypes, verified.

  abstract: tree of jax.ShapeDtypeStruct with .sharding. Tensors the checkpoint
  has beyond `abstract` (say an NFNet classifier head) are skipped with a
  warning; missing or misshapen ones are a CheckpointError naming them. Arrays are
  read in their written dtype, verified against their checksums on the devices, then
  cast (a transient copy in the written dtype of arrays stored wider than asked).
  """
  directory = os.path.abspath(directory)
  extra = check_params(directory, abstract, what)
  # a checkpoint of the other layer layout (scanned / unrolled) is converted once, here
  abstract, to_target_layout = layer_stack.adapt_target(
      abstract, plain_tree(_stored_tree(directory, what)))
  if extra and not quiet_extra:
    log.warning("%s: ignoring %d tensors of %s the model does not use: %s", what, len(extra),
                directory, extra[:8])
  record = checksum_record(directory)
  read = read_in_stored_dtypes(abstract, record)  # verified as written, then cast
  restore_args = ocp.checkpoint_utils.construct_restore_args(read)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      restored = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
          item=read, restore_args=restore_args, partial_restore=bool(extra)))
  except Exception as e:  # noqa: BLE001 - tensorstore / orbax errors of unreadable arrays
    raise CheckpointError(restore_error(e, directory)) from None
  return to_target_layout(verify_and_cast(record, restored, abstract, directory))


def check_ocdbt(directory, step: Optional[int] = None, root=None) -> None:
  """Lists an OCDBT checkpoint's keys with tensorstore directly (reads every b-tree
  node): damaged index files fail here, synchronously, instead of inside orbax's
  event loop, which fails again at interpreter exit with a cascade of tracebacks."""
  directory = epath.Path(directory)
  if not (directory / "manifest.ocdbt").exists() or "://" in str(directory):
    return
  import tensorstore as ts
  try:
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{directory}/"}).result()
    for key in kv.list().result():
      if key.endswith(b".zarray"):
        json.loads(kv.read(key).result().value)
  except Exception as e:  # noqa: BLE001 - tensorstore's errors of damaged files
    root = str(root or directory)
    msg = brief(e, 1000)
    files = re.findall(r'local file "([^"]+[^/"])"', msg)
    name = os.path.relpath(files[0] if files else str(directory / "manifest.ocdbt"), root)
    raise CheckpointError(corrupt_line(root, name, "index: " + _short(
        re.sub(r"^.*?local file \"[^\"]+[^/\"]\": ", "", msg), root, 70), step, "file")) from None


def _stored_tree(directory: str, what: str) -> Any:
  """The metadata tree of a parameter checkpoint (shapes, no arrays), or a one-line
  CheckpointError (the JSON is parsed first: orbax fed garbage fails again at exit)."""
  directory = os.path.abspath(directory)
  root = epath.Path(directory)
  for path in [root / "_METADATA", root / "_sharding", *(root / "array_metadatas").glob("*")]:
    try:
      if path.exists():
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(corrupt_line(directory, str(path.relative_to(root)),
                                         f"not JSON ({brief(e, 60)})", kind="file")) from None
  checksum_record(directory)  # parses _CHECKPOINT_METADATA
  check_ocdbt(directory)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(directory)
    cause = "orbax finds no item metadata"
    tree = getattr(getattr(meta, "item_metadata", None), "tree", None)
  except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable metadata
    tree, cause = None, brief(e, 80)
  if tree is None:
    raise CheckpointError(corrupt_line(directory, "_METADATA", f"cannot read the metadata "
                                       f"({cause})", kind="file"))
  return tree


def read_params(directory: str) -> tuple[Any, dict]:
  """(parameter tree as saved, on the host; its custom metadata) of a save_params
  directory, for readers that have no target layout (the NFNet converter's loader)."""
  directory = os.path.abspath(directory)
  _stored_tree(directory, "parameter checkpoint")  # one-line errors for damaged files
  record = checksum_record(directory)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = dict(ckptr.metadata(directory).custom_metadata or {})
      params = ckptr.restore(directory)
  except Exception as e:  # noqa: BLE001 - tensorstore / orbax errors of unreadable arrays
    raise CheckpointError(restore_error(e, directory)) from None
  meta.pop(CHECKSUMS, None)
  return verify_and_cast(record, params, params, directory), meta


def stored_top_keys(directory: str, what: str = "parameter checkpoint") -> list[str]:
  """Top-level keys of a parameter checkpoint (without reading any array)."""
  return sorted(plain_tree(_stored_tree(directory, what)))


def plain_tree(tree):
  """Orbax metadata tree -> nested dicts with leaves that have .shape."""
  if hasattr(tree, "items"):
    return {k: plain_tree(v) for k, v in tree.items()}
  return tree
