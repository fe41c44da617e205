"""Scanned layers (model.scan_layers) compute exactly what the unrolled blocks do.

The same random weights, converted once by `layer_stack.to_scanned`, give equal
logits and gradients in both layouts for several LM families, cross-attention
every 1 and every 2 (paper and OpenFlamingo placements, a tail group), with
remat, for cached decoding too; the conversion round-trips and a converted
HF LM (unrolled, as every converter writes it) loads into both layouts.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.trainers.flamingo import components
from flamingo_jax.models.config import FlamingoConfig, ResamplerConfig, VisionConfig, XAttnConfig, lm_preset, model_config
from flamingo_jax.models import layer_stack
from flamingo_jax.models.config import xattn_layer_indices
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.models.lm import DecoderLM
from flamingo_jax.models.xattn import tanh_gates

V, IMG, EOC = 64, 61, 62
SIZES = dict(vocab_size=V, num_layers=5, width=32, num_heads=4, head_dim=8, ffw_dim=48)
LMS = {
    "chinchilla": lm_preset("chinchilla", **SIZES),
    "llama": lm_preset("llama", **SIZES, num_kv_heads=2, sliding_window=5),
    "gpt2": lm_preset("gpt2", **SIZES, max_length=32),
    "mpt": lm_preset("mpt", **SIZES, qk_norm=True),
}


def config_of(lm, every=1, placement="paper", scan=False, remat="none"):
  return model_config(FlamingoConfig(
      vision=VisionConfig(name="none"), vision_feature_dim=16,
      resampler=ResamplerConfig(depth=1, width=16, num_heads=2, head_dim=8, num_latents=3,
                                max_frames=1),
      xattn=XAttnConfig(every=every, placement=placement, num_heads=4, head_dim=8,
                        gate_init="normal", gate_init_std=1.0),
      lm=LMS[lm], image_token_id=IMG, eoc_token_id=EOC, scan_layers=scan, remat=remat))


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 60, (2, 12))
  tokens[:, [2, 7]] = IMG
  mask = np.ones((2, 12), np.int32)
  mask[1, :3] = 0  # left padding
  feats = rng.normal(size=(2, 2, 1, 4, 16)).astype(np.float32)
  return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(feats)


def init(config, tokens, feats):
  return Flamingo(config).init(jax.random.key(0), tokens, visual_features=feats)["params"]


@pytest.mark.parametrize("lm,every,placement,remat", [
    ("chinchilla", 1, "paper", "none"), ("llama", 2, "paper", "block"),
    pytest.param("gpt2", 2, "openflamingo", "dots", marks=pytest.mark.slow),
    pytest.param("mpt", 3, "paper", "none", marks=pytest.mark.slow)])  # 3: a tail group
def test_scanned_equals_unrolled_logits_and_gradients(lm, every, placement, remat):
  tokens, mask, feats = inputs()
  unrolled = config_of(lm, every, placement, remat=remat)
  scanned = dataclasses.replace(unrolled, scan_layers=True)
  params = jax.tree.map(jnp.asarray, nn.unbox(init(unrolled, tokens, feats)))
  stacked = layer_stack.to_layout(params, scanned)
  assert "xattn_blocks" in stacked and "blocks" in stacked["lm"]
  assert not any(k.startswith("xattn_block_") for k in stacked)
  # the scanned model's own init has the same tree structure and shapes
  own = jax.eval_shape(lambda: nn.unbox(init(scanned, tokens, feats)))
  assert jax.tree.structure(own) == jax.tree.structure(stacked)
  assert jax.tree.map(lambda a: a.shape, own) == jax.tree.map(lambda a: a.shape, stacked)

  def loss(p, config):
    logits, _ = Flamingo(config).apply({"params": p}, tokens, visual_features=feats,
                                       attention_mask=mask)
    return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0) ** 2) * 1e-3, logits

  (l_u, logits_u), g_u = jax.value_and_grad(loss, has_aux=True)(params, unrolled)
  (l_s, logits_s), g_s = jax.value_and_grad(loss, has_aux=True)(stacked, scanned)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(logits_s)[real], np.asarray(logits_u)[real],
                             rtol=1e-5, atol=1e-5)
  g_s = layer_stack.to_unrolled(g_s, xattn_layer_indices(5, every, placement))
  assert jax.tree.structure(g_s) == jax.tree.structure(g_u)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_s), jax.tree.leaves(g_u)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(g_u["xattn_block_0" if placement == "paper" else
                           f"xattn_block_{xattn_layer_indices(5, every, placement)[0]}"]
                       ["attn_gate"]).sum()) > 0
  # gates read the same from both layouts
  idx = xattn_layer_indices(5, every, placement)
  gates_u, gates_s = tanh_gates(params), tanh_gates(stacked, idx)
  assert list(gates_u) == list(gates_s)
  np.testing.assert_allclose([gates_s[k] for k in gates_u], [gates_u[k] for k in gates_u])


def test_plan_covers_every_block_once():
  for layers, every, placement in [(24, 1, "paper"), (40, 4, "paper"), (80, 7, "paper"),
                                   (24, 4, "openflamingo"), (10, 3, "middle"), (5, 2, "paper")]:
    idx = xattn_layer_indices(layers, every, placement)
    seen, xseen = [], []
    for step in layer_stack.plan(layers, idx):
      if step[0] == "lm":
        seen += list(range(step[1], step[2]))
      elif step[0] == "xattn":
        assert idx[step[1]] == len(seen)
        xseen.append(step[1])
      else:
        _, k0, count, start, n = step
        for g in range(count):
          assert idx[k0 + g] == len(seen) == start + g * n
          xseen.append(k0 + g)
          seen += list(range(start + g * n, start + (g + 1) * n))
    assert seen == list(range(layers)) and xseen == list(range(len(idx)))
  # 80B: one prefix-free group scan and a tail (xattn 11 + LM 77..79)
  assert layer_stack.plan(80, xattn_layer_indices(80, 7, "paper")) == [
      ("groups", 0, 11, 0, 7), ("xattn", 11), ("lm", 77, 80)]


def test_cached_decoding_scanned_equals_unrolled():
  tokens, mask, feats = inputs(1)
  unrolled = config_of("llama", 2)
  scanned = dataclasses.replace(unrolled, scan_layers=True)
  params = nn.unbox(init(unrolled, tokens, feats))
  stacked = layer_stack.to_layout(params, scanned)
  out = []
  for config, p in [(unrolled, params), (scanned, stacked)]:
    model = Flamingo(config)
    logits, cache = model.apply({"params": p}, tokens, visual_features=feats,
                                attention_mask=mask, cache_length=16, method=model.prefill)
    step, _ = model.apply({"params": p}, jnp.full((2, 1), 5), cache, method=model.extend)
    out.append((logits, step))
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(out[1][0])[real], np.asarray(out[0][0])[real],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-5, atol=1e-5)


def test_layout_round_trip_and_bare_lm():
  tokens, _, feats = inputs()
  config = config_of("gpt2", 2)
  params = nn.unbox(init(config, tokens, feats))
  idx = xattn_layer_indices(5, 2, "paper")
  back = layer_stack.to_unrolled(layer_stack.to_scanned(params, idx), idx)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # converting to the layout a tree already has changes nothing
  same = layer_stack.to_layout(params, config)
  jax.tree.map(np.testing.assert_array_equal, same, params)
  # a bare DecoderLM scans too
  lm = LMS["chinchilla"]
  p = DecoderLM(lm).init(jax.random.key(1), tokens)["params"]
  p = nn.unbox(p)
  a = DecoderLM(lm).apply({"params": p}, tokens)
  b = DecoderLM(lm, scan=True).apply({"params": layer_stack.lm_to_scanned(p)}, tokens)
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="placement"):
    layer_stack.to_scanned(params, [0, 1])


def test_converted_hf_lm_loads_into_both_layouts(tmp_path):
  """`convert hf-lm` writes the unrolled layout; restoring it for a scanned model
  converts once (checkpoint.restore_params) and gives transformers' logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from flamingo_jax.convert.__main__ import main as convert_main
  from flamingo_jax.convert.hf_lm import lm_config_from_hf
  from flamingo_jax.training import checkpoint as ckpt_lib
  torch.manual_seed(0)
  ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
  ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
  out = tmp_path / "lm"
  assert convert_main(["hf-lm", "--input", str(tmp_path / "hf"), "--out", str(out)]) == 0
  lm = lm_config_from_hf(ref.config.to_dict())
  tokens = np.random.default_rng(0).integers(0, V, (2, 9))
  with torch.no_grad():
    want = ref(torch.tensor(tokens)).logits.numpy()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for scan in (False, True):
    model = DecoderLM(lm, scan=scan)
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens)["params"]))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          shapes)
    params = components.restore_component(str(out / "params"), "lm", target)
    assert ("blocks" in params) == scan and ("blocks_0" in params) == (not scan)
    got = model.apply({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
