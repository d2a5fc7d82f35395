"""The callbacks probe at the requested period and write their tags."""

import glob
import os

import keras
import numpy as np
import tensorflow as tf

import tfnorm
from tfnorm import diagnostics


def _setup():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, name="d0"),
            tfnorm.BatchNormalization(name="bn"),
            keras.layers.Dropout(0.2, seed=1, name="drop"),
            keras.layers.Dense(2, name="d1"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 4)).astype("float32")
    y = rng.standard_normal((48, 2)).astype("float32")
    return model, x, y


def _events(log_dir):
    """{tag: [steps]} read back from the event files."""
    tags = {}
    for path in glob.glob(
        os.path.join(log_dir, "**", "events.*"), recursive=True
    ):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_each_callback_writes_its_tags_every_period(tmp_path):
    model, x, y = _setup()
    ics = diagnostics.InternalCovariateShiftCallback(
        (x[:16], y[:16]), period=2, log_dir=tmp_path / "ics"
    )
    landscape = diagnostics.LossLandscapeCallback(
        (x[:16], y[:16]),
        period=3,
        step_sizes=[0.1, 0.2],
        log_dir=tmp_path / "l",
    )
    stats = diagnostics.LayerStatisticsCallback(
        x[:16], period=2, log_dir=tmp_path / "s"
    )
    # 6 steps per epoch, 2 epochs: the optimizer step counts across epochs.
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[ics, landscape, stats],
    )
    every_2 = [2, 4, 6, 8, 10, 12]
    tags = _events(str(tmp_path / "ics"))
    assert sorted(tags) == [
        f"diagnostics/ics/{layer}/{key}"
        for layer in ("d0", "d1")
        for key in ("cosine", "l2", "relative")
    ]
    assert all(steps == every_2 for steps in tags.values())
    assert [step for step, _ in ics.history] == every_2

    tags = _events(str(tmp_path / "l"))
    assert sorted(tags) == [
        f"diagnostics/landscape/{key}"
        for key in (
            "beta_smoothness",
            "grad_change_max",
            "grad_change_min",
            "loss",
            "loss_max",
            "loss_min",
            "loss_range",
        )
    ]
    assert all(steps == [3, 6, 9, 12] for steps in tags.values())

    tags = _events(str(tmp_path / "s"))
    for tag in (
        "diagnostics/layers/d0/output_std",
        "diagnostics/layers/bn/moving_variance_mean",
        "diagnostics/layers/drop/drop_rate",
    ):
        assert tags[tag] == every_2
    # Drift needs a previous probe: from the second one on.
    assert tags["diagnostics/layers/bn/output_mean_drift"] == every_2[1:]
    assert stats.history[-1][1]["drop"]["rate"] == np.float32(0.2)


def test_default_writer_and_a_dataset_of_batches(tmp_path):
    model, x, y = _setup()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    ics = diagnostics.InternalCovariateShiftCallback(
        dataset, period=3, layers=["d1"]
    )
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ics])
    writer.flush()
    assert _events(str(tmp_path)) == {
        "diagnostics/ics/d1/l2": [3, 6],
        "diagnostics/ics/d1/relative": [3, 6],
        "diagnostics/ics/d1/cosine": [3, 6],
    }
    # The second probe drew the dataset's second batch.
    first, second = (result["d1"]["l2"] for _, result in ics.history)
    assert first != second


