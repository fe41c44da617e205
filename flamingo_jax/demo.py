"""`python -m flamingo_jax.demo`: the command name users' launch scripts call; the program is
flamingo_jax.apps.demo.stages."""
import sys

if __name__ == "__main__":
  from flamingo_jax.apps.demo.stages import cli_main
  sys.exit(cli_main())
