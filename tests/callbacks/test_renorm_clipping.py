"""RenormClippingSchedule and renorm_clipping_at."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfnorm
from tests import reference as ref
from tfnorm.callbacks import RenormClippingSchedule
from tfnorm.callbacks import renorm_clipping_at


def _data(shape, seed=0, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + loc).astype("float32")


# ---------------------------------------------------------------------------
# The pure schedule


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}),
        (9, {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}),
        (10, {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}),
        (15, {"rmax": 2.0, "rmin": 0.5, "dmax": 2.5}),
        (20, {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0}),
        (1000, {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0}),
    ],
)
def test_schedule_warmup_ramp_and_plateau(step, expected):
    got = renorm_clipping_at(step, 10, 10, rmax=3.0, dmax=5.0)
    assert got == pytest.approx(expected, rel=1e-12)


def test_schedule_constant_rmin_after_warmup():
    assert renorm_clipping_at(3, 5, 10, 3.0, 5.0, rmin=0.25)["rmin"] == 1.0
    assert renorm_clipping_at(5, 5, 10, 3.0, 5.0, rmin=0.25)["rmin"] == 0.25
    assert renorm_clipping_at(99, 5, 10, 3.0, 5.0, rmin=0.25) == {
        "rmax": 3.0,
        "rmin": 0.25,
        "dmax": 5.0,
    }


def test_schedule_without_ramp_jumps_after_warmup():
    assert renorm_clipping_at(4, 5, 0, 3.0, 5.0)["rmax"] == 1.0
    assert renorm_clipping_at(5, 5, 0, 3.0, 5.0)["rmax"] == 3.0
    assert renorm_clipping_at(0, 0, 0, 2.0, 1.0) == {
        "rmax": 2.0,
        "rmin": 0.5,
        "dmax": 1.0,
    }


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"step": -1},
            ValueError,
            "Argument `step` must be a non-negative integer number of "
            "training steps. Received: step=-1",
        ),
        (
            {"warmup_steps": -5},
            ValueError,
            "Argument `warmup_steps` must be a non-negative integer number "
            "of training steps. Received: warmup_steps=-5",
        ),
        (
            {"ramp_steps": -1},
            ValueError,
            "Argument `ramp_steps` must be a non-negative integer number of "
            "training steps. Received: ramp_steps=-1",
        ),
        (
            {"ramp_steps": 2.5},
            TypeError,
            "Argument `ramp_steps` must be a non-negative integer number of "
            "training steps. Received: ramp_steps=2.5",
        ),
        (
            {"rmax": 0.5},
            ValueError,
            "Argument `rmax` must be at least 1: the ramp starts at rmax = 1 "
            "(plain BN) and widens from there. Received: rmax=0.5",
        ),
        (
            {"dmax": -1},
            ValueError,
            "Argument `dmax` must be non-negative: the ramp starts at dmax = "
            "0 (plain BN) and widens from there. Received: dmax=-1.0",
        ),
        (
            {"rmin": 1.5},
            ValueError,
            "Argument `rmin` must be None (the paper's 1 / rmax) or in "
            "(0, 1], so that r = 1 stays allowed. Received: rmin=1.5",
        ),
        (
            {"rmax": "3"},
            TypeError,
            "Argument `rmax` must be a finite number. Received: rmax='3'",
        ),
        (
            # 0 * inf would make the first ramp step NaN.
            {"rmax": float("inf")},
            TypeError,
            "Argument `rmax` must be a finite number. Received: rmax=inf",
        ),
        (
            {"dmax": float("nan")},
            TypeError,
            "Argument `dmax` must be a finite number. Received: dmax=nan",
        ),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, error, message):
    args = {
        "step": 0,
        "warmup_steps": 1,
        "ramp_steps": 1,
        "rmax": 3.0,
        "dmax": 5.0,
        **kwargs,
    }
    with pytest.raises(error) as info:
        renorm_clipping_at(**args)
    assert str(info.value) == message


def test_numpy_scalars_are_accepted():
    bounds = renorm_clipping_at(
        np.int64(150), np.int64(100), np.int64(100), np.float32(3.0), 5.0
    )
    assert bounds == {"rmax": 2.0, "rmin": 0.5, "dmax": 2.5}


def test_model_without_tfnorm_renorm_layers_is_an_error():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.BatchNormalization(renorm=True),
            keras.layers.Dense(1),
        ],
        name="plain",
    )
    model.compile("sgd", "mse")
    schedule = RenormClippingSchedule(warmup_steps=1, ramp_steps=1)
    x = np.zeros((4, 3), "float32")
    with pytest.raises(ValueError) as info:
        model.fit(x, x[:, :1], callbacks=[schedule], verbose=0)
    assert str(info.value) == (
        "RenormClippingSchedule found no tfnorm layer with `renorm=True` "
        "in the model, so there is nothing to schedule (Keras's own "
        "BatchNormalization keeps its clipping fixed). Use "
        "tfnorm.BatchRenormalization or tfnorm.BatchNormalization("
        "renorm=True). Received: model 'plain'"
    )


def test_callback_validates_at_construction():
    with pytest.raises(ValueError) as info:
        RenormClippingSchedule(warmup_steps=-1, ramp_steps=1)
    assert str(info.value) == (
        "Argument `warmup_steps` must be a non-negative integer number of "
        "training steps. Received: warmup_steps=-1"
    )
    with pytest.raises(ValueError) as info:
        RenormClippingSchedule(warmup_steps=1, ramp_steps=1, rmax=0.9)
    assert str(info.value) == (
        "Argument `rmax` must be at least 1: the ramp starts at rmax = 1 "
        "(plain BN) and widens from there. Received: rmax=0.9"
    )


# ---------------------------------------------------------------------------
# The callback in fit


def _nested_renorm_model(channels=3):
    """Functional model with a renorm layer on top and one nested inside."""
    inner = keras.Sequential(
        [
            keras.Input((channels,)),
            tfnorm.BatchNormalization(renorm=True, name="inner_bn"),
            keras.layers.Dense(channels, name="inner_dense"),
        ],
        name="inner",
    )
    inputs = keras.Input((channels,))
    h = tfnorm.BatchNormalization(renorm=True, name="outer_bn")(inputs)
    # Keras's renorm layer has no variable clipping: the schedule skips it.
    h = keras.layers.BatchNormalization(renorm=True, name="keras_bn")(h)
    outputs = keras.layers.Dense(1)(inner(h))
    return keras.Model(inputs, outputs)


def _tfnorm_renorm_layers(model):
    return [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, tfnorm.BatchNormalization) and layer.renorm
    ]


def test_fit_sets_nested_layers_and_logs_each_epoch():
    model = _nested_renorm_model()
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
    x = _data((32, 3))
    schedule = RenormClippingSchedule(warmup_steps=2, ramp_steps=8)
    history = model.fit(
        x, x[:, :1], batch_size=8, epochs=2, callbacks=[schedule], verbose=0
    )
    # Steps 0..7 ran; the last batch began at global step 7.
    assert int(model.optimizer.iterations.numpy()) == 8
    expected = renorm_clipping_at(7, 2, 8, 3.0, 5.0)
    layers = _tfnorm_renorm_layers(model)
    assert [layer.name for layer in layers] == ["outer_bn", "inner_bn"]
    for layer in layers:
        assert layer.renorm_clipping == pytest.approx(expected, rel=1e-6)
    # Epoch 1 ended at step 3 (rmax 1.25), epoch 2 at step 7 (rmax 2.25).
    assert history.history["renorm/rmax"] == pytest.approx([1.25, 2.25])
    assert history.history["renorm/dmax"] == pytest.approx([0.625, 3.125])
    assert model.get_layer("keras_bn").renorm_clipping == {}


def test_schedule_continues_across_fit_calls():
    model = _nested_renorm_model()
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
    x = _data((16, 3))
    schedule = RenormClippingSchedule(warmup_steps=1, ramp_steps=10)
    for _ in range(2):
        model.fit(x, x[:, :1], batch_size=8, callbacks=[schedule], verbose=0)
    # Second fit: batches began at global steps 2 and 3, not 0 and 1.
    expected = renorm_clipping_at(3, 1, 10, 3.0, 5.0)
    for layer in _tfnorm_renorm_layers(model):
        assert layer.renorm_clipping == pytest.approx(expected, rel=1e-6)


class _StepLoss(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(logs["loss"])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_bounds_change_inside_compiled_fit(jit_compile):
    # One batch per epoch, learning rate 0: the loss of each step is the
    # mean square of the layer's training output on the same batch, under
    # the clipping that the schedule set for that step.
    x = _data((16, 2), seed=1, loc=1.0, scale=2.0)
    bn = tfnorm.BatchNormalization(renorm=True, renorm_momentum=0.9)
    model = keras.Sequential([keras.Input((2,)), bn])
    # Renorm statistics far from the batch: unclipped, r and d are large.
    initial = ref.initial_state(2, renorm=True)
    initial["renorm_mean"] = np.array([-3.0, 4.0])
    initial["renorm_stddev"] = np.array([0.25, 0.5])
    bn.renorm_mean.assign(initial["renorm_mean"])
    bn.renorm_stddev.assign(initial["renorm_stddev"])
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=jit_compile)
    schedule = RenormClippingSchedule(warmup_steps=2, ramp_steps=2)
    recorder = _StepLoss()
    model.fit(
        x,
        np.zeros_like(x),
        batch_size=16,
        epochs=5,
        callbacks=[schedule, recorder],
        verbose=0,
    )

    state = initial
    expected = []
    for step in range(5):
        y, state = ref.bn_train(
            x,
            state,
            renorm=True,
            renorm_momentum=0.9,
            renorm_clipping=renorm_clipping_at(step, 2, 2, 3.0, 5.0),
        )
        expected.append(np.mean(y**2))
    np.testing.assert_allclose(recorder.losses, expected, rtol=1e-5)

    # Steps 0-2 have r = 1, d = 0: plain BN on the same batch.
    plain, _ = ref.bn_train(x, ref.initial_state(2))
    np.testing.assert_allclose(recorder.losses[:3], np.mean(plain**2), 1e-5)
    # Then the bounds open and the loss moves away from plain BN.
    assert recorder.losses[4] > 10 * np.mean(plain**2)
    assert bn.renorm_clipping == pytest.approx(
        {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0}
    )
    # The variables the compiled step reads hold the same bounds.
    clip = {k: float(v.numpy()) for k, v in bn._clip_vars.items()}
    assert clip == pytest.approx(bn.renorm_clipping, rel=1e-6)


def test_current_bounds_survive_keras_save_and_load(tmp_path):
    model = _nested_renorm_model()
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
    x = _data((24, 3))
    schedule = RenormClippingSchedule(warmup_steps=1, ramp_steps=6)
    model.fit(x, x[:, :1], batch_size=8, callbacks=[schedule], verbose=0)
    at_save = {
        layer.name: layer.renorm_clipping
        for layer in _tfnorm_renorm_layers(model)
    }
    assert at_save["outer_bn"] == pytest.approx(
        renorm_clipping_at(2, 1, 6, 3.0, 5.0), rel=1e-6
    )

    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    layers = _tfnorm_renorm_layers(loaded)
    assert {layer.name: layer.renorm_clipping for layer in layers} == at_save
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), 1e-6
    )

    # The optimizer's step counter is saved too, so the schedule resumes.
    loaded.fit(x, x[:, :1], batch_size=8, callbacks=[schedule], verbose=0)
    expected = renorm_clipping_at(5, 1, 6, 3.0, 5.0)
    for layer in layers:
        assert layer.renorm_clipping == pytest.approx(expected, rel=1e-6)


def test_writes_summaries_and_tensorboard_epoch_logs(tmp_path):
    model = _nested_renorm_model()
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
    x = _data((16, 3))
    schedule = RenormClippingSchedule(warmup_steps=1, ramp_steps=2)
    board_dir = os.path.join(tmp_path, "board")
    writer = tf.summary.create_file_writer(os.path.join(tmp_path, "steps"))
    with writer.as_default():
        model.fit(
            x,
            x[:, :1],
            batch_size=4,
            callbacks=[schedule, keras.callbacks.TensorBoard(board_dir)],
            verbose=0,
        )
    writer.flush()

    def scalars(folder):
        """{tag: ([steps], [values])} from the event files under folder."""
        found = {}
        for root, _, files in os.walk(folder):
            for name in files:
                records = tf.data.TFRecordDataset(os.path.join(root, name))
                for record in records:
                    event = tf.compat.v1.Event.FromString(record.numpy())
                    for value in event.summary.value:
                        if value.metadata.plugin_data.plugin_name != "scalars":
                            continue
                        steps, values = found.setdefault(value.tag, ([], []))
                        steps.append(event.step)
                        values.append(float(tf.make_ndarray(value.tensor)))
        return found

    # Written where the bounds change: step 0 (warm-up; step 1 starts the
    # ramp at the same values), step 2 (halfway) and step 3 (fully open).
    steps = scalars(os.path.join(tmp_path, "steps"))
    assert steps["renorm/rmax"] == ([0, 2, 3], [1.0, 2.0, 3.0])
    assert steps["renorm/dmax"] == ([0, 2, 3], [0.0, 2.5, 5.0])
    # Keras's TensorBoard callback writes the epoch logs it was given.
    assert scalars(board_dir)["epoch_renorm/rmax"] == ([0], [3.0])
