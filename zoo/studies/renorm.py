"""E4: Batch Renormalization at tiny batches (Ioffe 2017,
https://arxiv.org/abs/1702.03275), at CPU scale.

BN and batch renormalization trained on i.i.d. batches of 2 and 4 and,
as the control, 64; each run is evaluated with the population (moving)
statistics, as at inference, and with the statistics of validation
batches of its own training size.
"""

import json

import keras
import numpy as np
import tensorflow as tf

import tfnorm
from zoo import experiments
from zoo import studies
from zoo import verdict
from zoo.studies import common
from zoo.studies import recorder

# Batch size -> how many times the registered `steps` a run takes. The
# tiny batches get twice the steps of the control (still far fewer
# examples: 2 x 2,000 steps is one pass over the 4,000 training digits,
# the control sees 16 passes), so that their runs take about as long.
BATCHES = {2: 2, 4: 2, 64: 1}
CONTROL = 64
BATCH_STATS_FILE = "batch_stats.json"


@experiments.register
def renorm_small_batch():
    """Batch renorm vs BN at batches of 2 and 4, batch 64 as control: MLP.

    Paper: Ioffe 2017, https://arxiv.org/abs/1702.03275 (Sec. 4.2:
    Inception normalizing over 4 examples reaches 74.2% with BN and
    76.5% with renorm). SCIENCE.md E4.

    Command: `tfnorm-zoo run renorm-small-batch` (`--smoke` in seconds);
    `tfnorm-zoo reproduce` runs it with the other studies.

    Measured: 10 min 24 s for the 18 runs on 2 CPU cores shared with
    other jobs (load about 6, so more than an idle machine needs).
    Verdict: inconclusive. Final validation accuracy with the moving
    statistics, mean ± std over 3 seeds: batch 2, renorm 0.680 ± 0.023 vs
    BN 0.470 ± 0.035; batch 4, 0.924 ± 0.010 vs 0.878 ± 0.018 (both
    beyond the spread, as the paper says); batch 64, 0.951 ± 0.006 vs
    0.948 ± 0.003, within a point but not by more than the spread. With
    the statistics of batches of their own size, BN falls to 0.300 at
    batch 2 and 0.720 at 4 while renorm keeps 0.678 and 0.923.

    A 784-4x256-10 ReLU MLP on the MNIST digits, BN or renorm before the
    ReLU, plain SGD at 0.1 for batch 64 scaled by the square root of the
    batch ratio (0.018 at batch 2, 0.025 at 4: this zoo's choice, the
    paper does not give its small-batch rates), 3 seeds; 2,000 steps at
    batches 2 and 4, 1,000 at 64. Renorm's clipping stays closed (plain
    BN) for the first 5% of a run and opens linearly to rmax 3, dmax 5
    over the next 25%. SCIENCE.md's non-i.i.d. arm (batches of 32 drawn
    from 2 classes) is not built yet: the zoo's pipeline draws i.i.d.
    batches only.
    """
    return experiments.Experiment(
        name="renorm-small-batch",
        dataset="digits",
        variants=("bn_before", "renorm"),
        hidden_units=(256,) * 4,
        batch_size=CONTROL,
        base_batch_size=CONTROL,
        learning_rate=0.1,
        lr_scaling="sqrt",
        steps=1_000,
        eval_every=250,
        log_every=50,
        histogram_every=500,
        threshold=0.9,
    )


def grid(experiment):
    """(run experiment, arm, seed) for every batch size, variant, seed."""
    batches = BATCHES
    if experiment.smoke:
        # Batch 4 takes the same code path as batch 2.
        batches = {b: f for b, f in BATCHES.items() if b != 4}
    runs = []
    for seed in range(experiment.seeds):
        for batch, factor in batches.items():
            run_experiment = experiment.replace(
                batch_size=batch, steps=experiment.steps * factor
            )
            for variant in experiment.variants:
                arm = experiments.Arm(
                    f"{variant}_b{batch}", variant, experiment.learning_rate
                )
                runs.append((run_experiment, arm, seed))
    return runs


