"""Shared plumbing of the probes: layers, loss, stateless calls, checks.

Every probe evaluates the model through `model.stateless_call` on tensors
that hold the current (or perturbed) weights, so it never assigns to a
model variable: the updated non-trainable values it returns (BN moving
statistics, dropout seed states) are dropped.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from tfnorm.normalization import BatchNormalization

BN_TYPES = (BatchNormalization, keras.layers.BatchNormalization)

# Attribute under which compiled probe functions are cached on a model. Set
# with object.__setattr__ to stay out of Keras's attribute tracking.
_CACHE_ATTR = "_tfnorm_diagnostics_cache"


def all_layers(model):
    """Every layer of `model`, nested ones included, in model order."""
    # Keras has no public recursive listing; PreciseBN uses the same one.
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not isinstance(layer, keras.layers.InputLayer)
    ]


def has_kernel(layer):
    kernel = getattr(layer, "kernel", None)
    return isinstance(kernel, keras.Variable) and kernel.trainable


def layer_names(layers):
    """Unique display names: `layer.name`, or its path when names repeat."""
    counts = {}
    for layer in layers:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    return [
        layer.name if counts[layer.name] == 1 else layer.path
        for layer in layers
    ]


def check_built(model):
    if not model.built:
        raise ValueError(
            "The model must be built (called once, or created with an "
            "`Input`) before it can be probed. "
            f"Received: model={model.name!r} with built=False"
        )


def check_period(period):
    if (
        isinstance(period, bool)
        or not isinstance(period, (int, np.integer))
        or period < 1
    ):
        raise ValueError(
            "Argument `period` must be a positive integer number of "
            f"training steps. Received: period={period!r}"
        )
    return int(period)


def check_positive(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating, np.integer))
        or not math.isfinite(float(value))
        or not float(value) > 0
    ):
        raise ValueError(
            f"Argument `{name}` must be a positive, finite float. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def resolve_loss(model, loss):
    """The loss callable `loss(y_true, y_pred)` that the probes use."""
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "No loss to differentiate: pass `loss` or compile the model "
                "with one. Received: loss=None, model.loss=None"
            )
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            # `compile` also takes shorthands such as "crossentropy" that
            # it resolves from the targets' shape; there are no targets
            # here to resolve them from.
            raise ValueError(
                f"Loss {loss!r} is not a Keras loss name that the probes "
                "can look up (`compile` resolves shorthands such as "
                "'crossentropy' from the targets). Pass `loss` explicitly, "
                "for example loss=keras.losses.SparseCategoricalCrossentropy"
                f"(from_logits=True). Received: loss={loss!r}"
            ) from None
    if not callable(loss):
        raise TypeError(
            "Argument `loss` (or the model's compiled loss) must be a "
            "callable `loss(y_true, y_pred)` or a Keras loss name; pass one "
            "callable for a model with several outputs. "
            f"Received: loss={loss!r}"
        )
    return loss


def current_values(model):
    """The current trainable and non-trainable values as tensors."""
    trainable = [
        tf.convert_to_tensor(v.value) for v in model.trainable_variables
    ]
    non_trainable = [
        tf.convert_to_tensor(v.value) for v in model.non_trainable_variables
    ]
    return trainable, non_trainable


def to_tensors(data):
    return tf.nest.map_structure(tf.convert_to_tensor, data)


def scalar_loss(loss_fn, y, y_pred, losses):
    """Mean loss plus the model's regularization penalties, in float32+."""

    def widen(t):
        if t.dtype in (tf.float16, tf.bfloat16):
            return tf.cast(t, tf.float32)
        return t

    y_pred = tf.nest.map_structure(widen, y_pred)
    value = tf.reduce_mean(widen(tf.convert_to_tensor(loss_fn(y, y_pred))))
    for penalty in losses:
        value = value + tf.cast(penalty, value.dtype)
    return value


def cached(model, key, make):
    """A compiled function cached on the model under `key`.

    `key` holds everything the traced graph depends on beyond its tensor
    arguments; it is compared with `==` and the loss object by identity,
    so a stale entry is never reused for another loss. The model's
    variable layout is part of the key too: the traced functions take the
    variables' values by position, so freezing or unfreezing a layer
    between probes (fine-tuning) must trace anew. So are the layers'
    `trainable` flags: a frozen BN layer normalizes with its moving
    statistics, which the trace fixes, and one without `gamma` and `beta`
    leaves the variable layout as it was.
    """
    cache = getattr(model, _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        object.__setattr__(model, _CACHE_ATTR, cache)
    kind, loss, static = key
    static = (
        static,
        tuple(id(v) for v in model.trainable_variables),
        tuple(id(v) for v in model.non_trainable_variables),
        tuple(layer.trainable for layer in all_layers(model)),
    )
    entry = cache.get(kind)
    if entry is not None and entry[0] is loss and entry[1] == static:
        return entry[2]
    function = make()
    cache[kind] = (loss, static, function)
    return function


def unpack(data):
    """`(x, y)` from `(x, y)` or `(x, y, sample_weight)`."""
    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    return x, y


def loss_and_grads(model, loss_fn, trainable, non_trainable, x, y, wrt):
    """Training-mode loss and its gradients for `trainable[i]`, i in `wrt`.

    Runs inside a traced graph; `trainable` are plain tensors, watched
    explicitly, so the gradient is taken at exactly these values.
    """
    with tf.GradientTape() as tape:
        for index in wrt:
            tape.watch(trainable[index])
        y_pred, _, losses = model.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        value = scalar_loss(loss_fn, y, y_pred, losses)
    grads = tape.gradient(
        value,
        [trainable[index] for index in wrt],
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    return value, grads


def gradient_function(model, loss_fn):
    """A compiled `(trainable, non_trainable, x, y) -> (loss, grads)`.

    The probes evaluate the same gradient at several weights. Called from
    inside their compiled functions it is traced once, not once per
    evaluation point, and TF inlines every call into the caller's graph,
    where its optimizer prunes what the caller does not use and merges
    calls that compute the same thing (see `ics.py`). Cached per model
    and loss, so the probes share one trace.
    """
    count = len(model.trainable_variables)

    def gradient(trainable, non_trainable, x, y):
        return loss_and_grads(
            model, loss_fn, trainable, non_trainable, x, y, range(count)
        )

    return cached(
        model,
        ("gradient", loss_fn, count),
        lambda: tf.function(gradient, reduce_retracing=True, autograph=False),
    )


def sum_squares(tensors):
    """Sum of squares of a list of tensors, accumulated in float64."""
    total = tf.constant(0.0, tf.float64)
    for t in tensors:
        total += tf.reduce_sum(tf.square(tf.cast(t, tf.float64)))
    return total


def dot(a, b):
    return tf.reduce_sum(tf.cast(a, tf.float64) * tf.cast(b, tf.float64))
