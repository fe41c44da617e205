"""The sentencepiece wrapper: training, special tokens, round trips."""
import io
import json
import os
import pickle

import pytest
import sentencepiece as spm

from data_helpers import CORPUS
from flamingo_jax.data import Tokenizer, TokenizerInfo
from flamingo_jax.data import train_tokenizer as train_mod


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "c.txt"
  path.write_text("\n".join(CORPUS * 30) + "\n")
  return str(path)


def test_trains_deterministically_and_round_trips(corpus, tmp_path):
  a = train_mod.train_tokenizer([corpus], 120, str(tmp_path / "a"), model_type="bpe")
  b = train_mod.train_tokenizer([corpus], 120, str(tmp_path / "b"), model_type="bpe")
  assert a.model_proto == b.model_proto
  for text in CORPUS + ["unseen words here", " a leading space"]:
    assert a.decode(a.encode(text)) == text
  info = a.info
  # PAD=0, UNK=1, BOS=2, EOS=3; <image>, <EOC> appended after the pieces.
  assert (info.pad_id, info.bos_id, info.eos_id) == (0, 2, 3)
  assert (info.image_token_id, info.eoc_token_id) == (a.piece_size, a.piece_size + 1)
  assert info.vocab_size == a.piece_size + 2
  saved = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
  assert TokenizerInfo.from_dict(saved) == info
  # A leading space changes the tokens (the paper's caption augmentation).
  assert a.encode(" a red circle") != a.encode("a red circle")


def test_text_never_encodes_to_special_tokens(corpus, tmp_path):
  tok = train_mod.train_tokenizer([corpus], 120, str(tmp_path), model_type="bpe")
  ids = tok.encode("a red <image> circle <EOC>")
  assert tok.info.image_token_id not in ids and tok.info.eoc_token_id not in ids
  i = tok.info
  text = tok.decode([i.bos_id, i.image_token_id, *tok.encode("a red circle"),
                     i.eoc_token_id, i.eos_id, i.pad_id])
  assert text == "<image>a red circle<EOC>"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([i.vocab_size])


def test_model_with_its_own_special_pieces(corpus):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(input=corpus, model_writer=model, vocab_size=100,
                                 model_type="bpe", user_defined_symbols=["<image>", "<EOC>"],
                                 hard_vocab_limit=False, minloglevel=2)
  tok = Tokenizer(model.getvalue())
  info = tok.info
  assert info.vocab_size == tok.piece_size  # nothing appended
  assert tok._sp.id_to_piece(info.image_token_id) == "<image>"
  assert tok._sp.id_to_piece(info.eoc_token_id) == "<EOC>"
  # sentencepiece alone would encode the literal text to the special id.
  assert info.image_token_id in tok._sp.encode("a <image> b")
  assert info.image_token_id not in tok.encode("a <image> b")
  # No PAD piece in this model: padding reuses EOS (it is masked by position).
  assert info.pad_id == info.eos_id


def test_pickles_for_worker_processes(corpus, tmp_path):
  tok = train_mod.train_tokenizer([corpus], 120, str(tmp_path), model_type="bpe")
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.info == tok.info and clone.encode("a red circle") == tok.encode("a red circle")


def test_bad_inputs_are_clear_errors(corpus, tmp_path):
  with pytest.raises(ValueError, match="not a sentencepiece model"):
    Tokenizer(b"not a model")
  with pytest.raises(ValueError, match="cannot read tokenizer model"):
    Tokenizer.load(str(tmp_path / "missing.model"))
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(input=corpus, model_writer=model, vocab_size=60,
                                 model_type="bpe", bos_id=-1, hard_vocab_limit=False,
                                 minloglevel=2)
  with pytest.raises(ValueError, match="no BOS piece"):
    Tokenizer(model.getvalue())
  with pytest.raises(ValueError, match="is not a file"):
    train_mod.train_tokenizer([str(tmp_path / "nope.txt")], 100, str(tmp_path))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    TokenizerInfo(vocab_size=10, bos_id=1, eos_id=2, pad_id=0, image_token_id=10,
                  eoc_token_id=9)
  with pytest.raises(ValueError, match="must differ"):
    TokenizerInfo(vocab_size=10, bos_id=1, eos_id=2, pad_id=0, image_token_id=9,
                  eoc_token_id=9)


def test_cli(corpus, tmp_path, capsys):
  train_mod.main(["--input", corpus, "--vocab_size", "100", "--out", str(tmp_path),
                  "--model_type", "bpe"])
  out = json.loads(capsys.readouterr().out)
  assert os.path.exists(out["model"]) and out["vocab_size"] == out["pieces"] + 2
