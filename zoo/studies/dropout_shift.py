"""E5: dropout before BN and the variance shift (Li et al. 2019,
https://arxiv.org/abs/1801.05134), at CPU scale, with the paper's
remedies.

Dropout scales each kept unit by 1/q (q = 1 - p), which leaves its mean
but not its variance unchanged: a unit with mean c and variance v has
variance (c^2 + v) / q - c^2 in training and v at inference. A BN layer
after it learns its moving variance in training and applies it at
inference, where the input's variance is smaller. Here dropout reaches
BN through a Dense layer, y = sum_j w_j x_j m_j, where the same argument
gives, for multiplicative noise m_j of mean 1 and variance s^2 drawn
independently of the inputs,

    Var_train(y) = Var_test(y) + s^2 * sum_j w_j^2 E[x_j^2],

with s^2 = (1 - q) / q for dropout, which reduces to Li et al.'s formula
for a single unit with w = 1, and s^2 = b^2 / 3 for Uout's uniform noise
of half-width b. The remedies: dropout only after the last BN (no BN
sees it), Uout in place of dropout, and statistics re-estimated with
dropout off (PreciseBN)."""

import json

import keras
import numpy as np

import tfnorm
from zoo import experiments
from zoo import studies
from zoo import verdict
from zoo.studies import common

RATES = (0.1, 0.3, 0.5)
# The remedy arms, at the largest rate: `bn_dropout` with the dropout
# only after the last BN, and with Uout (half-width = that rate) in place
# of every dropout (`zoo.models.with_dropout_options`).
REMEDIES = {
    "bn_dropout_last": {"dropout_blocks": "last"},
    "bn_uout": {"dropout_layer": "uout"},
}
# The arms' names in the report, by kind.
ARM_NAMES = {
    "dropout": "dropout before BN",
    "last": "dropout after the last BN",
    "uout": "Uout before BN",
}
# "Much smaller": Uout's measured shift at most this fraction of dropout's.
UOUT_SHIFT_FACTOR = 3.0
SHIFT_FILE = "variance_shift.json"
# The inference-time variances are measured on this many training
# inputs (the data the moving statistics were averaged over), and
# PreciseBN re-estimates the statistics from this many batches of 128.
SHIFT_EXAMPLES = 2_000
PRECISE_BATCHES = 20


