"""Dropout flavors that Keras lacks."""
