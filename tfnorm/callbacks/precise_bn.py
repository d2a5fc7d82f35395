"""PreciseBN: population statistics recomputed with the weights frozen."""

import itertools

import keras
import numpy as np
import tensorflow as tf

from tfnorm import _checks
from tfnorm.normalization import BatchNormalization

_BN_TYPES = (BatchNormalization, keras.layers.BatchNormalization)


class _PooledMoments:
    """Count, mean and centered m2 per channel, pooled over batches.

    Accumulates in float64 with Chan's parallel formula, so the result is
    the mean and biased variance of every element seen, whatever the batch
    sizes: `m2 = m2_a + m2_b + delta^2 * n_a * n_b / (n_a + n_b)`.
    """

    def __init__(self):
        self.count = None
        self.mean = None
        self.m2 = None

    def add(self, count, mean, m2):
        if self.count is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        # Channels with nothing seen yet (count 0 on both sides) stay 0.
        safe = np.where(total > 0, total, 1.0)
        delta = mean - self.mean
        self.mean = self.mean + delta * count / safe
        self.m2 = self.m2 + m2 + delta**2 * self.count * count / safe
        self.count = total

    def variance(self):
        return self.m2 / np.where(self.count > 0, self.count, 1.0)


def _batch_moments(inputs, axis, mask):
    """float64 count, mean and m2 per channel of one layer input.

    `mask` has the input's shape without the channel axis, as both tfnorm
    and Keras (channels last) take it; masked-out elements are left out.
    """
    x = tf.cast(inputs, tf.float64)
    rank = len(x.shape)
    axis = axis % rank
    reduce_axes = [i for i in range(rank) if i != axis]
    channels = x.shape[axis]
    if mask is None:
        weights = tf.ones_like(x)
    else:
        # Non-zero entries select, as in the layers; masked-out elements
        # are zeroed, not multiplied by 0, since padding may hold NaN.
        weights = tf.cast(tf.cast(mask, tf.bool), tf.float64)
        weights = tf.broadcast_to(tf.expand_dims(weights, axis), tf.shape(x))
        x = tf.where(weights > 0, x, tf.zeros_like(x))
    count = tf.reduce_sum(weights, reduce_axes)
    mean = tf.math.divide_no_nan(tf.reduce_sum(weights * x, reduce_axes), count)
    shape = [1] * rank
    shape[axis] = channels
    centered = x - tf.reshape(mean, shape)
    m2 = tf.reduce_sum(weights * tf.square(centered), reduce_axes)
    return count.numpy(), mean.numpy(), m2.numpy()


def _layer_axis(layer):
    axis = layer.axis
    # tf-keras style list axes; tfnorm and Keras 3 use one int.
    if isinstance(axis, (list, tuple)):
        axis = axis[0]
    return int(axis)


def bn_layers(model):
    """The BN layers of `model` (nested too) that PreciseBN recomputes.

    tfnorm and Keras BatchNormalization layers, skipping those with
    `trainable=False`: Keras runs them in inference mode and never
    updates their statistics, so they are frozen on purpose.
    """
    layers = model._flatten_layers(include_self=True, recursive=True)
    return [
        layer
        for layer in layers
        if isinstance(layer, _BN_TYPES) and layer.trainable
    ]


def _recording_call(layer, original_call, moments):
    """A `call` that records the input's moments, then trains the layer."""

    def call(inputs, training=None, mask=None, **kwargs):
        count, mean, m2 = _batch_moments(inputs, _layer_axis(layer), mask)
        moments.add(count, mean, m2)
        # The training-mode output (batch or ghost-batch statistics) is
        # what the layers downstream see during training.
        return original_call(inputs, training=True, mask=mask, **kwargs)

    return call


def _check_not_an_array(dataset):
    # An array iterates over its rows: single examples, not batches, which
    # failed deep inside Keras with a shape error.
    if isinstance(dataset, np.ndarray) or tf.is_tensor(dataset):
        raise TypeError(
            "`dataset` must yield batches (a tf.data.Dataset or an iterable "
            "of batches); an array iterates over single examples. Batch it "
            "first, e.g. tf.data.Dataset.from_tensor_slices(x).batch(128). "
            f"Received: an array of shape {tuple(dataset.shape)}"
        )


