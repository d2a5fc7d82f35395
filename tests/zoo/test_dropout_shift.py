"""E5's measurement of the variance shift on a real network."""

import keras
import numpy as np
import pytest

from zoo import models
from zoo.studies import dropout_shift


def _trained_mlp(layer, rate, seed=0):
    keras.utils.set_random_seed(seed)
    model = models.build_mlp(
        (20,),
        3,
        "bn_dropout",
        hidden_units=(64,) * 3,
        dropout_rate=rate,
    )
    if layer == "uout":
        model = models.with_dropout_options(model, layer="uout")
    models.compile_sgd(model, 0.1)
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=(2048, 20)).astype("float32")
    y = rng.integers(0, 3, size=2048)
    # 480 steps: the moving statistics (momentum 0.99) settle.
    model.fit(x, y, batch_size=128, epochs=30, verbose=0)
    return model, x


@pytest.mark.parametrize("layer", ["dropout", "uout"])
def test_formula_predicts_the_training_variance_at_every_layer(layer):
    rate = 0.5
    model, x = _trained_mlp(layer, rate)
    before = [v.numpy().copy() for v in model.variables]

    rows = dropout_shift.variance_shift(model, x, rate, layer)

    assert [r["layer"] for r in rows] == ["norm_2", "norm_3"]
    for row in rows:
        # The formula is exact in expectation. The measured variance is
        # a mean over 16 batches of 128 and 64 units of one noise draw: a
        # relative standard error of about 0.5% here, so a 2% band. The
        # shift itself (train / test - 1) is a difference of nearby
        # numbers (0.08 for Uout) and too noisy to hold to 2%.
        assert row["train_variance"] > row["test_variance"], row
        assert row["train_variance"] == pytest.approx(
            row["predicted_variance"], rel=0.02
        ), row
    # The second dropout's input carries the first one's noise in
    # training only: the formula on the inference input predicts less.
    second = rows[1]
    assert second["predicted_variance"] > second["predicted_from_test_input"]
    # Training-mode passes left every variable (BN statistics, seed
    # states) exactly as it was.
    for old, variable in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(old, variable.numpy())


def test_no_dropout_before_a_bn_gives_no_rows():
    keras.utils.set_random_seed(0)
    model = models.build_mlp((20,), 3, "bn_before", hidden_units=(16,) * 2)
    x = np.zeros((256, 20), "float32")
    assert dropout_shift.variance_shift(model, x, 0.5) == []


def test_fewer_examples_than_a_batch_is_an_error():
    model, x = _trained_mlp("dropout", 0.3)
    with pytest.raises(ValueError) as info:
        dropout_shift.variance_shift(model, x[:100], 0.3)
    assert str(info.value) == (
        "variance_shift needs at least one batch of 128 examples. "
        "Received: 100 examples"
    )
