"""`python -m flamingo_jax.tools.shot_diff`: the command name users' launch scripts call; the program is
flamingo_jax.apps.shot_diff."""
import sys

if __name__ == "__main__":
  from flamingo_jax.apps.shot_diff import cli_main
  sys.exit(cli_main())
