"""NFNet: parameter counts vs timm, numerics vs timm fixtures, conversion and CLI.

The fixtures (tests/fixtures/nfnet_*.npz) hold timm's outputs for weights that
tests/fixtures/make_nfnet_fixture.py regenerates from a seed in numpy; see
docs/nfnet.md for how to rebuild them. Forward passes share jitted functions
(one compile per config and input shape) to keep the file fast on a CPU.
"""
import collections
import dataclasses
import functools
import importlib.util
import os
import pickle
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models.config import NFNetConfig, VisionConfig
from flamingo_jax.convert import nfnet as convert
from flamingo_jax.models import nfnet

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# timm 1.0.31, sum(p.numel() for p in timm.create_model(f"dm_nfnet_f{k}").parameters())
# (1000-class head). F7 is not in timm (ours: 499,504,088, docs/nfnet.md).
TIMM_COUNTS = {"F0": 71_489_284, "F1": 132_634_256, "F2": 193_779_228, "F3": 254_924_200,
               "F4": 316_069_172, "F5": 377_214_144, "F6": 438_359_116}
TOL = 1e-4  # max |ours - timm| / max |timm|


def _load_fixture_module():
  spec = importlib.util.spec_from_file_location(
      "make_nfnet_fixture", os.path.join(FIXTURES, "make_nfnet_fixture.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


fx = _load_fixture_module()


@functools.lru_cache(maxsize=1)  # F0's weights are 286 MB: keep one fixture
def fixture(kind):
  """(npz, regenerated timm state dict, our config, our params)."""
  data = dict(np.load(os.path.join(FIXTURES, f"nfnet_{kind}.npz")))
  names = [str(n) for n in data["names"]]
  state = fx.regenerate_state_dict(int(data["seed"]), names, fx.decode_shapes(data["shapes"]))
  sums = np.array([np.abs(state[n]).sum(dtype=np.float64) for n in names])
  np.testing.assert_allclose(sums, data["param_abs_sums"], rtol=1e-12,
                             err_msg="numpy no longer regenerates the fixture's weights")
  config = convert.timm_config(state)
  return data, state, config, convert.convert(state, config, "timm")


@functools.lru_cache(maxsize=None)
def apply_fn(config, train=False, dtype=jnp.float32):
  """Jitted (params, images [B, H, W, 3], rngs) -> (features, pooled, logits).

  Cached so that tests with the same config and input shape share one compile.
  """
  model = nfnet.NFNet(config, dtype=dtype)
  return jax.jit(lambda params, x, rngs=None: model.apply(
      {"params": params}, x, train=train, rngs=rngs))


def rbg_key(seed):
  """A key whose random bits compile fast on a CPU (only tests pick the impl)."""
  return jax.random.key(seed, impl="rbg")


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def tiny_images(size="64x64"):
  data = fixture("tiny")[0]
  return fx.normalize(data[f"images_{size}"])


def tiny_nfnet_config(**kw):
  return dataclasses.replace(fixture("tiny")[2], **kw)


def micro_config(**kw):
  """The smallest NFNet with every kind of block (for init / gradients)."""
  return NFNetConfig(depths=(1, 1, 1, 1), widths=(16, 16, 32, 32), stem_widths=(4, 4, 8, 8),
                     group_width=8, num_classes=3, **kw)


# --------------------------------------------------------------------------
# Architecture


@pytest.mark.parametrize("variant", list(TIMM_COUNTS))
def test_param_count_matches_timm(variant):
  assert nfnet.count_params(NFNetConfig(variant=variant, num_classes=1000)) == \
      TIMM_COUNTS[variant]


def test_param_count_without_head_or_final_conv():
  # Flamingo's encoder is F6 without the classifier: 435,286,116 (paper: 435M).
  head = 3072 * 1000 + 1000
  assert TIMM_COUNTS["F6"] - head == 435_286_116
  final_conv = 1536 * 3072 + 2 * 3072  # kernel, gain, bias
  assert nfnet.count_params(NFNetConfig(variant="F0", final_conv=False)) == \
      TIMM_COUNTS["F0"] - head - final_conv


def test_block_specs_follow_deepmind_schedule():
  specs = nfnet.block_specs(NFNetConfig(variant="F0"))
  assert [s.stage for s in specs] == [0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3]
  assert [s.stride for s in specs] == [1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]
  assert [s.projection for s in specs] == [True, True, False, True] + [False] * 5 + \
      [True, False, False]
  assert [(s.in_ch, s.out_ch, s.mid_ch, s.groups) for s in specs[:2]] == \
      [(128, 256, 128, 1), (256, 512, 256, 2)]
  assert specs[-1].mid_ch == 768 and specs[-1].groups == 6
  # Expected variance grows by alpha^2 per block and restarts at 1 + alpha^2 after
  # the first block of each stage (whose shortcut conv re-normalises).
  a2 = 0.2 ** 2
  expected_var = [1, 1 + a2, 1 + a2, 1 + 2 * a2, 1 + a2, 1 + 2 * a2, 1 + 3 * a2, 1 + 4 * a2,
                  1 + 5 * a2, 1 + 6 * a2, 1 + a2, 1 + 2 * a2]
  np.testing.assert_allclose([s.beta for s in specs], 1 / np.sqrt(expected_var), rtol=1e-12)
  np.testing.assert_allclose([s.stochastic_depth_rate for s in specs],
                             [0.25 * i / 12 for i in range(12)], rtol=1e-12)


def test_logical_axes_on_every_parameter():
  shapes = jax.eval_shape(nfnet.NFNet(micro_config()).init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  flat = convert.flatten(shapes)
  assert all(isinstance(v, nn.LogicallyPartitioned) for v in flat.values())
  names = {path: v.names for path, v in flat.items()}
  for path, axes in names.items():
    assert len(axes) == flat[path].value.ndim, path
  assert names["block_1/conv1/kernel"] == ("conv_height", "conv_width", "conv_in", "conv_out")
  assert names["block_1/conv1/gain"] == ("conv_out",)
  assert names["block_1/se/fc0/kernel"] == ("conv_in", "conv_out")
  assert names["block_1/skip_gain"] == ()
  assert names["classifier/kernel"] == ("embed", "vocab")
  spec = nn.get_partition_spec(shapes)
  assert spec["stem_conv0"]["kernel"] == jax.sharding.PartitionSpec(
      "conv_height", "conv_width", "conv_in", "conv_out")


def test_init_values():
  """SkipInit gain 0, WS gains 1, biases 0; classifier N(0, 0.01)."""
  config = micro_config()
  spec = nfnet.block_specs(config)[1]  # strided, with a shortcut conv
  block, head = nfnet.NFBlock(config, spec), nfnet._Classifier(1000)
  init = jax.jit(lambda key: (block.init(key, jnp.zeros((1, 8, 8, spec.in_ch))),
                              head.init(key, jnp.zeros((1, 256)))))
  block_vars, head_vars = nn.meta.unbox(init(rbg_key(0)))
  params = block_vars["params"]
  flat = convert.flatten(params)
  assert set(flat) >= {"conv0/gain", "conv_shortcut/bias", "se/fc1/bias", "skip_gain"}
  for path, value in flat.items():
    leaf = path.rsplit("/", 1)[-1]
    assert value.dtype == jnp.float32, path
    if leaf in ("skip_gain", "bias"):
      assert np.all(np.asarray(value) == 0), path
    elif leaf == "gain":
      assert np.all(np.asarray(value) == 1), path
    else:
      assert float(np.std(value)) > 0, path
  assert abs(float(np.std(head_vars["params"]["kernel"])) - 0.01) < 0.0005
  assert np.all(head_vars["params"]["bias"] == 0)


def test_shapes_and_feature_dim():
  config = tiny_nfnet_config()
  x = jnp.zeros((2, 72, 56, 3))
  feats, pooled, logits = jax.eval_shape(
      lambda p: nfnet.NFNet(config).apply({"params": p}, x), fixture("tiny")[3])
  assert feats.shape == (2, 3, 2, 96) and pooled.shape == (2, 96) and logits.shape == (2, 10)
  assert nfnet.nfnet_feature_dim(config) == 96
  assert nfnet.nfnet_feature_dim(NFNetConfig()) == 3072
  assert nfnet.nfnet_feature_dim(NFNetConfig(final_conv=False)) == 1536
  headless = tiny_nfnet_config(final_conv=False, num_classes=0)
  shapes = jax.eval_shape(nfnet.NFNet(headless).init, jax.random.key(0), x)
  out = jax.eval_shape(lambda v: nfnet.NFNet(headless).apply(v, x), shapes)
  assert out[0].shape == (2, 3, 2, 48) and out[2] is None
  assert "final_conv" not in shapes["params"] and "classifier" not in shapes["params"]


def test_registered_vision_encoder():
  from flamingo_jax.models import vision, vision_registry
  assert vision_registry.REGISTRY["nfnet"] is nfnet.make_nfnet
  vc = VisionConfig(name="nfnet", nfnet=tiny_nfnet_config())
  encoder = vision.build_vision_encoder(vc)
  assert isinstance(encoder, nfnet.NFNetEncoder)
  feats = jax.eval_shape(lambda p: encoder.apply({"params": p}, jnp.zeros((2, 64, 64, 3))),
                         fixture("tiny")[3])
  assert feats.shape == (2, 2, 2, 96)
  assert vision.vision_feature_dim(vc) == 96


@pytest.mark.parametrize("field,value,match", [
    ("variant", "F9", "variant"),
    ("depths", (1, 2, 3), "depths"),
    ("widths", (16, 32, 48), "widths"),
    ("activation", "squared_relu", "activation"),
    ("se_activation", "tanh", "se_activation"),
    ("ws_style", "torch", "ws_style"),
    ("group_width", 64, "group_width"),
    ("stochastic_depth_rate", 1.0, "stochastic_depth_rate"),
    ("dropout_rate", -0.1, "dropout_rate"),
])
def test_bad_config_is_a_value_error(field, value, match):
  config = dataclasses.replace(tiny_nfnet_config(), **{field: value})
  with pytest.raises(ValueError, match=f"model.vision.nfnet.{match}"):
    nfnet.validate_nfnet_config(config)
  with pytest.raises(ValueError, match=match):
    nfnet.make_nfnet(VisionConfig(nfnet=config))


def test_bad_images_are_a_value_error():
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    jax.eval_shape(nfnet.NFNet(micro_config()).init, jax.random.key(0), jnp.zeros((32, 32, 3)))


def test_weight_standardisation_formulas():
  # One output unit, fan_in 2. w = (1, 3): mean 2, var 1.
  w = jnp.array([1.0, 3.0]).reshape(1, 1, 2, 1)
  gain = jnp.array([2.0])
  dm = nfnet.standardize_weight(w, gain, "deepmind").ravel()
  np.testing.assert_allclose(dm, [-2 / np.sqrt(2), 2 / np.sqrt(2)], rtol=1e-6)
  tm = nfnet.standardize_weight(w, gain, "timm").ravel()
  np.testing.assert_allclose(tm, np.array([-2, 2]) / np.sqrt(2 * (1 + 1e-5)), rtol=1e-6)
  # Tiny variance: w = (0, 1e-3), var 2.5e-7, var * fan_in = 5e-7 < 1e-4.
  w = jnp.array([0.0, 1e-3]).reshape(1, 1, 2, 1)
  one = jnp.ones((1,))
  np.testing.assert_allclose(nfnet.standardize_weight(w, one, "deepmind").ravel(),
                             np.array([-5e-4, 5e-4]) / np.sqrt(1e-4), rtol=1e-5)
  np.testing.assert_allclose(nfnet.standardize_weight(w, one, "timm").ravel(),
                             np.array([-5e-4, 5e-4]) / np.sqrt(2 * (2.5e-7 + 1e-5)), rtol=1e-5)
  with pytest.raises(ValueError, match="standardisation style"):
    nfnet.standardize_weight(w, one, "torch")


# --------------------------------------------------------------------------
# Numerics against timm


@pytest.mark.parametrize("size", ["64x64", "72x56"])
def test_timm_parity_tiny(size):
  data, _, config, params = fixture("tiny")
  feats, pooled, logits = apply_fn(config)(params, tiny_images(size))
  assert rel_err(feats, data[f"features_{size}"]) < TOL
  assert rel_err(pooled, data[f"pooled_{size}"]) < TOL
  assert rel_err(logits, data[f"logits_{size}"]) < TOL


@pytest.mark.slow
def test_timm_parity_f0():
  data, _, config, params = fixture("f0")
  assert config.variant == "F0" and config.depths is None and config.num_classes == 1000
  stride = int(data["feature_stride"])
  for size in ("192x192", "256x256"):
    feats, pooled, logits = apply_fn(config)(params, fx.normalize(data[f"images_{size}"]))
    assert rel_err(np.asarray(feats)[..., ::stride], data[f"features_{size}"]) < TOL, size
    assert rel_err(pooled, data[f"pooled_{size}"]) < TOL, size
    assert rel_err(logits, data[f"logits_{size}"]) < TOL, size


def test_skipinit_zero_gain_blocks_are_identity_on_the_branch():
  """With skip_gain = 0 a block's residual branch cannot affect the output."""
  _, _, config, params = fixture("tiny")
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, v: np.zeros_like(v) if path[-1].key == "skip_gain" else v, params)
  perturbed = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 3.0 + 1.0 if path[0].key.startswith("block_") and
      path[1].key in ("conv0", "conv1", "conv2", "se") else v, zeroed)
  x = tiny_images()
  a = apply_fn(config)(zeroed, x)[0]
  b = apply_fn(config)(perturbed, x)[0]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert rel_err(a, apply_fn(config)(params, x)[0]) > 1e-2


def test_stochastic_depth_and_dropout_need_train_and_an_rng():
  data, _, base, params = fixture("tiny")
  x = tiny_images()
  evaluated = apply_fn(base)(params, x)  # rates do not matter in eval
  config = dataclasses.replace(base, stochastic_depth_rate=0.9, dropout_rate=0.5)
  rngs = {"dropout": rbg_key(1)}
  feats, _, logits = apply_fn(config, train=True)(params, x, rngs)
  np.testing.assert_array_equal(feats, apply_fn(config, train=True)(params, x, rngs)[0])
  assert rel_err(feats, evaluated[0]) > 1e-3
  assert rel_err(logits, evaluated[2]) > 1e-3
  # train=True without a 'dropout' rng is deterministic: it equals eval.
  spec = dataclasses.replace(nfnet.block_specs(config)[2], stochastic_depth_rate=0.5)
  block = nfnet.NFBlock(config, spec)
  h = np.random.default_rng(0).standard_normal((4, 4, 4, spec.in_ch)).astype(np.float32)
  variables = {"params": params[f"block_{spec.index}"]}
  np.testing.assert_array_equal(block.apply(variables, h, True), block.apply(variables, h))


@pytest.mark.parametrize("rescale", [False, True])
def test_stochastic_depth_drops_whole_branches(rescale):
  """Per example: dropped -> the shortcut x; kept -> x + alpha * branch (/ keep_prob)."""
  _, _, base, params = fixture("tiny")
  config = dataclasses.replace(base, stochastic_depth_rescale=rescale)
  spec = nfnet.block_specs(config)[2]  # identity shortcut
  assert not spec.projection
  spec = dataclasses.replace(spec, stochastic_depth_rate=0.5)
  block = nfnet.NFBlock(config, spec)
  h = np.random.default_rng(0).standard_normal((64, 4, 4, spec.in_ch)).astype(np.float32)
  variables = {"params": params[f"block_{spec.index}"]}
  full = np.asarray(block.apply(variables, h))
  dropped = np.asarray(block.apply(variables, h, True, rngs={"dropout": rbg_key(3)}))
  branch = (full - h) / (0.5 if rescale else 1.0)
  kept = np.isclose(dropped, h + branch, rtol=1e-5, atol=1e-5).all(axis=(1, 2, 3))
  gone = np.isclose(dropped, h, rtol=1e-6, atol=1e-6).all(axis=(1, 2, 3))
  assert np.all(kept ^ gone), (kept, gone)
  assert 16 <= gone.sum() <= 48, gone.sum()


def test_bfloat16_compute_keeps_float32_params():
  _, _, config, params = fixture("tiny")
  x = tiny_images()
  out = jax.eval_shape(apply_fn(config, dtype=jnp.bfloat16), params, x)
  assert [o.dtype for o in out] == [jnp.bfloat16] * 3
  shapes = jax.eval_shape(nfnet.NFNet(micro_config(), dtype=jnp.bfloat16).init,
                          jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert {v.dtype for v in jax.tree.leaves(nn.meta.unbox(shapes))} == {jnp.dtype("float32")}
  # Numerics of one strided block (float32 params, bfloat16 activations).
  spec = nfnet.block_specs(config)[1]
  variables = {"params": params[f"block_{spec.index}"]}
  h = np.random.default_rng(0).standard_normal((2, 8, 8, spec.in_ch)).astype(np.float32)
  ref = jax.jit(nfnet.NFBlock(config, spec).apply)(variables, h)
  low = jax.jit(nfnet.NFBlock(config, spec, dtype=jnp.bfloat16).apply)(variables, h)
  assert low.dtype == jnp.bfloat16
  assert rel_err(low, ref) < 0.05


def test_remat_gives_the_same_gradients():
  _, _, config, params = fixture("tiny")
  remat_config = dataclasses.replace(config, remat=True)
  x = tiny_images()
  jaxpr = str(jax.make_jaxpr(lambda p: nfnet.NFNet(remat_config).apply({"params": p}, x))(
      params))
  assert jaxpr.count("checkpoint") + jaxpr.count("remat") >= len(nfnet.block_specs(config))
  # One block, rematerialised or not: same loss and gradients.
  spec = nfnet.block_specs(config)[1]
  h = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, spec.in_ch)), jnp.float32)

  def grads(block_cls):
    def loss(p):
      return jnp.sum(block_cls(config, spec).apply({"params": p}, h, False) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params[f"block_{spec.index}"])

  (l1, g1) = grads(nfnet.NFBlock)
  (l2, g2) = grads(nn.remat(nfnet.NFBlock, static_argnums=(2,)))
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------
# Conversion


