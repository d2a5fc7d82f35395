"""Variant registry, MLP builder and the zoo's noisy BN layer."""

import keras
import numpy as np
import pytest

import tfnorm
from zoo import models

MLP_VARIANTS = [
    name
    for name, spec in models.VARIANTS.items()
    if spec.dropout in (None, "dropout")
]


@pytest.mark.parametrize("variant", MLP_VARIANTS)
def test_every_variant_builds_and_exposes_its_preactivations(variant):
    model = models.build_mlp((784,), 10, variant, hidden_units=(8, 8, 8))
    x = np.random.default_rng(0).random((32, 784), dtype=np.float32)
    assert model(x, training=True).shape == (32, 10)
    preacts = models.preactivation_model(model)(x)
    assert sorted(preacts) == ["act_1", "act_2", "act_3"]
    norms = [layer for layer in model.layers if layer.name.startswith("norm")]
    spec = models.VARIANTS[variant]
    assert len(norms) == (0 if spec.norm is None else 3)
    kind = (
        keras.layers.GroupNormalization
        if spec.norm == "group"
        else tfnorm.BatchNormalization
    )
    assert all(isinstance(n, kind) for n in norms)


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
        "bn_after, ghost, renorm, noisy_bn, bn_dropout, groupnorm, "
        "stochastic_depth, dropblock, bn_spatial_dropout."
    )


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize(
    "name, expected, paper",
    [
        # He et al. (2016), Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
        ("resnet20", 269_722, 0.27e6),
        ("resnet32", 464_154, 0.46e6),
        ("resnet44", 658_586, 0.66e6),
        ("resnet56", 853_018, 0.85e6),
        ("resnet110", 1_727_962, 1.7e6),
        # Pre-activation reorders BN and ReLU: the same weights.
        ("preresnet110", 1_727_962, 1.7e6),
    ],
)
def test_cifar_resnet_parameter_counts_match_the_paper(name, expected, paper):
    model = models.build(name, (32, 32, 3), 10, "bn_before")
    assert _trainable(model) == expected
    # The paper gives two significant digits: within half of the second.
    assert abs(expected - paper) <= 0.5 * 10 ** (int(np.log10(paper)) - 1)


def test_option_b_shortcuts_add_projections_and_vgg16_has_its_size():
    a = models.build("resnet8", (32, 32, 3), 10, "bn_before")
    b = models.build("resnet8", (32, 32, 3), 10, "bn_before", shortcut="B")
    # Two 1x1 projections (16->32, 32->64) with their BN scale and shift.
    assert _trainable(b) - _trainable(a) == 16 * 32 + 32 * 64 + 2 * (32 + 64)
    vgg = models.build("vgg16", (32, 32, 3), 10, "none")
    # 13 convolutions and one linear classifier on 512 features.
    assert _trainable(vgg) == 14_719_818


def test_resnet110_stochastic_depth_follows_the_linear_rule():
    # Huang et al. (2016): block l of L drops its branch at l / L * 0.5.
    model = models.build(
        "resnet110", (32, 32, 3), 10, "stochastic_depth", dropout_rate=0.5
    )
    rates = [
        layer.rate
        for layer in model._flatten_layers()
        if isinstance(layer, tfnorm.DropPath)
    ]
    assert len(rates) == 54
    np.testing.assert_allclose(rates, np.arange(1, 55) / 54 * 0.5, rtol=1e-6)


MODELS = {
    "resnet8": (32, 32, 3),
    "preresnet8": (32, 32, 3),
    "vgg11": (32, 32, 3),
    "convnet1d": (40,),
    "convnet2d": (784,),
}


@pytest.mark.parametrize("variant", list(models.VARIANTS))
def test_every_variant_trains_in_a_resnet(variant):
    model = models.build("resnet8", (32, 32, 3), 10, variant, width=0.5)
    x = np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32)
    assert model(x, training=True).shape == (8, 10)
    assert model(x, training=False).shape == (8, 10)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_with_bn_and_its_dropout(name):
    shape = MODELS[name]
    dropout = "dropout" if name.startswith("convnet") else "dropblock"
    model = models.build(
        name, shape, 10, "bn_before", width=0.25, dropout=dropout
    )
    x = np.random.default_rng(0).random((4,) + shape, dtype=np.float32)
    assert model(x, training=True).shape == (4, 10)
    assert model.get_layer("logits").dtype_policy.compute_dtype == "float32"


