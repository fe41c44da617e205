"""Our DecoderLM reproduces transformers' logits (float32) on small random models
of each supported family, loaded from a local directory written by save_pretrained."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flamingo_jax.convert.hf_lm import load_hf_lm  # noqa: E402
from flamingo_jax.models.lm import DecoderLM  # noqa: E402


def build(kind):
  torch.manual_seed(0)
  if kind == "gpt2":
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg)
  if kind == "llama":
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logits_match_transformers(kind, tmp_path):
  ref = build(kind).eval()
  with torch.no_grad():  # LayerNorm/RMSNorm weights random too
    for name, p in ref.named_parameters():
      if "norm" in name or "ln_" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
  ref.save_pretrained(tmp_path, safe_serialization=True)
  tokens = np.random.default_rng(0).integers(0, 97, (2, 16))
  mask = np.ones_like(tokens)
  mask[1, :5] = 0  # left padding
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)  # ours: count real tokens only
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
               position_ids=torch.from_numpy(positions)).logits.numpy()
  config, params = load_hf_lm(str(tmp_path))
  got = np.asarray(jax.jit(DecoderLM(config).apply)({"params": params}, tokens, mask))
  keep = mask.astype(bool)  # padded positions are don't-care
  assert np.abs(got[keep] - want[keep]).max() < 1e-4


def test_unsupported_family(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "bloom"}')
  with pytest.raises(ValueError, match="unsupported HF model_type 'bloom'"):
    load_hf_lm(str(tmp_path))


def test_hf_lm_cli(tmp_path):
  import json

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
