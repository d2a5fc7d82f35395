"""Internal covariate shift per layer, as Santurkar et al. define it."""

import numpy as np
import tensorflow as tf

from tfnorm.diagnostics import _common


def _learning_rate(model, learning_rate):
    if learning_rate is not None:
        return _common.check_positive("learning_rate", learning_rate)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            "Pass `learning_rate`, or compile the model with an optimizer "
            "whose current learning rate is then used. "
            "Received: learning_rate=None and no optimizer"
        )
    # The property gives the current value, schedules included.
    return float(np.asarray(optimizer.learning_rate))


def _plan(model, layers):
    """(name, kernel index, index of the layer's first variable) per layer.

    Indices are positions in `model.trainable_variables`; the variables
    before a layer's first one are the "preceding layers" that take their
    step. For Sequential and Functional models that list follows the order
    of the layers.
    """
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    candidates = [
        layer
        for layer in _common.all_layers(model)
        if _common.has_kernel(layer) and id(layer.kernel) in index
    ]
    names = _common.layer_names(candidates)
    if not candidates:
        raise ValueError(
            "The model has no layer with a trainable `kernel` (such as "
            "Dense or Conv2D), so there is no layer gradient to compare. "
            f"Received: model={model.name!r}"
        )
    if layers is not None:
        wanted = list(layers)
        unknown = [name for name in wanted if name not in names]
        if unknown or not wanted:
            raise ValueError(
                "Argument `layers` must name layers with a trainable "
                f"kernel, among {names}. Received: layers={layers!r}"
            )
    plan = []
    for name, layer in zip(names, candidates, strict=True):
        if layers is not None and name not in wanted:
            continue
        first = min(index[id(v)] for v in layer.trainable_variables)
        plan.append((name, index[id(layer.kernel)], first))
    return tuple(plan)


def _make_ics_function(model, loss_fn, plan):
    count = len(model.trainable_variables)

    def ics(trainable, non_trainable, x, y, learning_rate):
        _, grads = _common.loss_and_grads(
            model, loss_fn, trainable, non_trainable, x, y, range(count)
        )
        rows = []
        for _, kernel, first in plan:
            g = grads[kernel]
            if first == 0:
                # No preceding layer: nothing moves, G' is G.
                shifted_g = g
            else:
                # Only the variables before this layer take the SGD step.
                shifted = [
                    t - tf.cast(learning_rate, t.dtype) * grads[i]
                    if i < first
                    else t
                    for i, t in enumerate(trainable)
                ]
                _, (shifted_g,) = _common.loss_and_grads(
                    model, loss_fn, shifted, non_trainable, x, y, [kernel]
                )
            rows.append(
                tf.stack(
                    [
                        _common.sum_squares([g]),
                        _common.sum_squares([shifted_g]),
                        _common.sum_squares([g - shifted_g]),
                        _common.dot(g, shifted_g),
                    ]
                )
            )
        return tf.stack(rows)

    return tf.function(ics, reduce_retracing=True, autograph=False)


def internal_covariate_shift(
    model, x, y, learning_rate=None, loss=None, layers=None
):
    """Internal covariate shift of each kernel layer on one batch.

    Santurkar et al. (Definition 2.1) measure how much a layer's gradient
    changes when only the layers before it take their step. For a layer
    `i` with kernel `W_i`, on the batch `(x, y)`:

        G  = dL/dW_i  at the current weights w
        G' = dL/dW_i  at w with every preceding variable v (those before
             layer i in `model.trainable_variables`) moved to
             v - learning_rate * dL/dv

    and the result reports `||G - G'||` (Frobenius), the relative change
    `||G - G'|| / ||G||` and the cosine `<G, G'> / (||G|| ||G'||)`. The
    first layer has no preceding variables, so its shift is exactly zero.
    The step is plain SGD whatever the model's optimizer, as in the paper.

    The model runs in training mode (BN normalizes with batch statistics)
    through `model.stateless_call`: weights, optimizer state, BN moving
    statistics and dropout seeds are left exactly as they were, and every
    evaluation sees the same dropout mask. The loss is the mean of
    `loss(y, y_pred)` plus the model's regularization penalties; sample
    weights are not used. Costs one gradient for the model plus one per
    probed layer after the first.

    Args:
        model: A built Keras model.
        x: Input batch (array, tensor, or a structure the model takes).
        y: Targets for `loss`.
        learning_rate: Positive float, the SGD step of the preceding
            layers; default: the compiled optimizer's current rate.
        loss: Callable `loss(y_true, y_pred)` or a Keras loss name;
            default: the model's compiled loss.
        layers: Optional names of the kernel layers to probe (default:
            every layer with a trainable `kernel`).

    Returns:
        A dict, in model order, mapping each probed layer's name to a dict
        of Python floats: `"l2"` (`||G - G'||`), `"relative"`
        (`||G - G'|| / ||G||`, NaN when G is zero), `"cosine"` (NaN when
        either gradient is zero), `"grad_norm"` (`||G||`) and
        `"shifted_grad_norm"` (`||G'||`).

    Raises:
        ValueError: for an unbuilt model, a model without kernel layers,
            unknown `layers`, a non-positive `learning_rate`, or no loss.

    Reference:
        - [Santurkar et al., 2018](https://arxiv.org/abs/1805.11604)

    Example:

    >>> import keras, numpy as np, tfnorm
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(1, name="out")])
    >>> x, y = np.ones((16, 4), "float32"), np.zeros((16, 1), "float32")
    >>> shift = tfnorm.diagnostics.internal_covariate_shift(
    ...     model, x, y, learning_rate=0.1, loss="mse")
    >>> sorted(shift["out"])
    ['cosine', 'grad_norm', 'l2', 'relative', 'shifted_grad_norm']
    """
    _common.check_built(model)
    rate = _learning_rate(model, learning_rate)
    loss_fn = _common.resolve_loss(model, loss)
    plan = _plan(model, layers)
    function = _common.cached(
        model,
        ("ics", loss_fn, plan),
        lambda: _make_ics_function(model, loss_fn, plan),
    )
    trainable, non_trainable = _common.current_values(model)
    rows = function(
        trainable,
        non_trainable,
        _common.to_tensors(x),
        _common.to_tensors(y),
        tf.constant(rate, tf.float64),
    ).numpy()
    result = {}
    for (name, _, _), row in zip(plan, rows, strict=True):
        g2, shifted2, diff2, product = (float(v) for v in row)
        norm, shifted, diff = np.sqrt([g2, shifted2, diff2])
        result[name] = {
            "l2": float(diff),
            "relative": float(diff / norm) if norm > 0 else float("nan"),
            "cosine": (
                float(product / (norm * shifted))
                if norm > 0 and shifted > 0
                else float("nan")
            ),
            "grad_norm": float(norm),
            "shifted_grad_norm": float(shifted),
        }
    return result
