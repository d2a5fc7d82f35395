"""Uout: uniform multiplicative noise, a dropout that shifts variance less."""

import keras
from keras import ops

from tfnorm.dropout.base import DropoutLayer


@keras.saving.register_keras_serializable(package="tfnorm")
class Uout(DropoutLayer):
    """Multiplies inputs by uniform noise centred on 1 (Uout).

    Dropout placed before Batch Normalization changes the variance BN sees
    between training and inference (the variance shift). Uout's noise has
    variance `rate^2 / 3`, much less than dropout's `rate / (1 - rate)` at
    comparable regularization, so the shift is smaller.

    In training, independently for every element,

        y = x * (1 + u),   u ~ U(-rate, rate)

    so `E[y] = x`. At inference, and whenever the rate is 0, `y = x` exactly.

    The paper calls the half-width `beta`. tfnorm names it `rate` because
    `beta` is the offset of every BN layer in this package, and because the
    shared name lets `tfnorm.callbacks.DropRateSchedule` drive Uout like the
    other dropout layers. It is restricted to [0, 1) so that `1 + u` stays
    positive and no sign is flipped.

    Args:
        rate: float in [0, 1), the half-width of the noise (the paper's
            `beta`).
        seed: int or None, the seed of the noise sequence.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: tensor of any shape.
        training: Python bool or boolean tensor, whether to add noise.
            Defaults to `False`.

    Input shape and output shape are the same.

    Reference:
    - [Li et al., 2019](https://arxiv.org/abs/1801.05134)

    Example:

    >>> layer = Uout(rate=0.1, seed=0)
    >>> y = layer(np.ones((2, 3), "float32"), training=True)
    """

    def _drop(self, inputs, rate, seed):
        u = self._uniform(ops.shape(inputs), seed)
        # The factor is formed in float32 and cast once to the compute dtype.
        factor = 1.0 + rate * (2.0 * u - 1.0)
        return inputs * ops.cast(factor, inputs.dtype)
