"""Checkpoint converters, one module per source, run as
`python -m flamingo_jax.convert <subcommand> ...` (see __main__.py)."""
