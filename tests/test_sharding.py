"""Mesh construction and parameter layouts: logical rules, divisibility, the FSDP
fallback and ZeRO-1 (the sharded step itself is compared with one device in
test_train_loop.py)."""
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from flamingo_jax.trainers.flamingo import layout
from flamingo_jax.training import optim
from flamingo_jax.runtime import sharding
from flamingo_jax.models.flamingo import Flamingo

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def test_mesh_sizes_and_errors():
  cfg = sharding.mesh_config({"data": -1, "fsdp": 2, "tensor": 2})
  assert sharding.mesh_shape(cfg, 8) == {"slice": 1, "data": 2, "fsdp": 2, "tensor": 2}
  mesh = sharding.make_mesh(cfg)
  assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.shape == (1, 2, 2, 2)
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape(sharding.mesh_config({"data": -1, "tensor": 3}), 8)
  with pytest.raises(ValueError, match="has 4 devices but 8"):
    sharding.mesh_shape(sharding.mesh_config({"data": 2, "fsdp": 2}), 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_config({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="mesh.tensr"):
    sharding.mesh_config({"tensr": 2})
  with pytest.raises(ValueError, match=r"mesh.rules\[0\].*unknown mesh axis 'model'"):
    sharding.mesh_config({"rules": [("heads", "model")]})
  multi = sharding.make_mesh(sharding.mesh_config({"slice": 2, "data": -1}))
  assert dict(multi.shape) == {"slice": 2, "data": 4, "fsdp": 1, "tensor": 1}


def _specs(config, **mesh):
  cfg = sharding.mesh_config(mesh)
  m = sharding.make_mesh(cfg)
  tx = layout.make_optimizer(optim.optim_config({}), config, 10)
  lay = layout.state_layout(Flamingo(config), config, tx, m, cfg)
  return m, lay, traverse_util.flatten_dict(lay.param_specs, sep="/")


def test_megatron_and_fsdp_rules(tiny_config):
  _, _, specs = _specs(tiny_config, data=2, fsdp=2, tensor=2, fsdp_min_size=1 << 30)
  assert specs["lm/blocks_0/attn/query/kernel"] == P("fsdp", "tensor", None)
  assert specs["lm/blocks_0/attn/out/kernel"] == P("tensor", None, "fsdp")
  assert specs["lm/blocks_0/ffw/up/kernel"] == P("fsdp", "tensor")
  assert specs["lm/blocks_0/ffw/down/kernel"] == P("tensor", "fsdp")
  assert specs["lm/embedding"] == P("tensor", "fsdp")
  # embed took 'fsdp' first, so the visual side of the projection stays whole.
  assert specs["resampler/input_proj/kernel"] == P(None, "fsdp")
  assert specs["xattn_block_0/attn/key/kernel"] == P("fsdp", "tensor", None)
  assert specs["vision/patch_embed/kernel"] == P(None, None)  # NFNet-style: unsharded
  assert specs["xattn_block_0/attn_gate"] == P(None)


def test_indivisible_axes_are_dropped_and_fallback_shards_big_tensors(tiny_config):
  _, _, specs = _specs(tiny_config, data=1, fsdp=1, tensor=8, fsdp_min_size=1 << 30)
  assert specs["lm/blocks_0/attn/query/kernel"] == P(None, None, None)  # 4 heads, 8 devices
  assert specs["lm/embedding"] == P("tensor", None)  # 512 rows divide
  # FSDP fallback: the vision encoder has no sharded axis in the rules.
  _, _, specs = _specs(tiny_config, data=1, fsdp=8, tensor=1, fsdp_min_size=1000)
  assert specs["vision/block_0_up/kernel"] == P(None, "fsdp")  # [32, 128]: largest dim
  assert specs["vision/block_0_up/bias"] == P(None)  # 128 elements: under the threshold
  spec = sharding.add_axis((None, None), (6, 16), sharding.make_mesh(
      sharding.mesh_config({"fsdp": 8})), "fsdp")
  assert spec == (None, "fsdp")


def test_zero1_shards_moments_over_data_only(tiny_config):
  mesh, lay, specs = _specs(tiny_config, data=4, fsdp=2, zero1=True, fsdp_min_size=1 << 30)
  opt = jax.tree_util.tree_leaves_with_path(lay.state_sh["opt_state"])
  kernel = [s.spec for path, s in opt if jax.tree_util.keystr(path).endswith(
      "['xattn_block_0']['ffw']['up']['kernel']")]
  assert kernel == [P("fsdp", "data"), P("fsdp", "data")]  # mu and nu: [64, 256]
  assert lay.state_sh["params"]["xattn_block_0"]["ffw"]["up"]["kernel"].spec == P("fsdp", None)
  counts = [s.spec for path, s in opt if "count" in jax.tree_util.keystr(path)]
  assert counts and all(c == P() for c in counts)
  assert sharding.zero1_spec(P("fsdp", None), (8, 3), mesh) == P(("fsdp", "data"), None)


def test_bytes_per_device_follow_the_layout(tiny_config):
  _, one, _ = _specs(tiny_config, data=8)
  _, fsdp, _ = _specs(tiny_config, data=1, fsdp=8, fsdp_min_size=0)
  full = sharding.bytes_per_device(one.train_abs, one.state_sh["params"])
  assert full == sum(x.size * 4 for x in jax.tree.leaves(one.train_abs))
  assert sharding.bytes_per_device(fsdp.train_abs, fsdp.state_sh["params"]) < full / 4
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(one.frozen_abs))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(one.train_abs))
