"""Uout."""

import re

import numpy as np
import pytest
import tensorflow as tf

from tests.contract import check_layer_contract
from tfnorm.dropout import Uout


def test_contract(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 5, 3)).astype("float32")
    check_layer_contract(
        lambda: Uout(0.3, seed=1),
        x,
        tmp_path,
        identity=True,
    )


def test_noise_is_uniform_with_mean_one():
    rate = 0.4
    n = 400000
    factor = np.asarray(Uout(rate, seed=2)(np.ones((n, 1)), training=True))
    # U(1 - rate, 1 + rate): mean 1, variance rate^2 / 3.
    assert factor.min() >= 1 - rate and factor.max() <= 1 + rate
    stderr = rate / np.sqrt(3 * n)
    assert abs(factor.mean() - 1.0) < 4 * stderr, f"mean {factor.mean()}"
    variance = factor.var()
    # Variance of a sample variance of a uniform: (mu4 - sigma^4) / n.
    sigma2 = rate**2 / 3
    stderr_var = np.sqrt((rate**4 / 5 - sigma2**2) / n)
    assert abs(variance - sigma2) < 4 * stderr_var, f"variance {variance}"


def test_rate_zero_is_exact_identity():
    x = tf.random.normal((8, 3))
    np.testing.assert_array_equal(Uout(0.0)(x, training=True), x)


def test_inference_is_exact_identity():
    x = tf.random.normal((8, 3))
    assert Uout(0.5)(x) is x


def test_rate_one_rejected_at_construction():
    message = "`rate` must be a number in the range [0, 1). Received: rate=1.0"
    with pytest.raises(ValueError, match=re.escape(message)):
        Uout(1.0)
