"""Defects found in review: float32 rounding of rates, integer inputs,
and MC dropout on models with nothing to sample."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfnorm


@pytest.mark.parametrize(
    "factory",
    [
        lambda rate: tfnorm.DropPath(rate),
        lambda rate: tfnorm.Uout(rate),
        lambda rate: tfnorm.DropBlock2D(rate, block_size=2),
    ],
    ids=["DropPath", "Uout", "DropBlock2D"],
)
def test_rate_that_rounds_to_one_in_float32_is_rejected(factory):
    # 0.99999999 < 1 as a Python float but equals 1.0 in float32, where
    # the layer keeps it, and would divide by zero.
    message = (
        "`rate` must be a number in the range [0, 1). Received: rate=0.99999999"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        factory(0.99999999)


@pytest.mark.parametrize(
    "layer,shape",
    [
        (tfnorm.DropPath(0.5, seed=0), (4, 3)),
        (tfnorm.Uout(0.5, seed=0), (4, 3)),
        (tfnorm.DropBlock2D(0.5, block_size=2, seed=0), (2, 4, 4, 1)),
    ],
    ids=["DropPath", "Uout", "DropBlock2D"],
)
def test_integer_inputs_are_an_error_in_training(layer, shape):
    x = np.full(shape, 10, "int32")
    name = type(layer).__name__
    message = (
        f"{name} needs floating point inputs in training; cast them first "
        "(e.g. with a Rescaling layer). Received: inputs.dtype=int32"
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        layer(x, training=True)
    # Inference stays the exact identity, as for Keras's Dropout.
    np.testing.assert_array_equal(layer(x, training=False), x)


def test_mc_predict_warns_when_nothing_is_sampled():
    model = keras.Sequential(
        [
            keras.Input((3, 6)),
            keras.layers.LSTM(4, dropout=0.5, recurrent_dropout=0.5),
            keras.layers.Dense(1),
        ],
        name="rnn",
    )
    x = np.ones((5, 3, 6), "float32")
    with pytest.warns(UserWarning, match="found no dropout layer in model"):
        result = tfnorm.mc_predict(model, x, samples=3)
    np.testing.assert_array_equal(result["std"], 0.0)


def test_mc_predict_rejects_empty_inputs():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dropout(0.5), keras.layers.Dense(1)]
    )
    message = "`x` must hold at least one example. Received: x with shape"
    with pytest.raises(ValueError, match=re.escape(message)):
        tfnorm.mc_predict(model, np.zeros((0, 3), "float32"))


def test_numpy_integer_block_size_is_accepted():
    layer = tfnorm.DropBlock2D(0.1, block_size=np.int64(3))
    assert layer.get_config()["block_size"] == 3
    assert type(layer.get_config()["block_size"]) is int


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: tfnorm.DropBlock2D(0.3, 3, seed=0), (4, 8, 8, 3)),
        (lambda: tfnorm.DropPath(0.5, seed=0), (4, 8, 8, 3)),
        (lambda: tfnorm.Uout(0.3, seed=0), (4, 8, 8, 3)),
        (
            lambda: tfnorm.DropConnect(keras.layers.Dense(4), 0.5, seed=0),
            (4, 12),
        ),
        (
            lambda: tfnorm.ConcreteDropout(keras.layers.Dense(4), seed=0),
            (4, 12),
        ),
    ],
    ids=["dropblock", "droppath", "uout", "dropconnect", "concrete"],
)
def test_training_as_a_tensor_acts_like_the_bool(make, shape):
    # `if not training` raised OperatorNotAllowedInGraphError for a
    # tensor inside tf.function; BN accepts one, so the dropout layers do.
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    by_tensor, by_bool = make(), make()
    # Inference draws nothing: both build, with the same wrapped weights.
    by_tensor(x, training=False)
    by_bool(x, training=False)
    by_bool.set_weights(by_tensor.get_weights())

    @tf.function
    def with_tensor(a, training):
        return by_tensor(a, training=training)

    @tf.function
    def with_bool(a):
        return by_bool(a, training=True)

    trained = with_tensor(x, tf.constant(True)).numpy()
    np.testing.assert_array_equal(trained, with_bool(x).numpy())
    inferred = with_tensor(x, tf.constant(False)).numpy()
    np.testing.assert_array_equal(
        inferred, by_tensor(x, training=False).numpy()
    )
    assert not np.array_equal(trained, inferred)
