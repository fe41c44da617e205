"""Hugging Face tokenizer.json (GPT-NeoX / MPT byte-level BPE) through `Tokenizer.load`."""
import json
import pickle

import pytest

from data_helpers import CORPUS
from flamingo_jax.data import Tokenizer
from flamingo_jax.data.tokenizer import HFTokenizer

tokenizers = pytest.importorskip("tokenizers")


def write_neox_style(directory, extra_special=(), config=True):
  """A byte-level BPE like GPT-NeoX's: <|endoftext|> (id 0) is BOS and EOS, <|padding|> 1."""
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 10, trainer)
  if extra_special:
    tok.add_special_tokens(list(extra_special))
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  if config:
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"},
         "pad_token": "<|padding|>"}))
  return tok


def test_neox_style_ids_and_round_trip(tmp_path):
  raw = write_neox_style(tmp_path / "neox")
  for path in (tmp_path / "neox", tmp_path / "neox" / "tokenizer.json"):
    tok = Tokenizer.load(str(path))
    assert isinstance(tok, HFTokenizer)
    n = raw.get_vocab_size(with_added_tokens=True)
    info = tok.info
    assert (info.bos_id, info.eos_id, info.pad_id) == (0, 0, 1)
    assert (info.image_token_id, info.eoc_token_id, info.vocab_size) == (n, n + 1, n + 2)
    for text in CORPUS + ["unseen wörds here", " a leading space"]:
      ids = tok.encode(text)
      assert ids == raw.encode(text).ids
      assert tok.decode(ids) == text
  text = tok.decode([info.bos_id, info.image_token_id, *tok.encode("a red circle"),
                     info.eoc_token_id, info.eos_id, info.pad_id])
  assert text == "<image>a red circle<EOC>"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([info.vocab_size])
  again = pickle.loads(pickle.dumps(tok))
  assert again.info == tok.info and again.encode("a blue square") == tok.encode("a blue square")


def test_tokenizer_with_its_own_special_tokens(tmp_path):
  """OpenFlamingo adds <image> and <|endofchunk|>; text never encodes to them (or to EOS)."""
  raw = write_neox_style(tmp_path, extra_special=("<|endofchunk|>", "<image>"))
  tok = Tokenizer.load(str(tmp_path), eoc_piece="<|endofchunk|>")
  info = tok.info
  assert info.vocab_size == tok.piece_size == raw.get_vocab_size(with_added_tokens=True)
  assert info.image_token_id == raw.token_to_id("<image>")
  assert info.eoc_token_id == raw.token_to_id("<|endofchunk|>")
  ids = tok.encode("a red <image> circle<|endofchunk|><|endoftext|>")
  assert not {info.image_token_id, info.eoc_token_id, info.eos_id} & set(ids)
  assert tok.decode([info.image_token_id, *tok.encode("a red"), info.eoc_token_id]) == (
      "<image>a red<|endofchunk|>")


def test_special_tokens_without_a_config(tmp_path):
  write_neox_style(tmp_path, config=False)
  tok = Tokenizer.load(str(tmp_path / "tokenizer.json"))
  assert (tok.info.bos_id, tok.info.eos_id, tok.info.pad_id) == (0, 0, 0)  # PAD = EOS
  tok = HFTokenizer.load(str(tmp_path), pad_token="<|padding|>")
  assert tok.info.pad_id == 1
  with pytest.raises(ValueError, match="PAD token '<pad>' is not in the vocabulary"):
    HFTokenizer.load(str(tmp_path), pad_token="<pad>")


def test_bad_files_are_named(tmp_path):
  info_json = tmp_path / "info" / "tokenizer.json"  # what train_tokenizer writes
  info_json.parent.mkdir()
  info_json.write_text(json.dumps({"vocab_size": 10, "bos_id": 2, "eos_id": 3, "pad_id": 0,
                                   "image_token_id": 8, "eoc_token_id": 9}))
  with pytest.raises(ValueError, match="TokenizerInfo ids.*tokenizer.model"):
    Tokenizer.load(str(info_json))
  (tmp_path / "junk.json").write_text("{not json")
  with pytest.raises(ValueError, match="junk.json: not valid JSON"):
    Tokenizer.load(str(tmp_path / "junk.json"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="cannot read tokenizer .*empty/tokenizer.json"):
    Tokenizer.load(str(tmp_path / "empty"))


def test_openflamingo_conventions(tmp_path):
  """A tokenizer with <|endofchunk|> and no <EOC> uses it as <EOC> (OpenFlamingo's) and,
  as OpenFlamingo feeds it, BOS only if its post-processor adds one; tokenizer_config.json's
  add_bos_token overrides that. Tokenizers without OpenFlamingo's tokens keep BOS."""
  from tokenizers import processors
  raw = write_neox_style(tmp_path, extra_special=("<|endofchunk|>", "<image>"))
  tok = Tokenizer.load(str(tmp_path))
  assert tok.info.eoc_token_id == raw.token_to_id("<|endofchunk|>") and not tok.add_bos
  assert not pickle.loads(pickle.dumps(tok)).add_bos
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
  assert Tokenizer.load(str(tmp_path)).add_bos
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  raw.post_processor = processors.TemplateProcessing(
      single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
  raw.save(str(tmp_path / "tokenizer.json"))
  assert Tokenizer.load(str(tmp_path)).add_bos  # Llama-style: its tokenizer adds BOS
  assert Tokenizer.load(str(tmp_path), eoc_piece="<EOC>").add_bos
  assert tok.decode([tok.info.image_token_id, tok.info.eoc_token_id]) == "<image><|endofchunk|>"
  both = write_neox_style(tmp_path / "both", extra_special=("<|endofchunk|>", "<EOC>", "<image>"))
  assert Tokenizer.load(str(tmp_path / "both")).info.eoc_token_id == both.token_to_id("<EOC>")
  plain = write_neox_style(tmp_path / "plain")
  n = plain.get_vocab_size(with_added_tokens=True)
  assert Tokenizer.load(str(tmp_path / "plain")).info.eoc_token_id == n + 1  # appended
