"""One training path for every experiment, and the grid runner around it.

`run_grid` trains each (variant, seed) of an experiment that has no
finished run folder yet. `train_run` trains one: it asks `zoo.data` for
the pipelines and `zoo.models` for the network, fits it with callbacks
that write `metrics.jsonl` and TensorBoard events, and records the
outcome, `completed` or `diverged` at a step, in `result.json`.

A run folder is written under a temporary name and renamed into place
only once complete, so a folder with `result.json` under its final name
is always a finished run and an interrupted grid can be rerun safely.
While it trains, the temporary folder holds a checkpoint written at every
evaluation (weights, optimizer state, random-generator states, the
logger's position); a run killed mid-way and started again with the same
command continues from there and ends with the metrics an uninterrupted
run would have (the data order and augmentation are functions of the
step, see `zoo.data.train_dataset`).

Runs train under a `tf.distribute` strategy (`get_strategy`), in mixed
precision and with XLA when the experiment asks for them.
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
from zoo import experiments
from zoo import models
from zoo import report

RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
COMMAND_FILE = "command.txt"
PARTIAL_SUFFIX = ".partial"
CHECKPOINT_FILE = "checkpoint.npz"

# Pre-activation histograms are computed on this many fixed validation
# examples: enough for a smooth histogram, cheap at a low rate; and on at
# most this many activations, evenly spaced through the network.
PROBE_EXAMPLES = 256
PROBE_LAYERS = 16
HISTOGRAM_VALUES = 65_536


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
                values = tf.reshape(values, [-1])
                # TensorBoard's bucketing costs seconds on a conv map of
                # millions of values; an even stride keeps the shape.
                stride = -(-int(values.shape[0]) // HISTOGRAM_VALUES)
                tf.summary.histogram(f"preactivations/{name}", values[::stride])

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


def _hparams(experiment, arm, seed):
    """The values the HPARAMS tab shows for one run."""
    return {
        "variant": arm.variant,
        "seed": seed,
        "learning_rate": arm.learning_rate,
        "batch_size": experiment.batch_size,
        "steps": experiment.steps,
        "dataset": experiment.dataset,
        "model": experiment.model,
        "precision": experiment.precision,
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
        hp.HParam(name)
        for name in (
            "variant",
            "seed",
            "learning_rate",
            "batch_size",
            "steps",
            "dataset",
            "model",
            "precision",
        )
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


# One strategy object per name and process: MultiWorkerMirroredStrategy
# and TPU initialization may happen only once, before any other op.
_STRATEGIES = {}


def get_strategy(name="default"):
    """The `tf.distribute` strategy for `name`, created once per process.

    - `default`: no distribution; one device (a GPU if there is one).
    - `mirrored`: `MirroredStrategy` over every local GPU, or over every
      logical CPU device when there is none (as the tests configure).
    - `multiworker`: `MultiWorkerMirroredStrategy`; the cluster and this
      process's task come from the `TF_CONFIG` environment variable.
    - `tpu`: `TPUStrategy` on the TPU that `TPUClusterResolver` finds
      (`TPU_NAME`, or the local TPU VM's own).

    Raises:
        ValueError: for `multiworker` without `TF_CONFIG`, or `tpu` when
            no TPU can be reached.
    """
    if name in _STRATEGIES:
        return _STRATEGIES[name]
    if name not in experiments.STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}. "
            f"Valid: {', '.join(experiments.STRATEGIES)}."
        )
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or (
            tf.config.list_logical_devices("CPU")
        )
        strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    elif name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "--strategy multiworker needs the TF_CONFIG environment "
                "variable on every worker, for example TF_CONFIG='"
                '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}}\'.'
            )
        from zoo import multiworker

        multiworker.apply()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
                tpu=os.environ.get("TPU_NAME", "local")
            )
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as error:
            raise ValueError(
                f"--strategy tpu found no TPU ({error}). Run on a TPU VM, "
                "or set TPU_NAME to the TPU's name or grpc:// address."
            ) from error
        strategy = tf.distribute.TPUStrategy(resolver)
    _STRATEGIES[name] = strategy
    return strategy


def worker_role(strategy):
    """`(is_chief, task_id)` of this process in a multi-worker cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None) or 0
    if task_type is None or isinstance(strategy, tf.distribute.TPUStrategy):
        return True, 0
    cluster = resolver.cluster_spec().as_dict()
    if "chief" in cluster:
        return task_type == "chief", task_id
    return task_type == "worker" and task_id == 0, task_id


