"""IDEFICS (transformers' IdeficsForVisionText2Text) built locally from a small
IdeficsConfig with random weights gives the same logits through our converter:
interleaved text with several images, the image_attention_mask IDEFICS's
processor builds (text before any image, `</s>` cutting text off from its
image, a left-padded row with a padded image slot) and non-zero gates, so the
cross-attention counts. Also through the CLI, decoding with a cache, and the
converter's errors."""
import functools
import os
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flamingo_jax.config import to_config_dict
from flamingo_jax.models.config import model_config  # noqa: E402
from flamingo_jax.convert.idefics import convert_idefics  # noqa: E402
from flamingo_jax.models import masking  # noqa: E402
from flamingo_jax.models.flamingo import Flamingo  # noqa: E402

V, FAKE, IMG = 97, 97, 98  # IDEFICS's tokenizer: <fake_token_around_image>, <image> after vocab
PAD, BOS, EOS = 0, 1, 2
N_IMAGES, SIZE = 3, 16
TOL = 1e-4


def hf_config(alpha_type: str, qk: bool):
  from transformers import IdeficsConfig
  # transformers cannot build float alphas with the normal initializer
  # (torch.normal(size=(1))); hf_model draws every alpha at random anyway.
  return IdeficsConfig(
      vocab_size=V, additional_vocab_size=2, hidden_size=32, intermediate_size=48,
      num_hidden_layers=4, num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=qk,
      alpha_initializer="normal" if alpha_type == "vector" else "ones",
      alphas_initializer_range=1.0, alpha_type=alpha_type,
      use_resampler=True, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
      vision_config=dict(embed_dim=24, image_size=SIZE, patch_size=8, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4),
      perceiver_config=dict(resampler_n_latents=3, resampler_depth=2, resampler_n_heads=2,
                            resampler_head_dim=6, qk_layer_norms_perceiver=qk))


def hf_model(alpha_type="vector", qk=True, seed=0):
  """An eval-mode float32 IDEFICS whose every weight is O(1) random (norm scales
  and biases too, so a misplaced one shows)."""
  from transformers import IdeficsForVisionText2Text
  torch.manual_seed(seed)
  model = IdeficsForVisionText2Text(hf_config(alpha_type, qk)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "alpha" in name or name.endswith("class_embedding"):
        p.copy_(torch.randn(p.shape))
      elif p.ndim >= 2:
        p.copy_(torch.randn(p.shape) / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape))
      else:  # norm scales
        p.copy_(1 + 0.1 * torch.randn(p.shape))
  return model


def inputs():
  """(input_ids [2, L], attention_mask [2, L], pixel_values [2, N, 3, H, W],
  image_attention_mask [2, L, N]).

  Row 0: text before the first image, three images, a `</s>` before the third.
  Row 1: left padding, two images (the third slot is zeros, as the processor pads).
  """
  from transformers.models.idefics import processing_idefics as proc
  img = [FAKE, IMG, FAKE]
  row0 = [BOS, 5, 6, *img, 7, 8, 9, *img, 10, 11, EOS, 12, 13, *img, 14, 15]
  row1 = [PAD] * 4 + [BOS, 5, *img, 20, 21, 22, *img, 23, 24, 25, 26, 27, 28, 29]
  ids = torch.tensor([row0, row1])
  mask = (ids != PAD).long()
  gen = torch.Generator().manual_seed(1)
  pixels = torch.randn(2, N_IMAGES, 3, SIZE, SIZE, generator=gen)
  pixels[1, 2] = 0
  tokenizer = types.SimpleNamespace(convert_tokens_to_ids=lambda t: IMG, eos_token_id=EOS)
  incremental, _ = proc.image_attention_mask_for_packed_input_ids_pt(ids, tokenizer)
  image_mask = proc.incremental_to_binary_attention_mask(incremental, "pt", N_IMAGES)
  return ids, mask, pixels, image_mask


def hf_logits(model, ids, mask, pixels, image_mask):
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                 image_attention_mask=image_mask).logits.numpy()


def ours(config, params, ids, mask, pixels):
  images = pixels.numpy().transpose(0, 1, 3, 4, 2)[:, :, None]  # [B, N, 1, H, W, 3]
  fn = jax.jit(Flamingo(config).apply)
  logits, _ = fn({"params": params}, ids.numpy(), images=images, attention_mask=mask.numpy())
  return np.asarray(logits)


def max_diff(a, b, mask):
  real = mask.numpy().astype(bool)  # padded positions differ (HF gives them position 1)
  return float(np.abs(a - b)[real].max())


