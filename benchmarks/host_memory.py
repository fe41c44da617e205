"""The demo's Flamingo training with and without flamingo_jax/host_memory.py, alternated.

  python benchmarks/host_memory.py --workdir demo_workdir [--steps 200 --rounds 2]

Needs a demo workdir whose data, LM and vision stages are done (`make demo`). Each run is
a fresh process (the glibc settings only take effect before JAX's backend starts) that
trains the demo's Flamingo config for --steps updates, checkpoints off, in a temporary
workdir, reusing the workdir's compilation cache; the runs alternate keep, default,
keep, ... so both modes see the same machine load. Prints one JSON object: per run the
median step time, process user / system CPU seconds, page faults and max RSS; and the
ratio of the modes' median step times.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def one_run(workdir: str, steps: int, mode: str) -> dict:
  """This process trains `steps` demo updates; -> its figures."""
  from flamingo_jax.process import host_memory
  applied = host_memory.keep_freed_memory() if mode == "keep" else False
  import jax
  from flamingo_jax.apps.demo import stages as demo
  from flamingo_jax.trainers.flamingo import train
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir),
                                                              "jax_cache"))
  from flamingo_jax.config import apply_overrides
  config = demo.demo_config(workdir, [f"train.total_steps={steps}", "train.log_every=10",
                                      "train.export_dir=''"])
  config = apply_overrides(train.with_default_sections(config), ["checkpoint.enabled=False"])
  every = max(1, steps // 10)

  def progress(step, metrics):  # stderr goes through the parent: a line per tenth
    if step % every == 0 or step == steps:
      print(f"host_memory.py: {mode} run: step {step}/{steps}, loss {metrics['loss']:.3f}",
            file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory() as run_dir:
    t0 = time.perf_counter()
    summary = train.run(config, run_dir, devices=demo.train_devices(config), on_step=progress)
    wall = time.perf_counter() - t0
  times = [r["step_time"] for r in summary["history"] if "step_time" in r]
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return {"mode": mode, "applied": applied, "run_wall_s": wall,
          "median_step_time_s": statistics.median(times), "user_cpu_s": usage.ru_utime,
          "system_cpu_s": usage.ru_stime, "page_faults": usage.ru_minflt,
          "max_rss_bytes": usage.ru_maxrss * 1024}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="demo_workdir", help="a demo workdir (make demo)")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--rounds", type=int, default=2, help="keep/default pairs")
  p.add_argument("--mode", choices=("keep", "default"), help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.mode:
    print(json.dumps(one_run(a.workdir, a.steps, a.mode)))
    return 0
  for stage in ("data", "lm", "vision"):
    if not os.path.isdir(os.path.join(a.workdir, stage)):
      print(f"error: {a.workdir}/{stage} is missing: run `make demo` (or python -m "
            f"flamingo_jax.demo --workdir {a.workdir}) first", file=sys.stderr)
      return 2
  runs = []
  for i in range(a.rounds):
    for mode in ("keep", "default"):
      print(f"host_memory.py: round {i + 1}/{a.rounds}, {mode} run: compiling and training "
            f"{a.steps} demo updates in a fresh process ...", file=sys.stderr, flush=True)
      out = subprocess.run([sys.executable, os.path.abspath(__file__), "--workdir", a.workdir,
                            "--steps", str(a.steps), "--mode", mode],
                           check=True, stdout=subprocess.PIPE, text=True)
      runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
  step = {m: statistics.median(r["median_step_time_s"] for r in runs if r["mode"] == m)
          for m in ("keep", "default")}
  print(json.dumps({"load_average": os.getloadavg(), "steps": a.steps, "runs": runs,
                    "median_step_time_s": step,
                    "keep_over_default": step["keep"] / step["default"]}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
