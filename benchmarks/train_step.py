"""Training-step benchmark: our trainer vs OpenFlamingo's PyTorch modules.

  python benchmarks/train_step.py --configs tiny,bench --openflamingo [--steps 5]

For each config, runs the real trainer (flamingo_jax.train.run, synthetic data,
checkpoints off) and prints one JSON object per config: step time, tokens/s,
FLOPs per step (frozen-aware, all-3x and 6N, see flamingo_jax/flops.py), MFU
against the peak of a large matmul measured on the same device, compile time
and compiled memory per device. With --openflamingo, the `bench` config is
also run with OpenFlamingo's PerceiverResampler and GatedCrossAttentionBlock
(open_flamingo/src/helpers.py, loaded by path: its package __init__ needs
open_clip) wrapped around a transformers LlamaForCausalLM of the same sizes,
random weights, the LM frozen (requires_grad False), float32, on the same
features and tokens; one step = forward, loss, backward, clip, AdamW.
"""
from __future__ import annotations

import argparse
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
from flamingo_jax.training import flops  # noqa: E402
from flamingo_jax.data import in_memory as train_data  # noqa: E402
from flamingo_jax.config import model_config  # noqa: E402
from flamingo_jax.config import apply_overrides, load_config  # noqa: E402


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = f"{names[0]} x {len(names)} logical cores" if names else cpu
  except OSError:
    pass
  return f"{jax.devices()[0].device_kind} ({cpu})"


def bench_ours(config_path: str, steps: int, warmup: int, peak: float,
               overrides=()) -> dict:
  config = apply_overrides(load_config(config_path), [
      f"train.total_steps={warmup + steps}", "train.log_every=1",
      f"train.peak_flops_per_device={peak}", "checkpoint.enabled=False", *overrides])
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    summary = train.run(config, workdir)
    wall = time.perf_counter() - t0
  rows = summary["history"][warmup:]
  step_time = statistics.median(r["step_time"] for r in rows)
  (name, f), = summary["flops"].items()
  memory = summary["memory"][name]
  return {
      "step_time_s": step_time,
      "step_times_s": [round(r["step_time"], 4) for r in rows],
      "cpu_time_per_step_s": statistics.median(r["host_cpu_time"] for r in rows),
      "tokens_per_s": f["text_tokens"] / step_time,
      "flops_per_step": {k: f[k] for k in ("frozen_aware", "all_3x", "6n", "forward")},
      "mfu_frozen_aware": f["frozen_aware"] / step_time / (peak * jax.device_count()),
      "mfu_all_3x": f["all_3x"] / step_time / (peak * jax.device_count()),
      "memory_per_device_bytes": memory,
      "final_loss": rows[-1]["loss"],
      "run_wall_s": wall,
  }


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


def bench_openflamingo(config_path: str, steps: int, warmup: int, device: str = "cpu",
                       precision: str = "fp32") -> dict:
  """One OpenFlamingo step on `device`; precision fp32 or amp_bf16 (its training
  script's autocast, weights float32)."""
  import contextlib

  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  of_flamingo, of_lm, of_utils = load_openflamingo()
  cfg = load_config(config_path)
  m = model_config(cfg)
  (spec,) = train_data.synthetic_specs(cfg.synthetic)
  it = train_data.SyntheticIterator(spec, m, feature_shape=(cfg.synthetic.feature_positions,
                                                           m.vision_feature_dim))
  batch = next(it)

  torch.manual_seed(0)
  lm = LlamaForCausalLM(LlamaConfig(
      vocab_size=m.lm.vocab_size, hidden_size=m.lm.width, intermediate_size=m.lm.ffw_dim,
      num_hidden_layers=m.lm.num_layers, num_attention_heads=m.lm.num_heads,
      num_key_value_heads=m.lm.num_heads, max_position_embeddings=spec.seq_len,
      rms_norm_eps=m.lm.norm_eps, tie_word_embeddings=False))
  of_utils.extend_instance(lm, of_lm.FlamingoLMMixin)
  lm.set_decoder_layers_attr_name("model.layers")

  class Features(torch.nn.Module):
    """Stands in for CLIP: vision_x already holds the features (as a 6-D tensor)."""

    def forward(self, x):
      return None, x[..., 0]

  vision = types.SimpleNamespace(visual=Features())
  model = of_flamingo.Flamingo(vision, lm, eoc_token_id=m.eoc_token_id,
                               media_token_id=m.image_token_id, vis_dim=m.vision_feature_dim,
                               cross_attn_every_n_layers=m.xattn.every)
  model.requires_grad_(False)  # as open_flamingo/src/factory.py: LM and vision frozen
  model.perceiver.requires_grad_(True)
  model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
  model.to(device)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)

  vision_x = torch.from_numpy(batch["visual_features"])[..., None].to(device)  # [B,N,T,S,C,1]
  tokens = torch.from_numpy(batch["tokens"]).long().to(device)
  mask = torch.ones_like(tokens)
  labels = tokens.clone()
  labels[tokens == train_data.PAD] = -100

  autocast = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
              if precision == "amp_bf16" else contextlib.nullcontext())
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

  def step():
    with autocast:
      loss = model(vision_x, tokens, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  times, cpu_times = [], []
  for i in range(warmup + steps):
    t, c = time.perf_counter(), time.process_time()
    loss = step()
    sync()
    if i >= warmup:
      times.append(time.perf_counter() - t)
      cpu_times.append(time.process_time() - c)
  return {"step_time_s": statistics.median(times), "step_times_s": [round(t, 4) for t in times],
          "cpu_time_per_step_s": statistics.median(cpu_times),
          "trainable_params": sum(p.numel() for p in params),
          "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
          "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
          "device": device, "precision": precision, "final_loss": loss}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="tiny,bench",
                      help="comma-separated names of configs/<name>.py (name:arg allowed)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  parser.add_argument("--openflamingo", action="store_true",
                      help="also time OpenFlamingo (PyTorch) on the bench config")
  parser.add_argument("--torch_device", default="cpu", help="OpenFlamingo's device (cuda)")
  parser.add_argument("--openflamingo_precision", default="fp32", choices=("fp32", "amp_bf16"))
  parser.add_argument("--peak_dtype", default="float32",
                      help="dtype of the matmul that measures the peak (bfloat16 on GPUs)")
  parser.add_argument("--peak_size", type=int, default=2048)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("flamingo_jax").setLevel(logging.INFO)
  peak = flops.measure_peak_flops(args.peak_dtype, size=args.peak_size)
  results = {"device": machine(), "devices": jax.device_count(), "jax": jax.__version__,
             "peak_matmul_flops_per_device": peak, "peak_dtype": args.peak_dtype,
             "configs": {}}
  for name in args.configs.split(","):
    path = os.path.join(REPO, "configs", name.split(":")[0] + ".py")
    path += (":" + name.split(":", 1)[1]) if ":" in name else ""
    out = {"ours": bench_ours(path, args.steps, args.warmup, peak)}
    if args.openflamingo and name.split(":")[0] == "bench":
      out["openflamingo"] = bench_openflamingo(path, args.steps, args.warmup,
                                               args.torch_device, args.openflamingo_precision)
      out["speedup"] = out["openflamingo"]["step_time_s"] / out["ours"]["step_time_s"]
    results["configs"][name] = out
    print(json.dumps({name: out}, indent=2), flush=True)
  print(json.dumps(results, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
