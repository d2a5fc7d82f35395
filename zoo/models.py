"""Model builders and the variant registry they share.

A *variant* names which normalization a model uses, where it sits
relative to the activation, and which dropout flavor it adds:
`build_mlp(..., variant="bn_before")` builds Dense -> BN -> ReLU blocks,
`variant="none"` plain Dense -> ReLU blocks. Every builder takes its
layers from `VARIANTS` through one helper, so a variant means the same
thing in every model and experiment. tfnorm's layers provide BN, ghost
BN, renorm and the dropout flavors; Keras's own layers provide group
normalization (the batch-independent baseline), dropout and spatial
dropout; the one normalization defined here, noisy BN, is an
experimental probe that does not belong in the library.

Models, by name (`build(name, ...)`): `mlp`; `convnet1d` (MNIST-1D) and
`convnet2d` (28x28 digits), and their residual forms `resconvnet1d` and
`resconvnet2d`; `vgg11`, `vgg16` (32x32 inputs); CIFAR
ResNets `resnet20`, `resnet32`, `resnet44`, `resnet56`, `resnet110` (any
`resnet{6n+2}`, such as the tests' `resnet8`) and their pre-activation
forms `preresnet{depth}`.
"""

import dataclasses
import math
import re

import keras

import tfnorm


@keras.saving.register_keras_serializable(package="zoo")
class NoisyBatchNormalization(tfnorm.BatchNormalization):
    """Batch Normalization followed by noise resampled every training step.

    Santurkar et al. (2018) add "time-varying, non-zero-mean,
    non-unit-variance" noise after each BN layer to show that BN does not
    help by keeping layer input distributions stable: the noisy network's
    distributions move the most, yet it trains about as well as BN.

    **Training**: with `y` the BN output, the layer returns
    `y * a + b + e`, where per call (that is, per training step) and per
    unit `a ~ U(1 - scale_noise, 1 + scale_noise)` and
    `b ~ U(-shift_noise, shift_noise)`, and per sample and unit
    `e ~ N(0, sample_noise^2)`. The defaults, `U(0.5, 1.5)`, `U(-1, 1)` and
    `N(0, 0.25^2)`, are this zoo's choice: the paper does not publish its
    distributions, and these move each unit's mean and spread by amounts
    comparable to the normalized signal itself.

    **Inference**: plain BN with the moving statistics; no noise.

    Args:
        scale_noise: Half-width of the per-step scale distribution
            around 1.
        shift_noise: Half-width of the per-step shift distribution
            around 0.
        sample_noise: Standard deviation of the per-sample Gaussian noise.
        seed: Optional integer seed for the noise.
        **kwargs: Passed to `tfnorm.BatchNormalization`.

    Reference:
        - [Santurkar et al., 2018](https://arxiv.org/abs/1805.11604)
    """

    def __init__(
        self,
        scale_noise=0.5,
        shift_noise=1.0,
        sample_noise=0.25,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (
            ("scale_noise", scale_noise),
            ("shift_noise", shift_noise),
            ("sample_noise", sample_noise),
        ):
            if not value >= 0:
                raise ValueError(
                    f"Argument `{name}` must be a non-negative float. "
                    f"Received: {name}={value!r}"
                )
        self.scale_noise = float(scale_noise)
        self.shift_noise = float(shift_noise)
        self.sample_noise = float(sample_noise)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None, mask=None):
        outputs = super().call(inputs, training=training, mask=mask)
        if training is None or not self.trainable:
            return outputs
        if isinstance(training, bool):
            return self._add_noise(outputs) if training else outputs
        return keras.ops.cond(
            training,
            lambda: self._add_noise(outputs),
            lambda: outputs,
        )

    def _add_noise(self, outputs):
        # One draw per unit, broadcast over the batch and any other axis,
        # so the whole layer shifts and rescales together within a step.
        rank = len(outputs.shape)
        unit_shape = [1] * rank
        unit_shape[self.axis % rank] = outputs.shape[self.axis]
        dtype = outputs.dtype
        scale = keras.random.uniform(
            unit_shape,
            minval=1.0 - self.scale_noise,
            maxval=1.0 + self.scale_noise,
            dtype=dtype,
            seed=self.seed_generator,
        )
        shift = keras.random.uniform(
            unit_shape,
            minval=-self.shift_noise,
            maxval=self.shift_noise,
            dtype=dtype,
            seed=self.seed_generator,
        )
        noise = keras.random.normal(
            keras.ops.shape(outputs),
            stddev=self.sample_noise,
            dtype=dtype,
            seed=self.seed_generator,
        )
        return outputs * scale + shift + noise

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "scale_noise": self.scale_noise,
                "shift_noise": self.shift_noise,
                "sample_noise": self.sample_noise,
                "seed": self.seed,
            }
        )
        return config


