"""Trains a sentencepiece tokenizer from text files, deterministically.

  python -m flamingo_jax.data.train_tokenizer --input a.txt b.txt --vocab_size 512 --out DIR

Writes DIR/tokenizer.model and DIR/tokenizer.json (the TokenizerInfo ids).
PAD=0, UNK=1, BOS=2, EOS=3; `<image>` and `<EOC>` are not sentencepiece
pieces, so the Tokenizer appends them (LM vocabulary = pieces + 2) and text
can never encode to them. One thread, no sentence sampling, no shuffling:
the same inputs give the same model bytes. Whitespace is kept as written,
so the paper's "prepend a space to the caption" changes the tokens.
"""
from __future__ import annotations

import io
import json
import os
import sys
from typing import Sequence

import sentencepiece as spm

from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.errors import ArgumentParser, run_cli


def _without_input_paths(proto: bytes) -> bytes:
  """The model records where its corpus was; keep file names only, so the same
  corpus gives the same bytes wherever it lives."""
  from sentencepiece import sentencepiece_model_pb2
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(proto)
  names = [os.path.basename(p) for p in m.trainer_spec.input]
  del m.trainer_spec.input[:]
  m.trainer_spec.input.extend(names)
  return m.SerializeToString()


def train_tokenizer(inputs: Sequence[str], vocab_size: int, out_dir: str, *,
                    model_type: str = "unigram", character_coverage: float = 1.0,
                    byte_fallback: bool = False, max_sentence_length: int = 16384) -> Tokenizer:
  """Trains on `inputs` (text files, one sentence or paragraph a line); returns it loaded."""
  if not inputs:
    raise ValueError("train_tokenizer: no input files given")
  for path in inputs:
    if not os.path.isfile(path):
      raise ValueError(f"train_tokenizer: input {path!r} is not a file")
    if os.path.getsize(path) == 0:
      raise ValueError(f"train_tokenizer: input {path!r} is empty")
  if vocab_size < 8:
    raise ValueError(f"train_tokenizer: vocab_size must be >= 8, got {vocab_size}")
  if model_type not in ("unigram", "bpe", "char", "word"):
    raise ValueError(f"train_tokenizer: model_type {model_type!r} is not one of "
                     "unigram, bpe, char, word")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        input=list(inputs), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        byte_fallback=byte_fallback, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        hard_vocab_limit=False, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=1, remove_extra_whitespaces=False,
        max_sentence_length=max_sentence_length, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"train_tokenizer: sentencepiece failed on {list(inputs)}: {e}") from e
  proto = _without_input_paths(model.getvalue())
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "tokenizer.model")
  with open(path, "wb") as f:
    f.write(proto)
  tok = Tokenizer(proto, source=path)
  with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
    json.dump(tok.info.to_dict(), f, indent=2, sort_keys=True)
  return tok


def main(argv=None) -> None:
  p = ArgumentParser(prog="python -m flamingo_jax.data.train_tokenizer",
                     description=__doc__.split("\n\n")[0])
  p.add_argument("--input", nargs="+", required=True, help="text files")
  p.add_argument("--vocab_size", type=int, required=True,
                 help="sentencepiece pieces (an upper bound on tiny corpora); +2 for the LM")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--model_type", default="unigram", choices=["unigram", "bpe", "char", "word"])
  p.add_argument("--character_coverage", type=float, default=1.0)
  p.add_argument("--byte_fallback", action="store_true",
                 help="encode unseen characters as bytes instead of <unk>")
  a = p.parse_args(argv)
  tok = train_tokenizer(a.input, a.vocab_size, a.out, model_type=a.model_type,
                        character_coverage=a.character_coverage, byte_fallback=a.byte_fallback)
  print(json.dumps({"model": os.path.join(a.out, "tokenizer.model"),
                    "pieces": tok.piece_size, **tok.info.to_dict()}, sort_keys=True))


if __name__ == "__main__":
  sys.exit(run_cli(main))