def _haiku_flat(params, config):
  """Our params in DeepMind's Haiku layout (every Haiku layout is ours unchanged)."""
  flat = convert.flatten(params)
  return {src: flat[ours] for ours, (src, _) in convert.haiku_key_map(config).items()}


def test_haiku_checkpoints_convert_like_timm(tmp_path):
  _, state, config, params = fixture("tiny")
  haiku = _haiku_flat(params, config)
  assert "NFNet/~/nf_block/~/squeeze_excite/~/linear_1/w" in haiku
  assert "NFNet/~/nf_block_4/skip_gain" in haiku and "NFNet/~/linear/b" in haiku
  npz = tmp_path / "flat.npz"
  np.savez(npz, **haiku)
  nested = {}
  for key, value in haiku.items():
    module, name = key.rsplit("/", 1)
    nested.setdefault(module, {})[name] = value
  pkl = tmp_path / "F0_haiku.npz"  # DeepMind's files are pickles despite the name
  pkl.write_bytes(pickle.dumps(nested))
  for path in (npz, pkl):
    loaded = convert.load_haiku_checkpoint(str(path))
    hk_config = convert.haiku_config(loaded)
    assert (hk_config.activation, hk_config.ws_style) == ("gelu_tanh", "deepmind")
    assert dataclasses.replace(hk_config, activation="gelu", ws_style="timm") == config
    converted = convert.convert(loaded, hk_config, "haiku")
    jax.tree.map(np.testing.assert_array_equal, converted, params)


