"""Keras callbacks that run the diagnostics every N steps during `fit`."""

import math

import keras
import numpy as np
import tensorflow as tf

from tfnorm.diagnostics import _common
from tfnorm.diagnostics.ics import check_unroll
from tfnorm.diagnostics.ics import internal_covariate_shift
from tfnorm.diagnostics.landscape import DEFAULT_STEP_SIZES
from tfnorm.diagnostics.landscape import check_step_sizes
from tfnorm.diagnostics.landscape import loss_landscape
from tfnorm.diagnostics.layer_stats import layer_statistics


class _Batches:
    """The probe batch: a fixed tuple, or the next one from an iterable.

    A tuple is one batch `(x, y)` (or `(x, y, sample_weight)`, or `(x,)`);
    anything else is iterated batch by batch and iterated anew once it
    runs out, so a `tf.data.Dataset` or a list of batches works.
    """

    def __init__(self, data):
        if data is None:
            raise ValueError(
                "Argument `data` must be a batch `(x, y)` or an iterable of "
                "batches to probe on. Received: data=None"
            )
        self.data = data
        self._iterator = None

    def skip(self, count):
        """Draws `count` batches unused (cycling as `next` does)."""
        if isinstance(self.data, tuple):
            return
        for _ in range(count):
            self.next()

    def next(self):
        if isinstance(self.data, tuple):
            return self.data
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.data)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        raise ValueError(
            "Argument `data` yielded no batch to probe on. "
            f"Received: data={self.data!r}"
        )


class _ProbeCallback(keras.callbacks.Callback):
    """Runs a probe every `period` optimizer steps and logs its scalars.

    The step is the optimizer's iteration count after the training step,
    so probes land on steps `period, 2 * period, ...` across epochs, also
    with `steps_per_execution > 1` (then on the first step boundary past
    each multiple). The probe at step `k * period` draws the k-th batch
    of an iterable `data` (cycled): a fit that starts at step `s` (a run
    resumed from a checkpoint) first skips the `s // period` batches the
    earlier probes drew, so it probes what an uninterrupted run would.
    """

    def __init__(self, data, period, log_dir):
        super().__init__()
        self.period = _common.check_period(period)
        self.log_dir = log_dir
        self.history = []
        self._batches = _Batches(data)
        self._writer = None
        self._last_step = 0

    def on_train_begin(self, logs=None):
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        self._last_step = self._step()
        if self._last_step and not self.history:
            self.resume(self._last_step)

    def resume(self, step):
        """Catches up with the probes due before `step`, unlogged."""
        self._batches.skip(len(self._probe_steps(step)))

    def _probe_steps(self, step):
        """The steps up to `step` an uninterrupted fit probed at.

        Such a fit sees the step only at the end of each execution of
        `steps_per_execution` steps: with 4 per execution and a period of
        2 it probes at steps 4 and 8, not at 2, 4, 6 and 8. (An epoch that
        ends inside an execution shifts the boundaries; not modelled.)
        """
        per_call = int(getattr(self.model, "steps_per_execution", 1) or 1)
        return [
            end
            for end in range(per_call, step + 1, per_call)
            if end // self.period > (end - per_call) // self.period
        ]

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _step(self):
        return int(np.asarray(self.model.optimizer.iterations))

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        if step // self.period <= self._last_step // self.period:
            return
        self._last_step = step
        result = self.probe(self._batches.next())
        self.history.append((step, result))
        scalars = list(self.scalars(result))
        histograms = list(self.histograms(result))
        if self._writer is not None:
            with self._writer.as_default():
                self._write(scalars, histograms, step)
            self._writer.flush()
        else:
            # Without a log dir, the default writer the caller set (if any)
            # receives them; with none, tf.summary writes nothing.
            self._write(scalars, histograms, step)

    @staticmethod
    def _write(scalars, histograms, step):
        for tag, value in scalars:
            if value is not None and math.isfinite(value):
                tf.summary.scalar(tag, value, step=step)
        for tag, values in histograms:
            # A probe on diverged weights gives non-finite entries, which
            # a histogram cannot bin.
            values = np.asarray(values, np.float64).ravel()
            values = values[np.isfinite(values)]
            if values.size:
                tf.summary.histogram(tag, values, step=step)

    def probe(self, data):
        raise NotImplementedError

    def scalars(self, result):
        raise NotImplementedError

    def histograms(self, result):
        """`(tag, values)` pairs to log as histograms; none by default."""
        return ()


