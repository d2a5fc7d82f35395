"""precise_bn and the PreciseBN callback against numpy float64 oracles."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfnorm
from tests import reference as ref
from tfnorm.callbacks import PreciseBN

EPS = 1e-3


def _data(shape, seed=0, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + loc).astype("float32")


def _batches(sizes, channels=3, seed=0):
    """Uneven batches whose means differ, so pooling matters."""
    return [
        _data((n, channels), seed=seed + i, loc=2.0 * i - 3.0, scale=1.0 + i)
        for i, n in enumerate(sizes)
    ]


# The layers PreciseBN must handle, built fresh per test.
LAYERS = {
    "keras": lambda: keras.layers.BatchNormalization(name="bn"),
    "keras_renorm": lambda: keras.layers.BatchNormalization(
        renorm=True, name="bn"
    ),
    "plain": lambda: tfnorm.BatchNormalization(name="bn"),
    "ghost": lambda: tfnorm.BatchNormalization(virtual_batch_size=4, name="bn"),
    "renorm": lambda: tfnorm.BatchNormalization(
        renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0}, name="bn"
    ),
    "ghost_renorm": lambda: tfnorm.BatchNormalization(
        renorm=True, virtual_batch_size=4, name="bn"
    ),
}


def _single_bn_model(make, channels=3):
    return keras.Sequential([keras.Input((channels,)), make()])


def _assert_population(layer, mean, var, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol, atol)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol, atol)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_one_layer_holds_pooled_statistics_of_uneven_batches(kind):
    batches = _batches([7, 16, 3, 20])
    model = _single_bn_model(LAYERS[kind])
    used = tfnorm.precise_bn(model, batches, num_batches=200)
    assert used == 4

    # Oracle: every element seen, weighed by count, biased variance.
    _, mean, var = ref.bn_moments(np.concatenate(batches))
    bn = model.get_layer("bn")
    _assert_population(bn, mean, var)
    # Neither an EMA nor the mean of the batch variances.
    per_batch = np.mean([ref.bn_moments(b)[2] for b in batches], axis=0)
    assert np.all(np.abs(per_batch - var) > 0.5)
    if getattr(bn, "renorm", False):
        stddev = np.sqrt(var + EPS)
        np.testing.assert_allclose(bn.moving_stddev.numpy(), stddev, 1e-5)
        np.testing.assert_allclose(bn.renorm_stddev.numpy(), stddev, 1e-5)
        np.testing.assert_allclose(bn.renorm_mean.numpy(), mean, 1e-5, 1e-5)


@pytest.mark.parametrize("renorm", [False, True])
def test_float64_layer_gets_float64_statistics(renorm):
    # The float64 pooled statistics used to be rounded to float32 before
    # being stored in the float64 variables of a float64 layer.
    batches = [b.astype("float64") + 1e-9 for b in _batches([7, 16])]
    layer = tfnorm.BatchNormalization(dtype="float64", renorm=renorm)
    tfnorm.precise_bn(layer, batches)
    _, mean, var = ref.bn_moments(np.concatenate(batches))
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-12)


def test_uses_first_num_batches_and_dataset_tuples():
    batches = _batches([5, 6, 7, 8])
    dataset = tf.data.Dataset.from_generator(
        lambda: ((b, b[:, :1], np.ones(len(b), "float32")) for b in batches),
        output_signature=(
            tf.TensorSpec((None, 3), tf.float32),
            tf.TensorSpec((None, 1), tf.float32),
            tf.TensorSpec((None,), tf.float32),
        ),
    )
    model = _single_bn_model(LAYERS["plain"])
    assert tfnorm.precise_bn(model, dataset, num_batches=2) == 2
    _, mean, var = ref.bn_moments(np.concatenate(batches[:2]))
    _assert_population(model.get_layer("bn"), mean, var)

    pairs = [(b, b[:, :1]) for b in batches]
    assert tfnorm.precise_bn(model, pairs, num_batches=10) == 4
    _, mean, var = ref.bn_moments(np.concatenate(batches))
    _assert_population(model.get_layer("bn"), mean, var)


def test_conv_input_with_channels_first_axis():
    x = _data((6, 4, 5, 5), loc=1.5, scale=2.0)
    model = keras.Sequential(
        [keras.Input((4, 5, 5)), tfnorm.BatchNormalization(axis=1, name="bn")]
    )
    tfnorm.precise_bn(model, [x[:2], x[2:]])
    _, mean, var = ref.bn_moments(x, axis=1)
    _assert_population(model.get_layer("bn"), mean, var)


@pytest.mark.parametrize("kind", ["keras", "plain", "ghost"])
def test_masked_elements_are_left_out(kind):
    x = _data((8, 5, 3), loc=1.0)
    # Padding zeros that Masking hides; they would pull the mean to 0.
    lengths = np.array([5, 3, 1, 4, 2, 5, 1, 3])
    mask = np.arange(5)[None, :] < lengths[:, None]
    x = np.where(mask[..., None], x, 0.0).astype("float32")
    model = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.Masking(0.0), LAYERS[kind]()]
    )
    tfnorm.precise_bn(model, [x[:3], x[3:]])
    _, mean, var = ref.bn_moments(x, axis=-1, mask=mask)
    _assert_population(model.get_layer("bn"), mean, var)


def test_non_finite_masked_out_elements_are_left_out():
    x = _data((8, 5, 3), loc=1.0)
    lengths = np.array([5, 3, 1, 4, 2, 5, 1, 3])
    mask = np.arange(5)[None, :] < lengths[:, None]
    # NaN padding: multiplying it by a zero mask gave NaN statistics.
    padded = np.where(mask[..., None], x, np.nan).astype("float32")

    class Padded(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.bn = tfnorm.BatchNormalization()

        def call(self, inputs):
            return self.bn(inputs, mask=tf.constant(mask))

    model = Padded()
    tfnorm.precise_bn(model, [padded])
    _, mean, var = ref.bn_moments(x, axis=-1, mask=mask)
    _assert_population(model.bn, mean, var)


def _two_bn_model(first, dropout_rate=0.5):
    """BN -> Dense -> Dropout -> BN with fixed, known Dense weights."""
    inputs = keras.Input((3,))
    h = first(name="bn1")(inputs)
    dense = keras.layers.Dense(
        4,
        kernel_initializer=keras.initializers.RandomNormal(seed=3),
        bias_initializer="ones",
        name="dense",
    )
    h = dense(h)
    h = keras.layers.Dropout(dropout_rate, seed=1)(h)
    outputs = tfnorm.BatchNormalization(name="bn2")(h)
    return keras.Model(inputs, outputs)


FIRST_LAYERS = {
    "plain": {},
    "ghost": {"virtual_batch_size": 4},
    # Renorm with far-off statistics and a fast momentum: its output
    # depends on the state, which must be the same for every batch.
    "renorm": {
        "renorm": True,
        "renorm_momentum": 0.5,
        "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
    },
}


@pytest.mark.parametrize("kind", sorted(FIRST_LAYERS))
def test_second_layer_sees_training_mode_input_without_dropout(kind):
    options = FIRST_LAYERS[kind]
    batches = _batches([10, 12, 6])
    model = _two_bn_model(
        lambda name: tfnorm.BatchNormalization(
            beta_initializer="ones", name=name, **options
        )
    )
    state = ref.initial_state(3, renorm=kind == "renorm")
    if kind == "renorm":
        state["renorm_mean"] = np.array([2.0, -2.0, 0.0])
        state["renorm_stddev"] = np.array([0.5, 4.0, 1.0])
        bn1 = model.get_layer("bn1")
        bn1.renorm_mean.assign(state["renorm_mean"])
        bn1.renorm_stddev.assign(state["renorm_stddev"])
    tfnorm.precise_bn(model, batches)

    kernel, bias = (w.numpy() for w in model.get_layer("dense").weights)
    inputs = []
    for b in batches:
        # bn1 in training mode (batch, ghost-batch or renormalized
        # statistics) from the same frozen state for every batch.
        y, _ = ref.bn_train(b, state, beta=np.ones(3), **options)
        # Dropout off: bn2's input is the dense output as it is.
        inputs.append(y @ kernel.astype(np.float64) + bias)
    _, mean1, var1 = ref.bn_moments(np.concatenate(batches))
    _, mean2, var2 = ref.bn_moments(np.concatenate(inputs))
    _assert_population(model.get_layer("bn1"), mean1, var1)
    _assert_population(model.get_layer("bn2"), mean2, var2)


def test_frozen_layer_is_untouched_and_feeds_its_inference_output():
    batches = _batches([8, 8])
    model = _two_bn_model(keras.layers.BatchNormalization, dropout_rate=0.0)
    bn1 = model.get_layer("bn1")
    bn1.moving_mean.assign([1.0, -1.0, 0.5])
    bn1.moving_variance.assign([4.0, 2.0, 0.5])
    bn1.trainable = False
    before = [v.numpy().copy() for v in bn1.weights]

    tfnorm.precise_bn(model, batches)
    for old, new in zip(before, bn1.weights, strict=True):
        np.testing.assert_array_equal(new.numpy(), old)

    state = {
        "moving_mean": np.array([1.0, -1.0, 0.5]),
        "moving_variance": np.array([4.0, 2.0, 0.5]),
    }
    kernel, bias = (w.numpy() for w in model.get_layer("dense").weights)
    inputs = [ref.bn_inference(b, state) @ kernel + bias for b in batches]
    _, mean, var = ref.bn_moments(np.concatenate(inputs))
    _assert_population(model.get_layer("bn2"), mean, var)


def test_weights_optimizer_state_and_other_variables_unchanged():
    batches = _batches([8, 8, 8])
    model = _two_bn_model(
        lambda name: tfnorm.BatchNormalization(renorm=True, name=name)
    )
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=False)
    x = np.concatenate(batches)
    model.fit(x, np.ones((24, 4)), batch_size=8, verbose=0)

    bn_stats = {
        id(v)
        for name in ("bn1", "bn2")
        for v in model.get_layer(name).non_trainable_variables
    }
    others = [v for v in model.variables if id(v) not in bn_stats]
    before = [v.numpy().copy() for v in others]
    optimizer = [v.numpy().copy() for v in model.optimizer.variables]
    assert len(model.trainable_variables) == 6

    tfnorm.precise_bn(model, batches)
    for old, v in zip(before, others, strict=True):
        np.testing.assert_array_equal(v.numpy(), old, err_msg=v.path)
    for old, v in zip(optimizer, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(v.numpy(), old, err_msg=v.path)
    # The patched `call` is gone again: training still updates statistics.
    assert "call" not in vars(model.get_layer("bn1"))


def test_nested_model():
    inner = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(3), LAYERS["ghost"]()],
        name="inner",
    )
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1)(inner(inputs))
    model = keras.Model(inputs, outputs)
    batches = _batches([6, 9])
    tfnorm.precise_bn(model, batches)

    kernel, bias = (w.numpy() for w in inner.layers[0].weights)
    dense_out = np.concatenate([b @ kernel + bias for b in batches])
    _, mean, var = ref.bn_moments(dense_out)
    _assert_population(inner.get_layer("bn"), mean, var)


def test_state_is_restored_when_the_forward_pass_fails():
    model = _single_bn_model(LAYERS["renorm"])
    bn = model.get_layer("bn")
    before = [v.numpy().copy() for v in bn.non_trainable_variables]
    bad = [_data((4, 3)), _data((4, 5))]
    with pytest.raises(ValueError):
        tfnorm.precise_bn(model, bad)
    for old, v in zip(before, bn.non_trainable_variables, strict=True):
        np.testing.assert_array_equal(v.numpy(), old)
    assert "call" not in vars(bn)


def test_rejects_empty_dataset_and_bad_num_batches():
    model = _single_bn_model(LAYERS["plain"])
    with pytest.raises(ValueError) as info:
        tfnorm.precise_bn(model, [])
    assert str(info.value) == (
        "`dataset` yielded no batch, so there are no statistics to "
        "compute. Received: dataset=[]"
    )
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError) as info:
            tfnorm.precise_bn(model, [_data((4, 3))], num_batches=bad)
        assert str(info.value) == (
            "Argument `num_batches` must be a positive integer. "
            f"Received: num_batches={bad!r}"
        )
    with pytest.raises(ValueError) as info:
        PreciseBN([], num_batches=0)
    assert str(info.value) == (
        "Argument `num_batches` must be a positive integer. "
        "Received: num_batches=0"
    )


def test_callback_recomputes_at_each_epoch_end():
    x = _data((48, 3), loc=2.0, scale=3.0)
    dataset = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(10)

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.means = []

        def on_epoch_end(self, epoch, logs=None):
            self.means.append(bn.moving_mean.numpy().copy())

    model = keras.Sequential(
        [keras.Input((3,)), LAYERS["plain"](), keras.layers.Dense(1)]
    )
    bn = model.get_layer("bn")
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
    record = Record()
    model.fit(
        dataset,
        epochs=2,
        callbacks=[PreciseBN(dataset, num_batches=3), record],
        shuffle=False,
        verbose=0,
    )
    # The BN layer comes first, so its input does not depend on the
    # weights: the first 3 batches (30 examples) give the statistics.
    _, mean, var = ref.bn_moments(x[:30])
    for seen in record.means:
        np.testing.assert_allclose(seen, mean, 1e-5, 1e-5)
    _assert_population(bn, mean, var)


def test_callback_rejects_a_one_shot_generator():
    batches = (np.zeros((4, 3), "float32") for _ in range(3))
    with pytest.raises(ValueError) as info:
        PreciseBN(batches, num_batches=3)
    assert str(info.value).startswith(
        "PreciseBN runs at every epoch end and iterates `dataset` each "
        "time, so it needs a re-iterable dataset (a tf.data.Dataset, a "
        "list of batches, a keras PyDataset), not a one-shot iterator or "
        "generator. Received: dataset=<generator object"
    )


def test_an_iterator_keeps_the_batches_not_used():
    model = keras.Sequential([keras.Input((3,)), tfnorm.BatchNormalization()])
    batches = iter([np.full((4, 3), i, "float32") for i in range(6)])
    assert tfnorm.precise_bn(model, batches, num_batches=2) == 2
    assert len(list(batches)) == 4


@pytest.mark.parametrize("as_tensor", [False, True])
def test_an_unbatched_array_is_rejected_with_the_fix(as_tensor):
    # An array iterates over its rows; the failure came from deep inside
    # Keras, about shapes.
    model = keras.Sequential([keras.Input((3,)), tfnorm.BatchNormalization()])
    x = np.ones((64, 3), "float32")
    data = tf.constant(x) if as_tensor else x
    message = (
        "`dataset` must yield batches (a tf.data.Dataset or an iterable of "
        "batches); an array iterates over single examples. Batch it first, "
        "e.g. tf.data.Dataset.from_tensor_slices(x).batch(128). "
        "Received: an array of shape (64, 3)"
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        tfnorm.precise_bn(model, data)
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        PreciseBN(data)
