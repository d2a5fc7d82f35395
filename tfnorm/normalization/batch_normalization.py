"""Batch Normalization for Keras 3 with ghost batches, renorm and masks."""

import math
import numbers
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import constraints
from keras import initializers
from keras import regularizers

from tfnorm.normalization import _moments

# TF's fused kernel silently raises any epsilon below this value.
_FUSED_MIN_EPSILON = 1.001e-5

_CLIPPING_KEYS = ("rmax", "rmin", "dmax")

# Keys that tf-keras 2 writes into a BatchNormalization config and Keras 3
# rejects. The supported ones are honored; these are dropped with a warning.
_LEGACY_DROPPED_KEYS = ("fused", "adjustment")


def _is_real(value):
    """A real number, NumPy scalars included (Keras accepts them), no bool."""
    return isinstance(value, numbers.Real) and not isinstance(
        value, (bool, np.bool_)
    )


def _is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(
        value, (bool, np.bool_)
    )


def _check_fraction(name, value):
    if not _is_real(value):
        raise TypeError(
            f"Argument `{name}` must be a float in [0, 1). "
            f"Received: {name}={value!r}"
        )
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"Argument `{name}` must be in [0, 1): it is the weight kept on "
            f"the old moving statistics (Keras convention; PyTorch's "
            f"momentum m is 1 - m here). Received: {name}={value}"
        )
    return float(value)


