"""`python -m flamingo_jax.contrastive`: the command name users' launch scripts call; the program is
flamingo_jax.trainers.contrastive.train."""
import sys

if __name__ == "__main__":
  from flamingo_jax.trainers.contrastive.train import cli_main
  sys.exit(cli_main())
