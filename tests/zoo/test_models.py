"""Variant registry, MLP builder and the zoo's noisy BN layer."""

import keras
import numpy as np
import pytest

import tfnorm
from zoo import models


@pytest.mark.parametrize("variant", list(models.VARIANTS))
def test_every_variant_builds_and_exposes_its_preactivations(variant):
    model = models.build_mlp((784,), 10, variant, hidden_units=(8, 8, 8))
    x = np.random.default_rng(0).random((32, 784), dtype=np.float32)
    assert model(x, training=True).shape == (32, 10)
    preacts = models.preactivation_model(model)(x)
    assert sorted(preacts) == ["act_1", "act_2", "act_3"]
    norms = [layer for layer in model.layers if layer.name.startswith("norm")]
    spec = models.VARIANTS[variant]
    assert len(norms) == (0 if spec.norm is None else 3)
    assert all(isinstance(n, tfnorm.BatchNormalization) for n in norms)


def test_placement_puts_bn_before_or_after_the_activation():
    def order(variant):
        model = models.build_mlp((4,), 2, variant, hidden_units=(3,))
        return [layer.name for layer in model.layers][2:5]

    assert order("bn_before") == ["dense_1", "norm_1", "act_1"]
    assert order("bn_after") == ["dense_1", "act_1", "norm_1"]


def test_noisy_bn_is_plain_bn_at_inference_and_noisy_in_training():
    x = np.random.default_rng(1).normal(2.0, 3.0, (512, 64)).astype("float32")
    noisy = models.NoisyBatchNormalization(seed=3)
    plain = tfnorm.BatchNormalization()
    noisy.build(x.shape)
    plain.build(x.shape)

    np.testing.assert_allclose(
        noisy(x, training=False), plain(x, training=False), atol=1e-6
    )
    clean = keras.ops.convert_to_numpy(plain(x, training=True))
    first = keras.ops.convert_to_numpy(noisy(x, training=True))
    second = keras.ops.convert_to_numpy(noisy(x, training=True))
    # Resampled every call (every training step).
    assert not np.allclose(first, second)
    # Per-unit shift: the unit means move off zero by up to 1, with a
    # spread near that of U(-1, 1) (std 0.577); clean BN keeps them at 0.
    unit_means = first.mean(axis=0)
    assert np.abs(clean.mean(axis=0)).max() < 1e-3
    assert 0.3 < unit_means.std() < 0.9, unit_means.std()
    assert np.abs(unit_means).max() <= 1.0 + 0.1


def test_noisy_bn_round_trips_through_its_config():
    layer = models.NoisyBatchNormalization(scale_noise=0.2, momentum=0.9)
    clone = models.NoisyBatchNormalization.from_config(layer.get_config())
    assert clone.scale_noise == 0.2
    assert clone.momentum == 0.9


def test_unknown_variant_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        models.build_mlp((4,), 2, "batchnorm")
    assert str(info.value) == (
        "Unknown variant(s) 'batchnorm'. Valid variants: none, bn_before, "
        "bn_after, ghost, renorm, noisy_bn, bn_dropout."
    )
