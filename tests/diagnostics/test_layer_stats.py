"""layer_statistics against numpy on a small model."""

import keras
import numpy as np
import pytest

import tfnorm
from tests.diagnostics import reference_diagnostics as ref
from tfnorm import diagnostics

EPS = 1e-3
CLIPPING = {"rmax": 1.2, "rmin": 0.8, "dmax": 0.3}
BN = {
    "tfnorm": lambda: tfnorm.BatchNormalization(
        renorm=True, renorm_clipping=CLIPPING, epsilon=EPS, name="bn"
    ),
    "keras": lambda: keras.layers.BatchNormalization(
        renorm=True, renorm_clipping=CLIPPING, epsilon=EPS, name="bn"
    ),
}


def _model(make_bn, rate=0.5):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, name="dense"),
            make_bn(),
            keras.layers.Dropout(rate, seed=3, name="drop"),
            keras.layers.Dense(3, name="head"),
        ]
    )


def _batch(n=512, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 5)) * 2.0 + 1.0).astype("float32")


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(BN))
def test_moments_renorm_and_dropout_against_numpy(kind):
    model = _model(BN[kind])
    x = _batch()
    dense, bn = model.get_layer("dense"), model.get_layer("bn")
    kernel = dense.kernel.numpy().astype(np.float64)
    h = x.astype(np.float64) @ kernel + dense.bias.numpy()
    mean, std = ref.unit_moments(h)
    # Renorm statistics that put some units inside the clipping range and
    # push others past rmax, rmin or dmax.
    renorm_stddev = std * np.array([1.0, 0.5, 2.0, 1.05, 1.0, 0.9])
    renorm_mean = mean - std * np.array([0.0, 0.0, 0.0, 0.1, 1.0, -0.5])
    bn.renorm_mean.assign(renorm_mean.astype("float32"))
    bn.renorm_stddev.assign(renorm_stddev.astype("float32"))
    moving_mean = np.arange(6, dtype="float32") - 2.0
    moving_variance = np.linspace(0.5, 3.0, 6).astype("float32")
    bn.moving_mean.assign(moving_mean)
    bn.moving_variance.assign(moving_variance)

    stats = diagnostics.layer_statistics(model, x)
    assert list(stats) == ["dense", "bn", "drop", "head"]
    assert [s["kind"] for s in stats.values()] == [
        "kernel",
        "batch_norm",
        "dropout",
        "kernel",
    ]

    x_mean, x_std = ref.unit_moments(x)
    _close(stats["dense"]["per_unit"]["input_mean"], x_mean)
    _close(stats["dense"]["per_unit"]["input_std"], x_std)
    _close(stats["dense"]["per_unit"]["output_mean"], mean)
    _close(stats["dense"]["per_unit"]["output_std"], std)
    _close(stats["dense"]["input_mean"], x_mean.mean())
    _close(stats["dense"]["output_std"], std.mean())

    r, d, r_raw, d_raw = ref.renorm_r_d(
        mean, std, renorm_mean, renorm_stddev, EPS, CLIPPING
    )
    y = ref.bn_train(h, bn.gamma.numpy(), bn.beta.numpy(), EPS, r, d)
    y_mean, y_std = ref.unit_moments(y)
    entry = stats["bn"]
    _close(entry["per_unit"]["input_mean"], mean)
    _close(entry["per_unit"]["output_mean"], y_mean)
    _close(entry["per_unit"]["output_std"], y_std)
    _close(entry["per_unit"]["r"], r)
    _close(entry["per_unit"]["d"], d)
    _close(entry["r_max"], r.max())
    _close(entry["d_min"], d.min())
    assert entry["r_clipped"] == np.mean(r != r_raw) == 2 / 6
    assert entry["d_clipped"] == np.mean(d != d_raw) == 2 / 6
    assert entry["clipped"] == np.mean((r != r_raw) | (d != d_raw)) == 4 / 6
    _close(entry["moving_mean_mean"], moving_mean.mean())
    _close(entry["moving_mean_std"], moving_mean.std())
    _close(entry["moving_variance_mean"], moving_variance.mean())
    assert entry["moving_variance_min"] == np.float32(0.5)
    assert entry["moving_variance_max"] == np.float32(3.0)

    # Dropout sees the BN output; the head sees the dropout output.
    drop = stats["drop"]
    _close(drop["per_unit"]["input_mean"], y_mean)
    for key in ("mean", "std"):
        np.testing.assert_array_equal(
            drop["per_unit"][f"output_{key}"],
            stats["head"]["per_unit"][f"input_{key}"],
        )
    # 3,072 Bernoulli(0.5) draws: 4 binomial standard errors.
    tolerance = 4 * np.sqrt(0.25 / 3072)
    assert abs(drop["drop_rate"] - 0.5) < tolerance, drop["drop_rate"]
    assert drop["rate"] == 0.5


