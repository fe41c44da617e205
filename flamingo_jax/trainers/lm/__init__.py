"""Text-only pretraining of the decoder LM (the demo's frozen LM) and its corpus pipeline."""
