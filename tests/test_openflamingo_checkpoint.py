"""OpenFlamingo checkpoints give OpenFlamingo's logits through our converter.

* The committed fixture (tests/fixtures/make_openflamingo_fixture.py): a whole
  model with a real OpenCLIP tower, images in.
* Models built in the test by the real open_flamingo code (tests/openflamingo_ref.py)
  around tiny LMs of the released models' shapes: OpenFlamingo-4B's GPT-NeoX
  (RedPajama-INCITE: embedding matrix larger than the tokenizer, untied output),
  -9B's MPT-7B, -3B's mosaic_gpt, and Llama; each saved in both layouts (with
  the `gated_cross_attn_layers` aliases, and as the train script's
  filter_state_dict_to_trainable leaves it), raw and as {"model_state_dict": ...}.
"""
import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from flamingo_jax.convert.openflamingo import (convert_openflamingo,  # noqa: E402
                                               load_torch_state_dict)
from flamingo_jax.models.flamingo import Flamingo  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "openflamingo_tiny")


def load(every=2):
  from safetensors.numpy import load_file
  checkpoint = load_torch_state_dict(os.path.join(FIXTURE, "checkpoint.pt"))
  vision = load_file(os.path.join(FIXTURE, "vision.safetensors"))
  return convert_openflamingo(checkpoint, os.path.join(FIXTURE, "lm"), vision,
                              cross_attn_every_n_layers=every, media_token_id=101,
                              eoc_token_id=100, vision_heads=4)


def test_logits_match_openflamingo():
  config, params = load()
  io = np.load(os.path.join(FIXTURE, "io.npz"))
  images = io["vision_x"].transpose(0, 1, 2, 4, 5, 3)  # [b, T, F, C, H, W] -> NHWC
  logits, _ = jax.jit(Flamingo(config).apply)({"params": params}, io["lang_x"], images=images,
                                              attention_mask=io["attention_mask"])
  assert config.xattn.placement == "openflamingo" and len(
      [k for k in params if k.startswith("xattn_block_")]) == 2
  assert np.abs(np.asarray(logits) - io["logits"]).max() < 1e-4


def test_wrong_interval_is_named():
  with pytest.raises(ValueError, match=r"cross-attention layer 0 is missing .* "
                     r"cross_attn_every_n_layers=1"):
    load(every=1)


def test_cli_writes_a_loadable_checkpoint(tmp_path):
  import flax.linen as nn
  import orbax.checkpoint as ocp

  from flamingo_jax.models.config import model_config
  from flamingo_jax.config import load_config
  from flamingo_jax.convert.__main__ import main
  from flamingo_jax.apps.count_params import abstract_params

  # The fixture's tiny ViT has 4 heads of 8; real OpenCLIP towers use heads of 64, which is
  # what the CLI assumes. Convert the real way and check the tree and config it writes.
  out = tmp_path / "of"
  rc = main(["openflamingo", "--input", os.path.join(FIXTURE, "checkpoint.pt"),
             "--lm", os.path.join(FIXTURE, "lm"),
             "--vision", os.path.join(FIXTURE, "vision.safetensors"),
             "--cross_attn_every_n_layers", "2", "--media_token_id", "101",
             "--eoc_token_id", "100", "--out", str(out)])
  assert rc == 0
  config = model_config(load_config(os.path.join(os.path.dirname(FIXTURE), "..", "..",
                                                 "configs", "from_checkpoint.py"), str(out)))
  assert config.xattn.placement == "openflamingo" and config.lm.vocab_size == 103
  abstract = abstract_params(config)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(str(out / "params"))
  assert jax.tree.structure(nn.unbox(abstract)) == jax.tree.structure(restored)
  assert rc == 0 and main(["openflamingo", "--input", os.path.join(FIXTURE, "checkpoint.pt"),
                           "--lm", os.path.join(FIXTURE, "lm"), "--vision",
                           os.path.join(FIXTURE, "vision.safetensors"),
                           "--cross_attn_every_n_layers", "3", "--media_token_id", "101",
                           "--eoc_token_id", "100", "--out", str(tmp_path / "bad")]) == 2


