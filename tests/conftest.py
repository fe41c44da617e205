"""Shared test setup: 8 fake CPU devices for sharding tests, float32 matmuls, and the
session fixtures several test modules read (built once per pytest process; read-only:
a test that changes one copies it first)."""
import logging
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


@pytest.fixture(autouse=True)
def _package_logging_restored():
  """A CLI run in-process (training.cli.setup_logging: a stderr handler on the flamingo_jax
  logger, propagation off) leaves no handler behind for the tests after it."""
  log = logging.getLogger("flamingo_jax")
  saved = list(log.handlers), log.level, log.propagate
  yield
  log.handlers[:] = saved[0]
  log.setLevel(saved[1])
  log.propagate = saved[2]


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


def pytest_collection_modifyitems(config, items):
  """Modules with slow tests first, collection order otherwise. `make test` runs pytest-xdist
  with --dist loadscope: each worker takes whole modules (a module fixture is built once, not
  once per worker), the long modules start first and the short ones fill in at the end."""
  del config
  slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.module.__name__ not in slow)
