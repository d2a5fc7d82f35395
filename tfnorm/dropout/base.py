"""Shared machinery of the tfnorm dropout layers: a rate kept in a variable.

Keras freezes a dropout layer's `rate` into the compiled training step as a
Python float, so changing it during `fit` does nothing until the model is
recompiled. tfnorm layers keep the rate in a non-trainable float32 variable
instead: the compiled step reads it at every call, so
`tfnorm.callbacks.DropRateSchedule` can move it from batch to batch.

Persistence: the rate variable is a saved weight, so a `.keras` file restores
the rate a layer had when it was saved; `get_config()` also reports the
variable's current value, so `from_config(get_config())` builds a layer
starting from that rate too.

Randomness: masks come from `tf.random.stateless_uniform` with the Philox
algorithm, seeded by a `keras.random.SeedGenerator`. Philox is named
explicitly because the default algorithm ("auto_select") is compiled by XLA
into a generator tens of times slower on CPU (measured: 5 s instead of 0.06 s
for 8M numbers); Keras's own dropout pays that price under
`jit_compile=True`. The same seed gives the same sequence of masks
within one execution mode; XLA and TensorFlow kernels produce different
Philox streams, so masks differ between `jit_compile=True` and `False`. The
generator's position is not saved: a loaded layer restarts its sequence from
its seed, as Keras's own dropout layers do.
"""

import copy

import keras
import numpy as np
import tensorflow as tf
from keras import ops


def validate_rate(rate, name="rate"):
    """Raises a `ValueError` unless `rate` is a real number in [0, 1).

    Rate 1 is rejected here, at construction, so that no layer ever divides
    by `1 - rate = 0` at call time.
    """
    # The rate lives in a float32 variable: a rate like 0.99999999 rounds
    # to 1.0 there and would divide by zero, so the float32 value counts.
    if (
        isinstance(rate, bool)
        or not isinstance(rate, (int, float, np.floating, np.integer))
        or not 0.0 <= float(rate) < 1.0
        or not np.float32(rate) < 1.0
    ):
        raise ValueError(
            f"`{name}` must be a number in the range [0, 1). "
            f"Received: {name}={rate!r}"
        )
    return float(rate)


def float32_repr(value):
    """The shortest decimal that reads back as the same float32.

    `float(np.float32(0.3))` is 0.30000001192092896; configs read better with
    0.3, which converts back to the same float32.
    """
    return float(str(np.float32(value)))


def call_with_tensor_training(call, inputs, training):
    """`call(inputs, training=...)` for a boolean tensor `training`.

    Keras passes Python booleans; a tensor (as tf-keras code and BN accept)
    cannot steer a Python `if`, so both modes go into a cond, decided
    statically when the tensor is a constant.
    """
    return tf.__internal__.smart_cond.smart_cond(
        tf.cast(training, tf.bool),
        lambda: call(inputs, training=True),
        lambda: call(inputs, training=False),
    )