def test_stochastic_depth_follows_the_linear_depth_rule():
    model = models.build("resnet20", (32, 32, 3), 10, "stochastic_depth")
    drops = [layer for layer in model.layers if "droppath" in layer.name]
    rates = [float(layer.rate) for layer in drops]
    assert rates == pytest.approx(tfnorm.stochastic_depth_rates(9, 0.2))


def test_groupnorm_and_sync_options_reach_the_layers():
    gn = models.build("resnet8", (32, 32, 3), 10, "groupnorm")
    norms = [
        layer
        for layer in gn.layers
        if isinstance(layer, keras.layers.GroupNormalization)
    ]
    assert len(norms) == 7 and {n.groups for n in norms} == {8}
    synced = models.build(
        "resnet8", (32, 32, 3), 10, "bn_before", synchronized=True
    )
    bns = [
        layer
        for layer in synced.layers
        if isinstance(layer, tfnorm.BatchNormalization)
    ]
    assert bns and all(layer.synchronized for layer in bns)


def test_placement_in_a_resnet_block():
    def order(placement):
        model = models.build(
            "resnet8", (32, 32, 3), 10, "bn_before", placement=placement
        )
        names = [layer.name for layer in model.layers]
        start = names.index("s1b1_conv1")
        return names[start : start + 3]

    assert order("before") == ["s1b1_conv1", "s1b1_norm1", "act_2"]
    assert order("after") == ["s1b1_conv1", "act_2", "s1b1_norm1"]


def test_option_a_shortcut_subsamples_and_pads_with_zeros():
    x = np.random.default_rng(0).random((2, 8, 8, 4), dtype=np.float32)
    y = keras.ops.convert_to_numpy(models.ZeroPadShortcut(8)(x))
    assert y.shape == (2, 4, 4, 8)
    np.testing.assert_array_equal(y[..., 2:6], x[:, ::2, ::2, :])
    assert not y[..., :2].any() and not y[..., 6:].any()


def test_builders_refuse_what_does_not_fit():
    with pytest.raises(ValueError) as info:
        models.build("mlp", (784,), 10, "stochastic_depth")
    assert str(info.value) == (
        "Model 'mlp' has no place for dropout flavor 'droppath' (variant "
        "'stochastic_depth'). DropPath needs residual branches: use a ResNet "
        "or resconvnet1d/2d."
    )
    # The hint names variants, which `--variants` takes, not flavors.
    with pytest.raises(ValueError) as info:
        models.build("mlp", (784,), 10, "bn_spatial_dropout")
    assert str(info.value) == (
        "Model 'mlp' has no place for dropout flavor 'spatial' (variant "
        "'bn_spatial_dropout'). Its variants with dropout: bn_dropout."
    )
    with pytest.raises(ValueError) as info:
        models.build("resnet21", (32, 32, 3), 10)
    assert str(info.value).startswith("Unknown model 'resnet21'. Valid models:")
    with pytest.raises(ValueError) as info:
        models.build("vgg11", (28, 28, 1), 10, "bn_before")
    assert str(info.value) == (
        "VGG's five poolings need inputs of at least 32x32. "
        "Received: input_shape=(28, 28, 1)"
    )


@pytest.mark.parametrize("name", ["mlp", "convnet1d", "resconvnet1d"])
def test_variants_for_a_model_are_those_it_builds(name):
    built = []
    for variant in models.VARIANTS:
        try:
            models.build(
                name, (40,), 10, variant, hidden_units=(8,), width=0.25
            )
        except ValueError:
            continue
        built.append(variant)
    assert models.variants_for(name) == built


def test_plain_convnet_keeps_its_parameter_count():
    model = models.build("convnet1d", (40,), 10, "bn_before")
    # Kernel 5, no conv biases before BN, 4 BN weights per channel,
    # 64 channels x 10 positions into the 10 logits.
    convs = 5 * (1 * 32 + 32 * 64 + 64 * 64)
    norms = 4 * (32 + 64 + 64)
    assert model.count_params() == convs + norms + 64 * 10 * 10 + 10
    assert not [layer for layer in model.layers if "res" in layer.name]


