"""Ghost batch normalization at a large batch, and how far the weights
travel (Hoffer et al. 2017, "Train longer, generalize better",
https://arxiv.org/abs/1705.08741), at CPU scale.

An MLP trains at batch 64 and at batch 1024, with plain BN and with
ghost BN over groups of 64, for as many steps as batch 64 takes and for
as many epochs (1/16 of the steps). Every run records the Euclidean
distance of its trainable weights from their initial values at
log-spaced steps; Hoffer et al. find that it grows like log t.
"""

import math
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from zoo import experiments
from zoo import studies
from zoo import verdict
from zoo.studies import common
from zoo.studies import recorder

SMALL = 64
LARGE = 1024
# Ghost batches of the small batch's size: at batch 1024 each BN layer
# normalizes 16 groups of 64 separately, as the small-batch run does.
GHOST = 64
# How many log-spaced steps the weight distance is measured at.
DISTANCE_PROBES = 40
# The growth fits use the last two decades of a run: before about 1% of
# the steps the weights have barely moved, and every curve starts out
# linear in t (one step of size lr * |g| after another).
FIT_DECADES = 2
R2_THRESHOLD = 0.95
INITIAL_WEIGHTS_FILE = "initial_weights.npz"
DISTANCE_TAG = "weights/distance"


@experiments.register
def ghost_large_batch():
    """Ghost BN vs BN at batch 1024 vs batch 64, and ||w_t - w_0||: MLP.

    Paper: Hoffer et al. 2017, https://arxiv.org/abs/1705.08741 ("Train
    longer, generalize better": the distance of the weights from their
    initialization grows like log t; a learning rate scaled by the
    square root of the batch ratio, ghost batch normalization and as
    many steps as the small batch takes close the large-batch gap).
    SCIENCE.md "Also worth running": at 4,000 examples there is no
    large-batch gap to close (a first trial 0.951 vs 0.952); the log t
    growth is the signal to look for. The full-scale config is `hoffer-ghost`.

    Command: `tfnorm-zoo run ghost-large-batch` (`--smoke` in seconds);
    `tfnorm-zoo reproduce` runs it with the other studies.

    Measured: 5 min 19 s for the 15 runs on 2 CPU cores shared with
    other jobs (load about 5). Verdict: inconclusive. Final validation
    accuracy, mean ± std over 3 seeds: batch 64 with BN 0.950 ± 0.003;
    batch 1024 for 640 steps, BN 0.941 ± 0.004 and ghost BN 0.947 ±
    0.009; for 40 steps (as many epochs), BN 0.862 ± 0.016 and ghost BN
    0.874 ± 0.014. Ghost BN is ahead of BN on average at both lengths
    (inside the seed spread), and training longer closes most of the
    large-batch gap, as the paper says; ghost BN at batch 1024 ends
    0.003 behind batch 64, but its spread is too wide to call that
    within a point. ||w_t - w_0|| is linear in log t over steps
    7-640 in every arm: R^2 0.997 ± 0.001 (batch 64), 0.992 ± 0.001
    (BN at 1024), 0.995 ± 0.001 (ghost BN at 1024), against 0.87-0.90
    for sqrt t and 0.69-0.73 for t; it grows by 1.52, 1.02 and 1.27 per
    tenfold of steps. At batch 1024 the curves bend below the log line
    after about 100 steps, BN's more than ghost BN's.

    A 784-4x256-10 ReLU MLP with BN before each ReLU on the MNIST digits
    (4,000 / 1,000), plain SGD at 0.1 for batch 64 and 0.1 x sqrt(16) =
    0.4 for batch 1024, 3 seeds. Arms: batch 64 with BN for 640 steps;
    batch 1024 with BN and with ghost BN (groups of 64) for 640 steps
    (Hoffer's "regime adaptation": as many updates as batch 64) and for
    40 steps (`_short`: as many epochs as batch 64, about 10). The
    distance of all trainable weights from their initial values is
    recorded at 40 log-spaced steps; over the last two decades of the
    run it is fitted as a log t + b, a sqrt(t) + b and a t + b.
    """
    return experiments.Experiment(
        name="ghost-large-batch",
        dataset="digits",
        variants=("bn_before", "ghost"),
        hidden_units=(256,) * 4,
        batch_size=SMALL,
        base_batch_size=SMALL,
        learning_rate=0.1,
        lr_scaling="sqrt",
        virtual_batch_size=GHOST,
        steps=640,
        eval_every=80,
        log_every=20,
        histogram_every=320,
        threshold=0.9,
    )


