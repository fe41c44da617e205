"""flamingo_jax: Flamingo-style visual language models in JAX/Flax (linen)."""

from flamingo_jax.process import process_watch as _process_watch

__version__ = "0.1.0"

# A grain worker (a spawned child importing this package) dies with its parent,
# even while it is still starting up (flamingo_jax/process_watch.py).
_process_watch.watch_parent_if_spawned()
