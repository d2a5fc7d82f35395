"""Every probe leaves weights, optimizer slots and BN statistics untouched."""

import keras
import numpy as np
import pytest

import tfnorm
from tfnorm import diagnostics


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, name="d0"),
            tfnorm.BatchNormalization(
                renorm=True,
                renorm_clipping={"rmax": 1.5, "dmax": 0.5},
                name="renorm",
            ),
            keras.layers.Dropout(0.3, seed=1, name="drop"),
            keras.layers.Dense(8, activation="relu", name="d1"),
            keras.layers.BatchNormalization(name="keras_bn"),
            tfnorm.BatchNormalization(virtual_batch_size=4, name="ghost"),
            keras.layers.Dense(2, name="out"),
        ]
    )


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype("float32")
    y = rng.standard_normal((n, 2)).astype("float32")
    return x, y


def _state(model):
    """Every value a probe could touch, copied."""
    renorm = model.get_layer("renorm")
    return (
        [v.numpy().copy() for v in model.variables]
        + [v.numpy().copy() for v in model.optimizer.variables]
        + [v.numpy().copy() for v in renorm._clip_vars.values()]
    )


def _assert_same(before, after):
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: keras.optimizers.SGD(0.1, momentum=0.9),
        lambda: keras.optimizers.Adam(1e-2),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_probes_leave_the_training_state_bit_for_bit(optimizer):
    model = _model()
    model.compile(optimizer(), "mse")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    before = _state(model)
    # The slots are non-trivial, so an accidental update would show.
    assert any(np.any(v != 0) for v in before[len(model.variables) :])

    shift = diagnostics.internal_covariate_shift(model, x, y)
    looped = diagnostics.internal_covariate_shift(model, x, y, unroll=False)
    probe = diagnostics.loss_landscape(model, x, y)
    stats = diagnostics.layer_statistics(model, x)
    _assert_same(before, _state(model))
    assert list(shift) == ["d0", "d1", "out"]
    assert list(looped) == ["d0", "d1", "out"]
    assert np.isfinite(probe["beta_smoothness"])
    assert list(stats) == [
        "d0",
        "renorm",
        "drop",
        "d1",
        "keras_bn",
        "ghost",
        "out",
    ]


def test_callbacks_leave_training_unchanged():
    # Two identical runs, one probed every step by all three callbacks:
    # bit-identical weights, optimizer slots and moving statistics.
    x, y = _data(seed=4)
    runs = []
    for probed in (False, True):
        model = _model(seed=7)
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        callbacks = []
        if probed:
            callbacks = [
                diagnostics.InternalCovariateShiftCallback((x, y), period=1),
                diagnostics.LossLandscapeCallback(
                    (x, y), period=1, step_sizes=[0.1, 0.4]
                ),
                diagnostics.LayerStatisticsCallback(x, period=1),
            ]
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=1,
            verbose=0,
            shuffle=False,
            callbacks=callbacks,
        )
        runs.append(_state(model))
        if probed:
            assert [s for s, _ in callbacks[0].history] == [1, 2, 3, 4]
    _assert_same(*runs)


def test_probes_leave_a_fused_path_conv_model_unchanged():
    # 4D channels-last float32 inputs take tfnorm's fused BN kernel, which
    # updates the moving statistics on its own code path.
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, name="conv"),
            tfnorm.BatchNormalization(
                renorm=True, renorm_clipping={"rmax": 2.0}, name="renorm"
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(2, name="out"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 6, 6, 2)).astype("float32")
    y = rng.standard_normal((8, 2)).astype("float32")
    model.fit(x, y, batch_size=4, verbose=0, shuffle=False)
    before = _state(model)
    shift = diagnostics.internal_covariate_shift(model, x, y)
    looped = diagnostics.internal_covariate_shift(model, x, y, unroll=False)
    diagnostics.loss_landscape(model, x, y, step_sizes=[0.1])
    stats = diagnostics.layer_statistics(model, x)
    _assert_same(before, _state(model))
    assert shift["out"]["l2"] > 0
    np.testing.assert_allclose(looped["out"]["l2"], shift["out"]["l2"], 1e-5)
    np.testing.assert_allclose(
        stats["renorm"]["per_unit"]["input_mean"],
        model.get_layer("conv")(x).numpy().mean(axis=(0, 1, 2)),
        rtol=1e-5,
        atol=1e-6,
    )
