"""Shared test setup: 8 fake CPU devices for sharding tests, float32 matmuls."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
  from flamingo_jax.models.config import model_config
  from flamingo_jax.config import load_config
  return model_config(load_config(os.path.join(REPO, "configs", "tiny.py")))
