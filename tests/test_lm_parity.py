"""Our DecoderLM reproduces transformers' logits (float32) on small random models
of each supported family, loaded from a local directory written by save_pretrained;
ALiBi and partial rotary give the same logits with the KV cache as without."""
import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flamingo_jax.config import from_config_dict
from flamingo_jax.models.config import FlamingoConfig, LMConfig, ResamplerConfig, VisionConfig, XAttnConfig, lm_preset, model_config
from flamingo_jax.convert.hf_lm import (convert_state_dict, load_hf_lm,  # noqa: E402
                                        lm_config_from_hf, load_safetensors_dir)
from flamingo_jax.models.flamingo import Flamingo  # noqa: E402
from flamingo_jax.models.lm import DecoderLM, alibi_slopes  # noqa: E402
from lm_ref import randomise  # noqa: E402
from random_weights import random_params  # noqa: E402

VOCAB = 97
# kind -> transformers config kwargs. initializer_range 0.1 (not 0.02) makes
# the logits O(1), so a 1e-4 tolerance is a real check.
NEOX = {
    # Pythia: a quarter of each head rotated, parallel residual, exact GELU.
    "gpt_neox_pythia": dict(rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu"),
    # RedPajama-INCITE: whole-head rotary; sequential residual and tanh GELU
    # here to cover both branches.
    "gpt_neox_full_rotary": dict(rotary_pct=1.0, use_parallel_residual=False,
                                 hidden_act="gelu_new", rotary_emb_base=500.0),
}
MPT = {
    "mpt": dict(d_model=64, n_heads=4),
    # 6 heads: the non-power-of-2 slope interleave; an explicit softmax scale.
    "mpt_6_heads": dict(d_model=48, n_heads=6, attn_config={"softmax_scale": 0.3}),
}
KINDS = ["gpt2", "llama", *NEOX, *MPT]


def build(kind):
  torch.manual_seed(0)
  if kind == "gpt2":
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                  n_head=4)
    return transformers.GPT2LMHeadModel(cfg)
  if kind == "llama":
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)
  if kind in NEOX:
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=3, num_attention_heads=4,
                                     max_position_embeddings=64, initializer_range=0.1,
                                     **NEOX[kind])
    return transformers.GPTNeoXForCausalLM(cfg)
  if kind in MPT:
    cfg = transformers.MptConfig(vocab_size=VOCAB, n_layers=2, max_seq_len=64,
                                 initializer_range=0.1, **MPT[kind])
    return transformers.MptForCausalLM(cfg)
  raise ValueError(kind)


def inputs():
  """tokens [2, 16], mask with left padding in row 1, positions counting real tokens."""
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 16))
  mask = np.ones_like(tokens)
  mask[1, :5] = 0
  return tokens, mask, np.maximum(np.cumsum(mask, -1) - 1, 0)


def reference_logits(ref):
  tokens, mask, positions = inputs()
  kw = {} if isinstance(ref, transformers.MptForCausalLM) else {
      "position_ids": torch.from_numpy(positions)}
  with torch.no_grad():
    return ref(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
               **kw).logits.numpy()


def max_diff(config, params, want):
  """Max |ours - transformers'| over real tokens (padded positions are don't-care)."""
  tokens, mask, _ = inputs()
  got = np.asarray(jax.jit(DecoderLM(config).apply)({"params": params}, tokens, mask))
  keep = mask.astype(bool)
  return float(np.abs(got[keep] - want[keep]).max())


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, tmp_path):
  ref = randomise(build(kind))
  ref.save_pretrained(tmp_path, safe_serialization=True)
  want = reference_logits(ref)
  assert want.std() > 0.05, "logits too flat for the tolerance to mean anything"
  config, params = load_hf_lm(str(tmp_path))
  assert kind.startswith(config.family)
  assert max_diff(config, params, want) < 1e-4


def test_gpt_neox_partial_rotary_and_mpt_alibi_matter(tmp_path):
  """Full-head rotary or other ALiBi slopes miss by far more than the tolerance."""
  for kind, change in [("gpt_neox_pythia", dict(rotary_dim=0)),
                       ("mpt_6_heads", dict(alibi_bias_max=4.0))]:
    ref = randomise(build(kind))
    ref.save_pretrained(tmp_path / kind, safe_serialization=True)
    config, params = load_hf_lm(str(tmp_path / kind))
    wrong = dataclasses.replace(config, **change)
    assert max_diff(wrong, params, reference_logits(ref)) > 1e-2


