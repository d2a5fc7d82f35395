"""ICS and the landscape probe against the closed forms of a linear chain."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfnorm
from tests.diagnostics import reference_diagnostics as ref
from tfnorm import diagnostics
from tfnorm.diagnostics import ics

SIZES = (5, 4, 3, 2)


def _mse(y_true, y_pred):
    return tf.reduce_mean(tf.square(y_pred - y_true))


def _chain(seed=0, sizes=SIZES):
    """A float64 affine chain, its weights and a batch, all float64."""
    rng = np.random.default_rng(seed)
    layers = [
        keras.layers.Dense(
            units,
            dtype="float64",
            name=f"linear{i}",
            kernel_initializer=keras.initializers.RandomNormal(
                stddev=0.7, seed=seed + i
            ),
            bias_initializer=keras.initializers.RandomNormal(seed=seed + 9),
        )
        for i, units in enumerate(sizes[1:])
    ]
    model = keras.Sequential([keras.Input((sizes[0],), dtype="float64")])
    for layer in layers:
        model.add(layer)
    params = [(lay.kernel.numpy(), lay.bias.numpy()) for lay in layers]
    x = rng.standard_normal((16, sizes[0]))
    t = rng.standard_normal((16, sizes[-1]))
    return model, params, x, t


@pytest.mark.parametrize("unroll", [True, False], ids=["unrolled", "looped"])
def test_ics_matches_closed_form(unroll):
    model, params, x, t = _chain()
    shift = diagnostics.internal_covariate_shift(
        model, x, t, learning_rate=0.3, loss=_mse, unroll=unroll
    )
    expected = ref.chain_ics(x, t, params, 0.3)
    assert list(shift) == ["linear0", "linear1", "linear2"]
    # Nothing precedes the first layer: its gradient cannot move.
    assert shift["linear0"]["l2"] == 0.0
    assert shift["linear0"]["cosine"] == pytest.approx(1.0, abs=1e-12)
    for values in shift.values():
        assert -1.0 <= values["cosine"] <= 1.0, values
    for name, (l2, relative, cosine) in zip(
        ["linear1", "linear2"], expected[1:], strict=True
    ):
        assert l2 > 1e-3
        np.testing.assert_allclose(shift[name]["l2"], l2, rtol=1e-9)
        np.testing.assert_allclose(shift[name]["relative"], relative, 1e-9)
        np.testing.assert_allclose(shift[name]["cosine"], cosine, 1e-9)
    g = ref.chain_loss_and_grads(x, t, params)[1][2][0]
    np.testing.assert_allclose(
        shift["linear2"]["grad_norm"], np.linalg.norm(g), rtol=1e-12
    )


def test_ics_uses_the_optimizers_current_rate_and_compiled_loss():
    model, params, x, t = _chain(seed=3)
    model.compile(keras.optimizers.SGD(0.05), loss=_mse)
    shift = diagnostics.internal_covariate_shift(model, x, t)
    # The optimizer holds its rate in float32.
    expected = ref.chain_ics(x, t, params, float(np.float32(0.05)))
    np.testing.assert_allclose(shift["linear2"]["l2"], expected[2][0], 1e-9)
    # A subset probes only the named layers, with the same values.
    only = diagnostics.internal_covariate_shift(model, x, t, layers=["linear2"])
    assert list(only) == ["linear2"]
    assert only["linear2"] == shift["linear2"]


def _probed_net(depth, seed=0):
    """Dense layers with BN and dropout between them, float32, and a batch."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,))])
    for i in range(depth - 1):
        model.add(keras.layers.Dense(8, name=f"d{i}"))
        model.add(tfnorm.BatchNormalization(name=f"bn{i}"))
        model.add(keras.layers.Dropout(0.2, seed=i))
        model.add(keras.layers.ReLU())
    model.add(keras.layers.Dense(3, name="out"))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((32, 6)).astype("float32")
    y = rng.standard_normal((32, 3)).astype("float32")
    return model, x, y