class BatchStatisticsEval(keras.callbacks.Callback):
    """At the end of training, accuracy with each batch's own statistics.

    The validation set is cut into batches of the training batch size,
    and the network runs in training mode on each (BN and renorm
    normalize with that batch's moments; renorm also applies its r and
    d) through `stateless_call`, so nothing the run keeps changes. The
    result goes to `batch_stats.json` in the run folder and to
    TensorBoard as `val/accuracy_batch_stats`.
    """

    def __init__(self, split, batch_size, run_dir):
        super().__init__()
        self.split = split
        self.batch_size = batch_size
        self.path = run_dir / BATCH_STATS_FILE

    def on_train_end(self, logs=None):
        model = self.model
        b = self.batch_size
        count = len(self.split.x_val) // b * b
        x = self.split.model_inputs(self.split.x_val[:count])
        y = self.split.y_val[:count]
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        @tf.function(reduce_retracing=True)
        def logits(chunk):
            outputs, _ = model.stateless_call(
                trainable, non_trainable, chunk, training=True
            )
            return outputs

        # Many batches per call: a [chunks, b, ...] tensor mapped over its
        # first axis keeps the Python loop short for b = 2.
        x = tf.reshape(x, [count // b, b] + list(x.shape[1:]))
        outputs = tf.map_fn(logits, x, fn_output_signature=tf.float32)
        predicted = np.argmax(np.reshape(outputs.numpy(), [count, -1]), -1)
        finite = bool(np.all(np.isfinite(outputs.numpy())))
        accuracy = float(np.mean(predicted == y)) if finite else None
        self.path.write_text(
            json.dumps({"accuracy": accuracy, "batch_size": b}) + "\n"
        )
        if accuracy is not None:
            step = int(np.asarray(model.optimizer.iterations))
            tf.summary.scalar("val/accuracy_batch_stats", accuracy, step=step)


def _callbacks(experiment, split, run_dir):
    # r, d and the clipped fraction of every renorm layer (and each BN
    # layer's moving statistics) on one training batch, in TensorBoard.
    stats = tfnorm.diagnostics.LayerStatisticsCallback(
        split.model_inputs(split.x_train[: experiment.batch_size]),
        period=experiment.eval_every,
    )
    return [
        stats,
        recorder.DiagnosticsRecorder(
            run_dir, [(stats, recorder.flatten_layers)]
        ),
        BatchStatisticsEval(split, experiment.batch_size, run_dir),
    ]


def _batch_accuracy(exp_dir, run):
    path = studies.run_dir(exp_dir, run) / BATCH_STATS_FILE
    value = json.loads(path.read_text())["accuracy"] if path.is_file() else None
    return common.CHANCE if value is None else value


def evaluate_renorm(accuracy, batches):
    """E4's checks from `{(variant, batch): [accuracy per seed]}`.

    Renorm must beat BN at every batch but the control, where the two
    must agree within one point.
    """
    checks = []
    for batch in batches:
        renorm, bn = accuracy[("renorm", batch)], accuracy[("bn_before", batch)]
        if batch == max(batches):
            checks.append(
                verdict.close(
                    f"renorm matches BN within 1 point at batch {batch}",
                    renorm,
                    bn,
                    tolerance=0.01,
                )
            )
        else:
            checks.append(
                verdict.greater(f"renorm beats BN at batch {batch}", renorm, bn)
            )
    return checks


def _evaluate(exp_dir, runs):
    population, batch_stats = {}, {}
    for run in sorted(runs, key=lambda r: r.result["seed"]):
        key = (run.config["variant"], run.config["batch_size"])
        population.setdefault(key, []).append(common.final_accuracy(run))
        batch_stats.setdefault(key, []).append(_batch_accuracy(exp_dir, run))
    batches = sorted({b for _, b in population})
    checks = evaluate_renorm(population, batches)
    smallest = min(batches)
    headline = (
        f"val accuracy at batch {smallest}: renorm "
        f"{verdict.Stat.of(population[('renorm', smallest)]).text(3)}, BN "
        f"{verdict.Stat.of(population[('bn_before', smallest)]).text(3)}"
    )
    lines = [
        "| batch | variant | steps | population statistics | "
        "batch statistics |",
        "|---|---|---|---|---|",
    ]
    steps = {
        (r.config["variant"], r.config["batch_size"]): r.config["steps"]
        for r in runs
    }
    for batch in batches:
        for variant in ("bn_before", "renorm"):
            key = (variant, batch)
            lines.append(
                f"| {batch} | {variant} | {steps[key]} | "
                f"{verdict.Stat.of(population[key]).text(3)} | "
                f"{verdict.Stat.of(batch_stats[key]).text(3)} |"
            )
    markdown = "\n".join(
        [
            "## Measured",
            "",
            *lines,
            "",
            "Final validation accuracy with the population (moving) "
            "statistics, as at inference, and with the statistics of "
            "validation batches of the run's own training size (training "
            "mode, nothing updated). A diverged run counts at chance. The "
            "accuracy table below lists each arm's last evaluation; the "
            "tiny-batch arms train twice the steps of the control. Renorm's "
            "r, d and clipped fractions are in TensorBoard under "
            "`diagnostics/layers/norm_*`. Not built yet: the non-i.i.d. arm "
            "(batches from 2 classes).",
        ]
    )
    _plot(exp_dir, population, batches)
    return studies.Evaluation(
        checks=checks,
        headline=headline,
        markdown=markdown,
        plots=(("batch_size.png", "accuracy by batch size"),),
    )


def _plot(exp_dir, population, batches):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in ("bn_before", "renorm"):
        stats = [verdict.Stat.of(population[(variant, b)]) for b in batches]
        ax.errorbar(
            batches,
            [s.mean for s in stats],
            yerr=[0 if s.n < 2 else s.std for s in stats],
            marker="o",
            capsize=3,
            label=variant,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("final val accuracy (population statistics)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    common.save(fig, exp_dir / "batch_size.png")


studies.register(
    studies.Study(
        name="renorm-small-batch",
        claim="Batch renormalization removes the dependence on minibatch "
        "statistics: it beats BN at tiny batches and matches it at "
        "ordinary ones.",
        paper="Ioffe 2017, https://arxiv.org/abs/1702.03275",
        paper_result="Inception on ImageNet normalizing over 4 examples: "
        "74.2% with BN vs 76.5% with renorm.",
        criteria="renorm beats BN beyond the seed spread at batches 2 and "
        "4 (SCIENCE.md also asks for non-i.i.d. batches, not built yet) "
        "and matches it at batch 64.",
        evaluate=_evaluate,
        callbacks=_callbacks,
        grid=grid,
    )
)
