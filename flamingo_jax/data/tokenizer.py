"""A sentencepiece tokenizer with Flamingo's special tokens made explicit.

`<image>` and `<EOC>` (end of chunk) are never produced by encoding text: a
caption that literally contains "<image>" must not add an image slot, or the
number of `<image>` tokens would stop matching the number of images. When the
sentencepiece model lacks them they are appended after its vocabulary (ids
V and V+1), so the LM vocabulary grows by 2; when it has them (as
user-defined pieces) their ids are used and filtered out of encoded text.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Sequence

import sentencepiece as spm

IMAGE_PIECE = "<image>"
EOC_PIECE = "<EOC>"


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
  """The ids the model and the data pipeline agree on."""
  vocab_size: int  # LM vocabulary, appended special tokens included
  bos_id: int
  eos_id: int
  pad_id: int  # padding is masked by position, so it may equal eos_id
  image_token_id: int
  eoc_token_id: int

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

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TokenizerInfo":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    missing = names - set(d)
    if unknown or missing:
      raise ValueError(f"TokenizerInfo dict: unknown keys {sorted(unknown)}, missing keys "
                       f"{sorted(missing)}")
    return cls(**{k: int(v) for k, v in d.items()})


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
  def load(cls, path: str, **kwargs) -> "Tokenizer":
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
    info = self.info
    names = {info.image_token_id: self._pieces[0], info.eoc_token_id: self._pieces[1]}
    drop = {info.bos_id, info.eos_id, info.pad_id}
    out, run = [], []
    for i in (int(x) for x in ids):
      if i in names or i in drop or not 0 <= i < self.piece_size:
        if run:
          out.append(self._sp.decode(run))
          run = []
        if i in names:
          out.append(names[i])
        elif i not in drop:
          raise ValueError(f"token id {i} is outside the vocabulary [0, {info.vocab_size})")
      else:
        run.append(i)
    if run:
      out.append(self._sp.decode(run))
    return "".join(out)

  def __getstate__(self):
    return {"proto": self._proto, "pieces": self._pieces, "source": self._source}

  def __setstate__(self, state):
    self.__init__(state["proto"], image_piece=state["pieces"][0],
                  eoc_piece=state["pieces"][1], source=state["source"])

  def __repr__(self) -> str:
    return f"Tokenizer({self._source!r}, {json.dumps(self.info.to_dict())})"
