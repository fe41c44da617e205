"""Scanned layers: blocks whose parameters are stacked on a leading `layers` axis.

With `model.scan_layers`, the LM's blocks are one parameter tree `lm/blocks`
with every leaf [num_layers, ...] and the GATED XATTN-DENSE blocks one tree
`xattn_blocks` with every leaf [num_xattn, ...] (in the order of
`xattn_layer_indices`). The forward pass runs them under `jax.lax.scan`, so
XLA compiles one block instead of num_layers: compile time is nearly flat in
depth. The unrolled layout (`lm/blocks_{i}`, `xattn_block_{i}`, one module per
block) is what the converters write; `to_layout` is the one conversion
between the two, applied where weights are loaded (checkpoint restore and
model directories), so a checkpoint of either layout loads into both.

A stacked block is a template module (no parent) applied functionally to one
slice of the stack: `apply_block(template, params_i, ...)`. Remat policies
(`model.remat`) wrap that application inside the scan body.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.models.config import xattn_layer_indices

# The logical name of the stacked axis (sharding rules map it, by default to no mesh axis).
LAYERS_AXIS = "layers"
LM_STACK = "blocks"  # under the `lm` component
XATTN_STACK = "xattn_blocks"  # a top-level key, component `xattn`
_LM_BLOCK = re.compile(r"^blocks_(\d+)$")
_XATTN_BLOCK = re.compile(r"^xattn_block_(\d+)$")


def remat_policy(name: str) -> Callable[[Callable], Callable]:
  """model.remat -> a wrapper of a block's function: none | block (recompute all) | dots."""
  if name == "none":
    return lambda f: f
  policy = {"block": None, "dots": jax.checkpoint_policies.dots_saveable}[name]
  return lambda f: jax.checkpoint(f, policy=policy, prevent_cse=False)


def remat_module(cls: type, name: str) -> type:
  """model.remat for the unrolled layout: the module class, wrapped by nn.remat."""
  if name == "none":
    return cls
  policy = {"block": None, "dots": jax.checkpoint_policies.dots_saveable}[name]
  return nn.remat(cls, policy=policy)


def stacked_param(module: nn.Module, name: str, template: nn.Module, length: int,
                  example_args: Sequence[Any]) -> Any:
  """A param `name` holding `length` independently initialised copies of
  `template`'s params, each leaf [length, ...] with `layers` prepended to its
  logical axes. example_args: inputs of the template's __call__ (shapes only
  matter; parameter shapes do not depend on batch or length)."""
  def init(rng):
    def one(key):
      return template.init(key, *example_args)["params"]
    stacked = jax.vmap(one)(jax.random.split(rng, length))
    return jax.tree.map(
        lambda b: b.add_axis(0, {nn.PARTITION_NAME: LAYERS_AXIS})
        if isinstance(b, nn.Partitioned) else b,
        stacked, is_leaf=lambda b: isinstance(b, nn.Partitioned))
  return module.param(name, init)


def apply_block(template: nn.Module, params: Any, *args):
  """One block of a stack: template applied to its params slice."""
  return template.apply({"params": params}, *args)


def take(stacked: Any, index) -> Any:
  """Layer `index` of a stacked tree (leaves [n, ...] -> [...])."""
  return jax.tree.map(lambda a: a[index], stacked)


def take_range(stacked: Any, start: int, stop: int, groups: int = 0) -> Any:
  """Layers [start, stop) of a stacked tree; groups > 0 reshapes them to [groups, n/groups, ...]."""
  def one(a):
    a = a[start:stop]
    return a.reshape((groups, -1) + a.shape[1:]) if groups else a
  return jax.tree.map(one, stacked)


def scan(fn: Callable, x, stacked: Any):
  """x -> fn(x, params_i) for every layer of `stacked`, in order, under lax.scan."""
  if not jax.tree.leaves(stacked) or jax.tree.leaves(stacked)[0].shape[0] == 0:
    return x
  return jax.lax.scan(lambda h, p: (fn(h, p), None), x, stacked)[0]