# Dropout flavors by name. Where each goes depends on the model; the
# builders document it.
DROPOUT_FLAVORS = {
    "dropout": "keras Dropout, elementwise",
    "spatial": "keras SpatialDropout1D/2D, whole channels",
    "dropblock": "tfnorm.DropBlock1D/2D, contiguous regions",
    "droppath": "tfnorm.DropPath on residual branches (stochastic depth)",
}
NORMS = (None, "bn", "ghost", "renorm", "noisy", "group")
# What `with_dropout_options` can make of a model's Keras Dropout layers
# (E5's remedies for dropout before BN).
DROPOUT_LAYERS = ("dropout", "uout")
DROPOUT_BLOCKS = ("all", "last")
PLACEMENTS = ("before", "after")


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one variant normalizes a block, and which dropout it uses.

    Attributes:
        name: Registry key.
        summary: One line for listings and reports.
        norm: One of `NORMS`: `None`, `"bn"`, `"ghost"`, `"renorm"`,
            `"noisy"` or `"group"`.
        placement: `"before"` or `"after"` the activation.
        dropout: `None` or a name in `DROPOUT_FLAVORS`.
    """

    name: str
    summary: str
    norm: str | None = None
    placement: str = "before"
    dropout: str | None = None


VARIANTS = {
    v.name: v
    for v in (
        Variant("none", "no normalization"),
        Variant("bn_before", "BN before the activation", norm="bn"),
        Variant(
            "bn_after",
            "BN after the activation",
            norm="bn",
            placement="after",
        ),
        Variant("ghost", "ghost BN (small ghost batches)", norm="ghost"),
        Variant(
            "renorm",
            "batch renormalization, clipping warm-up",
            norm="renorm",
        ),
        Variant("noisy_bn", "BN plus per-step noise (Santurkar)", "noisy"),
        Variant(
            "bn_dropout",
            "BN before the activation, dropout after it",
            norm="bn",
            dropout="dropout",
        ),
        Variant(
            "groupnorm",
            "group normalization (batch-independent baseline)",
            norm="group",
        ),
        Variant(
            "stochastic_depth",
            "BN, residual branches dropped per sample (DropPath)",
            norm="bn",
            dropout="droppath",
        ),
        Variant(
            "dropblock",
            "BN, DropBlock on the feature maps",
            norm="bn",
            dropout="dropblock",
        ),
        Variant(
            "bn_spatial_dropout",
            "BN, spatial dropout on the feature maps",
            norm="bn",
            dropout="spatial",
        ),
    )
}


def check_variants(names):
    """Raises a `ValueError` listing the valid names for unknown ones."""
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(
            f"Unknown variant(s) {', '.join(repr(n) for n in unknown)}. "
            f"Valid variants: {', '.join(VARIANTS)}."
        )


def resolve(variant, placement=None, dropout=None):
    """The registry's `Variant`, with `placement` or `dropout` overridden.

    `dropout="none"` removes the variant's dropout.
    """
    check_variants([variant])
    spec = VARIANTS[variant]
    if placement is not None:
        if placement not in PLACEMENTS:
            raise ValueError(
                f"Unknown placement {placement!r}. "
                f"Valid placements: {', '.join(PLACEMENTS)}."
            )
        spec = dataclasses.replace(spec, placement=placement)
    if dropout is not None:
        if dropout != "none" and dropout not in DROPOUT_FLAVORS:
            raise ValueError(
                f"Unknown dropout flavor {dropout!r}. Valid flavors: "
                f"none, {', '.join(DROPOUT_FLAVORS)}."
            )
        spec = dataclasses.replace(
            spec, dropout=None if dropout == "none" else dropout
        )
    return spec


def _group_count(channels, groups):
    # Group normalization needs the group count to divide the channels;
    # CIFAR ResNets have 16, 32 and 64 channels and the smoke models fewer.
    return math.gcd(channels, groups)


class _Layers:
    """Makes one model's layers for a variant, with unique, findable names.

    Activations are named `act_1`, `act_2`, ... in order, so that
    `preactivation_model` and the diagnostics find them in every model.
    """

    def __init__(
        self,
        spec,
        virtual_batch_size=16,
        synchronized=False,
        groups=8,
        dropout_rate=0.2,
        dropblock_size=3,
        weight_decay=0.0,
        activation="relu",
        kernel_initializer="he_normal",
    ):
        self.spec = spec
        self.virtual_batch_size = virtual_batch_size
        self.synchronized = synchronized
        self.groups = groups
        self.dropout_rate = dropout_rate
        self.dropblock_size = dropblock_size
        self.activation = activation
        self.kernel_initializer = kernel_initializer
        # Coupled L2 as in the papers' SGD: Caffe's and Torch's weight
        # decay `wd` adds `wd * w` to the gradient, which is the gradient
        # of `wd / 2 * ||w||^2`. Keras's `L2(l)` adds `l * ||w||^2`.
        self.regularizer = (
            keras.regularizers.L2(weight_decay / 2) if weight_decay else None
        )
        self._acts = 0

    @property
    def use_bias(self):
        # A bias right before BN is cancelled by its mean subtraction;
        # group normalization subtracts group means only, so it keeps one.
        spec = self.spec
        return spec.norm in (None, "group") or spec.placement == "after"

    def norm(self, x, name):
        """`x` through the variant's normalization layer (or unchanged)."""
        spec = self.spec
        if spec.norm is None:
            return x
        if spec.norm == "group":
            groups = _group_count(x.shape[-1], self.groups)
            return keras.layers.GroupNormalization(groups=groups, name=name)(x)
        bn = {"synchronized": self.synchronized, "name": name}
        if spec.norm == "bn":
            return tfnorm.BatchNormalization(**bn)(x)
        if spec.norm == "ghost":
            return tfnorm.BatchNormalization(
                virtual_batch_size=self.virtual_batch_size, **bn
            )(x)
        if spec.norm == "renorm":
            # Clipping starts closed (r = 1, d = 0, which is plain BN);
            # `tfnorm.callbacks.RenormClippingSchedule` opens it during the
            # run.
            return tfnorm.BatchNormalization(
                renorm=True,
                renorm_clipping={"rmax": 1.0, "rmin": 1.0, "dmax": 0.0},
                **bn,
            )(x)
        if spec.norm == "noisy":
            return NoisyBatchNormalization(**bn)(x)
        raise ValueError(
            f"Unknown normalization {spec.norm!r} in variant {spec.name!r}. "
            f"Valid: {', '.join(str(n) for n in NORMS)}."
        )

    def act(self, x):
        self._acts += 1
        return keras.layers.Activation(
            self.activation, name=f"act_{self._acts}"
        )(x)

    def norm_act(self, x, name):
        """Normalization and activation in the variant's order."""
        if self.spec.placement == "before":
            return self.act(self.norm(x, name))
        return self.norm(self.act(x), name)

    def conv(self, x, filters, kernel_size, strides, name, use_bias=None):
        rank = len(x.shape) - 2
        layer = keras.layers.Conv1D if rank == 1 else keras.layers.Conv2D
        return layer(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=self.use_bias if use_bias is None else use_bias,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.regularizer,
            name=name,
        )(x)

    def dense(self, x, units, name, use_bias=None, dtype=None):
        return keras.layers.Dense(
            units,
            use_bias=self.use_bias if use_bias is None else use_bias,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.regularizer,
            name=name,
            dtype=dtype,
        )(x)

    def logits(self, x, num_classes):
        # float32 logits under mixed precision, so that the softmax and
        # the loss never run in half precision.
        return self.dense(
            x, num_classes, "logits", use_bias=True, dtype="float32"
        )

    def map_dropout(self, x, name, allowed=("dropout", "spatial", "dropblock")):
        """The variant's dropout on a feature map `(batch, ..., channels)`.

        `droppath` is applied by the residual builders themselves, never
        here.
        """
        flavor = self.spec.dropout
        if flavor is None or flavor not in allowed or flavor == "droppath":
            return x
        rank = len(x.shape) - 2
        rate = self.dropout_rate
        if flavor == "dropout":
            return keras.layers.Dropout(rate, name=name)(x)
        if flavor == "spatial":
            layer = (
                keras.layers.SpatialDropout1D
                if rank == 1
                else keras.layers.SpatialDropout2D
            )
            return layer(rate, name=name)(x)
        layer = tfnorm.DropBlock1D if rank == 1 else tfnorm.DropBlock2D
        return layer(rate, block_size=self.dropblock_size, name=name)(x)

    def refuse(self, model):
        """Raises for a dropout flavor that `model` has no place for."""
        if self.spec.dropout not in no_place_for(model):
            return
        if self.spec.dropout == "droppath":
            hint = (
                "DropPath needs residual branches: use a ResNet or "
                "resconvnet1d/2d."
            )
        else:
            # Variant names, not flavors: `--variants` takes the former.
            fitting = [
                name
                for name in variants_for(model)
                if VARIANTS[name].dropout is not None
            ]
            hint = f"Its variants with dropout: {', '.join(fitting)}."
        raise ValueError(
            f"Model {model!r} has no place for dropout flavor "
            f"{self.spec.dropout!r} (variant {self.spec.name!r}). {hint}"
        )


