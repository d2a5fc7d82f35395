"""Bad input gets whole, clear messages; configs and saved models load."""

import re
import warnings

import keras
import numpy as np
import pytest

import tfnorm
from tests.contract import check_layer_contract

VBS_MESSAGE = (
    "Argument `virtual_batch_size` must be None or a positive integer "
    "number of examples per ghost batch. Received: virtual_batch_size={}"
)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (
            {"virtual_batch_size": 0},
            ValueError,
            VBS_MESSAGE.format("0"),
        ),
        (
            {"virtual_batch_size": -2},
            ValueError,
            VBS_MESSAGE.format("-2"),
        ),
        (
            {"virtual_batch_size": 4.0},
            ValueError,
            VBS_MESSAGE.format("4.0"),
        ),
        (
            {"virtual_batch_size": True},
            ValueError,
            VBS_MESSAGE.format("True"),
        ),
        (
            {"renorm": True, "renorm_clipping": {"rmax": 2, "dmx": 1}},
            ValueError,
            "Unknown key(s) ['dmx'] in `renorm_clipping`; expected keys "
            "among ['rmax', 'rmin', 'dmax']. Received: "
            "renorm_clipping={'rmax': 2, 'dmx': 1}",
        ),
        (
            {"renorm": True, "renorm_clipping": {"rmax": 2, "rmin": 3}},
            ValueError,
            "`renorm_clipping` needs rmin <= rmax. "
            "Received: rmin=3.0, rmax=2.0",
        ),
        (
            {"renorm": True, "renorm_clipping": {"dmax": -1}},
            ValueError,
            "`renorm_clipping` needs a non-negative dmax. Received: dmax=-1.0",
        ),
        # Minus infinity used to be read as "no bound", an rmax <= 0
        # collapsed every output to beta, and rmin = inf gave NaN.
        (
            {"renorm": True, "renorm_clipping": {"dmax": -np.inf}},
            ValueError,
            "`renorm_clipping` needs a non-negative dmax. Received: dmax=-inf",
        ),
        (
            {"renorm": True, "renorm_clipping": {"rmax": -np.inf}},
            ValueError,
            "`renorm_clipping` needs a positive rmax (in float32, where "
            "the bounds are kept): r = s_B / s_r is positive, and clipping "
            "it to zero or below would discard the input. Received: rmax=-inf",
        ),
        (
            {"renorm": True, "renorm_clipping": {"rmax": 0}},
            ValueError,
            "`renorm_clipping` needs a positive rmax (in float32, where "
            "the bounds are kept): r = s_B / s_r is positive, and clipping "
            "it to zero or below would discard the input. Received: rmax=0.0",
        ),
        (
            {"renorm": True, "renorm_clipping": {"rmin": np.inf}},
            ValueError,
            "`renorm_clipping` needs a finite rmin (in float32, where the "
            "bounds are kept): an infinite lower bound makes every output "
            "infinite. Received: rmin=inf",
        ),
        # Finite in float64 but past float32's range, where the bounds are
        # kept: the outputs were all NaN, or all equal to gamma * d + beta.
        (
            {"renorm": True, "renorm_clipping": {"rmin": 1e39}},
            ValueError,
            "`renorm_clipping` needs a finite rmin (in float32, where the "
            "bounds are kept): an infinite lower bound makes every output "
            "infinite. Received: rmin=1e+39",
        ),
        (
            {"renorm": True, "renorm_clipping": {"rmax": 1e-46}},
            ValueError,
            "`renorm_clipping` needs a positive rmax (in float32, where "
            "the bounds are kept): r = s_B / s_r is positive, and clipping "
            "it to zero or below would discard the input. "
            "Received: rmax=1e-46",
        ),
        (
            {"renorm_clipping": {"rmax": 3}},
            ValueError,
            "Argument `renorm_clipping` is only used with `renorm=True`; "
            "set `renorm=True` or drop `renorm_clipping`. "
            "Received: renorm=False, renorm_clipping={'rmax': 3}",
        ),
        (
            {"momentum": 1.0},
            ValueError,
            "Argument `momentum` must be in [0, 1): it is the weight kept "
            "on the old moving statistics (Keras convention; PyTorch's "
            "momentum m is 1 - m here). Received: momentum=1.0",
        ),
        (
            {"momentum": -0.1},
            ValueError,
            "Argument `momentum` must be in [0, 1): it is the weight kept "
            "on the old moving statistics (Keras convention; PyTorch's "
            "momentum m is 1 - m here). Received: momentum=-0.1",
        ),
        (
            {"renorm": True, "renorm_momentum": 1.5},
            ValueError,
            "Argument `renorm_momentum` must be in [0, 1): it is the "
            "weight kept on the old moving statistics (Keras convention; "
            "PyTorch's momentum m is 1 - m here). "
            "Received: renorm_momentum=1.5",
        ),
        (
            {"momentum": "0.9"},
            TypeError,
            "Argument `momentum` must be a float in [0, 1). "
            "Received: momentum='0.9'",
        ),
        (
            {"epsilon": 0.0},
            ValueError,
            "Argument `epsilon` must be a positive float. "
            "Received: epsilon=0.0",
        ),
        (
            {"epsilon": -1e-3},
            ValueError,
            "Argument `epsilon` must be a positive float. "
            "Received: epsilon=-0.001",
        ),
        (
            {"axis": [1, 2]},
            TypeError,
            "Argument `axis` must be an integer (one channel axis). "
            "Received: axis=[1, 2]",
        ),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        tfnorm.BatchNormalization(**kwargs)


