"""Training-step benchmark: our trainer vs OpenFlamingo's PyTorch modules.

  python benchmarks/train_step.py --configs tiny,bench --openflamingo [--steps 5]

For each config, runs the real trainer (flamingo_jax.trainers.flamingo.train.run, synthetic data
made once and reused, checkpoints off) and prints one JSON object per config:
step time and CPU seconds per step, host time per step and its share of the
step, tokens/s, FLOPs per step (frozen-aware, all-3x and 6N, see
flamingo_jax/trainers/flamingo/flops.py), MFU against the peak of a large matmul
measured on the same device (flamingo_jax/training/mfu.py), compiled and peak memory.

With --openflamingo, configs on precomputed features with a Llama or
Chinchilla-style LM (bench, bench_3b) also run in OpenFlamingo's
PerceiverResampler and GatedCrossAttentionBlock (open_flamingo/src, loaded by
path: its package __init__ needs open_clip) around a transformers LM of the
same sizes (LlamaForCausalLM; GPTNeoXForCausalLM with sequential residuals and
tied embeddings for Chinchilla-style), random weights, the LM frozen
(requires_grad False), on the same features and tokens; one step = forward,
loss, backward, clip, AdamW.

Each side runs in a long-lived worker process of its own (this script with
--worker), driven step by step over pipes: the parent ALTERNATES them (ours,
then OpenFlamingo's, then ours...), so both see the same machine load, but
torch's OpenMP threads cannot spin inside our process's step. Both workers get
the same CPUs (affinity) and thread count (--threads; torch.set_num_threads and
OMP_NUM_THREADS for torch, the affinity sizes XLA's pool). The parent also reads
each worker's CPU time from /proc while the other side steps
(`cpu_while_other_stepped_s`: spinning threads show up there). On a device of
its own run one side at a time (--openflamingo_only for the PyTorch side).

On a CPU, both workers start with glibc set to keep freed memory mapped
(--host_memory auto, the default, is keep there; flamingo_jax/host_memory.py: what
our command lines do on a CPU backend).
Under glibc's defaults a step's large temporaries are unmapped when freed and
page-faulted back in by the next step, and after the pause while the other side
steps that refault costs about twice as much (docs/benchmarks.md): alternating
would then measure the pause, not the step.

Host time (ours): CPU seconds of the training loop's thread per step (batch
assembly, host-to-device copies, dispatch, logging), excluding waits for the
device. On an accelerator the step is host-bound when it exceeds the device
time; on a CPU backend the computation runs on other threads, so it still is
the loop's own overhead.

--matmul M,K,N[;M,K,N...] times bare 2-D float32 matmuls of those sizes in
both frameworks (alternated, same workers) and prints FLOP/s and FLOP per CPU
second of each: whether one framework's kernels are faster on this CPU.
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
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from flamingo_jax.process import host_memory
from flamingo_jax.trainers.flamingo import train  # noqa: E402
from flamingo_jax.config import apply_overrides, load_config
from flamingo_jax.models.config import model_config  # noqa: E402
from flamingo_jax.data import in_memory  # noqa: E402
from flamingo_jax.trainers.flamingo import flops  # noqa: E402
from flamingo_jax.training import mfu  # noqa: E402

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
  """The trainer's on_step callback: times our steps, pausing between them.

  The trainer calls on_step(k) once step k's metrics are on the host and step
  k+1 is dispatched. Alone (no pause), the time between two calls is step k's.
  With pause(record) the callback first waits for step k+1 to finish, then
  calls pause with that step's (step, seconds, host seconds, process CPU
  seconds) (None the first time: no start yet) and returns, dispatching the
  next step, when pause does: step k+1 lasted from the end of the previous
  callback to that wait's end. The host time of a step is the loop thread's CPU
  time between two callbacks (outside them).
  """

  def __init__(self, total_steps: int, pause: Optional[Callable[[Optional[tuple]], None]] = None):
    self.total, self.pause = total_steps, pause
    self.ours = []  # (step, seconds, host seconds, process CPU seconds)
    self._wall = self._cpu = self._proc = None

  def __call__(self, done_step: int, metrics: dict) -> None:
    if self.pause is not None and done_step == self.total:
      return  # no step in flight to wait for
    cpu = time.thread_time()
    if self.pause is not None:
      jax.block_until_ready([a for a in jax.live_arrays() if not a.is_deleted()])
    wall, proc = time.perf_counter(), time.process_time()
    record = None
    if self._wall is not None:
      step = done_step + (self.pause is not None)
      record = (step, wall - self._wall, cpu - self._cpu, proc - self._proc)
      self.ours.append(record)
    if self.pause is not None:
      self.pause(record)
    self._wall, self._cpu, self._proc = time.perf_counter(), time.thread_time(), \
        time.process_time()


def ours_config(cfg, total: int, peak: float, made_once: bool):
  overrides = [f"train.total_steps={total}", "train.log_every=1",
               f"train.peak_flops_per_device={peak}", "checkpoint.enabled=False"]
  config = apply_overrides(cfg, overrides)
  if made_once:
    with config.unlocked():
      config.synthetic.distinct_batches = 1
  return config


def ours_summary(summary: dict, wall: float, made_once: bool) -> dict:
  """What the parent needs of train.run's summary besides the step times."""
  (name, f), = summary["flops"].items()
  stats = jax.local_devices()[0].memory_stats() or {}
  return {
      "flops_per_step": {k: f[k] for k in ("frozen_aware", "all_3x", "6n", "forward")},
      "text_tokens": f["text_tokens"],
      "memory_per_device_bytes": summary["memory"][name],
      "trainable_params": (summary["memory"][name]["trainable_params"] // 4  # float32
                           if jax.device_count() == 1 else None),
      "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "input_made_once": made_once,
      "final_loss": summary["history"][-1]["loss"],
      "run_wall_s": wall, "devices": jax.device_count(), "device": machine(),
      "jax": jax.__version__, "threads": len(os.sched_getaffinity(0)),
  }