def _check_clipping(renorm, renorm_clipping):
    """Validates `renorm_clipping` and returns it as a dict of floats."""
    if renorm_clipping is None or (renorm_clipping == {} and not renorm):
        return {}
    if not renorm:
        raise ValueError(
            "Argument `renorm_clipping` is only used with `renorm=True`; "
            "set `renorm=True` or drop `renorm_clipping`. "
            f"Received: renorm=False, renorm_clipping={renorm_clipping!r}"
        )
    if not isinstance(renorm_clipping, dict):
        raise TypeError(
            "Argument `renorm_clipping` must be a dict with keys among "
            f"{list(_CLIPPING_KEYS)}. Received: "
            f"renorm_clipping={renorm_clipping!r}"
        )
    unknown = sorted(set(renorm_clipping) - set(_CLIPPING_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in `renorm_clipping`; expected keys "
            f"among {list(_CLIPPING_KEYS)}. Received: "
            f"renorm_clipping={renorm_clipping!r}"
        )
    clipping = {}
    for key, value in renorm_clipping.items():
        if value is None:
            continue
        if not _is_real(value):
            raise TypeError(
                f"`renorm_clipping['{key}']` must be a number or None. "
                f"Received: renorm_clipping={renorm_clipping!r}"
            )
        if math.isnan(value):
            raise ValueError(
                f"`renorm_clipping['{key}']` must not be NaN; use None for "
                f"no bound. Received: renorm_clipping={renorm_clipping!r}"
            )
        if key != "rmin" and value == math.inf:
            # An infinite upper bound is no bound; keep configs finite.
            # Minus infinity is no such thing and is checked below.
            continue
        clipping[key] = float(value)
    rmin, rmax = clipping.get("rmin"), clipping.get("rmax")
    # The bounds live in float32 variables: a positive rmax below float32's
    # range becomes 0 there, and an rmin past it becomes inf.
    with np.errstate(over="ignore"):
        rmax32 = None if rmax is None else np.float32(rmax)
        rmin32 = None if rmin is None else np.float32(rmin)
    if rmax32 is not None and not rmax32 > 0:
        raise ValueError(
            "`renorm_clipping` needs a positive rmax (in float32, where "
            "the bounds are kept): r = s_B / s_r is positive, and clipping "
            "it to zero or below would discard the input. "
            f"Received: rmax={rmax}"
        )
    if rmin32 is not None and rmin32 == np.inf:
        raise ValueError(
            "`renorm_clipping` needs a finite rmin (in float32, where the "
            "bounds are kept): an infinite lower bound makes every output "
            f"infinite. Received: rmin={rmin}"
        )
    if rmin is not None and rmax is not None and rmin > rmax:
        raise ValueError(
            "`renorm_clipping` needs rmin <= rmax. "
            f"Received: rmin={rmin}, rmax={rmax}"
        )
    if clipping.get("dmax", 0.0) < 0:
        raise ValueError(
            "`renorm_clipping` needs a non-negative dmax. "
            f"Received: dmax={clipping['dmax']}"
        )
    return clipping


def _in_xla_context():
    """Whether the current graph is being compiled with XLA.

    TensorFlow has no public API for this; the internal helper marks
    `tf.function(jit_compile=True)` graphs. Without it, assume no XLA.
    """
    try:
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - internal layout changed
        return False
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def _replica_context():
    """The replica context when running on more than one replica, else None."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


@keras.saving.register_keras_serializable(package="tfnorm")
class BatchNormalization(keras.layers.Layer):
    """Batch Normalization: a drop-in superset of Keras's layer.

    With no new option set this layer computes what
    `keras.layers.BatchNormalization` computes, with the same constructor
    arguments, defaults and weights (names, shapes and order, including the
    renorm weights), so `set_weights` moves weights between the two.

    **Training** (`training=True` and `trainable=True`): each channel is
    normalized with the mean and biased variance of the batch,
    `gamma * (x - mean) / sqrt(var + epsilon) + beta`, and the moving
    statistics are updated as
    `moving = momentum * moving + (1 - momentum) * batch_statistic`.
    This is the Keras (and Flax) momentum convention: PyTorch's
    `momentum=0.1` is `momentum=0.9` here. The variance fed to the moving
    average is the biased one, as in Keras 3.

    **Inference** (`training=False`, the default, or `trainable=False`):
    `gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta`.
    As in Keras, **`trainable=False` means inference mode**: the layer uses
    its moving statistics and never updates them, even inside `fit()`.

    **Ghost batches** (`virtual_batch_size=v`, Hoffer et al. 2017): in
    training the batch is cut into *contiguous* groups of `v` examples
    (0..v-1, v..2v-1, ...), each normalized with its own statistics; gamma
    and beta are shared. A batch that does not divide evenly keeps a last,
    smaller group with its own statistics (a group of one example yields
    `beta`). The moving statistics are updated once per step from the
    pooled mean and variance of the whole batch, exactly as without ghost
    batches: they estimate the population statistics that inference uses,
    not the smaller within-group variance (tf-keras averages the groups'
    variances instead, which underestimates it by the between-group part).
    Inference uses the moving statistics and works for any batch size.

    **Batch renormalization** (`renorm=True`, Ioffe 2017): with batch (or
    group) statistics `mu_B`, `s_B = sqrt(var_B + epsilon)` and the renorm
    statistics `mu_r`, `s_r`, the layer outputs
    `gamma * (r * (x - mu_B) / s_B + d) + beta` with
    `r = clip(s_B / s_r, rmin, rmax)` and
    `d = clip((mu_B - mu_r) / s_r, -dmax, dmax)` treated as constants in
    backprop. `renorm_mean` and `renorm_stddev` follow `renorm_momentum`;
    the inference statistics follow `momentum`, tracked as a standard
    deviation with `moving_variance = max(moving_stddev**2 - epsilon, 0)`,
    as in Keras. The clipping bounds live in variables, so
    `tfnorm.callbacks.RenormClippingSchedule` can ramp them during `fit`
    without recompiling; the current bounds are what `get_config` reports
    and what a saved model reloads.

    **Masks**: masked-out elements do not enter the statistics, even when
    they hold NaN or inf (they are still normalized, non-finite ones as
    zeros, so that they cannot poison the gradients). Any non-zero mask
    entry selects its element; values are not weights. Works for any
    `axis`: the mask has the input's shape without the channel axis. A
    batch whose elements are all masked, and an empty batch, are normalized
    with the moving statistics and leave them exactly as they were.

    **Distribution**: with `synchronized=True` the statistics are computed
    over the global batch by all-reducing count, sum and the centered sum of
    squares, so uneven replica batches weigh correctly and the result equals
    one device on the global batch. Ghost groups stay within a replica. With
    `synchronized=False` each replica normalizes with its own batch, and the
    moving statistics every replica holds are updated with the mean over
    replicas of their batch statistics (Keras 3 keeps replica 0's only).

    **Numerics**: statistics are computed in float32 (or wider) for
    float16/bfloat16 inputs, with a two-pass variance that stays accurate
    for large means; outputs are cast back to the compute dtype. Inference
    subtracts the moving mean before scaling, so a constant input matching
    the moving statistics gives exactly `beta`, also under XLA (Keras 3
    gives about -7.5e9 for 1e15). Training folds the mean into the offset
    as Keras does (cheaper under XLA), so there, as in Keras, a constant
    input of magnitude M is off by about `M / sqrt(epsilon) * 6e-8`.

    Args:
        axis: Integer, the channel axis to normalize per channel, e.g.
            `axis=1` after a `channels_first` convolution.
        momentum: Weight on the old value in the moving averages, in
            [0, 1). Keras convention, see above.
        epsilon: Small positive float added to the variance.
        center: If `True`, add the offset `beta`.
        scale: If `True`, multiply by `gamma`.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for the moving mean.
        moving_variance_initializer: Initializer for the moving variance.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        renorm: Whether to use batch renormalization.
        renorm_clipping: Only with `renorm=True`: a dict with optional keys
            `"rmax"`, `"rmin"`, `"dmax"`. Missing keys do not clip (`rmin`
            then has no effect since `r > 0`). The paper uses
            `rmin = 1 / rmax`.
        renorm_momentum: Momentum of the renorm statistics, in [0, 1).
        synchronized: If `True`, compute the statistics over all replicas of
            a `tf.distribute` strategy.
        virtual_batch_size: `None` or a positive int: the ghost batch size.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Input tensor of any rank.
        training: Python bool or boolean tensor; `True` normalizes with
            batch statistics and updates the moving statistics.
        mask: Optional tensor with the input's shape less the channel axis;
            true (non-zero) elements enter the statistics.

    Input shape: arbitrary; output shape: the same.

    Reference:
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167)
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275)
        - [Hoffer et al., 2017](https://arxiv.org/abs/1705.08741)

    Example:

    >>> import keras, numpy as np, tfnorm
    >>> layer = tfnorm.BatchNormalization(virtual_batch_size=4)
    >>> y = layer(np.random.rand(10, 3).astype("float32"), training=True)
    >>> tuple(y.shape)
    (10, 3)
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        virtual_batch_size=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not _is_integer(axis):
            raise TypeError(
                "Argument `axis` must be an integer (one channel axis). "
                f"Received: axis={axis!r}"
            )
        self.axis = int(axis)
        self.momentum = _check_fraction("momentum", momentum)
        self.renorm_momentum = _check_fraction(
            "renorm_momentum", renorm_momentum
        )
        if (
            not _is_real(epsilon)
            or not epsilon > 0
            or not math.isfinite(epsilon)
        ):
            raise ValueError(
                "Argument `epsilon` must be a positive float. "
                f"Received: epsilon={epsilon!r}"
            )
        self.epsilon = float(epsilon)
        if virtual_batch_size is not None and (
            not _is_integer(virtual_batch_size) or virtual_batch_size < 1
        ):
            raise ValueError(
                "Argument `virtual_batch_size` must be None or a positive "
                "integer number of examples per ghost batch. "
                f"Received: virtual_batch_size={virtual_batch_size!r}"
            )
        self.virtual_batch_size = (
            None if virtual_batch_size is None else int(virtual_batch_size)
        )
        self.center = center
        self.scale = scale
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(
            moving_variance_initializer
        )
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.renorm = bool(renorm)
        self._initial_clipping = _check_clipping(self.renorm, renorm_clipping)
        self._clipping_given = renorm_clipping is not None
        self.synchronized = bool(synchronized)
        self.supports_masking = True

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        # The clipping bounds are plain tf.Variables kept out of Keras's
        # weight tracking: adding them as weights would break `set_weights`
        # between this layer and Keras's. They are saved through the config.
        object.__setattr__(self, "_clip_vars", None)

    # -- building ---------------------------------------------------------

    def _normalized_axis(self, rank):
        if not -rank <= self.axis < rank:
            raise ValueError(
                f"Argument `axis` is out of range for an input of rank "
                f"{rank}: expected an integer in [{-rank}, {rank - 1}]. "
                f"Received: axis={self.axis}"
            )
        return self.axis % rank

    def build(self, input_shape):
        rank = len(input_shape)
        axis = self._normalized_axis(rank)
        if self.virtual_batch_size is not None and axis == 0:
            raise ValueError(
                "Ghost batches split the batch axis, so the channel axis "
                f"cannot be 0. Received: axis={self.axis} (axis 0 of an "
                f"input of rank {rank}) with "
                f"virtual_batch_size={self.virtual_batch_size}"
            )
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                "The channel axis of the input must have a known size. "
                f"Received: input_shape={tuple(input_shape)}, "
                f"axis={self.axis}"
            )
        shape = (channels,)
        # Weight creation mirrors Keras's order and names exactly.
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        # Under MirroredStrategy "mean" aggregation makes every replica
        # hold the mean over replicas of their updates (see docstring).
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
            aggregation="mean",
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
            aggregation="mean",
        )
        if self.renorm:
            self._build_renorm(shape)
        self.input_spec = keras.layers.InputSpec(
            ndim=rank, axes={self.axis: channels}
        )
        self._axis = axis
        self._inner_axes = [i for i in range(1, rank) if i != axis]
        self._reduction_axes = [i for i in range(rank) if i != axis]

    def _build_renorm(self, shape):
        variance_init = self.moving_variance_initializer

        def stddev_initializer(shape, dtype=None):
            # A fresh initializer object so random initializers draw anew.
            init = initializers.get(initializers.serialize(variance_init))
            return keras.ops.sqrt(init(shape, dtype=dtype))

        def renorm_mean_initializer(shape, dtype=None):
            init = initializers.get(
                initializers.serialize(self.moving_mean_initializer)
            )
            return init(shape, dtype=dtype)

        for name, init in (
            ("moving_stddev", stddev_initializer),
            ("renorm_mean", renorm_mean_initializer),
            ("renorm_stddev", stddev_initializer),
        ):
            setattr(
                self,
                name,
                self.add_weight(
                    shape=shape,
                    name=name,
                    initializer=init,
                    trainable=False,
                    autocast=False,
                    aggregation="mean",
                ),
            )
        # Unset bounds are stored as the values that do not clip.
        clipping = self._initial_clipping
        with tf.init_scope():
            object.__setattr__(
                self,
                "_clip_vars",
                {
                    "rmax": tf.Variable(
                        clipping.get("rmax", math.inf),
                        trainable=False,
                        dtype=tf.float32,
                        name="rmax",
                    ),
                    "rmin": tf.Variable(
                        clipping.get("rmin", 0.0),
                        trainable=False,
                        dtype=tf.float32,
                        name="rmin",
                    ),
                    "dmax": tf.Variable(
                        clipping.get("dmax", math.inf),
                        trainable=False,
                        dtype=tf.float32,
                        name="dmax",
                    ),
                },
            )

    # -- renorm clipping --------------------------------------------------

    @property
    def renorm_clipping(self):
        """The current clipping bounds as a dict (None without renorm).

        The Python dict is the exact record of what was set; the variables
        mirror it (in float32) for the compiled training step.
        """
        if not self.renorm:
            return None
        return dict(self._initial_clipping)

    def set_renorm_clipping(self, rmax=None, rmin=None, dmax=None):
        """Sets the renorm clipping bounds; `None` means no clipping.

        Takes effect at the next training step, also inside a compiled
        `fit` loop, since the bounds are variables.
        """
        if not self.renorm:
            raise ValueError(
                "set_renorm_clipping() needs a layer built with "
                f"`renorm=True`. Received: layer {self.name!r} with "
                "renorm=False"
            )
        clipping = _check_clipping(
            True, {"rmax": rmax, "rmin": rmin, "dmax": dmax}
        )
        self._initial_clipping = clipping
        self._clipping_given = True
        if self._clip_vars is not None:
            self._clip_vars["rmax"].assign(clipping.get("rmax", math.inf))
            self._clip_vars["rmin"].assign(clipping.get("rmin", 0.0))
            self._clip_vars["dmax"].assign(clipping.get("dmax", math.inf))

    # -- call -------------------------------------------------------------

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            self._check_mask(inputs, mask)
            inputs = self._finite_where_masked_out(inputs, mask)
        if training is None or not self.trainable:
            training = False
        if isinstance(training, bool):
            if training:
                return self._train(inputs, mask)
            return self._infer(inputs)
        # A boolean tensor: keep ghost batching and renorm in the training
        # branch (tf-keras silently dropped ghost batching here).
        training = tf.cast(training, tf.bool)
        return tf.__internal__.smart_cond.smart_cond(
            training,
            lambda: self._train(inputs, mask),
            lambda: self._infer(inputs),
        )

    def _finite_where_masked_out(self, inputs, mask):
        """`inputs` with non-finite masked-out elements set to zero.

        The statistics skip masked-out elements, but each output element
        is still normalized, and the backward pass multiplies the zero
        gradient at a masked-out NaN or inf by that value (the gradients of
        gamma and of the statistics): NaN padding would poison the
        gradients of every valid element. Finite masked-out elements are
        left alone, so outputs match Keras's wherever Keras's are finite.
        """
        x = tf.convert_to_tensor(inputs)
        if not x.dtype.is_floating:
            return inputs
        selected = tf.expand_dims(tf.cast(mask, tf.bool), self._axis)
        keep = tf.logical_or(selected, tf.math.is_finite(x))
        return tf.where(keep, x, tf.zeros_like(x))

    def _check_mask(self, inputs, mask):
        rank = len(inputs.shape)
        expected = [d for i, d in enumerate(inputs.shape) if i != self._axis]
        got = list(mask.shape)
        fits = len(got) == rank - 1 and all(
            a is None or b is None or a == b
            for a, b in zip(expected, got, strict=False)
        )
        if not fits:
            raise ValueError(
                "The mask must have the input's shape without the channel "
                f"axis {self.axis}: expected {tuple(expected)}. Received: "
                f"mask.shape={tuple(got)}, inputs.shape="
                f"{tuple(inputs.shape)}"
            )

    def _compute_dtype_for(self, inputs):
        # Statistics in at least float32: float16 squares overflow past 256.
        # Integer inputs (images as uint8, say) are normalized in float32,
        # as Keras does.
        if inputs.dtype in (tf.float16, tf.bfloat16) or not (
            inputs.dtype.is_floating
        ):
            return tf.float32
        return inputs.dtype

    def _broadcast(self, vector, rank):
        shape = [1] * rank
        shape[self._axis] = -1
        return tf.reshape(vector, shape)

    def _scale_offset(self, dtype):
        gamma = tf.cast(self.gamma, dtype) if self.scale else None
        beta = tf.cast(self.beta, dtype) if self.center else None
        return gamma, beta

    def _normalize(
        self, x, mean, variance, gamma, beta, r=None, d=None, fold=False
    ):
        """Normalizes with the scale folded into one per-channel factor.

        Inference (`fold=False`) computes `(x - mean) * a + b`: subtracting
        first keeps a constant input that matches its moving statistics at
        exactly zero, where `x * a + (b - mean * a)` cancels
        catastrophically (Keras 3 gives about -7.5e9 for inputs of 1e15
        under XLA). Training (`fold=True`) uses the folded form as Keras
        does: its backward pass is markedly cheaper under XLA, and with
        batch statistics the cancellation costs only about
        `|mean| / std * 6e-8` in normalized units.
        """
        factor = tf.math.rsqrt(variance + self.epsilon)
        if r is not None:
            factor = factor * r
        if gamma is not None:
            factor = factor * gamma
        offset = beta
        if d is not None:
            shift = d * gamma if gamma is not None else d
            offset = shift if beta is None else shift + beta
        if fold:
            shift = -mean * factor
            return x * factor + (shift if offset is None else shift + offset)
        y = (x - mean) * factor
        if offset is not None:
            y = y + offset
        return y

    def _infer(self, inputs):
        dtype = self._compute_dtype_for(inputs)
        x = tf.cast(inputs, dtype)
        rank = len(x.shape)
        gamma, beta = self._scale_offset(dtype)
        bc = self._broadcast
        y = self._normalize(
            x,
            bc(tf.cast(self.moving_mean, dtype), rank),
            bc(tf.cast(self.moving_variance, dtype), rank),
            None if gamma is None else bc(gamma, rank),
            None if beta is None else bc(beta, rank),
        )
        return tf.cast(y, self.compute_dtype)

    def _use_fused(self, x, mask):
        """Whether TF's fused kernel can compute this training step.

        It normalizes 4D channels-last float32 inputs with their own batch
        statistics, which covers plain BN, renorm (with r and d folded into
        its scale and offset) and ghost groups (one call per group). It
        has no masks or cross-replica statistics, raises epsilons below
        1.001e-5, and under XLA the generic ops fuse better than its
        lowering, so those cases take the generic path.
        """
        return (
            len(x.shape) == 4
            and self._axis == 3
            and mask is None
            and self.epsilon >= _FUSED_MIN_EPSILON
            and x.dtype == tf.float32
            and _replica_context() is None
            and not _in_xla_context()
            and (self.virtual_batch_size is None or x.shape[0] is not None)
        )

    def _train(self, inputs, mask):
        dtype = self._compute_dtype_for(inputs)
        x = tf.cast(inputs, dtype)
        if self._use_fused(x, mask):
            return self._train_fused(x)
        rank = len(x.shape)
        bc = self._broadcast
        weights = None
        if mask is not None:
            # Any non-zero entry selects its element, as a boolean mask
            # does: a mask of 2s or 0.5s is not a set of weights.
            weights = tf.cast(tf.cast(mask, tf.bool), dtype)
            weights = tf.expand_dims(weights, self._axis)
        ctx = _replica_context()
        sync = ctx if self.synchronized else None
        moving_mean = tf.cast(self.moving_mean, dtype)
        moving_variance = tf.cast(self.moving_variance, dtype)

        if self.virtual_batch_size is None:
            stats = _moments.local_moments(
                x, weights, self._reduction_axes, self._axis
            )
            if sync is not None:
                stats = _moments.all_reduce_moments(sync, stats)
            # Mean and variance per channel, falling back to the moving
            # statistics when nothing is left after masking.
            has_data = stats.count > 0
            mean = tf.where(has_data, stats.mean, moving_mean)
            variance = tf.where(
                has_data, _moments.variance(stats), moving_variance
            )
            mean_b, variance_b = bc(mean, rank), bc(variance, rank)
            expand = bc
        else:
            groups, stats = _moments.ghost_moments(
                x,
                weights,
                self._inner_axes,
                self._axis,
                self.virtual_batch_size,
            )
            if sync is not None:
                stats = _moments.all_reduce_moments(sync, stats)
            # (batch, channels): the statistics of each example's group.
            has_data = groups.count > 0
            mean = tf.where(has_data, groups.mean, moving_mean)
            variance = tf.where(
                has_data, _moments.variance(groups), moving_variance
            )

            def expand(values, rank):
                return _moments.expand_to_rank(values, rank, self._axis)

            mean_b, variance_b = expand(mean, rank), expand(variance, rank)

        gamma, beta = self._scale_offset(dtype)
        r = d = None
        if self.renorm:
            r, d = self._renorm_correction(mean, variance, has_data)
            r, d = expand(r, rank), expand(d, rank)
        y = self._normalize(
            x,
            mean_b,
            variance_b,
            None if gamma is None else bc(gamma, rank),
            None if beta is None else bc(beta, rank),
            r,
            d,
            fold=True,
        )

        has_data = stats.count > 0
        update_mean, update_variance = stats.mean, _moments.variance(stats)
        if ctx is not None and not self.synchronized:
            # Mean over replicas of their own batch statistics (replicas
            # without data do not count), so all replicas hold one value.
            present = tf.cast(has_data, dtype)
            summed = ctx.all_reduce(
                tf.distribute.ReduceOp.SUM,
                tf.stop_gradient(
                    tf.stack(
                        [
                            present,
                            update_mean * present,
                            update_variance * present,
                        ]
                    )
                ),
            )
            # Nothing downstream needs this collective, so without the
            # dependency replicas could order it differently against the
            # next layer's collectives and mismatch.
            with tf.control_dependencies([summed]):
                y = tf.identity(y)
            has_data = summed[0] > 0
            update_mean = tf.math.divide_no_nan(summed[1], summed[0])
            update_variance = tf.math.divide_no_nan(summed[2], summed[0])
        self._update_statistics(update_mean, update_variance, has_data)
        return tf.cast(y, self.compute_dtype)

    def _train_fused(self, x):
        batch = x.shape[0]
        if self.virtual_batch_size is None or batch is None:
            pieces = [x]
        else:
            # Contiguous groups; slices along the batch axis are cheap.
            v = self.virtual_batch_size
            sizes = [v] * (batch // v) + ([batch % v] if batch % v else [])
            pieces = tf.split(x, sizes) if len(sizes) > 1 else [x]
        outputs, stats = [], []
        for piece in pieces:
            y, moments = self._fused_piece(piece)
            outputs.append(y)
            stats.append(moments)
        y = outputs[0] if len(outputs) == 1 else tf.concat(outputs, 0)
        stats = _moments.combine(stats)
        self._update_statistics(
            stats.mean, _moments.variance(stats), stats.count > 0
        )
        return tf.cast(y, self.compute_dtype)

    def _fused_piece(self, x):
        """One fused call on a (group of the) batch: output and moments."""
        channels = x.shape[-1]
        gamma, beta = self._scale_offset(x.dtype)
        if gamma is None:
            gamma = tf.ones([channels], x.dtype)
        if beta is None:
            beta = tf.zeros([channels], x.dtype)
        if self.renorm:
            # r and d need the batch moments before the kernel runs; they
            # are constants for backprop, so folding them into the scale
            # and offset gives the kernel's exact BN gradient for x.
            # A first kernel call only for the batch moments: measured
            # faster than tf.nn.moments, and two-pass like it.
            _, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=tf.stop_gradient(x),
                scale=tf.ones([channels], x.dtype),
                offset=tf.zeros([channels], x.dtype),
                mean=tf.zeros([0], x.dtype),
                variance=tf.zeros([0], x.dtype),
                epsilon=self.epsilon,
                is_training=True,
            )
            n = tf.cast(tf.size(x) // channels, x.dtype)
            # Bessel-corrected m2 / (n - 1) back to m2 / n; one element
            # has variance 0 (the kernel's 0 / 0 is not).
            variance = tf.where(
                n > 1, variance * (n - 1.0) / n, tf.zeros_like(variance)
            )
            has_data = n > 0
            mean = tf.where(has_data, mean, tf.cast(self.moving_mean, x.dtype))
            variance = tf.where(
                has_data, variance, tf.cast(self.moving_variance, x.dtype)
            )
            r, d = self._renorm_correction(mean, variance, has_data)
            gamma, beta = gamma * r, gamma * d + beta
        y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=gamma,
            offset=beta,
            mean=tf.zeros([0], x.dtype),
            variance=tf.zeros([0], x.dtype),
            epsilon=self.epsilon,
            is_training=True,
        )
        # The kernel returns the Bessel-corrected variance: m2 / (n - 1).
        n = tf.cast(tf.size(x) // channels, x.dtype)
        m2 = tf.where(n > 1, variance * (n - 1.0), tf.zeros_like(variance))
        count = tf.fill([channels], n)
        return y, _moments.Moments(count, tf.where(n > 0, mean, 0.0), m2)

    def _renorm_correction(self, mean, variance, has_data):
        """Renorm's r and d (stop-gradient) from the pre-update statistics.

        Maps to the paper: r = s_B / s_r, d = (mu_B - mu_r) / s_r, clipped
        to [rmin, rmax] and [-dmax, dmax]; groups without data get the
        identity correction.
        """
        dtype = mean.dtype
        floor = tf.sqrt(tf.cast(self.epsilon, dtype))
        renorm_mean = tf.cast(self.renorm_mean, dtype)
        renorm_stddev = tf.maximum(tf.cast(self.renorm_stddev, dtype), floor)
        stddev = tf.sqrt(variance + self.epsilon)
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        clip = {k: tf.cast(v, dtype) for k, v in self._clip_vars.items()}
        r = tf.clip_by_value(r, clip["rmin"], clip["rmax"])
        d = tf.clip_by_value(d, -clip["dmax"], clip["dmax"])
        r = tf.where(has_data, r, tf.ones_like(r))
        d = tf.where(has_data, d, tf.zeros_like(d))
        return tf.stop_gradient(r), tf.stop_gradient(d)

    def _update_statistics(self, mean, variance, has_data):
        """Moving-average updates; a step without data changes nothing."""
        mean = tf.stop_gradient(mean)
        variance = tf.stop_gradient(variance)

        # Stored in the variable's own dtype: float32 under mixed precision,
        # float64 under a float64 policy (a float32 cast would round there).
        def ema(variable, value, momentum):
            old = tf.cast(variable, value.dtype)
            new = old * momentum + value * (1.0 - momentum)
            variable.assign(
                tf.cast(tf.where(has_data, new, old), variable.dtype)
            )
            return new

        ema(self.moving_mean, mean, self.momentum)
        if not self.renorm:
            ema(self.moving_variance, variance, self.momentum)
            return
        stddev = tf.sqrt(variance + self.epsilon)
        ema(self.renorm_mean, mean, self.renorm_momentum)
        ema(self.renorm_stddev, stddev, self.renorm_momentum)
        new_stddev = ema(self.moving_stddev, stddev, self.momentum)
        # Rounding can push stddev**2 - epsilon below zero.
        derived = tf.nn.relu(new_stddev * new_stddev - self.epsilon)
        old_variance = tf.cast(self.moving_variance, derived.dtype)
        self.moving_variance.assign(
            tf.cast(
                tf.where(has_data, derived, old_variance),
                self.moving_variance.dtype,
            )
        )

    # -- config -----------------------------------------------------------

    def compute_output_shape(self, input_shape):
        self._normalized_axis(len(input_shape))
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(
                self.moving_mean_initializer
            ),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": (
                self.renorm_clipping if self._clipping_given else None
            ),
            "renorm_momentum": self.renorm_momentum,
            "virtual_batch_size": self.virtual_batch_size,
        }
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config):
        """Also loads configs written by tf-keras 2's BatchNormalization.

        tf-keras writes `fused` and `adjustment` (dropped with a warning
        naming them), writes `axis` as a list once built, and writes
        `virtual_batch_size` and the renorm keys, which are honored.

        A built tf-keras layer with `virtual_batch_size` has shifted its
        (non-negative) axes by one for the ghost dimension it inserts, and
        saves them shifted; such a list axis is shifted back here. An
        unbuilt tf-keras config whose user wrote a non-negative list axis
        together with `virtual_batch_size` looks the same and would be
        shifted too: pass `axis` as an int to avoid the ambiguity.
        """
        config = dict(config)
        dropped = [k for k in _LEGACY_DROPPED_KEYS if k in config]
        for key in dropped:
            config.pop(key)
        if dropped:
            warnings.warn(
                "tfnorm.BatchNormalization ignores the tf-keras 2 config "
                f"key(s) {dropped}: `fused` is chosen automatically and "
                "`adjustment` is not supported.",
                stacklevel=2,
            )
        axis = config.get("axis")
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                raise ValueError(
                    "tfnorm.BatchNormalization normalizes over one channel "
                    "axis; a config with several axes cannot be loaded. "
                    f"Received: axis={axis}"
                )
            axis = int(axis[0])
            if config.get("virtual_batch_size") and axis > 0:
                axis -= 1
            config["axis"] = axis
        dtype = config.get("dtype")
        if isinstance(dtype, dict) and dtype.get("class_name") == "Policy":
            # tf-keras serializes a mixed policy as a Policy object.
            config["dtype"] = dtype["config"]["name"]
        if not config.get("renorm", False) and not config.get(
            "renorm_clipping"
        ):
            # tf-keras writes renorm_clipping=None or {} with renorm=False.
            config["renorm_clipping"] = None
        return super().from_config(config)