def test_axis_out_of_range_for_input():
    layer = tfnorm.BatchNormalization(axis=3)
    message = (
        "Argument `axis` is out of range for an input of rank 3: expected "
        "an integer in [-3, 2]. Received: axis=3"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        layer(np.zeros((2, 3, 4), "float32"))


@pytest.mark.parametrize(
    "mask_shape,axis",
    [((4, 6), -1), ((4, 5, 1), -1), ((4, 5), 1)],
)
def test_mask_shape_that_does_not_fit(mask_shape, axis):
    x = np.zeros((4, 5, 6), "float32")
    expected = {-1: (4, 5), 1: (4, 6)}[axis]
    layer = tfnorm.BatchNormalization(axis=axis)
    # Keras wraps errors raised in `call` with context lines, so the whole
    # message is matched inside the wrapped text.
    message = (
        "The mask must have the input's shape without the channel axis "
        f"{axis}: expected {expected}. Received: mask.shape={mask_shape}, "
        "inputs.shape=(4, 5, 6)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(x, training=True, mask=np.ones(mask_shape, bool))


def test_set_renorm_clipping_without_renorm():
    layer = tfnorm.BatchNormalization(name="bn")
    message = (
        "set_renorm_clipping() needs a layer built with `renorm=True`. "
        "Received: layer 'bn' with renorm=False"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        layer.set_renorm_clipping(rmax=2.0)


OPTIONS = {
    "plain": {},
    "no_center_scale": {"center": False, "scale": False, "epsilon": 1e-5},
    "ghost": {"virtual_batch_size": 4},
    "renorm": {"renorm": True, "renorm_clipping": {"rmax": 2.0, "dmax": 1.0}},
    "ghost_renorm": {"renorm": True, "virtual_batch_size": 2},
    "sync": {"synchronized": True, "momentum": 0.9},
    "regularized": {
        "gamma_regularizer": "l2",
        "beta_constraint": "non_neg",
        "moving_variance_initializer": "random_uniform",
    },
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_layer_contract_for_every_option(name, tmp_path):
    x = np.random.default_rng(0).standard_normal((8, 3, 4)).astype("float32")
    check_layer_contract(
        lambda: tfnorm.BatchNormalization(**OPTIONS[name]), x, tmp_path
    )


@pytest.mark.parametrize(
    "cls", [tfnorm.GhostBatchNormalization, tfnorm.BatchRenormalization]
)
def test_convenience_classes_round_trip(cls, tmp_path):
    x = np.random.default_rng(0).standard_normal((8, 4)).astype("float32")
    loaded = check_layer_contract(
        lambda: cls(virtual_batch_size=4), x, tmp_path
    )
    assert type(loaded.layers[1]) is cls


def test_convenience_class_defaults():
    ghost = tfnorm.GhostBatchNormalization()
    assert ghost.virtual_batch_size == 128
    renorm = tfnorm.BatchRenormalization()
    assert renorm.renorm
    assert renorm.renorm_clipping == {
        "rmax": 3.0,
        "rmin": 1.0 / 3.0,
        "dmax": 5.0,
    }


def test_scheduled_clipping_survives_save_and_load(tmp_path):
    inputs = keras.Input((3,))
    layer = tfnorm.BatchNormalization(renorm=True)
    model = keras.Model(inputs, layer(inputs))
    layer.set_renorm_clipping(rmax=1.7, rmin=0.6, dmax=0.4)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.layers[-1].renorm_clipping == {
        "rmax": 1.7,
        "rmin": 0.6,
        "dmax": 0.4,
    }


def test_config_written_by_tf_keras_loads_with_warning():
    tf_keras = pytest.importorskip("tf_keras")
    old = tf_keras.layers.BatchNormalization(
        axis=1,
        momentum=0.9,
        virtual_batch_size=2,
        renorm=True,
        renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
        renorm_momentum=0.8,
    )
    # tf-keras 2.21 no longer writes these two keys, but configs saved by
    # earlier tf.keras 2 releases and by its v1 layers carry them.
    config = {**old.get_config(), "fused": False, "adjustment": None}
    with pytest.warns(UserWarning) as record:
        layer = tfnorm.BatchNormalization.from_config(config)
    message = str(record[0].message)
    assert message == (
        "tfnorm.BatchNormalization ignores the tf-keras 2 config key(s) "
        "['fused', 'adjustment']: `fused` is chosen automatically and "
        "`adjustment` is not supported."
    )
    assert layer.axis == 1
    assert layer.virtual_batch_size == 2
    assert layer.renorm_clipping == {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}
    assert layer.renorm_momentum == 0.8
    with pytest.raises(TypeError):
        keras.layers.BatchNormalization.from_config(config)


def test_plain_tf_keras_config_loads():
    tf_keras = pytest.importorskip("tf_keras")
    old = tf_keras.layers.BatchNormalization()
    old(np.zeros((2, 3), "float32"))
    config = old.get_config()
    assert list(config["axis"]) == [1]  # built: a list of positive axes
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        layer = tfnorm.BatchNormalization.from_config(config)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype("float32")
    np.testing.assert_allclose(
        layer(x, training=True),
        keras.layers.BatchNormalization()(x, training=True),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "axis,shape,expected",
    [(-1, (8, 3, 3, 4), 3), (1, (8, 3, 5, 4), 1)],
)
def test_built_tf_keras_ghost_config_loads_the_right_axis(
    axis, shape, expected
):
    # A built tf-keras ghost layer saves its axes shifted by one for the
    # ghost dimension it inserts ([4] for channels last on 4D inputs).
    tf_keras = pytest.importorskip("tf_keras")
    old = tf_keras.layers.BatchNormalization(axis=axis, virtual_batch_size=4)
    old(np.zeros(shape, "float32"))
    layer = tfnorm.BatchNormalization.from_config(old.get_config())
    assert layer.axis == expected
    layer.build(shape)
    assert layer.gamma.shape == (shape[expected],)


def test_tf_keras_config_with_mixed_policy_loads():
    tf_keras = pytest.importorskip("tf_keras")
    old = tf_keras.layers.BatchNormalization(dtype="mixed_float16")
    layer = tfnorm.BatchNormalization.from_config(old.get_config())
    assert layer.dtype_policy.name == "mixed_float16"


def test_numpy_scalars_are_accepted_like_keras():
    layer = tfnorm.BatchNormalization(
        axis=np.int64(1),
        momentum=np.float32(0.9),
        epsilon=np.float32(1e-3),
        virtual_batch_size=np.int64(2),
        renorm=True,
        renorm_clipping={"rmax": np.float64(2.0)},
        renorm_momentum=np.float32(0.5),
    )
    config = layer.get_config()
    assert config["axis"] == 1 and type(config["axis"]) is int
    assert type(config["virtual_batch_size"]) is int
    assert layer.renorm_clipping == {"rmax": 2.0}


def test_nan_clipping_bound_is_rejected():
    message = (
        "`renorm_clipping['rmax']` must not be NaN; use None for no bound. "
        "Received: renorm_clipping={'rmax': nan}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tfnorm.BatchNormalization(
            renorm=True, renorm_clipping={"rmax": float("nan")}
        )
    layer = tfnorm.BatchNormalization(renorm=True)
    with pytest.raises(ValueError, match="must not be NaN"):
        layer.set_renorm_clipping(dmax=float("nan"))
    with pytest.raises(TypeError, match="must be a number or None"):
        layer.set_renorm_clipping(dmax="5")


def test_infinite_upper_bounds_mean_no_clipping():
    layer = tfnorm.BatchNormalization(
        renorm=True,
        renorm_clipping={"rmax": float("inf"), "dmax": float("inf")},
    )
    assert layer.renorm_clipping == {}
    x = np.random.default_rng(0).standard_normal((6, 2)).astype("float32")
    assert np.all(np.isfinite(layer(x * 50, training=True).numpy()))


def test_empty_clipping_without_renorm_is_accepted_like_keras():
    layer = tfnorm.BatchNormalization(renorm_clipping={})
    assert layer.get_config()["renorm_clipping"] is None
