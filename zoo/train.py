"""One training path for every experiment, and the grid runner around it.

`run_grid` trains each (variant, seed) of an experiment that has no
finished run folder yet. `train_run` trains one: it asks `zoo.data` for
the pipelines and `zoo.models` for the network, fits it with callbacks
that write `metrics.jsonl` and TensorBoard events, and records the
outcome, `completed` or `diverged` at a step, in `result.json`.

A run folder is written under a temporary name and renamed into place
only once complete, so a folder with `result.json` under its final name
is always a finished run and an interrupted grid can be rerun safely.
"""

import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

import tfnorm
from zoo import data
from zoo import models

RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
COMMAND_FILE = "command.txt"
PARTIAL_SUFFIX = ".partial"

# Pre-activation histograms are computed on this many fixed validation
# examples: enough for a smooth histogram, cheap at a low rate.
PROBE_EXAMPLES = 256


def run_dir_for(exp_dir, variant, seed):
    return Path(exp_dir) / variant / f"seed_{seed}"


def is_finished(run_dir):
    return (Path(run_dir) / RESULT_FILE).is_file()


class RunLogger(keras.callbacks.Callback):
    """Writes scalars, histograms and the outcome of one run.

    Keras reports the training loss and accuracy as running means since
    the start of the epoch; the logger recovers the mean over each logging
    window from two running means (with equal batch sizes,
    `k * mean_k - j * mean_j` is the sum over batches j+1..k), so the
    curves show the current window rather than a smoothed epoch.

    It also stops training after `total_steps` steps, and at the first
    non-finite loss, which it records as a divergence at that step.
    """

    def __init__(
        self,
        writer,
        metrics_file,
        total_steps,
        log_every,
        histogram_every,
        probe=None,
        probe_inputs=None,
        on_step=None,
    ):
        super().__init__()
        self.writer = writer
        self.metrics_file = metrics_file
        self.total_steps = total_steps
        self.log_every = log_every
        self.histogram_every = histogram_every
        self.probe = probe
        self.probe_inputs = probe_inputs
        self.on_step = on_step
        self.step = 0
        self.diverged_at = None
        self.last_val = {}
        self._window_start = (0, 0.0, 0.0)
        self._window_ms = []

    def _record(self, step, scalars):
        """Writes `{tag: value}` to metrics.jsonl and TensorBoard."""
        line = {"step": step}
        line.update({tag: float(value) for tag, value in scalars.items()})
        self.metrics_file.write(json.dumps(line) + "\n")
        self.metrics_file.flush()
        with self.writer.as_default(step=step):
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value)

    def _histograms(self):
        if self.probe is None:
            return
        # Inference mode: the probe must not update BN's moving statistics
        # or draw noise; it shows what the network computes at test time.
        outputs = self.probe(self.probe_inputs, training=False)
        with self.writer.as_default(step=self.step):
            for name, values in outputs.items():
                tf.summary.histogram(f"preactivations/{name}", values)

    def on_train_begin(self, logs=None):
        self._histograms()

    def on_epoch_begin(self, epoch, logs=None):
        # Keras resets its running means at every epoch.
        self._window_start = (0, 0.0, 0.0)

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        self._window_ms.append(1e3 * (time.perf_counter() - self._batch_start))
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            self.diverged_at = self.step
            self.metrics_file.write(
                json.dumps({"step": self.step, "event": "diverged"}) + "\n"
            )
            self.model.stop_training = True
            return
        last = self.step >= self.total_steps
        if self.step % self.log_every == 0 or last:
            count = batch + 1
            accuracy = float(logs["accuracy"])
            start, start_loss, start_acc = self._window_start
            window = count - start
            lr = self.model.optimizer.learning_rate
            self._record(
                self.step,
                {
                    "train/loss": (count * loss - start * start_loss) / window,
                    "train/accuracy": (count * accuracy - start * start_acc)
                    / window,
                    "lr": float(keras.ops.convert_to_numpy(lr)),
                    "time/step_ms": float(np.mean(self._window_ms)),
                },
            )
            self._window_start = (count, loss, accuracy)
            self._window_ms = []
            if self.on_step is not None:
                self.on_step(self.step)
        if self.step % self.histogram_every == 0 or last:
            self._histograms()
        if last:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        # Keras validates after the epoch even when training was stopped
        # mid-epoch; after a divergence the weights are not finite and the
        # numbers mean nothing.
        if self.diverged_at is not None or "val_loss" not in logs:
            return
        self.last_val = {
            "loss": float(logs["val_loss"]),
            "accuracy": float(logs["val_accuracy"]),
        }
        self._record(
            self.step,
            {f"val/{key}": value for key, value in self.last_val.items()},
        )


