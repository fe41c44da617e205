"""`python -m flamingo_jax.tools.count_params`: the command name users' launch scripts call; the program is
flamingo_jax.apps.count_params."""
import sys

if __name__ == "__main__":
  from flamingo_jax.apps.count_params import cli_main
  sys.exit(cli_main())
