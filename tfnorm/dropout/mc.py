"""Monte Carlo dropout prediction with Batch Normalization left in inference."""

import contextlib
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfnorm import _checks
from tfnorm.dropout.base import RateVariableMixin

# Keras's own stochastic regularizers. The SpatialDropout classes derive from
# Dropout today; they are listed so that a refactor in Keras cannot silently
# drop them from MC sampling.
_KERAS_STOCHASTIC = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)

_ABSENT = object()


def stochastic_layers(model):
    """The dropout-like layers of `model`, at any depth of nesting.

    Keras's Dropout, SpatialDropout1D/2D/3D, GaussianDropout, GaussianNoise
    and AlphaDropout, and every tfnorm dropout layer.
    """
    # `_flatten_layers` is the only walk that reaches layers nested inside
    # wrappers and subclassed layers; it has been stable across Keras 3.
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, (_KERAS_STOCHASTIC, RateVariableMixin))
    ]


@contextlib.contextmanager
def _training_forced(layers):
    """Makes each of `layers` run its training branch while the rest infer.

    Each instance's `call` is shadowed by one that passes `training=True` to
    the class's `call`. The value bypasses `Layer.__call__`, so it cannot
    leak to sibling layers through Keras's call context; everything else,
    Batch Normalization in particular, sees the `training=False` of the
    outer call. The instances are restored on exit, also on error.
    """
    shadowed = []
    try:
        for layer in layers:
            previous = layer.__dict__.get("call", _ABSENT)
            original = layer.call

            def forced(*args, _call=original, **kwargs):
                kwargs["training"] = True
                return _call(*args, **kwargs)

            # `object.__setattr__` bypasses Keras's attribute tracking.
            object.__setattr__(layer, "call", forced)
            shadowed.append((layer, previous))
        yield
    finally:
        for layer, previous in reversed(shadowed):
            if previous is _ABSENT:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", previous)


def _looks_like_probabilities(mean):
    """Rows on the last axis that are non-negative and sum to 1."""
    if mean.ndim < 1 or mean.shape[-1] < 2 or mean.size == 0:
        return False
    return bool(
        np.all(mean >= -1e-6)
        and np.all(np.abs(np.sum(mean, axis=-1) - 1.0) <= 1e-3)
    )


def _entropy(mean):
    """Predictive entropy in nats over the last axis.

    One unit is read as the probability of the positive class of a binary
    classifier.
    """
    p = np.clip(mean, 0.0, 1.0)
    if p.shape[-1] == 1:
        p = np.concatenate([p, 1.0 - p], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0.0, p * np.log(p), 0.0)
    return -np.sum(terms, axis=-1)