# --------------------------------------------------------------------------
# The plan: how the LM blocks and the cross-attention blocks interleave

def plan(num_layers: int, xattn_indices: Sequence[int]) -> list[tuple]:
  """The scanned forward pass as steps over the stacks:

    ("lm", start, stop)             LM blocks [start, stop), one scan
    ("groups", k0, count, start, n) `count` groups, one scan: xattn block
                                    k0 + g, then LM blocks start + g*n .. + n
    ("xattn", k)                    xattn block k alone

  Regularly spaced cross-attention (every paper size, either placement)
  becomes at most one prefix, one scan over groups and one tail, whatever the
  depth: 80B (80 layers, every 7: blocks 0..77) is groups 0..10 of 7 LM
  blocks and a tail of xattn 11 + LM blocks 77..79.
  """
  idx = list(xattn_indices)
  steps: list[tuple] = []

  def lm(start, stop):
    if stop > start:
      steps.append(("lm", start, stop))

  gaps = {b - a for a, b in zip(idx, idx[1:])}
  if len(idx) >= 2 and len(gaps) == 1:
    n = gaps.pop()
    lm(0, idx[0])
    count = len(idx) if idx[-1] + n <= num_layers else len(idx) - 1
    steps.append(("groups", 0, count, idx[0], n))
    if count < len(idx):
      steps.append(("xattn", len(idx) - 1))
      lm(idx[-1], num_layers)
    else:
      lm(idx[-1] + n, num_layers)
    return steps
  prev = 0
  for k, i in enumerate(idx):
    lm(prev, i)
    steps.append(("xattn", k))
    prev = i
  lm(prev, num_layers)
  return steps


# --------------------------------------------------------------------------
# Converting between the layouts

def _unbox(v):
  return v.value if isinstance(v, nn.meta.AxisMetadata) else v


_BOXED = dict(is_leaf=lambda v: isinstance(v, nn.meta.AxisMetadata))


def _stack(trees: list) -> Any:
  """Arrays: jnp.stack; ShapeDtypeStructs (restore targets): one with a leading
  axis, sharded like its slices with the layers axis unsharded."""
  def one(*leaves):
    leaves = [_unbox(x) for x in leaves]
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
      sharding = first.sharding
      if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
      return jax.ShapeDtypeStruct((len(leaves),) + first.shape, first.dtype, sharding=sharding)
    return jnp.stack(leaves)
  return jax.tree.map(one, *trees, **_BOXED)


def _unstack(tree: Any, n: int) -> list:
  """The inverse of `_stack` (ShapeDtypeStructs: slices sharded without the layers axis)."""
  def one(a, i):
    a = _unbox(a)
    if isinstance(a, jax.ShapeDtypeStruct):
      sharding = a.sharding
      if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
      return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=sharding)
    return a[i]
  return [jax.tree.map(lambda a, i=i: one(a, i), tree, **_BOXED) for i in range(n)]


def layout_of(tree: Any) -> Optional[str]:
  """'scanned' | 'unrolled' | None (no blocks) of a Flamingo tree, part of one (a
  component's own tree) or a bare LM tree; checkpoint metadata trees too."""
  if not hasattr(tree, "keys"):
    return None
  levels = [tree] + ([tree["lm"]] if hasattr(tree.get("lm"), "keys") else [])
  keys = [k for level in levels for k in level]
  if XATTN_STACK in keys or LM_STACK in keys:
    return "scanned"
  if any(_XATTN_BLOCK.match(k) or _LM_BLOCK.match(k) for k in keys):
    return "unrolled"
  return None


def lm_to_scanned(lm: Any) -> Any:
  """An LM tree with `blocks_{i}` -> one with `blocks` (leaves [num_layers, ...])."""
  blocks = sorted((int(m.group(1)), k) for k in lm if (m := _LM_BLOCK.match(k)))
  if not blocks:
    return lm
  if [i for i, _ in blocks] != list(range(len(blocks))):
    raise ValueError(f"LM blocks are not numbered 0..{len(blocks) - 1}: "
                     f"{[k for _, k in blocks]}")
  out = {k: v for k, v in lm.items() if not _LM_BLOCK.match(k)}
  out[LM_STACK] = _stack([lm[k] for _, k in blocks])
  return out