class InternalCovariateShiftCallback(_ProbeCallback):
    """Logs `internal_covariate_shift` every `period` training steps.

    Writes `diagnostics/ics/<layer>/l2`, `.../relative` and `.../cosine`
    for every probed layer, with the optimizer step as the step, and keeps
    `(step, result)` pairs in `history`. See
    `tfnorm.diagnostics.internal_covariate_shift` for the quantities; the
    probe leaves the training state untouched.

    Args:
        data: The batch to probe, `(x, y)`, or an iterable of batches (a
            `tf.data.Dataset`, a list), drawn one per probe and restarted
            when it runs out.
        period: Positive integer, probe every `period` optimizer steps.
        learning_rate: SGD step of the preceding layers; default: the
            optimizer's current learning rate at each probe.
        loss: Loss callable or name; default: the compiled loss.
        layers: Optional names of the kernel layers to probe.
        log_dir: Directory for a TensorBoard writer of its own; default:
            write to the default summary writer set by the caller, if any.
        unroll: Unroll the probe over the layers (faster per probe) or
            loop over them (faster to compile for deep models); default
            None unrolls up to 8 layers with preceding layers.

    Reference:
        - [Santurkar et al., 2018](https://arxiv.org/abs/1805.11604)

    Example:

    >>> import keras, numpy as np, tfnorm
    >>> x, y = np.ones((32, 4), "float32"), np.zeros((32, 1), "float32")
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> ics = tfnorm.diagnostics.InternalCovariateShiftCallback(
    ...     (x[:16], y[:16]), period=2)
    >>> _ = model.fit(x, y, batch_size=8, verbose=0, callbacks=[ics])
    >>> [step for step, _ in ics.history]
    [2, 4]
    """

    def __init__(
        self,
        data,
        period=25,
        learning_rate=None,
        loss=None,
        layers=None,
        log_dir=None,
        unroll=None,
    ):
        super().__init__(data, period, log_dir)
        if learning_rate is not None:
            _common.check_positive("learning_rate", learning_rate)
        check_unroll(unroll)
        self.learning_rate = learning_rate
        self.loss = loss
        self.layers = layers
        self.unroll = unroll

    def probe(self, data):
        x, y = _common.unpack(data)
        return internal_covariate_shift(
            self.model,
            x,
            y,
            learning_rate=self.learning_rate,
            loss=self.loss,
            layers=self.layers,
            unroll=self.unroll,
        )

    def scalars(self, result):
        for name, values in result.items():
            for key in ("l2", "relative", "cosine"):
                yield f"diagnostics/ics/{name}/{key}", values[key]


class LossLandscapeCallback(_ProbeCallback):
    """Logs `loss_landscape` every `period` training steps.

    Writes `diagnostics/landscape/loss_min`, `loss_max`, `loss_range`,
    `grad_change_min`, `grad_change_max`, `beta_smoothness` and `loss`
    under that prefix, and keeps `(step, result)` pairs in `history`. See
    `tfnorm.diagnostics.loss_landscape`; the probe leaves the training
    state untouched.

    Args:
        data: The batch to probe, `(x, y)`, or an iterable of batches.
        period: Positive integer, probe every `period` optimizer steps.
        step_sizes: Positive step sizes (default: 8 points in
            [0.05, 0.4]).
        loss: Loss callable or name; default: the compiled loss.
        log_dir: Directory for a TensorBoard writer of its own; default:
            the caller's default summary writer, if any.

    Reference:
        - [Santurkar et al., 2018](https://arxiv.org/abs/1805.11604)

    Example:

    >>> import keras, numpy as np, tfnorm
    >>> x, y = np.ones((32, 4), "float32"), np.zeros((32, 1), "float32")
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> probe = tfnorm.diagnostics.LossLandscapeCallback(
    ...     (x, y), period=4, step_sizes=[0.1, 0.4])
    >>> _ = model.fit(x, y, batch_size=8, verbose=0, callbacks=[probe])
    >>> len(probe.history)
    1
    """

    def __init__(
        self,
        data,
        period=25,
        step_sizes=DEFAULT_STEP_SIZES,
        loss=None,
        log_dir=None,
    ):
        super().__init__(data, period, log_dir)
        self.step_sizes = check_step_sizes(step_sizes)
        self.loss = loss

    def probe(self, data):
        x, y = _common.unpack(data)
        return loss_landscape(
            self.model, x, y, step_sizes=self.step_sizes, loss=self.loss
        )

    def scalars(self, result):
        prefix = "diagnostics/landscape"
        for key in (
            "loss",
            "loss_min",
            "loss_max",
            "grad_change_min",
            "grad_change_max",
            "beta_smoothness",
        ):
            yield f"{prefix}/{key}", result[key]
        yield f"{prefix}/loss_range", result["loss_max"] - result["loss_min"]


