"""Internal covariate shift per layer, as Santurkar et al. define it."""

import numpy as np
import tensorflow as tf

from tfnorm.diagnostics import _common

# `unroll=None` unrolls the probe over at most this many shifted layers.
# Beyond, the unrolled graph's one-time optimization outgrows what it
# saves per probe (see `internal_covariate_shift`).
UNROLL_LIMIT = 8


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


def _row(g, shifted_g):
    """`||G||^2`, `||G'||^2`, `||G - G'||^2` and `<G, G'>`, in float64."""
    return tf.stack(
        [
            _common.sum_squares([g]),
            _common.sum_squares([shifted_g]),
            _common.sum_squares([g - shifted_g]),
            _common.dot(g, shifted_g),
        ]
    )


def check_unroll(unroll):
    if unroll is not None and not isinstance(unroll, bool):
        raise ValueError(
            "Argument `unroll` must be True, False or None (unroll when at "
            f"most {UNROLL_LIMIT} probed layers have preceding layers). "
            f"Received: unroll={unroll!r}"
        )
    return unroll


def _resolve_unroll(unroll, plan):
    if check_unroll(unroll) is None:
        shifted = sum(1 for _, _, first in plan if first > 0)
        return shifted <= UNROLL_LIMIT
    return unroll


def _make_ics_function(model, loss_fn, plan, unroll):
    gradient = _common.gradient_function(model, loss_fn)
    # The probed layers that have preceding variables; the others keep G.
    moved = [(kernel, first) for _, kernel, first in plan if first > 0]

    def unrolled(trainable, non_trainable, x, y, shifted, grads):
        # One call per layer. Inlined, TF's graph optimizer keeps of each
        # call only what its layer's G' needs (the backward pass down to
        # that layer) and merges the forward passes through the shifted
        # preceding layers, which coincide across calls: the probe costs
        # one gradient plus, per layer i, forward and backward through
        # layers i..L.
        out = []
        for kernel, first in moved:
            point = shifted[:first] + trainable[first:]
            _, point_grads = gradient(point, non_trainable, x, y)
            out.append(_row(grads[kernel], point_grads[kernel]))
        return out

    def looped(trainable, non_trainable, x, y, shifted, grads):
        # One copy of the model in the graph, whatever its depth: a full
        # gradient per layer, but a graph that stays small to optimize.
        firsts = tf.constant([first for _, first in moved])

        def body(c, rows):
            point = [
                tf.where(i < firsts[c], s, t)
                for i, (s, t) in enumerate(zip(shifted, trainable, strict=True))
            ]
            _, point_grads = gradient(point, non_trainable, x, y)
            row = tf.switch_case(
                c,
                [
                    lambda k=kernel: _row(grads[k], point_grads[k])
                    for kernel, _ in moved
                ],
            )
            return c + 1, rows.write(c, row)

        _, rows = tf.while_loop(
            lambda c, _: c < len(moved),
            body,
            (tf.constant(0), tf.TensorArray(tf.float64, size=len(moved))),
        )
        return tf.unstack(rows.stack())

    def ics(trainable, non_trainable, x, y, learning_rate):
        _, grads = gradient(trainable, non_trainable, x, y)
        # Every variable after its SGD step; a layer's evaluation point
        # takes the preceding ones from here and keeps the rest.
        shifted = [
            t - tf.cast(learning_rate, t.dtype) * g
            for t, g in zip(trainable, grads, strict=True)
        ]
        rows = []
        if moved:
            evaluate = unrolled if unroll else looped
            rows = evaluate(trainable, non_trainable, x, y, shifted, grads)
        rows = iter(rows)
        # No preceding layer: nothing moves, G' is G.
        return tf.stack(
            [
                _row(grads[kernel], grads[kernel]) if first == 0 else next(rows)
                for _, kernel, first in plan
            ]
        )

    return tf.function(ics, reduce_retracing=True, autograph=False)


def internal_covariate_shift(
    model, x, y, learning_rate=None, loss=None, layers=None, unroll=None
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
    weights are not used.

    Cost: the definition needs the model's gradient plus, for every probed
    layer `i` after the first, a gradient at its own point (the preceding
    layers moved, the rest not). Unrolled, the forward pass through the
    moved layers is shared and layer `i`'s pass runs forward and backward
    through layers `i..L` only: for an `L`-layer chain of equal widths
    about `1.3 + L / 2` gradients. On the 784-6x256-10 MLP (whose first
    layer does 38% of the work) all 7 layers cost about 2.8 gradients,
    measured 3.4-3.6x `train_on_batch` on 2 idle CPU cores (2.1-2.7x on
    cores shared with other jobs; `benchmarks/bench_diagnostics.py`).
    The unrolled graph grows with the depth times the model, and so does
    its one-time optimization at the first call: 25-35 s for a 25-layer
    linear net with BN, against 4-7 s looped, where the model is in the
    graph once at one full gradient per layer (3-5x the unrolled time per
    probe on that net).

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
        unroll: Whether to unroll the probe over the layers (faster per
            probe) or loop over them (faster to compile for deep
            models); default None unrolls when at most 8 probed layers
            have preceding layers. The results agree to float rounding.

    Returns:
        A dict, in model order, mapping each probed layer's name to a dict
        of Python floats: `"l2"` (`||G - G'||`), `"relative"`
        (`||G - G'|| / ||G||`, NaN when G is zero), `"cosine"` (NaN when
        either gradient is zero), `"grad_norm"` (`||G||`) and
        `"shifted_grad_norm"` (`||G'||`).

    Raises:
        ValueError: for an unbuilt model, a model without kernel layers,
            unknown `layers`, a non-positive `learning_rate`, a bad
            `unroll`, or no loss.

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
    unroll = _resolve_unroll(unroll, plan)
    function = _common.cached(
        model,
        ("ics", loss_fn, (plan, unroll)),
        lambda: _make_ics_function(model, loss_fn, plan, unroll),
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
            # Clipped: rounding put an unmoved gradient's cosine at
            # 1.0000000000000002.
            "cosine": (
                float(np.clip(product / (norm * shifted), -1.0, 1.0))
                if norm > 0 and shifted > 0
                else float("nan")
            ),
            "grad_norm": float(norm),
            "shifted_grad_norm": float(shifted),
        }
    return result