def test_haiku_pickle_with_code_is_refused(tmp_path):
  path = tmp_path / "evil.npz"
  path.write_bytes(pickle.dumps({"NFNet/~/linear": {"w": collections.Counter()}}))
  with pytest.raises(ValueError, match="not plain dicts of numpy arrays"):
    convert.load_haiku_checkpoint(str(path))


def test_converter_errors_name_the_tensor():
  _, state, config, _ = fixture("tiny")
  missing = {k: v for k, v in state.items() if k != "stages.1.0.conv2b.gain"}
  with pytest.raises(ValueError, match=r"missing timm tensor 'stages.1.0.conv2b.gain' for "
                                       r"parameter 'block_1/conv1b/gain'"):
    convert.convert(missing, config, "timm")
  extra = dict(state, **{"stages.3.1.conv1.weight": np.zeros((24, 48, 1, 1), np.float32)})
  with pytest.raises(ValueError, match="unexpected timm tensors.*'stages.3.1.conv1.weight'"):
    convert.convert(extra, config, "timm")
  bad = dict(state, **{"stem.conv2.weight": np.zeros((8, 4, 5, 5), np.float32)})
  with pytest.raises(ValueError, match=r"'stem.conv2.weight' for parameter 'stem_conv1/kernel' "
                                       r"has shape \(8, 4, 5, 5\), expected \(8, 4, 3, 3\)"):
    convert.convert(bad, config, "timm")
  with pytest.raises(ValueError, match="unexpected timm tensors.*head.fc"):
    convert.convert(state, dataclasses.replace(config, num_classes=0), "timm")
  headless = convert.convert(state, dataclasses.replace(config, num_classes=0), "timm",
                             drop_head=True)
  assert "classifier" not in headless
  with pytest.raises(ValueError, match="--variant F1 has depths"):
    convert.timm_config(state, "F1")
  with pytest.raises(ValueError, match="does not exist"):
    convert.load_timm_state_dict("/nonexistent/model.safetensors")


