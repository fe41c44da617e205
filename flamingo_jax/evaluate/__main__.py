"""`python -m flamingo_jax.evaluate`: see flamingo_jax/evaluate/cli.py."""
import logging
import sys

from flamingo_jax.errors import run_cli
from flamingo_jax.evaluate.cli import main

if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  sys.exit(run_cli(main))
