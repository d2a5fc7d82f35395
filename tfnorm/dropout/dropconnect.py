"""DropConnect: dropout of the weights of a wrapped layer."""

import keras
import tensorflow as tf
from keras import ops

from tfnorm.dropout.base import KernelWrapper
from tfnorm.dropout.base import call_with_tensor_training


@keras.saving.register_keras_serializable(package="tfnorm")
class DropConnect(KernelWrapper):
    """Drops entries of the kernel of a wrapped Dense or convolution layer.

    Where dropout zeroes activations, DropConnect zeroes weights: at every
    training call a fresh Bernoulli mask `M` is drawn over the kernel `W` of
    the wrapped layer, which then runs with

        W' = W * M / (1 - rate),   M ~ Bernoulli(1 - rate) elementwise

    and its bias untouched. The inverted scaling keeps `E[W'] = W`, so the
    expected pre-activation output equals the undropped layer's. At
    inference, and whenever the rate is 0, the wrapped layer runs with its
    own kernel, exactly.

    **One mask per call, shared by the batch.** The paper draws a mask per
    example, which multiplies the memory of the kernel by the batch size;
    like most implementations, tfnorm draws one per step.

    The mask comes from 16-bit random draws, two per Philox word, which
    halves the cost of the generator: the drop probability is `rate`
    rounded to a multiple of 1/65536, and the scaling uses that rounded
    value, so `E[W'] = W` still holds exactly.

    The wrapped layer runs with the dropped kernel through a
    `keras.StatelessScope`, so any layer whose weights live in a `kernel`
    variable works (Dense, EinsumDense, Conv1D/2D/3D, their Transpose
    forms, DepthwiseConv). Variable updates made by the wrapped layer's own
    `call` would be discarded; none of those layers makes any.

    The rate lives in a non-trainable variable, so
    `tfnorm.callbacks.DropRateSchedule` can change it during training.

    Args:
        layer: a `keras.layers.Layer` with a `kernel` variable. Its config is
            saved with the wrapper's.
        rate: float in [0, 1), the probability of dropping each weight.
        seed: int or None, the seed of the mask sequence.
        **kwargs: base layer keyword arguments, such as `name`.

    Call arguments:
        inputs: the wrapped layer's input.
        training: Python bool or boolean tensor, whether to drop weights.
            Defaults to `False`.

    Output shape: that of the wrapped layer.

    Reference:
    - [Wan et al., 2013](https://proceedings.mlr.press/v28/wan13.html)

    Example:

    >>> layer = DropConnect(keras.layers.Dense(64), rate=0.5, seed=0)
    >>> y = layer(np.ones((8, 32), "float32"), training=True)
    >>> y.shape
    TensorShape([8, 64])
    """

    def __init__(self, layer, rate=0.5, seed=None, **kwargs):
        # Without autocast (KernelWrapper) the kernel is read in its
        # float32 storage dtype, so that masking and scaling round once.
        super().__init__(layer, **kwargs)
        self._init_rate(rate, seed)
        self._check_kernel_if_built()

    def call(self, inputs, training=False):
        if tf.is_tensor(training):
            return call_with_tensor_training(self.call, inputs, training)
        # `training` is not passed on: a kernel layer does not use it, and
        # an explicit value would leak into later sibling layers (Keras 3.15).
        if not training:
            return self.layer(inputs)
        kernel = self._kernel()
        seed = self._next_seed()
        rate = self._rate_tensor()
        value = ops.convert_to_tensor(kernel.value)

        def dropped():
            keep, used_rate = self._keep_mask_16bit(
                ops.shape(value), rate, seed
            )
            factor = ops.cast(keep, "float32") / (1.0 - used_rate)
            return value * ops.cast(factor, value.dtype)

        value = ops.cond(rate > 0.0, dropped, lambda: value)
        with keras.StatelessScope(
            state_mapping=[(kernel, value)],
            collect_losses=True,
            initialize_variables=False,
        ) as scope:
            outer = scope.original_scope
            if outer is not None:
                # Already inside a stateless call: keep the values it maps
                # and override only the kernel.
                scope.state_mapping = {
                    **outer.state_mapping,
                    **scope.state_mapping,
                }
            outputs = self.layer(inputs)
        # Losses of the wrapped layer (its activity regularizer) were caught
        # by the scope; re-adding them here files them under this wrapper,
        # or under the enclosing stateless call.
        for loss in scope.losses:
            self.add_loss(loss)
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(self._rate_config())
        return config
