"""ConcreteDropout."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference_dropout as ref
from tests.contract import check_layer_contract
from tfnorm.dropout import ConcreteDropout


def test_contract(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 7)).astype("float32")
    check_layer_contract(
        lambda: ConcreteDropout(keras.layers.Dense(5), seed=1),
        x,
        tmp_path,
        identity=False,
    )


def test_rate_is_a_weight():
    layer = ConcreteDropout(keras.layers.Dense(2), initial_rate=0.2)
    layer(np.ones((3, 4), "float32"), training=True)
    names = {w.name: w for w in layer.weights}
    assert names["rate_logit"].trainable
    assert not names["rate"].trainable
    assert abs(layer.rate - 0.2) < 1e-6
    np.testing.assert_allclose(names["rate"].numpy(), 0.2, rtol=1e-6)


def test_regularizer_matches_the_paper():
    wr, dr, p = 1e-2, 1e-3, 0.3
    inner = keras.layers.Dense(5)
    layer = ConcreteDropout(
        inner, weight_regularizer=wr, dropout_regularizer=dr, initial_rate=p
    )
    layer(np.ones((2, 7), "float32"))
    kernel = np.asarray(inner.kernel, np.float64)
    expected = wr * np.sum(kernel**2) / (1 - p) + dr * 7 * (
        p * np.log(p) + (1 - p) * np.log(1 - p)
    )
    (loss,) = layer.losses
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_regularizer_counts_input_channels_of_transposed_convolutions():
    # A transposed convolution's kernel ends with (filters, inputs): K was
    # read from kernel.shape[-2], the number of filters.
    p = 0.3
    inner = keras.layers.Conv2DTranspose(4, 3)
    layer = ConcreteDropout(
        inner, weight_regularizer=0.0, dropout_regularizer=1.0, initial_rate=p
    )
    layer(np.ones((2, 5, 5, 7), "float32"))
    expected = 7 * (p * np.log(p) + (1 - p) * np.log(1 - p))
    (loss,) = layer.losses
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("logit", [-110.0, 20.0])
def test_saturated_rate_keeps_loss_and_output_finite(logit):
    # In float32, sigmoid is exactly 0 below about -104 and exactly 1 from
    # about 17: 0 * log(0) and 1 / (1 - 1) made the loss and output NaN.
    layer = ConcreteDropout(keras.layers.Dense(2), seed=0)
    x = np.ones((4, 3), "float32")
    layer(x)
    layer.rate_logit.assign(logit)
    y = layer(x, training=True)
    (loss,) = layer.losses
    assert np.isfinite(float(loss)), float(loss)
    assert np.all(np.isfinite(y.numpy()))


@pytest.mark.parametrize("logit", [89.0, 100.0])
def test_overflowing_rate_keeps_the_output_finite(logit):
    # Past logit 88, exp(logit) is inf in float32: the rescaling factor
    # sigmoid(-z) * (1 + exp(logit)) became 0 * inf = NaN. The output is
    # the undropped layer's times the factor, which must stay finite.
    layer = ConcreteDropout(
        keras.layers.Dense(2, kernel_initializer="ones"), seed=0
    )
    x = np.ones((64, 3), "float32")
    layer(x)
    layer.rate_logit.assign(logit)
    y = layer(x, training=True).numpy()
    assert np.all(np.isfinite(y)), y


@pytest.mark.parametrize("logit", [-120.0, 20.0])
def test_saturated_rate_saves_and_loads(tmp_path, logit):
    # get_config reported sigmoid(logit), exactly 0 or 1 in float32, as
    # `initial_rate`, which __init__ rejects: the file saved, then failed
    # to load.
    inputs = keras.Input((3,))
    layer = ConcreteDropout(keras.layers.Dense(2), seed=0, name="concrete")
    model = keras.Model(inputs, layer(inputs))
    layer.rate_logit.assign(logit)
    rate = layer.get_config()["initial_rate"]
    assert 0.0 < rate < 1.0 and np.float32(rate) < 1.0, rate
    path = tmp_path / "concrete.keras"
    model.save(path)
    loaded = keras.saving.load_model(path).get_layer("concrete")
    assert float(loaded.rate_logit.numpy()) == logit


def test_tiny_initial_rate_gives_a_finite_loss():
    layer = ConcreteDropout(keras.layers.Dense(2), initial_rate=1e-50)
    layer(np.ones((4, 3), "float32"), training=True)
    (loss,) = layer.losses
    assert np.isfinite(float(loss)), float(loss)


def test_mean_matches_the_relaxation():
    p, t = 0.2, 0.1
    n = 1024
    inner = keras.layers.Dense(n, use_bias=False, kernel_initializer="identity")
    layer = ConcreteDropout(inner, initial_rate=p, temperature=t, seed=2)
    y = np.asarray(layer(np.ones((400, n), "float32"), training=True))
    expected = ref.concrete_keep_mean(p, t)
    stderr = y.std() / np.sqrt(y.size)
    assert abs(y.mean() - expected) < 4 * stderr, f"mean {y.mean()}"
    # The relaxation keeps the mean within about 1% at t = 0.1.
    assert abs(expected - 1) < 0.02


def test_rate_is_learned():
    layer = ConcreteDropout(keras.layers.Dense(3), seed=3)
    x = tf.ones((16, 4))
    with tf.GradientTape() as tape:
        y = layer(x, training=True)
        loss = tf.reduce_sum(y**2) + tf.add_n(layer.losses)
    grad = tape.gradient(loss, layer.rate_logit)
    assert grad is not None and float(grad) != 0.0


def test_inference_runs_the_layer_unchanged():
    inner = keras.layers.Dense(3)
    x = np.ones((2, 4), "float32")
    layer = ConcreteDropout(inner)
    np.testing.assert_array_equal(layer(x), inner(x))


def test_layer_without_kernel_is_rejected():
    inner = keras.layers.LayerNormalization(name="ln")
    inner.build((None, 4))
    message = (
        "ConcreteDropout wraps a layer with a `kernel` weight, such as Dense, "
        "EinsumDense, Conv2D or Conv2DTranspose (LoRA-enabled layers are not "
        "supported). Received: layer=LayerNormalization(name='ln')"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        ConcreteDropout(inner)


# 1 - 1e-12 rounds to 1 in float32; the message named `rate` for it.
@pytest.mark.parametrize("initial_rate", [0.0, 1.0, -0.5, 1 - 1e-12])
def test_bad_initial_rate_is_rejected(initial_rate):
    message = (
        "`initial_rate` must be a number in the open range (0, 1): its logit "
        f"is the initial weight. Received: initial_rate={initial_rate!r}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        ConcreteDropout(keras.layers.Dense(2), initial_rate=initial_rate)


@pytest.mark.parametrize("temperature", [0, -1.0, float("inf")])
def test_bad_temperature_is_rejected(temperature):
    message = (
        "`temperature` must be a finite positive number. "
        f"Received: temperature={temperature!r}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ConcreteDropout(keras.layers.Dense(2), temperature=temperature)


@pytest.mark.parametrize("name", ["weight_regularizer", "dropout_regularizer"])
@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_bad_regularizer_is_rejected(name, value):
    message = (
        f"`{name}` must be a finite non-negative number. "
        f"Received: {name}={value!r}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ConcreteDropout(keras.layers.Dense(2), **{name: value})