@experiments.register
def dropout_variance_shift():
    """Dropout before BN at p 0.1, 0.3, 0.5 vs its remedies: variance shift.

    Paper: Li et al. 2019, https://arxiv.org/abs/1801.05134 (dropout
    before BN makes the variance BN learns in training, (c^2 + v) / q -
    c^2, differ from the variance v it meets at inference, which hurts
    test accuracy; dropout after the last BN, Uout's variance-stable
    noise and re-estimated statistics help). SCIENCE.md E5.

    Command: `tfnorm-zoo run dropout-variance-shift` (`--smoke` in
    seconds); `tfnorm-zoo reproduce` runs it with the other studies.

    Measured: 4 min 14 s for the 30 runs on 2 CPU cores (load about 2;
    the process used 3 min 58 s of CPU). Verdict: inconclusive. Mean ±
    std over 5 seeds: the shift is there, grows with p and follows the
    formula (training over inference variance minus 1: 0.154 ± 0.007
    at p 0.1, 0.380 ± 0.011 at 0.3, 0.550 ± 0.018 at 0.5; measured over
    predicted 1.00 ± 0.01, 0.99 ± 0.01 and 1.00 ± 0.01; Uout 0.99 ±
    0.01). The formula holds when it is given the dropout's input as it
    is in training: applied to that input as it is at inference, it
    predicts only 1/1.32-1/1.35 of the shift, because the input of the
    second dropout carries the first one's noise in training and not at
    inference, so the shifts compound with depth (an earlier version of
    this study compared it that way and missed by 1.22-1.28x). The
    moving variance lags the training variance a little (moving-average
    shift 0.146, 0.360, 0.513). Uout's shift is 0.123 ± 0.002, 4.5
    times smaller than dropout's at the same 0.5. At p 0.5 dropout
    before BN ends at 0.941 ± 0.002, below both remedies, dropout after
    the last BN 0.953 ± 0.003 and Uout 0.954 ± 0.004 (beyond the
    spread), and level with no dropout (0.944 ± 0.003); at p 0.1 it is
    ahead (0.955 ± 0.004). PreciseBN with dropout off moved no arm's
    mean accuracy by more than 0.001, so the loss at p 0.5 is not the
    moving statistics' mismatch at inference (the check that
    re-estimation recovers accuracy is inside the spread, hence
    inconclusive); the remedies also carry less noise (one dropout
    layer instead of three; Uout's noise variance is 1/12 of
    dropout's), which this design does not separate from the shift.

    A 784-3x256-10 MLP of Dense -> BN -> ReLU -> Dropout(p) blocks (the
    zoo's `bn_dropout` variant: dropout reaches the next BN through a
    Dense layer) at p 0.1, 0.3 and 0.5; at p 0.5 two remedies, the same
    network with dropout only after the last block (after the last BN,
    before the classifier) and with `tfnorm.Uout` of half-width 0.5 in
    place of every dropout (the same number as p, this zoo's choice);
    and the network without dropout. Plain SGD at 0.1, batch 128, 800
    steps, 5 seeds. After training, on 2,000 training digits: each BN
    layer's input variance in training (batches of 128, dropout on, BN
    statistics put back afterwards) against its variance at inference
    (the measured shift) and against the formula above applied to the
    dropout's input in training (the predicted shift), the moving
    variance, and the validation accuracy again after `tfnorm.precise_bn`
    re-estimates every BN layer's statistics with dropout off (20
    batches of 128), the third remedy.
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
    """Every dropout rate for `bn_dropout`, the remedies, the control."""
    # Smoke runs take one rate: the others follow the same code path.
    rates = RATES[-1:] if experiment.smoke else RATES
    lr = experiment.learning_rate
    runs = []
    for seed in range(experiment.seeds):
        for rate in rates:
            run_experiment = experiment.replace(dropout_rate=rate)
            arm = experiments.Arm(f"bn_dropout_p{rate:g}", "bn_dropout", lr)
            runs.append((run_experiment, arm, seed))
        for name, changes in REMEDIES.items():
            run_experiment = experiment.replace(
                dropout_rate=RATES[-1], **changes
            )
            arm = experiments.Arm(f"{name}_p{RATES[-1]:g}", "bn_dropout", lr)
            runs.append((run_experiment, arm, seed))
        control = experiments.Arm("bn_before", "bn_before", lr)
        runs.append((experiment, control, seed))
    return runs


def _layer(model, name):
    for layer in model.layers:
        if layer.name == name:
            return layer
    return None


def noise_variance(layer, rate):
    """Variance of the multiplicative noise of a dropout layer (mean 1).

    Dropout keeps a unit with probability q = 1 - rate and scales it by
    1/q: variance (1 - q) / q. Uout multiplies by 1 + u, u uniform in
    [-rate, rate]: variance rate^2 / 3.
    """
    if layer == "uout":
        return rate**2 / 3
    return rate / (1 - rate)


def variance_shift(model, x, rate, layer="dropout", batch_size=128):
    """Measured and predicted variance shift of every BN after a dropout.

    Returns a list of dicts, one per BN layer `norm_i` (i >= 2) whose
    input comes from `dropout_{i-1}` through `dense_i`, each a mean over
    units:

    - `test_variance`: the BN input's variance at inference;
    - `train_variance`: its variance in training (dropout on, earlier BN
      layers on batch statistics), per batch of `batch_size` as BN sees
      it, averaged over the batches of `x`;
    - `moving_variance`: what BN learned and applies at inference;
    - `predicted_variance`: the formula, with the dropout's input as it
      is in training;
    - `predicted_from_test_input`: the formula with that input as it is
      at inference.

    The last two differ after the first dropout: in training the input
    of a later dropout already carries the earlier ones' noise, which is
    gone at inference, so the shifts compound with depth. `layer` is the
    dropout layers' kind (`"dropout"` or `"uout"`, as
    `zoo.models.DROPOUT_LAYERS`); none of them: an empty list. The
    model's variables (BN statistics, seed states) are as they were.
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
    if len(x) < batch_size:
        raise ValueError(
            f"variance_shift needs at least one batch of {batch_size} "
            f"examples. Received: {len(x)} examples"
        )
    probe = keras.Model(
        model.input,
        [d.input for d, _, _ in pairs]
        + [_layer(model, n).input for _, _, n in pairs],
    )
    noise = noise_variance(layer, rate)
    kernels = [np.asarray(d.kernel.numpy(), np.float64) for _, d, _ in pairs]

    def measure(inputs, training):
        outputs = [
            np.asarray(o, np.float64) for o in probe(inputs, training=training)
        ]
        dropped, bn_inputs = outputs[: len(pairs)], outputs[len(pairs) :]
        # The formula: the variance without this dropout's noise plus
        # s^2 * sum_j w_ji^2 E[x_j^2], per output unit i.
        predicted = [
            (d @ k).var(axis=0) + noise * (np.mean(d**2, axis=0) @ k**2)
            for d, k in zip(dropped, kernels, strict=True)
        ]
        return [y.var(axis=0) for y in bn_inputs], predicted

    test, from_test = measure(x, training=False)
    # A training-mode call updates the BN statistics and draws from the
    # dropout layers' seed states: put every variable back afterwards.
    saved = [(v, v.numpy()) for v in model.variables]
    try:
        batches = [
            measure(x[b : b + batch_size], training=True)
            for b in range(0, len(x) - batch_size + 1, batch_size)
        ]
    finally:
        for variable, value in saved:
            variable.assign(value)
    rows = []
    for k, (_, _, name) in enumerate(pairs):
        moving = _layer(model, name).moving_variance.numpy()
        rows.append(
            {
                "layer": name,
                "test_variance": float(np.mean(test[k])),
                "train_variance": float(np.mean([b[0][k] for b in batches])),
                "moving_variance": float(np.mean(moving)),
                "predicted_variance": float(
                    np.mean([b[1][k] for b in batches])
                ),
                "predicted_from_test_input": float(np.mean(from_test[k])),
            }
        )
    return rows


