"""Tokenizers (sentencepiece, or a Hugging Face tokenizer.json) with Flamingo's
special tokens made explicit.

`<image>` and `<EOC>` (end of chunk) are never produced by encoding text: a
caption that literally contains "<image>" must not add an image slot, or the
number of `<image>` tokens would stop matching the number of images. When the
sentencepiece model lacks them they are appended after its vocabulary (ids
V and V+1), so the LM vocabulary grows by 2; when it has them (as
user-defined pieces) their ids are used and filtered out of encoded text.

`Tokenizer.load` also takes a Hugging Face `tokenizer.json` (or a directory
holding one and no tokenizer.model): the byte-level BPE of GPT-NeoX, Pythia,
RedPajama-INCITE and MPT has no sentencepiece model. See `HFTokenizer`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Optional, Sequence, Union

import sentencepiece as spm

IMAGE_PIECE = "<image>"
EOC_PIECE = "<EOC>"
# OpenFlamingo's end of chunk; an HF tokenizer that has it and no <EOC> uses it as <EOC>.
OPENFLAMINGO_EOC_PIECE = "<|endofchunk|>"


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
  """The ids the model and the data pipeline agree on."""
  vocab_size: int  # LM vocabulary, appended special tokens included
  bos_id: int
  eos_id: int
  pad_id: int  # padding is masked by position, so it may equal eos_id
  image_token_id: int
  eoc_token_id: int
  # Sequences start with BOS: training layouts and prompts alike (False for the HF
  # tokenizers OpenFlamingo feeds without one: GPT-NeoX, MPT).
  add_bos: bool = True

  def __post_init__(self):
    for name in ("bos_id", "eos_id", "pad_id", "image_token_id", "eoc_token_id"):
      v = getattr(self, name)
      if not 0 <= v < self.vocab_size:
        raise ValueError(f"TokenizerInfo.{name} = {v} is outside the vocabulary "
                         f"[0, {self.vocab_size})")
    if self.image_token_id == self.eoc_token_id:
      raise ValueError("TokenizerInfo.image_token_id and eoc_token_id must differ, both are "
                       f"{self.image_token_id}")
    special = {self.image_token_id, self.eoc_token_id}
    for name in ("bos_id", "eos_id", "pad_id"):
      if getattr(self, name) in special:
        raise ValueError(f"TokenizerInfo.{name} = {getattr(self, name)} collides with "
                         "<image> or <EOC>")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TokenizerInfo":
    """The inverse of to_dict; add_bos may be absent (files written before it: True)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    missing = names - set(d) - {"add_bos"}
    if unknown or missing:
      raise ValueError(f"TokenizerInfo dict: unknown keys {sorted(unknown)}, missing keys "
                       f"{sorted(missing)}")
    return cls(**{k: bool(v) if k == "add_bos" else int(v) for k, v in d.items()})



def decode_ids(ids: Sequence[int], info: TokenizerInfo, pieces: tuple[str, str], size: int,
               decode_run) -> str:
  """Ids -> text for both tokenizers: runs of ordinary ids through decode_run,
  <image>/<EOC> as their pieces, BOS/EOS/PAD dropped, anything else an error."""
  names = {info.image_token_id: pieces[0], info.eoc_token_id: pieces[1]}
  drop = {info.bos_id, info.eos_id, info.pad_id}
  out, run = [], []
  for i in (int(x) for x in ids):
    if i in names or i in drop or not 0 <= i < size:
      if run:
        out.append(decode_run(run))
        run = []
      if i in names:
        out.append(names[i])
      elif i not in drop:
        raise ValueError(f"token id {i} is outside the vocabulary [0, {info.vocab_size})")
    else:
      run.append(i)
  if run:
    out.append(decode_run(run))
  return "".join(out)