def compile_sgd(model, learning_rate):
    """Compiles a logits classifier with plain SGD, as the zoo trains them.

    Sparse categorical cross-entropy from logits and accuracy; the
    notebooks and small studies use it so each does not repeat it.
    """
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def build_mlp(
    input_shape,
    num_classes,
    variant="none",
    hidden_units=(256,) * 6,
    activation="relu",
    virtual_batch_size=16,
    dropout_rate=0.2,
    placement=None,
    dropout=None,
    **options,
):
    """Builds an MLP classifier that outputs logits.

    Each hidden block is `Dense -> [norm] -> activation -> [dropout]`, or
    `Dense -> activation -> norm` for `placement="after"`. Layers are named
    `dense_i`, `norm_i`, `act_i` and `dropout_i` (i from 1) so that
    diagnostics can find them; the output layer is `logits`.

    Args:
        input_shape: Shape of one example; flattened first.
        num_classes: Number of output logits.
        variant: A name in `VARIANTS`.
        hidden_units: Width of each hidden layer.
        activation: Keras activation name.
        virtual_batch_size: Ghost batch size for the `ghost` variant.
        dropout_rate: Dropout rate for variants with dropout.
        placement: Overrides the variant's placement.
        dropout: Overrides the variant's dropout flavor; only `"dropout"`
            (or `"none"`) fits an MLP.
        **options: `synchronized`, `groups`, `weight_decay`, as for
            `build_resnet`.
    """
    spec = resolve(variant, placement, dropout)
    layers = _Layers(
        spec,
        virtual_batch_size=virtual_batch_size,
        dropout_rate=dropout_rate,
        activation=activation,
        # Keras's default (Glorot uniform) initialization: the
        # unnormalized baseline is what a newcomer would get out of the
        # box.
        kernel_initializer="glorot_uniform",
        **options,
    )
    layers.refuse("mlp")
    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = keras.layers.Flatten(name="flatten")(inputs)
    for i, units in enumerate(hidden_units, start=1):
        x = layers.dense(x, units, f"dense_{i}")
        x = layers.norm_act(x, f"norm_{i}")
        if spec.dropout:
            x = keras.layers.Dropout(dropout_rate, name=f"dropout_{i}")(x)
    outputs = layers.logits(x, num_classes)
    return keras.Model(inputs, outputs, name=f"mlp_{variant}")


