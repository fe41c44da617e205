"""Decoding throughput with and without the caches; prints one JSON object.

  python benchmarks/decode.py [--models tiny,bench] [--batch 2] [--prompt_len 128]
      [--new_tokens 16] [--method greedy] [--repeats 3]

Variants (the same search code, `decode.generate`, only the logits differ):
  cache         self-attention KV cache + cross-attention K/V computed once per
                prompt (ours)
  self_cache    self-attention KV cache, cross-attention K/V recomputed from the
                visual tokens at every step (what OpenFlamingo does)
  no_cache      the full forward over the whole sequence for every new token:
                LM, resampler and cross-attention K/V recomputed (the vision
                features are given precomputed, so no variant runs an encoder)
Every run generates exactly new_tokens tokens per row (min_new_tokens);
times are medians over repeats after one compile run. tokens_per_s =
batch * new_tokens / seconds of the whole `generate` call (prompt included);
decode_tokens_per_s = batch * (new_tokens - 1) / (that - the same call with
one new token), the steady-state cost of a new token.

Models: configs/tiny.py (5 random 32 px images per prompt) and configs/bench.py
(a Llama-style LM: width 1024, 12 layers, 16 heads, SwiGLU 2816, vocab 32000;
resampler width 1024; xattn before every 2nd block; 5 images x 100 precomputed
visual features x 1024 per prompt).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flamingo_jax.models.config import model_config  # noqa: E402
from flamingo_jax.config import load_config  # noqa: E402
from flamingo_jax.evaluate.decode import DecodeConfig, compiled_generate, left_pad  # noqa: E402
from flamingo_jax.model_dir import init_params  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "cache": dict(use_cache=True),
    "self_cache": dict(use_cache=True, recompute_cross_kv=True),
    "no_cache": dict(use_cache=False),
}


def model_and_inputs(name: str, batch: int, prompt_len: int, seed: int = 0):
  """-> (config, params with gates open, tokens, mask, images or None, features or None)."""
  if name not in ("tiny", "bench"):
    raise ValueError(f"unknown model {name!r}; expected tiny or bench")
  config = model_config(load_config(os.path.join(REPO, "configs", f"{name}.py")))
  num_images, positions = 5, 100  # positions: features per image (vision name "none")
  rng = np.random.default_rng(seed)
  params = init_params(config, seed)
  params = {k: (dict(v, attn_gate=v["attn_gate"] + 0.5, ffw_gate=v["ffw_gate"] + 0.5)
                if k.startswith("xattn_block_") else v) for k, v in params.items()}
  # <BOS> then 5 x (<image> text <EOC>): an interleaved few-shot prompt.
  chunk = (prompt_len - 1) // num_images
  prompts = []
  for _ in range(batch):
    p = [1]
    for _ in range(num_images):
      p += [config.image_token_id] + [int(t) for t in rng.integers(3, 500, chunk - 2)]
      p.append(config.eoc_token_id)
    prompts.append(p)
  tokens, mask = left_pad(prompts, prompt_len, 0)
  images = features = None
  if config.vision.name == "none":
    features = rng.standard_normal(
        (batch, num_images, 1, positions, config.vision_feature_dim)).astype(np.float32)
  else:
    size = config.vision.image_size
    images = rng.standard_normal((batch, num_images, 1, size, size, 3)).astype(np.float32)
  return config, params, tokens, mask, images, features


def _time(fn, args, repeats: int):
  """-> (output, first call seconds, median seconds of `repeats` more calls)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return out, first, statistics.median(times)


def run(name: str, variant: str, batch: int, prompt_len: int, new_tokens: int, method: str,
        repeats: int, inputs) -> dict:
  config, params, tokens, mask, images, features = inputs
  args = (params, tokens, mask, images, features, jax.random.key(0))

  def fn(n):
    return compiled_generate(config, DecodeConfig(
        method=method, max_new_tokens=n, min_new_tokens=n, **VARIANTS[variant]))

  out, first, seconds = _time(fn(new_tokens), args, repeats)
  _, _, prompt_seconds = _time(fn(1), args, repeats)
  assert int(np.min(out.lengths)) == new_tokens
  return {"model": name, "variant": variant, "method": method, "batch": batch,
          "prompt_len": prompt_len, "new_tokens": new_tokens, "seconds": seconds,
          "tokens_per_s": batch * new_tokens / seconds, "prompt_seconds": prompt_seconds,
          # None when timing noise swamps the difference (tiny models).
          "decode_tokens_per_s": (batch * (new_tokens - 1) / (seconds - prompt_seconds)
                                  if seconds > 1.05 * prompt_seconds else None),
          "first_call_s": first, "tokens": np.asarray(out.tokens).tolist()}


def say(line: str) -> None:
  """Progress on stderr (stdout holds only the JSON): compiling a variant takes minutes."""
  print(f"decode.py: {line}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="tiny,bench")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=16)
  p.add_argument("--method", default="greedy", choices=("greedy", "beam"))
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args(argv)
  results, speedups = [], {}
  for name in a.models.split(","):
    say(f"model {name}: random params and a batch of {a.batch} prompts of {a.prompt_len} "
        "tokens ...")
    inputs = model_and_inputs(name, a.batch, a.prompt_len)
    rows = {}
    for v in a.variants.split(","):
      say(f"model {name}, {v}: compiling, then {a.repeats} timed calls of {a.new_tokens} "
          "and of 1 new token ...")
      rows[v] = run(name, v, a.batch, a.prompt_len, a.new_tokens, a.method, a.repeats, inputs)
      say(f"model {name}, {v}: {rows[v]['tokens_per_s']:.1f} tokens/s (whole generate call, "
          f"first call {rows[v]['first_call_s']:.1f} s with compilation)")
    # Same tokens whichever way the logits are computed.
    same = len({json.dumps(r.pop("tokens")) for r in rows.values()}) == 1
    for r in rows.values():
      r["same_tokens_as_other_variants"] = same
    results += list(rows.values())
    if "cache" in rows:
      speedups[name] = {
          f"cache_vs_{v}": {k: (rows["cache"][k] / r[k] if rows["cache"][k] and r[k] else None)
                            for k in ("tokens_per_s", "decode_tokens_per_s")}
          for v, r in rows.items() if v != "cache"}
  report = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax": jax.__version__, "results": results, "speedup": speedups}
  print(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
