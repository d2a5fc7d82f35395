"""E5: dropout before BN and the variance shift (Li et al. 2019,
https://arxiv.org/abs/1801.05134), at CPU scale.

Dropout scales each kept unit by 1/q (q = 1 - p), which leaves its mean
but not its variance unchanged: a unit with mean c and variance v has
variance (c^2 + v) / q - c^2 in training and v at inference. A BN layer
after it learns its moving variance in training and applies it at
inference, where the input's variance is smaller. Here dropout reaches
BN through a Dense layer, y = sum_j w_j x_j d_j, where the same argument
gives, with masks independent of the inputs,

    Var_train(y) = Var_test(y) + (1 - q) / q * sum_j w_j^2 E[x_j^2],

which reduces to Li et al.'s formula for a single unit with w = 1.
"""

import json

import keras
import numpy as np

import tfnorm
from zoo import experiments
from zoo import studies
from zoo import verdict
from zoo.studies import common

RATES = (0.1, 0.3, 0.5)
SHIFT_FILE = "variance_shift.json"
# The inference-time variances are measured on this many training
# inputs (the data the moving statistics were averaged over), and
# PreciseBN re-estimates the statistics from this many batches of 128.
SHIFT_EXAMPLES = 2_000
PRECISE_BATCHES = 20


@experiments.register
def dropout_variance_shift():
    """Dropout before BN at p 0.1, 0.3, 0.5 vs no dropout: variance shift.

    Paper: Li et al. 2019, https://arxiv.org/abs/1801.05134 (dropout
    before BN makes the variance BN learns in training, (c^2 + v) / q -
    c^2, differ from the variance v it meets at inference, which hurts
    test accuracy; re-estimating the statistics helps). SCIENCE.md E5.

    Command: `tfnorm-zoo run dropout-variance-shift` (`--smoke` in
    seconds); `tfnorm-zoo reproduce` runs it with the other studies.

    Measured: 6 min 53 s for the 20 runs on 2 CPU cores shared with
    other jobs (load about 6). Verdict: not reproduced. Mean ± std over 5
    seeds: the shift is there and grows with p (moving over inference
    variance minus 1: 0.146 ± 0.005 at p 0.1, 0.360 ± 0.010 at 0.3,
    0.513 ± 0.016 at 0.5), but it is 1.28, 1.26 and 1.22 times what the
    formula predicts (± 0.03-0.04), outside the 10% SCIENCE.md allows;
    the formula ignores that in training the earlier BN layers normalize
    with noisy batch statistics, a likely source of the excess (not
    tested here). The accuracy cost did not appear: 0.941 ± 0.002 at p
    0.5 vs 0.944 ± 0.003 without dropout, and PreciseBN with dropout off
    changed no rate's accuracy by more than 0.001.

    A 784-3x256-10 MLP of Dense -> BN -> ReLU -> Dropout(p) blocks (the
    zoo's `bn_dropout` variant: dropout reaches the next BN through a
    Dense layer), and the same without dropout; plain SGD at 0.1, batch
    128, 800 steps, 5 seeds. After training: each BN layer's moving
    variance against its input's variance at inference on 2,000 training
    digits (the measured shift) and against the formula above (the
    predicted shift), and the validation accuracy again after
    `tfnorm.precise_bn` re-estimates every BN layer's statistics with
    dropout off (20 batches of 128). SCIENCE.md's other remedies
    (dropout after the last BN, Uout) are not part of this experiment.
    """
    return experiments.Experiment(
        name="dropout-variance-shift",
        dataset="digits",
        variants=("bn_dropout", "bn_before"),
        hidden_units=(256,) * 3,
        seeds=5,
        learning_rate=0.1,
        batch_size=128,
        steps=800,
        eval_every=100,
        log_every=20,
        histogram_every=400,
        dropout_rate=RATES[-1],
        threshold=0.9,
    )


def grid(experiment):
    """Every dropout rate for `bn_dropout`, and the no-dropout control."""
    # Smoke runs take one rate: the others follow the same code path.
    rates = RATES[-1:] if experiment.smoke else RATES
    runs = []
    for seed in range(experiment.seeds):
        for rate in rates:
            run_experiment = experiment.replace(dropout_rate=rate)
            arm = experiments.Arm(
                f"bn_dropout_p{rate:g}", "bn_dropout", experiment.learning_rate
            )
            runs.append((run_experiment, arm, seed))
        control = experiments.Arm(
            "bn_before", "bn_before", experiment.learning_rate
        )
        runs.append((experiment, control, seed))
    return runs


def _layer(model, name):
    for layer in model.layers:
        if layer.name == name:
            return layer
    return None


