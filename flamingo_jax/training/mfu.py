"""MFU's denominator: the peak FLOP/s of a device, from its datasheet or measured.

A trainer divides its own analytic FLOPs per step (e.g. trainers/flamingo/flops.py) by
seconds per step and by peak * devices.
"""
from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp


def measure_peak_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5,
                       device=None, min_seconds: float = 0.0) -> float:
  """Achieved FLOP/s of a square matmul on one device: MFU's denominator where
  the device's datasheet peak is unknown (CPUs). The best of `repeats` calls, and of as
  many more as fill `min_seconds` (a shared VM's cores come and go: a benchmark's
  denominator wants the best it can find, not the first few calls)."""
  dev = device or jax.local_devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), dev)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best, calls, start = float("inf"), 0, time.perf_counter()
  while calls < repeats or time.perf_counter() - start < min_seconds:
    t = time.perf_counter()
    f(a).block_until_ready()
    best, calls = min(best, time.perf_counter() - t), calls + 1
  return 2 * size ** 3 / best  # [size, size] x [size, size]: 2 * size^3 FLOPs


# Dense bf16 peak FLOP/s per chip (datasheets); MFU uses these when known.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device=None) -> Optional[float]:
  """Datasheet peak of the device kind, or None when unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for prefix, peak in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return peak
  return None