def test_layer_statistics_log_renorm_r_and_d_as_histograms(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, name="d0"),
            tfnorm.BatchRenormalization(name="renorm"),
            keras.layers.Dense(2, name="d1"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 4)).astype("float32")
    y = rng.standard_normal((48, 2)).astype("float32")
    stats = diagnostics.LayerStatisticsCallback(
        x[:16], period=3, log_dir=tmp_path
    )
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[stats])

    histograms = {}
    for path in glob.glob(os.path.join(tmp_path, "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "histograms":
                    buckets = tf.make_ndarray(value.tensor)
                    histograms.setdefault(value.tag, []).append(
                        (event.step, buckets)
                    )
    for key in ("r", "d", "input_mean", "output_std"):
        tag = f"diagnostics/layers/renorm/per_unit/{key}"
        assert [step for step, _ in histograms[tag]] == [3, 6], tag
    # Six units: six values in the buckets of r, between the extremes of
    # the probe's own r.
    (_, buckets) = histograms["diagnostics/layers/renorm/per_unit/r"][-1]
    r = stats.history[-1][1]["renorm"]["per_unit"]["r"]
    assert buckets[:, 2].sum() == r.size == 6
    np.testing.assert_allclose(
        [buckets[:, 0].min(), buckets[:, 1].max()],
        [r.min(), r.max()],
        rtol=1e-6,
    )


def _straight_and_resumed(setup, make_callbacks, batch_size):
    """Callbacks of a fit over all 48 examples, and of one resumed at 32.

    The resumed model first trains on the first 32 examples without
    callbacks, as a run restored from a checkpoint has; its callbacks
    then see only the remaining 16.
    """
    fit = dict(batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    model, x, y = setup()
    straight = make_callbacks(x, y)
    model.fit(x, y, callbacks=straight, **fit)

    model, x, y = setup()
    model.fit(x[:32], y[:32], **fit)
    resumed = make_callbacks(x, y)
    model.fit(x[32:], y[32:], callbacks=resumed, **fit)
    return straight, resumed


def test_a_resumed_fit_probes_as_an_uninterrupted_one():
    # A fit that starts at step 4 (as a run resumed from a checkpoint
    # does) must draw the batch an uninterrupted run draws there, and
    # layer statistics must have the drift since the probe at step 4.
    def callbacks(x, y):
        batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
        return [
            diagnostics.InternalCovariateShiftCallback(batches, period=2),
            diagnostics.LayerStatisticsCallback(x[:16], period=2),
        ]

    straight, resumed = _straight_and_resumed(_setup, callbacks, 8)

    for a, b in zip(straight, resumed, strict=True):
        assert [s for s, _ in a.history] == [2, 4, 6]
        assert [s for s, _ in b.history] == [6]
        step, expected = a.history[-1]
        _, got = b.history[-1]
        for layer, values in expected.items():
            for key, value in values.items():
                if isinstance(value, float):
                    assert got[layer][key] == value, (layer, key)
    # The drift since step 4 is there, from the repeated probe.
    assert "input_mean_drift" in resumed[1].history[-1][1]["d0"]


def test_layer_statistics_callback_takes_a_dict_of_named_inputs():
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.Dense(4, name="da")(a)
    out = keras.layers.Dense(1, name="out")(keras.layers.Concatenate()([h, b]))
    model = keras.Model({"a": a, "b": b}, out)
    model.compile("sgd", "mse")
    rng = np.random.default_rng(0)
    x = {
        "a": rng.standard_normal((16, 3)).astype("float32"),
        "b": rng.standard_normal((16, 2)).astype("float32"),
    }
    stats = diagnostics.LayerStatisticsCallback(x, period=1)
    model.fit(x, np.zeros((16, 1)), batch_size=8, verbose=0, callbacks=[stats])
    assert [s for s, _ in stats.history] == [1, 2]
    assert {"da", "out"} <= set(stats.history[-1][1])


def test_a_resumed_fit_counts_probes_per_execution():
    # With 4 steps per execution and a period of 2, an uninterrupted fit
    # sees steps 4, 8 and 12 only, and probes at each: 3 probes, not 6.
    # A fit resumed at step 8 must skip the 2 batches those probes drew.
    def setup():
        model, x, y = _setup()
        model.compile(keras.optimizers.SGD(0.1), "mse", steps_per_execution=4)
        return model, x, y

    def callback(x, y):
        batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
        return [diagnostics.InternalCovariateShiftCallback(batches, period=2)]

    straight, resumed = _straight_and_resumed(setup, callback, 4)
    (straight,) = straight
    (resumed,) = resumed

    assert [s for s, _ in straight.history] == [4, 8, 12]
    assert [s for s, _ in resumed.history] == [12]
    assert resumed.history[-1][1] == straight.history[-1][1]
