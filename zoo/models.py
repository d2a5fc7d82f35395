"""Model builders and the variant registry they share.

A *variant* names which normalization an MLP uses and where it sits:
`build_mlp(..., variant="bn_before")` builds Dense -> BN -> ReLU blocks,
`variant="none"` plain Dense -> ReLU blocks. Every builder takes its
layers from `VARIANTS`, so a variant means the same thing in every
experiment. tfnorm's layers provide BN, ghost BN and renorm; Keras's own
layers provide the rest; the one layer defined here, noisy BN, is an
experimental probe that does not belong in the library.
"""

import dataclasses

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


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one variant normalizes a hidden block.

    Attributes:
        name: Registry key.
        summary: One line for listings and reports.
        norm: `None`, `"bn"`, `"ghost"`, `"renorm"` or `"noisy"`.
        placement: `"before"` or `"after"` the activation.
        dropout: Whether the block ends with dropout.
    """

    name: str
    summary: str
    norm: str | None = None
    placement: str = "before"
    dropout: bool = False


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
            dropout=True,
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


def _norm_layer(variant, name, virtual_batch_size):
    if variant.norm == "bn":
        return tfnorm.BatchNormalization(name=name)
    if variant.norm == "ghost":
        return tfnorm.BatchNormalization(
            virtual_batch_size=virtual_batch_size,
            name=name,
        )
    if variant.norm == "renorm":
        # Clipping starts closed (r = 1, d = 0, which is plain BN);
        # `tfnorm.callbacks.RenormClippingSchedule` opens it during the run.
        return tfnorm.BatchNormalization(
            renorm=True,
            renorm_clipping={"rmax": 1.0, "rmin": 1.0, "dmax": 0.0},
            name=name,
        )
    if variant.norm == "noisy":
        return NoisyBatchNormalization(name=name)
    raise ValueError(f"Variant {variant.name!r} has no normalization layer.")


def build_mlp(
    input_shape,
    num_classes,
    variant="none",
    hidden_units=(256,) * 6,
    activation="relu",
    virtual_batch_size=16,
    dropout_rate=0.2,
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
    """
    check_variants([variant])
    spec = VARIANTS[variant]
    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = keras.layers.Flatten(name="flatten")(inputs)
    for i, units in enumerate(hidden_units, start=1):
        # A bias right before BN is cancelled by its mean subtraction.
        use_bias = spec.norm is None or spec.placement == "after"
        # Keras's default (Glorot uniform) initialization throughout: the
        # unnormalized baseline is what a newcomer would get out of the box.
        x = keras.layers.Dense(units, use_bias=use_bias, name=f"dense_{i}")(x)
        if spec.norm is not None and spec.placement == "before":
            x = _norm_layer(spec, f"norm_{i}", virtual_batch_size)(x)
        x = keras.layers.Activation(activation, name=f"act_{i}")(x)
        if spec.norm is not None and spec.placement == "after":
            x = _norm_layer(spec, f"norm_{i}", virtual_batch_size)(x)
        if spec.dropout:
            x = keras.layers.Dropout(dropout_rate, name=f"dropout_{i}")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"mlp_{variant}")


def preactivation_model(model):
    """A model mapping `model`'s inputs to each activation's input.

    The outputs are a dict keyed by the activation layers' names. It shares
    weights with `model`, so it always shows the current pre-activations.
    """
    acts = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Activation)
    ]
    outputs = {layer.name: layer.input for layer in acts}
    # The single input tensor, not a one-element list: the probe is called
    # with a plain array.
    return keras.Model(model.input, outputs, name=f"{model.name}_preact")


def uses_renorm(variant):
    """Whether a variant needs the renorm clipping schedule."""
    return VARIANTS[variant].norm == "renorm"