def step_stats(records: list[dict], flops_per_step: Optional[float], tokens: Optional[int],
               peak: float, devices: int = 1) -> dict:
  """Medians of the timed steps' records ({wall_s, cpu_s[, host_s]})."""
  wall = median([r["wall_s"] for r in records])
  out = {"step_time_s": wall, "step_times_s": [round(r["wall_s"], 4) for r in records],
         "process_cpu_time_per_step_s": median([r["cpu_s"] for r in records]),
         "process_cpu_times_s": [round(r["cpu_s"], 3) for r in records]}
  other = [r["cpu_while_other_stepped_s"] for r in records
           if r.get("cpu_while_other_stepped_s") is not None]
  if other:
    out["cpu_while_other_stepped_s"] = median(other)
  if records and "page_faults" in records[0]:
    out["page_faults_per_step"] = median([r["page_faults"] for r in records])
  if records and "host_s" in records[0]:
    host = median([r["host_s"] for r in records])
    out.update(host_time_per_step_s=host, host_share_of_step=host / wall)
  if tokens:
    out["tokens_per_s"] = tokens / wall
  if flops_per_step:
    out["mfu_frozen_aware"] = flops_per_step / wall / (peak * devices)
    out["frozen_aware_flop_per_cpu_s"] = flops_per_step / out["process_cpu_time_per_step_s"]
  return out

def summary_line(config: str, kind: str, stats: dict, steps: int) -> str:
  """One line a person reads: what was timed and what the MFU is a fraction of."""
  line = (f"{config} {kind}: median of {steps} timed steps {stats['step_time_s']:.4g} s/step, "
          f"{stats['process_cpu_time_per_step_s']:.4g} CPU s/step")
  if "tokens_per_s" in stats:
    line += f", {stats['tokens_per_s']:,.0f} text tokens/s"
  if "mfu_frozen_aware" in stats:
    line += (f", MFU {100 * stats['mfu_frozen_aware']:.1f}% (frozen-aware FLOPs over the "
             "measured matmul peak)")
  return line


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


# --------------------------------------------------------------------------
# Workers: one process per side, one step per command


class Channel:
  """The worker's end of the pipes: JSON lines in on stdin, out on the stdout it was
  started with (anything else printed goes to stderr)."""

  def __init__(self):
    self.out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

  def send(self, **msg) -> None:
    self.out.write(json.dumps(msg) + "\n")

  def recv(self) -> str:
    line = sys.stdin.readline()
    if not line:
      raise SystemExit(0)  # the parent is gone
    return line.strip()


