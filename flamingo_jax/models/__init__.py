"""Flamingo model components, one concept per module.

  layers.py         Dense / LayerNorm / FFW / attention primitives with logical axes
  masking.py        image-causal masking (phi per token, p_next)
  resampler.py      Perceiver Resampler
  xattn.py          GATED XATTN-DENSE block
  lm.py             decoder-only LM (Chinchilla / Llama / Qwen2 / Gemma / GPT-2 / GPT-NeoX /
                    MPT families) and its one self-attention mask
  rotary.py         rotary position embeddings and their long-context scalings
  vision.py         vision encoders by name (nfnet.py, patch_encoder.py, vit.py register in
                    vision_registry.py)
  flamingo.py       the composite model
  labels.py         frozen / trainable / trainable-without-decay labels per parameter
"""
from flamingo_jax.models.config import xattn_layer_indices
from flamingo_jax.models.flamingo import Flamingo, merged_lm_config, merged_lm_params
from flamingo_jax.models.lm import DecoderLM

__all__ = ["Flamingo", "DecoderLM", "merged_lm_config", "merged_lm_params",
           "xattn_layer_indices"]
