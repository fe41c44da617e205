"""Token layouts and loss masks, checked exactly on hand-written documents."""
import dataclasses

import numpy as np
import pytest

from data_helpers import BOS, EOC, EOS, IMG, INFO, PAD
from flamingo_jax.data import layouts
from flamingo_jax.data.tokenizer import TokenizerInfo


def test_pair_layout_exact():
  lay = layouts.captioned([10, 11, 12], INFO, seq_len=8)
  assert lay.tokens.tolist() == [BOS, IMG, 10, 11, 12, EOC, EOS, PAD]
  assert lay.targets.tolist() == [IMG, 10, 11, 12, EOC, EOS, PAD, PAD]
  # <image> is never a target; padding never counts.
  assert lay.loss_mask.tolist() == [0, 1, 1, 1, 1, 1, 0, 0]
  assert lay.images == [0] and lay.stats == {}
  assert lay.tokens.dtype == np.int32 and lay.loss_mask.dtype == np.float32


def test_pair_truncation_drops_the_end_tokens_or_skips():
  lay = layouts.captioned(list(range(10, 20)), INFO, seq_len=6)
  assert lay.tokens.tolist() == [BOS, IMG, 10, 11, 12, 13]
  assert lay.targets.tolist() == [IMG, 10, 11, 12, 13, 14]
  assert lay.loss_mask.tolist() == [0, 1, 1, 1, 1, 1]
  assert lay.stats == {"truncated_text": 1}
  assert layouts.captioned(list(range(10, 20)), INFO, 6, overlong="skip") is None
  # Exactly L+1 tokens fit without truncation.
  assert layouts.captioned([10, 11, 12], INFO, seq_len=6).stats == {}


def test_interleaved_body_eoc_placement():
  # Text first: <EOC> before every <image>, and at the end before <EOS>.
  body, slots = layouts.interleaved_body([[10, 11], 0, [12], 1, [13]], INFO)
  assert body == [10, 11, EOC, IMG, 12, EOC, IMG, 13, EOC, EOS]
  assert slots == [(3, 0), (6, 1)]
  # An image right after <BOS> has no chunk to end, so no <EOC>.
  body, slots = layouts.interleaved_body([0, [10], 1, [11]], INFO)
  assert [BOS] + body == [BOS, IMG, 10, EOC, IMG, 11, EOC, EOS]
  # Consecutive images: the second still ends the (empty) chunk of the first.
  body, _ = layouts.interleaved_body([0, 1, [10]], INFO)
  assert body == [IMG, EOC, IMG, 10, EOC, EOS]


DOC = [[10, 11], 0, [12], 1, [13]]  # body: 10 11 EOC IMG 12 EOC IMG 13 EOC EOS


@pytest.mark.parametrize("mode,next_image,mask", [
    ("always", False, [0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0]),
    ("always", True, [0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0]),
    ("unless_next_image", False, [0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0]),
    ("unless_next_image", True, [1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0]),
    ("never", False, [1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0]),
])
def test_interleaved_whole_document_and_masks(mode, next_image, mask):
  lay = layouts.interleaved(DOC, INFO, seq_len=12, max_images=5, mask_mode=mode,
                            next_image=next_image, start=0)
  assert lay.tokens.tolist() == [BOS, 10, 11, EOC, IMG, 12, EOC, IMG, 13, EOC, EOS, PAD]
  assert lay.targets.tolist() == [10, 11, EOC, IMG, 12, EOC, IMG, 13, EOC, EOS, PAD, PAD]
  assert lay.loss_mask.tolist() == mask
  assert lay.images == [0, 1] and lay.stats == {}


def test_window_keeps_first_images_and_removes_the_rest_with_their_eoc():
  lay = layouts.interleaved(DOC, INFO, seq_len=12, max_images=1, mask_mode="never",
                            next_image=False, start=0)
  # The second <EOC><image> is gone and the window fills with the text after it.
  assert lay.tokens.tolist() == [BOS, 10, 11, EOC, IMG, 12, 13, EOC, EOS, PAD, PAD, PAD]
  assert lay.images == [0]
  assert lay.stats == {"dropped_image/over_max_images": 1}
  assert int((lay.tokens == IMG).sum()) == len(lay.images)


