"""Reference LMs the tests share (not a test module): transformers models with random
O(1) weights, and MPT-1B-RedPajama's mosaic_gpt layout of one."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def randomise(ref):
  """Norm weights and every bias random too (transformers starts them at 1 and 0)."""
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "norm" in name or "ln_" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return ref.eval()


# mosaic_gpt module name -> transformers MPT's: the documented rename that makes
# a mosaic_gpt state dict an MPT one (MPT is mosaic_gpt's renamed successor).
MOSAIC_TO_MPT = {".ln_1.": ".norm_1.", ".ln_2.": ".norm_2.", ".mlp.mlp_up.": ".ffn.up_proj.",
                 ".mlp.mlp_down.": ".ffn.down_proj.", "transformer.ln_f.": "transformer.norm_f."}


def mosaic_gpt_config(**kw):
  """MPT-1B-RedPajama's config.json keys (model_type mosaic_gpt), tiny sizes."""
  return {"model_type": "mosaic_gpt", "architectures": ["MosaicGPT"], "d_model": 64,
          "n_heads": 4, "n_layers": 2, "mlp_ratio": 4, "max_seq_len": 64, "vocab_size": 97,
          "alibi": True, "alibi_bias_max": 8, "attn_qk_ln": True, "attn_clip_qkv": None,
          "attn_impl": "torch", "low_precision_layernorm": True, "no_bias": True,
          "softmax_scale": None, "prefix_lm": False, "logit_scale": None, **kw}


def mpt_reference(hf: dict, seed=0):
  """transformers' MptForCausalLM with mosaic_gpt's config, and mosaic_gpt's state
  dict of the same network (random O(1) weights; q_ln / k_ln when attn_qk_ln).

  transformers' MPT has no attn_qk_ln: the reference applies mosaic_gpt's
  `query = q_ln(query); key = k_ln(key)` (a LayerNorm over all of d_model,
  between Wqkv and the head split) with a forward hook on each Wqkv.
  """
  torch.manual_seed(seed)
  d = hf["d_model"]
  ref = transformers.MptForCausalLM(transformers.MptConfig(
      d_model=d, n_heads=hf["n_heads"], n_layers=hf["n_layers"],
      expansion_ratio=hf["mlp_ratio"], max_seq_len=hf["max_seq_len"],
      vocab_size=hf["vocab_size"], no_bias=True, initializer_range=0.1,
      attn_config={"alibi_bias_max": hf["alibi_bias_max"]})).eval()
  randomise(ref)
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()
        if k != "lm_head.weight"}
  if hf["attn_qk_ln"]:
    for i, block in enumerate(ref.transformer.blocks):
      ln = {n: (1 + 0.3 * torch.randn(d), None) for n in ("q_ln", "k_ln")}
      for n, (w, _) in ln.items():
        sd[f"transformer.blocks.{i}.attn.{n}.weight"] = w.numpy()

      def hook(_, __, qkv, ln=ln):
        q, k, v = qkv.chunk(3, dim=-1)
        q = torch.nn.functional.layer_norm(q, (d,), ln["q_ln"][0], None)
        k = torch.nn.functional.layer_norm(k, (d,), ln["k_ln"][0], None)
        return torch.cat([q, k, v], dim=-1)
      block.attn.Wqkv.register_forward_hook(hook)
  inverse = {v: k for k, v in MOSAIC_TO_MPT.items()}
  mosaic = {}
  for k, v in sd.items():
    for new, old in inverse.items():
      k = k.replace(new, old)
    mosaic[k] = v
  return ref, mosaic