def variance_shift(model, x, rate):
    """Measured and predicted variance shift of every BN after a dropout.

    Returns a list of dicts, one per BN layer `norm_i` (i >= 2) whose
    input comes from `dropout_{i-1}` through `dense_i`: the mean over
    units of the inference-time input variance, of the moving variance,
    and of the variance the formula predicts for training.
    """
    pairs = []
    i = 2
    while _layer(model, f"norm_{i}") is not None:
        dropout = _layer(model, f"dropout_{i - 1}")
        if dropout is not None:
            pairs.append((dropout, _layer(model, f"dense_{i}"), f"norm_{i}"))
        i += 1
    if not pairs:
        return []
    probe = keras.Model(
        model.input,
        [d.input for d, _, _ in pairs]
        + [_layer(model, n).input for _, _, n in pairs],
    )
    outputs = [np.asarray(o, np.float64) for o in probe(x, training=False)]
    inputs, bn_inputs = outputs[: len(pairs)], outputs[len(pairs) :]
    q = 1.0 - rate
    rows = []
    for (_, dense, name), dropped, y in zip(
        pairs, inputs, bn_inputs, strict=True
    ):
        kernel = np.asarray(dense.kernel.numpy(), np.float64)
        test_var = y.var(axis=0)
        # (1 - q) / q * sum_j w_ji^2 E[x_j^2], per output unit i.
        extra = (1 - q) / q * (np.mean(dropped**2, axis=0) @ kernel**2)
        moving = np.asarray(_layer(model, name).moving_variance.numpy())
        rows.append(
            {
                "layer": name,
                "test_variance": float(np.mean(test_var)),
                "moving_variance": float(np.mean(moving)),
                "predicted_variance": float(np.mean(test_var + extra)),
            }
        )
    return rows


class ShiftProbe(keras.callbacks.Callback):
    """After training: the variance shift, and accuracy after PreciseBN.

    The BN statistics that PreciseBN writes are put back afterwards, so
    the run's weights stay those it trained. Results go to
    `variance_shift.json` in the run folder.
    """

    def __init__(self, split, rate, run_dir):
        super().__init__()
        self.split = split
        self.rate = rate
        self.path = run_dir / SHIFT_FILE

    def _val_accuracy(self):
        x = self.split.model_inputs(self.split.x_val)
        logits = np.asarray(self.model.predict(x, batch_size=500, verbose=0))
        if not np.all(np.isfinite(logits)):
            return None
        return float(np.mean(np.argmax(logits, -1) == self.split.y_val))

    def on_train_end(self, logs=None):
        x = self.split.model_inputs(self.split.x_train[:SHIFT_EXAMPLES])
        rows = variance_shift(self.model, x, self.rate)
        before = self._val_accuracy()
        saved = [(v, v.numpy()) for v in self.model.non_trainable_variables]
        batches = [x[i : i + 128] for i in range(0, len(x) - 127, 128)]
        tfnorm.precise_bn(
            self.model, batches[:PRECISE_BATCHES], PRECISE_BATCHES
        )
        after = self._val_accuracy()
        for variable, value in saved:
            variable.assign(value)
        record = {
            "rate": self.rate,
            "layers": rows,
            "val_accuracy_ema": before,
            "val_accuracy_precise_bn": after,
        }
        self.path.write_text(json.dumps(record, indent=2) + "\n")


def _callbacks(experiment, split, run_dir):
    return [ShiftProbe(split, experiment.dropout_rate, run_dir)]


def shift_ratio(rows):
    """Measured over predicted shift, averaged over the BN layers.

    Shift: how much the training-time variance exceeds the inference one,
    relative to it (moving / test - 1, and predicted / test - 1).
    """
    ratios = []
    for row in rows:
        measured = row["moving_variance"] / row["test_variance"] - 1
        predicted = row["predicted_variance"] / row["test_variance"] - 1
        if predicted > 0:
            ratios.append(measured / predicted)
    return float(np.mean(ratios)) if ratios else float("nan")


def evaluate_shift(ratios, ema, precise, rates):
    """E5's checks.

    Args:
        ratios: `{rate: [measured / predicted shift per seed]}`.
        ema: `{rate: [val accuracy with the moving statistics]}`.
        precise: `{rate: [val accuracy after PreciseBN, dropout off]}`.
        rates: The dropout rates; re-estimation is judged at the largest.
    """
    checks = [
        verdict.close(
            f"measured shift matches the formula within 10% at p {rate:g} "
            "(measured / predicted)",
            ratios[rate],
            [1.0] * len(ratios[rate]),
            tolerance=0.1,
        )
        for rate in rates
    ]
    top = max(rates)
    checks.append(
        verdict.greater(
            f"re-estimating BN statistics (dropout off) recovers accuracy "
            f"at p {top:g}",
            precise[top],
            ema[top],
        )
    )
    return checks


