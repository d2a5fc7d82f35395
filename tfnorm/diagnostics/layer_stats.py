"""Per-layer activation statistics, BN statistics, renorm r and d, dropout."""

import keras
import numpy as np
import tensorflow as tf

from tfnorm.diagnostics import _common
from tfnorm.dropout.base import DropoutLayer

_DROPOUT_TYPES = (keras.layers.Dropout, DropoutLayer)
_MOMENT_KEYS = ("input_mean", "input_std", "output_mean", "output_std")


def _kind(layer):
    if isinstance(layer, _common.BN_TYPES):
        return "batch_norm"
    if isinstance(layer, _DROPOUT_TYPES):
        return "dropout"
    if _common.has_kernel(layer):
        return "kernel"
    return None


def _unit_axis(layer):
    if isinstance(layer, _common.BN_TYPES):
        axis = layer.axis
        # tf-keras style list axes; tfnorm and Keras 3 use one int.
        return int(axis[0] if isinstance(axis, (list, tuple)) else axis)
    return -1


def _tracked(model, layers):
    candidates = [
        layer for layer in _common.all_layers(model) if _kind(layer) is not None
    ]
    names = _common.layer_names(candidates)
    if layers is not None:
        wanted = list(layers)
        unknown = [name for name in wanted if name not in names]
        if unknown or not wanted:
            raise ValueError(
                "Argument `layers` must name BN, dropout or kernel layers "
                f"of the model, among {names}. Received: layers={layers!r}"
            )
        keep = [name in wanted for name in names]
    else:
        keep = [True] * len(names)
    return tuple(
        (name, layer)
        for name, layer, kept in zip(names, candidates, keep, strict=True)
        if kept
    )


def _unit_moments(t, axis):
    """Per-unit mean and (biased) std along `axis`, in float64."""
    t = tf.cast(t, tf.float64)
    if len(t.shape) < 2:
        t = tf.reshape(t, [-1, 1])
        axis = -1
    axis = axis % len(t.shape)
    reduce = [i for i in range(len(t.shape)) if i != axis]
    mean = tf.reduce_mean(t, reduce, keepdims=True)
    var = tf.reduce_mean(tf.square(t - mean), reduce)
    return tf.reshape(mean, [-1]), tf.sqrt(var)


def _group_moments(t, axis, group_size):
    """Per-channel mean and biased std of each ghost group, in float64.

    Groups are contiguous runs of `group_size` examples along the batch
    axis, the last one smaller when the batch does not divide evenly, as
    tfnorm's ghost BN forms them. Returns two (groups, channels) tensors.
    """
    t = tf.cast(t, tf.float64)
    rank = len(t.shape)
    axis = axis % rank
    # (batch, everything else, channels).
    perm = [0] + [i for i in range(1, rank) if i != axis] + [axis]
    t = tf.transpose(t, perm)
    batch = tf.shape(t)[0]
    t = tf.reshape(t, [batch, -1, t.shape[-1]])
    group_of = tf.range(batch) // group_size
    groups = (batch + group_size - 1) // group_size

    def per_group(values):
        return tf.math.unsorted_segment_sum(values, group_of, groups)

    count = per_group(tf.fill([batch], tf.cast(tf.shape(t)[1], tf.float64)))
    count = tf.expand_dims(count, 1)
    mean = per_group(tf.reduce_sum(t, 1)) / count
    centered = t - tf.expand_dims(tf.gather(mean, group_of), 1)
    var = per_group(tf.reduce_sum(tf.square(centered), 1)) / count
    return mean, tf.sqrt(var)


def _is_ghost_renorm(layer):
    return bool(getattr(layer, "renorm", False)) and bool(
        getattr(layer, "virtual_batch_size", None)
    )


def _introduced_zeros(inputs, outputs):
    """Fraction of the non-zero inputs that the layer set to zero."""
    nonzero = tf.not_equal(inputs, 0)
    dropped = tf.logical_and(nonzero, tf.equal(outputs, 0))
    return tf.math.divide_no_nan(
        tf.reduce_sum(tf.cast(dropped, tf.float64)),
        tf.reduce_sum(tf.cast(nonzero, tf.float64)),
    )


def _recording_call(original, sink, name):
    def call(*args, **kwargs):
        outputs = original(*args, **kwargs)
        # A layer called several times reports its first call.
        if name not in sink:
            inputs = args[0] if args else next(iter(kwargs.values()))
            sink[name] = (inputs, outputs)
        return outputs

    return call


