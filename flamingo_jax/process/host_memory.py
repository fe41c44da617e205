"""Keep the memory XLA's CPU backend frees mapped, so a step does not page-fault it back in.

XLA on the CPU allocates each step's temporaries as one block (3.55 GB at the bench
config) with posix_memalign. glibc serves a block that large with a fresh mmap from a
thread's arena and unmaps it on free, so every step faults ~900k pages back in: 3-5 s
of kernel time per 9 s step on the AMD EPYC VM, and twice that after an idle pause
(docs/benchmarks.md, "Why a pause slowed our step"). With one arena, no mmap for
large blocks and no trimming, the block is reused from the heap instead: no faults.

These settings only take effect for threads that have not yet allocated, so they are
applied before the JAX backend starts (its thread pool) and only when that backend
will be the CPU: an accelerator host's host-side temporaries are small, and there one
arena per thread serves the input pipeline better. `FLAMINGO_JAX_KEEP_HOST_MEMORY=0`
turns it off; `=1` forces it on.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import logging
import os
import platform

log = logging.getLogger(__name__)

ENV = "FLAMINGO_JAX_KEEP_HOST_MEMORY"
# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# The same settings for a child process, read by glibc as it starts (benchmarks/train_step.py
# gives them to both sides' workers, so PyTorch's allocations are served alike).
GLIBC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
             "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
# Accelerator plugins that would make the default backend something other than the CPU.
# (jax_plugins: the namespace package JAX's own CUDA and ROCm plugins install into.)
_ACCELERATOR_MODULES = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin",
                        "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def backend_will_be_cpu() -> bool:
  """Whether JAX's default backend will be the CPU, decided without starting it."""
  import jax  # pylint: disable=import-outside-toplevel
  platforms = jax.config.jax_platforms  # from JAX_PLATFORMS or jax.config.update
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES):
    return False
  return not list(importlib.metadata.entry_points(group="jax_plugins"))


def _backend_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return xla_bridge.backends_are_initialized()


def keep_freed_memory() -> bool:
  """Apply the glibc settings (see the module docstring); -> whether they were applied.

  Call at the start of a program, before anything asks JAX for a device.
  """
  wanted = os.environ.get(ENV, "")
  if wanted == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if wanted != "1" and (_backend_started() or not backend_will_be_cpu()):
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  # mallopt takes an int: -1 becomes SIZE_MAX for the trim threshold (never trim); a
  # threshold that fits an int (2 GB) would still trim the 3.55 GB block on every free.
  applied = all(libc.mallopt(p, v) == 1 for p, v in
                ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  if applied:
    log.debug("host memory: one malloc arena, no mmap for large blocks, no trimming")
  return applied