def test_alibi_slopes_mirror_transformers():
  from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor
  for heads in (1, 3, 4, 6, 12, 16, 24, 32):
    for bias_max in (8, 4):
      bias = build_mpt_alibi_tensor(heads, 5, bias_max).numpy()  # [H, 1, 5]
      np.testing.assert_array_equal(bias[:, 0, -2], -alibi_slopes(heads, bias_max))


def test_gpt_neox_config_from_hub_style_keys():
  """Pythia's config.json on the Hub predates rope_parameters."""
  hf = {"model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 512,
        "num_attention_heads": 8, "num_hidden_layers": 6, "intermediate_size": 2048,
        "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "tie_word_embeddings": False}
  c = lm_config_from_hf(hf)
  assert (c.family, c.head_dim, c.rotary_dim, c.rotary_base) == ("gpt_neox", 64, 16, 10000.0)
  assert c.parallel_residual and not c.tie_embeddings and c.activation == "gelu"
  c = lm_config_from_hf({**hf, "rotary_pct": 1.0})  # RedPajama-INCITE
  assert c.rotary_dim == 0


def test_unsupported_options_are_named():
  with pytest.raises(ValueError, match="qk_ln"):
    lm_config_from_hf({"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2,
                       "vocab_size": VOCAB, "attn_config": {"qk_ln": True}})
  with pytest.raises(ValueError, match="hidden_act 'gelu_10'"):
    lm_config_from_hf({"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4,
                       "num_hidden_layers": 2, "vocab_size": VOCAB, "hidden_act": "gelu_10"})


@pytest.mark.parametrize("kind", ["gpt_neox_pythia", "mpt"])
def test_conversion_errors_name_the_tensor(kind, tmp_path):
  build(kind).save_pretrained(tmp_path, safe_serialization=True)
  config = lm_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
  sd = load_safetensors_dir(str(tmp_path))
  name, shape = {"gpt_neox_pythia": ("gpt_neox.layers.1.attention.query_key_value.weight",
                                     (192, 64)),
                 "mpt": ("transformer.blocks.1.attn.Wqkv.weight", (192, 64))}[kind]
  missing = {k: v for k, v in sd.items() if k != name}
  with pytest.raises(ValueError, match=re.escape(f"missing tensor '{name}' in the source "
                                                 f"checkpoint (expected shape {shape})")):
    convert_state_dict(missing, config)
  with pytest.raises(ValueError, match=re.escape(f"tensor '{name}' has shape (192, 32), "
                                                 f"expected {shape}")):
    convert_state_dict({**sd, name: sd[name][:, :32]}, config)
  with pytest.raises(ValueError, match=re.escape("not converted: ['extra.weight']")):
    convert_state_dict({**sd, "extra.weight": np.zeros(3, np.float32)}, config)


def test_bfloat16_safetensors_and_pytorch_bin(tmp_path):
  """Released LMs ship bfloat16 safetensors (which safetensors.numpy cannot read) or
  only pytorch_model*.bin (MPT-7B, RedPajama-INCITE)."""
  ref = build("mpt").to(torch.bfloat16)
  ref.save_pretrained(tmp_path / "bf16", safe_serialization=True)
  want = {k: v.float().numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
  got = load_safetensors_dir(str(tmp_path / "bf16"))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
    assert got[k].dtype == np.float32
  names = sorted(want)
  shards = {"pytorch_model-00001-of-00002.bin": names[:3],
            "pytorch_model-00002-of-00002.bin": names[3:]}
  (tmp_path / "bin").mkdir()
  for shard, keys in shards.items():
    torch.save({k: ref.state_dict()[k] for k in keys}, tmp_path / "bin" / shard)
  (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps(
      {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
  got = load_safetensors_dir(str(tmp_path / "bin"))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  with pytest.raises(ValueError, match="holds none of model.safetensors"):
    load_safetensors_dir(str(tmp_path))


def test_unsupported_family(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "bloom"}')
  with pytest.raises(ValueError, match="unsupported HF model_type 'bloom'"):
    load_hf_lm(str(tmp_path))


def test_hf_lm_cli(tmp_path):
  import orbax.checkpoint as ocp

  from flamingo_jax.convert.__main__ import main
  build("llama").save_pretrained(tmp_path / "hf", safe_serialization=True)
  assert main(["hf-lm", "--input", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 0
  lm = json.loads((tmp_path / "out" / "model_config.json").read_text())["lm"]
  assert lm["family"] == "llama" and lm["num_kv_heads"] == 2
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(str(tmp_path / "out" / "params"))
  assert params["blocks_1"]["attn"]["key"]["kernel"].shape == (32, 2, 8)
  assert main(["hf-lm", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("kind", ["gpt_neox_pythia", "mpt_6_heads"])
def test_hf_lm_cli_gpt_neox_mpt(kind, tmp_path):
  """save_pretrained (sharded: the index path) -> CLI -> orbax + config -> same logits."""
  import orbax.checkpoint as ocp

  from flamingo_jax.convert.__main__ import main
  ref = randomise(build(kind))
  ref.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="40KB")
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  assert main(["hf-lm", "--input", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 0
  lm = json.loads((tmp_path / "out" / "model_config.json").read_text())["lm"]
  config = from_config_dict(LMConfig, lm, "model.lm")
  assert kind.startswith(config.family)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(str(tmp_path / "out" / "params"))
  assert max_diff(config, params, reference_logits(ref)) < 1e-4


# --------------------------------------------------------------------------
# Cached decoding (Flamingo.prefill / extend) equals the full forward.

IMG, EOC = 61, 62
CACHE_LMS = {
    "gpt_neox": lm_preset("gpt_neox", vocab_size=64, num_layers=2, width=64, num_heads=4,
                          head_dim=16, rotary_dim=4, ffw_dim=96),
    "mpt": lm_preset("mpt", vocab_size=64, num_layers=2, width=48, num_heads=6, head_dim=8),
}


@functools.lru_cache(maxsize=None)
def _flamingo(lm_kind):
  config = model_config(FlamingoConfig(
      vision=VisionConfig(name="none"), vision_feature_dim=16,
      resampler=ResamplerConfig(depth=1, width=32, num_heads=2, head_dim=16, num_latents=4,
                                max_frames=1),
      xattn=XAttnConfig(every=2, num_heads=2, head_dim=16), lm=CACHE_LMS[lm_kind],
      image_token_id=IMG, eoc_token_id=EOC))
  return Flamingo(config)


@pytest.mark.parametrize("lm_kind", sorted(CACHE_LMS))
def test_cached_decoding_equals_full_forward(lm_kind):
  model = _flamingo(lm_kind)
  # Text only (images do not touch the LM's self-attention): a left-padded
  # prompt, then a continuation with a padded step in row 1 (a gap in the cache).
  tokens = jnp.array([[0, 0, 3, 4, 5, 6, 8, 7], [2, 1, 9, 10, 11, 13, 14, 12]])
  mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
  cont = jnp.array([[20, 29, 21, 22, 23], [24, 25, 26, 27, 28]])
  cont_mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]])
  params = random_params(model, tokens)
  full = jax.jit(lambda p, t, a: model.apply({"params": p}, t, attention_mask=a)[0])(
      params, jnp.concatenate([tokens, cont], 1), jnp.concatenate([mask, cont_mask], 1))
  full = np.asarray(full)
  prefill = jax.jit(functools.partial(model.apply, method="prefill"),
                    static_argnames="cache_length")
  extend = jax.jit(functools.partial(model.apply, method="extend"))
  logits, cache = prefill({"params": params}, tokens, attention_mask=mask, cache_length=16)
  real = np.asarray(mask, bool)
  diffs = [np.abs(np.asarray(logits)[real] - full[:, :8][real]).max()]
  for j in range(cont.shape[1]):
    logits, cache = extend({"params": params}, cont[:, j:j + 1], cache, cont_mask[:, j:j + 1])
    keep = np.asarray(cont_mask[:, j], bool)
    diffs.append(np.abs(np.asarray(logits)[keep, 0] - full[keep, 8 + j]).max())
  assert max(diffs) < 1e-5, diffs