def _hparams(experiment, variant, seed):
    """The values the HPARAMS tab shows for one run."""
    return {
        "variant": variant,
        "seed": seed,
        "learning_rate": experiment.learning_rate,
        "batch_size": experiment.batch_size,
        "steps": experiment.steps,
        "dataset": experiment.dataset,
    }


def write_hparams_config(exp_dir, experiment):
    """Declares the hparams and metrics for TensorBoard's HPARAMS tab.

    Written to the experiment folder itself; earlier declarations there are
    replaced so that the tab never shows two.
    """
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    for old in exp_dir.glob("events.out.tfevents.*"):
        old.unlink()
    hparams = [
        hp.HParam("variant"),
        hp.HParam("seed"),
        hp.HParam("learning_rate"),
        hp.HParam("batch_size"),
        hp.HParam("steps"),
        hp.HParam("dataset"),
    ]
    metrics = [
        hp.Metric("val/accuracy", display_name="val accuracy"),
        hp.Metric("val/loss", display_name="val loss"),
        hp.Metric("train/loss", display_name="train loss"),
        hp.Metric("outcome/diverged", display_name="diverged"),
    ]
    writer = tf.summary.create_file_writer(str(exp_dir))
    with writer.as_default():
        hp.hparams_config(hparams=hparams, metrics=metrics)
    writer.close()


