"""DropConnect."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.contract import check_layer_contract
from tfnorm.dropout import DropConnect


def _used_rate(rate):
    # DropConnect draws 16-bit numbers: the rate it applies is rounded.
    return round(rate * 65536) / 65536


def test_contract_dense(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 7)).astype("float32")
    check_layer_contract(
        lambda: DropConnect(keras.layers.Dense(5), rate=0.3, seed=1),
        x,
        tmp_path,
        identity=False,
    )


def test_contract_conv2d(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 3)).astype("float32")
    check_layer_contract(
        lambda: DropConnect(keras.layers.Conv2D(4, 3), rate=0.3, seed=1),
        x,
        tmp_path,
        identity=False,
    )


@pytest.mark.parametrize("kind", ["dense", "conv2d"])
def test_expected_output_equals_undropped_layer(kind):
    rate = 0.3
    p = _used_rate(rate)
    rng = np.random.default_rng(2)
    if kind == "dense":
        inner = keras.layers.Dense(2048, use_bias=False)
        x = rng.normal(size=(1, 512)).astype("float32")
    else:
        inner = keras.layers.Conv2D(2048, 3, use_bias=False)
        x = rng.normal(size=(1, 3, 3, 64)).astype("float32")
    layer = DropConnect(inner, rate=rate, seed=3)
    y = np.asarray(layer(x, training=True), np.float64).ravel()
    kernel = np.asarray(inner.kernel, np.float64).reshape(-1, 2048)
    terms = x.reshape(-1, 1).astype(np.float64) * kernel
    expected = terms.sum(axis=0)
    np.testing.assert_allclose(
        np.asarray(layer(x), np.float64).ravel(), expected, rtol=1e-4, atol=1e-4
    )
    # Each unit is a sum of independent dropped terms: z-scores are about
    # standard normal, and units are independent of each other.
    sd = np.sqrt(p / (1 - p) * np.sum(terms**2, axis=0))
    z = (y - expected) / sd
    assert abs(z.mean()) < 4 / np.sqrt(z.size), f"mean z-score {z.mean()}"
    assert abs(z.var() - 1) < 4 * np.sqrt(2 / z.size), f"z variance {z.var()}"


def test_gradient_reaches_the_kernel_through_the_mask():
    rate = 0.4
    inner = keras.layers.Dense(256, use_bias=False)
    layer = DropConnect(inner, rate=rate, seed=4)
    x = tf.ones((1, 256))
    with tf.GradientTape() as tape:
        y = layer(x, training=True)
        loss = tf.reduce_sum(y)
    grad = np.asarray(tape.gradient(loss, inner.kernel))
    # d loss / d W_ij = m_ij / (1 - p): zeros where dropped.
    values = np.unique(np.round(grad, 5))
    np.testing.assert_allclose(values, [0.0, 1 / (1 - _used_rate(rate))], 1e-5)
    observed = np.mean(grad == 0)
    stderr = np.sqrt(rate * (1 - rate) / grad.size)
    assert abs(observed - rate) < 4 * stderr, f"dropped fraction {observed}"


def test_rate_zero_and_inference_are_exact_identity():
    inner = keras.layers.Dense(8)
    x = np.random.default_rng(5).normal(size=(3, 4)).astype("float32")
    reference = np.asarray(inner(x))
    np.testing.assert_array_equal(DropConnect(inner, rate=0.5)(x), reference)
    np.testing.assert_array_equal(
        DropConnect(inner, rate=0.0)(x, training=True), reference
    )


def test_xla_fit_changes_the_kernel():
    model = keras.Sequential(
        [keras.Input((4,)), DropConnect(keras.layers.Dense(2), 0.5, seed=6)]
    )
    model.compile("sgd", "mse", jit_compile=True)
    before = model.get_weights()[1].copy()
    model.fit(np.ones((8, 4)), np.ones((8, 2)), verbose=0)
    assert not np.array_equal(before, model.get_weights()[1])


def test_activity_regularizer_of_the_wrapped_layer_is_kept():
    layer = DropConnect(
        keras.layers.Dense(3, activity_regularizer="l2"), rate=0.2
    )
    layer(np.ones((2, 4), "float32"), training=True)
    assert len(layer.losses) == 1


def test_layer_without_kernel_is_rejected_at_construction():
    inner = keras.layers.LayerNormalization(name="ln")
    inner.build((None, 4))
    message = (
        "DropConnect wraps a layer with a `kernel` weight, such as Dense, "
        "EinsumDense, Conv2D or Conv2DTranspose (LoRA-enabled layers are not "
        "supported). Received: layer=LayerNormalization(name='ln')"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        DropConnect(inner, rate=0.1)


def test_unbuilt_layer_without_kernel_is_rejected_at_build():
    layer = DropConnect(keras.layers.LayerNormalization(name="ln"), 0.1)
    message = "Received: layer=LayerNormalization(name='ln')"
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(np.ones((2, 3), "float32"))


def test_weightless_layer_is_rejected_at_construction():
    message = "Received: layer=Activation(name='act')"
    with pytest.raises(ValueError, match=re.escape(message)):
        DropConnect(keras.layers.Activation("relu", name="act"), 0.1)


def test_rate_one_rejected_at_construction():
    message = "`rate` must be a number in the range [0, 1). Received: rate=1.0"
    with pytest.raises(ValueError, match=re.escape(message)):
        DropConnect(keras.layers.Dense(2), rate=1.0)
