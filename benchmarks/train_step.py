"""Training-step benchmark: our trainer vs OpenFlamingo's PyTorch modules.

  python benchmarks/train_step.py --configs tiny,bench --openflamingo [--steps 5]

For each config, runs the real trainer (flamingo_jax.train.run, synthetic data
made once and reused, checkpoints off) and prints one JSON object per config:
step time, host time per step and its share of the step, tokens/s, FLOPs per
step (frozen-aware, all-3x and 6N, see flamingo_jax/training/flops.py), MFU
against the peak of a large matmul measured on the same device, compiled and
peak memory.

With --openflamingo, configs on precomputed features with a Llama or
Chinchilla-style LM (bench, bench_3b) also run in OpenFlamingo's
PerceiverResampler and GatedCrossAttentionBlock (open_flamingo/src, loaded by
path: its package __init__ needs open_clip) around a transformers LM of the
same sizes (LlamaForCausalLM; GPTNeoXForCausalLM with sequential residuals and
tied embeddings for Chinchilla-style), random weights, the LM frozen
(requires_grad False), on the same features and tokens; one step = forward,
loss, backward, clip, AdamW. The two sides ALTERNATE step by step (ours, then
OpenFlamingo's, then ours...), so both see the same machine load; on a device
of their own run them one at a time with --openflamingo_only (a separate
process: JAX and torch would split the GPU memory).

Host time (ours): CPU seconds of the training loop's thread per step (batch
assembly, host-to-device copies, dispatch, logging), excluding waits for the
device. On an accelerator the step is host-bound when it exceeds the device
time; on a CPU backend the computation runs on other threads, so it still is
the loop's own overhead.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from flamingo_jax import train  # noqa: E402
from flamingo_jax.config import apply_overrides, load_config, model_config  # noqa: E402
from flamingo_jax.data import in_memory  # noqa: E402
from flamingo_jax.training import flops  # noqa: E402

def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = f"{names[0]} x {len(names)} logical cores" if names else cpu
  except OSError:
    pass
  return f"{jax.devices()[0].device_kind} ({cpu})"


def config_path(name: str) -> str:
  """'bench_3b:tiny' -> '<repo>/configs/bench_3b.py:tiny'."""
  base, _, arg = name.partition(":")
  path = os.path.join(REPO, "configs", base + ".py")
  return path + (":" + arg if arg else "")


def median(xs):
  return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------
# Ours


class StepClock:
  """The trainer's on_step callback: times our steps, optionally runs a partner.

  The trainer calls on_step(k) once step k's metrics are on the host and step
  k+1 is dispatched. Alone, the time between two calls is step k's. With a
  partner (OpenFlamingo) the callback first waits for step k+1 to finish and
  then runs one partner step, so the two never overlap: step k+1 lasted from
  the end of the previous callback to that wait's end. The host time of a
  step is the loop thread's CPU time between two callbacks (outside them).
  """

  def __init__(self, total_steps: int, partner=None):
    self.total, self.partner = total_steps, partner
    self.ours = []  # (step, seconds, host seconds, process CPU seconds)
    self.partner_times = []  # (seconds, process CPU seconds)
    self._wall = self._cpu = self._proc = None

  def __call__(self, done_step: int, metrics: dict) -> None:
    if self.partner is not None and done_step == self.total:
      return  # no step in flight to wait for
    cpu = time.thread_time()
    if self.partner is not None:
      jax.block_until_ready([a for a in jax.live_arrays() if not a.is_deleted()])
    wall, proc = time.perf_counter(), time.process_time()
    if self._wall is not None:
      step = done_step + (self.partner is not None)
      self.ours.append((step, wall - self._wall, cpu - self._cpu, proc - self._proc))
    if self.partner is not None:
      self.partner.step()
      self.partner_times.append((time.perf_counter() - wall, time.process_time() - proc))
    self._wall, self._cpu, self._proc = time.perf_counter(), time.thread_time(), \
        time.process_time()


def bench_ours(cfg, steps: int, warmup: int, peak: float, partner=None,
               made_once: bool = True) -> dict:
  """Times steps warmup+2 .. warmup+steps+1 of ours (step 1 includes compilation and
  the first interval has no start), with a partner step after each of ours."""
  total = warmup + steps + 1
  overrides = [f"train.total_steps={total}", "train.log_every=1",
               f"train.peak_flops_per_device={peak}", "checkpoint.enabled=False"]
  config = apply_overrides(cfg, overrides)
  if made_once:
    with config.unlocked():
      config.synthetic.distinct_batches = 1
  clock = StepClock(total, partner)
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    summary = train.run(config, workdir, on_step=clock)
    wall = time.perf_counter() - t0
  timed = [(t, h, c) for step, t, h, c in clock.ours if step >= warmup + 2]
  times, host, cpu = ([x[i] for x in timed] for i in range(3))
  step_time = median(times)
  (name, f), = summary["flops"].items()
  stats = jax.local_devices()[0].memory_stats() or {}
  rows = summary["history"]
  out = {
      "step_time_s": step_time,
      "step_times_s": [round(t, 4) for t in times],
      "host_time_per_step_s": median(host),
      "host_share_of_step": median(host) / step_time,
      # CPU seconds of all threads: on a CPU backend, the computation's too.
      "process_cpu_time_per_step_s": median(cpu),
      "tokens_per_s": f["text_tokens"] / step_time,
      "flops_per_step": {k: f[k] for k in ("frozen_aware", "all_3x", "6n", "forward")},
      "mfu_frozen_aware": f["frozen_aware"] / step_time / (peak * jax.device_count()),
      "mfu_all_3x": f["all_3x"] / step_time / (peak * jax.device_count()),
      "memory_per_device_bytes": summary["memory"][name],
      "trainable_params": (summary["memory"][name]["trainable_params"] // 4  # float32
                           if jax.device_count() == 1 else None),
      "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "input_made_once": made_once,
      "final_loss": rows[-1]["loss"],
      "run_wall_s": wall,
  }
  if partner is not None:
    of = partner.result([t for t, _ in clock.partner_times[warmup:]])
    of["process_cpu_time_per_step_s"] = median([c for _, c in clock.partner_times[warmup:]])
    of.update(tokens_per_s=f["text_tokens"] / of["step_time_s"],
              mfu_frozen_aware=f["frozen_aware"] / of["step_time_s"] / peak)
    out["partner"] = of
  return out


# --------------------------------------------------------------------------
# OpenFlamingo


def load_openflamingo():
  """open_flamingo/src as a package without running open_flamingo/__init__ (open_clip)."""
  spec = importlib.util.find_spec("open_flamingo")
  if spec is None:
    raise SystemExit("open_flamingo is not installed (pip install --no-deps open-flamingo)")
  src = os.path.join(spec.submodule_search_locations[0], "src")
  package = types.ModuleType("_openflamingo_src")
  package.__path__ = [src]
  sys.modules["_openflamingo_src"] = package
  return (importlib.import_module("_openflamingo_src.flamingo"),
          importlib.import_module("_openflamingo_src.flamingo_lm"),
          importlib.import_module("_openflamingo_src.utils"))


def hf_lm(lm, seq_len: int):
  """A transformers causal LM of our LMConfig's sizes and family, random weights.

  Returns (model, decoder layers attribute path)."""
  if lm.family == "llama":
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=lm.vocab_size, hidden_size=lm.width, intermediate_size=lm.ffw_dim,
        num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads,
        num_key_value_heads=lm.num_heads, max_position_embeddings=seq_len,
        rms_norm_eps=lm.norm_eps, tie_word_embeddings=False)), "model.layers"
  if lm.family == "chinchilla":  # LayerNorm, GELU, full rotary, sequential residuals, tied
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=lm.vocab_size, hidden_size=lm.width,
        intermediate_size=lm.ffw_dim or lm.ffw_mult * lm.width,
        num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads, hidden_act="gelu",
        rotary_pct=1.0, max_position_embeddings=max(seq_len, 64), layer_norm_eps=lm.norm_eps,
        use_parallel_residual=False, tie_word_embeddings=True,
        attention_bias=False)), "gpt_neox.layers"
  raise SystemExit(f"no OpenFlamingo harness for LM family {lm.family!r} (llama, chinchilla)")


def supports_openflamingo(cfg) -> bool:
  m = model_config(cfg)
  return m.vision.name == "none" and m.lm.family in ("llama", "chinchilla")


class OpenFlamingo:
  """OpenFlamingo's modules on `cfg`'s workload; `step()` is one training step.

  precision: fp32, or amp_bf16 (its training script's torch.autocast bfloat16,
  weights float32)."""

  def __init__(self, cfg, device: str = "cpu", precision: str = "fp32"):
    import torch
    self.torch, self.device, self.precision = torch, device, precision
    of_flamingo, of_lm, of_utils = load_openflamingo()
    m = model_config(cfg)
    syn = in_memory.synthetic_config(cfg.synthetic)
    (spec,) = syn.datasets.values()
    batch = next(in_memory.SyntheticIterator(
        spec, m, feature_shape=(syn.feature_positions, m.vision_feature_dim)))

    torch.manual_seed(0)
    with torch.device(device):  # random init where the model runs (GPU: seconds, not minutes)
      lm, layers_attr = hf_lm(m.lm, spec.seq_len)
    of_utils.extend_instance(lm, of_lm.FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(layers_attr)

    class Features(torch.nn.Module):
      """Stands in for CLIP: vision_x already holds the features (as a 6-D tensor)."""

      def forward(self, x):
        return None, x[..., 0]

    vision = types.SimpleNamespace(visual=Features())
    with torch.device(device):
      model = of_flamingo.Flamingo(vision, lm, eoc_token_id=m.eoc_token_id,
                                   media_token_id=m.image_token_id,
                                   vis_dim=m.vision_feature_dim,
                                   cross_attn_every_n_layers=m.xattn.every)
    model.requires_grad_(False)  # as open_flamingo/src/factory.py: LM and vision frozen
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.to(device)
    self.model = model
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.1)
    # The input, made once, on the device.
    self.vision_x = torch.from_numpy(batch["visual_features"])[..., None].to(device)
    self.tokens = torch.from_numpy(batch["tokens"]).long().to(device)
    self.mask = torch.ones_like(self.tokens)
    self.labels = self.tokens.clone()
    self.labels[self.tokens == in_memory.PAD] = -100
    self.cuda = device.startswith("cuda")
    self.loss = None
    self._cpu0 = None

  def step(self) -> float:
    torch = self.torch
    autocast = (torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)
                if self.precision == "amp_bf16" else contextlib.nullcontext())
    with autocast:
      loss = self.model(self.vision_x, self.tokens, attention_mask=self.mask,
                        labels=self.labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.loss = float(loss.detach())  # waits for the device
    if self.cuda:
      torch.cuda.synchronize()
    return self.loss

  def result(self, times) -> dict:
    torch = self.torch
    return {"step_time_s": median(times), "step_times_s": [round(t, 4) for t in times],
            "trainable_params": sum(p.numel() for p in self.params),
            "frozen_params": sum(p.numel() for p in self.model.parameters()
                                 if not p.requires_grad),
            "peak_bytes_in_use": torch.cuda.max_memory_allocated() if self.cuda else None,
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "device": self.device, "precision": self.precision, "final_loss": self.loss}


def bench_openflamingo_alone(cfg, steps: int, warmup: int, peak: float, device: str,
                             precision: str) -> dict:
  side = OpenFlamingo(cfg, device, precision)
  times, cpu = [], []
  for i in range(warmup + steps):
    t, c = time.perf_counter(), time.process_time()
    side.step()
    if i >= warmup:
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
  out = side.result(times)
  out["process_cpu_time_per_step_s"] = median(cpu)
  m = model_config(cfg)
  syn = in_memory.synthetic_config(cfg.synthetic)
  (spec,) = syn.datasets.values()
  f = flops.step_flops(m, [flops.BatchShape(spec.batch_size, spec.seq_len, spec.max_images,
                                            spec.num_frames, image_size=0,
                                            feature_positions=syn.feature_positions)])
  out.update(tokens_per_s=f["text_tokens"] / out["step_time_s"],
             mfu_frozen_aware=f["frozen_aware"] / out["step_time_s"] / peak,
             flops_per_step={"frozen_aware": f["frozen_aware"]})
  return out


# --------------------------------------------------------------------------


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="tiny,bench",
                      help="comma-separated names of configs/<name>.py (name:arg allowed)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every config and both sides, e.g. "
                           "synthetic.datasets.interleaved.batch_size=16")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
  parser.add_argument("--openflamingo", action="store_true",
                      help="also time OpenFlamingo (PyTorch), alternating step by step")
  parser.add_argument("--openflamingo_only", action="store_true",
                      help="time only OpenFlamingo (for a device of its own)")
  parser.add_argument("--fresh_batches", action="store_true",
                      help="make a new synthetic batch every step (default: made once)")
  parser.add_argument("--torch_device", default="cpu", help="OpenFlamingo's device (cuda)")
  parser.add_argument("--openflamingo_precision", default="fp32", choices=("fp32", "amp_bf16"))
  parser.add_argument("--peak_dtype", default="float32",
                      help="dtype of the matmul that measures the peak (bfloat16 on GPUs)")
  parser.add_argument("--peak_size", type=int, default=2048)
  parser.add_argument("--peak_flops", type=float, default=0.0,
                      help="use this peak FLOP/s instead of measuring it (same denominator "
                           "across runs)")
  parser.add_argument("--output", default="", help="also write the results JSON here")
  args = parser.parse_args(argv)
  if args.warmup < 1:
    parser.error("--warmup must be >= 1 (the first step's start is compile time)")
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("flamingo_jax").setLevel(logging.INFO)
  peak = args.peak_flops or flops.measure_peak_flops(args.peak_dtype, size=args.peak_size)
  results = {"device": machine(), "devices": jax.device_count(), "jax": jax.__version__,
             "peak_matmul_flops_per_device": peak, "peak_dtype": args.peak_dtype,
             "load_average": os.getloadavg(), "configs": {}}
  for name in args.configs.split(","):
    cfg = apply_overrides(load_config(config_path(name)), args.set)
    out = {}
    if args.openflamingo_only:
      out["openflamingo"] = bench_openflamingo_alone(
          cfg, args.steps, args.warmup, peak, args.torch_device, args.openflamingo_precision)
    else:
      partner = None
      if args.openflamingo and supports_openflamingo(cfg):
        partner = OpenFlamingo(cfg, args.torch_device, args.openflamingo_precision)
      out["ours"] = bench_ours(cfg, args.steps, args.warmup, peak, partner,
                               made_once=not args.fresh_batches)
      if partner is not None:
        out["openflamingo"] = out["ours"].pop("partner")
        out["alternated"] = True
        out["speedup"] = out["openflamingo"]["step_time_s"] / out["ours"]["step_time_s"]
    results["configs"][name] = out
    print(json.dumps({name: out}, indent=2), flush=True)
  results["load_average_after"] = os.getloadavg()
  print(json.dumps(results, indent=2))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
