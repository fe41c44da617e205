"""Image-causal masking on hand-built sequences: exactly which image each token sees."""
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import masking

I = 9  # <image>
E = 8  # <EOC>


def phi(tokens, next_image=None):
  t = jnp.array([tokens])
  n = None if next_image is None else jnp.array([next_image])
  return np.asarray(masking.phi(t, I, n))[0].tolist()


def test_no_image():
  assert phi([1, 2, 3, 4]) == [0, 0, 0, 0]
  assert phi([1, 2, 3, 4], next_image=True) == [0, 0, 0, 0]


def test_one_image_image_token_sees_its_own_image():
  assert phi([1, I, 5, 6]) == [0, 1, 1, 1]


def test_text_before_first_image_gets_nothing():
  assert phi([1, 5, 6, E, I, 7, 8]) == [0, 0, 0, 0, 1, 1, 1]


def test_three_images():
  toks = [1, I, 5, E, I, 6, 7, E, I, 8, E]
  assert phi(toks) == [0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]


def test_adjacent_images():
  assert phi([1, I, I, 5, I]) == [0, 1, 2, 2, 3]


def test_next_image_mode():
  toks = [1, 5, E, I, 6, 7, E, I, 8, E]
  assert phi(toks, next_image=True) == [1, 1, 1, 1, 2, 2, 2, 2, 0, 0]
  # The flag is per example.
  t = jnp.array([toks, toks])
  got = np.asarray(masking.phi(t, I, jnp.array([False, True])))
  assert got[0].tolist() == phi(toks)
  assert got[1].tolist() == phi(toks, next_image=True)


def test_next_image_adjacent():
  assert phi([1, I, I, 5, I], next_image=True) == [1, 1, 2, 3, 3]


def test_visual_attention_mask_last_and_all():
  p = jnp.array([[0, 1, 2, 2]])
  last = np.asarray(masking.visual_attention_mask(p, num_images=3, tokens_per_image=2))[0]
  assert last.astype(int).tolist() == [
      [0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [0, 0, 1, 1, 0, 0],
      [0, 0, 1, 1, 0, 0],
  ]
  allp = np.asarray(masking.visual_attention_mask(p, 3, 2, attend_previous="all"))[0]
  assert allp.astype(int).tolist() == [
      [0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [1, 1, 1, 1, 0, 0],
      [1, 1, 1, 1, 0, 0],
  ]
  with pytest.raises(ValueError, match="attend_previous"):
    masking.visual_attention_mask(p, 3, 2, attend_previous="some")
