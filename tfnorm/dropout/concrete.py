"""Concrete dropout: a dropout rate learned by gradient descent."""

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfnorm.dropout.base import KernelWrapper
from tfnorm.dropout.base import call_with_tensor_training
from tfnorm.dropout.base import float32_repr

# Keeps log(u) and log(1 - u) finite for uniforms at the ends of [0, 1).
_EPSILON = 1e-7

# Their kernels end with (filters, input channels), not the other way.
_TRANSPOSED = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)


def _check_nonnegative(value, name):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating, np.integer))
        or not 0 <= value < np.inf
    ):
        raise ValueError(
            f"`{name}` must be a finite non-negative number. "
            f"Received: {name}={value!r}"
        )
    return float(value)


@keras.saving.register_keras_serializable(package="tfnorm")
class ConcreteDropout(KernelWrapper):
    """Dropout on the inputs of a wrapped layer, with a learned rate.

    The drop rate `p` is a weight: `p = sigmoid(rate_logit)`, trained with
    the rest of the model. To make the mask differentiable in `p`, the
    Bernoulli draw is relaxed to a Concrete (Gumbel-softmax) variable with
    temperature `t`:

        z = sigmoid((logit(p) + log(u) - log(1 - u)) / t),  u ~ U(0, 1)
        y = layer(x * (1 - z) / (1 - p))

    in training; as `t -> 0`, `z` becomes a Bernoulli(p) drop indicator. At
    inference the wrapped layer sees `x` unchanged; run
    `tfnorm.mc_predict` to sample the dropout at prediction time, as the
    paper does.

    Every call adds the paper's regularizer with `add_loss`:

        weight_regularizer * sum(W^2) / (1 - p)
        + dropout_regularizer * K * (p log p + (1 - p) log(1 - p))

    with `W` the wrapped kernel and `K` its number of input features
    (`kernel.shape[-2]`, the inputs of a Dense or the channels of a
    convolution; `kernel.shape[-1]` for a transposed convolution). The
    second term is `-K` times the entropy of the rate: it pulls `p`
    towards 0.5 and balances the first, which favours small `p`. The paper
    sets `weight_regularizer = l^2 / N` and `dropout_regularizer = 2 / N`
    for N training examples and prior length scale l. Both terms, and the
    mask's rescaling, are computed from `rate_logit` directly, so they stay
    finite where `sigmoid` rounds the rate to exactly 0 or 1 in float32.

    The learned rate is visible as weights: the trainable `rate_logit`, and
    a non-trainable `rate` that mirrors `sigmoid(rate_logit)` at each
    training call, so TensorBoard's weight histograms and `layer.weights`
    show it. The `rate` attribute reads `sigmoid(rate_logit)`. Unlike the
    other tfnorm dropout layers, the rate is learned, so
    `tfnorm.callbacks.DropRateSchedule` leaves this layer alone, and
    `get_config()` reports the current rate as `initial_rate`. The mask is
    elementwise, also for convolutions.

    Args:
        layer: a `keras.layers.Layer` with a `kernel` variable, such as Dense
            or Conv2D.
        weight_regularizer: non-negative float, the weight of the kernel
            term.
        dropout_regularizer: non-negative float, the weight of the entropy
            term.
        initial_rate: float in (0, 1), the rate at initialization.
        temperature: positive float, the temperature `t` of the relaxation.
        seed: int or None, the seed of the noise sequence.
        **kwargs: base layer keyword arguments, such as `name`.

    Call arguments:
        inputs: the wrapped layer's input.
        training: Python bool or boolean tensor, whether to drop.
            Defaults to `False`.

    Output shape: that of the wrapped layer.

    Reference:
    - [Gal et al., 2017](https://arxiv.org/abs/1705.07832)

    Example:

    >>> layer = ConcreteDropout(
    ...     keras.layers.Dense(16),
    ...     weight_regularizer=1e-6,
    ...     dropout_regularizer=2e-5,
    ...     seed=0,
    ... )
    >>> y = layer(np.ones((4, 8), "float32"), training=True)
    >>> 0.0 < layer.rate < 1.0
    True
    """

    _schedulable = False

    def __init__(
        self,
        layer,
        weight_regularizer=1e-6,
        dropout_regularizer=1e-5,
        initial_rate=0.1,
        temperature=0.1,
        seed=None,
        **kwargs,
    ):
        # Without autocast (KernelWrapper) the rate, the relaxed mask and
        # the regularizer are computed in float32.
        super().__init__(layer, **kwargs)
        self.weight_regularizer = _check_nonnegative(
            weight_regularizer, "weight_regularizer"
        )
        self.dropout_regularizer = _check_nonnegative(
            dropout_regularizer, "dropout_regularizer"
        )
        if (
            isinstance(initial_rate, bool)
            or not isinstance(
                initial_rate, (int, float, np.floating, np.integer)
            )
            or not 0.0 < initial_rate < 1.0
            # The rate is mirrored in float32, where it must stay below 1.
            or not np.float32(initial_rate) < 1.0
        ):
            raise ValueError(
                "`initial_rate` must be a number in the open range (0, 1): "
                "its logit is the initial weight. "
                f"Received: initial_rate={initial_rate!r}"
            )
        if (
            isinstance(temperature, bool)
            or not isinstance(
                temperature, (int, float, np.floating, np.integer)
            )
            # An infinite temperature flattens every mask to 1 / 2.
            or not 0 < temperature < np.inf
        ):
            raise ValueError(
                "`temperature` must be a finite positive number. "
                f"Received: temperature={temperature!r}"
            )
        self.temperature = float(temperature)
        self._init_rate(initial_rate, seed)
        initial_rate = float(initial_rate)
        self.rate_logit = self.add_weight(
            name="rate_logit",
            shape=(),
            dtype="float32",
            initializer=keras.initializers.Constant(
                math.log(initial_rate) - math.log1p(-initial_rate)
            ),
            trainable=True,
            autocast=False,
        )
        self._check_kernel_if_built()

    @property
    def rate(self):
        """The current learned rate, `sigmoid(rate_logit)`, a Python float."""
        logit = float(ops.convert_to_numpy(self.rate_logit.value))
        # exp of a positive argument only: no overflow for any float32.
        if logit >= 0:
            rate = 1.0 / (1.0 + math.exp(-logit))
        else:
            rate = math.exp(logit) / (1.0 + math.exp(logit))
        return float32_repr(rate)

    def _config_rate(self):
        """The current rate, kept inside the open range `__init__` accepts.

        A learned logit past about 17 (or below about -104) reads as a
        rate of exactly 1 (or 0) in float32, which `__init__` rejects: the
        config would save but not load. The nearest float32 inside (0, 1)
        stands in; loading restores the exact `rate_logit` weight anyway.
        """
        rate = np.float32(self.rate)
        rate = min(rate, np.nextafter(np.float32(1), np.float32(0)))
        rate = max(rate, np.nextafter(np.float32(0), np.float32(1)))
        return float32_repr(rate)

    def _regularizer(self, logit):
        kernel = ops.convert_to_tensor(self._kernel().value)
        kernel = ops.cast(kernel, "float32")
        # With p = sigmoid(logit): 1 / (1 - p) = 1 + exp(logit),
        # log p = -softplus(-logit) and log(1 - p) = -softplus(logit). In
        # float32, sigmoid is exactly 1 from logit 17 on (and 0 below
        # -104), where 1 / (1 - p) and 0 * log(0) would give inf and NaN.
        weight_term = ops.sum(ops.square(kernel)) * (1.0 + ops.exp(logit))
        neg_entropy = -(
            ops.sigmoid(logit) * ops.softplus(-logit)
            + ops.sigmoid(-logit) * ops.softplus(logit)
        )
        if isinstance(self.layer, _TRANSPOSED):
            input_features = kernel.shape[-1]
        else:
            input_features = kernel.shape[-2] if len(kernel.shape) > 1 else 1
        return (
            self.weight_regularizer * weight_term
            + self.dropout_regularizer * input_features * neg_entropy
        )

    def call(self, inputs, training=False):
        logit = ops.convert_to_tensor(self.rate_logit.value)
        # Outside any cond on `training`: a loss made inside a branch would
        # be a tensor of that branch's graph.
        self.add_loss(self._regularizer(logit))
        if tf.is_tensor(training):
            return call_with_tensor_training(self._forward, inputs, training)
        return self._forward(inputs, training)

    def _forward(self, inputs, training):
        logit = ops.convert_to_tensor(self.rate_logit.value)
        rate = ops.sigmoid(logit)
        # `training` is not passed on: a kernel layer does not use it, and
        # an explicit value would leak into later sibling layers (Keras 3.15).
        if not training:
            return self.layer(inputs)
        self._rate.assign(rate)
        u = self._uniform(ops.shape(inputs), self._next_seed())
        u = ops.clip(u, _EPSILON, 1.0 - _EPSILON)
        relaxed = (logit + ops.log(u) - ops.log1p(-u)) / self.temperature
        # (1 - drop) / (1 - rate) = sigmoid(-relaxed) * (1 + exp(logit)),
        # taken in log space: the product form is 0 * inf = NaN once
        # exp(logit) overflows float32 (logit past about 88).
        factor = ops.exp(ops.softplus(logit) - ops.softplus(relaxed))
        x = ops.convert_to_tensor(inputs)
        if not keras.backend.is_float_dtype(x.dtype):
            x = ops.cast(x, "float32")
        return self.layer(x * ops.cast(factor, x.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "weight_regularizer": self.weight_regularizer,
                "dropout_regularizer": self.dropout_regularizer,
                "initial_rate": self._config_rate(),
                "temperature": self.temperature,
                "seed": self.seed,
            }
        )
        return config
