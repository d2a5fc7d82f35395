"""The batch renormalization warm-up: a schedule for the clipping bounds."""

import math
import numbers

import keras
import tensorflow as tf


def _check_steps(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"Argument `{name}` must be a non-negative integer number of "
            f"training steps. Received: {name}={value!r}"
        )
    if value < 0:
        raise ValueError(
            f"Argument `{name}` must be a non-negative integer number of "
            f"training steps. Received: {name}={value}"
        )
    return int(value)


def _check_number(name, value):
    # Finite: an infinite bound would turn the ramp's 0 * inf into NaN;
    # a bound too large to matter is written as a large finite number.
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
    ):
        raise TypeError(
            f"Argument `{name}` must be a finite number. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def _check_bounds(rmax, dmax, rmin):
    """Validates the final bounds and returns them as floats."""
    rmax = _check_number("rmax", rmax)
    dmax = _check_number("dmax", dmax)
    if not rmax >= 1.0:
        raise ValueError(
            "Argument `rmax` must be at least 1: the ramp starts at "
            f"rmax = 1 (plain BN) and widens from there. Received: rmax={rmax}"
        )
    if not dmax >= 0.0:
        raise ValueError(
            "Argument `dmax` must be non-negative: the ramp starts at "
            f"dmax = 0 (plain BN) and widens from there. Received: dmax={dmax}"
        )
    if rmin is not None:
        rmin = _check_number("rmin", rmin)
        if not 0.0 < rmin <= 1.0:
            raise ValueError(
                "Argument `rmin` must be None (the paper's 1 / rmax) or in "
                f"(0, 1], so that r = 1 stays allowed. Received: rmin={rmin}"
            )
    return rmax, dmax, rmin


def renorm_clipping_at(step, warmup_steps, ramp_steps, rmax, dmax, rmin=None):
    """The renorm clipping bounds at a given training step.

    Follows the warm-up of Ioffe (2017): for the first `warmup_steps` steps
    the bounds are `rmax = rmin = 1, dmax = 0`, so renorm computes plain
    BN. Then over `ramp_steps` steps the bounds open linearly,

        t = clip((step - warmup_steps) / ramp_steps, 0, 1)
        rmax(step) = 1 + t * (rmax - 1)
        dmax(step) = t * dmax

    and stay at `rmax`, `dmax` afterwards (`ramp_steps=0` jumps there at
    the end of the warm-up). `rmin(step)` is `1 / rmax(step)` as in the
    paper, or the given constant `rmin` once the warm-up is over.

    Args:
        step: Non-negative integer, the global training step (number of
            optimizer updates done so far).
        warmup_steps: Non-negative integer, steps at `r = 1, d = 0`.
        ramp_steps: Non-negative integer, steps of the linear ramp.
        rmax: Final upper bound of `r`, at least 1 (paper: 3).
        dmax: Final bound of `|d|`, non-negative (paper: 5).
        rmin: `None` for `1 / rmax(step)`, or a constant in (0, 1].

    Returns:
        A dict with keys `"rmax"`, `"rmin"`, `"dmax"` (floats), ready for
        `layer.set_renorm_clipping(**bounds)`.

    Reference:
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275)

    Example:

    >>> from tfnorm.callbacks import renorm_clipping_at
    >>> renorm_clipping_at(150, warmup_steps=100, ramp_steps=100,
    ...                    rmax=3.0, dmax=5.0)
    {'rmax': 2.0, 'rmin': 0.5, 'dmax': 2.5}
    """
    step = _check_steps("step", step)
    warmup_steps = _check_steps("warmup_steps", warmup_steps)
    ramp_steps = _check_steps("ramp_steps", ramp_steps)
    rmax, dmax, rmin = _check_bounds(rmax, dmax, rmin)
    if step < warmup_steps:
        return {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}
    if ramp_steps == 0:
        progress = 1.0
    else:
        progress = min((step - warmup_steps) / ramp_steps, 1.0)
    rmax_now = 1.0 + progress * (rmax - 1.0)
    dmax_now = progress * dmax
    rmin_now = 1.0 / rmax_now if rmin is None else rmin
    return {"rmax": rmax_now, "rmin": rmin_now, "dmax": dmax_now}


def renorm_layers(model):
    """Every layer of `model`, nested ones included, that renorm clips."""
    layers = model._flatten_layers(include_self=True, recursive=True)
    return [
        layer
        for layer in layers
        if getattr(layer, "renorm", False)
        and callable(getattr(layer, "set_renorm_clipping", None))
    ]


class RenormClippingSchedule(keras.callbacks.Callback):
    """Ramps the clipping of every renorm layer during `fit` (renorm warm-up).

    At the start of each training batch the callback reads the global step
    from `model.optimizer.iterations`, computes the bounds with
    `renorm_clipping_at` and assigns them to every `tfnorm` layer built
    with `renorm=True` in the model, nested models included:

        warm-up (step < warmup_steps): rmax = rmin = 1, dmax = 0 (plain BN)
        ramp: rmax 1 -> rmax and dmax 0 -> dmax linearly over ramp_steps
        after: rmax, dmax; rmin = 1 / rmax(step) or the constant given

    The layers keep their bounds in variables, so the compiled training
    step sees the new values without recompiling. Because the step comes
    from the optimizer, the schedule continues where it stopped across
    several `fit` calls and after reloading a saved model with its
    optimizer. The current bounds are what the layers' `get_config`
    reports, so a `.keras` file saved mid-schedule reloads them.

    Logging: at each epoch end `renorm/rmax` and `renorm/dmax` are added to
    the epoch logs, which `History` and `keras.callbacks.TensorBoard` record
    when this callback is listed before them. When a default
    `tf.summary` writer is active, the bounds are also written as scalars
    at every step where they change.

    Layers without `set_renorm_clipping` (such as Keras's own
    BatchNormalization, whose clipping is fixed at construction) are left
    alone. With `steps_per_execution > 1` the bounds change once per
    execution, the granularity at which Keras calls batch callbacks.

    Args:
        warmup_steps: Non-negative integer, steps at `rmax = 1, dmax = 0`.
            The paper uses 5k of 160k steps.
        ramp_steps: Non-negative integer, length of the linear ramp.
        rmax: Final upper bound of `r`, at least 1 (paper: 3).
        dmax: Final bound of `|d|`, non-negative (paper: 5).
        rmin: `None` for `1 / rmax(step)` as in the paper, or a constant in
            (0, 1] used once the warm-up is over.

    Reference:
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275)

    Example:

    >>> import keras, numpy as np, tfnorm
    >>> model = keras.Sequential([
    ...     keras.Input((4,)),
    ...     tfnorm.BatchRenormalization(),
    ...     keras.layers.Dense(1),
    ... ])
    >>> model.compile("sgd", "mse")
    >>> schedule = tfnorm.callbacks.RenormClippingSchedule(
    ...     warmup_steps=2, ramp_steps=4)
    >>> x = np.random.rand(32, 4).astype("float32")
    >>> history = model.fit(x, x[:, :1], batch_size=8, epochs=1,
    ...                     callbacks=[schedule], verbose=0)
    >>> history.history["renorm/rmax"]
    [1.5]
    """

    def __init__(self, warmup_steps, ramp_steps, rmax=3.0, dmax=5.0, rmin=None):
        super().__init__()
        self.warmup_steps = _check_steps("warmup_steps", warmup_steps)
        self.ramp_steps = _check_steps("ramp_steps", ramp_steps)
        self.rmax, self.dmax, self.rmin = _check_bounds(rmax, dmax, rmin)
        self._layers = []
        self._current = None

    def bounds_at(self, step):
        """The bounds this schedule sets at global step `step`."""
        return renorm_clipping_at(
            step,
            self.warmup_steps,
            self.ramp_steps,
            self.rmax,
            self.dmax,
            self.rmin,
        )

    def on_train_begin(self, logs=None):
        # Layers may have been built (renorm variables created) since the
        # last fit, so look them up again; forget what was assigned since
        # the model may have been reloaded or edited in between.
        self._layers = renorm_layers(self.model)
        self._current = None
        if not self._layers:
            raise ValueError(
                "RenormClippingSchedule found no tfnorm layer with "
                "`renorm=True` in the model, so there is nothing to "
                "schedule (Keras's own BatchNormalization keeps its "
                "clipping fixed). Use tfnorm.BatchRenormalization or "
                "tfnorm.BatchNormalization(renorm=True). Received: model "
                f"{self.model.name!r}"
            )

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        bounds = self.bounds_at(step)
        if bounds == self._current:
            return
        for layer in self._layers:
            layer.set_renorm_clipping(**bounds)
        self._current = bounds
        if tf.summary.should_record_summaries():
            tf.summary.scalar("renorm/rmax", bounds["rmax"], step=step)
            tf.summary.scalar("renorm/rmin", bounds["rmin"], step=step)
            tf.summary.scalar("renorm/dmax", bounds["dmax"], step=step)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self._current is None:
            return
        logs["renorm/rmax"] = self._current["rmax"]
        logs["renorm/dmax"] = self._current["dmax"]
