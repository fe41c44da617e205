"""The Flamingo trainer: frozen vision and LM, trained resampler and gated cross-attention."""
