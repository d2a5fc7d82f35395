"""tfnorm.BatchNormalization against the float64 numpy reference and Keras."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfnorm
from tests import reference as ref

MODES = {
    "plain": {},
    "ghost": {"virtual_batch_size": 4},
    "renorm": {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.3}},
    "renorm_unclipped": {"renorm": True},
    "ghost_renorm": {
        "renorm": True,
        "virtual_batch_size": 3,
        "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
    },
}


def _data(shape, seed=0, loc=1.0, scale=2.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + loc).astype("float32")


def _state_of(layer):
    names = ["moving_mean", "moving_variance"]
    if layer.renorm:
        names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    return {n: getattr(layer, n).numpy() for n in names}


def _run_against_reference(kwargs, shape, axis=-1, steps=4, mask=None):
    layer = tfnorm.BatchNormalization(
        axis=axis, momentum=0.8, renorm_momentum=0.7, **kwargs
    )
    ref_kwargs = {k: v for k, v in kwargs.items()}
    channels = shape[axis]
    state = ref.initial_state(channels, renorm=kwargs.get("renorm", False))
    layer.build(shape)
    gamma = np.linspace(0.5, 1.5, channels).astype("float32")
    beta = np.linspace(-1, 1, channels).astype("float32")
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    for step in range(steps):
        x = _data(shape, seed=step, loc=step)
        y = layer(x, training=True, mask=mask).numpy()
        y_ref, state = ref.bn_train(
            x,
            state,
            gamma,
            beta,
            axis=axis,
            momentum=0.8,
            renorm_momentum=0.7,
            mask=mask,
            **ref_kwargs,
        )
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        got = _state_of(layer)
        for name, value in state.items():
            np.testing.assert_allclose(
                got[name], value, rtol=1e-5, atol=1e-6, err_msg=name
            )
    x = _data(shape, seed=99)
    y_inf = layer(x, training=False).numpy()
    y_inf_ref = ref.bn_inference(x, state, gamma, beta, axis=axis)
    np.testing.assert_allclose(y_inf, y_inf_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(
    "shape,axis",
    [((12, 5), -1), ((10, 6, 3), -1), ((8, 4, 4, 3), -1), ((8, 3, 6), 1)],
)
def test_matches_numpy_reference(mode, shape, axis):
    _run_against_reference(MODES[mode], shape, axis)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_masked_matches_numpy_reference(mode):
    rng = np.random.default_rng(7)
    mask = rng.random((12, 6)) > 0.4
    _run_against_reference(MODES[mode], (12, 6, 3), mask=mask)


def test_batch_10_with_virtual_batch_size_4():
    # Groups of 4, 4 and 2: the last, smaller group has its own statistics.
    _run_against_reference({"virtual_batch_size": 4}, (10, 3))
    layer = tfnorm.BatchNormalization(virtual_batch_size=4, center=False)
    x = _data((10, 3))
    y = layer(x, training=True).numpy()
    for group in (slice(0, 4), slice(4, 8), slice(8, 10)):
        np.testing.assert_allclose(y[group].mean(0), 0, atol=1e-5)


def test_ghost_groups_are_contiguous():
    # Two groups with very different means: contiguous grouping removes
    # each group's own mean, strided grouping (tf-keras) would not.
    x = np.concatenate([np.full((4, 2), -5.0), np.full((4, 2), 5.0)])
    x = (x + _data((8, 2), scale=0.1)).astype("float32")
    layer = tfnorm.BatchNormalization(virtual_batch_size=4, center=False)
    y = layer(x, training=True).numpy()
    np.testing.assert_allclose(y[:4].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(y[4:].mean(0), 0, atol=1e-5)


@pytest.mark.parametrize(
    "shape,axis",
    [((16, 5), -1), ((6, 7, 3), -1), ((4, 5, 5, 8), -1), ((6, 3, 5), 1)],
)
@pytest.mark.parametrize("renorm", [False, True])
def test_equals_keras_batch_normalization(shape, axis, renorm):
    kwargs = {"axis": axis, "momentum": 0.7, "renorm": renorm}
    if renorm:
        kwargs["renorm_clipping"] = {"rmax": 1.5, "rmin": 0.8, "dmax": 0.5}
        kwargs["renorm_momentum"] = 0.6
    ours = tfnorm.BatchNormalization(**kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours.build(shape)
    theirs.build(shape)
    assert [w.path.split("/")[-1] for w in ours.weights] == [
        w.path.split("/")[-1] for w in theirs.weights
    ]
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    for step in range(4):
        x = _data(shape, seed=step, loc=step)
        np.testing.assert_allclose(
            ours(x, training=True),
            theirs(x, training=True),
            rtol=1e-5,
            atol=1e-5,
        )
        for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    x = _data(shape, seed=9)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renorm", [False, True])
def test_set_weights_moves_between_keras_and_tfnorm(renorm):
    shape = (6, 4)
    ours = tfnorm.BatchNormalization(renorm=renorm)
    theirs = keras.layers.BatchNormalization(renorm=renorm)
    ours.build(shape)
    theirs.build(shape)
    rng = np.random.default_rng(3)
    weights = [rng.random(4).astype("float32") + 0.5 for _ in theirs.weights]
    theirs.set_weights(weights)
    ours.set_weights(theirs.get_weights())
    x = _data(shape)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    ours.set_weights([w * 2 for w in weights])
    theirs.set_weights(ours.get_weights())
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_renorm_with_unit_clipping_equals_plain_bn():
    clip = {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}
    renorm = tfnorm.BatchNormalization(renorm=True, renorm_clipping=clip)
    plain = tfnorm.BatchNormalization()
    for step in range(4):
        x = _data((16, 3), seed=step, loc=3 * step)
        np.testing.assert_allclose(
            renorm(x, training=True), plain(x, training=True), atol=1e-6
        )
        np.testing.assert_allclose(
            renorm.moving_mean.numpy(), plain.moving_mean.numpy(), atol=1e-6
        )


def test_ghost_with_full_batch_equals_plain_bn():
    ghost = tfnorm.BatchNormalization(virtual_batch_size=16)
    plain = tfnorm.BatchNormalization()
    for step in range(3):
        x = _data((16, 4, 3), seed=step)
        np.testing.assert_allclose(
            ghost(x, training=True), plain(x, training=True), atol=1e-6
        )
    for a, b in zip(ghost.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)


@pytest.mark.parametrize("mode", ["ghost", "renorm", "ghost_renorm"])
def test_gradients_match_finite_differences_of_reference(mode):
    kwargs = MODES[mode]
    shape = (7, 3)
    x = _data(shape).astype("float64")
    rng = np.random.default_rng(5)
    probe = rng.standard_normal(shape)
    gamma = np.array([0.7, 1.2, -0.4])
    beta = np.array([0.1, -0.3, 0.2])
    # A few steps first so renorm's statistics differ from the batch's.
    layer = tfnorm.BatchNormalization(dtype="float64", momentum=0.5, **kwargs)
    layer.build(shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    state = ref.initial_state(3, renorm=kwargs.get("renorm", False))
    for step in range(2):
        warm = _data(shape, seed=10 + step, loc=2.0).astype("float64")
        layer(warm, training=True)
        _, state = ref.bn_train(
            warm, state, gamma, beta, momentum=0.5, **kwargs
        )

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(layer(xt, training=True) * probe)
    grad = tape.gradient(loss, xt).numpy()

    # r and d are constants for backprop, so the renorm gradient is the
    # plain (ghost) BN gradient of the loss weighted by each group's r.
    weight = probe.copy()
    if kwargs.get("renorm"):
        clip = kwargs.get("renorm_clipping", {})
        group = kwargs.get("virtual_batch_size") or shape[0]
        for start in range(0, shape[0], group):
            _, _, var = ref.bn_moments(x[start : start + group])
            s_r = np.maximum(state["renorm_stddev"], np.sqrt(1e-3))
            r = np.sqrt(var + 1e-3) / s_r
            r = np.clip(r, clip.get("rmin", 0), clip.get("rmax", np.inf))
            weight[start : start + group] *= r
    plain = {"virtual_batch_size": kwargs.get("virtual_batch_size")}

    def f(xv):
        y, _ = ref.bn_train(xv, state, gamma, np.zeros(3), **plain)
        return np.sum(y * weight)

    numeric = np.zeros_like(x)
    h = 1e-6
    for idx in np.ndindex(*shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        numeric[idx] = (f(xp) - f(xm)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)