@pytest.fixture(scope="module")
def converted():
  model = hf_model()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  config, params = convert_idefics(state, model.config.to_dict())
  return model, state, config, params


def test_logits_match_idefics(converted):
  model, _, config, params = converted
  ids, mask, pixels, image_mask = inputs()
  want = hf_logits(model, ids, mask, pixels, image_mask)
  got = ours(config, params, ids, mask, pixels)
  diff = max_diff(got, want, mask)
  print(f"IDEFICS parity: max abs logit diff {diff:.2e}")
  assert diff < TOL
  assert config.xattn.gate_shape == "vector" and config.xattn.qk_norm
  assert config.resampler.qk_layernorm and config.image_reset_token_id == EOS
  assert sorted(k for k in params if k.startswith("xattn_block_")) == ["xattn_block_0",
                                                                       "xattn_block_2"]
  # Not vacuous: a different second image changes IDEFICS's logits from its <image> on.
  other = pixels.clone()
  other[0, 1] = torch.randn(3, SIZE, SIZE)
  changed = np.abs(hf_logits(model, ids, mask, other, image_mask) - want)[0].max(-1)
  second = int(np.flatnonzero(ids[0].numpy() == IMG)[1])
  assert changed[:second].max() < 1e-6 and changed[second:].min() > 1e-3


def test_decoding_with_a_cache_matches_idefics(converted):
  """prefill + one token at a time (the `</s>` cut carried in the cache) = IDEFICS."""
  model, _, config, params = converted
  ids, mask, pixels, image_mask = inputs()
  want = hf_logits(model, ids, mask, pixels, image_mask)
  flamingo = Flamingo(config)
  length, start = ids.shape[1], 12
  images = pixels.numpy().transpose(0, 1, 3, 4, 2)[:, :, None]
  prefill = jax.jit(functools.partial(flamingo.apply, method="prefill", cache_length=length))
  extend = jax.jit(functools.partial(flamingo.apply, method="extend"))
  variables = {"params": params}
  logits, cache = prefill(variables, ids.numpy()[:, :start], images=images,
                          attention_mask=mask.numpy()[:, :start])
  got = [np.asarray(logits)]
  for i in range(start, length):
    logits, cache = extend(variables, ids.numpy()[:, i:i + 1], cache)
    got.append(np.asarray(logits))
  assert max_diff(np.concatenate(got, axis=1), want, mask) < TOL


def test_cli_converts_a_saved_model(tmp_path):
  """save_pretrained (safetensors) -> `python -m flamingo_jax.convert idefics` -> orbax
  params + model_config.json -> the same logits, with <image>/<EOC> moved to V, V+1."""
  import flax.linen as nn
  import orbax.checkpoint as ocp

  from flamingo_jax.config import load_config
  from flamingo_jax.convert.__main__ import main
  from flamingo_jax.apps.count_params import abstract_params

  model = hf_model(alpha_type="float", qk=False, seed=3)
  model.save_pretrained(tmp_path / "idefics")
  out = tmp_path / "converted"
  rc = main(["idefics", "--input", str(tmp_path / "idefics"), "--out", str(out),
             "--token_ids", "flamingo"])
  assert rc == 0
  root = os.path.join(os.path.dirname(__file__), "..")
  config = model_config(load_config(os.path.join(root, "configs", "from_checkpoint.py"),
                                    str(out)))
  assert (config.image_token_id, config.eoc_token_id) == (V, V + 1)
  assert config.xattn.gate_shape == "scalar" and not config.xattn.qk_norm
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(str(out / "params"))
  assert jax.tree.structure(nn.unbox(abstract_params(config))) == jax.tree.structure(params)
  ids, mask, pixels, image_mask = inputs()
  want = hf_logits(model, ids, mask, pixels, image_mask)
  swap = np.arange(V + 2)
  swap[[FAKE, IMG]] = [IMG, FAKE]
  got = ours(config, params, torch.from_numpy(swap[ids.numpy()]), mask, pixels)[..., swap]
  diff = max_diff(got, want, mask)
  print(f"IDEFICS CLI parity: max abs logit diff {diff:.2e}")
  assert diff < TOL
  assert main(["idefics", "--input", str(tmp_path / "missing"), "--out",
               str(tmp_path / "bad")]) == 2


