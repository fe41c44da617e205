"""Where training metrics go: a progress line, TensorBoard events, metrics.jsonl.

Only process 0 writes (every process computes the same global metrics).
  workdir/metrics.jsonl   one JSON object per logged step: {"step": s, name: value, ...}
  workdir/tensorboard/    tensorboardX event files, one scalar per metric name
  workdir/history.jsonl   with history_from: one object per step, every step of the run
                          (resumed runs included), for plots and exact-resume checks
The progress line carries step, the loss of every dataset, learning rate,
gradient norm, tokens/s, MFU and ETA. Progress is the bar (or, off a terminal, the
few plain lines) that the demo's stages and evaluation show.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import IO, Mapping, Optional

from etils import epath

log = logging.getLogger(__name__)


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Writes scalar metrics of the run in `workdir` (no-op when not enabled).

  history_from (the step the run starts from): also keep every step's metrics, in
  `history` and workdir/history.jsonl; rows past that step (logged by a killed run
  after its last checkpoint, replayed now) are dropped first.
  """

  def __init__(self, workdir, enabled: bool = True, history_from: Optional[int] = None):
    self.enabled = enabled
    self.jsonl = self.tb = self.history_file = None
    self.history: Optional[list[dict]] = None if history_from is None else []
    if not enabled:
      return
    workdir = epath.Path(workdir)  # local paths and gs:// alike
    workdir.mkdir(parents=True, exist_ok=True)
    self.jsonl = (workdir / "metrics.jsonl").open("a")
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(str(workdir / "tensorboard"))
    if history_from is not None:
      path = workdir / "history.jsonl"
      rows = [json.loads(line) for line in path.read_text().splitlines()
              if line.strip()] if path.exists() else []
      self.history = [r for r in rows if r["step"] <= history_from]
      path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
      self.history_file = path.open("a")

  def write_step(self, step: int, metrics: Mapping[str, float]) -> None:
    """One step's metrics into the history (every step; no-op without history_from)."""
    if self.history is None:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items() if k != "step"}}
    self.history.append(row)
    if self.history_file is not None:
      self.history_file.write(json.dumps(row) + "\n")
      self.history_file.flush()

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
      if self.history_file is not None:
        self.history_file.close()
        self.history_file = None
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


class Progress:
  """Progress over `total` units (steps, examples): a tqdm bar when `file` is a terminal;
  otherwise (a log file, a pipe) one plain line per `every` units and one at the end, so a
  written log holds a few lines rather than thousands of bar redraws."""

  def __init__(self, desc: str, total: int, *, initial: int = 0, unit: str = "step",
               file: Optional[IO[str]] = None, lines: int = 10):
    self.desc, self.total, self.unit = desc, total, unit
    self.file = file if file is not None else sys.stderr
    self.n = self._printed = initial
    self.every = max(1, math.ceil(total / max(lines, 1)))
    self.postfix: dict[str, str] = {}
    self._t0 = time.perf_counter()
    self._bar = None
    isatty = getattr(self.file, "isatty", None)
    if isatty is not None and isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.file,
                       dynamic_ncols=True)

  def set(self, n: int, **postfix: str) -> None:
    """Moves to `n` units done; postfix entries (loss=...) ride along."""
    self.n = n
    self.postfix.update(postfix)
    if self._bar is not None:
      self._bar.n = n
      if postfix:
        self._bar.set_postfix(self.postfix, refresh=False)
      self._bar.refresh()
    elif n >= self.total or n // self.every > self._printed // self.every:
      self._line()

  def update(self, k: int = 1, **postfix: str) -> None:
    self.set(self.n + k, **postfix)

  def _line(self) -> None:
    self._printed = self.n
    extra = "".join(f" | {k} {v}" for k, v in self.postfix.items())
    print(f"{self.desc}: {self.n}/{self.total} {self.unit}s{extra} | "
          f"{_fmt_duration(time.perf_counter() - self._t0)}", file=self.file, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self.n != self._printed:
      self._line()