def _iterate(dataset, num_batches):
    # islice stops before drawing batch num_batches + 1, so an iterator
    # passed in keeps everything that was not used.
    for data in itertools.islice(dataset, num_batches):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        yield x


def _assign(layer, mean, variance):
    # Rounded once, from float64 to each variable's own dtype (float32, or
    # float64 under a float64 policy).
    def assign(variable, value):
        variable.assign(
            value.astype(keras.backend.standardize_dtype(variable.dtype))
        )

    assign(layer.moving_mean, mean)
    if getattr(layer, "renorm", False) and hasattr(layer, "moving_stddev"):
        # Renorm layers track standard deviations and derive the variance
        # from them; all three sets start from the population statistics.
        stddev = np.sqrt(variance + layer.epsilon)
        assign(layer.moving_stddev, stddev)
        assign(layer.renorm_mean, mean)
        assign(layer.renorm_stddev, stddev)
        # The layer derives the variance from its unrounded stddev too.
        derived = np.maximum(np.square(stddev) - layer.epsilon, 0.0)
        assign(layer.moving_variance, derived)
    else:
        assign(layer.moving_variance, variance)


def precise_bn(model, dataset, num_batches=200):
    """Recomputes the population statistics of every BN layer of a model.

    PreciseBN (Wu & Johnson, 2021): the moving averages that BN uses at
    inference lag behind the weights (with `momentum=0.99` about half the
    weight still sits on values 67 steps old), which hurts early in
    training and at high learning rates. This function replaces them, for
    every tfnorm and Keras BatchNormalization layer in `model` (nested
    layers included; layers with `trainable=False` are frozen and skipped),
    by statistics computed over `num_batches` batches with all weights
    frozen:

        mean = sum_b n_b * mean_b / N
        var  = (sum_b m2_b + n_b * (mean_b - mean)^2) / N,  N = sum_b n_b

    the exact mean of every element seen and its biased *pooled* variance
    (not an EMA, and not the mean of the batch variances, which misses the
    between-batch part), accumulated in float64. Masked-out elements are
    left out. Renorm layers get `moving_stddev = renorm_stddev =
    sqrt(var + epsilon)`, `renorm_mean = mean` and the `moving_variance`
    they derive from the standard deviation.

    Each BN layer sees the input it sees in a training-mode forward pass:
    the model runs eagerly with `training=False`, so dropout and other
    stochastic layers are off, while every BN layer (temporarily patched)
    records the moments of its input and then passes on its own
    training-mode output, normalized with the batch statistics (per ghost
    batch for ghost layers). Every batch meets the same, frozen state:
    the statistics that these training-mode calls update are restored
    after each batch (renorm outputs depend on them), and trainable
    weights, optimizer state and every other variable are left unchanged.

    Args:
        model: A Keras model (or layer) containing BN layers.
        dataset: A `tf.data.Dataset` or any iterable of batches, each `x`,
            `(x,)`, `(x, y)` or `(x, y, sample_weight)`; only `x` is used.
            Re-iterated on every call, so pass a dataset rather than a
            one-shot iterator when calling more than once.
        num_batches: Positive integer, the number of batches to use; a
            dataset with fewer batches is used whole. The paper finds
            about 10k examples enough (e.g. 200 batches of 50).

    Returns:
        The number of batches used.

    Raises:
        ValueError: if `num_batches` is not positive or `dataset` yields no
            batch.

    Known limits: runs eagerly on one device (not inside a
    `tf.distribute` strategy scope's replicas), and a layer called several
    times per forward pass pools the inputs of all its calls.

    Reference:
        - [Wu & Johnson, 2021](https://arxiv.org/abs/2105.07576)

    Example:

    >>> import keras, numpy as np, tfnorm
    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           tfnorm.BatchNormalization()])
    >>> x = np.random.rand(64, 3).astype("float32")
    >>> tfnorm.precise_bn(model, [x[:32], x[32:]])
    2
    >>> bn = model.layers[0]
    >>> bool(np.allclose(bn.moving_mean.numpy(), x.mean(0), atol=1e-6))
    True
    """
    num_batches = _checks.positive_int(num_batches, "num_batches")
    _check_not_an_array(dataset)
    layers = bn_layers(model)
    moments = {id(layer): _PooledMoments() for layer in layers}
    # Every non-trainable variable of the BN layers, to undo the moving
    # average updates of the training-mode calls below.
    saved = [
        (variable, variable.numpy())
        for layer in layers
        for variable in layer.non_trainable_variables
    ]
    patched = []
    used = 0
    try:
        for layer in layers:
            original = layer.call
            wrapper = _recording_call(layer, original, moments[id(layer)])
            # Set on the instance, bypassing Keras's attribute tracking;
            # deleting it later exposes the class's `call` again.
            object.__setattr__(layer, "call", wrapper)
            patched.append(layer)
        for x in _iterate(dataset, num_batches):
            model(x, training=False)
            used += 1
            # Weights frozen means every batch meets the same state: a
            # renorm layer's output depends on its renorm statistics, which
            # the training-mode call just moved.
            for variable, value in saved:
                variable.assign(value)
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")
        for variable, value in saved:
            variable.assign(value)
    if used == 0:
        raise ValueError(
            "`dataset` yielded no batch, so there are no statistics to "
            f"compute. Received: dataset={dataset!r}"
        )
    for layer in layers:
        pooled = moments[id(layer)]
        if pooled.count is None or not np.all(pooled.count > 0):
            # Never called, or channels with nothing unmasked: keep the
            # old statistics rather than inventing zeros.
            continue
        _assign(layer, pooled.mean, pooled.variance())
    return used