def test_conversion_errors_name_the_tensor(converted):
  model, state, _, _ = converted
  hf = model.config.to_dict()
  name = "model.gated_cross_attn_layers.1.cross_attn.k_proj.weight"
  missing = {k: v for k, v in state.items() if k != name}
  with pytest.raises(ValueError, match=rf"missing tensor '{name}'.*expected shape \(32, 24\)"):
    convert_idefics(missing, hf)
  name = "model.perceiver_resampler.blocks.0.0.q_layer_norm.weight"
  with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(5,\), expected \(6,\)"):
    convert_idefics({**state, name: np.ones(5, np.float32)}, hf)
  name = "model.layers.3.mlp.up_proj.weight"
  with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(32, 48\), expected "
                     r"\(48, 32\)"):
    convert_idefics({**state, name: state[name].T}, hf)
  with pytest.raises(ValueError, match=r"not converted: \['model.extra'\]"):
    convert_idefics({**state, "model.extra": np.zeros(1, np.float32)}, hf)
  with pytest.raises(ValueError, match="cross_layer_interval 3"):
    convert_idefics(state, {**hf, "cross_layer_interval": 3})
  with pytest.raises(ValueError, match="use_resampler=False"):
    convert_idefics(state, {**hf, "use_resampler": False})


def test_phi_is_idefics_image_attention_mask():
  """Our phi with the `</s>` reset = the processor's masks, previous- and next-image."""
  import jax.numpy as jnp
  from transformers.models.idefics import processing_idefics as proc
  ids, *_ = inputs()
  ids = torch.cat([ids, torch.tensor([[BOS, 5, EOS, EOS, 6, IMG, 7, EOS, 8, IMG, EOS, 9,
                                       IMG, 10, 11, 12, EOS, 13, 14, IMG, 15, 16]])])
  tokenizer = types.SimpleNamespace(convert_tokens_to_ids=lambda t: IMG, eos_token_id=EOS)
  prev, nxt = proc.image_attention_mask_for_packed_input_ids_pt(ids.clone(), tokenizer)
  tokens = jnp.asarray(ids.numpy())
  np.testing.assert_array_equal(masking.phi(tokens, IMG, None, EOS), prev.numpy() + 1)
  got = np.asarray(masking.phi(tokens, IMG, jnp.ones(3, bool), EOS))
  np.testing.assert_array_equal(got, np.where(nxt.numpy() >= 0, nxt.numpy() + 1, 0))


def test_new_config_options_are_validated():
  from flamingo_jax.models.config import FlamingoConfig
  base = to_config_dict(FlamingoConfig())
  for key, value, message in [
      ("xattn.norm", "batchnorm", r"'model.xattn.norm' is 'batchnorm'"),
      ("xattn.gate_init", "uniform", r"'model.xattn.gate_init' is 'uniform'"),
      ("xattn.gate_init_std", -1.0, r"'model.xattn.gate_init_std' must be >= 0"),
      ("xattn.ffw_dim", -4, r"'model.xattn.ffw_dim' must be >= 0"),
      ("xattn.activation", "tanh", r"'model.xattn.activation' is 'tanh'"),
      ("image_reset_token_id", 40000, r"'model.image_reset_token_id' = 40000"),
      ("image_reset_token_id", 31998, r"'model.image_reset_token_id' and "
       r"'model.image_token_id' must differ"),
      ("vision.vit.include_class_token", "yes", r"'model.vision.vit.include_class_token' "
       "must be bool"),
      ("resampler.qk_layernorm", 1, r"'model.resampler.qk_layernorm' must be bool")]:
    cfg = base.to_dict()
    *path, leaf = key.split(".")
    target = cfg
    for part in path:
      target = target[part]
    target[leaf] = value
    with pytest.raises(ValueError, match=message):
      model_config(cfg)


def test_bad_files_are_one_line_errors(converted, tmp_path, capsys):
  """A truncated shard and a missing tensor: exit 2, the file or directory and the
  tensor named."""
  from safetensors.numpy import save_file

  from flamingo_jax.convert.__main__ import main
  model, state, _, _ = converted
  model.save_pretrained(tmp_path / "idefics")
  shard = tmp_path / "idefics" / "model.safetensors"
  size = os.path.getsize(shard)
  with open(shard, "r+b") as f:
    f.truncate(size // 2)
  argv = ["idefics", "--input", str(tmp_path / "idefics"), "--out", str(tmp_path / "out")]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert f"error: {shard}: tensor '" in err and "the file is truncated" in err
  name = "model.gated_cross_attn_layers.1.cross_attn.k_proj.weight"
  save_file({k: np.ascontiguousarray(v) for k, v in state.items() if k != name}, str(shard))
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert f"error: {tmp_path / 'idefics'}: missing tensor '{name}'" in err
