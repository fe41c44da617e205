"""Shared test setup: 8 fake CPU devices for sharding tests, float32 matmuls, and the
session fixtures several test modules read (built once per pytest process; read-only:
a test that changes one copies it first)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from data_helpers import train_small_tokenizer, write_shapes_world  # noqa: E402
from eval_files import CAPTIONS, QUESTIONS, export_tiny_model  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
  from flamingo_jax.models.config import model_config
  from flamingo_jax.config import load_config
  return model_config(load_config(os.path.join(REPO, "configs", "tiny.py")))


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> str:
  """Path of data_helpers.train_small_tokenizer's tokenizer.model (<image> 200, <EOC> 201)."""
  return train_small_tokenizer(str(tmp_path_factory.mktemp("small_tokenizer")))


@pytest.fixture(scope="session")
def shapes_world(tmp_path_factory) -> tuple[str, dict]:
  """(root, manifest) of data_helpers.write_shapes_world: tars, ArrayRecord, evaluation
  files and the tokenizer under root/tokenizer/."""
  root = str(tmp_path_factory.mktemp("shapes_world"))
  return root, write_shapes_world(root)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """(directory, FlamingoConfig): configs/tiny.py with random weights (seed 1) and a BPE
  tokenizer of eval_files' image captions and questions, exported as a model directory."""
  return export_tiny_model(tmp_path_factory.mktemp("tiny_model"), CAPTIONS, QUESTIONS, seed=1)