def test_window_start_drops_earlier_images_and_never_starts_with_eoc_image():
  lay = layouts.interleaved(DOC, INFO, seq_len=12, max_images=5, mask_mode="never",
                            next_image=False, start=4)  # body[4] = 12
  assert lay.tokens.tolist()[:7] == [BOS, 12, EOC, IMG, 13, EOC, EOS]
  assert lay.images == [1]
  assert lay.stats == {"dropped_image/outside_window": 1}
  # Starting on the <EOC> of an image moves the start to the image itself.
  lay = layouts.interleaved(DOC, INFO, seq_len=12, max_images=5, mask_mode="never",
                            next_image=False, start=2)
  assert lay.tokens.tolist()[:8] == [BOS, IMG, 12, EOC, IMG, 13, EOC, EOS]
  assert lay.images == [0, 1]


def test_window_end_drops_images_past_it_and_an_image_that_would_only_be_a_target():
  # L = 4: an <image> landing in the last slot (a target only) is removed.
  lay = layouts.interleaved(DOC, INFO, seq_len=4, max_images=5, mask_mode="never",
                            next_image=False, start=0)
  assert lay.tokens.tolist() == [BOS, 10, 11, 12]
  assert lay.targets.tolist() == [10, 11, 12, EOC]
  assert lay.images == []
  assert lay.stats == {"dropped_image/outside_window": 2}
  # Which is why random windows only start where an <image> is an input token.
  body, slots = layouts.interleaved_body(DOC, INFO)
  assert layouts.window_starts(len(body), [p for p, _ in slots], 4).tolist() == \
      [1, 2, 3, 4, 5, 6]
  lay = layouts.interleaved(DOC, INFO, seq_len=6, max_images=5, mask_mode="always",
                            next_image=False, start=0)
  assert lay.tokens.tolist() == [BOS, 10, 11, EOC, IMG, 12]
  assert lay.images == [0]
  assert lay.stats == {"dropped_image/outside_window": 1}


def test_no_image_document_has_no_layout():
  assert layouts.interleaved([[10, 11]], INFO, 8, 5, "always", False, start=0) is None


def _random_document(rng):
  """(items, number of images): text runs and images in random order, at least one image."""
  items, n_img = [], 0
  for _ in range(int(rng.integers(1, 12))):
    if rng.random() < 0.35:
      items.append(n_img)
      n_img += 1
    else:
      items.append(rng.integers(10, 50, size=int(rng.integers(1, 30))).tolist())
  if n_img == 0:
    items.append(0)
    n_img = 1
  return items, n_img


def test_random_windows_are_well_formed():
  """Property check over random documents: every window is a valid model input."""
  rng = np.random.default_rng(0)
  for _ in range(300):
    items, n_img = _random_document(rng)
    seq_len = int(rng.integers(4, 40))
    max_images = int(rng.integers(1, 4))
    lay = layouts.interleaved(items, INFO, seq_len, max_images, "always",
                              bool(rng.random() < 0.5), rng=rng)
    toks = lay.tokens.tolist()
    assert toks[0] == BOS
    assert 1 <= len(lay.images) <= max_images
    assert toks.count(IMG) == len(lay.images)
    assert lay.images == sorted(lay.images)
    assert toks[1] != EOC or toks[2] != IMG
    np.testing.assert_array_equal(lay.targets[:-1], lay.tokens[1:])
    assert not (lay.loss_mask[lay.targets == IMG]).any()
    # The target after an <image> always counts: no window is entirely masked.
    assert lay.loss_mask.sum() > 0
    dropped = sum(lay.stats.values())
    assert dropped + len(lay.images) == n_img


def test_eval_window_is_the_earliest():
  lay = layouts.interleaved(DOC, INFO, seq_len=4, max_images=5, mask_mode="never",
                            next_image=False, rng=None)
  assert lay.tokens.tolist() == [BOS, 11, EOC, IMG]


# A tokenizer without BOS (a converted OpenFlamingo model's GPT-NeoX / MPT tokenizer):
# sequences start with the document itself, as its prompts do.
NOBOS = dataclasses.replace(INFO, add_bos=False)


def test_pair_layout_without_bos():
  lay = layouts.captioned([10, 11, 12], NOBOS, seq_len=8)
  assert lay.tokens.tolist() == [IMG, 10, 11, 12, EOC, EOS, PAD, PAD]
  assert lay.targets.tolist() == [10, 11, 12, EOC, EOS, PAD, PAD, PAD]
  assert lay.loss_mask.tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
  assert lay.images == [0] and lay.stats == {}
  # L+1 tokens now hold one more caption token before truncation.
  assert layouts.captioned([10, 11, 12, 13], NOBOS, seq_len=6).stats == {}
  assert layouts.captioned([10, 11, 12, 13], INFO, seq_len=6).stats == {"truncated_text": 1}