def _make_stats_function(model, tracked):
    def stats(trainable, non_trainable, x):
        sink = {}
        patched = []
        # The patch only matters while the graph is traced: the layers'
        # inputs and outputs become tensors of the graph, returned below.
        try:
            for name, layer in tracked:
                wrapper = _recording_call(layer.call, sink, name)
                # Set on the instance, outside Keras's attribute tracking;
                # deleting it exposes the class's `call` again.
                object.__setattr__(layer, "call", wrapper)
                patched.append(layer)
            model.stateless_call(trainable, non_trainable, x, training=True)
        finally:
            for layer in patched:
                object.__delattr__(layer, "call")
        results = {}
        for name, layer in tracked:
            if name not in sink:
                continue
            inputs, outputs = sink[name]
            inputs = tf.nest.flatten(inputs)[0]
            outputs = tf.nest.flatten(outputs)[0]
            axis = _unit_axis(layer)
            entry = {}
            entry["input_mean"], entry["input_std"] = _unit_moments(
                inputs, axis
            )
            entry["output_mean"], entry["output_std"] = _unit_moments(
                outputs, axis
            )
            if isinstance(layer, _DROPOUT_TYPES):
                entry["drop_rate"] = _introduced_zeros(inputs, outputs)
            if _is_ghost_renorm(layer):
                # Renorm's r and d come from each ghost group's moments.
                entry["group_mean"], entry["group_std"] = _group_moments(
                    inputs, axis, layer.virtual_batch_size
                )
            results[name] = entry
        return results

    return tf.function(stats, reduce_retracing=True, autograph=False)


def _summary(values, prefix):
    return {
        f"{prefix}_mean": float(np.mean(values)),
        f"{prefix}_std": float(np.std(values)),
        f"{prefix}_min": float(np.min(values)),
        f"{prefix}_max": float(np.max(values)),
    }


def _renorm(layer, mean, std):
    """Renorm's r and d on the probe batch, and how many units clip.

    With the input's per-channel batch mean `mu_B` and biased std, as the
    layer computes them: `s_B = sqrt(var_B + eps)`,
    `s_r = max(renorm_stddev, sqrt(eps))`, `r = clip(s_B / s_r, rmin,
    rmax)`, `d = clip((mu_B - renorm_mean) / s_r, -dmax, dmax)`.
    """
    eps = float(layer.epsilon)
    renorm_mean = np.asarray(layer.renorm_mean.numpy(), np.float64)
    renorm_std = np.maximum(
        np.asarray(layer.renorm_stddev.numpy(), np.float64), np.sqrt(eps)
    )
    clipping = layer.renorm_clipping or {}
    rmin = clipping.get("rmin")
    rmax = clipping.get("rmax")
    dmax = clipping.get("dmax")
    r_raw = np.sqrt(std**2 + eps) / renorm_std
    d_raw = (mean - renorm_mean) / renorm_std
    r = np.clip(
        r_raw,
        -np.inf if rmin is None else rmin,
        np.inf if rmax is None else rmax,
    )
    d = d_raw if dmax is None else np.clip(d_raw, -dmax, dmax)
    r_clipped = r != r_raw
    d_clipped = d != d_raw
    result = {**_summary(r, "r"), **_summary(d, "d")}
    result["r_clipped"] = float(np.mean(r_clipped))
    result["d_clipped"] = float(np.mean(d_clipped))
    result["clipped"] = float(np.mean(r_clipped | d_clipped))
    return result, {"r": r, "d": d}


def _bn_entry(layer, per_unit, values):
    moving_mean = np.asarray(layer.moving_mean.numpy(), np.float64)
    moving_variance = np.asarray(layer.moving_variance.numpy(), np.float64)
    entry = {
        "moving_mean_mean": float(np.mean(moving_mean)),
        "moving_mean_std": float(np.std(moving_mean)),
        "moving_variance_mean": float(np.mean(moving_variance)),
        "moving_variance_min": float(np.min(moving_variance)),
        "moving_variance_max": float(np.max(moving_variance)),
    }
    if _is_ghost_renorm(layer):
        # Ghost batches: one r and d per (group, channel), from the
        # group's moments; the summaries and clipped fractions run over
        # all of them.
        renorm, arrays = _renorm(
            layer, values["group_mean"].numpy(), values["group_std"].numpy()
        )
    elif getattr(layer, "renorm", False):
        renorm, arrays = _renorm(
            layer, per_unit["input_mean"], per_unit["input_std"]
        )
    else:
        return entry
    entry.update(renorm)
    per_unit.update(arrays)
    return entry


