"""Image-causal masking: which image each text token cross-attends to.

Pure functions of the token ids, so the data pipeline, the model and the
decoder all agree. Images are numbered 1..N in the order of their `<image>`
tokens; 0 means "no image".

phi(l) for a token at position l:
  * previous-image mode (the paper's default): the last image whose `<image>`
    token is at or before l. The `<image>` token sees its own image (as in
    OpenFlamingo and IDEFICS), text before the first image gets 0.
  * next-image mode (per-example flag `next_image`, drawn with p_next in
    training): the first image whose `<image>` token is at or after l. Text
    after the last image gets 0. The `<image>` token still sees its own image.

With `attend_previous="all"` (paper Table 10 ablation) a token sees every
image 1..phi(l) instead of only image phi(l). With "group" (mllama's
processor, get_cross_attention_token_mask) a run of consecutive `<image>`
tokens is one group: a token sees the images first(l)..phi(l), first(l) the
first image of the run that image phi(l) belongs to (`group_first`); the
group's own `<image>` tokens see their image and the ones before it in the run.

A reset token (`FlamingoConfig.image_reset_token_id`; IDEFICS: `</s>`, which
ends a packed document) cuts the link: in previous-image mode the tokens after
it get 0 until the next `<image>` (the reset token itself keeps its image); in
next-image mode the reset token and the tokens before it (back to the previous
`<image>`) get 0. This is the image_attention_mask IDEFICS's processor builds.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def image_positions(tokens: jax.Array, image_token_id: int) -> jax.Array:
  """[B, L] bool: True at `<image>` tokens."""
  return tokens == image_token_id


def phi(tokens: jax.Array, image_token_id: int,
        next_image: Optional[jax.Array] = None, reset_token_id: int = -1) -> jax.Array:
  """Index (1-based, 0 = none) of the image each token attends to.

  tokens [B, L] int, next_image [B] bool or None -> [B, L] int32.
  reset_token_id >= 0: that token cuts text off from earlier (later) images.
  """
  is_image = image_positions(tokens, image_token_id).astype(jnp.int32)
  count_incl = jnp.cumsum(is_image, axis=-1)  # images at positions <= l
  prev = count_incl
  if reset_token_id >= 0:
    is_reset = tokens == reset_token_id
    prev = jnp.where(after_reset(is_image > 0, is_reset)[0], 0, prev)
  if next_image is None:
    return prev
  # The first image at or after l is image (images strictly before l) + 1.
  total = count_incl[:, -1:]
  nxt = count_incl - is_image + 1
  nxt = jnp.where(nxt <= total, nxt, 0)
  if reset_token_id >= 0:
    nxt = jnp.where(before_reset(is_image > 0, is_reset), 0, nxt)
  return jnp.where(next_image[:, None], nxt, prev).astype(jnp.int32)


def after_reset(is_image: jax.Array, is_reset: jax.Array,
                carry: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Previous-image mode: which tokens a reset token cut off from their image.

  is_image, is_reset [B, L] bool; carry [B] bool: the state before the first
  token (decoding continues a prompt), None = no reset pending. Returns
  (cut [B, L] bool: a reset token lies strictly before l and after the last
  `<image>` at or before l, new carry [B] bool: the state after the last token).
  """
  pos = jnp.arange(is_image.shape[1])
  last_image = jax.lax.cummax(jnp.where(is_image, pos, -1), axis=1)
  last_reset = jax.lax.cummax(jnp.where(is_reset, pos, -1), axis=1)
  before = jnp.concatenate([jnp.full_like(last_reset[:, :1], -1), last_reset[:, :-1]], axis=1)
  # Equal only when both are -1 (no image nor reset yet): the carry decides.
  cut = before > last_image
  end = last_reset[:, -1] > last_image[:, -1]
  if carry is not None:
    cut = cut | ((before == last_image) & carry[:, None])
    end = end | ((last_reset[:, -1] == last_image[:, -1]) & carry)
  return cut, end


