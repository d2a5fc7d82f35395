"""DropBlock1D and DropBlock2D."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference_dropout as ref
from tests.contract import check_layer_contract
from tfnorm.dropout import DropBlock1D
from tfnorm.dropout import DropBlock2D
from tfnorm.dropout.dropblock import dropblock_seed_rate


def _dropped(layer, shape, **call):
    """Boolean map of dropped positions for an input of ones."""
    y = layer(np.ones(shape, "float32"), training=True, **call)
    return np.asarray(y) == 0


def test_contract_2d(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 9, 9, 3)).astype("float32")
    check_layer_contract(
        lambda: DropBlock2D(0.2, block_size=3, seed=1),
        x,
        tmp_path,
        identity=True,
    )


def test_contract_1d(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 20, 3)).astype("float32")
    check_layer_contract(
        lambda: DropBlock1D(0.2, block_size=4, seed=1),
        x,
        tmp_path,
        identity=True,
    )


@pytest.mark.parametrize(
    "height, width, block, rate",
    [
        (7, 7, 7, 0.1),
        (8, 8, 4, 0.1),
        (5, 17, 3, 0.1),
        (56, 56, 7, 0.1),
        (8, 8, 4, 0.3),
    ],
)
def test_seed_rate_gives_exact_expected_drop_fraction(
    height, width, block, rate
):
    gamma = float(dropblock_seed_rate(rate, height, width, block, block))
    expected = ref.dropblock_drop_fraction(gamma, height, width, block, block)
    assert abs(expected - rate) < 2e-6, f"expected drop fraction {expected}"
    oracle = ref.dropblock_seed_rate(rate, height, width, block, block)
    np.testing.assert_allclose(gamma, oracle, rtol=1e-4)


@pytest.mark.parametrize(
    "height, width, block, maps",
    [
        (7, 7, 7, 40000),
        (8, 8, 4, 20000),
        (5, 17, 3, 20000),
        (56, 56, 7, 640),
    ],
)
def test_realized_drop_fraction_equals_rate(height, width, block, maps):
    rate = 0.1
    layer = DropBlock2D(rate, block_size=block, seed=3)
    dropped = _dropped(layer, (maps // 8, height, width, 8))
    # Maps are independent, positions within a map are not: the standard
    # error comes from the spread of the per-map fractions.
    per_map = dropped.mean(axis=(1, 2)).ravel()
    observed = per_map.mean()
    stderr = per_map.std() / np.sqrt(per_map.size)
    assert abs(observed - rate) < 4 * stderr + 1e-6, (
        f"observed drop fraction {observed:.5f}, rate {rate}, "
        f"standard error {stderr:.5f}"
    )


def test_paper_seed_rate_under_drops():
    # The paper's approximation counts overlapping blocks twice and ignores
    # the thinner coverage at borders: on 8x8 with block 4 it drops about
    # 9.4% instead of 10%, which is why tfnorm solves the exact equation.
    paper = 0.1 / 16 * 64 / 25
    assert ref.dropblock_drop_fraction(paper, 8, 8, 4, 4) < 0.095


def test_dropped_regions_are_contiguous_blocks():
    layer = DropBlock2D(0.25, block_size=3, seed=5)
    dropped = _dropped(layer, (20, 12, 12, 4))
    assert dropped.any()
    for n in range(dropped.shape[0]):
        for c in range(dropped.shape[3]):
            assert ref.is_union_of_blocks(dropped[n, :, :, c], 3, 3), (n, c)


def test_even_block_size_on_non_square_map():
    layer = DropBlock2D(0.2, block_size=(2, 4), seed=6)
    dropped = _dropped(layer, (16, 6, 11, 4))
    for n in range(dropped.shape[0]):
        for c in range(dropped.shape[3]):
            assert ref.is_union_of_blocks(dropped[n, :, :, c], 2, 4), (n, c)


def test_block_larger_than_map_is_clipped():
    # 5x5 map with block 7: one seed position, which drops the whole map.
    layer = DropBlock2D(0.2, block_size=7, seed=7)
    dropped = _dropped(layer, (2500, 5, 5, 4))
    per_map = dropped.mean(axis=(1, 2)).ravel()
    assert set(np.unique(per_map)) <= {0.0, 1.0}
    stderr = np.sqrt(0.2 * 0.8 / per_map.size)
    assert abs(per_map.mean() - 0.2) < 4 * stderr, per_map.mean()

    # Clipped on one side only: 3 x 10 map, block 5 -> 3 x 5 blocks.
    layer = DropBlock2D(0.2, block_size=5, seed=8)
    dropped = _dropped(layer, (500, 3, 10, 4))
    for n in range(20):
        assert ref.is_union_of_blocks(dropped[n, :, :, 0], 3, 5), n
    per_map = dropped.mean(axis=(1, 2)).ravel()
    stderr = per_map.std() / np.sqrt(per_map.size)
    assert abs(per_map.mean() - 0.2) < 4 * stderr, per_map.mean()


def test_block_one_larger_than_map_is_finite():
    y = DropBlock2D(0.5, block_size=9, seed=9)(
        np.ones((64, 8, 8, 2), "float32"), training=True
    )
    assert np.all(np.isfinite(np.asarray(y)))


def test_all_dropped_returns_zeros_not_nan():
    # One map, one seed position, rate close to 1: eventually all dropped.
    layer = DropBlock2D(0.999, block_size=4, seed=10)
    x = np.ones((1, 4, 4, 1), "float32")
    outputs = [np.asarray(layer(x, training=True)) for _ in range(20)]
    assert any(np.all(y == 0) for y in outputs)
    assert all(np.all(np.isfinite(y)) for y in outputs)


def test_mean_is_preserved():
    # Rescaling by the realized kept fraction makes the mean of a constant
    # input exact; for a random input it is preserved in expectation.
    layer = DropBlock2D(0.3, block_size=3, seed=11)
    y = np.asarray(layer(np.ones((16, 10, 10, 8), "float32"), training=True))
    np.testing.assert_allclose(y.mean(), 1.0, rtol=1e-5)
    x = np.random.default_rng(1).uniform(1, 2, (64, 16, 16, 16))
    x = x.astype("float32")
    y = np.asarray(layer(x, training=True))
    kept = y != 0
    # Kept values are x times one common scale count / count_kept.
    scale = kept.size / kept.sum()
    np.testing.assert_allclose(y[kept], x[kept] * scale, rtol=1e-5)


def test_channels_first_matches_channels_last_statistics():
    layer = DropBlock2D(
        0.15, block_size=3, data_format="channels_first", seed=12
    )
    dropped = _dropped(layer, (40, 8, 10, 12))
    for n in range(5):
        for c in range(8):
            assert ref.is_union_of_blocks(dropped[n, c], 3, 3), (n, c)
    per_map = dropped.mean(axis=(2, 3)).ravel()
    stderr = per_map.std() / np.sqrt(per_map.size)
    assert abs(per_map.mean() - 0.15) < 4 * stderr, per_map.mean()


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_1d_drops_contiguous_segments_at_rate(data_format):
    layer = DropBlock1D(0.2, block_size=5, data_format=data_format, seed=13)
    dropped = _dropped(layer, (400, 23, 16))
    if data_format == "channels_first":
        dropped = np.swapaxes(dropped, 1, 2)
    for n in range(10):
        for c in range(16):
            column = dropped[n, :, c][:, None]
            assert ref.is_union_of_blocks(column, 5, 1), (n, c)
    per_map = dropped.mean(axis=1).ravel()
    stderr = per_map.std() / np.sqrt(per_map.size)
    assert abs(per_map.mean() - 0.2) < 4 * stderr, per_map.mean()


def test_rate_zero_is_exact_identity():
    x = tf.random.normal((4, 8, 8, 3))
    layer = DropBlock2D(0.0, block_size=3)
    np.testing.assert_array_equal(layer(x, training=True), x)
    fn = tf.function(lambda a: layer(a, training=True), jit_compile=True)
    np.testing.assert_array_equal(fn(x), x)


def test_inference_is_exact_identity():
    x = tf.random.normal((4, 8, 8, 3))
    assert DropBlock2D(0.5, block_size=3)(x) is x


def test_unknown_spatial_dims():
    layer = DropBlock2D(0.2, block_size=5, seed=14)
    fn = tf.function(
        lambda a: layer(a, training=True),
        input_signature=[tf.TensorSpec([None, None, None, 4])],
    )
    for shape in [(64, 7, 9, 4), (64, 3, 20, 4)]:
        dropped = np.asarray(fn(tf.ones(shape))) == 0
        bh, bw = min(5, shape[1]), min(5, shape[2])
        for n in range(5):
            assert ref.is_union_of_blocks(dropped[n, :, :, 0], bh, bw)
        per_map = dropped.mean(axis=(1, 2)).ravel()
        stderr = per_map.std() / np.sqrt(per_map.size)
        assert abs(per_map.mean() - 0.2) < 4 * stderr, per_map.mean()


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: DropBlock2D(0.3, block_size=3, seed=0), (2, 0, 5, 3)),
        (lambda: DropBlock2D(0.3, block_size=3, seed=0), (2, 5, 0, 3)),
        (lambda: DropBlock1D(0.3, block_size=3, seed=0), (2, 0, 3)),
    ],
    ids=["2d_no_rows", "2d_no_columns", "1d_no_steps"],
)
def test_empty_map_gives_empty_output(make, shape, jit_compile):
    # A map of zero height or width asked for a negative padding, and
    # TensorFlow's max-pool kernel raised SIGFPE on its empty output.
    layer = make()
    # Eagerly the shape is static and the mask is skipped outright.
    assert tuple(layer(tf.ones(shape), training=True).shape) == shape
    fn = tf.function(
        lambda a: layer(a, training=True),
        jit_compile=jit_compile,
        input_signature=[tf.TensorSpec([None] * len(shape))],
    )
    assert tuple(fn(tf.ones(shape)).shape) == shape


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize(
    "shape",
    [(2, 0, 5, 3), (2, 5, 0, 3), (2, 5, 5, 0)],
    ids=["no_rows", "no_columns", "no_channels"],
)
def test_static_empty_map_with_unknown_batch(shape, jit_compile):
    # As `fit` traces a model with a known map and an unknown batch: the
    # static zero made the mask's branch fail to trace (max-pool window
    # larger than the padded map) before the runtime check could skip it.
    layer = DropBlock2D(0.3, block_size=3, seed=0)
    fn = tf.function(
        lambda a: layer(a, training=True),
        jit_compile=jit_compile,
        input_signature=[tf.TensorSpec([None, *shape[1:]])],
    )
    assert tuple(fn(tf.ones(shape)).shape) == shape


def test_xla_drop_fraction():
    layer = DropBlock2D(0.1, block_size=4, seed=15)
    fn = tf.function(lambda a: layer(a, training=True), jit_compile=True)
    dropped = np.asarray(fn(tf.ones((2000, 8, 8, 8)))) == 0
    per_map = dropped.mean(axis=(1, 2)).ravel()
    stderr = per_map.std() / np.sqrt(per_map.size)
    assert abs(per_map.mean() - 0.1) < 4 * stderr, per_map.mean()


def test_same_seed_same_masks_also_after_save_and_load(tmp_path):
    x = np.ones((8, 10, 10, 2), "float32")
    a = DropBlock2D(0.3, block_size=3, seed=42)
    b = DropBlock2D.from_config(a.get_config())
    model = keras.Sequential([keras.Input((10, 10, 2)), a])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras").layers[0]
    first = np.asarray(a(x, training=True))
    np.testing.assert_array_equal(first, b(x, training=True))
    np.testing.assert_array_equal(first, loaded(x, training=True))
    assert not np.array_equal(first, a(x, training=True))


def test_rate_survives_save_and_load(tmp_path):
    layer = DropBlock2D(0.1, block_size=3)
    model = keras.Sequential([keras.Input((6, 6, 1)), layer])
    layer.rate = 0.37
    assert layer.get_config()["rate"] == 0.37
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras").layers[0]
    assert loaded.rate == 0.37
    assert loaded.get_config()["rate"] == 0.37


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, "0.1", True, None])
def test_rate_outside_unit_interval_is_rejected(rate):
    message = (
        f"`rate` must be a number in the range [0, 1). Received: rate={rate!r}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        DropBlock2D(rate, block_size=3)


def test_rate_one_rejected_at_construction():
    message = "`rate` must be a number in the range [0, 1). Received: rate=1"
    with pytest.raises(ValueError, match=re.escape(message)):
        DropBlock1D(1, block_size=3)


@pytest.mark.parametrize("block_size", [0, -2, 2.5, "3", True, (3,), (3, 0)])
def test_bad_block_size_is_rejected(block_size):
    message = (
        "`block_size` must be a positive int or a tuple of 2 positive ints. "
        f"Received: block_size={block_size!r}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        DropBlock2D(0.1, block_size=block_size)


def test_bad_block_size_1d_is_rejected():
    message = "`block_size` must be a positive int. Received: block_size=(3,)"
    with pytest.raises(ValueError, match=re.escape(message)):
        DropBlock1D(0.1, block_size=(3,))


def test_unknown_data_format_is_rejected():
    message = (
        "`data_format` must be 'channels_last' or 'channels_first'. "
        "Received: data_format='NHWC'"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        DropBlock2D(0.1, block_size=3, data_format="NHWC")
