"""Parameter counts per component, without allocating anything (jax.eval_shape).

  python -m flamingo_jax.tools.count_params --config configs/flamingo_80b.py [--json]

Prints a table (or one JSON object with keys vision, resampler, xattn, lm,
new_tokens, total, trainable, frozen).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import flax.linen as nn
import jax

from flamingo_jax.models.config import FlamingoConfig, model_config
from flamingo_jax.config import apply_overrides, load_config, split_config_args
from flamingo_jax.errors import run_cli
from flamingo_jax.model_dir import init_inputs
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.models.labels import FROZEN, component_of, count_by_label


def abstract_params(config: FlamingoConfig, with_vision: bool = True):
  """The param tree as ShapeDtypeStructs (init under eval_shape)."""
  if not with_vision:
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, name="none"))
  model = Flamingo(config)
  visual = init_inputs(config, abstract=True)
  tokens = visual.pop("tokens")
  variables = jax.eval_shape(lambda t, v: model.init(jax.random.key(0), t, **v), tokens, visual)
  return nn.unbox(variables["params"])


def count_params(config: FlamingoConfig, with_vision: bool = True) -> dict[str, int]:
  params = abstract_params(config, with_vision)
  counts = {"vision": 0, "resampler": 0, "xattn": 0, "lm": 0, "new_tokens": 0}
  for key, sub in params.items():
    counts[component_of(key)] += sum(x.size for x in jax.tree.leaves(sub))
  counts["total"] = sum(counts.values())
  by_label = count_by_label(params, config)
  counts["frozen"] = by_label[FROZEN]
  counts["trainable"] = counts["total"] - by_label[FROZEN]
  return counts


def _fmt(n: int) -> str:
  return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = split_config_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="configs/X.py[:arg]")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--no_vision", action="store_true",
                      help="count a model fed precomputed features (no vision encoder)")
  args = parser.parse_args(rest)
  cfg = apply_overrides(load_config(args.config), overrides)
  counts = count_params(model_config(cfg), with_vision=not args.no_vision)
  if args.json:
    print(json.dumps(counts))
    return
  width = max(len(k) for k in counts)
  print(f"{'component':<{width}}  {'params':>14}  {'':>9}")
  for k, v in counts.items():
    print(f"{k:<{width}}  {v:>14,}  {_fmt(v):>9}")


def cli_main() -> int:
  """`python -m flamingo_jax.tools.count_params`: exit status 0, or 2 with one `error:` line for bad input."""
  return run_cli(main)


if __name__ == "__main__":
  sys.exit(cli_main())