class Tokenizer:
  """Text <-> ids over a sentencepiece model; picklable for grain worker processes."""

  def __init__(self, model_proto: bytes, *, image_piece: str = IMAGE_PIECE,
               eoc_piece: str = EOC_PIECE, source: str = "<bytes>"):
    self._proto = bytes(model_proto)
    self._pieces = (image_piece, eoc_piece)
    self._source = source
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError
      raise ValueError(f"{source}: not a sentencepiece model ({e})") from e
    self.info = self._make_info(image_piece, eoc_piece)
    self._special = frozenset({self.info.image_token_id, self.info.eoc_token_id})

  @classmethod
  def load(cls, path: str, **kwargs) -> Union["Tokenizer", "HFTokenizer"]:
    """A sentencepiece .model, or a HF tokenizer.json / a directory (see `HFTokenizer`).

    A directory with a tokenizer.model loads that (Llama ships both files).
    """
    if path.endswith(".json") or (os.path.isdir(path) and not os.path.isfile(
        os.path.join(path, "tokenizer.model"))):
      return HFTokenizer.load(path, **kwargs)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.model")
    try:
      with open(path, "rb") as f:
        proto = f.read()
    except OSError as e:
      raise ValueError(f"cannot read tokenizer model {path!r}: {e}") from e
    return cls(proto, source=path, **kwargs)

  def _make_info(self, image_piece: str, eoc_piece: str) -> TokenizerInfo:
    sp = self._sp
    n = sp.get_piece_size()
    for name, tid in (("BOS", sp.bos_id()), ("EOS", sp.eos_id())):
      if tid < 0:
        raise ValueError(f"{self._source}: the sentencepiece model has no {name} piece; "
                         f"retrain it with {name.lower()}_id >= 0 (train_tokenizer does)")

    def own_id(piece: str) -> int:
      tid = sp.piece_to_id(piece)
      return tid if sp.id_to_piece(tid) == piece and tid != sp.unk_id() else -1

    image_id, eoc_id = own_id(image_piece), own_id(eoc_piece)
    extra = 0
    if image_id < 0:
      image_id, extra = n + extra, extra + 1
    if eoc_id < 0:
      eoc_id, extra = n + extra, extra + 1
    pad = sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()
    return TokenizerInfo(vocab_size=n + extra, bos_id=sp.bos_id(), eos_id=sp.eos_id(),
                         pad_id=pad, image_token_id=image_id, eoc_token_id=eoc_id)

  @property
  def add_bos(self) -> bool:
    """Sequences start with BOS (the convention of every sentencepiece model here)."""
    return self.info.add_bos

  @property
  def piece_size(self) -> int:
    """Size of the sentencepiece vocabulary alone (without appended tokens)."""
    return self._sp.get_piece_size()

  @property
  def model_proto(self) -> bytes:
    return self._proto

  def encode(self, text: str) -> list[int]:
    """Plain text -> ids; never yields <image> or <EOC>, BOS or EOS."""
    if not isinstance(text, str):
      raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}")
    ids = self._sp.encode(text, out_type=int)
    return [i for i in ids if i not in self._special]

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text; <image> and <EOC> rendered as their pieces, BOS/EOS/PAD dropped."""
    return decode_ids(ids, self.info, self._pieces, self.piece_size, self._sp.decode)

  def __getstate__(self):
    return {"proto": self._proto, "pieces": self._pieces, "source": self._source}

  def __setstate__(self, state):
    self.__init__(state["proto"], image_piece=state["pieces"][0],
                  eoc_piece=state["pieces"][1], source=state["source"])

  def __repr__(self) -> str:
    return f"Tokenizer({self._source!r}, {json.dumps(self.info.to_dict())})"


def _token_name(value) -> Optional[str]:
  """tokenizer_config.json writes special tokens as strings or {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def read_hf_tokenizer_files(path: str) -> tuple[str, str, dict]:
  """(tokenizer.json path, its text, settings) for a tokenizer.json or a directory
  holding one. settings: bos_token / eos_token / pad_token and add_bos (from
  `add_bos_token`) as tokenizer_config.json (then special_tokens_map.json) give them."""
  directory, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) else (
      os.path.dirname(path), path)
  try:
    with open(file) as f:
      text = f.read()
  except OSError as e:
    raise ValueError(f"cannot read tokenizer {file!r}: {e}") from e
  settings: dict = {}
  for meta in ("tokenizer_config.json", "special_tokens_map.json"):
    meta_path = os.path.join(directory, meta)
    if os.path.isfile(meta_path):
      with open(meta_path) as f:
        try:
          cfg = json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
      for key in ("bos_token", "eos_token", "pad_token"):
        if settings.get(key) is None:
          settings[key] = _token_name(cfg.get(key))
      if settings.get("add_bos") is None and isinstance(cfg.get("add_bos_token"), bool):
        settings["add_bos"] = cfg["add_bos_token"]
  return file, text, settings