def test_ics_unrolled_and_looped_agree_with_bn_and_dropout():
    # Both evaluate every G' at the same points, with the same dropout
    # masks; only the graph differs, so float32 rounding at most.
    model, x, y = _probed_net(depth=4)
    results = [
        diagnostics.internal_covariate_shift(
            model, x, y, learning_rate=0.5, loss="mse", unroll=unroll
        )
        for unroll in (True, False)
    ]
    assert list(results[0]) == ["d0", "d1", "d2", "out"]
    assert results[0]["out"]["l2"] > 1e-4
    for name, values in results[0].items():
        for key, value in values.items():
            np.testing.assert_allclose(
                results[1][name][key], value, rtol=1e-5, atol=1e-7
            )
    # A subset keeps its values whichever way it is computed.
    subset = diagnostics.internal_covariate_shift(
        model, x, y, learning_rate=0.5, loss="mse", layers=["d2"], unroll=False
    )
    np.testing.assert_allclose(
        subset["d2"]["l2"], results[0]["d2"]["l2"], rtol=1e-5
    )


def test_ics_unrolls_up_to_the_limit():
    # 10 kernel layers: 9 have preceding layers, one more than the limit.
    model, x, y = _probed_net(depth=10)
    plan = ics._plan(model, None)
    assert ics.UNROLL_LIMIT == 8
    assert not ics._resolve_unroll(None, plan)
    assert ics._resolve_unroll(None, ics._plan(model, ["d1", "out"]))
    assert ics._resolve_unroll(True, plan)
    looped = diagnostics.internal_covariate_shift(
        model, x, y, learning_rate=0.5, loss="mse"
    )
    unrolled = diagnostics.internal_covariate_shift(
        model, x, y, learning_rate=0.5, loss="mse", unroll=True
    )
    np.testing.assert_allclose(
        [v["cosine"] for v in looped.values()],
        [v["cosine"] for v in unrolled.values()],
        rtol=1e-5,
    )


def test_ics_grows_linearly_for_small_rates():
    # G' - G is first order in the step: halving the rate halves it.
    model, _, x, t = _chain(seed=5)
    small = diagnostics.internal_covariate_shift(
        model, x, t, learning_rate=1e-4, loss=_mse
    )
    smaller = diagnostics.internal_covariate_shift(
        model, x, t, learning_rate=5e-5, loss=_mse
    )
    ratio = small["linear2"]["l2"] / smaller["linear2"]["l2"]
    assert ratio == pytest.approx(2.0, rel=1e-3)


def test_landscape_matches_closed_form():
    model, params, x, t = _chain(seed=1)
    probe = diagnostics.loss_landscape(model, x, t, loss=_mse)
    steps = np.linspace(0.05, 0.4, 8)
    loss, grad_norm, losses, changes, ratios = ref.chain_landscape(
        x, t, params, steps
    )
    np.testing.assert_allclose(probe["step_sizes"], steps, rtol=1e-15)
    np.testing.assert_allclose(probe["loss"], loss, rtol=1e-12)
    np.testing.assert_allclose(probe["grad_norm"], grad_norm, rtol=1e-12)
    np.testing.assert_allclose(probe["losses"], losses, rtol=1e-10)
    np.testing.assert_allclose(probe["grad_changes"], changes, rtol=1e-9)
    np.testing.assert_allclose(probe["beta_ratios"], ratios, rtol=1e-9)
    assert probe["loss_min"] == min(probe["losses"])
    assert probe["loss_max"] == max(probe["losses"])
    assert probe["grad_change_min"] == min(probe["grad_changes"])
    assert probe["grad_change_max"] == max(probe["grad_changes"])
    np.testing.assert_allclose(probe["beta_smoothness"], max(ratios), 1e-9)


def test_landscape_of_a_quadratic_has_its_exact_smoothness():
    # One linear layer without bias: L(K) = mean((x K - t)^2) is quadratic,
    # g_eta - g = -eta H g, so every ratio is ||H g|| / ||g|| exactly.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 3))
    t = rng.standard_normal((32, 1))
    layer = keras.layers.Dense(1, use_bias=False, dtype="float64")
    model = keras.Sequential([keras.Input((3,), dtype="float64"), layer])
    kernel = layer.kernel.numpy()
    hessian = 2.0 * x.T @ x / x.shape[0]
    g = hessian @ kernel - 2.0 * x.T @ t / x.shape[0]
    expected = np.linalg.norm(hessian @ g) / np.linalg.norm(g)
    probe = diagnostics.loss_landscape(
        model, x, t, step_sizes=[0.01, 0.1], loss=_mse
    )
    np.testing.assert_allclose(probe["beta_ratios"], [expected] * 2, 1e-10)


