"""Checkpoints: restore onto another mesh, atomicity, retention, frozen weights
restored straight into their shardings and dtype."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from flamingo_jax.trainers.flamingo import components
from flamingo_jax.runtime import params_io
from flamingo_jax.training import checkpoint as ckpt_lib
from flamingo_jax.trainers.flamingo import layout
from flamingo_jax.training import optim
from flamingo_jax.runtime import sharding
from flamingo_jax.models.flamingo import Flamingo

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def _layout(config, mesh_cfg, devices):
  mesh_cfg = sharding.mesh_config(mesh_cfg)
  mesh = sharding.make_mesh(mesh_cfg, devices)
  tx = layout.make_optimizer(optim.optim_config({}), config, 100)
  return mesh, layout.state_layout(Flamingo(config), config, tx, mesh, mesh_cfg)


def _filled(abstract, shardings):
  """Distinct deterministic values in every leaf, placed with `shardings`."""
  leaves, tree = jax.tree.flatten(abstract)
  values = [np.arange(a.size, dtype=np.float64).reshape(a.shape).astype(a.dtype) + i
            for i, a in enumerate(leaves)]
  return jax.tree.map(jax.device_put, jax.tree.unflatten(tree, values), shardings)


def test_restore_onto_a_different_mesh(tiny_config, tmp_path):
  """Saved on 8 devices as data 4 x fsdp 2 (ZeRO-1), restored on 2 devices."""
  _, big = _layout(tiny_config, {"data": 4, "fsdp": 2, "zero1": True, "fsdp_min_size": 64},
                   jax.devices()[:8])
  state = _filled(big.state_abs, big.state_sh)
  specs = [s.spec for s in jax.tree.leaves(big.state_sh)]
  assert any("data" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), ckpt_lib.checkpoint_config({"every": 1}))
  ckpt.save(3, state, {"pairs": {"batch_index": 3}})
  ckpt.close()

  _, small = _layout(tiny_config, {"data": 2}, jax.devices()[:2])
  restored, data = ckpt_lib.Checkpointer(
      str(tmp_path), ckpt_lib.checkpoint_config({})).restore(
          3, sharding.with_shardings(small.state_abs, small.state_sh))
  assert data == {"pairs": {"batch_index": 3}}
  for got, want, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                           jax.tree.leaves(small.state_sh)):
    assert got.sharding.is_equivalent_to(sh, got.ndim)
    assert len(got.sharding.device_set) == 2
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_another_state_layout_is_refused_not_set_aside_as_corrupt(tmp_path):
  """An intact checkpoint whose optimizer state has another tree (a config or code change) is
  one error naming the difference; it is never renamed <step>.corrupt like damaged files."""
  import optax
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
  written = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), ckpt_lib.checkpoint_config({"every": 1}))
  for step in (1, 2):
    ckpt.save(step, {"params": params, "opt_state": written.init(params)}, {})
  ckpt.close()
  labelled = optax.multi_transform({"train": optax.adamw(1e-3), "frozen": optax.set_to_zero()},
                                   {"w": "train", "b": "frozen"})
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        jax.eval_shape(lambda: {"params": params,
                                                "opt_state": labelled.init(params)}))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), ckpt_lib.checkpoint_config({}))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoint 2 at .* holds another state "
                     r"layout than this run's .*opt_state"):
    ckpt.restore_latest(target)
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_unfinished_checkpoints_are_never_restored(tmp_path):
  cfg = ckpt_lib.checkpoint_config({"every": 1, "keep": 3})
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), cfg)
  ckpt.save(2, {"w": jnp.arange(4.0)}, {})
  ckpt.close()
  # A save killed half-way: orbax's temporary directory, and (on a filesystem
  # without atomic renames) a step directory without the commit marker.
  for name in ("5.orbax-checkpoint-tmp-1700000000", "7"):
    os.makedirs(tmp_path / name / "state")
    (tmp_path / name / "state" / "junk").write_text("half written")
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), cfg)
  assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
  assert not (tmp_path / "7").exists()
  state, _ = ckpt.restore(2, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  np.testing.assert_array_equal(state["w"], np.arange(4.0))
  ckpt.close()


def test_keeps_the_last_k(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), ckpt_lib.checkpoint_config({"keep": 2}))
  for step in range(1, 5):
    ckpt.save(step, {"w": jnp.full((2,), float(step))}, {})
  ckpt.close()
  assert ckpt_lib.Checkpointer(str(tmp_path), ckpt_lib.checkpoint_config({})).all_steps() == [3, 4]


def test_params_restore_into_shardings_and_dtype(tmp_path):
  mesh = sharding.make_mesh(sharding.mesh_config({"data": 2, "tensor": 4}))
  tree = {"blocks_0": {"kernel": np.arange(32, dtype=np.float32).reshape(8, 4)},
          "embedding": np.ones((16, 4), np.float32), "classifier": np.zeros((4, 3), np.float32)}
  params_io.save_params(str(tmp_path / "lm"), tree)
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tensor", None))
  target = {"blocks_0": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.bfloat16, sharding=sh)},
            "embedding": jax.ShapeDtypeStruct((16, 4), jnp.bfloat16, sharding=sh)}
  got = params_io.restore_params(str(tmp_path / "lm"), target)  # 'classifier' is skipped
  assert got["blocks_0"]["kernel"].dtype == jnp.bfloat16
  assert got["blocks_0"]["kernel"].sharding == sh
  np.testing.assert_array_equal(np.asarray(got["blocks_0"]["kernel"], np.float32),
                                tree["blocks_0"]["kernel"])
  missing = dict(target, final_norm={"scale": jax.ShapeDtypeStruct((4,), jnp.float32)})
  with pytest.raises(ValueError, match="missing.*final_norm/scale"):
    params_io.restore_params(str(tmp_path / "lm"), missing)
  wrong = dict(target, embedding=jax.ShapeDtypeStruct((17, 4), jnp.float32))
  with pytest.raises(ValueError, match=r"embedding: checkpoint \(16, 4\) vs model \(17, 4\)"):
    params_io.restore_params(str(tmp_path / "lm"), wrong)
  with pytest.raises(ValueError, match="does not exist"):
    params_io.restore_params(str(tmp_path / "nowhere"), target)


def test_components_restore_from_own_or_whole_trees(tmp_path):
  lm = {"embedding": np.ones((16, 4), np.float32), "blocks_0": {"kernel": np.zeros((4, 4))}}
  whole = {"lm": lm, "vision": {"conv": np.ones((3, 3), np.float32)},
           "xattn_block_0": {"gate": np.full((1,), 0.5, np.float32)}}
  params_io.save_params(str(tmp_path / "own"), lm)
  params_io.save_params(str(tmp_path / "whole"), whole)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), lm)
  for d in ("own", "whole"):
    got = components.restore_component(str(tmp_path / d), "lm", target)
    assert set(got) == {"embedding", "blocks_0"} and got["embedding"].dtype == jnp.bfloat16
  xattn = {"xattn_block_0": {"gate": jax.ShapeDtypeStruct((1,), jnp.float32)}}
  got = components.restore_component(str(tmp_path / "whole"), "xattn", xattn)
  np.testing.assert_array_equal(got["xattn_block_0"]["gate"], [0.5])


def test_component_trees_round_trip(tiny_config):
  from flamingo_jax.apps.count_params import abstract_params
  params = abstract_params(tiny_config)
  xattn = components.component_tree(params, "xattn")
  assert set(xattn) == {"xattn_block_0", "xattn_block_1"}
  assert components.component_tree(params, "lm") is params["lm"]
  back = components.with_component({k: v for k, v in params.items() if k != "lm"}, "lm",
                              params["lm"])
  assert traverse_util.flatten_dict(back).keys() == traverse_util.flatten_dict(params).keys()