def test_residual_convnet_gives_droppath_a_branch_to_drop():
    model = models.build("resconvnet1d", (40,), 10, "stochastic_depth")
    drops = [layer for layer in model.layers if "droppath" in layer.name]
    rates = [float(layer.rate) for layer in drops]
    assert rates == pytest.approx(tfnorm.stochastic_depth_rates(3, 0.2))
    # The first residual block adds its branch to its input `act_1`; with
    # the branch always dropped, it passes that input on unchanged.
    probe = keras.Model(
        model.input,
        [model.get_layer("act_1").output, model.get_layer("res1_add").output],
    )
    x = np.random.default_rng(0).random((8, 40), dtype=np.float32)
    shortcut, added = (keras.ops.convert_to_numpy(t) for t in probe(x))
    assert np.abs(added - shortcut).max() > 0.1
    drops[0].rate = 0.999999
    shortcut, added = probe(x, training=True)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(added), keras.ops.convert_to_numpy(shortcut)
    )


@pytest.mark.parametrize(
    "variant",
    [
        "bn_before",
        "bn_dropout",
        "bn_spatial_dropout",
        "dropblock",
        "stochastic_depth",
    ],
)
def test_residual_convnet_is_the_same_network_for_every_flavor(variant):
    model = models.build("resconvnet1d", (40,), 10, variant, width=0.5)
    # Blocks of 16, 32 and 32 channels, each followed by a residual block
    # of two convolutions; gamma and beta of three BN layers per block.
    # The dropout layers' rates are not trained.
    convs = 5 * (16 + 16 * 32 + 32 * 32) + 5 * 2 * (16**2 + 32**2 + 32**2)
    norms = 2 * 3 * (16 + 32 + 32)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == convs + norms + 32 * 10 * 10 + 10


def test_dropout_options_swap_in_uout_or_keep_only_the_last_dropout():
    model = models.build(
        "mlp", (8,), 3, "bn_dropout", hidden_units=(4, 4, 4), dropout_rate=0.3
    )

    def kinds(m):
        return {
            layer.name: type(layer).__name__
            for layer in m.layers
            if "dropout" in layer.name
        }

    assert models.with_dropout_options(model) is model
    uout = models.with_dropout_options(model, layer="uout")
    assert kinds(uout) == {f"dropout_{i}": "Uout" for i in (1, 2, 3)}
    assert uout.get_layer("dropout_2").rate == pytest.approx(0.3)
    last = models.with_dropout_options(model, blocks="last")
    assert kinds(last) == {"dropout_3": "Dropout"}
    # The other layers keep their weights, in a graph of their own.
    x = np.random.default_rng(0).random((5, 8), np.float32)
    for clone in (uout, last):
        np.testing.assert_array_equal(
            clone(x, training=False), model(x, training=False)
        )
        assert clone.get_layer("dense_2") is not model.get_layer("dense_2")
        # The probes read layer inputs, which must lie in the clone's own
        # graph (reused layers would point back at the original's).
        probe = models.preactivation_model(clone)(x)
        for name, values in models.preactivation_model(model)(x).items():
            np.testing.assert_array_equal(probe[name], values)

    plain = models.build("mlp", (8,), 3, "bn_before", hidden_units=(4,))
    with pytest.raises(ValueError) as info:
        models.with_dropout_options(plain, blocks="last")
    assert str(info.value) == (
        "dropout_layer='dropout' and dropout_blocks='last' change the "
        "Dropout layers of a model, and 'mlp_bn_before' has none. Use a "
        "variant with elementwise dropout, such as bn_dropout."
    )


def test_build_applies_the_dropout_options():
    model = models.build(
        "mlp",
        (8,),
        3,
        "bn_dropout",
        hidden_units=(4, 4),
        dropout_layer="uout",
        dropout_blocks="last",
    )
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Uout") == 1
    assert "Dropout" not in kinds
