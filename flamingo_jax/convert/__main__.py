"""`python -m flamingo_jax.convert <subcommand> [options]`.

Each subcommand is a module exposing `add_arguments(parser)` and
`main(args) -> int`; registering one is a line in SUBCOMMANDS.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "nfnet": ("flamingo_jax.convert.nfnet", "NFNet weights from timm or DeepMind Haiku"),
    "hf-lm": ("flamingo_jax.convert.hf_lm", "a Hugging Face causal LM (GPT-2, Llama, Mistral, GPT-NeoX, MPT)"),
    "openflamingo": ("flamingo_jax.convert.openflamingo",
                     "an OpenFlamingo checkpoint.pt + its base LM + OpenCLIP vision weights"),
    "idefics": ("flamingo_jax.convert.idefics",
                "an IDEFICS model directory (IdeficsForVisionText2Text: config.json + "
                "safetensors)"),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m flamingo_jax.convert",
      description="Convert external checkpoints into flamingo_jax orbax checkpoints.")
  sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
  for name, (module_name, help_text) in SUBCOMMANDS.items():
    module = importlib.import_module(module_name)
    p = sub.add_parser(name, help=help_text, description=module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(run=module.main)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.run(args)
  except ValueError as e:  # bad input: one clear line, not a traceback
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
