"""DropBlock, spatial dropout, DropPath and dropout vs none in a conv net
on MNIST-1D (Ghiasi et al. 2018, https://arxiv.org/abs/1810.12890), at
CPU scale.

Five arms share one residual 1-D conv net and differ only in the
dropout flavor: none, elementwise dropout, spatial dropout (whole
channels), DropBlock (contiguous runs of positions) and DropPath (whole
residual branches, per sample). Besides validation accuracy, every run
records its accuracy on the training set at inference, so that the
report shows how much each flavor narrows the train-validation gap.
"""

import keras
import numpy as np
import tensorflow as tf

from zoo import experiments
from zoo import studies
from zoo import verdict
from zoo.studies import common
from zoo.studies import recorder

FLAVORS = {
    "bn_before": "none",
    "bn_dropout": "Dropout",
    "bn_spatial_dropout": "SpatialDropout",
    "dropblock": "DropBlock",
    "stochastic_depth": "DropPath",
}
TRAIN_ACCURACY_TAG = "generalization/train_accuracy"


@experiments.register
def dropout_family():
    """None vs Dropout, SpatialDropout, DropBlock, DropPath: MNIST-1D conv net.

    Paper: Ghiasi et al. 2018, https://arxiv.org/abs/1810.12890
    (DropBlock: dropout is less effective on convolutional feature maps,
    whose neighbouring units are correlated; dropping contiguous blocks
    regularizes better. ResNet-50 on ImageNet: 76.51% without, 78.13%
    with DropBlock; dropout, SpatialDropout and DropPath land in
    between). SCIENCE.md "Also worth running": DropBlock and spatial
    dropout vs dropout on MNIST-1D convolutions.

    Command: `tfnorm-zoo run dropout-family` (`--smoke` in seconds);
    `tfnorm-zoo reproduce` runs it with the other studies.

    Measured: 6 min 13 s for the 15 runs on 2 CPU cores shared with
    other jobs (load about 5). Verdict: not reproduced. Final validation
    accuracy, mean ± std over 3 seeds: none 0.978 ± 0.002, Dropout 0.986
    ± 0.003, SpatialDropout 0.953 ± 0.024, DropBlock 0.973 ± 0.007,
    DropPath 0.976 ± 0.003. Elementwise dropout is the only flavor that
    helps, and it beats DropBlock and SpatialDropout beyond the spread:
    the reverse of the paper's order. On the training set at inference
    the structured flavors stay below 1.0 (SpatialDropout 0.965,
    DropBlock 0.984, Dropout 0.992, none 1.000, DropPath 0.999): at this
    width (16-32 channels, maps of 10-40 positions) dropping whole
    channels or runs of positions costs more fit than it buys, while the
    train-validation gap shrinks from 0.022 (none) to 0.006 (Dropout),
    0.011-0.012 (DropBlock, SpatialDropout) and not at all (DropPath).

    The residual 1-D conv net `resconvnet1d` at width 0.5 (three blocks
    of 16, 32 and 32 channels, kernel 5, each followed by a residual
    block with an identity shortcut; BN before each ReLU; 35k
    parameters, about as many as the plain `convnet1d`) on MNIST-1D
    (4,000 / 1,000, generated offline). SGD with momentum 0.9 at 0.05,
    divided by 10 at half and three quarters of 1,200 steps, batch 64
    (about 19 passes), 3 seeds. Every flavor drops at rate 0.2: dropout,
    spatial dropout and DropBlock (blocks of 3 positions) after each
    block's residual addition; DropPath on each residual branch with
    the linear depth rule up to 0.2. The rates are constant: Ghiasi et
    al. ramp DropBlock's rate up during training, which this zoo does
    not (Keras's dropout layers have no schedulable rate, and every arm
    should be treated alike).
    """
    return experiments.Experiment(
        name="dropout-family",
        dataset="mnist1d",
        model="resconvnet1d",
        width=0.5,
        variants=tuple(FLAVORS),
        batch_size=64,
        learning_rate=0.05,
        momentum=0.9,
        lr_boundaries=(0.5, 0.75),
        steps=1_200,
        eval_every=200,
        log_every=50,
        histogram_every=600,
        dropout_rate=0.2,
        dropblock_size=3,
        threshold=0.9,
    )


class TrainAccuracy(keras.callbacks.Callback):
    """Accuracy on the whole training set at inference, every `period` steps.

    Keeps `(step, {"train_accuracy": ...})` in `history` for the recorder
    and logs it to the default TensorBoard writer. The training metric
    Keras reports is measured with dropout on, on the batch just
    trained; this one compares with validation accuracy like for like.
    """

    def __init__(self, split, period):
        super().__init__()
        self.x = split.model_inputs(split.x_train)
        self.y = np.asarray(split.y_train)
        self.period = period
        self.history = []

    def on_train_batch_end(self, batch, logs=None):
        step = int(np.asarray(self.model.optimizer.iterations))
        if step % self.period:
            return
        logits = np.asarray(self.model(self.x, training=False))
        accuracy = (
            float(np.mean(np.argmax(logits, -1) == self.y))
            if np.all(np.isfinite(logits))
            else float("nan")
        )
        self.history.append((step, {"train_accuracy": accuracy}))
        if np.isfinite(accuracy):
            tf.summary.scalar(TRAIN_ACCURACY_TAG, accuracy, step=step)


