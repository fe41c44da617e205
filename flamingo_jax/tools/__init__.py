"""`python -m flamingo_jax.tools.<name>`: the tools' command names; the programs are in apps/."""