def _drift(current, previous):
    """Root mean square change per unit, for arrays of the same shape."""
    if previous is None or current.shape != previous.shape:
        return None
    return float(np.sqrt(np.mean((current - previous) ** 2)))


def layer_statistics(model, x, previous=None, layers=None):
    """Activation statistics of the BN, dropout and kernel layers.

    One training-mode forward pass on `x` (BN with batch statistics,
    dropout active) through `model.stateless_call`, which leaves weights,
    optimizer state, BN moving statistics and dropout seeds exactly as they
    were. For every BN layer (tfnorm or Keras), dropout layer (Keras
    `Dropout` and its spatial variants, tfnorm dropout layers) and layer
    with a trainable kernel, the input and output are summarized per unit
    (the channel axis of a BN layer, the last axis otherwise):

        mean_u = mean over the other axes,  std_u = biased std likewise

    and reported as their average over units. With `previous`, the result
    of an earlier call, each per-unit vector also gets its drift, the root
    mean square change `sqrt(mean_u (a_u - b_u)^2)`.

    BN layers add their moving statistics. Renorm layers add `r` and `d`
    on this batch from the input's statistics and the layer's current
    `renorm_mean`, `renorm_stddev` and clipping:
    `r = clip(s_B / max(s_r, sqrt(eps)), rmin, rmax)`,
    `d = clip((mu_B - mu_r) / max(s_r, sqrt(eps)), -dmax, dmax)`, and the
    fraction of units where either is clipped; with ghost batches
    (`virtual_batch_size`) from each ghost group's moments, one `r` and `d`
    per group and unit. Dropout layers add the realized rate: the fraction
    of non-zero inputs set to zero. Masks are not applied.

    Args:
        model: A built Keras model.
        x: Input batch.
        previous: Optional result of an earlier call, for the drift.
        layers: Optional names of the layers to report (default: all BN,
            dropout and kernel layers).

    Returns:
        A dict, in model order, from layer name to a dict with `"kind"`
        (`"batch_norm"`, `"dropout"` or `"kernel"`), Python floats
        `"input_mean"`, `"input_std"`, `"output_mean"`, `"output_std"`,
        their drifts `"<key>_drift"` when `previous` holds the layer,
        `"moving_mean_mean"`, `"moving_mean_std"`,
        `"moving_variance_mean"`, `"moving_variance_min"`,
        `"moving_variance_max"` for BN layers; `"r_mean"`, `"r_std"`,
        `"r_min"`, `"r_max"`, the same for `d`, `"r_clipped"`,
        `"d_clipped"` and `"clipped"` for renorm layers; `"drop_rate"` and
        the configured `"rate"` for dropout layers; and `"per_unit"`, a
        dict of float64 numpy arrays (the per-unit moments, and `r`, `d`:
        per unit, or (groups, units) for ghost renorm layers).

    Raises:
        ValueError: for an unbuilt model or unknown `layers`.

    Reference:
        - [Santurkar et al., 2018](https://arxiv.org/abs/1805.11604)
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275)

    Example:

    >>> import keras, numpy as np, tfnorm
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           tfnorm.BatchNormalization(name="bn")])
    >>> x = np.random.rand(32, 4).astype("float32")
    >>> stats = tfnorm.diagnostics.layer_statistics(model, x)
    >>> round(abs(stats["bn"]["output_mean"]), 6)
    0.0
    """
    _common.check_built(model)
    tracked = _tracked(model, layers)
    function = _common.cached(
        model,
        ("layer_statistics", None, tuple(name for name, _ in tracked)),
        lambda: _make_stats_function(model, tracked),
    )
    trainable, non_trainable = _common.current_values(model)
    raw = function(trainable, non_trainable, _common.to_tensors(x))
    previous = previous or {}
    result = {}
    for name, layer in tracked:
        if name not in raw:
            continue
        values = raw[name]
        per_unit = {key: values[key].numpy() for key in _MOMENT_KEYS}
        entry = {"kind": _kind(layer)}
        for key in _MOMENT_KEYS:
            entry[key] = float(np.mean(per_unit[key]))
        before = previous.get(name, {}).get("per_unit", {})
        for key in _MOMENT_KEYS:
            drift = _drift(per_unit[key], before.get(key))
            if drift is not None:
                entry[f"{key}_drift"] = drift
        if entry["kind"] == "batch_norm":
            entry.update(_bn_entry(layer, per_unit, values))
        elif entry["kind"] == "dropout":
            entry["drop_rate"] = float(values["drop_rate"].numpy())
            entry["rate"] = float(np.asarray(layer.rate))
        entry["per_unit"] = per_unit
        result[name] = entry
    return result