class ShiftProbe(keras.callbacks.Callback):
    """After training: the variance shift, and accuracy after PreciseBN.

    The BN statistics that PreciseBN writes are put back afterwards, so
    the run's weights stay those it trained. Results go to
    `variance_shift.json` in the run folder.
    """

    def __init__(self, split, rate, run_dir, layer="dropout"):
        super().__init__()
        self.split = split
        self.rate = rate
        self.layer = layer
        self.path = run_dir / SHIFT_FILE

    def _val_accuracy(self):
        x = self.split.model_inputs(self.split.x_val)
        logits = np.asarray(self.model.predict(x, batch_size=500, verbose=0))
        if not np.all(np.isfinite(logits)):
            return None
        return float(np.mean(np.argmax(logits, -1) == self.split.y_val))

    def on_train_end(self, logs=None):
        x = self.split.model_inputs(self.split.x_train[:SHIFT_EXAMPLES])
        rows = variance_shift(self.model, x, self.rate, self.layer)
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
            "dropout_layer": self.layer,
            "layers": rows,
            "val_accuracy_ema": before,
            "val_accuracy_precise_bn": after,
        }
        self.path.write_text(json.dumps(record, indent=2) + "\n")


def _callbacks(experiment, split, run_dir):
    return [
        ShiftProbe(
            split, experiment.dropout_rate, run_dir, experiment.dropout_layer
        )
    ]


def shift(rows, variance="train_variance"):
    """A variance shift, averaged over the BN layers after a dropout.

    Shift: how much a training-time variance (`variance`, a key of
    `variance_shift`'s rows) exceeds the inference one, relative to it
    (train / test - 1). NaN for records without that key (written before
    it was measured) and for no rows.
    """
    values = [
        row[variance] / row["test_variance"] - 1
        for row in rows
        if variance in row
    ]
    return float(np.mean(values)) if values else float("nan")


def shift_ratio(rows):
    """Measured over predicted shift, averaged over the BN layers.

    Measured: the training-time variance over the inference one, minus
    1; predicted: the formula's training-time variance over the same,
    minus 1. NaN for records written before the training-time variance
    was measured.
    """
    ratios = []
    for row in rows:
        if "train_variance" not in row:
            continue
        measured = row["train_variance"] / row["test_variance"] - 1
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


