"""Token layouts and loss masks: pure functions of token ids, tested by hand.

Pairs and videos:  <BOS><image>caption<EOC><EOS>
Interleaved docs:  <BOS>text<EOC><image>text<EOC><image>text<EOC><EOS>

<BOS> is there when the tokenizer's info.add_bos says so (a converted OpenFlamingo
model's GPT-NeoX / MPT tokenizer has none, and its prompts neither: training matches).

<EOC> ends a chunk of text: it goes before every <image> that follows
something (text or another image) and at the end of the document before
<EOS>. An <image> directly after <BOS> has nothing to end, so it has no
<EOC>; a window that would start with "<EOC><image>" starts at the <image>.

A sequence of L model positions is L+1 tokens: tokens = seq[:L],
targets = seq[1:], and position l predicts targets[l]. Documents are cut to a
window: <BOS> followed by L body tokens (or L + 1 body tokens without <BOS>) from a
start chosen so that at least
one <image> is an input token. Only the first `max_images` images of the
window are kept; the others, and images whose <image> would only be a target
(the last slot), are removed together with their <EOC>, and the window fills
up with the text after them.

loss_mask is 0 at padding, at targets equal to <image> (the model cannot
predict where a picture goes), and, per `mask_text_before_first_image`, at
targets before the first <image> (text that sees no image unless next_image).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

from flamingo_jax.data.tokenizer import TokenizerInfo

Item = Union[int, Sequence[int]]  # an image index, or the token ids of a text


@dataclasses.dataclass
class Layout:
  tokens: np.ndarray  # int32 [L]
  targets: np.ndarray  # int32 [L]
  loss_mask: np.ndarray  # float32 [L]
  images: list[int]  # document image index of each <image> token, in order
  stats: dict[str, int] = dataclasses.field(default_factory=dict)


def mask_before_first_image(mode: str, next_image: bool) -> bool:
  if mode == "always":
    return True
  if mode == "unless_next_image":
    return not next_image
  if mode == "never":
    return False
  raise ValueError(f"mask_text_before_first_image must be always, unless_next_image or "
                   f"never, got {mode!r}")


def prefix(info: TokenizerInfo) -> list[int]:
  """What every sequence starts with: [<BOS>], or [] when the tokenizer adds none."""
  return [info.bos_id] if info.add_bos else []


def finish(seq: Sequence[int], info: TokenizerInfo, seq_len: int,
           mask_before_image: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """L+1 (or fewer) tokens -> tokens [L], targets [L], loss_mask [L]."""
  if len(seq) > seq_len + 1:
    raise ValueError(f"sequence of {len(seq)} tokens exceeds seq_len + 1 = {seq_len + 1}")
  valid = len(seq)
  padded = np.full(seq_len + 1, info.pad_id, np.int32)
  padded[:valid] = seq
  tokens, targets = padded[:-1], padded[1:]
  mask = (np.arange(seq_len) + 1 < valid) & (targets != info.image_token_id)
  if mask_before_image:
    is_image = tokens == info.image_token_id
    first = int(np.argmax(is_image)) if is_image.any() else seq_len
    mask[:first] = False
  return tokens.copy(), targets.copy(), mask.astype(np.float32)


def captioned(caption: Sequence[int], info: TokenizerInfo, seq_len: int,
              overlong: str = "truncate") -> Optional[Layout]:
  """<BOS><image>caption<EOC><EOS>; None when too long and overlong='skip'.

  Truncation keeps the first L+1 tokens, so a cut caption has no <EOC>: the
  model is never taught to end a caption where it was cut.
  """
  seq = [*prefix(info), info.image_token_id, *caption, info.eoc_token_id, info.eos_id]
  stats = {}
  if len(seq) > seq_len + 1:
    if overlong == "skip":
      return None
    seq = seq[:seq_len + 1]
    stats["truncated_text"] = 1
  tokens, targets, mask = finish(seq, info, seq_len, mask_before_image=False)
  return Layout(tokens, targets, mask, [0], stats)


def interleaved_body(items: Sequence[Item], info: TokenizerInfo
                     ) -> tuple[list[int], list[tuple[int, int]]]:
  """Document items -> (body tokens after <BOS>, [(position of <image>, image index)])."""
  body: list[int] = []
  slots: list[tuple[int, int]] = []
  for item in items:
    if isinstance(item, (int, np.integer)):
      if body:
        body.append(info.eoc_token_id)
      slots.append((len(body), int(item)))
      body.append(info.image_token_id)
    else:
      body.extend(int(t) for t in item)
  body += [info.eoc_token_id, info.eos_id]
  return body, slots


def window_starts(body_len: int, image_positions: Sequence[int], seq_len: int,
                  bos: bool = True) -> np.ndarray:
  """Body offsets s whose window prefix + body[s:s + L + 1 - b] has an <image> as an
  input token, b = len(prefix) (1 with <BOS>, 0 without).

  An <image> at body position p is input token b + p - s <= L - 1 when
  p - L + 1 + b <= s <= p. Windows never start past max(0, body_len - (L + 1 - b)),
  so a window is full whenever the document is long enough.
  """
  b = int(bos)
  last = max(0, body_len - (seq_len + 1 - b))
  ranges = [np.arange(max(0, p - seq_len + 1 + b), min(p, last) + 1) for p in image_positions]
  if not ranges:
    return np.zeros((0,), np.int64)
  return np.unique(np.concatenate(ranges))


def fill_window(body: Sequence[int], slots: Sequence[tuple[int, int]], start: int,
                info: TokenizerInfo, seq_len: int, max_images: int
                ) -> tuple[list[int], list[int], dict[str, int]]:
  """prefix + body from `start`, images beyond the limits removed -> (seq, images, stats)."""
  if 0 <= start + 1 < len(body) and body[start] == info.eoc_token_id and \
      body[start + 1] == info.image_token_id:
    start += 1
  image_at = dict(slots)
  seq = prefix(info)
  kept: list[int] = []
  stats: dict[str, int] = {}

  def drop(reason):
    stats[f"dropped_image/{reason}"] = stats.get(f"dropped_image/{reason}", 0) + 1

  for p, _ in slots:
    if p < start:
      drop("outside_window")
  i = start
  while len(seq) < seq_len + 1 and i < len(body):
    tok = body[i]
    if i in image_at:
      if len(kept) < max_images and len(seq) < seq_len:
        seq.append(tok)
        kept.append(image_at[i])
      else:
        drop("over_max_images" if len(kept) >= max_images else "outside_window")
        if i > start and body[i - 1] == info.eoc_token_id and seq[-1] == info.eoc_token_id:
          seq.pop()
    else:
      seq.append(tok)
    i += 1
  for p, _ in slots:
    if p >= i:
      drop("outside_window")
  return seq, kept, stats


def interleaved(items: Sequence[Item], info: TokenizerInfo, seq_len: int, max_images: int,
                mask_mode: str, next_image: bool, rng: Optional[np.random.Generator] = None,
                start: Optional[int] = None) -> Optional[Layout]:
  """A document cut to a window; None when it has no image.

  The window start is `start` if given, else uniform over `window_starts`
  with `rng`, else (evaluation) the earliest one.
  """
  body, slots = interleaved_body(items, info)
  if not slots:
    return None
  if start is None:
    starts = window_starts(len(body), [p for p, _ in slots], seq_len, bos=info.add_bos)
    start = int(rng.choice(starts)) if rng is not None else int(starts[0])
  seq, kept, stats = fill_window(body, slots, start, info, seq_len, max_images)
  tokens, targets, mask = finish(seq, info, seq_len,
                                 mask_before_first_image(mask_mode, next_image))
  return Layout(tokens, targets, mask, kept, stats)