def _flatten(result):
    return {TRAIN_ACCURACY_TAG: result["train_accuracy"]}


def _callbacks(experiment, split, run_dir):
    probe = TrainAccuracy(split, experiment.eval_every)
    return [probe, recorder.DiagnosticsRecorder(run_dir, [(probe, _flatten)])]


def final_train_accuracy(lines):
    """The last recorded training-set accuracy; NaN if there is none."""
    values = [
        line[TRAIN_ACCURACY_TAG]
        for line in lines
        if line.get(TRAIN_ACCURACY_TAG) is not None
    ]
    return values[-1] if values else float("nan")


def evaluate_family(accuracy):
    """The checks from `{variant: [final val accuracy per seed]}`.

    DropBlock must beat no dropout beyond the seed spread (the paper's
    headline); DropBlock must be at least as good as dropout and spatial
    dropout, spatial dropout at least as good as dropout, and no flavor
    worse than none. "At least as good" fails only on a reversal beyond
    the spread (`zoo.verdict.not_less`).
    """
    none = accuracy["bn_before"]
    dropout = accuracy["bn_dropout"]
    spatial = accuracy["bn_spatial_dropout"]
    dropblock = accuracy["dropblock"]
    droppath = accuracy["stochastic_depth"]
    return [
        verdict.greater("DropBlock beats no dropout", dropblock, none),
        verdict.not_less(
            "DropBlock at least as good as elementwise Dropout",
            dropblock,
            dropout,
        ),
        verdict.not_less(
            "DropBlock at least as good as SpatialDropout", dropblock, spatial
        ),
        verdict.not_less(
            "SpatialDropout at least as good as elementwise Dropout",
            spatial,
            dropout,
        ),
        verdict.not_less("Dropout no worse than none", dropout, none),
        verdict.not_less("SpatialDropout no worse than none", spatial, none),
        verdict.not_less("DropPath no worse than none", droppath, none),
    ]


def _evaluate(exp_dir, runs):
    table = common.by_arm(runs, common.final_accuracy)
    accuracy = {variant: values for (variant, _), values in table.items()}
    train = common.by_arm(
        runs,
        lambda run: final_train_accuracy(
            recorder.load(studies.run_dir(exp_dir, run))
        ),
    )
    train = {variant: values for (variant, _), values in train.items()}
    checks = evaluate_family(accuracy)

    headline = "val accuracy: " + ", ".join(
        f"{FLAVORS[v]} {verdict.Stat.of(accuracy[v]).mean:.3f}" for v in FLAVORS
    )
    headline += f" (n={len(accuracy['bn_before'])})"
    lines = [
        "| flavor | variant | final val accuracy | train accuracy "
        "(inference) | train - val |",
        "|---|---|---|---|---|",
    ]
    gaps = {}
    for variant, name in FLAVORS.items():
        gaps[variant] = [
            t - v
            for t, v in zip(train[variant], accuracy[variant], strict=True)
            if np.isfinite(t)
        ]
        lines.append(
            f"| {name} | {variant} | "
            f"{verdict.Stat.of(accuracy[variant]).text(3)} | "
            f"{verdict.Stat.of(common.finite(train[variant])).text(3)} | "
            f"{verdict.Stat.of(gaps[variant]).text(3)} |"
        )
    config = runs[0].config
    markdown = common.measured(
        lines,
        "Final validation accuracy, and accuracy on the whole training "
        "set at inference (dropout off) at the end of the run; their "
        "difference is how much the network overfits. Every flavor "
        f"drops at rate {config['dropout_rate']:g} "
        f"(DropBlock in blocks of {config['dropblock_size']}; DropPath "
        "with the linear depth rule up to that rate) in the same "
        f"{config['model']} (width {config['width']:g}). A diverged run "
        "counts at chance.",
    )
    _plot(exp_dir, accuracy, gaps)
    return studies.Evaluation(
        checks=checks,
        headline=headline,
        markdown=markdown,
        plots=(("flavors.png", "accuracy and train-val gap by flavor"),),
    )


def _plot(exp_dir, accuracy, gaps):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(FLAVORS.values())
    for ax, values, title in (
        (axes[0], accuracy, "final val accuracy"),
        (axes[1], gaps, "train - val accuracy (inference)"),
    ):
        common.errorbars(
            ax,
            range(len(names)),
            [values[v] for v in FLAVORS],
            None,
            linestyle="none",
        )
        ax.set_xticks(range(len(names)), names, fontsize="small")
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3)
    common.save(fig, exp_dir / "flavors.png")


studies.register(
    studies.Study(
        name="dropout-family",
        claim="Dropout is weak on convolutional feature maps; structured "
        "dropout (DropBlock, and spatial dropout) regularizes conv nets "
        "better.",
        paper="Ghiasi et al. 2018, https://arxiv.org/abs/1810.12890",
        paper_result="ResNet-50 on ImageNet: 76.51% top-1 without, 78.13% "
        "with DropBlock; dropout, SpatialDropout and DropPath in between.",
        criteria="DropBlock beats no dropout beyond the seed spread; "
        "DropBlock at least as good as Dropout and SpatialDropout, "
        "SpatialDropout at least as good as Dropout, and no flavor worse "
        "than none (this zoo's reading; SCIENCE.md sets no number).",
        evaluate=_evaluate,
        callbacks=_callbacks,
    )
)
