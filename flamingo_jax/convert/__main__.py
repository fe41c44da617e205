"""`python -m flamingo_jax.convert <subcommand> [options]`.

Each subcommand is a module exposing `add_arguments(parser)` and
`main(args) -> int`; registering one is a line in SUBCOMMANDS.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from flamingo_jax.errors import ArgumentParser, run_cli

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "nfnet": ("flamingo_jax.convert.nfnet", "NFNet weights from timm or DeepMind Haiku"),
    "hf-lm": ("flamingo_jax.convert.hf_lm", "a Hugging Face causal LM (see docs/checkpoints.md "
              "for the families)"),
    "openflamingo": ("flamingo_jax.convert.openflamingo",
                     "an OpenFlamingo checkpoint.pt + its base LM + OpenCLIP vision weights"),
    "idefics": ("flamingo_jax.convert.idefics",
                "an IDEFICS model directory (IdeficsForVisionText2Text: config.json + "
                "safetensors)"),
    "mllama": ("flamingo_jax.convert.mllama",
               "a Llama 3.2 Vision directory (transformers' mllama: config.json + "
               "safetensors)"),
    "mllama-export": ("flamingo_jax.convert.mllama_export",
                      "an mllama model directory back to transformers' layout (config.json + "
                      "safetensors)"),
}


def build_parser() -> argparse.ArgumentParser:
  parser = ArgumentParser(
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


def run(argv: Optional[Sequence[str]] = None) -> int:
  """Parse and run one subcommand; bad input raises (run_cli prints it as one line)."""
  args = build_parser().parse_args(argv)
  return args.run(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The CLI in-process: the exit status, `error: ...` on stderr and 2 for bad input (a
  truncated or foreign weights file, a missing tensor, a wrong flag)."""
  return run_cli(run, argv)


if __name__ == "__main__":
  sys.exit(run_cli(run))
