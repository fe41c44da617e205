"""What the demonstrations change in a captioning evaluation's predictions.

  python -m flamingo_jax.tools.shot_diff EVAL_DIR [--task captions] [--json]

EVAL_DIR is an evaluation's output (`predictions/TASK_{N}shot.json` for every shot
count N, as `flamingo_jax.evaluate` and the demo write them). Per shot count, against
the fewest shots: how many predictions are unchanged, how many match a reference
exactly, their mean length in words, and the wrong words per caption among the
captions as long as their first reference (word by word: in a templated world such as
the demo's a wrong word is a misread colour, shape or position). Why: a score that
does not rise with shots is either a format the shots do not fix or a perception
error no demonstration can fix; these counts tell which.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Optional, Sequence

from flamingo_jax.errors import UserError, run_cli


def load_predictions(eval_dir: str, task: str) -> dict[int, list[dict]]:
  """{shots: the prediction records} from EVAL_DIR/predictions/TASK_{N}shot.json."""
  folder = os.path.join(eval_dir, "predictions")
  found = {}
  if os.path.isdir(folder):
    for name in os.listdir(folder):
      m = re.fullmatch(re.escape(task) + r"_(\d+)shot\.json", name)
      if m:
        with open(os.path.join(folder, name)) as f:
          found[int(m.group(1))] = json.load(f)
  if not found:
    raise UserError(f"{folder}: no {task}_{{N}}shot.json predictions (is EVAL_DIR an "
                    "evaluation's output directory?)")
  for shots, records in found.items():
    for r in records:
      if "prediction" not in r or "references" not in r:
        raise UserError(f"{folder}/{task}_{shots}shot.json: a record without 'prediction' "
                        f"and 'references' (keys {sorted(r)})")
  return dict(sorted(found.items()))


def _words(text: str) -> list[str]:
  return text.replace(",", " ").replace(".", " ").lower().split()


def wrong_words(prediction: str, reference: str) -> Optional[int]:
  """Words that differ, position by position; None when the lengths differ."""
  a, b = _words(prediction), _words(reference)
  return sum(x != y for x, y in zip(a, b)) if len(a) == len(b) else None


def summarise(by_shots: dict[int, list[dict]]) -> dict[int, dict]:
  """Per shot count: unchanged (vs the fewest shots, by example id), exact, mean words,
  wrong words per same-length caption and how many captions that counts."""
  base_shots = min(by_shots)
  base = {r.get("id", i): r["prediction"] for i, r in enumerate(by_shots[base_shots])}
  out = {}
  for shots, records in by_shots.items():
    wrong = [w for r in records if r["references"]
             for w in [wrong_words(r["prediction"], r["references"][0])] if w is not None]
    out[shots] = {
        "examples": len(records),
        "unchanged": sum(base.get(r.get("id", i)) == r["prediction"]
                         for i, r in enumerate(records)),
        "exact": sum(r["prediction"] in r["references"] for r in records),
        "mean_words": sum(len(_words(r["prediction"])) for r in records) / max(len(records), 1),
        "same_length": len(wrong),
        "wrong_words_per_caption": sum(wrong) / len(wrong) if wrong else float("nan")}
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m flamingo_jax.tools.shot_diff",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("eval_dir")
  p.add_argument("--task", default="captions")
  p.add_argument("--json", action="store_true")
  a = p.parse_args(argv)
  summary = summarise(load_predictions(a.eval_dir, a.task))
  if a.json:
    print(json.dumps({str(k): v for k, v in summary.items()}))
    return 0
  base = min(summary)
  print(f"| shots | examples | unchanged vs {base}-shot | exact | mean words | "
        "wrong words / caption (same-length captions) |")
  print("|---:|---:|---:|---:|---:|---:|")
  for shots, s in summary.items():
    print(f"| {shots} | {s['examples']} | {s['unchanged']} | {s['exact']} | "
          f"{s['mean_words']:.2f} | {s['wrong_words_per_caption']:.2f} ({s['same_length']}) |")
  return 0


def cli_main() -> int:
  """`python -m flamingo_jax.tools.shot_diff`: exit status 0, or 2 with one `error:` line for bad input."""
  return run_cli(main)


if __name__ == "__main__":
  sys.exit(cli_main())