def evaluate_remedies(accuracy, shift, rate):
    """E5's checks of the remedies, at dropout rate `rate`.

    Args:
        accuracy: `{arm: [final val accuracy per seed]}` for the arms
            `"dropout"` (before every BN), `"last"` (after the last BN
            only) and `"uout"` (Uout before every BN).
        shift: `{arm: [measured shift per seed]}` for `"dropout"` and
            `"uout"`.
        rate: The rate (and Uout's half-width) of these arms.
    """
    return [
        verdict.greater(
            f"dropout after the last BN beats dropout before BN at p "
            f"{rate:g} (val accuracy)",
            accuracy["last"],
            accuracy["dropout"],
        ),
        verdict.greater(
            f"Uout before BN beats dropout before BN at p {rate:g} (val "
            "accuracy)",
            accuracy["uout"],
            accuracy["dropout"],
        ),
        verdict.times(
            f"dropout's variance shift is at least "
            f"{UOUT_SHIFT_FACTOR:g} times Uout's at p {rate:g}",
            shift["dropout"],
            shift["uout"],
            factor=UOUT_SHIFT_FACTOR,
        ),
    ]


def _load(exp_dir, run):
    path = studies.run_dir(exp_dir, run) / SHIFT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(run):
    """`(arm kind, rate)`: kind `dropout`, `last`, `uout` or `none`."""
    config = run.config
    if config["variant"] != "bn_dropout":
        return "none", None
    if config.get("dropout_blocks", "all") == "last":
        return "last", config["dropout_rate"]
    return config.get("dropout_layer", "dropout"), config["dropout_rate"]


def _measures(exp_dir, run):
    """A run's accuracies and variance shifts, from its probe's record.

    Accuracies are chance for a diverged run; shifts are NaN where no BN
    follows a dropout.
    """
    record = _load(exp_dir, run)
    if record is None or record["val_accuracy_ema"] is None:
        return dict(
            ema=common.CHANCE,
            precise=common.CHANCE,
            shift=float("nan"),
            moving_shift=float("nan"),
            ratio=float("nan"),
            naive_ratio=float("nan"),
        )
    rows = record["layers"]
    naive = [
        dict(row, predicted_variance=row["predicted_from_test_input"])
        for row in rows
        if "predicted_from_test_input" in row
    ]
    return dict(
        ema=record["val_accuracy_ema"],
        precise=record["val_accuracy_precise_bn"] or common.CHANCE,
        shift=shift(rows),
        moving_shift=shift(rows, "moving_variance"),
        ratio=shift_ratio(rows),
        naive_ratio=shift_ratio(naive),
    )


