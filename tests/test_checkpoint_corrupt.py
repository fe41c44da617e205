"""A corrupt or partial newest checkpoint: one line (`checkpoint STEP at PATH: array|file
NAME: CAUSE`, under 200 characters); by default the newest intact one is restored with a
warning, checkpoint.on_corrupt='refuse' stops.
Each part is corrupted in turn: state arrays, state metadata, the state directory,
the data-iterator state; and frozen weights, which have no fallback."""
import glob
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.trainers.flamingo import components
from flamingo_jax.runtime import params_io
from flamingo_jax.errors import CheckpointError
from flamingo_jax.training import checkpoint as ckpt_lib

TARGET = {"params": {"w": jax.ShapeDtypeStruct((1000,), jnp.float32),
                     "b": jax.ShapeDtypeStruct((3,), jnp.float32)}}


def _two_steps(directory, on_corrupt="fallback"):
  cfg = ckpt_lib.checkpoint_config({"every": 1, "keep": 3, "on_corrupt": on_corrupt})
  c = ckpt_lib.Checkpointer(str(directory), cfg)
  for step in (1, 2):
    c.save(step, {"params": {"w": jnp.arange(1000.0) + step, "b": jnp.ones(3) * step}},
           {"ds": {"batch_index": step}})
  c.close()
  return cfg


def _garbage_arrays(directory):
  """Overwrites the start of every OCDBT data file (b-tree nodes and chunks) below it."""
  files = [f for f in glob.glob(f"{directory}/**/d/*", recursive=True) if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.write(b"\x00garbage" * 8)


def _garbage_metadata(step_dir):
  with open(f"{step_dir}/state/_METADATA", "w") as fh:
    fh.write("{not json")


def _no_state(step_dir):
  shutil.rmtree(f"{step_dir}/state")


def _garbage_data_state(step_dir):
  (path,) = glob.glob(f"{step_dir}/data/process_*.json")
  with open(path, "w") as fh:
    fh.write("{garbage")


CORRUPTIONS = {"state_arrays": lambda step_dir: _garbage_arrays(f"{step_dir}/state"), "state_metadata": _garbage_metadata,
               "state_missing": _no_state, "data_state": _garbage_data_state}


@pytest.mark.parametrize("part", sorted(CORRUPTIONS))
def test_falls_back_to_the_newest_intact_checkpoint(part, tmp_path, caplog):
  cfg = _two_steps(tmp_path)
  CORRUPTIONS[part](tmp_path / "2")
  c = ckpt_lib.Checkpointer(str(tmp_path), cfg)
  with caplog.at_level(logging.WARNING, logger="flamingo_jax.training.checkpoint"):
    step, state, data = c.restore_latest(TARGET)
  assert step == 1 and data == {"ds": {"batch_index": 1}}
  np.testing.assert_array_equal(state["params"]["w"], np.arange(1000.0) + 1)
  (line,) = [r.getMessage() for r in caplog.records if "2.corrupt" in r.getMessage()]
  assert re.match(rf"checkpoint 2 at {re.escape(str(tmp_path))}/2: (array|file) \S+: .", line)
  assert line.endswith("; set aside as 2.corrupt, falling back to checkpoint 1")
  assert "\n" not in line and len(line.split("; set aside")[0]) < 200
  # Set aside, so the resumed run saves step 2 again.
  assert c.all_steps() == [1] and (tmp_path / "2.corrupt").is_dir()
  assert c.save(2, state, data)
  c.close()


@pytest.mark.parametrize("part", sorted(CORRUPTIONS))
def test_refuse_stops_with_one_line(part, tmp_path):
  cfg = _two_steps(tmp_path, on_corrupt="refuse")
  CORRUPTIONS[part](tmp_path / "2")
  c = ckpt_lib.Checkpointer(str(tmp_path), cfg)
  with pytest.raises(CheckpointError) as e:
    c.restore_latest(TARGET)
  msg = str(e.value)
  assert msg.startswith(f"checkpoint 2 at {tmp_path}/2: ")
  assert "on_corrupt='refuse'" in msg and "\n" not in msg and len(msg) < 200
  assert c.all_steps() == [1, 2]  # nothing renamed
  c.close()


def test_every_checkpoint_corrupt_is_an_error(tmp_path):
  cfg = _two_steps(tmp_path)
  for step in ("1", "2"):
    _garbage_data_state(tmp_path / step)
  c = ckpt_lib.Checkpointer(str(tmp_path), cfg)
  with pytest.raises(CheckpointError, match=r"no intact checkpoint .* steps \[1, 2\]"):
    c.restore_latest(TARGET)
  c.close()


def test_a_config_that_does_not_fit_is_not_a_corrupt_checkpoint(tmp_path):
  cfg = _two_steps(tmp_path)
  target = {"params": dict(TARGET["params"], w=jax.ShapeDtypeStruct((999,), jnp.float32))}
  c = ckpt_lib.Checkpointer(str(tmp_path), cfg)
  with pytest.raises(CheckpointError, match=r"checkpoint 2 .* does not fit the config: "
                     r"params/w: checkpoint \(1000,\) vs config \(999,\)"):
    c.restore_latest(target)
  assert c.all_steps() == [1, 2]
  c.close()


def test_corrupt_frozen_weights_are_one_line(tmp_path):
  directory = str(tmp_path / "frozen" / "lm")
  params_io.save_params(directory, {"embed": jnp.ones((16, 4))}, {"component": "lm"})
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"embed": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=device)}
  params_io.check_params(directory, abstract)  # intact
  with pytest.raises(CheckpointError, match=r"shape mismatch .* embed: checkpoint \(16, 4\) "
                     r"vs model \(32, 4\)"):
    params_io.check_params(directory, {"embed": jax.ShapeDtypeStruct((32, 4), jnp.float32)},
                          "model_init.lm")
  _garbage_arrays(directory)
  with pytest.raises(CheckpointError) as e:
    components.restore_component(directory, "lm", abstract)
  assert str(e.value).startswith(f"checkpoint at {directory}: ") and "\n" not in str(e.value)
  assert len(str(e.value)) < 200
  with open(os.path.join(directory, "_METADATA"), "w") as fh:
    fh.write("{not json")
  with pytest.raises(CheckpointError, match=r"^checkpoint at .*/frozen/lm: file _METADATA: not "
                     "JSON"):
    components.check_component(directory, "lm", abstract, "model_init.lm")