def before_reset(is_image: jax.Array, is_reset: jax.Array) -> jax.Array:
  """Next-image mode: [B, L] bool, a reset token at or after l comes before the next `<image>`."""
  length = is_image.shape[1]
  pos = jnp.arange(length)
  next_image = jax.lax.cummin(jnp.where(is_image, pos, length), axis=1, reverse=True)
  next_reset = jax.lax.cummin(jnp.where(is_reset, pos, length), axis=1, reverse=True)
  return next_reset < next_image


def group_first(tokens: jax.Array, image_token_id: int, phi_: jax.Array,
                real: Optional[jax.Array] = None,
                carry: Optional[tuple[jax.Array, jax.Array]] = None
                ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Previous-image mode with groups: the first image (1-based, 0 = none) of the run
  of consecutive `<image>` tokens that image phi_(l) belongs to.

  tokens, phi_ [B, L] (phi_ from `phi` or continued by decoding); real [B, L] bool
  (padding is skipped: it neither breaks nor extends a run); carry: (first [B] int32
  of the last token before these, whether that token was an `<image>` [B] bool),
  None at the start. Returns (first [B, L] int32, the carry after the last token).
  """
  is_image = tokens == image_token_id
  if real is None:
    real = jnp.ones(tokens.shape, bool)
  is_image = is_image & real
  first0, run0 = carry if carry is not None else (
      jnp.zeros(tokens.shape[:1], jnp.int32), jnp.zeros(tokens.shape[:1], bool))
  # whether the last real token before l was an <image>: carried across padding
  pos = jnp.arange(tokens.shape[1])
  last_real = jax.lax.cummax(jnp.where(real, pos, -1), axis=1)
  before = jnp.concatenate([jnp.full_like(last_real[:, :1], -1), last_real[:, :-1]], axis=1)
  prev_image = jnp.where(before >= 0,
                         jnp.take_along_axis(is_image, jnp.maximum(before, 0), axis=1),
                         run0[:, None])
  starts = is_image & ~prev_image
  first = jax.lax.cummax(jnp.where(starts, phi_, 0), axis=1)
  first = jnp.maximum(first, jnp.where(jnp.cumsum(starts, axis=1) > 0, 0, first0[:, None]))
  first = jnp.where(phi_ > 0, first, 0).astype(jnp.int32)
  end_run = jnp.where(last_real[:, -1] >= 0,
                      jnp.take_along_axis(is_image, jnp.maximum(last_real[:, -1:], 0),
                                          axis=1)[:, 0], run0)
  return first, (first[:, -1], end_run)


def visual_attention_mask(phi_: jax.Array, num_images: int, tokens_per_image: int,
                          attend_previous: str = "last",
                          first: Optional[jax.Array] = None,
                          token_mask: Optional[jax.Array] = None) -> jax.Array:
  """Cross-attention mask [B, L, N * n] (True = may attend).

  phi_ [B, L] from `phi`; visual tokens are laid out image-major: visual
  token j belongs to image j // tokens_per_image + 1. first [B, L]: the
  `group_first` of every token (attend_previous "group"). token_mask [B, N * n]
  bool: visual tokens that exist (mllama: not in a padded tile).
  """
  image_of_token = jnp.arange(num_images * tokens_per_image) // tokens_per_image + 1
  lhs = phi_[:, :, None]
  rhs = image_of_token[None, None, :]
  if attend_previous == "last":
    mask = lhs == rhs
  elif attend_previous == "all":
    mask = rhs <= lhs
  elif attend_previous == "group":
    if first is None:
      raise ValueError("attend_previous 'group' needs `first` (masking.group_first)")
    mask = (rhs <= lhs) & (rhs >= first[:, :, None])
  else:
    raise ValueError(f"attend_previous must be 'last', 'all' or 'group', got "
                     f"{attend_previous!r}")
  if token_mask is not None:
    mask = mask & token_mask[:, None, :]
  return mask