def arms(experiment):
    """`(label, variant, batch size, steps)` of every arm of the grid."""
    small, steps = experiment.batch_size, experiment.steps
    short = max(1, round(steps * small / LARGE))
    return [
        (f"bn_b{small}", "bn_before", small, steps),
        (f"bn_b{LARGE}_short", "bn_before", LARGE, short),
        (f"ghost_b{LARGE}_short", "ghost", LARGE, short),
        (f"bn_b{LARGE}", "bn_before", LARGE, steps),
        (f"ghost_b{LARGE}", "ghost", LARGE, steps),
    ]


def grid(experiment):
    """(run experiment, arm, seed) for every arm and seed."""
    if experiment.batch_size >= LARGE:
        raise ValueError(
            f"ghost-large-batch compares batch {LARGE} with a smaller one. "
            f"Received: batch_size={experiment.batch_size}"
        )
    runs = []
    for seed in range(experiment.seeds):
        for label, variant, batch, steps in arms(experiment):
            run_experiment = experiment.replace(batch_size=batch, steps=steps)
            arm = experiments.Arm(label, variant, experiment.learning_rate)
            runs.append((run_experiment, arm, seed))
    return runs


def probe_steps(steps, count=DISTANCE_PROBES):
    """About `count` log-spaced steps from 1 to `steps`, both included."""
    return sorted({round(s) for s in np.geomspace(1, steps, count)})


class WeightDistance(keras.callbacks.Callback):
    """`||w_t - w_0||` over every trainable weight, at the given steps.

    Keeps `(step, {"distance": ..., "norm": ...})` in `history` for the
    recorder, where `norm` is `||w_t||`, and logs both to the default
    TensorBoard writer under `weights/`. The initial weights are saved
    in the run folder, so that a run resumed from its checkpoint measures
    from the same start; the file is deleted when training ends.

    Args:
        steps: The optimizer steps to measure at.
        run_dir: The folder the run is being written in.
    """

    def __init__(self, steps, run_dir):
        super().__init__()
        self.steps = set(steps)
        self.path = Path(run_dir) / INITIAL_WEIGHTS_FILE
        self.history = []
        self._initial = None

    def _weights(self):
        return [
            np.asarray(keras.ops.convert_to_numpy(v), np.float64)
            for v in self.model.trainable_variables
        ]

    def on_train_begin(self, logs=None):
        step = int(np.asarray(self.model.optimizer.iterations))
        if step == 0:
            self._initial = self._weights()
            np.savez(self.path, *self._initial)
            return
        if not self.path.is_file():
            raise FileNotFoundError(
                f"The run resumes at step {step}, but its initial weights "
                f"({self.path}) are gone, so the distance from them cannot "
                "be measured. Delete the run's .partial folder to start it "
                "again."
            )
        with np.load(self.path) as saved:
            self._initial = [saved[f"arr_{i}"] for i in range(len(saved))]

    def on_train_batch_end(self, batch, logs=None):
        step = int(np.asarray(self.model.optimizer.iterations))
        if step not in self.steps:
            return
        weights = self._weights()
        # float64 sums: a few hundred thousand squares of small changes.
        distance = math.sqrt(
            sum(
                float(np.sum((w - w0) ** 2))
                for w, w0 in zip(weights, self._initial, strict=True)
            )
        )
        norm = math.sqrt(sum(float(np.sum(w**2)) for w in weights))
        result = {"distance": distance, "norm": norm}
        self.history.append((step, result))
        for key, value in result.items():
            if math.isfinite(value):
                tf.summary.scalar(f"weights/{key}", value, step=step)

    def on_train_end(self, logs=None):
        self.path.unlink(missing_ok=True)


def _flatten(result):
    return {f"weights/{key}": value for key, value in result.items()}


def _callbacks(experiment, split, run_dir):
    probe = WeightDistance(probe_steps(experiment.steps), run_dir)
    return [probe, recorder.DiagnosticsRecorder(run_dir, [(probe, _flatten)])]


def _r2(x, y):
    """R^2 of the least-squares line through `(x, y)`; NaN if undefined."""
    slope, intercept = np.polyfit(x, y, 1)
    residual = np.sum((y - (slope * x + intercept)) ** 2)
    total = np.sum((y - np.mean(y)) ** 2)
    return float(1.0 - residual / total) if total > 0 else float("nan")


def growth_fits(steps, distances, total_steps):
    """How well `distance = a f(t) + b` fits, for f = log t, sqrt t, t.

    Only the last `FIT_DECADES` decades of the run count: the steps
    `t >= total_steps / 10**FIT_DECADES` (at least 1).

    Returns:
        A dict: `r2_log`, `r2_sqrt`, `r2_linear` (the coefficient of
        determination of each least-squares fit), `per_decade` (the log
        fit's growth of the distance per tenfold of steps) and `points`
        (how many measurements were fitted). NaN where fewer than three
        finite measurements lie in the window.
    """
    start = max(1.0, total_steps / 10**FIT_DECADES)
    pairs = [
        (t, d)
        for t, d in zip(steps, distances, strict=True)
        if t >= start and d is not None and math.isfinite(d)
    ]
    nan = float("nan")
    if len(pairs) < 3:
        return {
            "r2_log": nan,
            "r2_sqrt": nan,
            "r2_linear": nan,
            "per_decade": nan,
            "points": len(pairs),
        }
    t = np.array([p[0] for p in pairs], np.float64)
    d = np.array([p[1] for p in pairs], np.float64)
    slope = np.polyfit(np.log(t), d, 1)[0]
    return {
        "r2_log": _r2(np.log(t), d),
        "r2_sqrt": _r2(np.sqrt(t), d),
        "r2_linear": _r2(t, d),
        "per_decade": float(slope * math.log(10)),
        "points": len(pairs),
    }