def time_matmuls(shapes, run_one, repeats: int = 5) -> list[dict]:
  """Best of `repeats` calls of run_one(i) (the i-th shape's matmul, finished on return)."""
  out = []
  for i, (m, k, n) in enumerate(shapes):
    run_one(i)
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
      t, c = time.perf_counter(), time.process_time()
      run_one(i)
      best_wall, best_cpu = min(best_wall, time.perf_counter() - t), \
          min(best_cpu, time.process_time() - c)
    f = flops.dense(m, k, n)
    out.append({"shape": [m, k, n], "flop_per_s": f / best_wall, "flop_per_cpu_s": f / best_cpu})
  return out


def worker_ours(ch: Channel, a: dict) -> None:
  cfg = apply_overrides(load_config(config_path(a["config"])), a["set"])
  if a.get("matmul"):
    import jax.numpy as jnp
    mats = [(jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32))
            for m, k, n in a["matmul"]]
    mm = jax.jit(jnp.dot)
    ch.send(ready=True)
    while ch.recv() == "go":
      ch.send(matmul=time_matmuls(a["matmul"], lambda i: mm(*mats[i]).block_until_ready()))
    ch.send(summary={})
    return
  total = a["steps"] + 2  # step 1: the first interval has no start; one in flight at the end
  faults = [minor_faults()]

  def pause(record):
    if record is None:
      ch.send(ready=True)
    else:
      ch.send(wall_s=record[1], host_s=record[2], cpu_s=record[3], step=record[0],
              page_faults=minor_faults() - faults[0])
    ch.recv()  # go | finish
    faults[0] = minor_faults()

  clock = StepClock(total, pause)
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    summary = train.run(ours_config(cfg, total, a["peak"], a["made_once"]), workdir,
                        on_step=clock)
    wall = time.perf_counter() - t0
  ch.send(summary=ours_summary(summary, wall, a["made_once"]))


def worker_openflamingo(ch: Channel, a: dict) -> None:
  import torch
  torch.set_num_threads(a["threads"])
  cfg = apply_overrides(load_config(config_path(a["config"])), a["set"])
  if a.get("matmul"):
    mats = [(torch.ones(m, k), torch.ones(k, n)) for m, k, n in a["matmul"]]
    ch.send(ready=True)
    while ch.recv() == "go":
      ch.send(matmul=time_matmuls(a["matmul"], lambda i: torch.mm(*mats[i])))
    ch.send(summary={})
    return
  side = OpenFlamingo(cfg, a["torch_device"], a["precision"])
  ch.send(ready=True)
  while ch.recv() == "go":
    t, c, f = time.perf_counter(), time.process_time(), minor_faults()
    side.step()
    ch.send(wall_s=time.perf_counter() - t, cpu_s=time.process_time() - c,
            page_faults=minor_faults() - f)
  m = model_config(cfg)
  syn = in_memory.synthetic_config(cfg.synthetic)
  (spec,) = syn.datasets.values()
  f = flops.step_flops(m, [flops.BatchShape(spec.batch_size, spec.seq_len, spec.max_images,
                                            spec.num_frames, image_size=0,
                                            feature_positions=syn.feature_positions)])
  out = side.result([])
  out.update(flops_per_step={"frozen_aware": f["frozen_aware"]}, text_tokens=f["text_tokens"],
             threads=torch.get_num_threads())
  ch.send(summary=out)


def worker_peak(ch: Channel, a: dict) -> None:
  peak = mfu.measure_peak_flops(a["dtype"], size=a["size"], min_seconds=a["seconds"])
  ch.send(peak=peak, device=machine(),
          devices=jax.device_count(), jax=jax.__version__)


def minor_faults() -> int:
  """Page faults this process has taken (freshly mapped memory touched: each costs kernel
  time, see flamingo_jax/host_memory.py)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def proc_cpu_seconds(pid: int) -> Optional[float]:
  """utime + stime of a process (all its threads) from /proc; None off Linux."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, IndexError, ValueError):
    return None