def sgd_mlp(data, variant, learning_rate, hidden_units, seed=None, **options):
    """`build_mlp` sized for `data`, compiled by `compile_sgd`.

    The small networks of the notebooks, built in one call.

    Args:
        data: Anything with `input_shape` and `num_classes`, such as a
            `zoo.data.Split`.
        variant: A name in `VARIANTS`.
        learning_rate: Plain SGD's learning rate.
        hidden_units: Width of each hidden layer.
        seed: Seeds Python's, NumPy's and Keras's generators before the
            weights are drawn, so the run repeats; None leaves them as
            they are.
        **options: Passed to `build_mlp` (`virtual_batch_size`, ...).
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    model = build_mlp(
        data.input_shape,
        data.num_classes,
        variant,
        hidden_units,
        **options,
    )
    return compile_sgd(model, learning_rate)


def _as_map(inputs, rank):
    """Reshapes flat or channel-less inputs into `rank`-D feature maps."""
    shape = tuple(inputs.shape[1:])
    if len(shape) == rank + 1:
        return inputs
    if len(shape) == rank:
        return keras.layers.Reshape(shape + (1,), name="to_map")(inputs)
    if rank == 2 and len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0]:
        side = math.isqrt(shape[0])
        return keras.layers.Reshape((side, side, 1), name="to_map")(inputs)
    raise ValueError(
        f"Cannot read inputs of shape {shape} as {rank}-D feature maps. "
        f"Expected (length,) or (length, channels) for 1-D, and (h, w), "
        f"(h, w, channels) or a flat square image for 2-D."
    )


@keras.saving.register_keras_serializable(package="zoo")
class ZeroPadShortcut(keras.layers.Layer):
    """He et al.'s option A shortcut: subsample, then add zero channels.

    Parameter-free: keeps every `strides`-th row and column and pads the
    channel axis with zeros on both sides up to `channels`.

    Args:
        channels: Output channels, at least the input's.
        strides: Spatial subsampling factor.
    """

    def __init__(self, channels, strides=2, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.strides = int(strides)

    def call(self, inputs):
        s = self.strides
        x = inputs[:, ::s, ::s, :]
        extra = self.channels - x.shape[-1]
        front = extra // 2
        return keras.ops.pad(
            x, [[0, 0], [0, 0], [0, 0], [front, extra - front]]
        )

    def compute_output_shape(self, input_shape):
        def down(size):
            return None if size is None else -(-size // self.strides)

        b, h, w, _ = input_shape
        return (b, down(h), down(w), self.channels)

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels, "strides": self.strides})
        return config


RESNET_WIDTHS = (16, 32, 64)


def build_resnet(
    depth,
    input_shape,
    num_classes,
    variant="bn_before",
    preactivation=False,
    shortcut="A",
    width=1.0,
    placement=None,
    dropout=None,
    **options,
):
    """Builds a CIFAR ResNet (He et al. 2016) of `depth = 6 n + 2` layers.

    A 3x3 convolution with 16 channels, then three stages of `n` basic
    blocks (two 3x3 convolutions each) with 16, 32 and 64 channels, the
    last two starting with stride 2, then global average pooling and the
    classifier. ResNet-20 has n = 3, ResNet-56 n = 9, ResNet-110 n = 18.

    Post-activation block (`preactivation=False`, the original):
    `conv -> norm -> act -> conv -> norm -> add -> act`. With
    `placement="after"` each norm moves behind its activation, including
    the one after the addition. Pre-activation block (He et al. 2016b):
    `norm -> act -> conv -> norm -> act -> conv -> add`, with a final
    norm and activation before the pooling.

    Dropout flavors: `droppath` drops each residual branch per sample
    with the linear depth rule (`tfnorm.stochastic_depth_rates`, last
    block at `dropout_rate`); `dropblock` applies `tfnorm.DropBlock2D` to
    the outputs of the blocks of the last two stages, as Ghiasi et al. do
    for the last groups of a ResNet; `dropout` and `spatial` go between
    the two convolutions of each block.

    Args:
        depth: 8, 14, 20, ...: any `6 n + 2`.
        input_shape: `(h, w, c)`, `(h, w)` or a flat square image.
        num_classes: Number of output logits.
        variant: A name in `VARIANTS`.
        preactivation: The pre-activation form instead of the original.
        shortcut: `"A"` (zero-padded identity, no parameters, as He et
            al. use on CIFAR) or `"B"` (1x1 convolution and norm where
            the shape changes).
        width: Multiplies the channel counts (1.0 is the paper's).
        placement: Overrides the variant's placement.
        dropout: Overrides the variant's dropout flavor.
        **options: `virtual_batch_size`, `synchronized` (tfnorm BN's
            cross-replica statistics), `groups` (group normalization),
            `dropout_rate`, `dropblock_size`, `weight_decay`.
    """
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"`depth` must be an int. Received: depth={depth!r}")
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            "A CIFAR ResNet has depth 6 n + 2 for n >= 1 (8, 14, 20, 32, "
            f"44, 56, 110, ...). Received: depth={depth}"
        )
    if shortcut not in ("A", "B"):
        raise ValueError(
            f"`shortcut` must be 'A' or 'B'. Received: shortcut={shortcut!r}"
        )
    spec = resolve(variant, placement, dropout)
    layers = _Layers(spec, **options)
    n = (depth - 2) // 6
    widths = [max(1, round(c * width)) for c in RESNET_WIDTHS]
    drop_rates = (
        tfnorm.stochastic_depth_rates(3 * n, max_rate=layers.dropout_rate)
        if spec.dropout == "droppath"
        else None
    )

    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = _as_map(inputs, 2)
    x = layers.conv(x, widths[0], 3, 1, "stem_conv")
    if not preactivation:
        x = layers.norm_act(x, "stem_norm")
    block = 0
    for stage, channels in enumerate(widths, start=1):
        for i in range(1, n + 1):
            strides = 2 if stage > 1 and i == 1 else 1
            p = f"s{stage}b{i}"
            reshape = strides != 1 or x.shape[-1] != channels
            if preactivation:
                y = layers.norm_act(x, f"{p}_norm1")
                branch_in = y
            else:
                y = x
                branch_in = x
            y = layers.conv(y, channels, 3, strides, f"{p}_conv1")
            y = layers.norm_act(y, f"{p}_norm{1 if not preactivation else 2}")
            y = layers.map_dropout(y, f"{p}_dropout", ("dropout", "spatial"))
            y = layers.conv(y, channels, 3, 1, f"{p}_conv2")
            if not preactivation and spec.placement == "before":
                y = layers.norm(y, f"{p}_norm2")
            if drop_rates is not None:
                y = tfnorm.DropPath(drop_rates[block], name=f"{p}_droppath")(y)
            if not reshape:
                skip = x
            elif shortcut == "A":
                skip = ZeroPadShortcut(channels, strides, name=f"{p}_skip")(x)
            else:
                # The projection sees what the branch sees: the
                # pre-activated input in the pre-activation form.
                skip = layers.conv(
                    branch_in, channels, 1, strides, f"{p}_skip", False
                )
                if not preactivation:
                    skip = layers.norm(skip, f"{p}_skip_norm")
            x = keras.layers.Add(name=f"{p}_add")([skip, y])
            if not preactivation:
                if spec.placement == "before":
                    x = layers.act(x)
                else:
                    x = layers.norm_act(x, f"{p}_norm_out")
            if stage > 1:
                x = layers.map_dropout(x, f"{p}_dropblock", ("dropblock",))
            block += 1
    if preactivation:
        x = layers.norm_act(x, "final_norm")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.logits(x, num_classes)
    kind = "preresnet" if preactivation else "resnet"
    return keras.Model(inputs, outputs, name=f"{kind}{depth}_{variant}")


VGG_LAYERS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ),
}


def build_vgg(
    depth,
    input_shape,
    num_classes,
    variant="bn_before",
    width=1.0,
    placement=None,
    dropout=None,
    **options,
):
    """Builds VGG-11 or VGG-16 for 32x32 inputs (Simonyan & Zisserman).

    The convolutional stack of the ImageNet network, 3x3 convolutions
    with `conv -> norm -> act`, five 2x2 max-poolings that take 32x32 to
    1x1, then a single linear classifier on the 512 features instead of
    ImageNet's three large dense layers, as CIFAR versions (and the
    network of Santurkar et al.) do. Dropout flavors go after each
    pooling.

    Args:
        depth: 11 or 16.
        input_shape: `(32, 32, c)` (any side of at least 32).
        width: Multiplies the channel counts.
        Others: as for `build_resnet`.
    """
    if depth not in VGG_LAYERS:
        raise ValueError(
            f"VGG depth must be one of {sorted(VGG_LAYERS)}. "
            f"Received: depth={depth!r}"
        )
    spec = resolve(variant, placement, dropout)
    layers = _Layers(spec, **options)
    layers.refuse(f"vgg{depth}")
    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = _as_map(inputs, 2)
    if min(x.shape[1:3]) < 32:
        raise ValueError(
            "VGG's five poolings need inputs of at least 32x32. "
            f"Received: input_shape={tuple(input_shape)}"
        )
    conv = pool = 0
    for item in VGG_LAYERS[depth]:
        if item == "M":
            pool += 1
            x = keras.layers.MaxPooling2D(2, name=f"pool_{pool}")(x)
            x = layers.map_dropout(x, f"dropout_{pool}")
            continue
        conv += 1
        channels = max(1, round(item * width))
        x = layers.conv(x, channels, 3, 1, f"conv_{conv}")
        x = layers.norm_act(x, f"norm_{conv}")
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = layers.logits(x, num_classes)
    return keras.Model(inputs, outputs, name=f"vgg{depth}_{variant}")


def build_convnet(
    rank,
    input_shape,
    num_classes,
    variant="bn_before",
    filters=(32, 64, 64),
    width=1.0,
    residual=False,
    placement=None,
    dropout=None,
    **options,
):
    """Builds a small conv net for MNIST-1D (rank 1) or 28x28 digits (2).

    `len(filters)` blocks of `conv -> norm -> act -> [dropout]`, the first
    with stride 1 and the others with stride 2 (kernel 5 in 1-D, 3 in
    2-D), then the flattened maps into the classifier. Flattening rather
    than pooling keeps where a feature was, which MNIST-1D's digits need.

    With `residual=True` (the models `resconvnet1d` and `resconvnet2d`)
    each block's `conv -> norm -> act` is followed by one residual block
    of the same width and length, `conv -> norm -> act -> conv -> norm`
    added to an identity shortcut and activated, as in a CIFAR ResNet's
    basic block; the dropout flavors then go after the addition. The
    blocks of the plain net change their shape (stride or width), so
    they have no identity shortcut to build on: the residual blocks are
    what gives DropPath (the `droppath` flavor, with the linear depth
    rule up to `dropout_rate`) a branch to drop, and the same network
    serves every flavor, so that they can be compared fairly.

    Args:
        rank: 1 or 2.
        input_shape: `(length,)` or `(length, c)` for rank 1; `(h, w)`,
            `(h, w, c)` or a flat square image for rank 2.
        filters: Channels of each block, before `width`.
        residual: Adds a residual block after each block.
        Others: as for `build_resnet`.
    """
    if rank not in (1, 2):
        raise ValueError(f"`rank` must be 1 or 2. Received: rank={rank!r}")
    spec = resolve(variant, placement, dropout)
    layers = _Layers(spec, **options)
    kind = f"{'res' if residual else ''}convnet{rank}d"
    layers.refuse(kind)
    drop_rates = (
        tfnorm.stochastic_depth_rates(
            len(filters), max_rate=layers.dropout_rate
        )
        if residual and spec.dropout == "droppath"
        else None
    )
    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = _as_map(inputs, rank)
    kernel = 5 if rank == 1 else 3
    for i, channels in enumerate(filters, start=1):
        channels = max(1, round(channels * width))
        x = layers.conv(x, channels, kernel, 1 if i == 1 else 2, f"conv_{i}")
        x = layers.norm_act(x, f"norm_{i}")
        if residual:
            p = f"res{i}"
            y = layers.conv(x, channels, kernel, 1, f"{p}_conv1")
            y = layers.norm_act(y, f"{p}_norm1")
            y = layers.conv(y, channels, kernel, 1, f"{p}_conv2")
            if spec.placement == "before":
                y = layers.norm(y, f"{p}_norm2")
            if drop_rates is not None:
                y = tfnorm.DropPath(drop_rates[i - 1], name=f"{p}_droppath")(y)
            x = keras.layers.Add(name=f"{p}_add")([x, y])
            # BN after the activation normalizes the sum, as in
            # `build_resnet`'s post-activation block.
            if spec.placement == "before":
                x = layers.act(x)
            else:
                x = layers.norm_act(x, f"{p}_norm_out")
        x = layers.map_dropout(x, f"dropout_{i}")
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = layers.logits(x, num_classes)
    return keras.Model(inputs, outputs, name=f"{kind}_{variant}")


RESNET_DEPTHS = (20, 32, 44, 56, 110)
_RESNET_NAME = re.compile(r"(pre)?resnet(\d+)")


def model_names():
    """The model names `build` accepts (any `resnet{6n+2}` in addition)."""
    return (
        ["mlp", "convnet1d", "convnet2d", "resconvnet1d", "resconvnet2d"]
        + ["vgg11", "vgg16"]
        + [f"resnet{d}" for d in RESNET_DEPTHS]
        + [f"preresnet{d}" for d in RESNET_DEPTHS]
    )


def check_model(name):
    """Raises a `ValueError` listing the valid names if `name` is unknown."""
    match = _RESNET_NAME.fullmatch(name)
    if name in model_names() or (
        match and int(match[2]) >= 8 and (int(match[2]) - 2) % 6 == 0
    ):
        return
    raise ValueError(
        f"Unknown model '{name}'. Valid models: "
        f"{', '.join(model_names())} (and any resnet/preresnet of depth "
        "6 n + 2)."
    )


def no_place_for(model):
    """The dropout flavors that the model named `model` has no place for.

    The MLP has no feature maps for spatial dropout or DropBlock, and only
    the residual models have branches for DropPath to drop.
    """
    if model == "mlp":
        return ("spatial", "dropblock", "droppath")
    if model.startswith("resconvnet") or _RESNET_NAME.fullmatch(model):
        return ()
    return ("droppath",)


def variants_for(model):
    """The names in `VARIANTS` that the model `model` can be built with."""
    refused = no_place_for(model)
    return [name for name, v in VARIANTS.items() if v.dropout not in refused]


# The options only some builders take; `build` passes each builder its own.
_MLP_ONLY = ("hidden_units", "activation")
_CONV_ONLY = ("width", "shortcut")


def with_dropout_options(model, layer="dropout", blocks="all"):
    """`model` with its Keras `Dropout` layers changed as asked.

    `layer="uout"` puts `tfnorm.Uout` (Li et al. 2019's uniform noise,
    the dropout rate as its half-width) in place of each `Dropout`, under
    the same name; `blocks="last"` keeps only the last `Dropout` in the
    model's layer order (in the MLP, the one after the last
    normalization, before the classifier) and removes the others. Every
    other layer is copied with its weights, so a seed starts from the
    same weights whichever options it trains with. The defaults return
    `model` itself. Spatial dropout, DropBlock and DropPath are left
    alone.

    The options act on a built model rather than on the variant
    registry, so they apply to the `Dropout` of any
    builder and combine with any variant that has one (E5's remedies:
    `zoo/studies/dropout_shift.py`).

    Args:
        model: A functional model from `build`.
        layer: One of `DROPOUT_LAYERS`.
        blocks: One of `DROPOUT_BLOCKS`.

    Raises:
        ValueError: when options other than the defaults meet a model
            without `Dropout` layers.
    """
    if layer == "dropout" and blocks == "all":
        return model
    # Exact type: Keras's spatial dropouts subclass Dropout.
    drops = [d.name for d in model.layers if type(d) is keras.layers.Dropout]
    if not drops:
        raise ValueError(
            f"dropout_layer={layer!r} and dropout_blocks={blocks!r} change "
            f"the Dropout layers of a model, and {model.name!r} has none. "
            "Use a variant with elementwise dropout, such as bn_dropout."
        )
    removed = set(drops[:-1]) if blocks == "last" else set()

    def clone(old):
        if old.name in drops and layer == "uout":
            return tfnorm.Uout(float(old.rate), name=old.name)
        # New layers rather than the old ones in a new graph: a layer's
        # `input` (which the probes read) is that of its first call.
        return old.__class__.from_config(old.get_config())

    def call(new, *args, **kwargs):
        if new.name in removed:
            return args[0]
        return new(*args, **kwargs)

    cloned = keras.models.clone_model(
        model, clone_function=clone, call_function=call
    )
    for new in cloned.layers:
        if new.name not in drops:
            new.set_weights(model.get_layer(new.name).get_weights())
    return cloned


def build(
    name,
    input_shape,
    num_classes,
    variant="none",
    dropout_layer="dropout",
    dropout_blocks="all",
    **options,
):
    """Builds the model registered as `name` for the given variant.

    Args:
        name: A name from `model_names()`, or `resnet{d}`/`preresnet{d}`.
        input_shape: Shape of one example.
        num_classes: Number of output logits.
        variant: A name in `VARIANTS`.
        dropout_layer, dropout_blocks: Changes to the model's Keras
            `Dropout` layers, see `with_dropout_options`.
        **options: Passed to the builder; options meant for another kind
            of model (`hidden_units` for a ResNet, `width` for the MLP,
            `shortcut` for a non-ResNet) are dropped.
    """
    check_model(name)
    model = _build(name, input_shape, num_classes, variant, **options)
    return with_dropout_options(model, dropout_layer, dropout_blocks)


def _build(name, input_shape, num_classes, variant, **options):
    drop = _CONV_ONLY if name == "mlp" else _MLP_ONLY
    if _RESNET_NAME.fullmatch(name) is None:
        drop = drop + ("shortcut",)
    options = {k: v for k, v in options.items() if k not in drop}
    if name == "mlp":
        return build_mlp(input_shape, num_classes, variant, **options)
    if "convnet" in name:
        residual = name.startswith("res")
        return build_convnet(
            int(name[-2]),
            input_shape,
            num_classes,
            variant,
            residual=residual,
            **options,
        )
    if name.startswith("vgg"):
        return build_vgg(
            int(name[3:]), input_shape, num_classes, variant, **options
        )
    match = _RESNET_NAME.fullmatch(name)
    return build_resnet(
        int(match[2]),
        input_shape,
        num_classes,
        variant,
        preactivation=bool(match[1]),
        **options,
    )


def preactivation_model(model, max_layers=None):
    """A model mapping `model`'s inputs to each activation's input.

    The outputs are a dict keyed by the activation layers' names. It shares
    weights with `model`, so it always shows the current pre-activations.
    With `max_layers`, only that many activations, evenly spaced from the
    first to the last, are probed (a ResNet-110 has 109).
    """
    acts = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Activation)
    ]
    if max_layers is not None and len(acts) > max_layers:
        picks = {
            round(i * (len(acts) - 1) / (max_layers - 1))
            for i in range(max_layers)
        }
        acts = [acts[i] for i in sorted(picks)]
    outputs = {layer.name: layer.input for layer in acts}
    # The single input tensor, not a one-element list: the probe is called
    # with a plain array.
    return keras.Model(model.input, outputs, name=f"{model.name}_preact")


def uses_renorm(variant):
    """Whether a variant needs the renorm clipping schedule."""
    return VARIANTS[variant].norm == "renorm"
