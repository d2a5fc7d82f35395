"""A callback that sets the drop rate of tfnorm dropout layers by step."""

import keras

from tfnorm.dropout.base import RateVariableMixin
from tfnorm.dropout.base import validate_rate


class DropRateSchedule(keras.callbacks.Callback):
    """Sets the rate of tfnorm dropout layers at the start of every batch.

    Keras compiles a dropout rate into the training step as a constant; the
    tfnorm layers (DropBlock1D/2D, DropPath, DropConnect, Uout) read theirs
    from a non-trainable variable, which this callback assigns before each
    training batch:

        layer.rate = schedule(step)

    where `step` is the optimizer's iteration count, so that a resumed run
    continues its schedule. The model is never recompiled. ConcreteDropout
    learns its rate and is left alone. The rate in force is added to the
    epoch logs as `drop_rate`, which a `keras.callbacks.TensorBoard`
    placed after this callback records.

    The paper of DropBlock ramps the keep probability linearly from 1 to 0.9
    over training; with `total` training steps:

        DropRateSchedule(lambda step: 0.1 * min(1.0, step / total))

    Args:
        schedule: a callable taking the step (a Python int, from 0) and
            returning the rate, a float in [0, 1).
        layers: optional list of layers or layer names to drive. By default
            every schedulable tfnorm dropout layer of the model, at any depth.
        verbose: int, 1 prints every change of rate.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 4)),
    ...     DropBlock2D(0.0, block_size=3),
    ...     keras.layers.GlobalAveragePooling2D(),
    ...     keras.layers.Dense(2),
    ... ])
    >>> model.compile("sgd", "mse")
    >>> ramp = DropRateSchedule(lambda step: min(0.1, step / 1000))
    >>> model.fit(np.ones((16, 8, 8, 4)), np.ones((16, 2)), callbacks=[ramp])
    """

    def __init__(self, schedule, layers=None, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise ValueError(
                "`schedule` must be a callable mapping the step to a rate. "
                f"Received: schedule={schedule!r}"
            )
        self.schedule = schedule
        self.layers = None if layers is None else list(layers)
        self.verbose = verbose
        self._targets = []
        self._current = None
        self._seen_steps = 0

    def _find_targets(self):
        candidates = [
            layer
            for layer in self.model._flatten_layers(
                include_self=False, recursive=True
            )
            if isinstance(layer, RateVariableMixin) and layer._schedulable
        ]
        if self.layers is not None:
            wanted = {
                item if isinstance(item, str) else item.name
                for item in self.layers
            }
            candidates = [c for c in candidates if c.name in wanted]
            missing = wanted - {c.name for c in candidates}
            if missing:
                raise ValueError(
                    "Some `layers` are not schedulable tfnorm dropout layers "
                    f"of the model. Received: layers={sorted(missing)!r}"
                )
        if not candidates:
            raise ValueError(
                "DropRateSchedule found no schedulable tfnorm dropout layer "
                "(DropBlock1D, DropBlock2D, DropPath, DropConnect, Uout) in "
                f"the model. Received: model={self.model.name!r}"
            )
        return candidates

    def _step(self):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return self._seen_steps
        return int(keras.ops.convert_to_numpy(optimizer.iterations))

    def on_train_begin(self, logs=None):
        self._targets = self._find_targets()
        self._current = None
        self._seen_steps = 0

    def on_train_batch_begin(self, batch, logs=None):
        step = self._step()
        self._seen_steps += 1
        rate = validate_rate(float(self.schedule(step)), "rate")
        # Assigning only on change keeps a flat schedule free of per-step
        # variable writes.
        if rate != self._current:
            for layer in self._targets:
                layer.rate = rate
            if self.verbose:
                print(f"DropRateSchedule: step {step}, rate {rate:.6g}")
            self._current = rate

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._current is not None:
            logs["drop_rate"] = self._current
