"""The trainers, one package each, built on the model-agnostic library in flamingo_jax/training."""
