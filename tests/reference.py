"""float64 numpy reference implementations: the oracles of the numeric tests.

Everything here is written from the formulas in the papers and in
`shared/REFERENCE.md`, independently of the TensorFlow code it checks, and
in float64 so that the comparison tolerance is the layer's own error.
"""

import numpy as np

# ---------------------------------------------------------------------------
# Batch Normalization


def _channel_last(x, axis):
    """Moves `axis` last and flattens the rest after the batch: (B, N, C)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _mask_weights(x_shape, axis, mask):
    """Per-element weights (B, N, 1) from a mask shaped like x without axis."""
    batch = x_shape[0]
    if mask is None:
        n = int(np.prod(x_shape)) // (batch * x_shape[axis]) if batch else 0
        return np.ones((batch, n, 1))
    m = np.asarray(mask, np.float64)
    return m.reshape(batch, -1, 1)


def bn_moments(x, axis=-1, mask=None):
    """Count, mean and biased variance per channel over unmasked elements.

    Two-pass in float64. A channel with no element gets mean 0, variance 0
    and count 0.
    """
    axis = axis % np.ndim(x)
    xs = _channel_last(x, axis)
    w = _mask_weights(np.shape(x), axis, mask)
    count = np.sum(w) * np.ones(xs.shape[-1])
    total = np.sum(w * xs, axis=(0, 1))
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    sq = np.sum(w * (xs - mean) ** 2, axis=(0, 1))
    var = np.divide(sq, count, out=np.zeros_like(sq), where=count > 0)
    return count, mean, var


def _broadcast(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(v, shape)


def bn_inference(x, state, gamma=None, beta=None, axis=-1, epsilon=1e-3):
    """Inference: normalize with the moving statistics."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    c = x.shape[axis]
    gamma = np.ones(c) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros(c) if beta is None else np.asarray(beta, np.float64)
    mean = _broadcast(state["moving_mean"], x.ndim, axis)
    var = _broadcast(state["moving_variance"], x.ndim, axis)
    y = (x - mean) / np.sqrt(var + epsilon)
    return y * _broadcast(gamma, x.ndim, axis) + _broadcast(beta, x.ndim, axis)


def initial_state(channels, renorm=False):
    """Moving statistics as Keras initializes them."""
    state = {
        "moving_mean": np.zeros(channels),
        "moving_variance": np.ones(channels),
    }
    if renorm:
        state["moving_stddev"] = np.ones(channels)
        state["renorm_mean"] = np.zeros(channels)
        state["renorm_stddev"] = np.ones(channels)
    return state


def bn_train(
    x,
    state,
    gamma=None,
    beta=None,
    axis=-1,
    momentum=0.99,
    epsilon=1e-3,
    virtual_batch_size=None,
    renorm=False,
    renorm_clipping=None,
    renorm_momentum=0.99,
    mask=None,
):
    """One training step of (ghost, renorm, masked) BN.

    Returns the output and the new state dict. The rules it encodes:

    - Ghost groups are contiguous slices of `virtual_batch_size` examples
      along axis 0; the last group may be smaller. Each group is normalized
      with its own (masked) mean and biased variance.
    - The moving statistics are updated once per step from the pooled
      statistics of the whole batch (all unmasked elements), whatever the
      grouping: the same update as plain BN.
    - Renorm (Ioffe 2017): per group r = s_g / max(s_r, sqrt(eps)) and
      d = (mu_g - mu_r) / max(s_r, sqrt(eps)), clipped, computed from the
      renorm statistics before the update; s = sqrt(var + eps). Statistics
      updated as in Keras 3: renorm mean and stddev with renorm_momentum,
      moving mean and stddev with momentum, moving_variance = max(s^2 - eps,
      0).
    - A group without unmasked elements is normalized with the moving
      statistics; a batch without unmasked elements leaves the state as it
      was.
    """
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    c = x.shape[axis]
    batch = x.shape[0]
    gamma = np.ones(c) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros(c) if beta is None else np.asarray(beta, np.float64)
    clipping = renorm_clipping or {}
    state = {k: np.asarray(v, np.float64) for k, v in state.items()}

    group = virtual_batch_size or max(batch, 1)
    y = np.empty_like(x)
    for start in range(0, batch, group):
        sl = slice(start, start + group)
        xg = x[sl]
        mg = None if mask is None else np.asarray(mask)[sl]
        count, mean, var = bn_moments(xg, axis, mg)
        empty = count == 0
        mean = np.where(empty, state["moving_mean"], mean)
        var = np.where(empty, state["moving_variance"], var)
        scale, offset = gamma, beta
        if renorm:
            s = np.sqrt(var + epsilon)
            s_r = np.maximum(state["renorm_stddev"], np.sqrt(epsilon))
            r = s / s_r
            d = (mean - state["renorm_mean"]) / s_r
            if clipping.get("rmin") is not None:
                r = np.maximum(r, clipping["rmin"])
            if clipping.get("rmax") is not None:
                r = np.minimum(r, clipping["rmax"])
            if clipping.get("dmax") is not None:
                d = np.clip(d, -clipping["dmax"], clipping["dmax"])
            r = np.where(empty, 1.0, r)
            d = np.where(empty, 0.0, d)
            scale, offset = gamma * r, gamma * d + beta
        norm = (xg - _broadcast(mean, x.ndim, axis)) / np.sqrt(
            _broadcast(var, x.ndim, axis) + epsilon
        )
        y[sl] = norm * _broadcast(scale, x.ndim, axis) + _broadcast(
            offset, x.ndim, axis
        )

    count, mean, var = bn_moments(x, axis, mask) if batch else (0, 0, 0)
    if batch == 0 or np.all(count == 0):
        return y, state

    new = dict(state)
    new["moving_mean"] = momentum * state["moving_mean"] + (1 - momentum) * mean
    if renorm:
        s = np.sqrt(var + epsilon)
        rm = renorm_momentum
        new["renorm_mean"] = rm * state["renorm_mean"] + (1 - rm) * mean
        new["renorm_stddev"] = rm * state["renorm_stddev"] + (1 - rm) * s
        new["moving_stddev"] = (
            momentum * state["moving_stddev"] + (1 - momentum) * s
        )
        new["moving_variance"] = np.maximum(
            new["moving_stddev"] ** 2 - epsilon, 0.0
        )
    else:
        new["moving_variance"] = (
            momentum * state["moving_variance"] + (1 - momentum) * var
        )
    return y, new
