"""Argument checks shared across tfnorm, with Keras-style messages."""

import numpy as np


def positive_int(value, name):
    """`value` as an int, or a `ValueError` saying what was expected.

    Booleans and floats are refused even when they equal a whole number:
    `True` or `2.0` given for a count is more likely a mistake than intent.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < 1
    ):
        raise ValueError(
            f"Argument `{name}` must be a positive integer. "
            f"Received: {name}={value!r}"
        )
    return int(value)
