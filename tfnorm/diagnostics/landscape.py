"""Loss-landscape probe along the gradient: loss, gradient, smoothness."""

import math

import numpy as np
import tensorflow as tf

from tfnorm.diagnostics import _common

# Santurkar et al. probe step sizes up to 0.4.
DEFAULT_STEP_SIZES = tuple(float(v) for v in np.linspace(0.05, 0.4, 8))


def check_step_sizes(step_sizes):
    """Validates the grid and returns it as a tuple of floats."""
    try:
        values = tuple(float(v) for v in step_sizes)
    except (TypeError, ValueError):
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            "Argument `step_sizes` must be a non-empty sequence of "
            f"positive, finite floats. Received: step_sizes={step_sizes!r}"
        )
    return values


def _make_landscape_function(model, loss_fn):
    gradient = _common.gradient_function(model, loss_fn)

    def landscape(trainable, non_trainable, x, y, step_sizes):
        value, grads = gradient(trainable, non_trainable, x, y)
        count = tf.shape(step_sizes)[0]

        # A graph loop rather than one copy of the model per step size:
        # the graph stays small to optimize and to hold in memory. On the
        # benchmark's MLP, unrolling the grid or batching it with
        # tf.vectorized_map ran within the loop's run-to-run spread on CPU
        # (#6), and XLA slower.
        def body(k, losses, changes):
            eta = step_sizes[k]
            moved = [
                t - tf.cast(eta, t.dtype) * g
                for t, g in zip(trainable, grads, strict=True)
            ]
            moved_value, moved_grads = gradient(moved, non_trainable, x, y)
            change = _common.sum_squares(
                [a - b for a, b in zip(moved_grads, grads, strict=True)]
            )
            return (
                k + 1,
                losses.write(k, tf.cast(moved_value, tf.float64)),
                changes.write(k, change),
            )

        _, losses, changes = tf.while_loop(
            lambda k, *_: k < count,
            body,
            (
                tf.constant(0),
                tf.TensorArray(tf.float64, size=count),
                tf.TensorArray(tf.float64, size=count),
            ),
        )
        return (
            tf.cast(value, tf.float64),
            _common.sum_squares(grads),
            losses.stack(),
            changes.stack(),
        )

    return tf.function(landscape, reduce_retracing=True, autograph=False)


def loss_landscape(model, x, y, step_sizes=DEFAULT_STEP_SIZES, loss=None):
    """Loss and gradient along the gradient direction on one batch.

    Santurkar et al.'s probe of smoothness. At the weights `w`, with the
    gradient `g` of the loss `L` on the batch `(x, y)`, for every step size
    `eta` of the grid:

        L(w - eta g)                      the loss landscape (its band)
        ||g_eta - g||, g_eta = grad L(w - eta g)
                                          gradient predictiveness
        beta = max_eta ||g_eta - g|| / ||eta g||
                                          effective beta-smoothness

    Norms run over all trainable variables together. The model runs in
    training mode on the same batch (BN uses batch statistics) through
    `model.stateless_call`, so weights, optimizer state, BN moving
    statistics and dropout seeds are left exactly as they were, and every
    point sees the same dropout mask. The loss is the mean of
    `loss(y, y_pred)` plus the model's regularization penalties. Costs one
    gradient plus one per step size, each over the whole network: about 9
    gradients with the default grid, measured 6.3-6.6x `train_on_batch`
    on the 784-6x256-10 MLP on idle CPU cores (4.3-6.7x on shared ones;
    `benchmarks/bench_diagnostics.py`).

    Args:
        model: A built Keras model.
        x: Input batch.
        y: Targets for `loss`.
        step_sizes: Non-empty sequence of positive floats (default: 8
            points evenly spaced in [0.05, 0.4]).
        loss: Callable `loss(y_true, y_pred)` or a Keras loss name;
            default: the model's compiled loss.

    Returns:
        A dict of Python floats and lists: `"step_sizes"`, `"loss"`
        (`L(w)`), `"grad_norm"` (`||g||`), `"losses"` (`L(w - eta g)` per
        step size), `"loss_min"`, `"loss_max"`, `"grad_changes"`
        (`||g_eta - g||` per step size), `"grad_change_min"`,
        `"grad_change_max"`, `"beta_ratios"` (`||g_eta - g|| / ||eta g||`
        per step size, NaN when g is zero) and `"beta_smoothness"` (their
        maximum).

    Raises:
        ValueError: for an unbuilt model, bad `step_sizes`, or no loss.

    Reference:
        - [Santurkar et al., 2018](https://arxiv.org/abs/1805.11604)

    Example:

    >>> import keras, numpy as np, tfnorm
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> x, y = np.ones((16, 4), "float32"), np.zeros((16, 1), "float32")
    >>> probe = tfnorm.diagnostics.loss_landscape(
    ...     model, x, y, step_sizes=[0.1, 0.2], loss="mse")
    >>> len(probe["losses"])
    2
    """
    _common.check_built(model)
    steps = check_step_sizes(step_sizes)
    loss_fn = _common.resolve_loss(model, loss)
    function = _common.cached(
        model,
        ("landscape", loss_fn, None),
        lambda: _make_landscape_function(model, loss_fn),
    )
    trainable, non_trainable = _common.current_values(model)
    value, grad2, losses, changes2 = function(
        trainable,
        non_trainable,
        _common.to_tensors(x),
        _common.to_tensors(y),
        tf.constant(steps, tf.float64),
    )
    grad_norm = float(np.sqrt(grad2.numpy()))
    losses = [float(v) for v in losses.numpy()]
    changes = [float(v) for v in np.sqrt(changes2.numpy())]
    if grad_norm > 0:
        ratios = [
            c / (eta * grad_norm) for c, eta in zip(changes, steps, strict=True)
        ]
    else:
        ratios = [float("nan")] * len(steps)
    return {
        "step_sizes": list(steps),
        "loss": float(value.numpy()),
        "grad_norm": grad_norm,
        "losses": losses,
        # numpy's min and max propagate a NaN (a step size that blew the
        # loss up) whatever its place in the grid; Python's depend on it.
        "loss_min": float(np.min(losses)),
        "loss_max": float(np.max(losses)),
        "grad_changes": changes,
        "grad_change_min": float(np.min(changes)),
        "grad_change_max": float(np.max(changes)),
        "beta_ratios": ratios,
        "beta_smoothness": float(np.max(ratios)),
    }
