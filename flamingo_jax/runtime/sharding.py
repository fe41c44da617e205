"""The device mesh, and how parameters, optimizer state and batches are laid out on it.

Mesh axes, outermost first:
  slice   across slices / nodes (DCN): pure data parallelism over the slow network
  data    data parallelism (ZeRO-1 shards the optimizer state over it)
  fsdp    fully-sharded data parallelism: batch *and* parameters sharded
  tensor  Megatron tensor parallelism: heads, FFW hidden units, vocabulary
Sizes come from config (`mesh.data = -1` takes the devices the others leave).

Models only name logical axes (`embed`, `heads`, `activation_batch`, ...,
see models/layers.py); `mesh.rules`, an ordered list of (logical, mesh axes),
maps them to mesh axes, so changing the parallelism strategy is a config
change. On top of the rules:
  * a mesh axis that does not divide a dimension is dropped for that array
    (replicated instead of a compile error), and reported;
  * FSDP fallback: a parameter with at least `mesh.fsdp_min_size` elements that
    the rules leave unsharded over `fsdp` gets its largest divisible dimension
    sharded over `fsdp`, so a new layer is never silently replicated;
  * ZeRO-1 (`mesh.zero1`): optimizer moments are additionally sharded over
    `data` while the parameters stay replicated over it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("slice", "data", "fsdp", "tensor")
BATCH_AXES = ("slice", "data", "fsdp")

# (logical axis, mesh axes): earlier rules win; a mesh axis is used at most
# once per array, so ('visual_embed', 'fsdp') only applies where 'embed' did not
# already take 'fsdp'.
DEFAULT_RULES = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_visual_length", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("visual_embed", "fsdp"),
    ("kv", None),
    ("layers", None),  # the stacked axis of scanned layers (model.scan_layers)
    ("latents", None),
    ("frames", None),
    # The paper keeps the vision encoder unsharded (FSDP fallback still applies).
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """`mesh` section of a config."""
  slice: int = 1
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: tuple = DEFAULT_RULES
  zero1: bool = False
  fsdp_min_size: int = 2 ** 18  # elements; FSDP fallback threshold


def _mesh_axes_value(value, where: str):
  """A rule's right-hand side: None, an axis name, or a tuple of axis names."""
  if value is None:
    return None
  names = (value,) if isinstance(value, str) else tuple(value)
  for name in names:
    if name not in MESH_AXES:
      raise ValueError(f"{where}: unknown mesh axis {name!r}; mesh axes are {list(MESH_AXES)}")
  return names[0] if len(names) == 1 else names


