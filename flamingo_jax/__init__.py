"""flamingo_jax: Flamingo-style visual language models in JAX/Flax (linen)."""

__version__ = "0.1.0"