class PreciseBN(keras.callbacks.Callback):
    """Runs `tfnorm.precise_bn` at the end of every training epoch.

    After each epoch the population statistics of every tfnorm and Keras
    BN layer of the model are recomputed from `num_batches` batches of
    `dataset` with the weights frozen: the exact mean of the batch means
    and the pooled (biased) variance, see `tfnorm.precise_bn`. Keras
    runs `validation_data` *before* the epoch-end callbacks, so the
    validation metrics of an epoch still use the moving averages; call
    `model.evaluate` after `fit` (or in a later callback) to measure the
    recomputed statistics. List this callback before callbacks that save
    at epoch end (such as `ModelCheckpoint`) so they store them. Training
    in the next epoch continues its moving averages from these values.

    Args:
        dataset: A `tf.data.Dataset` or re-iterable of batches `x`,
            `(x, y)` or `(x, y, sample_weight)`, typically training data.
        num_batches: Positive integer, batches used per epoch (default
            200; fewer if the dataset is shorter).

    Reference:
        - [Wu & Johnson, 2021](https://arxiv.org/abs/2105.07576)

    Example:

    >>> import keras, numpy as np, tfnorm
    >>> x = np.random.rand(64, 3).astype("float32")
    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           tfnorm.BatchNormalization(),
    ...                           keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> data = [x[i:i + 16] for i in range(0, 64, 16)]
    >>> callback = tfnorm.callbacks.PreciseBN(data, num_batches=4)
    >>> _ = model.fit(x, x[:, :1], epochs=1, verbose=0,
    ...               callbacks=[callback])
    """

    def __init__(self, dataset, num_batches=200):
        super().__init__()
        num_batches = _checks.positive_int(num_batches, "num_batches")
        _check_not_an_array(dataset)
        if iter(dataset) is dataset:
            # A generator or iterator is used up by the first epoch, and
            # the second would fail only after a whole epoch of training.
            raise ValueError(
                "PreciseBN runs at every epoch end and iterates `dataset` "
                "each time, so it needs a re-iterable dataset (a "
                "tf.data.Dataset, a list of batches, a keras PyDataset), "
                "not a one-shot iterator or generator. Received: "
                f"dataset={dataset!r}"
            )
        self.dataset = dataset
        self.num_batches = num_batches

    def on_epoch_end(self, epoch, logs=None):
        precise_bn(self.model, self.dataset, self.num_batches)