def test_a_step_size_that_blows_up_shows_in_the_bands_wherever_it_is():
    # A loss that overflows at one step size: the band's upper end is not
    # finite whatever that step size's place in the grid (Python's min and
    # max dropped a NaN that came second).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 4)).astype("float32")
    t = rng.standard_normal((16, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    probes = [
        diagnostics.loss_landscape(model, x, t, step_sizes=steps, loss=_mse)
        for steps in ([1e38, 0.1], [0.1, 1e38])
    ]
    for key in ("loss_min", "loss_max", "grad_change_min", "grad_change_max"):
        a, b = (probe[key] for probe in probes)
        assert a == b or (np.isnan(a) and np.isnan(b)), (key, a, b)
    for probe in probes:
        assert not np.isfinite(probe["loss_max"])
        assert not np.isfinite(probe["grad_change_max"])


def test_a_compile_shorthand_loss_gets_a_clear_error():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", loss="crossentropy")
    x = np.zeros((4, 4), "float32")
    with pytest.raises(ValueError) as info:
        diagnostics.loss_landscape(model, x, np.zeros(4), step_sizes=[0.1])
    assert str(info.value) == (
        "Loss 'crossentropy' is not a Keras loss name that the probes can "
        "look up (`compile` resolves shorthands such as 'crossentropy' from "
        "the targets). Pass `loss` explicitly, for example "
        "loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True). "
        "Received: loss='crossentropy'"
    )


def test_probes_follow_a_layer_frozen_between_calls():
    # Fine-tuning freezes layers between fits: the probes' cached graphs
    # took the old variables by position and indexed past the new list.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, name="d1"),
            tfnorm.BatchNormalization(name="bn"),
            keras.layers.Dense(1, name="d2"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = np.ones((8, 1), "float32")
    before = diagnostics.loss_landscape(model, x, y, step_sizes=[0.1])
    diagnostics.internal_covariate_shift(model, x, y)

    model.get_layer("d1").trainable = False
    landscape = diagnostics.loss_landscape(model, x, y, step_sizes=[0.1])
    shift = diagnostics.internal_covariate_shift(model, x, y)
    # d1 no longer moves: the loss at the same weights is the same, its
    # gradient and step are smaller, and d1 has no ICS entry.
    np.testing.assert_allclose(landscape["loss"], before["loss"], rtol=1e-6)
    assert landscape["grad_norm"] < before["grad_norm"]
    assert sorted(shift) == ["d2"]


@pytest.mark.parametrize(
    "bn",
    [tfnorm.BatchNormalization, keras.layers.BatchNormalization],
    ids=["tfnorm", "keras"],
)
def test_probes_follow_a_bn_layer_frozen_without_weights(bn):
    # Without gamma and beta, freezing BN leaves the variable layout as it
    # was, but the layer then normalizes with its moving statistics: the
    # cached graphs kept normalizing with the batch's.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, name="d1"),
            bn(center=False, scale=False, name="bn"),
            keras.layers.Dense(1, name="d2"),
        ]
    )
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 4)) * 3 + 2).astype("float32")
    y = np.ones((8, 1), "float32")
    diagnostics.loss_landscape(model, x, y, step_sizes=[0.1], loss=_mse)
    diagnostics.layer_statistics(model, x)

    model.get_layer("bn").trainable = False
    landscape = diagnostics.loss_landscape(
        model, x, y, step_sizes=[0.1], loss=_mse
    )
    stats = diagnostics.layer_statistics(model, x)
    # Moving statistics at their initial values: BN is the identity.
    expected = np.mean((model(x, training=False).numpy() - y) ** 2)
    np.testing.assert_allclose(landscape["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(
        stats["bn"]["per_unit"]["output_std"],
        stats["bn"]["per_unit"]["input_std"] / np.sqrt(1 + 1e-3),
        rtol=1e-5,
    )