def _schedule(experiment, learning_rate):
    """The learning rate: scaled for the batch, then decayed in steps."""
    lr = learning_rate * experiment.lr_factor()
    if not experiment.lr_boundaries:
        return lr
    boundaries = [round(f * experiment.steps) for f in experiment.lr_boundaries]
    values = [lr * experiment.lr_decay**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def _weights_checksum(model):
    """Sum of |w| over the weights: equal on agreeing workers.

    None for a diverged run's non-finite weights: NaN is not JSON, and
    strict parsers reject result.json files that hold it.
    """
    total = float(
        sum(np.abs(keras.ops.convert_to_numpy(w)).sum() for w in model.weights)
    )
    return total if np.isfinite(total) else None


def _state_variables(model):
    # Every layer variable (random-generator states included) and every
    # optimizer variable (iterations, momenta, loss scale): what a
    # resumed run needs to continue exactly.
    return list(model.variables) + list(model.optimizer.variables)


def save_checkpoint(path, model, meta):
    """Writes the run's state and `meta` atomically to `path` (.npz)."""
    arrays = {
        f"v{i}": np.asarray(keras.ops.convert_to_numpy(v))
        for i, v in enumerate(_state_variables(model))
    }
    partial = Path(path).with_name(Path(path).name + PARTIAL_SUFFIX)
    with open(partial, "wb") as file:
        np.savez(file, meta=np.array(json.dumps(meta)), **arrays)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


def load_checkpoint(path, model):
    """Restores the state saved by `save_checkpoint`; returns its meta."""
    with np.load(path) as saved:
        meta = json.loads(str(saved["meta"]))
        variables = _state_variables(model)
        if len(saved.files) - 1 != len(variables):
            raise ValueError(
                f"{path} holds {len(saved.files) - 1} variables; the model "
                f"and optimizer have {len(variables)}."
            )
        for i, variable in enumerate(variables):
            variable.assign(saved[f"v{i}"])
    return meta


class Checkpointer(keras.callbacks.Callback):
    """Saves a resumable checkpoint after each evaluation.

    It must come after the `RunLogger` in the callback list, so that the
    checkpoint includes the validation line just written.
    """

    def __init__(self, path, logger, metrics_file, clock):
        super().__init__()
        self.path = path
        self.logger = logger
        self.metrics_file = metrics_file
        self.clock = clock

    def on_epoch_end(self, epoch, logs=None):
        logger = self.logger
        if logger.diverged_at is not None or logger.step >= logger.total_steps:
            return
        save_checkpoint(
            self.path,
            self.model,
            {
                "epoch": epoch + 1,
                "step": logger.step,
                "last_val": logger.last_val,
                "metrics_bytes": self.metrics_file.tell(),
                "wall_s": self.clock(),
            },
        )


def _partial_dir(run_dir, config):
    """The run's temporary folder, kept if it can resume, else emptied.

    A checkpoint is only reused by the same configuration; anything else
    (an interrupted run of another config, a folder without checkpoint)
    is discarded.
    """
    partial = run_dir.with_name(run_dir.name + PARTIAL_SUFFIX)
    if (partial / CHECKPOINT_FILE).is_file():
        try:
            saved = json.loads((partial / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            saved = None
        if saved == config:
            return partial, True
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial, False


def build_model(experiment, split, variant):
    """The experiment's network for `variant`, uncompiled."""
    return models.build(
        experiment.model,
        split.input_shape,
        split.num_classes,
        variant,
        hidden_units=experiment.hidden_units,
        activation=experiment.activation,
        width=experiment.width,
        shortcut=experiment.shortcut,
        virtual_batch_size=experiment.virtual_batch_size,
        dropout_rate=experiment.dropout_rate,
        dropblock_size=experiment.dropblock_size,
        groups=experiment.groups,
        synchronized=experiment.synchronized,
        weight_decay=experiment.weight_decay,
        dropout_layer=experiment.dropout_layer,
        dropout_blocks=experiment.dropout_blocks,
    )


def preflight(experiment, variants, data_dir=None):
    """Checks that every run of a grid can start, before any trains.

    Loads the data (a tfds set that cannot be had fails here), checks the
    batch size against it and builds each variant's network once, so a
    variant the model has no place for is refused before the grid's
    first run rather than after its earlier ones.

    Raises:
        ValueError: for a batch or a variant that cannot run.
        data.DataUnavailableError: for a dataset that cannot be had.
    """
    split = data.load(experiment.dataset, data_dir)
    data.check_batch_size(split, experiment.batch_size)
    for variant in dict.fromkeys(variants):
        keras.backend.clear_session()
        build_model(experiment, split, variant)
    keras.backend.clear_session()


def train_run(
    experiment,
    variant,
    seed,
    run_dir,
    command=None,
    on_step=None,
    learning_rate=None,
    label=None,
    data_dir=None,
    callbacks=(),
):
    """Trains one run into `run_dir`; returns its result.

    The folder is built as `<run_dir>.partial` and renamed to `run_dir` once
    `result.json` is written. A leftover partial folder with a checkpoint
    of the same configuration is resumed from it; any other is discarded
    first.

    Args:
        experiment: An `Experiment`.
        variant: A variant name of the registry.
        seed: The run's seed.
        run_dir: The run's final folder.
        command: The command line to record; `sys.argv` if None.
        on_step: Optional `on_step(step)` hook at each logging step.
        learning_rate: The arm's learning rate, before batch scaling;
            the experiment's if None.
        label: The arm's label (folder and report row); `variant` if
            None.
        data_dir: Folder of prepared tfds data.
        callbacks: More Keras callbacks for `fit`, for example tfnorm's
            diagnostics; they run after the zoo's own logger.
    """
    run_dir = Path(run_dir)
    learning_rate = (
        experiment.learning_rate if learning_rate is None else learning_rate
    )
    config = experiment.run_config(variant, seed, learning_rate, label)
    partial, resuming = _partial_dir(run_dir, config)
    if not resuming:
        (partial / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if command is None:
        command = shlex.join(sys.argv)
    (partial / COMMAND_FILE).write_text(command + "\n")

    split = data.load(experiment.dataset, data_dir)
    strategy = get_strategy(experiment.strategy)
    replicas = strategy.num_replicas_in_sync
    per_replica = experiment.batch_size // replicas
    if experiment.batch_size % replicas or (
        models.VARIANTS[variant].norm == "ghost"
        and per_replica % experiment.virtual_batch_size
    ):
        raise ValueError(
            f"batch_size={experiment.batch_size} over {replicas} replicas "
            f"gives {experiment.batch_size / replicas:g} examples per "
            "replica, which must be a whole number"
            + (
                f" and a multiple of virtual_batch_size="
                f"{experiment.virtual_batch_size}."
                if models.VARIANTS[variant].norm == "ghost"
                else "."
            )
        )
    # Each run starts from a clean Keras state, so a long grid does not
    # accumulate the graphs of the runs before it.
    keras.backend.clear_session()
    # Seed after loading: MNIST-1D's generator reseeds the global RNGs.
    keras.utils.set_random_seed(seed)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(experiment.precision)
    try:
        with strategy.scope():
            model = build_model(experiment, split, variant)
            model.compile(
                optimizer=keras.optimizers.SGD(
                    _schedule(experiment, learning_rate),
                    momentum=experiment.momentum,
                    nesterov=experiment.nesterov,
                ),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                ),
                metrics=["accuracy"],
                # Off by default: XLA gave no speed-up for the small MLPs
                # on CPU and adds a compile pause to every run.
                jit_compile=experiment.jit,
            )
            # Built now rather than at the first step, so that a
            # checkpoint can fill its variables.
            model.optimizer.build(model.trainable_variables)
        meta = None
        if resuming:
            meta = load_checkpoint(partial / CHECKPOINT_FILE, model)
        return _fit(
            experiment,
            model,
            split,
            strategy,
            seed,
            meta,
            partial,
            run_dir,
            config,
            on_step,
            callbacks,
        )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _train_input(experiment, split, strategy, seed, start_step):
    options = dict(
        batch_size=experiment.batch_size,
        seed=seed,
        start_step=start_step,
        augment=experiment.augment,
        normalize=experiment.normalize,
        sampling=experiment.batch_sampling,
    )
    if experiment.strategy == "default":
        return data.train_dataset(split, **options)

    def per_worker(context):
        return data.train_dataset(
            split,
            num_pipelines=context.num_input_pipelines,
            pipeline_id=context.input_pipeline_id,
            replicas_per_pipeline=(
                strategy.num_replicas_in_sync // context.num_input_pipelines
            ),
            **options,
        )

    # Each worker builds its own pipeline of per-replica slices.
    return strategy.distribute_datasets_from_function(
        per_worker,
        tf.distribute.InputOptions(experimental_fetch_to_device=True),
    )


def _fit(
    experiment,
    model,
    split,
    strategy,
    seed,
    meta,
    partial,
    run_dir,
    config,
    on_step,
    extra_callbacks,
):
    arm = experiments.Arm(
        config["arm"], config["variant"], config["learning_rate"]
    )
    start_epoch = meta["epoch"] if meta else 0
    start_step = meta["step"] if meta else 0
    train_ds = _train_input(experiment, split, strategy, seed, start_step)
    val_ds = data.val_dataset(
        split, experiment.normalize, experiment.val_batch_size
    )

    steps = experiment.steps
    writer = tf.summary.create_file_writer(str(partial))
    started = time.time()
    earlier_s = meta["wall_s"] if meta else 0.0

    def clock():
        return earlier_s + time.time() - started

    mode = "r+" if meta else "w"
    with open(partial / METRICS_FILE, mode) as metrics_file:
        if meta:
            # Lines written after the checkpoint are written again.
            metrics_file.truncate(meta["metrics_bytes"])
            metrics_file.seek(meta["metrics_bytes"])
        # TPU models cannot be called eagerly on the host for the probe.
        probe = None
        if experiment.strategy != "tpu":
            probe = models.preactivation_model(model, PROBE_LAYERS)
        logger = RunLogger(
            writer,
            metrics_file,
            total_steps=steps,
            log_every=experiment.log_every,
            histogram_every=experiment.histogram_every,
            probe=probe,
            probe_inputs=split.model_inputs(
                split.x_val[:PROBE_EXAMPLES], experiment.normalize
            ),
            on_step=on_step,
        )
        if meta:
            logger.step = meta["step"]
            logger.last_val = meta["last_val"]
        callbacks = [logger]
        if models.uses_renorm(arm.variant):
            callbacks.append(
                tfnorm.callbacks.RenormClippingSchedule(
                    warmup_steps=round(steps * experiment.renorm_warmup),
                    ramp_steps=round(steps * experiment.renorm_ramp),
                )
            )
        callbacks.extend(extra_callbacks)
        callbacks.append(
            Checkpointer(partial / CHECKPOINT_FILE, logger, metrics_file, clock)
        )
        # The run's writer is the default one during fit so that the
        # renorm schedule records its clipping bounds next to the rest.
        with writer.as_default():
            model.fit(
                train_ds,
                epochs=math.ceil(steps / experiment.eval_every),
                initial_epoch=start_epoch,
                steps_per_epoch=experiment.eval_every,
                validation_data=val_ds,
                callbacks=callbacks,
                # The pipeline already orders the data by the run's seed.
                shuffle=False,
                verbose=0,
            )
    wall_s = clock()

    result = {
        "variant": arm.variant,
        "arm": arm.label,
        "seed": seed,
        "status": "completed" if logger.diverged_at is None else "diverged",
        "diverged_at": logger.diverged_at,
        "steps_run": logger.step,
        "final_val_accuracy": logger.last_val.get("accuracy"),
        "final_val_loss": logger.last_val.get("loss"),
        "weights_checksum": _weights_checksum(model),
        "resumed": meta is not None,
        "wall_s": round(wall_s, 3),
    }
    with writer.as_default(step=logger.step):
        tf.summary.scalar(
            "outcome/diverged", float(logger.diverged_at is not None)
        )
        hp.hparams(
            _hparams(experiment, arm, seed),
            trial_id=f"{arm.label}/seed_{seed}",
            start_time_secs=started,
        )
    writer.close()
    (partial / CHECKPOINT_FILE).unlink(missing_ok=True)
    (partial / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, run_dir)
    return result


def check_compatible(run_dir, experiment, arm, seed):
    """Refuses to mix runs of different configs in one experiment folder.

    A field missing from an older run's config counts as its default
    value; the fields of `ENVIRONMENT_FIELDS` (where and how fast it
    trained) never count.
    """
    # A damaged or missing config is named, with how to redo the run.
    path = Path(run_dir) / CONFIG_FILE
    saved = report.read_run_file(path)
    if not isinstance(saved, dict):
        raise ValueError(
            f"Cannot read the run file {path}: it holds no config. Rerun "
            "that run (delete its folder and run the same command again)."
        )
    wanted = experiment.run_config(
        arm.variant, seed, arm.learning_rate, arm.label
    )
    defaults = experiments.Experiment("", "", ("none",)).run_config("", 0)
    changed = sorted(
        k
        for k in wanted
        if k not in experiments.ENVIRONMENT_FIELDS
        and saved.get(k, defaults.get(k)) != wanted[k]
    )
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
    """The (arm, seed) pairs of an experiment, seed by seed.

    Seed-major order means an interrupted grid already has one seed of
    every arm to compare.
    """
    return [
        (arm, seed)
        for seed in range(experiment.seeds)
        for arm in experiment.arms()
    ]


def outcome_text(result):
    """How a finished run ended, in a few words for the progress lines."""
    if result["status"] == "diverged":
        return f"diverged at step {result['diverged_at']}"
    return f"val accuracy {result['final_val_accuracy']:.3f}"


def check_logdir(logdir):
    """Raises a `ValueError` when `logdir` cannot be a folder: it, or the
    nearest of its parents that exists, is a file."""
    path = Path(logdir)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(
            f"The log directory must be a folder, and {existing} is a "
            f"file. Pass another --logdir. Received: logdir={str(logdir)!r}"
        )


def experiment_dir(experiment, logdir, strategy=None):
    """Where this process writes the experiment's run folders.

    In a multi-worker cluster every worker trains (they take steps
    together), but only the chief writes `logdir/<folder>`; worker `i`
    writes `logdir/<folder>.worker<i>`, so that workers sharing a file
    system never write the same files.
    """
    check_logdir(logdir)
    exp_dir = Path(logdir) / experiment.folder
    if strategy is None:
        return exp_dir
    chief, task_id = worker_role(strategy)
    return (
        exp_dir
        if chief
        else exp_dir.with_name(f"{exp_dir.name}.worker{task_id}")
    )


def run_grid(
    experiment,
    logdir,
    console=None,
    command=None,
    after_run=None,
    data_dir=None,
):
    """Trains every (arm, seed) of `experiment` not yet finished.

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
        data_dir: Folder of prepared tfds data.

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
    # First, before any other TensorFlow op: multi-worker and TPU
    # strategies must be created at start-up.
    strategy = get_strategy(experiment.strategy)
    exp_dir = experiment_dir(experiment, logdir, strategy)
    runs = grid(experiment)
    todo = []
    for arm, seed in runs:
        run_dir = run_dir_for(exp_dir, arm.label, seed)
        if is_finished(run_dir):
            check_compatible(run_dir, experiment, arm, seed)
        else:
            todo.append((arm, seed))
    skipped = len(runs) - len(todo)
    if todo:
        preflight(experiment, [arm.variant for arm, _ in todo], data_dir)
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
        # Gone once the grid ends: the per-run lines and the table stay,
        # and a finished bar left above them read as work still going on.
        transient=True,
    )
    with progress:
        overall = progress.add_task("grid", total=len(todo))
        steps = progress.add_task("steps", total=experiment.steps)
        for i, (arm, seed) in enumerate(todo, start=1):
            index = skipped + i
            progress.update(
                overall,
                description=f"run {index}/{len(runs)}: {arm.label} seed {seed}",
            )
            progress.reset(steps, total=experiment.steps)
            result = train_run(
                experiment,
                arm.variant,
                seed,
                run_dir_for(exp_dir, arm.label, seed),
                command=command,
                on_step=lambda step: progress.update(steps, completed=step),
                learning_rate=arm.learning_rate,
                label=arm.label,
                data_dir=data_dir,
            )
            progress.advance(overall)
            resumed = (
                ", resumed from its checkpoint" if result["resumed"] else ""
            )
            console.print(
                f"run {index}/{len(runs)} {arm.label} seed {seed}: "
                f"{outcome_text(result)} ({result['wall_s']:.1f} s{resumed})"
            )
            if after_run is not None:
                after_run(result)
    return exp_dir, len(todo), skipped
