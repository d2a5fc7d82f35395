"""DropPath (stochastic depth): drops whole residual branches per sample."""

import keras
from keras import ops

from tfnorm import _checks
from tfnorm.dropout.base import DropoutLayer
from tfnorm.dropout.base import validate_rate


@keras.saving.register_keras_serializable(package="tfnorm")
class DropPath(DropoutLayer):
    """Drops the whole input of each sample: stochastic depth.

    Placed at the end of a residual branch, before the addition, it removes
    the branch for randomly chosen samples, so the block reduces to its
    shortcut for them.

    In training, each sample is kept with probability `1 - rate`, and kept
    samples are scaled so that the expectation is unchanged:

        y[n] = x[n] * k[n] / (1 - rate),   k[n] ~ Bernoulli(1 - rate)

    At inference, and whenever the rate is 0, `y = x` exactly. This is the
    per-sample ("row") form with inverted scaling. The paper and some Keras
    ports instead draw one decision for the whole batch and scale by
    `1 - rate` at inference; tfnorm keeps inference free of any scaling.

    The rate lives in a non-trainable variable, so
    `tfnorm.callbacks.DropRateSchedule` can change it during training. Use
    `tfnorm.stochastic_depth_rates` for the paper's linear depth rule.

    Args:
        rate: float in [0, 1), the probability of dropping a sample's branch.
        seed: int or None, the seed of the mask sequence.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: tensor of any rank >= 1; axis 0 is the batch.
        training: Python bool or boolean tensor, whether to drop.
            Defaults to `False`.

    Input shape and output shape are the same.

    Reference:
    - [Huang et al., 2016](https://arxiv.org/abs/1603.09382)

    Example:

    >>> x = keras.Input((32, 32, 64))
    >>> branch = keras.layers.Conv2D(64, 3, padding="same")(x)
    >>> y = keras.layers.Add()([x, DropPath(0.1, seed=0)(branch)])
    """

    def _drop(self, inputs, rate, seed):
        batch = ops.shape(inputs)[0]
        keep = ops.cast(self._uniform([batch], seed) >= rate, "float32")
        # The factor is formed in float32 and cast once, so float16 outputs
        # carry one rounding of 1 / (1 - rate), not two.
        factor = keep / (1.0 - rate)
        factor = ops.reshape(factor, [batch] + [1] * (len(inputs.shape) - 1))
        return inputs * ops.cast(factor, inputs.dtype)


def stochastic_depth_rates(num_blocks, max_rate=0.5):
    """Per-block drop rates of the linear depth rule of stochastic depth.

    Block `l` of `L` (counted from 1 at the input) gets
    `rate_l = l / L * max_rate`: early blocks, which extract features every
    later block needs, are rarely dropped, and the last block is dropped
    with probability `max_rate` (the paper's `p_L`, 0.5 in the paper).

    Args:
        num_blocks: positive int, the number of residual blocks `L`.
        max_rate: float in [0, 1), the rate of the last block.

    Returns:
        A list of `num_blocks` Python floats, increasing.

    Reference:
    - [Huang et al., 2016](https://arxiv.org/abs/1603.09382)

    Example:

    >>> stochastic_depth_rates(4, max_rate=0.2)
    [0.05, 0.1, 0.15000000000000002, 0.2]
    """
    num_blocks = _checks.positive_int(num_blocks, "num_blocks")
    max_rate = validate_rate(max_rate, "max_rate")
    return [i / num_blocks * max_rate for i in range(1, num_blocks + 1)]