def at_least(criterion, values, threshold, digits=3):
    """Checks `mean(values) >= threshold` beyond the seed spread.

    The mirror of `zoo.verdict.below`: passes when the mean minus one
    std reaches the threshold, fails when the mean plus one std stays
    under it, unclear in between or with fewer than two seeds.
    """
    stat = verdict.Stat.of(values)
    measured = f"{stat.text(digits)} vs threshold {threshold:.{digits}g}"
    if stat.n < 2:
        return verdict.Check(criterion, measured, verdict.UNCLEAR)
    if stat.mean - stat.std >= threshold:
        return verdict.Check(criterion, measured, verdict.PASS)
    if stat.mean + stat.std < threshold:
        return verdict.Check(criterion, measured, verdict.FAIL)
    return verdict.Check(criterion, measured, verdict.UNCLEAR)


def evaluate_ghost(accuracy, fits, small, large):
    """The checks from per-seed tables keyed by arm label.

    Args:
        accuracy: `{label: [final val accuracy per seed]}`, a diverged
            run entered at chance.
        fits: `{label: [growth_fits per seed]}` of the arms that train
            for the full number of steps.
        small: The label of the small-batch arm.
        large: `{"bn": label, "ghost": label, "bn_short": label,
            "ghost_short": label}` of the large-batch arms.

    Returns:
        A list of `zoo.verdict.Check`.
    """
    checks = [
        verdict.not_less(
            f"ghost BN at least as accurate as BN at batch {LARGE}, as many "
            f"{length} as the small batch",
            accuracy[large[f"ghost{suffix}"]],
            accuracy[large[f"bn{suffix}"]],
        )
        for length, suffix in (("steps", ""), ("epochs", "_short"))
    ]
    checks += [
        verdict.greater(
            f"training longer helps at batch {LARGE}: ghost BN with as "
            "many steps as the small batch beats it with as many epochs",
            accuracy[large["ghost"]],
            accuracy[large["ghost_short"]],
        ),
        verdict.close(
            f"with the sqrt rule, ghost BN and as many steps, batch {LARGE} "
            "within 1 point of the small batch",
            accuracy[large["ghost"]],
            accuracy[small],
            tolerance=0.01,
        ),
    ]
    for label in fits:

        def column(key, label=label):
            return common.finite([fit[key] for fit in fits[label]])

        others = common.finite(
            [max(f["r2_sqrt"], f["r2_linear"]) for f in fits[label]]
        )
        checks += [
            at_least(
                f"{label}: ||w_t - w_0|| is linear in log t (R^2 of the "
                f"log fit >= {R2_THRESHOLD})",
                column("r2_log"),
                R2_THRESHOLD,
            ),
            verdict.greater(
                f"{label}: log t fits better than sqrt t and t (R^2, the "
                "better of the two)",
                column("r2_log"),
                others,
            ),
        ]
    return checks


def _distance_curve(lines):
    return {
        line["step"]: line[DISTANCE_TAG]
        for line in lines
        if line.get(DISTANCE_TAG) is not None
    }


