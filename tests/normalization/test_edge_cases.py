"""Edge cases named in issue #2, numerics, dtypes and execution modes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfnorm
from tests import reference as ref


def _data(shape, seed=0, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + loc).astype("float32")


def _moving(layer):
    return [w.numpy().copy() for w in layer.non_trainable_weights]


@pytest.mark.parametrize("virtual_batch_size", [None, 4])
def test_batch_1_in_training(virtual_batch_size):
    layer = tfnorm.BatchNormalization(
        virtual_batch_size=virtual_batch_size,
        beta_initializer="ones",
    )
    y = layer(_data((1, 3)), training=True).numpy()
    np.testing.assert_array_equal(y, np.ones((1, 3)))


@pytest.mark.parametrize(
    "kwargs", [{}, {"renorm": True}, {"virtual_batch_size": 2}]
)
def test_single_element_per_channel_4d(kwargs):
    # One example of 1x1 pixels: the fused kernel's Bessel variance is
    # 0 / 0 here; the step must still give beta and finite statistics.
    layer = tfnorm.BatchNormalization(**kwargs)
    x = _data((1, 1, 1, 3), loc=2.0)
    y = layer(x, training=True).numpy()
    # Plain and ghost give beta = 0; unclipped renorm adds d = x here.
    y_ref, _ = ref.bn_train(
        x, ref.initial_state(3, kwargs.get("renorm", False)), **kwargs
    )
    np.testing.assert_allclose(y, y_ref, atol=1e-6)
    for w in layer.weights:
        assert np.all(np.isfinite(w.numpy())), w.path


def test_ghost_group_of_one_example_gives_beta():
    layer = tfnorm.BatchNormalization(
        virtual_batch_size=3, beta_initializer="ones"
    )
    y = layer(_data((7, 2), loc=4.0), training=True).numpy()
    np.testing.assert_array_equal(y[6], [1.0, 1.0])
    assert np.all(np.isfinite(y))


def test_training_as_tensor_keeps_ghost_batches():
    x = np.concatenate([np.full((4, 2), -5.0), np.full((4, 2), 5.0)])
    x = (x + _data((8, 2), scale=0.1)).astype("float32")
    layer = tfnorm.BatchNormalization(virtual_batch_size=4, center=False)
    layer.build(x.shape)

    @tf.function
    def run(training):
        return layer(x, training=training)

    y = run(tf.constant(True)).numpy()
    np.testing.assert_allclose(y[:4].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(y[4:].mean(0), 0, atol=1e-5)
    before = _moving(layer)
    y_inf = run(tf.constant(False)).numpy()
    np.testing.assert_allclose(
        y_inf,
        ref.bn_inference(
            x,
            dict(zip(["moving_mean", "moving_variance"], before, strict=True)),
        ),
        rtol=1e-5,
        atol=1e-5,
    )
    for a, b in zip(before, _moving(layer), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unknown_batch_dimension_with_ghost_batches():
    layer = tfnorm.BatchNormalization(virtual_batch_size=4)
    layer.build((None, 3))

    @tf.function(input_signature=[tf.TensorSpec([None, 3])])
    def run(x):
        return layer(x, training=True)

    for batch in (10, 3, 8):
        x = _data((batch, 3), seed=batch)
        state = {
            "moving_mean": layer.moving_mean.numpy(),
            "moving_variance": layer.moving_variance.numpy(),
        }
        y_ref, _ = ref.bn_train(x, state, virtual_batch_size=4)
        np.testing.assert_allclose(run(x), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs", [{}, {"virtual_batch_size": 2}, {"renorm": True}]
)
def test_empty_batch_leaves_statistics(kwargs):
    layer = tfnorm.BatchNormalization(**kwargs)
    layer(_data((4, 3), loc=2.0), training=True)
    before = _moving(layer)
    y = layer(np.zeros((0, 3), "float32"), training=True)
    assert y.shape == (0, 3)
    for a, b in zip(before, _moving(layer), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs", [{}, {"virtual_batch_size": 2}, {"renorm": True}]
)
def test_fully_masked_batch_leaves_statistics(kwargs):
    layer = tfnorm.BatchNormalization(**kwargs)
    x = _data((4, 5, 3), loc=2.0)
    layer(x, training=True)
    before = _moving(layer)
    y = layer(x, training=True, mask=np.zeros((4, 5), bool)).numpy()
    for a, b in zip(before, _moving(layer), strict=True):
        np.testing.assert_array_equal(a, b)
    # Nothing to measure: the moving statistics normalize the batch.
    state = dict(
        zip(["moving_mean", "moving_variance"], before[:2], strict=True)
    )
    np.testing.assert_allclose(
        y, ref.bn_inference(x, state), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("fill", [np.nan, np.inf])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"virtual_batch_size": 2}, {"renorm": True}, {"axis": 1}],
    ids=["plain", "ghost", "renorm", "axis1"],
)
def test_non_finite_masked_out_elements_stay_out(kwargs, fill):
    # Padding may hold NaN or inf: the statistics multiplied it by the mask
    # (0 * nan = nan) and turned every output and statistic into NaN.
    # Keras 3 selects with `where` and is not affected there; but it still
    # normalizes the masked-out elements, so the backward pass multiplied
    # their zero gradient by NaN and poisoned gamma's gradient and every
    # valid element's. tfnorm zeroes non-finite masked-out elements.
    axis = kwargs.get("axis", -1)
    x = _data((6, 5, 3) if axis == -1 else (6, 3, 5), loc=1.0)
    mask = np.arange(5)[None, :] < np.array([5, 3, 1, 4, 2, 5])[:, None]
    hidden = ~mask[..., None] if axis == -1 else ~mask[:, None, :]
    padded = np.where(hidden, fill, x).astype("float32")
    layer = tfnorm.BatchNormalization(momentum=0.5, **kwargs)
    y = layer(padded, training=True, mask=mask).numpy()
    y_ref, state = ref.bn_train(
        x,
        ref.initial_state(3, kwargs.get("renorm", False)),
        momentum=0.5,
        mask=mask,
        **kwargs,
    )
    kept = np.broadcast_to(~hidden, x.shape)
    np.testing.assert_allclose(y[kept], y_ref[kept], atol=1e-5)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), state["moving_mean"], atol=1e-6
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), state["moving_variance"], atol=1e-6
    )

    # A loss on the kept outputs has the gradients it has with the real
    # values in the padding: finite, and blind to what the padding holds.
    def gradients(inputs):
        fresh = tfnorm.BatchNormalization(**kwargs)
        inputs = tf.constant(inputs)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = fresh(inputs, training=True, mask=mask)
            loss = tf.reduce_sum(tf.where(kept, out, 0.0) ** 2)
        grads = tape.gradient(loss, [inputs, *fresh.trainable_variables])
        return [grads[0].numpy()[kept], *(g.numpy() for g in grads[1:])]

    for got, want in zip(
        gradients(padded), gradients(x.astype("float32")), strict=True
    ):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mask_values_select_rather_than_weigh():
    # The docstring promises that non-zero entries select elements; a mask
    # of 3s (or 0.5s) weighed them instead.
    x = _data((6, 4, 3), loc=1.0)
    mask = np.ones((6, 4), "float32")
    mask[:, 0] = 3.0
    mask[:, 1] = 0.5
    mask[:, 2] = 0.0
    weighted = tfnorm.BatchNormalization(momentum=0.0)
    weighted(x, training=True, mask=mask)
    boolean = tfnorm.BatchNormalization(momentum=0.0)
    boolean(x, training=True, mask=mask != 0)
    for a, b in zip(_moving(weighted), _moving(boolean), strict=True):
        np.testing.assert_array_equal(a, b)


def test_axis_1_with_mask():
    # Channels first (batch, channels, time) with a (batch, time) mask:
    # Keras 3 assumes channels last here.
    rng = np.random.default_rng(1)
    x = _data((6, 3, 8), loc=1.0)
    mask = rng.random((6, 8)) > 0.3
    layer = tfnorm.BatchNormalization(axis=1, momentum=0.5)
    y = layer(x, training=True, mask=mask).numpy()
    y_ref, state = ref.bn_train(
        x, ref.initial_state(3), axis=1, mask=mask, momentum=0.5
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), state["moving_mean"], rtol=1e-5
    )


def test_channels_equal_to_sequence_length():
    # (batch, 4, 4) with axis=1: a channels-last assumption would silently
    # reduce over the wrong axis since the shapes agree.
    rng = np.random.default_rng(2)
    x = _data((5, 4, 4)) * np.arange(1, 5)[None, :, None].astype("float32")
    mask = rng.random((5, 4)) > 0.25
    layer = tfnorm.BatchNormalization(axis=1, momentum=0.0)
    layer(x, training=True, mask=mask)
    _, mean, var = ref.bn_moments(x, axis=1, mask=mask)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)


def test_keras_mask_propagation_from_embedding():
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    outputs = tfnorm.BatchNormalization(momentum=0.0)(h)
    model = keras.Model(inputs, outputs)
    tokens = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0]])
    model(tokens, training=True)
    emb = model.layers[1](tokens).numpy()
    _, mean, _ = ref.bn_moments(emb, mask=tokens != 0)
    bn = model.layers[-1]
    np.testing.assert_allclose(
        bn.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6
    )


def test_large_mean_variance_is_accurate_in_float32():
    x = _data((64, 8, 8, 4), loc=1e4)
    for kwargs in ({}, {"virtual_batch_size": 16}, {"renorm": True}):
        layer = tfnorm.BatchNormalization(momentum=0.0, **kwargs)
        y = layer(x, training=True).numpy()
        _, mean, var = ref.bn_moments(x)
        np.testing.assert_allclose(
            layer.moving_variance.numpy(), var, rtol=1e-3, err_msg=str(kwargs)
        )
        assert np.all(np.isfinite(y))
        if not kwargs.get("renorm"):
            # Unclipped renorm shifts by d = 1e4 here, so its outputs keep
            # float32's spacing at 1e4 and are not checked this way.
            np.testing.assert_allclose(y.std(axis=(0, 1, 2)), 1, atol=1e-3)


def test_float16_inputs_of_magnitude_1e3_stay_finite():
    x = (_data((32, 16), scale=1e3)).astype("float16")
    for kwargs in ({}, {"virtual_batch_size": 8}, {"renorm": True}):
        layer = tfnorm.BatchNormalization(dtype="float16", **kwargs)
        y = layer(x, training=True)
        assert y.dtype == tf.float16
        assert np.all(np.isfinite(y.numpy()))
        assert np.all(np.isfinite(layer.moving_variance.numpy()))
        if not kwargs.get("renorm"):
            # Unclipped renorm at step one scales by r = s_B / 1, about 1e3.
            np.testing.assert_allclose(
                np.asarray(y, np.float32).std(0), 1.0, atol=2e-2
            )


def test_jit_inference_on_constant_1e15_gives_zero():
    layer = tfnorm.BatchNormalization()
    layer.build((None, 2))
    layer.moving_mean.assign([1e15, 1e15])
    layer.moving_variance.assign([0.0, 0.0])
    x = np.full((4, 2), 1e15, "float32")
    run = tf.function(lambda v: layer(v, training=False), jit_compile=True)
    np.testing.assert_array_equal(run(x).numpy(), np.zeros((4, 2)))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize(
    "kwargs", [{}, {"virtual_batch_size": 4}, {"renorm": True}]
)
def test_mixed_precision(policy, kwargs):
    x = _data((8, 4, 4, 3), loc=3.0, scale=2.0)
    layer = tfnorm.BatchNormalization(dtype=policy, momentum=0.5, **kwargs)
    y = layer(x, training=True)
    assert y.dtype == tf.as_dtype(policy.split("_")[1])
    assert layer.moving_mean.dtype == "float32"
    y_ref, state = ref.bn_train(
        x.astype(y.dtype.as_numpy_dtype).astype("float64"),
        ref.initial_state(3, kwargs.get("renorm", False)),
        momentum=0.5,
        **kwargs,
    )
    tol = 1e-2 if policy == "mixed_float16" else 5e-2
    np.testing.assert_allclose(np.asarray(y, "float32"), y_ref, atol=tol)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), state["moving_mean"], rtol=tol, atol=tol
    )


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}])
def test_float64_policy_keeps_moving_statistics_in_float64(kwargs):
    # The moving-average update used to round to float32 before storing
    # into the float64 variables (errors of about 1e-7 relative).
    x = _data((16, 3), loc=1.0, scale=3.0).astype("float64") + 1e-9
    layer = tfnorm.BatchNormalization(dtype="float64", momentum=0.5, **kwargs)
    layer(x, training=True)
    _, state = ref.bn_train(
        x,
        ref.initial_state(3, kwargs.get("renorm", False)),
        momentum=0.5,
        **kwargs,
    )
    for w in layer.non_trainable_weights:
        assert w.dtype == "float64", w.path
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), state["moving_mean"], rtol=1e-12
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), state["moving_variance"], rtol=1e-12
    )


@pytest.mark.parametrize(
    "mode",
    [{"run_eagerly": True}, {}, {"jit_compile": True}],
    ids=["eager", "graph", "xla"],
)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"virtual_batch_size": 8}, {"renorm": True, "virtual_batch_size": 8}],
    ids=["plain", "ghost", "ghost_renorm"],
)
def test_fit_in_every_execution_mode(mode, kwargs):
    x = _data((32, 5), loc=2.0)
    y = x.sum(1, keepdims=True)
    layer = tfnorm.BatchNormalization(momentum=0.0, **kwargs)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.compile(optimizer="sgd", loss="mse", **mode)
    # One batch with momentum 0: the moving statistics become the batch's.
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    _, mean, var = ref.bn_moments(x)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5)
    if not kwargs.get("renorm"):
        np.testing.assert_allclose(
            layer.moving_variance.numpy(), var, rtol=1e-5
        )


def test_trainable_false_means_inference_mode_in_fit():
    x = _data((16, 3), loc=5.0)
    layer = tfnorm.BatchNormalization(trainable=False)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.compile(optimizer="sgd", loss="mse")
    before = [w.copy() for w in layer.get_weights()]
    model.fit(x, np.ones((16, 1)), batch_size=8, verbose=0)
    for a, b in zip(before, layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        layer(x, training=True),
        ref.bn_inference(
            x, {"moving_mean": np.zeros(3), "moving_variance": np.ones(3)}
        ),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"virtual_batch_size": 3},
        {"renorm": True},
        {"renorm": True, "virtual_batch_size": 4},
    ],
    ids=["plain", "ghost", "renorm", "ghost_renorm"],
)
def test_fused_kernel_and_xla_paths_agree(kwargs):
    # Graph mode takes TF's fused kernel for 4D channels-last float32
    # inputs; XLA takes the generic ops. Both must give the same step.
    x = tf.constant(_data((10, 3, 3, 4), loc=2.0, scale=3.0))
    results = []
    for jit in (False, True):
        layer = tfnorm.BatchNormalization(momentum=0.5, **kwargs)
        layer.build(x.shape)
        layer.gamma.assign([0.5, 1.0, 1.5, -1.0])

        @tf.function(jit_compile=jit)
        def step(layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * tf.sin(x))
            return y, tape.gradient(loss, [x, layer.gamma, layer.beta])

        y, grads = step()
        y2, _ = step()
        results.append([y, y2, *grads, *layer.non_trainable_weights])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4
        )


def test_empty_4d_batch_in_graph_mode_leaves_statistics():
    layer = tfnorm.BatchNormalization()
    layer(_data((2, 3, 3, 4), loc=1.0), training=True)
    before = _moving(layer)

    @tf.function(input_signature=[tf.TensorSpec([None, 3, 3, 4])])
    def run(x):
        return layer(x, training=True)

    assert run(np.zeros((0, 3, 3, 4), "float32")).shape == (0, 3, 3, 4)
    for a, b in zip(before, _moving(layer), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["uint8", "int32"])
def test_integer_inputs_are_normalized_in_float32(dtype):
    x = np.random.default_rng(0).integers(0, 255, (16, 6, 6, 1))
    x = x.astype(dtype)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1), dtype=dtype),
            tfnorm.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile("sgd", "mse")
    model.fit(x, np.ones((16, 1)), batch_size=8, verbose=0)
    layer = tfnorm.BatchNormalization(momentum=0.0)
    y = layer(x, training=True)
    assert y.dtype == tf.float32
    _, mean, var = ref.bn_moments(x)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(
        layer(x).numpy(),
        ref.bn_inference(x, {"moving_mean": mean, "moving_variance": var}),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "kwargs", [{}, {"renorm": True}, {"virtual_batch_size": 2}]
)
def test_full_half_precision_policy_on_4d_inputs(dtype, kwargs):
    # Variables are half precision too under these policies; the float32
    # statistics must be cast where they meet them.
    x = _data((4, 3, 3, 2), loc=1.0).astype(dtype)
    layer = tfnorm.BatchNormalization(dtype=dtype, **kwargs)
    y = layer(x, training=True)
    assert y.dtype == tf.as_dtype(dtype)
    for w in layer.weights:
        assert np.all(np.isfinite(np.asarray(w.numpy(), "float32")))