# ---------------------------------------------------------------------------------------
# Models built by the real open_flamingo code, both checkpoint layouts

VISION = os.path.join(FIXTURE, "vision.safetensors")  # the tiny OpenCLIP tower (width 32)
TOKENIZER_LEN = 100  # the LM's tokenizer; OpenFlamingo appends <|endofchunk|>, <image>, <PAD>


def _llama(tied):
  import transformers
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=TOKENIZER_LEN, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
      tie_word_embeddings=tied, initializer_range=0.1))


def _redpajama_incite():
  """RedPajama-INCITE-3B's shape (OpenFlamingo-4B): GPT-NeoX, full rotary, sequential
  residual, untied output, an embedding matrix padded past the tokenizer (50,432 vs
  50,277 there)."""
  import transformers
  return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
      vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
      intermediate_size=128, rotary_pct=1.0, use_parallel_residual=False,
      tie_word_embeddings=False, initializer_range=0.1))


def _mpt7b():
  """MPT-7B's shape (OpenFlamingo-9B): ALiBi, no biases, tied, padded vocabulary."""
  import transformers
  return transformers.MptForCausalLM(transformers.MptConfig(
      d_model=64, n_heads=4, n_layers=4, expansion_ratio=4, max_seq_len=64, vocab_size=128,
      no_bias=True, initializer_range=0.1))


def _mosaic_gpt(base_dir):
  """MPT-1B-RedPajama's mosaic_gpt (OpenFlamingo-3B, cross-attention every layer):
  the reference network of tests/lm_ref.py (transformers' MPT with mosaic_gpt's
  q/k LayerNorms), its base LM saved in mosaic_gpt's own layout."""
  from lm_ref import mosaic_gpt_config, mpt_reference
  from safetensors.numpy import save_file
  hf = mosaic_gpt_config(vocab_size=128, n_layers=3)
  ref, mosaic = mpt_reference(hf)
  os.makedirs(base_dir, exist_ok=True)
  with open(os.path.join(base_dir, "config.json"), "w") as f:
    json.dump(hf, f)
  save_file(mosaic, os.path.join(base_dir, "model.safetensors"))
  return ref


# name: (LM builder, decoder layers attribute, cross_attn_every_n_layers, compare only the
# base LM's output columns: an untied head's new rows are random and never saved)
FAMILIES = {
    "llama": (lambda _: _llama(True), "model.layers", 2, False),
    "llama_untied": (lambda _: _llama(False), "model.layers", 2, True),
    "of4b_gpt_neox": (lambda _: _redpajama_incite(), "gpt_neox.layers", 2, False),
    "of9b_mpt": (lambda _: _mpt7b(), "transformer.blocks", 4, False),
    "of3b_mosaic_gpt": (_mosaic_gpt, "transformer.blocks", 1, False),
}
_REFERENCES: dict = {}


def reference(family, tmp_path_factory):
  """(base LM dir, OpenFlamingo model, ids, inputs, OpenFlamingo's logits, jitted apply)."""
  if family not in _REFERENCES:
    import openflamingo_ref as ref
    build, layers, every, _ = FAMILIES[family]
    base = str(tmp_path_factory.mktemp(family) / "lm")
    lm = build(base).eval()
    if not os.path.exists(os.path.join(base, "config.json")):
      lm.save_pretrained(base, safe_serialization=True)  # before OpenFlamingo touches it
    model, eoc, media = ref.build_openflamingo(lm, tokenizer_len=TOKENIZER_LEN,
                                               decoder_layers=layers, every=every, vis_dim=32)
    tokens, mask = ref.interleaved_tokens(TOKENIZER_LEN, eoc, media)
    features = np.random.default_rng(3).standard_normal((2, 3, 5, 32)).astype(np.float32)
    want = ref.reference_logits(model, features, tokens, mask)
    _REFERENCES[family] = dict(base=base, model=model, eoc=eoc, media=media, every=every,
                               tokens=tokens, mask=mask, features=features, want=want,
                               apply=None)
  return _REFERENCES[family]


