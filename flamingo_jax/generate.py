"""`python -m flamingo_jax.generate`: the command name users' launch scripts call; the program is
flamingo_jax.apps.generate."""
import sys

if __name__ == "__main__":
  from flamingo_jax.apps.generate import cli_main
  sys.exit(cli_main())
