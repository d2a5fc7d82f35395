"""Keras callbacks that drive tfnorm layers during training."""
