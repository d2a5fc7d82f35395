"""mc_predict: dropout active, Batch Normalization in inference."""

import re

import keras
import numpy as np
import pytest

import tfnorm
from tests import reference_dropout as ref
from tfnorm.dropout import DropBlock2D
from tfnorm.dropout import DropConnect
from tfnorm.dropout import DropPath
from tfnorm.dropout import Uout
from tfnorm.dropout import mc_predict

_BN_CLASSES = {
    "keras": keras.layers.BatchNormalization,
    "tfnorm": tfnorm.BatchNormalization,
}


def _bn_with_statistics(bn_class, channels):
    """A built BN layer with distinctive moving statistics."""
    bn = bn_class(epsilon=1e-3)
    bn.build((None, channels))
    rng = np.random.default_rng(0)
    bn.set_weights(
        [
            rng.uniform(0.5, 2, channels),  # gamma
            rng.uniform(-1, 1, channels),  # beta
            rng.uniform(2, 4, channels),  # moving_mean
            rng.uniform(3, 5, channels),  # moving_variance
        ]
    )
    return bn


def _bn_reference(bn, x):
    gamma, beta, mean, variance = bn.get_weights()
    return ref.batch_norm_inference(x, mean, variance, gamma, beta, 1e-3)


@pytest.mark.parametrize("bn_kind", ["keras", "tfnorm"])
def test_dropout_after_bn_uses_moving_statistics(bn_kind):
    rate, channels = 0.5, 16
    bn = _bn_with_statistics(_BN_CLASSES[bn_kind], channels)
    model = keras.Sequential(
        [keras.Input((channels,)), bn, keras.layers.Dropout(rate)]
    )
    before = [w.copy() for w in bn.get_weights()]
    x = np.random.default_rng(1).normal(size=(64, channels)).astype("float32")
    result = mc_predict(
        model, x, samples=40, batch_size=24, return_samples=True
    )

    draws = result["samples"]
    assert draws.shape == (40, 64, channels)
    expected = _bn_reference(bn, x) / (1 - rate)
    kept = draws != 0
    np.testing.assert_allclose(
        draws[kept], np.broadcast_to(expected, draws.shape)[kept], rtol=1e-4
    )
    stderr = np.sqrt(rate * (1 - rate) / draws.size)
    observed = 1 - kept.mean()
    assert abs(observed - rate) < 4 * stderr, f"dropped fraction {observed}"
    for a, b in zip(before, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(result["mean"], draws.mean(0), rtol=1e-5)
    np.testing.assert_allclose(
        result["std"], draws.std(0), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("bn_kind", ["keras", "tfnorm"])
def test_bn_after_dropout_stays_in_inference(bn_kind):
    # The sibling after the dropout layer must not inherit its training mode.
    rate, channels = 0.5, 8
    bn = _bn_with_statistics(_BN_CLASSES[bn_kind], channels)
    model = keras.Sequential(
        [keras.Input((channels,)), keras.layers.Dropout(rate), bn]
    )
    before = [w.copy() for w in bn.get_weights()]
    x = np.random.default_rng(2).normal(size=(32, channels)).astype("float32")
    draws = mc_predict(model, x, samples=20, return_samples=True)["samples"]
    dropped = _bn_reference(bn, np.zeros_like(x))
    kept = _bn_reference(bn, x / (1 - rate))
    matches = np.isclose(draws, dropped, atol=1e-4) | np.isclose(
        draws, kept, atol=1e-4
    )
    assert matches.all()
    for a, b in zip(before, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_every_dropout_flavor_is_active_and_restored():
    inputs = keras.Input((8, 8, 4))
    h = inputs
    for layer in [
        keras.layers.Dropout(0.2),
        keras.layers.SpatialDropout2D(0.2),
        keras.layers.GaussianDropout(0.2),
        keras.layers.GaussianNoise(0.2),
        keras.layers.AlphaDropout(0.2),
        DropBlock2D(0.2, block_size=3),
        DropPath(0.2),
        Uout(0.2),
    ]:
        single = keras.Sequential([keras.Input((8, 8, 4)), layer])
        x = np.ones((4, 8, 8, 4), "float32")
        std = mc_predict(single, x, samples=8)["std"]
        assert std.max() > 0, type(layer).__name__
        assert "call" not in layer.__dict__
        np.testing.assert_array_equal(single.predict(x, verbose=0), x)
        h = layer(h)
    dense = DropConnect(keras.layers.Dense(3), rate=0.3)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(h)))
    std = mc_predict(model, np.ones((4, 8, 8, 4), "float32"), samples=8)["std"]
    assert std.min() > 0


def test_classifier_entropy_and_saved_model(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(3).normal(size=(10, 6)).astype("float32")
    result = mc_predict(loaded, x, samples=16, batch_size=4)
    assert sorted(result) == ["entropy", "mean", "std"]
    mean = result["mean"].astype(np.float64)
    np.testing.assert_allclose(mean.sum(-1), 1.0, rtol=1e-5)
    expected = -np.sum(mean * np.log(mean), axis=-1)
    np.testing.assert_allclose(result["entropy"], expected, rtol=1e-4)
    assert "entropy" not in mc_predict(loaded, x, samples=2, entropy=False)


def test_regression_output_has_no_entropy():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dropout(0.5), keras.layers.Dense(2)]
    )
    result = mc_predict(model, np.ones((5, 3)), samples=4)
    assert sorted(result) == ["mean", "std"]


@pytest.mark.parametrize("samples", [0, -3, 2.5, True])
def test_samples_below_one_is_rejected(samples):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.5)])
    message = (
        "Argument `samples` must be a positive integer. "
        f"Received: samples={samples!r}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        mc_predict(model, np.ones((2, 3)), samples=samples)