def _load(exp_dir, run):
    path = studies.run_dir(exp_dir, run) / SHIFT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _evaluate(exp_dir, runs):
    ratios, ema, precise, shifts = {}, {}, {}, {}
    control = []
    for run in sorted(runs, key=lambda r: r.result["seed"]):
        if run.config["variant"] != "bn_dropout":
            control.append(common.final_accuracy(run))
            continue
        record = _load(exp_dir, run)
        rate = run.config["dropout_rate"]
        if record is None or record["val_accuracy_ema"] is None:
            ema.setdefault(rate, []).append(common.CHANCE)
            precise.setdefault(rate, []).append(common.CHANCE)
            continue
        ratios.setdefault(rate, []).append(shift_ratio(record["layers"]))
        shifts.setdefault(rate, []).append(
            np.mean(
                [
                    r["moving_variance"] / r["test_variance"] - 1
                    for r in record["layers"]
                ]
            )
        )
        ema.setdefault(rate, []).append(record["val_accuracy_ema"])
        precise.setdefault(rate, []).append(
            record["val_accuracy_precise_bn"] or common.CHANCE
        )
    rates = sorted(ema)
    ratios = {r: common.finite(ratios.get(r, [])) for r in rates}
    checks = evaluate_shift(ratios, ema, precise, rates)
    top = max(rates)
    headline = (
        f"at p {top:g}: shift measured / predicted "
        f"{verdict.Stat.of(ratios[top]).text(2)}; val accuracy "
        f"{verdict.Stat.of(ema[top]).text(3)} -> "
        f"{verdict.Stat.of(precise[top]).text(3)} after PreciseBN"
    )
    lines = [
        "| p | measured shift | measured / predicted | val accuracy | "
        "after PreciseBN |",
        "|---|---|---|---|---|",
    ]
    for rate in rates:
        lines.append(
            f"| {rate:g} | {verdict.Stat.of(shifts.get(rate, [])).text(3)} | "
            f"{verdict.Stat.of(ratios[rate]).text(2)} | "
            f"{verdict.Stat.of(ema[rate]).text(3)} | "
            f"{verdict.Stat.of(precise[rate]).text(3)} |"
        )
    lines.append(
        f"| no dropout | — | — | {verdict.Stat.of(control).text(3)} | — |"
    )
    markdown = "\n".join(
        [
            "## Measured",
            "",
            *lines,
            "",
            "Measured shift: the BN layers' moving variance over their "
            "input's variance at inference, minus 1 (mean over units, then "
            "over the BN layers after the first). Predicted: the same from "
            "the formula in `zoo/studies/dropout_shift.py`. Accuracy: final "
            "validation accuracy with the moving statistics, then after "
            "PreciseBN re-estimated them with dropout off.",
        ]
    )
    _plot(exp_dir, rates, ema, precise, control)
    return studies.Evaluation(
        checks=checks,
        headline=headline,
        markdown=markdown,
        plots=(("recovery.png", "accuracy before and after PreciseBN"),),
    )


def _plot(exp_dir, rates, ema, precise, control):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for table, label in ((ema, "moving statistics"), (precise, "PreciseBN")):
        stats = [verdict.Stat.of(table[r]) for r in rates]
        ax.errorbar(
            rates,
            [s.mean for s in stats],
            yerr=[0 if s.n < 2 else s.std for s in stats],
            marker="o",
            capsize=3,
            label=label,
        )
    if control:
        ax.axhline(
            np.mean(control), color="grey", linestyle=":", label="no dropout"
        )
    ax.set_xlabel("dropout rate p")
    ax.set_ylabel("final val accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    common.save(fig, exp_dir / "recovery.png")


studies.register(
    studies.Study(
        name="dropout-variance-shift",
        claim="Dropout before BN shifts the variance BN sees between "
        "training and inference, (c^2 + v) / q - c^2 vs v, and costs test "
        "accuracy that re-estimated statistics recover.",
        paper="Li et al. 2019, https://arxiv.org/abs/1801.05134",
        paper_result="the measured shift follows the formula; on "
        "CIFAR-10/100 each remedy (dropout after the last BN, Uout, "
        "re-estimated statistics) gains accuracy (the paper's tables; "
        "not restated here).",
        criteria="the measured shift matches the formula within about 10%, "
        "and dropout-before-BN loses accuracy that re-estimation partly "
        "recovers.",
        evaluate=_evaluate,
        callbacks=_callbacks,
        grid=grid,
    )
)