def train_run(experiment, variant, seed, run_dir, command=None, on_step=None):
    """Trains one (variant, seed) run into `run_dir`; returns its result.

    The folder is built as `<run_dir>.partial` and renamed to `run_dir` once
    `result.json` is written. A leftover partial folder from an interrupted
    run is discarded first.
    """
    run_dir = Path(run_dir)
    partial = run_dir.with_name(run_dir.name + PARTIAL_SUFFIX)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    config = experiment.run_config(variant, seed)
    (partial / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if command is None:
        command = shlex.join(sys.argv)
    (partial / COMMAND_FILE).write_text(command + "\n")

    split = data.load(experiment.dataset)
    # Each run starts from a clean Keras state, so a long grid does not
    # accumulate the graphs of the runs before it.
    keras.backend.clear_session()
    # Seed after loading: MNIST-1D's generator reseeds the global RNGs.
    keras.utils.set_random_seed(seed)
    train_ds, val_ds = data.pipelines(split, experiment.batch_size, seed)
    model = models.build_mlp(
        split.input_shape,
        split.num_classes,
        variant=variant,
        hidden_units=experiment.hidden_units,
        activation=experiment.activation,
        virtual_batch_size=experiment.virtual_batch_size,
        dropout_rate=experiment.dropout_rate,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(experiment.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        # XLA gave no speed-up for these small MLPs on CPU and adds a
        # compile pause to every run.
        jit_compile=False,
    )

    steps = experiment.steps
    writer = tf.summary.create_file_writer(str(partial))
    started = time.time()
    with open(partial / METRICS_FILE, "w") as metrics_file:
        logger = RunLogger(
            writer,
            metrics_file,
            total_steps=steps,
            log_every=experiment.log_every,
            histogram_every=experiment.histogram_every,
            probe=models.preactivation_model(model),
            probe_inputs=split.x_val[:PROBE_EXAMPLES],
            on_step=on_step,
        )
        callbacks = [logger]
        if models.uses_renorm(variant):
            callbacks.append(
                tfnorm.callbacks.RenormClippingSchedule(
                    warmup_steps=round(steps * experiment.renorm_warmup),
                    ramp_steps=round(steps * experiment.renorm_ramp),
                )
            )
        # The run's writer is the default one during fit so that the
        # renorm schedule records its clipping bounds next to the rest.
        with writer.as_default():
            model.fit(
                train_ds,
                epochs=math.ceil(steps / experiment.eval_every),
                steps_per_epoch=experiment.eval_every,
                validation_data=val_ds,
                callbacks=callbacks,
                # The pipeline already reshuffles with the run's seed.
                shuffle=False,
                verbose=0,
            )
    wall_s = time.time() - started

    result = {
        "variant": variant,
        "seed": seed,
        "status": "completed" if logger.diverged_at is None else "diverged",
        "diverged_at": logger.diverged_at,
        "steps_run": logger.step,
        "final_val_accuracy": logger.last_val.get("accuracy"),
        "final_val_loss": logger.last_val.get("loss"),
        "wall_s": round(wall_s, 3),
    }
    with writer.as_default(step=logger.step):
        tf.summary.scalar(
            "outcome/diverged", float(logger.diverged_at is not None)
        )
        hp.hparams(
            _hparams(experiment, variant, seed),
            trial_id=f"{variant}/seed_{seed}",
            start_time_secs=started,
        )
    writer.close()
    (partial / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, run_dir)
    return result


def check_compatible(run_dir, experiment, variant, seed):
    """Refuses to mix runs of different configs in one experiment folder."""
    saved = json.loads((Path(run_dir) / CONFIG_FILE).read_text())
    wanted = experiment.run_config(variant, seed)
    changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
    if changed:
        details = ", ".join(
            f"{k}={saved.get(k)!r} there, {wanted[k]!r} now" for k in changed
        )
        raise ValueError(
            f"{run_dir} holds a finished run with a different configuration "
            f"({details}). Pick another --logdir, or delete that folder to "
            "rerun it."
        )


def grid(experiment):
    """The (variant, seed) pairs of an experiment, seed by seed.

    Seed-major order means an interrupted grid already has one seed of
    every variant to compare.
    """
    return [
        (variant, seed)
        for seed in range(experiment.seeds)
        for variant in experiment.variants
    ]


def run_grid(experiment, logdir, console=None, command=None, after_run=None):
    """Trains every (variant, seed) of `experiment` not yet finished.

    Finished runs under `logdir/<experiment folder>` are kept as they are,
    so rerunning the same command after an interruption only trains the
    missing ones. A diverged run counts as finished: divergence is a result.

    Args:
        experiment: An `Experiment`.
        logdir: Root folder of all experiments.
        console: A `rich.console.Console` for progress; a default one if
            None.
        command: The command line to record in each run folder.
        after_run: Optional `after_run(result)` hook, called after each
            newly finished run.

    Returns:
        `(exp_dir, trained, skipped)`: the experiment folder and the
        numbers of runs trained now and found already finished.
    """
    from rich.console import Console
    from rich.progress import BarColumn
    from rich.progress import MofNCompleteColumn
    from rich.progress import Progress
    from rich.progress import TextColumn
    from rich.progress import TimeElapsedColumn
    from rich.progress import TimeRemainingColumn

    console = console or Console()
    exp_dir = Path(logdir) / experiment.folder
    runs = grid(experiment)
    todo = []
    for variant, seed in runs:
        run_dir = run_dir_for(exp_dir, variant, seed)
        if is_finished(run_dir):
            check_compatible(run_dir, experiment, variant, seed)
        else:
            todo.append((variant, seed))
    skipped = len(runs) - len(todo)
    write_hparams_config(exp_dir, experiment)
    if not todo:
        console.print(f"All {len(runs)} runs already finished in {exp_dir}.")
        return exp_dir, 0, skipped
    if skipped:
        console.print(
            f"{skipped} of {len(runs)} runs already finished in {exp_dir}; "
            f"training the remaining {len(todo)}."
        )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        # Runs take seconds each; estimate from all of them, not the
        # default last 30 s.
        speed_estimate_period=3600,
    )
    with progress:
        overall = progress.add_task("grid", total=len(todo))
        steps = progress.add_task("steps", total=experiment.steps)
        for i, (variant, seed) in enumerate(todo, start=1):
            index = skipped + i
            progress.update(
                overall,
                description=f"run {index}/{len(runs)}: {variant} seed {seed}",
            )
            progress.reset(steps, total=experiment.steps)
            result = train_run(
                experiment,
                variant,
                seed,
                run_dir_for(exp_dir, variant, seed),
                command=command,
                on_step=lambda step: progress.update(steps, completed=step),
            )
            progress.advance(overall)
            if result["status"] == "diverged":
                outcome = f"diverged at step {result['diverged_at']}"
            else:
                outcome = f"val accuracy {result['final_val_accuracy']:.3f}"
            console.print(
                f"run {index}/{len(runs)} {variant} seed {seed}: {outcome} "
                f"({result['wall_s']:.1f} s)"
            )
            if after_run is not None:
                after_run(result)
    return exp_dir, len(todo), skipped
