"""MirroredStrategy over the two logical CPUs that conftest.py configures."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfnorm
from tests import reference as ref
from tfnorm.normalization import _moments


@pytest.fixture(scope="module")
def strategy():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2, devices
    # Collective ops are keyed per process: a second MirroredStrategy on
    # the same devices (the zoo's tests make one) reuses the same keys with
    # other shapes and aborts. Reducing through one device uses no
    # collective keys, and the layer's all-reduces are the same calls.
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


@pytest.fixture(params=["float64", "float32_two_step"])
def combination(request, monkeypatch):
    """Runs a test with each way of combining replica moments.

    The float32 two-step combination is what TPUs use (they have no
    float64); here it is forced on CPU replicas.
    """
    if request.param == "float32_two_step":
        monkeypatch.setattr(
            _moments,
            "all_reduce_moments",
            functools.partial(_moments.all_reduce_moments, float64=False),
        )
    return request.param


def _data(shape, seed=0, loc=0.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2 + loc).astype("float32")


def _run_replicas(strategy, layer, parts, masks=None):
    """Calls `layer` in training mode on one part per replica."""

    def value_fn(context):
        return tf.constant(parts[context.replica_id_in_sync_group])

    def mask_fn(context):
        return tf.constant(masks[context.replica_id_in_sync_group])

    x = strategy.experimental_distribute_values_from_function(value_fn)
    m = None
    if masks is not None:
        m = strategy.experimental_distribute_values_from_function(mask_fn)

    @tf.function
    def step(x, m):
        return strategy.run(
            lambda xi, mi: layer(xi, training=True, mask=mi), args=(x, m)
        )

    out = step(x, m)
    return [v.numpy() for v in strategy.experimental_local_results(out)]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"renorm": True}, {"virtual_batch_size": 3}],
    ids=["plain", "renorm", "ghost"],
)
def test_synchronized_equals_one_device_on_global_batch(
    strategy, kwargs, combination
):
    # Uneven replica batches (5 and 3 examples) must weigh by count.
    parts = [_data((5, 4, 3), 0, loc=1.0), _data((3, 4, 3), 1, loc=-2.0)]
    with strategy.scope():
        layer = tfnorm.BatchNormalization(
            synchronized=True, momentum=0.5, **kwargs
        )
        layer.build((None, 4, 3))
    single = tfnorm.BatchNormalization(momentum=0.5, **kwargs)
    for step in range(2):
        shifted = [p + step for p in parts]
        outs = _run_replicas(strategy, layer, shifted)
        full = single(np.concatenate(shifted), training=True).numpy()
        if "virtual_batch_size" not in kwargs:
            np.testing.assert_allclose(
                np.concatenate(outs), full, rtol=1e-5, atol=1e-5
            )
        for ours, theirs in zip(
            layer.non_trainable_weights,
            single.non_trainable_weights,
            strict=True,
        ):
            np.testing.assert_allclose(
                ours.numpy(),
                theirs.numpy(),
                rtol=1e-5,
                atol=1e-6,
                err_msg=ours.path,
            )


def test_synchronized_with_mask_uses_global_masked_statistics(strategy):
    parts = [_data((4, 6, 2), 0, loc=3.0), _data((4, 6, 2), 1)]
    rng = np.random.default_rng(0)
    masks = [rng.random((4, 6)) > 0.5, rng.random((4, 6)) > 0.2]
    with strategy.scope():
        layer = tfnorm.BatchNormalization(synchronized=True, momentum=0.0)
        layer.build((None, 6, 2))
    _run_replicas(strategy, layer, parts, masks)
    _, mean, var = ref.bn_moments(
        np.concatenate(parts), mask=np.concatenate(masks)
    )
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)


def test_unsynchronized_statistics_are_the_mean_over_replicas(strategy):
    parts = [_data((6, 3), 0, loc=4.0), _data((6, 3), 1, loc=-1.0)]
    with strategy.scope():
        layer = tfnorm.BatchNormalization(momentum=0.6)
        layer.build((None, 3))
    states = [ref.initial_state(3), ref.initial_state(3)]
    for step in range(3):
        shifted = [p * (step + 1) for p in parts]
        outs = _run_replicas(strategy, layer, shifted)
        results = [
            ref.bn_train(p, s, momentum=0.6)
            for p, s in zip(shifted, states, strict=True)
        ]
        # Each replica normalizes with its own batch.
        for out, (y_ref, _) in zip(outs, results, strict=True):
            np.testing.assert_allclose(out, y_ref, rtol=1e-5, atol=1e-5)
        states = [r[1] for r in results]
        expected = {k: (states[0][k] + states[1][k]) / 2 for k in states[0]}
        states = [expected, expected]
        for name in ("moving_mean", "moving_variance"):
            variable = getattr(layer, name)
            for value in strategy.experimental_local_results(variable.value):
                np.testing.assert_allclose(
                    value.numpy(), expected[name], rtol=1e-5, err_msg=name
                )


@pytest.mark.parametrize("synchronized", [False, True])
def test_fit_under_mirrored_strategy(strategy, synchronized, tmp_path):
    x = _data((32, 4), loc=1.0)
    y = x.sum(1, keepdims=True)
    with strategy.scope():
        inputs = keras.Input((4,))
        h = tfnorm.BatchNormalization(
            synchronized=synchronized, virtual_batch_size=4, renorm=True
        )(inputs)
        model = keras.Model(inputs, keras.layers.Dense(1)(h))
        model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5
    )


def test_synchronized_gradients_equal_one_device(strategy, combination):
    # Each replica's loss is its share of the global mean, so the sum of
    # the replicas' gradients must equal the one-device gradient, the
    # cross-replica paths through the shared statistics included.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6, 6, 3)).astype("float32")
    t = rng.integers(0, 5, 16)
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"
    )

    def make():
        keras.utils.set_random_seed(0)
        layers = [keras.Input((6, 6, 3))]
        for _ in range(3):
            layers += [
                keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
                tfnorm.BatchNormalization(synchronized=True),
                keras.layers.ReLU(),
            ]
        layers += [keras.layers.Flatten(), keras.layers.Dense(5)]
        return keras.Sequential(layers)

    single = make()
    with tf.GradientTape() as tape:
        value = loss(t, single(x, training=True)) / 16
    expected = tape.gradient(value, single.trainable_variables)

    with strategy.scope():
        model = make()

    def step(xi, ti):
        with tf.GradientTape() as tape:
            value = loss(ti, model(xi, training=True)) / 16
        return tape.gradient(value, model.trainable_variables)

    data = tf.data.Dataset.from_tensor_slices((x, t)).batch(16)
    xs, ts = next(iter(strategy.experimental_distribute_dataset(data)))
    got = tf.function(lambda a, b: strategy.run(step, args=(a, b)))(xs, ts)
    for want, per_replica in zip(expected, got, strict=True):
        total = sum(
            v.numpy() for v in strategy.experimental_local_results(per_replica)
        )
        np.testing.assert_allclose(total, want.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("float64", [True, False])
def test_combined_moments_keep_variance_of_large_mean_inputs(strategy, float64):
    # Mean 1e4, std 1, uneven replicas: summing squares about zero in
    # float32 would lose the variance entirely; both combinations keep it.
    rng = np.random.default_rng(5)
    parts = [
        (rng.standard_normal((n, 3)) + 1e4 + i).astype("float32")
        for i, n in enumerate((7, 2))
    ]
    full = np.concatenate(parts).astype(np.float64)

    def value_fn(context):
        return tf.constant(parts[context.replica_id_in_sync_group])

    x = strategy.experimental_distribute_values_from_function(value_fn)

    def combine(xi):
        local = _moments.local_moments(xi, None, [0], -1)
        ctx = tf.distribute.get_replica_context()
        return tuple(_moments.all_reduce_moments(ctx, local, float64=float64))

    out = tf.function(lambda v: strategy.run(combine, args=(v,)))(x)
    for replica in range(2):
        count, mean, m2 = (
            strategy.experimental_local_results(v)[replica].numpy() for v in out
        )
        np.testing.assert_array_equal(count, 9)
        np.testing.assert_allclose(mean, full.mean(0), rtol=1e-7)
        # Each replica's float32 mean is rounded to about 5e-4 at 1e4,
        # which moves the spread between replica means by about as much;
        # squares summed about zero in float32 would be off by units.
        np.testing.assert_allclose(m2 / 9, full.var(0), rtol=2e-3)


@pytest.mark.parametrize(
    "cls",
    [
        tf.distribute.TPUStrategy,
        tf.distribute.experimental.TPUStrategy,
        tf.compat.v1.distribute.experimental.TPUStrategy,
    ],
    ids=["v2", "experimental", "v1"],
)
def test_every_tpu_strategy_combines_in_float32(cls):
    # The experimental and TF1 TPU strategies are not subclasses of
    # tf.distribute.TPUStrategy and used to get the float64 all-reduce,
    # which TPUs cannot run. No TPU here: an uninitialized instance is
    # enough for the type check.
    assert not _moments.combines_in_float64(cls.__new__(cls))
    assert _moments.combines_in_float64(tf.distribute.MirroredStrategy())