def mc_predict(
    model,
    x,
    samples=30,
    batch_size=32,
    entropy=None,
    return_samples=False,
):
    """Monte Carlo dropout: predictive mean and spread over dropout masks.

    Runs `model` `samples` times on every batch of `x` with every dropout
    layer active and every other layer in inference mode, and summarizes the
    outputs `y_1 .. y_T` per example:

        mean = (1 / T) sum_t y_t
        std = sqrt((1 / T) sum_t (y_t - mean)^2)
        entropy = -sum_k mean_k log(mean_k)

    Active: Keras's Dropout, SpatialDropout1D/2D/3D, GaussianDropout,
    GaussianNoise and AlphaDropout, and every tfnorm dropout layer. Batch
    Normalization layers (Keras's and tfnorm's) stay in inference mode:
    they normalize with their moving statistics and update nothing. The
    common alternative, calling the model with `training=True`, switches BN
    to batch statistics, which makes each prediction depend on the other
    examples of its batch; and a `training=True` written into a functional
    model is overridden by `Model.predict` in Keras 3.15.

    Not sampled: dropout inside recurrent cells (`LSTM(dropout=...)`,
    `recurrent_dropout`), which is not a layer of its own. A model with no
    sampled layer gets a warning, since its `std` would be exactly zero.

    The model runs in a `tf.function` (graph mode, no XLA) built for this
    call. Every tfnorm and Keras dropout layer draws fresh masks at each
    pass, so the T passes are independent.

    Args:
        model: a `keras.Model`, also one loaded from a `.keras` file.
        x: input array, or a list or dict of arrays for a model with several
            inputs.
        samples: positive int, the number of passes `T`.
        batch_size: positive int, the number of examples per pass.
        entropy: whether to add the predictive entropy (in nats) of the
            mean over the last axis. `None` adds it when the mean output
            looks like class probabilities (at least two units,
            non-negative, summing to 1 within 1e-3); `True` forces it, a
            single unit then being read as a binary classifier's positive
            probability; `False` never adds it.
        return_samples: whether to add every pass's output, stacked on a new
            leading axis of size `T`.

    Returns:
        A dict of float32 numpy arrays (or of structures like the model's
        output, for a model with several outputs): `"mean"` and `"std"`,
        shaped like the output; `"entropy"` without the last axis when
        requested (`None` for outputs that are not probabilities); and
        `"samples"` when requested.

    Reference:
    - [Gal & Ghahramani, 2016](https://arxiv.org/abs/1506.02142)

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8,)),
    ...     keras.layers.Dense(32, activation="relu"),
    ...     keras.layers.BatchNormalization(),
    ...     keras.layers.Dropout(0.2),
    ...     keras.layers.Dense(3, activation="softmax"),
    ... ])
    >>> result = mc_predict(model, np.ones((10, 8)), samples=20)
    >>> sorted(result)
    ['entropy', 'mean', 'std']
    """
    samples = _checks.positive_int(samples, "samples")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    if entropy not in (None, True, False):
        raise ValueError(
            f"`entropy` must be None, True or False. Received: entropy="
            f"{entropy!r}"
        )
    if isinstance(x, tf.data.Dataset) or not keras.tree.flatten(x):
        raise ValueError(
            "`x` must be an array, or a list or dict of arrays, with at "
            f"least one example. Received: x={type(x).__name__}"
        )
    arrays = keras.tree.map_structure(np.asarray, x)
    num_examples = len(keras.tree.flatten(arrays)[0])
    if num_examples == 0:
        raise ValueError(
            "`x` must hold at least one example. Received: x with shape "
            f"{keras.tree.flatten(arrays)[0].shape}"
        )
    layers = stochastic_layers(model)
    if not layers:
        warnings.warn(
            f"mc_predict found no dropout layer in model {model.name!r}: "
            "every pass is the same and `std` is zero. Dropout inside "
            "recurrent cells (LSTM/GRU `dropout=`) is not sampled.",
            stacklevel=2,
        )

    means, stds, draws = [], [], []
    structure = None
    with _training_forced(layers):
        # Built here, so that its trace sees the forced layers; retraced at
        # most once more, for a smaller last batch.
        forward = tf.function(
            lambda batch: model(batch, training=False),
            reduce_retracing=True,
        )
        for start in range(0, num_examples, batch_size):
            batch = keras.tree.map_structure(
                lambda a, s=start: tf.convert_to_tensor(a[s : s + batch_size]),
                arrays,
            )
            passes = []
            for _ in range(samples):
                outputs = forward(batch)
                structure = outputs
                passes.append(
                    [
                        np.asarray(o, np.float64)
                        for o in keras.tree.flatten(outputs)
                    ]
                )
            # (T, batch, ...) per output, reduced in float64.
            stacked = [np.stack(leaf) for leaf in zip(*passes, strict=True)]
            means.append([s.mean(axis=0) for s in stacked])
            stds.append([s.std(axis=0) for s in stacked])
            if return_samples:
                draws.append(stacked)

    def joined(parts, axis=0):
        return [
            np.concatenate(leaf, axis=axis).astype(np.float32)
            for leaf in zip(*parts, strict=True)
        ]

    def packed(leaves):
        return keras.tree.pack_sequence_as(structure, leaves)

    mean = joined(means)
    result = {"mean": packed(mean), "std": packed(joined(stds))}
    if entropy is not False:
        entropies = [
            _entropy(m.astype(np.float64)).astype(np.float32)
            if entropy or _looks_like_probabilities(m)
            else None
            for m in mean
        ]
        if any(e is not None for e in entropies):
            result["entropy"] = packed(entropies)
    if return_samples:
        result["samples"] = packed(joined(draws, axis=1))
    return result