@pytest.mark.parametrize("mode,mask", [
    ("always", [0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0]),
    ("never", [1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0]),
])
def test_interleaved_whole_document_without_bos(mode, mask):
  lay = layouts.interleaved(DOC, NOBOS, seq_len=12, max_images=5, mask_mode=mode,
                            next_image=False, start=0)
  assert lay.tokens.tolist() == [10, 11, EOC, IMG, 12, EOC, IMG, 13, EOC, EOS, PAD, PAD]
  assert lay.targets.tolist() == [11, EOC, IMG, 12, EOC, IMG, 13, EOC, EOS, PAD, PAD, PAD]
  assert lay.loss_mask.tolist() == mask
  assert lay.images == [0, 1] and lay.stats == {}


def test_windows_without_bos_shift_by_one():
  body, slots = layouts.interleaved_body(DOC, NOBOS)
  images = [p for p, _ in slots]  # <image> at body positions 3 and 6, body of 10
  # Without BOS a window is L + 1 body tokens: <image> at p is input token p - s <= L - 1.
  assert layouts.window_starts(len(body), images, 4, bos=False).tolist() == [0, 1, 2, 3, 4, 5]
  assert layouts.window_starts(len(body), images, 4).tolist() == [1, 2, 3, 4, 5, 6]
  for s in range(6):
    lay = layouts.interleaved(DOC, NOBOS, 4, 5, "never", False, start=s)
    assert IMG in lay.tokens.tolist(), s
  # Start 0 is a window without BOS (the <image> is input 3) but not with one (a target).
  lay = layouts.interleaved(DOC, NOBOS, seq_len=4, max_images=5, mask_mode="never",
                            next_image=False, rng=None)
  assert lay.tokens.tolist() == [10, 11, EOC, IMG]
  assert lay.targets.tolist() == [11, EOC, IMG, 12]
  assert lay.loss_mask.tolist() == [1, 1, 0, 1]
  assert lay.images == [0] and lay.stats == {"dropped_image/outside_window": 1}
  # A window starting at "<EOC><image>" starts at the <image>, with no BOS before it.
  lay = layouts.interleaved(DOC, NOBOS, 4, 5, "never", False, start=5)
  assert lay.tokens.tolist() == [IMG, 13, EOC, EOS] and lay.images == [1]


def test_random_windows_without_bos_are_well_formed():
  rng = np.random.default_rng(1)
  for _ in range(300):
    items, n_img = _random_document(rng)
    seq_len = int(rng.integers(4, 40))
    lay = layouts.interleaved(items, NOBOS, seq_len, int(rng.integers(1, 4)), "always",
                              bool(rng.random() < 0.5), rng=rng)
    toks = lay.tokens.tolist()
    assert BOS not in toks
    assert len(lay.images) >= 1 and toks.count(IMG) == len(lay.images)
    assert toks[0] != EOC or toks[1] != IMG
    np.testing.assert_array_equal(lay.targets[:-1], lay.tokens[1:])
    assert not (lay.loss_mask[lay.targets == IMG]).any() and lay.loss_mask.sum() > 0
    assert sum(lay.stats.values()) + len(lay.images) == n_img


def test_lm_rows_honour_add_bos():
  from flamingo_jax.trainers.lm import corpus as lm_pretrain

  class Tok:
    def __init__(self, info):
      self.info = info

    def encode(self, text):
      return [10 + len(w) for w in text.split()]

  rows = lm_pretrain.token_rows(["a bb", "ccc"] * 3, Tok(NOBOS), seq_len=3)
  assert rows.tolist() == [[11, 12, EOS, 13], [EOS, 11, 12, EOS], [13, EOS, 11, 12]]
  rows = lm_pretrain.token_rows(["a bb", "ccc"] * 2, Tok(INFO), seq_len=3)
  assert rows.tolist() == [[BOS, 11, 12, EOS], [BOS, 13, EOS, BOS], [11, 12, EOS, BOS]]


def test_tokenizer_info_add_bos_round_trips_and_defaults_for_old_files():
  assert TokenizerInfo.from_dict(NOBOS.to_dict()) == NOBOS
  old = {k: v for k, v in INFO.to_dict().items() if k != "add_bos"}
  assert TokenizerInfo.from_dict(old).add_bos
