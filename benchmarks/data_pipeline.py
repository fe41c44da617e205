"""Input pipeline throughput: the synthetic shapes world, or web-sized JPEG documents.

  python benchmarks/data_pipeline.py [--data DIR] [--workers 0 2] [--batches 20]
  python benchmarks/data_pipeline.py --web [--workers 0 1 2] [--batches 10]

Prints one JSON object: for every (kind, source format, worker count) the
examples/s and bytes/s of the whole pipeline (read, decode, tokenise, lay out,
augment, batch), and the same per worker (per process when worker_count is
0), plus the CPU seconds the pipeline's processes (main and grain workers)
spent per example, i.e. examples per core-second. Input bytes are the on-disk
bytes of the examples consumed (file size / examples in the files); output
bytes are the model-ready batches. The first batch (worker start-up) is not
timed. Without --data a default-size synthetic dataset is written to a
temporary directory first.

--web measures the input of a Flamingo-scale run instead: interleaved
(OBELICS-layout) tar documents of 5 JPEG images each at web sizes (640x480 to
1024x768, landscape and portrait, quality 85, smooth content plus noise so
they compress like photos: about 60-200 KB), made here, resized to 320 px
(--image_size), 256-token sequences with all 5 images inside.
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


# (width, height) of the web images: common photo and screenshot sizes.
WEB_SIZES = ((640, 480), (800, 600), (1024, 768), (768, 1024), (1000, 667), (960, 540))
IMAGES_PER_DOCUMENT = 5


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its live children (grain workers)."""
  import psutil
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:  # exited in between
      pass
  return total


def web_image(rng, width: int, height: int) -> bytes:
  """A photo-like JPEG: a smooth random colour field plus fine noise."""
  import io

  import numpy as np
  from PIL import Image
  coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
  img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=85)
  return buf.getvalue()


def write_web_documents(out: str, documents: int, seed: int = 0) -> dict:
  """Tar shards of OBELICS documents (text, image, text, ... 5 images) and a tokenizer
  trained on their text; returns the dataset config that reads them."""
  import numpy as np

  from flamingo_jax.data.synthetic import _TarWriter
  from flamingo_jax.data.train_tokenizer import train_tokenizer
  rng = np.random.default_rng(seed)
  syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "an", "er", "ol", "ist"]
  words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(600)]
  writer = _TarWriter(os.path.join(out, "web"), "train", per_shard=32)
  corpus = []
  for i in range(documents):
    key = f"{i:06d}"
    texts, images, members = [], [], []
    for j in range(IMAGES_PER_DOCUMENT + 1):
      text = " ".join(rng.choice(words, int(rng.integers(15, 25)))) + "."
      texts.append(text)
      images.append(None)
      corpus.append(text)
      if j < IMAGES_PER_DOCUMENT:
        w, h = WEB_SIZES[int(rng.integers(len(WEB_SIZES)))]
        name = f"{key}.{j}.jpg"
        members.append((name, web_image(rng, w, h)))
        texts.append(None)
        images.append(name)
    writer.add([(f"{key}.json", json.dumps({"texts": texts, "images": images}).encode()),
                *members])
  writer.close()
  with open(os.path.join(out, "corpus.txt"), "w") as f:
    f.write("\n".join(corpus) + "\n")
  train_tokenizer([os.path.join(out, "corpus.txt")], 1000, os.path.join(out, "tokenizer"),
                  model_type="bpe")
  return {"kind": "interleaved", "source": "tar", "paths": [os.path.join(out, "web", "*.tar")],
          "seq_len": 256, "max_images": IMAGES_PER_DOCUMENT, "p_next": 0.5, "batch_size": 8}


def measure(data_dir: str, name: str, cfg: dict, source: str, workers: int, batches: int,
            image_size: int, read_threads: int = 2) -> dict:
  from flamingo_jax.data import make_mixture
  data = {"datasets": {name: cfg}, "tokenizer": f"{data_dir}/tokenizer/tokenizer.model",
          "image": {"size": image_size}, "shard_index": 0, "shard_count": 1,
          "worker_count": workers, "read_threads": read_threads, "seed": 0}
  mixture = make_mixture(data)
  try:
    first = next(mixture)[name]
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    out_bytes, images = 0, 0
    for _ in range(batches):
      batch = next(mixture)[name]
      out_bytes += sum(v.nbytes for v in batch.values())
      images += int(batch["image_count"].sum())
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
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
      "read_threads": read_threads,
      "batch_size": len(first["tokens"]), "batches": batches, "seconds": round(seconds, 3),
      "images_per_example": round(images / examples, 2),
      "examples_per_s": round(examples / seconds, 1),
      "examples_per_s_per_worker": round(examples / seconds / per, 1),
      "cpu_s_per_example": round(cpu / examples, 4),
      "examples_per_core_s": round(examples / cpu, 1),
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
  p.add_argument("--read_threads", type=int, default=2, help="data.read_threads")
  p.add_argument("--web", action="store_true",
                 help="web-sized JPEG documents (5 images each) instead of the shapes world")
  p.add_argument("--documents", type=int, default=96, help="--web: documents written")
  a = p.parse_args()
  if a.web:
    image_size = a.image_size if a.image_size != 64 else 320
    with tempfile.TemporaryDirectory() as tmp:
      t0 = time.perf_counter()
      cfg = write_web_documents(tmp, a.documents)
      disk = sum(os.path.getsize(f) for f in glob.glob(cfg["paths"][0]))
      written = {"documents": a.documents, "bytes": disk,
                 "kb_per_image": round(disk / a.documents / IMAGES_PER_DOCUMENT / 1024, 1),
                 "seconds": round(time.perf_counter() - t0, 1)}
      results = [measure(tmp, "web", cfg, "tar", w, a.batches, image_size, a.read_threads)
                 for w in a.workers]
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                  "load_average": os.getloadavg()},
                      "image_size": image_size, "web_sizes": WEB_SIZES, "written": written,
                      "results": results}, indent=2))
    return
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