def test_drift_between_calls():
    model = _model(BN["tfnorm"], rate=0.0)
    x = _batch(64)
    first = diagnostics.layer_statistics(model, x)
    assert "output_mean_drift" not in first["dense"]
    same = diagnostics.layer_statistics(model, x, previous=first)
    assert same["bn"]["input_std_drift"] == 0.0

    dense = model.get_layer("dense")
    dense.kernel.assign(dense.kernel.numpy() * 1.5 + 0.1)
    second = diagnostics.layer_statistics(model, x, previous=first)
    for name in ("dense", "bn", "head"):
        for key in ("input_mean", "input_std", "output_mean", "output_std"):
            a = second[name]["per_unit"][key]
            b = first[name]["per_unit"][key]
            expected = np.sqrt(np.mean((a - b) ** 2))
            assert second[name][f"{key}_drift"] == pytest.approx(expected)
    assert second["bn"]["input_std_drift"] > 0.1
    # The model's input does not move.
    assert second["dense"]["input_mean_drift"] == 0.0


def test_layers_subset_and_a_plain_bn_layer():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, name="a"),
            tfnorm.BatchNormalization(name="plain"),
        ]
    )
    x = _batch(32)[:, :4]
    stats = diagnostics.layer_statistics(model, x, layers=["plain"])
    assert list(stats) == ["plain"]
    assert "r_mean" not in stats["plain"]
    # Plain BN: zero mean, std s / sqrt(s^2 + eps) per unit.
    np.testing.assert_allclose(
        stats["plain"]["per_unit"]["output_mean"], 0, 0, 1e-6
    )
    dense = model.get_layer("a")
    h = x.astype(np.float64) @ dense.kernel.numpy() + dense.bias.numpy()
    _, std = ref.unit_moments(h)
    _close(stats["plain"]["output_std"], np.mean(std / np.sqrt(std**2 + EPS)))


@pytest.mark.parametrize("axis", [-1, 1])
def test_ghost_renorm_r_and_d_per_group_against_numpy(axis):
    # 10 examples in ghost groups of 4: groups of 4, 4 and 2. Rank 3 with
    # the channel axis last or first, so the group moments reduce over
    # the examples of a group and the other non-channel axis.
    keras.utils.set_random_seed(0)
    bn = tfnorm.BatchNormalization(
        axis=axis,
        renorm=True,
        renorm_clipping=CLIPPING,
        virtual_batch_size=4,
        epsilon=EPS,
        name="bn",
    )
    model = keras.Sequential([keras.Input((3, 3)), bn])
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((10, 3, 3)) * 2.0 + 1.0).astype("float32")
    channels_last = np.moveaxis(x.astype(np.float64), axis, -1)
    groups = [channels_last[0:4], channels_last[4:8], channels_last[8:10]]
    moments = [ref.unit_moments(g) for g in groups]
    mean = np.stack([m for m, _ in moments])
    std = np.stack([s for _, s in moments])
    # Renorm statistics that clip some groups' r or d and not others.
    renorm_mean = mean.mean(0) + np.array([0.0, 0.4, -0.4])
    renorm_stddev = std.mean(0) * np.array([1.0, 0.7, 1.3])
    bn.renorm_mean.assign(renorm_mean.astype("float32"))
    bn.renorm_stddev.assign(renorm_stddev.astype("float32"))

    entry = diagnostics.layer_statistics(model, x)["bn"]
    r, d, r_raw, d_raw = ref.renorm_r_d(
        mean, std, renorm_mean, renorm_stddev, EPS, CLIPPING
    )
    assert entry["per_unit"]["r"].shape == (3, 3)
    _close(entry["per_unit"]["r"], r)
    _close(entry["per_unit"]["d"], d)
    _close(entry["r_mean"], r.mean())
    _close(entry["d_max"], d.max())
    clipped = (r != r_raw) | (d != d_raw)
    assert 0 < clipped.mean() < 1, clipped
    assert entry["clipped"] == clipped.mean()
    assert entry["r_clipped"] == np.mean(r != r_raw)

    # The layer itself normalizes each group with these r and d.
    y = np.moveaxis(bn(x, training=True).numpy().astype(np.float64), axis, -1)
    for g, (start, stop) in enumerate([(0, 4), (4, 8), (8, 10)]):
        expected = ref.bn_train(
            groups[g].reshape(-1, 3),
            bn.gamma.numpy(),
            bn.beta.numpy(),
            EPS,
            r[g],
            d[g],
        ).reshape(groups[g].shape)
        np.testing.assert_allclose(y[start:stop], expected, atol=1e-4)