def mesh_config(cfg: Any) -> MeshConfig:
  """Validated MeshConfig from the `mesh` ConfigDict (or dict); errors name the key."""
  if cfg is None:
    return MeshConfig()
  if isinstance(cfg, MeshConfig):
    items = dataclasses.asdict(cfg)
  else:
    items = dict(cfg.items())
  fields = {f.name for f in dataclasses.fields(MeshConfig)}
  for key in items:
    if key not in fields:
      raise ValueError(f"unknown config key 'mesh.{key}'; valid keys: {', '.join(sorted(fields))}")
  for axis in MESH_AXES:
    v = items.get(axis, getattr(MeshConfig, axis))
    if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
      raise ValueError(f"config key 'mesh.{axis}' must be a positive int or -1, got {v!r}")
  sizes = [items.get(a, getattr(MeshConfig, a)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one of mesh.{{{','.join(MESH_AXES)}}} may be -1, got {sizes}")
  rules = []
  for i, rule in enumerate(items.get("rules", DEFAULT_RULES)):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"config key 'mesh.rules[{i}]' must be a (logical axis, mesh axes) pair, "
                       f"got {rule!r}")
    rules.append((rule[0], _mesh_axes_value(rule[1], f"config key 'mesh.rules[{i}]'")))
  items["rules"] = tuple(rules)
  if not isinstance(items.get("zero1", False), bool):
    raise ValueError(f"config key 'mesh.zero1' must be a bool, got {items['zero1']!r}")
  if int(items.get("fsdp_min_size", 0)) < 0:
    raise ValueError("config key 'mesh.fsdp_min_size' must be >= 0")
  return MeshConfig(**items)


# --------------------------------------------------------------------------
# Mesh


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Axis sizes with -1 resolved; raises if they do not multiply to num_devices."""
  sizes = {a: getattr(cfg, a) for a in MESH_AXES}
  known = math.prod(v for v in sizes.values() if v != -1)
  for axis, v in sizes.items():
    if v == -1:
      if num_devices % known:
        raise ValueError(
            f"mesh.{axis}=-1 cannot take the rest: {num_devices} devices are not divisible by "
            f"the product {known} of the other mesh axes {sizes}")
      sizes[axis] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices but "
                     f"{num_devices} are available; set one axis to -1 or fix the sizes (on a CPU, "
                     "--fake_devices=N runs on N fake devices)")
  return sizes


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Mesh with axes MESH_AXES. `slice` > 1 builds a hybrid ICI x DCN mesh."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  if sizes["slice"] > 1:
    # Granules: TPU slices, else processes (one per GPU node).
    by_process = not hasattr(devices[0], "slice_index")
    attr = "process_index" if by_process else "slice_index"
    granules = len({getattr(d, attr) for d in devices})
    if granules == sizes["slice"]:
      grid = mesh_utils.create_hybrid_device_mesh(
          (1,) + shape[1:], (sizes["slice"], 1, 1, 1), devices, process_is_granule=by_process)
    elif granules == 1:  # one host emulating slices (fake devices): contiguous blocks
      grid = np.asarray(devices).reshape(shape)
    else:
      raise ValueError(f"mesh.slice={sizes['slice']} but the devices form {granules} "
                       f"{'processes' if by_process else 'slices'}")
  else:
    try:
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in names)


# --------------------------------------------------------------------------
# Array layouts


def _as_tuple(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _from_tuple(names: tuple[str, ...]):
  if not names:
    return None
  return names[0] if len(names) == 1 else names


def fit_spec(spec: Sequence, shape: Sequence[int], mesh: Mesh) -> tuple:
  """Drops size-1 mesh axes, then axes (innermost first) until each dimension is divisible."""
  out = []
  for entry, dim in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
    names = tuple(n for n in _as_tuple(entry) if mesh.shape[n] > 1)
    while names and dim % axis_size(mesh, names):
      names = names[:-1]
    out.append(_from_tuple(names))
  return tuple(out)


def used_axes(spec: Sequence) -> set[str]:
  return {a for entry in spec for a in _as_tuple(entry)}


def add_axis(spec: Sequence, shape: Sequence[int], mesh: Mesh, axis: str,
             min_size: int = 0) -> tuple:
  """Shards one more dimension over `axis`: the largest unsharded divisible
  dimension, else the largest sharded one it still divides. No-op when the
  axis has size 1, is already used, or the array is smaller than min_size."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  n = mesh.shape[axis]
  if n == 1 or axis in used_axes(spec) or math.prod(shape) < max(min_size, 1):
    return spec
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for unsharded_first in (True, False):
    for i in order:
      names = _as_tuple(spec[i])
      if bool(names) == unsharded_first:
        continue
      if shape[i] % (axis_size(mesh, names) * n) == 0:
        return spec[:i] + (_from_tuple(names + (axis,)),) + spec[i + 1:]
  return spec


def logical_spec_tree(boxed_params: Any) -> Any:
  """Logical PartitionSpec per leaf of a (boxed) flax param tree."""
  return nn.get_partition_spec(boxed_params)


def param_specs(boxed_params: Any, mesh: Mesh, cfg: MeshConfig) -> Any:
  """Mesh PartitionSpec per parameter: rules, divisibility, FSDP fallback.

  boxed_params: the abstract `params` collection with LogicallyPartitioned
  boxes (from jax.eval_shape of model.init); unannotated leaves are allowed.
  """
  logical = logical_spec_tree(boxed_params)
  shapes = nn.unbox(boxed_params)

  def one(lspec, leaf):
    names = tuple(lspec) if lspec is not None else ()
    names = names + (None,) * (leaf.ndim - len(names))
    spec = tuple(nn.logical_to_mesh_axes(names, cfg.rules)) if names else ()
    spec = fit_spec(spec, leaf.shape, mesh)
    spec = add_axis(spec, leaf.shape, mesh, "fsdp", cfg.fsdp_min_size)
    return P(*spec)

  return jax.tree.map(one, logical, shapes,
                      is_leaf=lambda x: isinstance(x, P) or x is None)


def zero1_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """The spec of an optimizer moment under ZeRO-1: also sharded over `data`."""
  return P(*add_axis(tuple(spec), shape, mesh, "data"))


def named(mesh: Mesh, specs: Any) -> Any:
  """PartitionSpec tree -> NamedSharding tree."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(ndim: int) -> P:
  """Leading (batch) dimension over every data-parallel axis."""
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_shards(mesh: Mesh) -> int:
  return axis_size(mesh, BATCH_AXES)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings (restore / AOT-compile targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def bytes_per_device(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of a sharded tree (largest shard per leaf)."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
  return total


def describe(specs: Any) -> dict[str, str]:
  """{'path/to/leaf': 'P(...)'} for logs and golden files."""
  flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  return {"/".join(str(getattr(k, "key", k)) for k in path): str(spec) for path, spec in flat}
