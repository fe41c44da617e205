"""What a demo run is: its stages in order and how much each does at each scale."""
from __future__ import annotations

import dataclasses

STAGES = ("data", "lm", "vision", "flamingo", "eval", "report")
RESULT = "result.json"  # a stage's marker, written last


@dataclasses.dataclass(frozen=True)
class Scale:
  """How much each stage does. `demo` is what `make demo` runs (docs/demo.md gives
  its measured time); `short` the same with 300 Flamingo updates; `smoke` every stage
  at toy size (the tests)."""
  pairs: tuple[int, int] = (2000, 200)
  documents: tuple[int, int] = (1600, 100)
  videos: tuple[int, int] = (300, 50)
  corpus_lines: int = 20_000
  samples_per_shard: int = 1000  # >= 2 pair shards: contrastive "ALIGN" and "LTIP"
  lm_steps: int = 120
  vision_steps: int = 120
  flamingo_steps: int = 1200
  eval_samples: int = 64  # evaluated examples per task
  shots: tuple[int, ...] = (0, 4, 8)


SCALES = {
    "demo": Scale(),
    # The demo's data, LM and vision, a quarter of its Flamingo updates (a loaded machine).
    "short": Scale(flamingo_steps=300),
    "smoke": Scale(pairs=(96, 24), documents=(48, 8), videos=(8, 4), corpus_lines=2000,
                   samples_per_shard=48, lm_steps=8, vision_steps=4, flamingo_steps=40,
                   eval_samples=8, shots=(0, 2)),
}
