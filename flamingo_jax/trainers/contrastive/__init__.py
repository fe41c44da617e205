"""Contrastive pretraining of the vision tower (NFNet + BERT-style text tower) and its evaluator."""