@keras.saving.register_keras_serializable(package="tfnorm")
class GhostBatchNormalization(BatchNormalization):
    """Ghost Batch Normalization with Hoffer et al.'s default of 128.

    `BatchNormalization(virtual_batch_size=128)` under its own name; see
    `tfnorm.BatchNormalization` for the training and inference behaviour.
    Hoffer et al. pair ghost batches of 128 inside large batches with a
    learning rate scaled by sqrt(batch / 128) and longer training.

    Reference:
        - [Hoffer et al., 2017](https://arxiv.org/abs/1705.08741)

    Example:

    >>> import numpy as np, tfnorm
    >>> layer = tfnorm.GhostBatchNormalization(virtual_batch_size=2)
    >>> y = layer(np.random.rand(6, 4).astype("float32"), training=True)
    """

    def __init__(self, virtual_batch_size=128, **kwargs):
        super().__init__(virtual_batch_size=virtual_batch_size, **kwargs)


@keras.saving.register_keras_serializable(package="tfnorm")
class BatchRenormalization(BatchNormalization):
    """Batch Renormalization with the paper's final clipping as default.

    `BatchNormalization(renorm=True)` with `renorm_clipping` defaulting to
    `{"rmax": 3, "rmin": 1/3, "dmax": 5}`, the bounds Ioffe (2017) reaches
    at the end of the warm-up. Start training with
    `tfnorm.callbacks.RenormClippingSchedule` to ramp them from
    `rmax = 1, dmax = 0` as the paper does: unclipped or fully open
    renorm at tiny batches from step 0 can collapse.

    Reference:
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275)

    Example:

    >>> import numpy as np, tfnorm
    >>> layer = tfnorm.BatchRenormalization()
    >>> y = layer(np.random.rand(4, 3).astype("float32"), training=True)
    >>> sorted(layer.renorm_clipping)
    ['dmax', 'rmax', 'rmin']
    """

    def __init__(self, renorm_clipping=None, renorm_momentum=0.99, **kwargs):
        kwargs.pop("renorm", None)
        if renorm_clipping is None:
            renorm_clipping = {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0}
        super().__init__(
            renorm=True,
            renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum,
            **kwargs,
        )