class LayerStatisticsCallback(_ProbeCallback):
    """Logs `layer_statistics` every `period` training steps.

    Writes `diagnostics/layers/<layer>/<key>` for every float of the
    result (means, stds, drifts since the previous probe, BN moving
    statistics, renorm r, d and clipped fractions, dropout rates) as a
    scalar, and every per-unit array (the units' input and output means
    and stds, renorm `r` and `d`) as a histogram over the units under
    `diagnostics/layers/<layer>/per_unit/<key>`, and
    keeps `(step, result)` pairs in `history`. See
    `tfnorm.diagnostics.layer_statistics`; the probe leaves the training
    state untouched. With a fixed batch the drift measures how the
    network changed; with an iterable it also includes batch noise.

    Args:
        data: The input batch `x`, a tuple `(x, ...)`, or an iterable of
            batches.
        period: Positive integer, probe every `period` optimizer steps.
        layers: Optional names of the layers to report.
        log_dir: Directory for a TensorBoard writer of its own; default:
            the caller's default summary writer, if any.

    Reference:
        - [Santurkar et al., 2018](https://arxiv.org/abs/1805.11604)

    Example:

    >>> import keras, numpy as np, tfnorm
    >>> x = np.random.rand(32, 4).astype("float32")
    >>> model = keras.Sequential([keras.Input((4,)),
    ...                           keras.layers.Dense(8, name="hidden"),
    ...                           tfnorm.BatchNormalization(),
    ...                           keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> stats = tfnorm.diagnostics.LayerStatisticsCallback(x, period=2)
    >>> _ = model.fit(x, x[:, :1], batch_size=8, verbose=0,
    ...               callbacks=[stats])
    >>> "input_mean_drift" in stats.history[-1][1]["hidden"]
    True
    """

    def __init__(self, data, period=25, layers=None, log_dir=None):
        if isinstance(data, (np.ndarray, tf.Tensor, dict)):
            # One array (or a dict of them, for a model with named
            # inputs) is the batch itself, not an iterable of rows.
            data = (data,)
        super().__init__(data, period, log_dir)
        self.layers = layers
        self._previous = None

    def probe(self, data):
        x, _ = _common.unpack(data)
        result = layer_statistics(
            self.model, x, previous=self._previous, layers=self.layers
        )
        self._previous = result
        return result

    def resume(self, step):
        # The drift of the next probe is measured from the previous one.
        # When `step` is itself a probing step, that probe saw exactly
        # these weights and this batch: repeat it to get its result.
        # Otherwise it is lost, and the next probe has no drift.
        done = self._probe_steps(step)
        if done and done[-1] == step:
            self._batches.skip(len(done) - 1)
            self.probe(self._batches.next())
        else:
            self._batches.skip(len(done))

    def scalars(self, result):
        for name, values in result.items():
            for key, value in values.items():
                if isinstance(value, float):
                    yield f"diagnostics/layers/{name}/{key}", value

    def histograms(self, result):
        for name, values in result.items():
            for key, value in values.get("per_unit", {}).items():
                yield f"diagnostics/layers/{name}/per_unit/{key}", value