def test_cli_converts_a_safetensors_file(tmp_path, capsys):
  from safetensors.numpy import save_file

  from flamingo_jax.convert.__main__ import main
  data, state, config, _ = fixture("tiny")
  src = tmp_path / "tiny.safetensors"
  save_file(state, str(src))
  out = tmp_path / "ckpt"
  argv = ["nfnet", "--source", "timm", "--input", str(src), "--out", str(out)]
  assert main(argv) == 0
  assert "use model.vision.nfnet" in capsys.readouterr().out
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(str(out))
  params, loaded_config = convert.load_converted(str(out))
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  logits = apply_fn(loaded_config)(restored, tiny_images())[2]
  assert rel_err(logits, data["logits_64x64"]) < TOL
  # An existing output is refused without --force; bad input is one error line.
  assert main(argv) == 2
  assert "exists; pass --force" in capsys.readouterr().err
  assert main(argv + ["--force", "--no-head"]) == 0
  assert "classifier" not in ocp.StandardCheckpointer().restore(str(out))
  assert main(["nfnet", "--source", "haiku", "--input", str(src), "--out",
               str(tmp_path / "x")]) == 2
  assert "error:" in capsys.readouterr().err


def test_module_entry_point_lists_subcommands():
  result = subprocess.run([sys.executable, "-m", "flamingo_jax.convert", "nfnet", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "--source" in result.stdout and "haiku" in result.stdout
