"""Capturing projected per-sample gradients during training."""