def post_processor_adds_bos(tok, bos_id: int) -> bool:
  """Whether a `tokenizers.Tokenizer` puts `bos_id` before a text when encoding with
  special tokens (what a HF tokenizer's `__call__` does)."""
  plain = tok.encode("a", add_special_tokens=False).ids
  full = tok.encode("a", add_special_tokens=True).ids
  return full[:1] == [bos_id] and plain[:1] != [bos_id]


# Names tried, in order, when no tokenizer_config.json says which token is BOS/EOS.
_BOS_NAMES = ("<s>", "<|endoftext|>", "<bos>", "<|begin_of_text|>")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


class HFTokenizer:
  """Text <-> ids over a Hugging Face `tokenizers` tokenizer.json; the interface
  (info, encode, decode, piece_size, pickling) is `Tokenizer`'s.

  BOS/EOS/PAD come from the arguments, else tokenizer_config.json (or
  special_tokens_map.json) next to tokenizer.json, else the usual names
  (`<|endoftext|>` for GPT-NeoX: BOS = EOS). PAD defaults to EOS. `<image>` and
  `<EOC>` use the tokenizer's ids when it has them, else are appended after its
  largest id. eoc_piece=None (the default) means `<EOC>`, or OpenFlamingo's
  `<|endofchunk|>` when the tokenizer has that and not `<EOC>` (OpenFlamingo
  adds `<|endofchunk|>` and `<image>`). add_bos: whether sequences start with
  BOS; tokenizer_config.json's `add_bos_token` when it says, else for a tokenizer
  with OpenFlamingo's `<|endofchunk|>` whatever its post-processor does
  (OpenFlamingo feeds what its HF tokenizer gives: no BOS for GPT-NeoX / MPT),
  else True (the convention of the training pipeline).
  """

  def __init__(self, tokenizer_json: str, *, bos_token: Optional[str] = None,
               eos_token: Optional[str] = None, pad_token: Optional[str] = None,
               image_piece: str = IMAGE_PIECE, eoc_piece: Optional[str] = None,
               add_bos: Optional[bool] = None, source: str = "<tokenizer.json>"):
    from tokenizers import Tokenizer as _HFTok
    self._json = tokenizer_json
    self._names = (bos_token, eos_token, pad_token)
    self._source = source
    try:
      parsed = json.loads(tokenizer_json)
    except json.JSONDecodeError as e:
      raise ValueError(f"{source}: not valid JSON ({e})") from None
    if isinstance(parsed, dict) and "image_token_id" in parsed and "model" not in parsed:
      raise ValueError(f"{source} holds flamingo_jax TokenizerInfo ids (train_tokenizer "
                       "writes it), not a Hugging Face tokenizer; load the tokenizer.model "
                       "next to it")
    try:
      self._tok = _HFTok.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises its own Exception subclasses
      raise ValueError(f"{source}: not a Hugging Face tokenizer.json ({e})") from e
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self._size = max(vocab.values()) + 1 if vocab else 0
    if eoc_piece is None:
      eoc_piece = (OPENFLAMINGO_EOC_PIECE if EOC_PIECE not in vocab
                   and OPENFLAMINGO_EOC_PIECE in vocab else EOC_PIECE)
    self._pieces = (image_piece, eoc_piece)
    self.info = self._make_info(vocab)
    info = self.info
    if add_bos is None:
      add_bos = (post_processor_adds_bos(self._tok, info.bos_id)
                 if eoc_piece == OPENFLAMINGO_EOC_PIECE else True)
    self.info = info = dataclasses.replace(info, add_bos=bool(add_bos))
    self._special = frozenset({info.image_token_id, info.eoc_token_id, info.bos_id,
                               info.eos_id, info.pad_id})

  @classmethod
  def load(cls, path: str, **kwargs) -> "HFTokenizer":
    """path: a tokenizer.json, or a directory holding one (and maybe tokenizer_config.json)."""
    file, text, settings = read_hf_tokenizer_files(path)
    for key, value in settings.items():
      kwargs.setdefault(key, value)
    return cls(text, source=file, **kwargs)

  @property
  def add_bos(self) -> bool:
    """Whether sequences (and prompts) start with BOS."""
    return self.info.add_bos



  def _id(self, vocab: dict, name: str, what: str) -> int:
    if name not in vocab:
      raise ValueError(f"{self._source}: {what} token {name!r} is not in the vocabulary")
    return vocab[name]

  def _make_info(self, vocab: dict) -> TokenizerInfo:
    bos, eos, pad = self._names

    def pick(given, candidates, what):
      if given is not None:
        return self._id(vocab, given, what)
      for name in candidates:
        if name in vocab:
          return vocab[name]
      raise ValueError(f"{self._source}: no {what} token: none of {list(candidates)} is in "
                       f"the vocabulary and no tokenizer_config.json names one; pass "
                       f"{what.lower()}_token=")

    bos_id = pick(bos, _BOS_NAMES, "BOS")
    eos_id = pick(eos, _EOS_NAMES, "EOS")
    pad_id = self._id(vocab, pad, "PAD") if pad is not None else eos_id
    n, extra = self._size, 0
    image_id = vocab.get(self._pieces[0], -1)
    eoc_id = vocab.get(self._pieces[1], -1)
    if image_id < 0:
      image_id, extra = n + extra, extra + 1
    if eoc_id < 0:
      eoc_id, extra = n + extra, extra + 1
    return TokenizerInfo(vocab_size=n + extra, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                         image_token_id=image_id, eoc_token_id=eoc_id)

  @property
  def piece_size(self) -> int:
    """Size of the tokenizer's own vocabulary (largest id + 1, appended tokens excluded)."""
    return self._size

  @property
  def tokenizer_json(self) -> str:
    return self._json

  def encode(self, text: str) -> list[int]:
    """Plain text -> ids; never yields <image>, <EOC>, BOS, EOS or PAD (even when the
    text spells them: they are special tokens of the tokenizer)."""
    if not isinstance(text, str):
      raise TypeError(f"HFTokenizer.encode expects str, got {type(text).__name__}")
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return [i for i in ids if i not in self._special]

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text; <image> and <EOC> rendered as their pieces, BOS/EOS/PAD dropped."""
    return decode_ids(ids, self.info, self._pieces, self._size,
                      lambda run: self._tok.decode(run, skip_special_tokens=False))

  def __getstate__(self):
    return {"json": self._json, "names": self._names, "pieces": self._pieces,
            "add_bos": self.info.add_bos, "source": self._source}

  def __setstate__(self, state):
    bos, eos, pad = state["names"]
    self.__init__(state["json"], bos_token=bos, eos_token=eos, pad_token=pad,
                  image_piece=state["pieces"][0], eoc_piece=state["pieces"][1],
                  add_bos=state.get("add_bos"), source=state["source"])

  def __repr__(self) -> str:
    return f"HFTokenizer({self._source!r}, {json.dumps(self.info.to_dict())})"
