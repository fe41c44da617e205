"""NFNet forward benchmark: images/s, and XLA's FLOP count against the analytic one.

  python benchmarks/nfnet_forward.py [--variants F0,F6] [--size 320] \
      [--batch F0=4,F6=1] [--iters F0=3,F6=1] [--dtype float32]

For each variant, the encoder Flamingo uses (NFNetEncoder: stem, blocks,
final 1x1 conv to 3072, no classifier) on random weights and images of
`size` px. Prints one JSON object per variant:
  images_per_second      batch * iters / wall time of the timed calls
  seconds_per_batch      wall time of one call (after one warm-up call)
  compile_seconds        lowering + XLA compilation
  flops_measured_per_image  XLA's cost_analysis()["flops"] / batch of the same forward with
                         every block unrolled (the timed program runs a stage's blocks as
                         one lax.scan, whose body XLA counts once: 0.66x the work for F0,
                         0.13x for F6), lowered, not compiled
  macs_analytic_per_image   flamingo_jax.trainers.flamingo.flops.nfnet / 2 (convs and squeeze-excite
                         matmuls only; F6 at 320 px: 116.6 GMAC in the paper's count)
  measured_over_analytic flops_measured / (2 * macs_analytic): above 1 by XLA's
                         count of elementwise work (activations, weight
                         standardisation, squeeze-excite gates, pooling)
  tflops_per_second      analytic FLOPs (2 * MAC) per second
and the device, the CPU and the JAX version.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flamingo_jax.trainers.flamingo import flops  # noqa: E402
from flamingo_jax.models.config import FlamingoConfig, NFNetConfig, VisionConfig  # noqa: E402
from flamingo_jax.models.nfnet import VARIANTS, NFNetEncoder  # noqa: E402


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = f"{names[0]} x {len(names)} logical cores" if names else cpu
  except OSError:
    pass
  return f"{jax.devices()[0].device_kind} ({cpu})"


def per_variant(text: str, variants, default: int, what: str) -> dict[str, int]:
  """'F0=4,F6=1' -> {variant: int}, the default for variants not named."""
  out = {v: default for v in variants}
  for item in filter(None, text.split(",")):
    if "=" not in item:
      raise ValueError(f"--{what} entries must be VARIANT=N, got {item!r}")
    v, n = item.split("=", 1)
    if v not in out:
      raise ValueError(f"--{what} names {v!r}, not among --variants {list(variants)}")
    if not n.isdigit() or int(n) < 1:
      raise ValueError(f"--{what} {v}={n!r} must be a positive int")
    out[v] = int(n)
  return out


def random_params(shapes, seed: int = 0):
  """Normal(0, 1) weights on the abstract tree (numpy: no init to compile).

  Scaled weight standardisation makes the kernels' scale irrelevant; gains
  and biases are random too, which only matters for the numbers' range."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jax.device_put(rng.standard_normal(s.shape, dtype=np.float32).astype(s.dtype)),
      shapes)


def cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def bench(variant: str, size: int, batch: int, iters: int, dtype: str) -> dict:
  nf = NFNetConfig(variant=variant, stochastic_depth_rate=0.0)
  model = NFNetEncoder(nf, dtype=jnp.dtype(dtype))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
                          )["params"]
  shapes = jax.tree.map(lambda x: getattr(x, "value", x), shapes,
                        is_leaf=lambda x: hasattr(x, "value"))
  params = random_params(shapes)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  images = jax.device_put(np.random.default_rng(1).standard_normal(
      (batch, size, size, 3), dtype=np.float32))
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  t0 = time.perf_counter()
  compiled = forward.lower(params, images).compile()
  compile_s = time.perf_counter() - t0
  out = compiled(params, images)
  out.block_until_ready()  # warm-up
  t0 = time.perf_counter()
  for _ in range(iters):
    out = compiled(params, images)
  out.block_until_ready()
  wall = time.perf_counter() - t0
  analytic = flops.nfnet(FlamingoConfig(vision=VisionConfig(nfnet=nf)), size)  # 2 * MAC
  # train=True unrolls the blocks (no dropout rng, stochastic depth 0: the same computation)
  unrolled = jax.jit(lambda p, x: model.apply({"params": p}, x, True)).lower(params, images)
  measured = cost_flops(unrolled) / batch
  return {
      "variant": variant, "image_size": size, "batch": batch, "iters": iters, "dtype": dtype,
      "params": num_params, "features": list(out.shape[1:]),
      "images_per_second": round(batch * iters / wall, 4),
      "seconds_per_batch": round(wall / iters, 3), "compile_seconds": round(compile_s, 1),
      "flops_measured_per_image": measured, "macs_analytic_per_image": analytic / 2,
      "gmacs_analytic_per_image": round(analytic / 2e9, 2),
      "gflops_measured_per_image": round(measured / 1e9, 2),
      "measured_over_analytic": round(measured / analytic, 4),
      "tflops_per_second": round(analytic * batch * iters / wall / 1e12, 4),
      "device": machine(), "jax": jax.__version__,
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", default="F0,F6")
  p.add_argument("--size", type=int, default=320)
  p.add_argument("--batch", default="", help="per variant, e.g. F0=4,F6=1 (default 1)")
  p.add_argument("--iters", default="", help="timed calls per variant, e.g. F0=3 (default 1)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  a = p.parse_args(argv)
  variants = [v for v in a.variants.split(",") if v]
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"unknown NFNet variant {v!r}; expected one of {list(VARIANTS)}")
  if a.size < 32:
    raise ValueError(f"--size must be >= 32 (NFNet's total stride), got {a.size}")
  batches = per_variant(a.batch, variants, 1, "batch")
  iters = per_variant(a.iters, variants, 1, "iters")
  for v in variants:
    print(json.dumps(bench(v, a.size, batches[v], iters[v], a.dtype)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