def _evaluate(exp_dir, runs):
    accuracy, curves, configs = {}, {}, {}
    # Arms in the grid's order: the small batch, then the short and the
    # full-length large-batch runs.
    order = sorted(
        runs,
        key=lambda r: (
            r.result["seed"],
            r.config["batch_size"],
            r.config["steps"],
            r.config["variant"],
        ),
    )
    for run in order:
        label = run.result["arm"]
        configs[label] = run.config
        accuracy.setdefault(label, []).append(common.final_accuracy(run))
        lines = recorder.load(studies.run_dir(exp_dir, run))
        curves.setdefault(label, []).append(_distance_curve(lines))

    steps = max(config["steps"] for config in configs.values())
    small = next(
        (label for label, c in configs.items() if c["batch_size"] != LARGE),
        None,
    )
    if small is None:
        # A KeyError, as for a missing large-batch arm: the report names
        # the arm and how to finish it.
        raise KeyError("the small-batch arm")
    large = {}
    for label, config in configs.items():
        if config["batch_size"] == LARGE:
            kind = "ghost" if config["variant"] == "ghost" else "bn"
            short = config["steps"] < steps
            large[kind + ("_short" if short else "")] = label
    fits = {
        label: [
            growth_fits(sorted(c), [c[t] for t in sorted(c)], steps)
            for c in curves[label]
        ]
        for label in (small, large["bn"], large["ghost"])
    }
    checks = evaluate_ghost(accuracy, fits, small, large)

    gap = verdict.Stat.of(accuracy[large["ghost"]]).mean - (
        verdict.Stat.of(accuracy[small]).mean
    )
    r2 = common.finite([f["r2_log"] for group in fits.values() for f in group])
    headline = (
        f"val accuracy: batch {LARGE} ghost BN "
        f"{verdict.Stat.of(accuracy[large['ghost']]).text(3)}, BN "
        f"{verdict.Stat.of(accuracy[large['bn']]).text(3)}, batch "
        f"{configs[small]['batch_size']} "
        f"{verdict.Stat.of(accuracy[small]).text(3)} (gap {gap:+.3f}); "
        f"R^2 of ||w_t - w_0|| vs log t "
        + (f"{min(r2):.3f}-{max(r2):.3f}" if r2 else "—")
    )

    table = [
        "| arm | batch | steps | LR | final val accuracy | distance at "
        "the end | R^2 log t | R^2 sqrt t | R^2 t | growth per decade |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, config in configs.items():
        ends = [c[max(c)] for c in curves[label] if c]
        row = [
            label,
            str(config["batch_size"]),
            str(config["steps"]),
            f"{config['scaled_learning_rate']:.3g}",
            verdict.Stat.of(accuracy[label]).text(3),
            verdict.Stat.of(common.finite(ends)).text(2),
        ]
        for key in ("r2_log", "r2_sqrt", "r2_linear", "per_decade"):
            values = [f[key] for f in fits.get(label, [])]
            row.append(
                verdict.Stat.of(common.finite(values)).text(3)
                if label in fits
                else "—"
            )
        table.append("| " + " | ".join(row) + " |")
    markdown = common.measured(
        table,
        (
            "Distance: the Euclidean norm of the change of all trainable "
            "weights since initialization, at log-spaced steps. The fits "
            "use the last two decades of each full-length run (steps "
            f">= {max(1.0, steps / 10**FIT_DECADES):g}); R^2 of a t + b, "
            "a sqrt(t) + b and a log t + b over those measurements, and "
            "the log fit's growth of the distance per tenfold of steps. "
            "`_short` arms train as many epochs as the small batch, 1/16 "
            "of its steps; they are too short to fit. A diverged run "
            "counts at chance."
        ),
    )
    _plot(exp_dir, curves, accuracy, configs)
    return studies.Evaluation(
        checks=checks,
        headline=headline,
        markdown=markdown,
        plots=(
            ("weight_distance.png", "||w_t - w_0|| against log t"),
            ("accuracy_by_arm.png", "final accuracy by arm"),
        ),
    )


def _plot(exp_dir, curves, accuracy, configs):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, group in curves.items():
        group = [c for c in group if c]
        if not group:
            continue
        common.shared_band(ax, group, label)
    ax.set_xscale("log")
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel("||w_t - w_0||")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    common.save(fig, exp_dir / "weight_distance.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(configs)
    common.errorbars(
        ax,
        range(len(labels)),
        [accuracy[label] for label in labels],
        None,
        linestyle="none",
    )
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize="small")
    ax.set_ylabel("final val accuracy")
    ax.grid(alpha=0.3)
    common.save(fig, exp_dir / "accuracy_by_arm.png")


studies.register(
    studies.Study(
        name="ghost-large-batch",
        claim="The weights' distance from their initialization grows like "
        "log t; ghost batch normalization, a learning rate scaled by the "
        "square root of the batch ratio and as many steps as the small "
        "batch close the large-batch generalization gap.",
        paper="Hoffer et al. 2017, https://arxiv.org/abs/1705.08741",
        paper_result="ResNet-44 on CIFAR-10 and other networks: ||w_t - "
        "w_0|| grows logarithmically with the step; at batch 4096 with "
        "ghost batches of 128 and regime adaptation, the large batch "
        "matches the small one (the paper's Table 1).",
        criteria="at 4,000 examples there is no large-batch gap to close, "
        "so batch 1024 with ghost BN ends within 1 point of batch 64; "
        "ghost BN is at least as good as BN at batch 1024; training longer "
        "helps the large batch; ||w_t - w_0|| fits log t with R^2 >= "
        f"{R2_THRESHOLD}, better than sqrt t or t (the numbers are this "
        "zoo's reading; SCIENCE.md sets none).",
        evaluate=_evaluate,
        callbacks=_callbacks,
        grid=grid,
    )
)
