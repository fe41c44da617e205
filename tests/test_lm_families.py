"""Newer LM configurations against transformers (random tiny models, float32):
Llama 3.1's rope scaling far beyond its original context (both config keys),
Mistral's sliding window beyond the window (full forward, and cached decoding
past it), Qwen2 and Gemma; and MPT-1B-RedPajama's `mosaic_gpt` layout
against transformers' MPT (see docs/checkpoints.md for why that reference)."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flamingo_jax.models.config import FlamingoConfig, ResamplerConfig, VisionConfig, XAttnConfig, model_config
from flamingo_jax.convert.hf_lm import (convert_state_dict, lm_config_from_hf,  # noqa: E402
                                        load_hf_lm)
from flamingo_jax.models.flamingo import Flamingo  # noqa: E402
from flamingo_jax.models.lm import DecoderLM  # noqa: E402
from lm_ref import mosaic_gpt_config, mpt_reference, randomise  # noqa: E402

V = 97
TOL = 1e-4
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def build(kind):
  torch.manual_seed(0)
  if kind == "llama31":
    cfg = transformers.LlamaConfig(**SMALL, max_position_embeddings=2048, rope_theta=500000.0,
                                   rope_scaling=dict(LLAMA31_ROPE))
    return transformers.LlamaForCausalLM(cfg)
  if kind == "llama_linear":
    cfg = transformers.LlamaConfig(**SMALL, max_position_embeddings=256,
                                   rope_scaling={"rope_type": "linear", "factor": 4.0})
    return transformers.LlamaForCausalLM(cfg)
  if kind == "mistral":
    cfg = transformers.MistralConfig(**SMALL, max_position_embeddings=256, sliding_window=8)
    return transformers.MistralForCausalLM(cfg)
  if kind == "qwen2":
    cfg = transformers.Qwen2Config(**SMALL, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(cfg)
  if kind == "gemma":
    cfg = transformers.GemmaConfig(**{**SMALL, "hidden_size": 48}, head_dim=16,
                                   max_position_embeddings=256)
    return transformers.GemmaForCausalLM(cfg)
  raise ValueError(kind)


@functools.lru_cache(maxsize=None)
def saved(kind, tmp_root):
  ref = randomise(build(kind))
  path = f"{tmp_root}/{kind}"
  ref.save_pretrained(path, safe_serialization=True)
  return ref, path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf"))


def hf_logits(ref, tokens, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
    return ref(torch.from_numpy(np.array(tokens)), **kw).logits.numpy()


def our_logits(config, params, tokens, mask=None):
  return np.asarray(jax.jit(DecoderLM(config).apply)({"params": params}, tokens, mask))


def rows(length, batch=2, seed=0):
  return np.random.default_rng(seed).integers(0, V, (batch, length))


def test_llama31_rope_scaling_far_beyond_the_original_context(root):
  """1,024 tokens, 16x the original 64-token context: wrong frequencies would
  show (the ignored-scaling config misses by far more than the tolerance)."""
  ref, path = saved("llama31", root)
  hf = json.load(open(f"{path}/config.json"))
  assert hf["rope_parameters"]["rope_type"] == "llama3"  # what transformers 5 writes
  config, params = load_hf_lm(path)
  assert (config.rope_scaling, config.rope_scaling_factor,
          config.rope_original_max_length, config.rotary_base) == ("llama3", 8.0, 64, 5e5)
  tokens = rows(1024, batch=1)
  want = hf_logits(ref, tokens)
  assert np.abs(our_logits(config, params, tokens) - want).max() < TOL
  plain = dataclasses.replace(config, rope_scaling="none")
  assert np.abs(our_logits(plain, params, tokens) - want).max() > 1e-2


def test_linear_rope_scaling(root):
  ref, path = saved("llama_linear", root)
  config, params = load_hf_lm(path)
  assert (config.rope_scaling, config.rope_scaling_factor) == ("linear", 4.0)
  tokens = rows(128, batch=1)
  want = hf_logits(ref, tokens)
  assert np.abs(our_logits(config, params, tokens) - want).max() < TOL
  plain = dataclasses.replace(config, rope_scaling="none")
  assert np.abs(our_logits(plain, params, tokens) - want).max() > 1e-2


def test_llama31_older_rope_scaling_key(root):
  """Configs written before transformers 5 (the Hub's Llama 3.1): `rope_scaling`
  with `type` or `rope_type`, rope_theta at the top level; the same model."""
  _, path = saved("llama31", root)
  hf = json.load(open(f"{path}/config.json"))
  new = lm_config_from_hf(hf)
  params = dict(hf.pop("rope_parameters"))
  hf["rope_theta"] = params.pop("rope_theta")
  for kind_key in ("rope_type", "type"):
    scaling = {kind_key: params["rope_type"],
               **{k: v for k, v in params.items() if k != "rope_type"}}
    assert lm_config_from_hf({**hf, "rope_scaling": scaling}) == new
  with pytest.raises(ValueError, match="rope_scaling.rope_type 'yarn' is not supported"):
    lm_config_from_hf({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="lacks 'low_freq_factor'"):
    lm_config_from_hf({**hf, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_mistral_sliding_window_beyond_the_window(root):
  """A 40-token prompt with an 8-token window: every token past the 8th sees
  only its window; ignoring the window misses."""
  ref, path = saved("mistral", root)
  config, params = load_hf_lm(path)
  assert config.sliding_window == 8
  tokens = rows(40)
  want = hf_logits(ref, tokens)
  assert np.abs(our_logits(config, params, tokens) - want).max() < TOL
  full = dataclasses.replace(config, sliding_window=0)
  assert np.abs(our_logits(full, params, tokens) - want).max() > 1e-2


def test_mistral_cached_decoding_past_the_window(root):
  """Flamingo around the converted Mistral (text only): a 12-token prompt (longer
  than the window) then 10 cached steps equal transformers' logits of the whole
  sequence; also left padding and a padded step, against our full forward."""
  ref, path = saved("mistral", root)
  lm, lm_params = load_hf_lm(path)
  config = model_config(FlamingoConfig(
      vision=VisionConfig(name="none"), vision_feature_dim=8,
      resampler=ResamplerConfig(depth=1, width=16, num_heads=2, head_dim=8, num_latents=2,
                                max_frames=1),
      xattn=XAttnConfig(every=2, num_heads=2, head_dim=8), lm=lm,
      image_token_id=V - 2, eoc_token_id=V - 1))
  model = Flamingo(config)
  tokens = jnp.asarray(rows(22, seed=3) % (V - 2))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens[:, :4]))["params"]
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  ids = np.array([config.image_token_id, config.eoc_token_id])
  params = {**params, "lm": lm_params,  # gates 0 and the LM's own new-token rows: the LM alone
            "new_token_embeddings": lm_params["embedding"][ids],
            "new_token_unembeddings": lm_params["unembed"]["kernel"][:, ids].T}
  prefill = jax.jit(functools.partial(model.apply, method="prefill"),
                    static_argnames="cache_length")
  extend = jax.jit(functools.partial(model.apply, method="extend"))
  full = jax.jit(lambda t, a: model.apply({"params": params}, t, attention_mask=a)[0])

  def decode(mask):
    logits, cache = prefill({"params": params}, tokens[:, :12], attention_mask=mask[:, :12],
                            cache_length=22)
    out = [np.asarray(logits)]
    for j in range(12, 22):
      logits, cache = extend({"params": params}, tokens[:, j:j + 1], cache, mask[:, j:j + 1])
      out.append(np.asarray(logits))
    return np.concatenate(out, 1)

  ones = jnp.ones_like(tokens)
  want = hf_logits(ref, np.asarray(tokens))
  assert np.abs(decode(ones) - want).max() < TOL
  mask = ones.at[1, :3].set(0).at[1, 15].set(0)
  got, ref_full = decode(mask), np.asarray(full(tokens, mask))
  real = np.asarray(mask, bool)
  assert np.abs(got[real] - ref_full[real]).max() < 1e-5
  # Row 1's real tokens, unpadded, through transformers.
  kept = np.asarray(tokens)[1][real[1]][None]
  assert np.abs(got[1][real[1]] - hf_logits(ref, kept)[0]).max() < TOL


@pytest.mark.parametrize("kind", ["qwen2", "gemma"])
def test_qwen2_and_gemma_logits(kind, root):
  """Left padding in row 1 (positions count real tokens, as ours)."""
  ref, path = saved(kind, root)
  config, params = load_hf_lm(path)
  assert config.family == kind
  tokens = rows(16)
  mask = np.ones_like(tokens)
  mask[1, :5] = 0
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
               position_ids=torch.from_numpy(positions)).logits.numpy()
  assert want.std() > 0.05
  got = our_logits(config, params, tokens, mask)
  real = mask.astype(bool)
  assert np.abs(got[real] - want[real]).max() < TOL
  if kind == "qwen2":
    assert "bias" in params["blocks_0"]["attn"]["query"]
    assert "bias" not in params["blocks_0"]["attn"]["out"]
  else:  # Gemma's (1 + w) and sqrt(D) matter
    assert config.embedding_scale == pytest.approx(48 ** 0.5)
    unscaled = dataclasses.replace(config, embedding_scale=1.0)
    assert np.abs(our_logits(unscaled, params, tokens, mask)[real] - want[real]).max() > 1e-2


def test_unsupported_families_and_options_are_named():
  for hf, msg in [({"model_type": "phi"}, "unsupported HF model_type 'phi'"),
                  ({"model_type": "gemma2"}, "unsupported HF model_type 'gemma2'"),
                  ({**SMALL, "model_type": "qwen2", "use_sliding_window": True},
                   "qwen2 use_sliding_window=true"),
                  ({**SMALL, "model_type": "llama", "attention_bias": True},
                   "llama attention_bias=true"),
                  ({**SMALL, "model_type": "mistral",
                    "layer_types": ["sliding_attention", "full_attention"]},
                   "alternating attention")]:
    with pytest.raises(ValueError, match=msg):
      lm_config_from_hf(hf)


# --------------------------------------------------------------------------
# mosaic_gpt (MPT-1B-RedPajama, OpenFlamingo-3B's LM)

@pytest.mark.parametrize("qk_ln", [True, False])
def test_mosaic_gpt_converts_with_mpt_parity(qk_ln, tmp_path):
  from safetensors.numpy import save_file
  hf = mosaic_gpt_config(attn_qk_ln=qk_ln)
  ref, mosaic = mpt_reference(hf)
  assert "transformer.blocks.1.ln_2.weight" in mosaic and "transformer.ln_f.weight" in mosaic
  (tmp_path / "config.json").write_text(json.dumps(hf))
  save_file(mosaic, str(tmp_path / "model.safetensors"))
  config, params = load_hf_lm(str(tmp_path))
  assert (config.family, config.qk_norm, config.norm_bias) == ("mpt", qk_ln, False)
  tokens = rows(24)
  want = hf_logits(ref, tokens)
  assert want.std() > 0.05
  assert np.abs(our_logits(config, params, tokens) - want).max() < TOL
  if qk_ln:  # the q/k norms matter
    off = dataclasses.replace(config, qk_norm=False)
    bare = {**params, **{f"blocks_{i}": {**params[f"blocks_{i}"], "attn": {
        k: v for k, v in params[f"blocks_{i}"]["attn"].items() if not k.endswith("_norm")}}
        for i in range(config.num_layers)}}
    assert np.abs(our_logits(off, bare, tokens) - want).max() > 1e-2


def test_mosaic_gpt_refusals():
  for kw, msg in [(dict(alibi=False), "'alibi': False"),
                  (dict(attn_clip_qkv=6.0), "attn_clip_qkv"),
                  (dict(n_heads=6, d_model=48), "n_heads 6 is not a power of 2")]:
    with pytest.raises(ValueError, match=msg):
      lm_config_from_hf(mosaic_gpt_config(**kw))
  hf = mosaic_gpt_config()
  _, mosaic = mpt_reference(hf)
  missing = {k: v for k, v in mosaic.items() if k != "transformer.blocks.1.attn.k_ln.weight"}
  with pytest.raises(ValueError, match="missing tensor 'transformer.blocks.1.attn.k_ln.weight'"):
    convert_state_dict(missing, lm_config_from_hf(hf))