class RateVariableMixin:
    """Gives a layer a schedulable `rate` and a seeded random source.

    A subclass calls `_init_rate(rate, seed)` in `__init__` after
    `super().__init__()`. It then reads the rate in `call` with
    `_rate_tensor()` and draws uniforms with `_uniform(shape, seed)` where the
    seed comes from `_next_seed()`.

    `tfnorm.callbacks.DropRateSchedule` drives every layer that has this
    mixin, unless the class sets `_schedulable = False` (a learned rate).
    """

    _schedulable = True

    def _init_rate(self, rate, seed):
        rate = validate_rate(rate)
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
        ):
            raise ValueError(
                f"`seed` must be an int or None. Received: seed={seed!r}"
            )
        self.seed = None if seed is None else int(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        # float32 and no autocast: the rate is a statistic of the layer, kept
        # exact under mixed precision. Created here rather than in `build`
        # because it does not depend on the input shape, so the rate can be
        # read and set before the layer is first called.
        # `only_first_replica` lets a callback assign it under a
        # distribution strategy.
        self._rate = self.add_weight(
            name="rate",
            shape=(),
            dtype="float32",
            initializer=keras.initializers.Constant(rate),
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
        )

    @property
    def rate(self):
        """The current drop rate, a Python float in [0, 1)."""
        return float32_repr(ops.convert_to_numpy(self._rate.value))

    @rate.setter
    def rate(self, value):
        self._rate.assign(validate_rate(value))

    @property
    def rate_variable(self):
        """The non-trainable float32 variable that holds the rate."""
        return self._rate

    def _rate_tensor(self):
        return ops.convert_to_tensor(self._rate.value, "float32")

    def _next_seed(self):
        # Keras's generator state is int64; the stateless kernels want int32
        # seeds under XLA, so fold it into that range as Keras itself does.
        state = self.seed_generator.next()
        return tf.cast(tf.math.floormod(state, tf.int32.max - 1), tf.int32)

    @staticmethod
    def _uniform(shape, seed):
        """float32 uniforms in [0, 1) drawn with Philox (see module doc)."""
        return tf.random.stateless_uniform(
            shape,
            seed=seed,
            dtype=tf.float32,
            alg="philox",
        )

    @staticmethod
    def _keep_mask_16bit(shape, rate, seed):
        """A Bernoulli keep mask from 16-bit draws, and its exact drop rate.

        Each 32-bit Philox word yields two 16-bit draws, which halves the
        generator's work: it dominates the cost of DropConnect. The drop
        probability becomes `round(rate * 65536) / 65536`, which is returned
        so that the caller scales by the probability actually used and keeps
        the expectation exact.
        """
        size = ops.prod(shape)
        words = tf.random.stateless_uniform(
            [(size + 1) // 2],
            seed=seed,
            minval=None,
            maxval=None,
            dtype=tf.uint32,
            alg="philox",
        )
        draws = tf.concat(
            [
                tf.bitwise.bitwise_and(words, tf.constant(0xFFFF, tf.uint32)),
                tf.bitwise.right_shift(words, tf.constant(16, tf.uint32)),
            ],
            axis=0,
        )[:size]
        # At most 65535 of 65536 values dropped: rate < 1 stays below 1.
        threshold = ops.minimum(ops.round(rate * 65536.0), 65535.0)
        keep = ops.reshape(draws, shape) >= ops.cast(threshold, "uint32")
        return keep, threshold / 65536.0

    def _rate_config(self):
        return {"rate": self.rate, "seed": self.seed}


class DropoutLayer(RateVariableMixin, keras.layers.Layer):
    """Base of the tfnorm dropout layers that act on their input tensor.

    Subclasses implement `_drop(inputs, rate, seed)`, the training-mode
    transform for a positive rate. This class makes inference and
    `rate == 0` the exact identity: the inputs are returned unchanged, and a
    zero rate in the variable skips the random draw entirely (a `cond`, so
    the same compiled step serves every rate).
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        self._init_rate(rate, seed)
        self.supports_masking = True

    def call(self, inputs, training=False):
        if tf.is_tensor(training):
            return call_with_tensor_training(self.call, inputs, training)
        if not training:
            return inputs
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if "float" not in dtype:
            # Scaling by 1 / (1 - rate) or (1 + u) would be truncated.
            raise TypeError(
                f"{type(self).__name__} needs floating point inputs in "
                "training; cast them first (e.g. with a Rescaling layer). "
                f"Received: inputs.dtype={dtype}"
            )
        # Drawn outside the cond so that the mask sequence of a seed does not
        # depend on how many steps ran at rate 0.
        seed = self._next_seed()
        rate = self._rate_tensor()
        return ops.cond(
            rate > 0.0,
            lambda: self._drop(inputs, rate, seed),
            lambda: inputs,
        )

    def _drop(self, inputs, rate, seed):
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(self._rate_config())
        return config


def kernel_of(layer, wrapper_name):
    """The `kernel` variable of `layer`, or a `ValueError` naming the fix."""
    kernel = getattr(layer, "kernel", None)
    if not isinstance(kernel, keras.Variable):
        raise ValueError(
            f"{wrapper_name} wraps a layer with a `kernel` weight, such as "
            "Dense, EinsumDense, Conv2D or Conv2DTranspose (LoRA-enabled "
            "layers are not supported). "
            f"Received: layer={type(layer).__name__}(name={layer.name!r})"
        )
    return kernel


class KernelWrapper(RateVariableMixin, keras.layers.Wrapper):
    """A dropout wrapper around a layer with a `kernel` (Dense, Conv...).

    It runs without autocast: the subclass computes its rate and masks in
    float32 and the wrapped layer casts to its own compute dtype. Its
    output shape is the wrapped layer's.
    """

    def __init__(self, layer, **kwargs):
        kwargs["autocast"] = False
        super().__init__(layer, **kwargs)

    def _kernel(self):
        return kernel_of(self.layer, type(self).__name__)

    def _check_kernel_if_built(self):
        if self.layer.built:
            self._kernel()

    def build(self, input_shape=None):
        super().build(input_shape)
        self._kernel()
        self.built = True

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Keras's Wrapper.from_config pops "layer" from the dict it is given;
        # a copy leaves the caller's config intact.
        return super().from_config(copy.deepcopy(config), custom_objects)

    def get_config(self):
        config = super().get_config()
        config.pop("autocast", None)
        return config
