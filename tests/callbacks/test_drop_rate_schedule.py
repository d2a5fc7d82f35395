"""DropRateSchedule: rates changed inside one compiled fit."""

import re

import keras
import numpy as np
import pytest
from keras import ops

from tfnorm.callbacks import DropRateSchedule
from tfnorm.dropout import ConcreteDropout
from tfnorm.dropout import DropBlock2D
from tfnorm.dropout import DropPath


class _DroppedRows(keras.layers.Layer):
    """Identity that stores the fraction of all-zero rows it saw."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fraction = self.add_weight(
            shape=(), initializer="zeros", trainable=False
        )

    def call(self, x):
        zero_rows = ops.all(ops.equal(x, 0), axis=-1)
        self.fraction.assign(ops.mean(ops.cast(zero_rows, "float32")))
        return x


class _Recorder(keras.callbacks.Callback):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(float(self.layer.fraction.numpy()))


@pytest.mark.parametrize("jit", [False, True])
def test_rate_changes_inside_one_compiled_fit(jit):
    batch = 512
    drop = DropPath(0.0, seed=1)
    probe = _DroppedRows()
    inputs = keras.Input((16,))
    outputs = keras.layers.Dense(1)(probe(drop(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile("sgd", "mse", jit_compile=jit)
    recorder = _Recorder(probe)
    schedule = DropRateSchedule(lambda step: 0.0 if step < 3 else 0.9)
    x = np.ones((6 * batch, 16), "float32")
    history = model.fit(
        x,
        np.zeros((len(x), 1)),
        batch_size=batch,
        shuffle=False,
        callbacks=[schedule, recorder],
        verbose=0,
    )
    assert recorder.seen[:3] == [0.0, 0.0, 0.0]
    stderr = np.sqrt(0.9 * 0.1 / batch)
    for observed in recorder.seen[3:]:
        assert abs(observed - 0.9) < 4 * stderr, f"dropped rows {observed}"
    assert drop.rate == 0.9
    assert history.history["drop_rate"] == [0.9]


def test_layers_filter_and_concrete_dropout_left_alone():
    a = DropPath(0.1, name="a")
    b = DropBlock2D(0.1, block_size=2, name="b")
    concrete = ConcreteDropout(keras.layers.Dense(2), initial_rate=0.2)
    inputs = keras.Input((4, 4, 2))
    h = keras.layers.Flatten()(b(a(inputs)))
    model = keras.Model(inputs, concrete(h))
    model.compile("sgd", "mse")
    schedule = DropRateSchedule(lambda step: 0.3, layers=["b"])
    model.fit(
        np.ones((4, 4, 4, 2)),
        np.zeros((4, 2)),
        callbacks=[schedule],
        verbose=0,
    )
    assert a.rate == 0.1
    assert b.rate == 0.3
    assert 0.0 < concrete.rate < 1.0 and concrete.rate != 0.3


def test_model_without_schedulable_layer_is_rejected():
    model = keras.Sequential(
        [keras.Input((3,), name="x"), keras.layers.Dense(1)], name="plain"
    )
    model.compile("sgd", "mse")
    message = (
        "DropRateSchedule found no schedulable tfnorm dropout layer "
        "(DropBlock1D, DropBlock2D, DropPath, DropConnect, Uout) in the "
        "model. Received: model='plain'"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        model.fit(
            np.ones((2, 3)),
            np.ones((2, 1)),
            callbacks=[DropRateSchedule(lambda step: 0.1)],
            verbose=0,
        )


def test_schedule_returning_rate_one_is_rejected():
    model = keras.Sequential([keras.Input((3,)), DropPath(0.1)])
    model.compile("sgd", "mse")
    message = "`rate` must be a number in the range [0, 1). Received: rate=1.0"
    with pytest.raises(ValueError, match=re.escape(message)):
        model.fit(
            np.ones((2, 3)),
            np.ones((2, 3)),
            callbacks=[DropRateSchedule(lambda step: 1.0)],
            verbose=0,
        )


def test_schedule_must_be_callable():
    message = (
        "`schedule` must be a callable mapping the step to a rate. "
        "Received: schedule=0.1"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        DropRateSchedule(0.1)
