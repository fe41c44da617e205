"""Input pipeline throughput per source kind on the synthetic shapes world.

  python benchmarks/data_pipeline.py [--data DIR] [--workers 0 2] [--batches 20]

Prints one JSON object: for every (kind, source format, worker count) the
examples/s and bytes/s of the whole pipeline (read, decode, tokenise, lay out,
augment, batch), and the same per worker (per process when worker_count is
0). Input bytes are the on-disk bytes of the examples consumed (file size /
examples in the files); output bytes are the model-ready batches. The first
batch (worker start-up) is not timed. Without --data a default-size synthetic
dataset is written to a temporary directory first.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # runnable from a checkout without installing it


def measure(data_dir: str, name: str, cfg: dict, source: str, workers: int, batches: int,
            image_size: int) -> dict:
  from flamingo_jax.data import make_mixture
  data = {"datasets": {name: cfg}, "tokenizer": f"{data_dir}/tokenizer/tokenizer.model",
          "image": {"size": image_size}, "shard_index": 0, "shard_count": 1,
          "worker_count": workers, "seed": 0}
  mixture = make_mixture(data)
  try:
    first = next(mixture)[name]
    t0 = time.perf_counter()
    out_bytes = 0
    for _ in range(batches):
      out_bytes += sum(v.nbytes for v in next(mixture)[name].values())
    seconds = time.perf_counter() - t0
  finally:
    mixture.close()
  examples = batches * len(first["tokens"])
  files = [p for pat in cfg["paths"] for p in glob.glob(pat)]
  disk = sum(os.path.getsize(p) for p in files)
  if source == "tar":
    from flamingo_jax.data.tar import TarSource
    records = len(TarSource(cfg["kind"], files))
  else:
    from flamingo_jax.data.sources import ArrayRecordSource
    records = len(ArrayRecordSource(cfg["kind"], files))
  in_bytes = examples * disk / max(records, 1)
  per = max(workers, 1)
  return {
      "dataset": name, "kind": cfg["kind"], "source": source, "workers": workers,
      "batch_size": len(first["tokens"]), "batches": batches, "seconds": round(seconds, 3),
      "examples_per_s": round(examples / seconds, 1),
      "examples_per_s_per_worker": round(examples / seconds / per, 1),
      "input_bytes_per_s": round(in_bytes / seconds),
      "input_bytes_per_s_per_worker": round(in_bytes / seconds / per),
      "output_bytes_per_s": round(out_bytes / seconds),
      "output_bytes_per_s_per_worker": round(out_bytes / seconds / per),
  }


def main() -> None:
  logging.basicConfig(level=logging.WARNING)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default="", help="a synthetic dataset dir (written if empty)")
  p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--sources", nargs="+", default=["tar", "arrayrecord"])
  p.add_argument("--datasets", nargs="+", default=["pairs", "interleaved", "video"])
  a = p.parse_args()
  from flamingo_jax.data import synthetic
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = a.data
    if not data_dir:
      data_dir = tmp
      synthetic.write_synthetic(data_dir, seed=0, image_size=a.image_size)
    results = []
    for source in a.sources:
      cfgs = synthetic.dataset_configs(data_dir, source, "train")
      for name in a.datasets:
        for workers in a.workers:
          results.append(measure(data_dir, name, cfgs[name], source, workers, a.batches,
                                 a.image_size))
  print(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                    "image_size": a.image_size, "results": results}, indent=2))


if __name__ == "__main__":  # grain workers are spawned: they re-import this file
  main()
