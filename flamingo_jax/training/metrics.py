"""Where training metrics go: a progress line, TensorBoard events, metrics.jsonl.

Only process 0 writes (every process computes the same global metrics).
  workdir/metrics.jsonl   one JSON object per logged step: {"step": s, name: value, ...}
  workdir/tensorboard/    tensorboardX event files, one scalar per metric name
The progress line carries step, the loss of every dataset, learning rate,
gradient norm, tokens/s, MFU and ETA.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Mapping, Optional

from etils import epath

log = logging.getLogger("flamingo_jax.train")


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Writes scalar metrics of the run in `workdir` (no-op when not enabled)."""

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    self.jsonl = None
    self.tb = None
    if not enabled:
      return
    workdir = epath.Path(workdir)  # local paths and gs:// alike
    workdir.mkdir(parents=True, exist_ok=True)
    self.jsonl = (workdir / "metrics.jsonl").open("a")
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in metrics.items()})
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    for name, value in metrics.items():
      self.tb.add_scalar(name, float(value), int(step))

  def write_text(self, name: str, text: str, step: int = 0) -> None:
    if self.enabled:
      self.tb.add_text(name, text, step)

  def flush(self) -> None:
    if self.enabled:
      self.jsonl.flush()
      self.tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()
      self.enabled = False


def progress_line(step: int, total_steps: int, metrics: Mapping[str, float],
                  seconds_per_step: float, mfu: Optional[float]) -> str:
  """'step 120/500000 | loss m3w 2.31 pairs 3.02 | lr 2.4e-06 | |g| 0.84 | ...'."""
  losses = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in sorted(metrics.items())
                    if k.startswith("loss/"))
  parts = [f"step {step}/{total_steps}", f"loss {metrics.get('loss', float('nan')):.4f}"
           + (f" ({losses})" if losses else ""),
           f"lr {metrics.get('learning_rate', float('nan')):.3g}",
           f"|g| {metrics.get('grad_norm', float('nan')):.3g}"]
  if "tokens_per_second" in metrics:
    parts.append(f"{metrics['tokens_per_second']:,.0f} tok/s")
  if mfu is not None:
    parts.append(f"MFU {100 * mfu:.1f}%")
  if metrics.get("nonfinite_total"):
    parts.append(f"skipped {int(metrics['nonfinite_total'])}")
  parts.append(f"{seconds_per_step:.3g} s/step")
  parts.append(f"ETA {_fmt_duration(seconds_per_step * max(total_steps - step, 0))}")
  return " | ".join(parts)