def _evaluate(exp_dir, runs):
    cells = common.by_arm(runs, lambda r: _measures(exp_dir, r), key=_cell)

    def column(cell, name):
        values = [measures[name] for measures in cells.get(cell, [])]
        return values if name in ("ema", "precise") else common.finite(values)

    def stat(cell, name, digits=3):
        return verdict.Stat.of(column(cell, name)).text(digits)

    # Every dropout arm of the grid, and the remedies beside the largest
    # rate: a missing one would drop its checks and leave a verdict on
    # the rest. A KeyError, so that the report names the arm.
    rates = RATES[-1:] if runs[0].config.get("smoke") else RATES
    top = RATES[-1]
    labels = {("dropout", rate): f"bn_dropout_p{rate:g}" for rate in rates}
    labels["last", top] = f"bn_dropout_last_p{top:g}"
    labels["uout", top] = f"bn_uout_p{top:g}"
    missing = [label for cell, label in labels.items() if cell not in cells]
    if missing:
        raise KeyError(", ".join(missing))
    ratios = {r: column(("dropout", r), "ratio") for r in rates}
    ema = {r: column(("dropout", r), "ema") for r in rates}
    precise = {r: column(("dropout", r), "precise") for r in rates}
    checks = evaluate_shift(ratios, ema, precise, rates)
    checks += evaluate_remedies(
        {kind: column((kind, top), "ema") for kind in ARM_NAMES},
        {kind: column((kind, top), "shift") for kind in ("dropout", "uout")},
        top,
    )
    headline = (
        f"at p {top:g}: shift measured / predicted "
        f"{stat(('dropout', top), 'ratio', 2)}; val accuracy "
        f"{stat(('dropout', top), 'ema')} -> "
        f"{stat(('dropout', top), 'precise')} after PreciseBN"
    )
    headline += (
        f"; shift with Uout {stat(('uout', top), 'shift')} vs "
        f"{stat(('dropout', top), 'shift')} with dropout"
    )
    table = [
        "| arm | p | measured shift | measured / predicted | formula on "
        "inference inputs | moving-average shift | val accuracy | after "
        "PreciseBN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [(("dropout", r), ARM_NAMES["dropout"]) for r in rates]
    rows += [((k, top), ARM_NAMES[k]) for k in ("last", "uout")]
    rows.append((("none", None), "no dropout"))
    for cell, name in rows:
        if cell not in cells:
            continue
        rate = "—" if cell[1] is None else f"{cell[1]:g}"
        table.append(
            f"| {name} | {rate} | {stat(cell, 'shift')} | "
            f"{stat(cell, 'ratio', 2)} | {stat(cell, 'naive_ratio', 2)} | "
            f"{stat(cell, 'moving_shift')} | {stat(cell, 'ema')} | "
            f"{stat(cell, 'precise')} |"
        )
    markdown = common.measured(
        table,
        "Measured shift: a BN layer's input variance in training (batches "
        "of 128, dropout on) over its variance at inference, minus 1 (mean "
        "over units, then over the BN layers after the first, which follow "
        "a dropout; — where none does). Predicted: the same with the "
        "training variance from the formula in "
        "`zoo/studies/dropout_shift.py` (the noise variance of dropout or "
        "of Uout), applied to the dropout's input as it is in training. "
        "Formula on inference inputs: the same ratio with the formula "
        "applied to the dropout's input at inference, as if the earlier "
        "dropouts' noise did not reach it in training; it misses the "
        "compounding. Moving-average shift: the moving variance BN applies "
        "at inference over the inference variance, minus 1. Accuracy: "
        "final validation accuracy with the moving statistics, then after "
        "PreciseBN re-estimated them with dropout off. Uout's p is the "
        "half-width of its noise.",
    )
    _plot(exp_dir, rates, top, cells, column)
    return studies.Evaluation(
        checks=checks,
        headline=headline,
        markdown=markdown,
        plots=(("recovery.png", "accuracy of each arm and after PreciseBN"),),
    )


def _plot(exp_dir, rates, top, cells, column):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("ema", "moving statistics"), ("precise", "PreciseBN")):
        common.errorbars(
            ax,
            rates,
            [column(("dropout", r), name) for r in rates],
            label=f"dropout before BN, {label}",
        )
    for kind, marker in (("last", "s"), ("uout", "^")):
        if (kind, top) in cells:
            common.errorbars(
                ax,
                [top],
                [column((kind, top), "ema")],
                label=ARM_NAMES[kind],
                marker=marker,
            )
    control = column(("none", None), "ema")
    if control:
        ax.axhline(
            np.mean(control), color="grey", linestyle=":", label="no dropout"
        )
    ax.set_xlabel("dropout rate p (Uout: half-width)")
    ax.set_ylabel("final val accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    common.save(fig, exp_dir / "recovery.png")


studies.register(
    studies.Study(
        name="dropout-variance-shift",
        claim="Dropout before BN shifts the variance BN sees between "
        "training and inference, (c^2 + v) / q - c^2 vs v, and costs test "
        "accuracy that dropout after the last BN, Uout's variance-stable "
        "noise or re-estimated statistics recover.",
        paper="Li et al. 2019, https://arxiv.org/abs/1801.05134",
        paper_result="the measured shift follows the formula; on "
        "CIFAR-10/100 each remedy (dropout after the last BN, Uout, "
        "re-estimated statistics) gains accuracy (the paper's tables; "
        "not restated here).",
        criteria="the measured shift matches the formula within about 10%, "
        "and dropout-before-BN loses accuracy that re-estimation partly "
        "recovers; it also loses to the remedy arms (dropout after the "
        "last BN, Uout), and Uout's measured shift is much smaller than "
        "dropout's (at most a third).",
        evaluate=_evaluate,
        callbacks=_callbacks,
        grid=grid,
    )
)
