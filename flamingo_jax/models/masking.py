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
image 1..phi(l) instead of only image phi(l).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def image_positions(tokens: jax.Array, image_token_id: int) -> jax.Array:
  """[B, L] bool: True at `<image>` tokens."""
  return tokens == image_token_id


def phi(tokens: jax.Array, image_token_id: int,
        next_image: Optional[jax.Array] = None) -> jax.Array:
  """Index (1-based, 0 = none) of the image each token attends to.

  tokens [B, L] int, next_image [B] bool or None -> [B, L] int32.
  """
  is_image = image_positions(tokens, image_token_id).astype(jnp.int32)
  count_incl = jnp.cumsum(is_image, axis=-1)  # images at positions <= l
  prev = count_incl
  # The first image at or after l is image (images strictly before l) + 1.
  total = count_incl[:, -1:]
  nxt = count_incl - is_image + 1
  nxt = jnp.where(nxt <= total, nxt, 0)
  if next_image is None:
    return prev
  return jnp.where(next_image[:, None], nxt, prev).astype(jnp.int32)


def visual_attention_mask(phi_: jax.Array, num_images: int, tokens_per_image: int,
                          attend_previous: str = "last") -> jax.Array:
  """Cross-attention mask [B, L, N * n] (True = may attend).

  phi_ [B, L] from `phi`; visual tokens are laid out image-major: visual
  token j belongs to image j // tokens_per_image + 1.
  """
  image_of_token = jnp.arange(num_images * tokens_per_image) // tokens_per_image + 1
  lhs = phi_[:, :, None]
  rhs = image_of_token[None, None, :]
  if attend_previous == "last":
    return lhs == rhs
  if attend_previous == "all":
    return rhs <= lhs
  raise ValueError(f"attend_previous must be 'last' or 'all', got {attend_previous!r}")


def count_images(tokens, image_token_id: int):
  """[B] number of `<image>` tokens per example."""
  return jnp.sum(tokens == image_token_id, axis=-1)