def convert_saved(r, path):
  from safetensors.numpy import load_file
  return convert_openflamingo(load_torch_state_dict(path), r["base"], load_file(VISION),
                              cross_attn_every_n_layers=r["every"], media_token_id=r["media"],
                              eoc_token_id=r["eoc"], vision_heads=4, checkpoint_source=path)


def our_logits(r, config, params):
  if r["apply"] is None:  # one compilation per family: every layout gives the same tree
    r["apply"] = jax.jit(lambda p, t, f, m: Flamingo(config).apply(
        {"params": p}, t, visual_features=f, attention_mask=m)[0])
  return np.asarray(r["apply"](params, r["tokens"], r["features"][:, :, None], r["mask"]))


def layout_state(model, layout):
  import openflamingo_ref as ref
  if layout == "train_script":
    state = ref.train_script_state_dict(model)
    assert not any("gated_cross_attn_layers" in k or "old_decoder_blocks" in k for k in state)
    return state
  state = ref.alias_state_dict(model)
  assert any(k.startswith("lang_encoder.gated_cross_attn_layers.") for k in state)
  if layout == "alias_only":  # only the ModuleList aliases, not the per-layer copies
    state = {k: v for k, v in state.items() if ".gated_cross_attn_layer." not in k}
  return state


@pytest.mark.parametrize("wrapped", [False, True], ids=["raw", "model_state_dict"])
@pytest.mark.parametrize("layout", ["alias", "alias_only", "train_script"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_layouts_match_open_flamingo(family, layout, wrapped, tmp_path, tmp_path_factory):
  import openflamingo_ref as ref
  r = reference(family, tmp_path_factory)
  path = ref.save(layout_state(r["model"], layout), tmp_path / "checkpoint.pt", wrapped)
  config, params = convert_saved(r, path)
  every = r["every"]
  assert sorted(int(k.split("_")[-1]) for k in params if k.startswith("xattn_block_")) == [
      i for i in range(config.lm.num_layers) if (i + 1) % every == 0]
  assert config.lm.vocab_size == TOKENIZER_LEN + 3  # resized as OpenFlamingo does
  got, want = our_logits(r, config, params), r["want"]
  if FAMILIES[family][3]:
    got, want = got[..., :TOKENIZER_LEN], want[..., :TOKENIZER_LEN]
  assert want.std() > 1e-2
  assert np.abs(got - want).max() < 1e-4


def test_redpajama_head_saved_as_embed_out(tmp_path, tmp_path_factory):
  """OpenFlamingo-4B's released checkpoint (transformers < 5 names GPT-NeoX's output
  embed_out; filter_state_dict_to_trainable keeps every "embed" name) carries the resized
  output matrix; the converter uses it rather than the base LM's rows."""
  import torch

  import openflamingo_ref as ref
  r = reference("of4b_gpt_neox", tmp_path_factory)
  head = r["model"].lang_encoder.get_output_embeddings().weight
  state = ref.train_script_state_dict(r["model"])
  moved = head.detach() + 0.5 * torch.randn(head.shape, generator=torch.Generator().manual_seed(5))
  state["lang_encoder.embed_out.weight"] = moved
  path = ref.save(state, tmp_path / "checkpoint.pt", wrapped=True)
  config, params = convert_saved(r, path)
  with torch.no_grad():
    old = head.detach().clone()
    head.copy_(moved)
    try:
      want = ref.reference_logits(r["model"], r["features"], r["tokens"], r["mask"])
    finally:
      head.copy_(old)
  assert np.abs(our_logits(r, config, params) - want).max() < 1e-4
  state["lang_encoder.embed_out.weight"] = moved[:-1]
  with pytest.raises(ValueError, match=r"checkpoint.pt: tensor 'lang_encoder.embed_out.weight' "
                     r"has shape \(102, 64\), expected \(103, 64\)"):
    convert_saved(r, ref.save(state, tmp_path / "checkpoint.pt", wrapped=False))


def test_layouts_that_disagree_are_named(tmp_path, tmp_path_factory):
  import openflamingo_ref as ref
  r = reference("llama", tmp_path_factory)
  state = ref.alias_state_dict(r["model"])
  key = "lang_encoder.model.layers.1.gated_cross_attn_layer.attn_gate"
  state[key] = state[key] + 1
  with pytest.raises(ValueError, match=r"'lang_encoder.gated_cross_attn_layers.1.attn_gate' "
                     r"and 'lang_encoder.model.layers.1.gated_cross_attn_layer.attn_gate' hold "
                     r"the same cross-attention weight but differ"):
    convert_saved(r, ref.save(state, tmp_path / "checkpoint.pt", wrapped=False))


# ---------------------------------------------------------------------------------------
# OpenFlamingo's tokenizer and prompts, through a converted model directory


def _bpe(bos_template: bool):
  """A GPT-NeoX-like byte-level BPE (<|endoftext|> = BOS = EOS, no pad token); its
  post-processor adds no BOS (GPT-NeoX, MPT) or, bos_template, one (Llama-style)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  from data_helpers import CORPUS
  raw = tokenizers.Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  raw.post_processor = (processors.TemplateProcessing(
      single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]) if bos_template
      else processors.ByteLevel(trim_offsets=False))
  return raw


CAPTIONS = [{"image": 0, "caption": "a red circle on the left"},
            {"image": 1, "caption": "a blue square"}]
QUESTIONS = [{"image": 0, "question": "how many shapes are there?", "answer": "two"},
             {"image": 1, "question": "what colour?", "answer": "blue"}]


def open_flamingo_prompts():
  """OpenFlamingo's eval prompts (open_flamingo/eval/models/open_flamingo.py's
  get_caption_prompt / get_vqa_prompt, joined as evaluate.py joins them: "\\n" after
  each shot; zero-shot drops the shots' "<image>")."""
  def caption(c=None):
    return f"<image>Output:{c if c is not None else ''}{'<|endofchunk|>' if c is not None else ''}"

  def vqa(q, a=None):
    return (f"<image>Question:{q} Short answer:{a if a is not None else ''}"
            f"{'<|endofchunk|>' if a is not None else ''}")
  cap_context = "".join(caption(s["caption"].strip()) + "\n" for s in CAPTIONS)
  vqa_context = "".join(vqa(s["question"], s["answer"]) + "\n" for s in QUESTIONS)
  query = "the query"
  return {"captioning": (cap_context + caption(), cap_context.replace("<image>", "") + caption()),
          "vqa": (vqa_context + vqa(query), vqa_context.replace("<image>", "") + vqa(query))}


_TOKENIZER_MODELS: dict = {}


def tokenizer_model(n, tmp_path_factory):
  """An OpenFlamingo model (GPT-NeoX, padded untied vocabulary) for a tokenizer of n
  tokens, its train-script checkpoint and base LM dir; built once per module."""
  if n not in _TOKENIZER_MODELS:
    import openflamingo_ref as ref
    d = tmp_path_factory.mktemp("tokenizer_model")
    lm = _redpajama_incite_vocab(n + 20).eval()
    lm.save_pretrained(d / "lm", safe_serialization=True)
    model, eoc, media = ref.build_openflamingo(lm, tokenizer_len=n, every=2, vis_dim=32,
                                               decoder_layers="gpt_neox.layers")
    ckpt = ref.save(ref.train_script_state_dict(model), d / "checkpoint.pt", wrapped=True)
    _TOKENIZER_MODELS[n] = dict(model=model, eoc=eoc, media=media, ckpt=ckpt, lm=str(d / "lm"),
                                checked_logits=False)
  return _TOKENIZER_MODELS[n]


@pytest.mark.parametrize("bos", [False, True], ids=["gpt_neox_tokenizer", "bos_tokenizer"])
def test_tokenizer_and_prompts_match_open_flamingo(bos, tmp_path, tmp_path_factory):
  """`convert openflamingo --tokenizer_dir` writes OpenFlamingo's tokenizer into the model
  directory; loaded from there, our prompts are the ids OpenFlamingo's HF tokenizer
  gives its captioning and VQA prompts (few- and zero-shot), token for token: no BOS
  unless its tokenizer adds one, its `<|endofchunk|>` id; the logits on them match. Given
  the base LM's tokenizer instead, the converter adds the tokens as OpenFlamingo does."""
  import transformers

  import openflamingo_ref as ref
  from flamingo_jax.convert.__main__ import main
  from flamingo_jax.convert.openflamingo import openflamingo_tokenizer
  from flamingo_jax.evaluate.prompts import build_prompt, get_template
  from flamingo_jax.evaluate.inputs import encode_prompt
  from flamingo_jax.model_dir import load, load_tokenizer
  raw = _bpe(bos)
  base_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
  base_tok.save_pretrained(tmp_path / "base_tokenizer")
  # OpenFlamingo's factory (create_model_and_transforms) on that tokenizer
  of_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "base_tokenizer"))
  of_tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
  if of_tok.pad_token is None:
    of_tok.add_special_tokens({"pad_token": "<PAD>"})
  of_tok.save_pretrained(tmp_path / "openflamingo_tokenizer")
  n = len(base_tok)
  eoc, media = of_tok.encode("<|endofchunk|>")[-1], of_tok.encode("<image>")[-1]
  assert (eoc, media, len(of_tok)) == (n, n + 1, n + 3)

  m = tokenizer_model(n, tmp_path_factory)
  assert (m["eoc"], m["media"]) == (eoc, media)
  out = tmp_path / "converted"
  assert main(["openflamingo", "--input", m["ckpt"], "--lm", m["lm"], "--vision", VISION,
               "--cross_attn_every_n_layers", "2", "--tokenizer_dir",
               str(tmp_path / "openflamingo_tokenizer"), "--out", str(out)]) == 0
  converted = load(str(out))
  from_base, _ = openflamingo_tokenizer(str(tmp_path / "base_tokenizer"))
  # OpenFlamingo's own tokenizer.json passed to the loader (generate / evaluate --tokenizer)
  as_given = load_tokenizer(str(out), converted.config,
                            str(tmp_path / "openflamingo_tokenizer" / "tokenizer.json"))
  tokenizers = (converted.tokenizer, from_base, as_given)
  for tok in tokenizers:
    assert (tok.info.image_token_id, tok.info.eoc_token_id) == (media, eoc)
    assert tok.add_bos == bos

  texts = open_flamingo_prompts()
  queries = {"captioning": {"image": 2}, "vqa": {"image": 2, "question": "the query"}}
  shots = {"captioning": CAPTIONS, "vqa": QUESTIONS}
  for task in ("captioning", "vqa"):
    for zero_shot, text in zip((False, True), texts[task]):
      want = of_tok(text)["input_ids"]
      assert (want[0] == of_tok.bos_token_id) == bos and want.count(eoc) == 2
      prompt = build_prompt(get_template(task, "open_flamingo"), shots[task], queries[task],
                            zero_shot=zero_shot)
      for tok in tokenizers:
        assert encode_prompt(prompt.text, tok) == want, (task, zero_shot)

  if not m["checked_logits"]:  # the same model for both tokenizers: once is enough
    m["checked_logits"] = True
    tokens = np.array([of_tok(texts["vqa"][0])["input_ids"]])
    features = np.random.default_rng(4).standard_normal((1, 3, 5, 32)).astype(np.float32)
    expected = ref.reference_logits(m["model"], features, tokens, np.ones_like(tokens))
    logits, _ = jax.jit(Flamingo(converted.config).apply)(
        {"params": converted.params}, tokens, visual_features=features[:, :, None])
    assert np.abs(np.asarray(logits) - expected).max() < 1e-4


def _redpajama_incite_vocab(vocab):
  import transformers
  return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
      vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=128, rotary_pct=1.0, use_parallel_residual=False,
      tie_word_embeddings=False, initializer_range=0.1))
