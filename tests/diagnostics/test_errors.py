"""Bad arguments fail with whole, helpful messages."""

import re

import keras
import numpy as np
import pytest

import tfnorm
from tfnorm import diagnostics

X = np.ones((4, 3), "float32")
Y = np.zeros((4, 2), "float32")


def _dense_model():
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="only")],
        name="dense_net",
    )


def _raises(message, function, *args, **kwargs):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        function(*args, **kwargs)


@pytest.mark.parametrize("bad", [[0.1, 0.0], [-0.2], [], [float("nan")]])
def test_step_sizes_must_be_positive(bad):
    message = (
        "Argument `step_sizes` must be a non-empty sequence of positive, "
        f"finite floats. Received: step_sizes={bad!r}"
    )
    _raises(
        message,
        diagnostics.loss_landscape,
        _dense_model(),
        X,
        Y,
        step_sizes=bad,
        loss="mse",
    )
    _raises(message, diagnostics.LossLandscapeCallback, (X, Y), step_sizes=bad)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_period_must_be_a_positive_integer(bad):
    message = (
        "Argument `period` must be a positive integer number of training "
        f"steps. Received: period={bad!r}"
    )
    for callback in (
        diagnostics.InternalCovariateShiftCallback,
        diagnostics.LossLandscapeCallback,
        diagnostics.LayerStatisticsCallback,
    ):
        _raises(message, callback, (X, Y), period=bad)


def test_period_may_be_a_numpy_integer():
    # NumPy scalars are accepted as Keras accepts them.
    for callback in (
        diagnostics.InternalCovariateShiftCallback,
        diagnostics.LossLandscapeCallback,
        diagnostics.LayerStatisticsCallback,
    ):
        probe = callback((X, Y), period=np.int64(5))
        assert probe.period == 5 and type(probe.period) is int


def test_model_without_kernel_layers():
    model = keras.Sequential(
        [keras.Input((3,)), tfnorm.BatchNormalization()], name="bn_only"
    )
    _raises(
        "The model has no layer with a trainable `kernel` (such as Dense or "
        "Conv2D), so there is no layer gradient to compare. "
        "Received: model='bn_only'",
        diagnostics.internal_covariate_shift,
        model,
        X,
        X,
        learning_rate=0.1,
        loss="mse",
    )


def test_unknown_layers():
    _raises(
        "Argument `layers` must name layers with a trainable kernel, among "
        "['only']. Received: layers=['nope']",
        diagnostics.internal_covariate_shift,
        _dense_model(),
        X,
        Y,
        learning_rate=0.1,
        loss="mse",
        layers=["nope"],
    )
    _raises(
        "Argument `layers` must name BN, dropout or kernel layers of the "
        "model, among ['only']. Received: layers=['nope']",
        diagnostics.layer_statistics,
        _dense_model(),
        X,
        layers=["nope"],
    )


@pytest.mark.parametrize("bad", [0.0, -0.1, float("inf"), "0.1"])
def test_learning_rate_must_be_positive(bad):
    message = (
        "Argument `learning_rate` must be a positive, finite float. "
        f"Received: learning_rate={bad!r}"
    )
    _raises(
        message,
        diagnostics.internal_covariate_shift,
        _dense_model(),
        X,
        Y,
        learning_rate=bad,
        loss="mse",
    )
    _raises(
        message,
        diagnostics.InternalCovariateShiftCallback,
        (X, Y),
        learning_rate=bad,
    )


@pytest.mark.parametrize("bad", [1, "yes"])
def test_unroll_must_be_a_bool_or_none(bad):
    message = (
        "Argument `unroll` must be True, False or None (unroll when at most "
        "8 probed layers have preceding layers). "
        f"Received: unroll={bad!r}"
    )
    _raises(
        message,
        diagnostics.internal_covariate_shift,
        _dense_model(),
        X,
        Y,
        learning_rate=0.1,
        loss="mse",
        unroll=bad,
    )
    _raises(
        message, diagnostics.InternalCovariateShiftCallback, (X, Y), unroll=bad
    )


def test_missing_learning_rate_loss_data_and_build():
    model = _dense_model()
    _raises(
        "Pass `learning_rate`, or compile the model with an optimizer whose "
        "current learning rate is then used. Received: learning_rate=None "
        "and no optimizer",
        diagnostics.internal_covariate_shift,
        model,
        X,
        Y,
        loss="mse",
    )
    _raises(
        "No loss to differentiate: pass `loss` or compile the model with "
        "one. Received: loss=None, model.loss=None",
        diagnostics.loss_landscape,
        model,
        X,
        Y,
    )
    _raises(
        "Argument `data` must be a batch `(x, y)` or an iterable of batches "
        "to probe on. Received: data=None",
        diagnostics.LossLandscapeCallback,
        None,
    )
    unbuilt = keras.Sequential([keras.layers.Dense(2)], name="lazy")
    _raises(
        "The model must be built (called once, or created with an `Input`) "
        "before it can be probed. Received: model='lazy' with built=False",
        diagnostics.layer_statistics,
        unbuilt,
        X,
    )


def test_loss_of_the_wrong_type():
    with pytest.raises(TypeError) as info:
        diagnostics.loss_landscape(_dense_model(), X, Y, loss=3)
    assert str(info.value) == (
        "Argument `loss` (or the model's compiled loss) must be a callable "
        "`loss(y_true, y_pred)` or a Keras loss name; pass one callable for "
        "a model with several outputs. Received: loss=3"
    )