class Worker:
  """The parent's handle on one side's worker process."""

  def __init__(self, kind: str, args: dict, cpus: list[int], keep_host_memory: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS=str(len(cpus)), MKL_NUM_THREADS=str(len(cpus)),
               PYTHONUNBUFFERED="1", **(host_memory.GLIBC_ENV if keep_host_memory else {}))
    self.kind = kind
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", kind, "--worker_args",
         json.dumps(args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus))

  def recv(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      code = self.proc.wait()
      raise SystemExit(f"error: the {self.kind} worker exited ({code}) before answering; "
                       "its log is above")
    return json.loads(line)

  def ask(self, command: str) -> dict:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self.recv()

  def cpu(self) -> Optional[float]:
    return proc_cpu_seconds(self.proc.pid)

  def close(self) -> None:
    if self.proc.poll() is None:
      with contextlib.suppress(OSError):  # the worker already closed its end
        self.proc.stdin.close()
      try:
        self.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def alternate(workers: list[Worker], n: int) -> list[list[dict]]:
  """n rounds of one command per worker in turn; each answer gets the CPU seconds the
  other workers used meanwhile (`cpu_while_other_stepped_s`, summed over the others)."""
  records = [[] for _ in workers]
  for _ in range(n):
    for i, w in enumerate(workers):
      others = [o for o in workers if o is not w]
      before = [o.cpu() for o in others]
      r = w.ask("go")
      after = [o.cpu() for o in others]
      if others and None not in before + after:
        r["cpu_while_other_stepped_s"] = sum(b - a for a, b in zip(before, after))
      records[i].append(r)
  return records


def run_sides(kinds: list[str], args: dict, cpus: list[int], rounds: int,
              keep_host_memory: bool = True):
  """Starts one worker per kind, waits until all are ready (built, compiled), alternates
  `rounds` commands, then finishes them: (records per kind, summaries per kind)."""
  workers = []
  try:
    for kind in kinds:
      workers.append(Worker(kind, args, cpus, keep_host_memory))
    for w in workers:
      w.recv()  # ready
    records = alternate(workers, rounds)
    summaries = [w.ask("finish").get("summary") for w in workers]
  finally:
    for w in workers:
      w.close()
  return dict(zip(kinds, records)), dict(zip(kinds, summaries))


def bench_config(name: str, args, cpus: list[int], peak: float, with_of: bool) -> dict:
  """One config: the sides' workers alternated (or one alone); the JSON of the run."""
  wargs = {"config": name, "set": args.set, "peak": peak, "made_once": not args.fresh_batches,
           "steps": args.warmup + args.steps, "threads": len(cpus),
           "torch_device": args.torch_device, "precision": args.openflamingo_precision}
  kinds = (["openflamingo"] if args.openflamingo_only else
           ["ours", "openflamingo"] if with_of else ["ours"])
  records, summaries = run_sides(kinds, wargs, cpus, args.warmup + args.steps,
                                 args.keep_host_memory)
  out = {}
  for kind in kinds:
    s, timed = summaries[kind], records[kind][args.warmup:]
    stats = step_stats(timed, s["flops_per_step"]["frozen_aware"], s.get("text_tokens"), peak,
                       s.get("devices", 1))
    out[kind] = {**s, **stats}
  if len(kinds) == 2:
    ours, of = out["ours"], out["openflamingo"]
    out.update(alternated=True, separate_processes=True, threads=len(cpus),
               speedup=of["step_time_s"] / ours["step_time_s"],
               ours_over_openflamingo={
                   "wall": ours["step_time_s"] / of["step_time_s"],
                   "cpu": ours["process_cpu_time_per_step_s"]
                   / of["process_cpu_time_per_step_s"]})
  return out


def bench_matmuls(shapes, args, cpus: list[int]) -> dict:
  """Bare float32 matmuls in both frameworks, alternated: best of 5 per round, median
  of --steps rounds."""
  wargs = {"config": "bench", "set": [], "matmul": shapes, "threads": len(cpus)}
  records, _ = run_sides(["ours", "openflamingo"], wargs, cpus, args.steps,
                         args.keep_host_memory)
  out = []
  for i, shape in enumerate(shapes):
    row = {"shape_mkn": shape}
    for kind, name in (("ours", "jax"), ("openflamingo", "torch")):
      rounds = [r["matmul"][i] for r in records[kind]]
      row[name] = {k: median([r[k] for r in rounds]) for k in ("flop_per_s", "flop_per_cpu_s")}
    row["jax_over_torch_time"] = row["torch"]["flop_per_s"] / row["jax"]["flop_per_s"]
    out.append(row)
  return {"matmul": out, "threads": len(cpus)}


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
  parser.add_argument("--threads", type=int, default=0,
                      help="CPUs (and threads) for each side (default: all this process may use)")
  parser.add_argument("--matmul", default="",
                      help="M,K,N[;M,K,N...]: time bare float32 matmuls in JAX and torch "
                           "instead of training steps")
  parser.add_argument("--fresh_batches", action="store_true",
                      help="make a new synthetic batch every step (default: made once)")
  parser.add_argument("--torch_device", default="cpu", help="OpenFlamingo's device (cuda)")
  parser.add_argument("--openflamingo_precision", default="fp32", choices=("fp32", "amp_bf16"))
  parser.add_argument("--peak_dtype", default="float32",
                      help="dtype of the matmul that measures the peak (bfloat16 on GPUs)")
  parser.add_argument("--peak_size", type=int, default=2048)
  parser.add_argument("--peak_seconds", type=float, default=10.0,
                      help="the peak is the best matmul call over this many seconds (a shared "
                           "VM's speed comes and goes)")
  parser.add_argument("--peak_flops", type=float, default=0.0,
                      help="use this peak FLOP/s instead of measuring it (same denominator "
                           "across runs)")
  parser.add_argument("--host_memory", default="auto", choices=("auto", "keep", "default"),
                      help="keep: both sides' workers keep freed memory mapped (glibc "
                           "settings of flamingo_jax/host_memory.py), so a step does not "
                           "page-fault its temporaries back in; default: glibc's defaults; "
                           "auto: keep when both sides run on the CPU")
  parser.add_argument("--output", default="", help="also write the results JSON here")
  parser.add_argument("--worker", choices=("ours", "openflamingo", "peak"), help=argparse.SUPPRESS)
  parser.add_argument("--worker_args", default="{}", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("flamingo_jax").setLevel(logging.INFO)
  # A worker pauses between steps while the other side steps, so the trainer's own
  # per-step lines (s/step, tok/s, MFU over the paused clock) would measure the pauses;
  # the parent prints this benchmark's timings instead (summary_line).
  logging.getLogger("flamingo_jax.training.loop").setLevel(logging.WARNING)
  if args.worker:
    ch = Channel()
    {"ours": worker_ours, "openflamingo": worker_openflamingo, "peak": worker_peak}[
        args.worker](ch, json.loads(args.worker_args))
    return 0
  if args.warmup < 1:
    parser.error("--warmup must be >= 1 (the first step's start is compile time)")
  if args.host_memory == "auto":
    on_cpu = host_memory.backend_will_be_cpu() and args.torch_device == "cpu"
    args.host_memory = "keep" if on_cpu else "default"
  args.keep_host_memory = args.host_memory == "keep"
  allowed = sorted(os.sched_getaffinity(0))
  if not 0 <= args.threads <= len(allowed):
    parser.error(f"--threads must be between 1 and the {len(allowed)} CPUs this process may use")
  cpus = allowed[:args.threads or len(allowed)]
  results = {"load_average": os.getloadavg(), "threads_per_side": len(cpus),
             "host_memory": args.host_memory, "configs": {}}
  if args.matmul:
    try:
      shapes = [[int(x) for x in s.split(",")] for s in args.matmul.split(";")]
      assert all(len(s) == 3 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
      parser.error(f"--matmul wants M,K,N[;M,K,N...] of positive ints, got {args.matmul!r}")
    results.update(bench_matmuls(shapes, args, cpus))
  else:
    info = None
    if not args.peak_flops:  # measured in a process of its own, on the same CPUs
      w = Worker("peak", {"dtype": args.peak_dtype, "size": args.peak_size,
                          "seconds": args.peak_seconds}, cpus,
                 args.keep_host_memory)
      try:
        info = w.recv()
      finally:
        w.close()
    peak = args.peak_flops or info["peak"]
    results.update({"peak_matmul_flops_per_device": peak, "peak_dtype": args.peak_dtype})
    if info:
      results.update(device=info["device"], devices=info["devices"], jax=info["jax"])
    for name in args.configs.split(","):
      cfg = apply_overrides(load_config(config_path(name)), args.set)
      out = bench_config(name, args, cpus, peak,
                         with_of=args.openflamingo and supports_openflamingo(cfg))
      results["configs"][name] = out
      print(json.dumps({name: out}, indent=2), flush=True)
      for kind in ("ours", "openflamingo"):
        if kind in out:
          print(summary_line(name, kind, out[kind], args.steps), file=sys.stderr, flush=True)
  results["load_average_after"] = os.getloadavg()
  print(json.dumps(results, indent=2))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
