"""DropPath and the linear depth rule."""

import re

import numpy as np
import pytest
import tensorflow as tf

from tests.contract import check_layer_contract
from tfnorm.dropout import DropPath
from tfnorm.dropout import stochastic_depth_rates


def test_contract(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 5, 5, 3)).astype("float32")
    check_layer_contract(
        lambda: DropPath(0.3, seed=1), x, tmp_path, identity=True
    )


def test_drops_whole_samples_and_scales_survivors():
    rate = 0.25
    x = np.random.default_rng(1).uniform(1, 2, (4000, 6, 3)).astype("float32")
    y = np.asarray(DropPath(rate, seed=2)(x, training=True))
    dropped = np.all(y == 0, axis=(1, 2))
    kept = np.all(y != 0, axis=(1, 2))
    assert np.all(dropped | kept), "a sample was partly dropped"
    np.testing.assert_allclose(y[kept], x[kept] / (1 - rate), rtol=1e-6)
    stderr = np.sqrt(rate * (1 - rate) / len(x))
    observed = dropped.mean()
    assert abs(observed - rate) < 4 * stderr, f"dropped fraction {observed}"


def test_mean_is_preserved():
    rate = 0.3
    y = np.asarray(DropPath(rate, seed=3)(np.ones((200000, 1)), training=True))
    stderr = np.sqrt(rate / (1 - rate) / len(y))
    assert abs(y.mean() - 1.0) < 4 * stderr, f"mean {y.mean()}"


def test_rate_zero_is_exact_identity():
    x = tf.random.normal((8, 3))
    np.testing.assert_array_equal(DropPath(0.0)(x, training=True), x)


def test_inference_is_exact_identity():
    x = tf.random.normal((8, 3))
    assert DropPath(0.5)(x) is x


def test_xla_and_unknown_batch():
    layer = DropPath(0.5, seed=4)
    fn = tf.function(
        lambda a: layer(a, training=True),
        input_signature=[tf.TensorSpec([None, 4])],
        jit_compile=True,
    )
    y = np.asarray(fn(tf.ones((4000, 4))))
    dropped = np.all(y == 0, axis=1).mean()
    assert abs(dropped - 0.5) < 4 * np.sqrt(0.25 / 4000), dropped


def test_stochastic_depth_rates_follow_the_linear_rule():
    np.testing.assert_allclose(
        stochastic_depth_rates(4, max_rate=0.2), [0.05, 0.1, 0.15, 0.2]
    )
    assert stochastic_depth_rates(1) == [0.5]


@pytest.mark.parametrize("num_blocks", [0, -1, 2.0, True])
def test_stochastic_depth_rates_rejects_bad_num_blocks(num_blocks):
    message = (
        "Argument `num_blocks` must be a positive integer. Received: "
        f"num_blocks="
        f"{num_blocks!r}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        stochastic_depth_rates(num_blocks)


def test_stochastic_depth_rates_rejects_bad_max_rate():
    message = (
        "`max_rate` must be a number in the range [0, 1). "
        "Received: max_rate=1.0"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        stochastic_depth_rates(3, max_rate=1.0)


def test_rate_one_rejected_at_construction():
    message = "`rate` must be a number in the range [0, 1). Received: rate=1.0"
    with pytest.raises(ValueError, match=re.escape(message)):
        DropPath(1.0)


def test_bad_seed_is_rejected():
    message = "`seed` must be an int or None. Received: seed='7'"
    with pytest.raises(ValueError, match=re.escape(message)):
        DropPath(0.1, seed="7")