def lm_to_unrolled(lm: Any) -> Any:
  """The inverse of `lm_to_scanned`."""
  if LM_STACK not in lm:
    return lm
  n = jax.tree.leaves(lm[LM_STACK])[0].shape[0]
  out = {k: v for k, v in lm.items() if k != LM_STACK}
  out.update({f"blocks_{i}": b for i, b in enumerate(_unstack(lm[LM_STACK], n))})
  return out


def _xattn_indices(tree: Any) -> list[int]:
  return sorted(int(m.group(1)) for k in tree if (m := _XATTN_BLOCK.match(k)))


def to_scanned(params: Any, xattn_indices: Optional[Sequence[int]] = None) -> Any:
  """A Flamingo param tree (or part of one, or a bare LM tree) in the unrolled
  layout -> scanned. Keys it does not concern pass through unchanged (a
  component's own tree). xattn_indices: the model's placement (default: the
  blocks the tree has, in order)."""
  params = lm_to_scanned(dict(params))
  if xattn_indices is None:
    xattn_indices = _xattn_indices(params)
  if "lm" in params:
    params["lm"] = lm_to_scanned(params["lm"])
  keys = [f"xattn_block_{i}" for i in xattn_indices]
  present = [k for k in keys if k in params]
  if present:
    missing = sorted(set(keys) - set(present))
    extra = sorted(k for k in params if _XATTN_BLOCK.match(k) and k not in keys)
    if missing or extra:
      raise ValueError(f"cross-attention blocks {missing or extra} do not match the model's "
                       f"placement (blocks before LM layers {list(xattn_indices)})")
    params[XATTN_STACK] = _stack([params.pop(k) for k in keys])
  return params


def to_unrolled(params: Any, xattn_indices: Sequence[int]) -> Any:
  """The inverse of `to_scanned`."""
  params = lm_to_unrolled(dict(params))
  if "lm" in params:
    params["lm"] = lm_to_unrolled(params["lm"])
  if XATTN_STACK in params:
    stacked = params.pop(XATTN_STACK)
    blocks = _unstack(stacked, len(xattn_indices))
    params.update({f"xattn_block_{i}": b for i, b in zip(xattn_indices, blocks)})
  return params


def adapt_target(target: Any, stored: Any) -> tuple[Any, Callable[[Any], Any]]:
  """Restoring a checkpoint of the other layout: (the restore target in the
  stored tree's layout, a function from what was restored to `target`'s
  layout). target: ShapeDtypeStructs with shardings; stored: the checkpoint's
  tree (metadata). The conversion runs jitted into target's shardings (a
  layer stack is briefly held twice). Same layout: (target, identity)."""
  have, want = layout_of(stored), layout_of(target)
  if have is None or want is None or have == want:
    return target, lambda tree: tree
  if want == "scanned":
    idx = _xattn_indices(stored)
    source, convert = to_unrolled(target, idx), lambda t: to_scanned(t, idx)
  else:
    idx = _xattn_indices(target)
    source, convert = to_scanned(target, idx), lambda t: to_unrolled(t, idx)
  shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), target)
  if any(s is None for s in jax.tree.leaves(shardings, is_leaf=lambda s: s is None)):
    return source, convert
  return source, jax.jit(convert, out_shardings=shardings)


def to_layout(params: Any, config) -> Any:
  """params (either layout) in the layout of FlamingoConfig `config` (`model.scan_layers`)."""
  idx = xattn_layer_indices(config.lm.num_layers, config.xattn.every, config.xattn.placement,
                            config.xattn.layers)
  return to_scanned(params, idx) if config.scan_layers else to_unrolled(params, idx)
