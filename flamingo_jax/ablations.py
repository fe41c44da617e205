"""`python -m flamingo_jax.ablations`: the command name users' launch scripts call; the program is
flamingo_jax.apps.ablations."""
import sys

if __name__ == "__main__":
  from flamingo_jax.apps.ablations import cli_main
  sys.exit(cli_main())
