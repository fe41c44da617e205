"""Rotary position embeddings (RoPE) and their long-context frequency scalings.

Rotate-half convention (Llama, GPT-NeoX, Mistral, Qwen2, Gemma): the first
and second halves of the rotated dims form the (x, y) pairs. Frequencies are
base^(-2i/d) for i < d/2, then rescaled by `LMConfig.rope_scaling`:
  none    as is
  linear  every frequency / factor (positions interpolated)
  llama3  Llama 3.1's: wavelengths longer than original_max_length /
          low_freq_factor are divided by factor, shorter than
          original_max_length / high_freq_factor kept, and the band in between
          interpolated smoothly (transformers' `_compute_llama3_parameters`)
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from flamingo_jax.models.config import LMConfig

ROPE_SCALINGS = ("none", "linear", "llama3")


def rotary_frequencies(dim: int, base: float, scaling: str = "none", factor: float = 1.0,
                       low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                       original_max_length: int = 8192) -> np.ndarray:
  """[dim // 2] float32 inverse frequencies (radians per position) for `dim` rotated dims.

  Computed in numpy float32 (a constant of the config, as transformers' inv_freq).
  """
  inv = (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
         ).astype(np.float32)
  if scaling == "none":
    return inv
  if scaling == "linear":
    return (inv / np.float32(factor)).astype(np.float32)
  if scaling == "llama3":
    low_wavelen = original_max_length / low_freq_factor
    high_wavelen = original_max_length / high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original_max_length / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f"LMConfig.rope_scaling is {scaling!r}; expected one of {ROPE_SCALINGS}")


def config_frequencies(c: LMConfig) -> np.ndarray:
  """[rotary dims // 2] inverse frequencies of an LM config."""
  return rotary_frequencies(c.rotary_dim or c.head_dim, c.rotary_base, c.rope_scaling,
                            c.rope_scaling_factor, c.rope_low_freq_factor,
                            c.rope_high_freq_factor, c.rope_original_max_length)


def apply_rotary(x, positions, inv_freq):
  """x [B, L, H, Dh], positions [B, L] int, inv_freq [R/2] -> x with its first R dims rotated.

  R = 2 * len(inv_freq) <= Dh; the remaining Dh - R dims pass through
  (GPT-NeoX's rotary_pct). Angles and the rotation are computed in float32.
  """
  rot = 2 * inv_freq.shape[0]
  half = rot // 2
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, L, R/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  xf = x[..., :rot].astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
  if rot == x.shape[-1]:
    return out
  return jnp.concatenate([out, x[..., rot:]], axis=-1)
