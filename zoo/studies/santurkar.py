"""E1 and E2: Santurkar et al. 2018, "How does batch normalization help
optimization?" (https://arxiv.org/abs/1805.11604), at CPU scale.

E1 `santurkar-lr`: BN, no BN and noisy BN at two learning rates, with the
drift of every layer's input distribution. E2 `santurkar-landscape`:
internal covariate shift (Definition 2.1) and the loss-landscape probe
along the gradient, with and without BN, through `tfnorm.diagnostics`.
"""

import numpy as np

import tfnorm
from zoo import experiments
from zoo import studies
from zoo import verdict
from zoo.studies import common
from zoo.studies import recorder

# Layer statistics and drift are measured on these fixed validation
# inputs; the landscape and ICS probes on training batches of this many
# consecutive examples, one batch per probe, cycling.
PROBE_EXAMPLES = 256
PROBE_BATCHES = 20

# E2's deep linear arm (Santurkar et al., Fig. 5b: in a 25-layer deep
# linear network BN's ICS comes out larger): 25 Dense layers of width 64
# (24 hidden and the logits) without activation, with and without BN
# after every hidden one, at two plain SGD rates: 0.01, the largest of
# {0.001, 0.01, 0.05} at which the unnormalized net trained in a first
# trial (it diverged at 0.05), and ten times smaller. Arms and folders
# are labelled `dln_{variant}_lr{rate}`.
DEEP_LINEAR = "dln"
DEEP_LINEAR_DEPTH = 25
DEEP_LINEAR_WIDTH = 64
DEEP_LINEAR_RATES = (0.001, 0.01)


@experiments.register
def santurkar_lr():
    """BN vs no BN vs noisy BN at learning rates 0.05 and 0.5: 6x256 MLP.

    Paper: Santurkar et al. 2018, https://arxiv.org/abs/1805.11604 (Figs
    1-2: BN trains faster and tolerates larger rates; noisy BN, whose
    layer inputs are the least stable, nearly matches BN). SCIENCE.md E1.

    Command: `tfnorm-zoo run santurkar-lr` (`--smoke` in seconds);
    `tfnorm-zoo reproduce` runs it with the other studies.

    Measured: 9 min 05 s for the 18 runs on 2 CPU cores shared with other
    jobs (load about 6). Verdict: inconclusive. Validation accuracy at
    step 1,000, mean ± std over 3 seeds (a diverged run counted at
    chance): at LR 0.5, BN 0.955 ± 0.001, noisy BN 0.953 ± 0.006, no BN
    0.660 ± 0.485 (two seeds trained to 0.927 and 0.953, one diverged at
    step 497); at LR 0.05, no BN 0.938 ± 0.003, BN 0.934 ± 0.005, noisy
    BN 0.949 ± 0.002. Noisy BN's layer inputs drift the most by far
    (0.395 vs BN 0.002-0.007 and no BN 0.05-0.12) and it ends within 2
    points of BN, as the paper says; but BN does not beat the plain net
    at 0.05, and at 0.5 the plain net fails on one seed of three, not at
    chance as in the paper.

    A 784-6x256-10 ReLU MLP (Keras's default initialization) on the 5,000
    MNIST digits (4,000 / 1,000), plain SGD at 0.05 and 0.5, batch 128,
    1,000 steps (32 passes), 3 seeds. Noisy BN is the zoo's
    `NoisyBatchNormalization`: per step and unit a scale from U(0.5, 1.5)
    and a shift from U(-1, 1), plus per-sample N(0, 0.25^2). Every 100
    steps, `tfnorm.diagnostics.layer_statistics` measures each layer's
    input on 256 fixed validation images in training mode (noise and
    batch statistics included); the drift is the root mean square change
    of the per-unit mean and std since the previous measurement.
    """
    return experiments.Experiment(
        name="santurkar-lr",
        dataset="digits",
        variants=("none", "bn_before", "noisy_bn"),
        learning_rates=(0.05, 0.5),
        batch_size=128,
        steps=1_000,
        eval_every=100,
        log_every=20,
        histogram_every=250,
        threshold=0.9,
    )


def _drift_callbacks(experiment, split, run_dir):
    probe = tfnorm.diagnostics.LayerStatisticsCallback(
        split.model_inputs(split.x_val[:PROBE_EXAMPLES]),
        period=experiment.eval_every,
    )
    return [
        probe,
        recorder.DiagnosticsRecorder(
            run_dir, [(probe, recorder.flatten_layers)]
        ),
    ]


def _drift_tags(lines):
    """Input drift tags of every kernel layer but the first.

    The first layer's input is the fixed probe batch itself; its drift
    is zero by construction.
    """
    tags = sorted(
        {
            tag
            for line in lines
            for tag in line
            if tag.endswith(("/input_mean_drift", "/input_std_drift"))
            and not tag.startswith("layers/dense_1/")
            and not tag.startswith("layers/norm_")
        }
    )
    return tags


def _run_drift(exp_dir, run):
    """Mean input drift over the run's measurements and kernel layers."""
    lines = recorder.load(studies.run_dir(exp_dir, run))
    return common.mean_of(lines, _drift_tags(lines))


def _drift_curve(exp_dir, run):
    lines = recorder.load(studies.run_dir(exp_dir, run))
    tags = _drift_tags(lines)
    return {
        line["step"]: common.mean_of([line], tags)
        for line in lines
        if any(tag in line for tag in tags)
    }


def evaluate_lr(accuracy, drift, learning_rates):
    """E1's checks from per-seed tables.

    Args:
        accuracy: `{(variant, lr): [final val accuracy per seed]}`, a
            diverged run entered at chance.
        drift: `{(variant, lr): [mean input drift per seed]}`.
        learning_rates: The learning rates of the grid; the largest is
            where no BN should fail.

    Returns:
        A list of `zoo.verdict.Check`.
    """
    checks = []
    for lr in learning_rates:
        bn, none, noisy = (
            accuracy[(v, lr)] for v in ("bn_before", "none", "noisy_bn")
        )
        checks += [
            verdict.greater(f"BN beats no BN at LR {lr:g}", bn, none),
            verdict.greater(f"noisy BN beats no BN at LR {lr:g}", noisy, none),
            verdict.close(
                f"noisy BN within 2 points of BN at LR {lr:g}",
                noisy,
                bn,
                tolerance=0.02,
            ),
        ]
    for lr in learning_rates:
        noisy = drift[("noisy_bn", lr)]
        for other, text in (("bn_before", "BN"), ("none", "no BN")):
            checks.append(
                verdict.greater(
                    f"noisy BN's layer inputs drift more than {text}'s "
                    f"at LR {lr:g}",
                    noisy,
                    drift[(other, lr)],
                    digits=3,
                )
            )
    top = max(learning_rates)
    checks.append(
        verdict.below(
            f"no BN fails at LR {top:g} (accuracy below 0.2, chance 0.1)",
            accuracy[("none", top)],
            0.2,
        )
    )
    return checks


def _evaluate_lr(exp_dir, runs):
    accuracy = common.by_arm(runs, common.final_accuracy)
    drift = common.by_arm(runs, lambda run: _run_drift(exp_dir, run))
    # A run whose probes all saw diverged weights has no drift to compare.
    drift = {key: common.finite(values) for key, values in drift.items()}
    learning_rates = sorted({lr for _, lr in accuracy})
    checks = evaluate_lr(accuracy, drift, learning_rates)

    top = max(learning_rates)
    headline = ", ".join(
        f"{name} {verdict.Stat.of(accuracy[(v, top)]).text(3)}"
        for v, name in (
            ("bn_before", "BN"),
            ("noisy_bn", "noisy BN"),
            ("none", "no BN"),
        )
    )
    headline = f"val accuracy at LR {top:g}: {headline}"

    lines = [
        "| arm | final val accuracy | mean input drift |",
        "|---|---|---|",
    ]
    for (variant, lr), values in sorted(
        accuracy.items(), key=lambda item: (item[0][1], item[0][0])
    ):
        lines.append(
            f"| {variant}, LR {lr:g} | {verdict.Stat.of(values).text(3)} | "
            f"{verdict.Stat.of(drift[(variant, lr)]).text(4)} |"
        )
    markdown = "\n".join(
        [
            "## Measured",
            "",
            *lines,
            "",
            "Input drift: root mean square change of each unit's input "
            "mean and std between consecutive measurements (every "
            f"{runs[0].config['eval_every']} steps), averaged over the "
            "kernel layers after the first and over the run.",
        ]
    )
    _plot_drift(exp_dir, runs)
    return studies.Evaluation(
        checks=checks,
        headline=headline,
        markdown=markdown,
        plots=(("drift.png", "layer-input drift per arm"),),
    )


def _plot_drift(exp_dir, runs):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = {}
    for run in runs:
        key = (run.config["variant"], run.config["learning_rate"])
        curves.setdefault(key, []).append(_drift_curve(exp_dir, run))
    for (variant, lr), group in sorted(curves.items(), key=lambda i: i[0][1]):
        common.shared_band(ax, group, f"{variant}, LR {lr:g}")
    ax.set_xlabel("training step")
    ax.set_ylabel("layer-input drift (RMS change)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    common.save(fig, exp_dir / "drift.png")


studies.register(
    studies.Study(
        name="santurkar-lr",
        claim="BN trains faster and tolerates larger learning rates; "
        "noisy BN, whose layer inputs are the least stable, nearly matches "
        "BN.",
        paper="Santurkar et al. 2018, https://arxiv.org/abs/1805.11604",
        paper_result="VGG on CIFAR-10, 15k steps: about 83-84% test "
        "accuracy with BN vs about 80% without; without BN, LR 0.5 stays "
        "at chance; noisy BN close to BN.",
        criteria="BN and noisy BN beat no BN at equal LR; noisy BN ends "
        "within 1-2 points of BN with the largest drift; no BN fails at "
        "the LR where BN trains.",
        evaluate=_evaluate_lr,
        callbacks=_drift_callbacks,
    )
)


@experiments.register
def santurkar_landscape():
    """ICS and landscape with vs without BN: 6x256 MLP; 25-layer linear net.

    Paper: Santurkar et al. 2018, https://arxiv.org/abs/1805.11604 (Figs
    3-4: BN does not reduce internal covariate shift, yet it makes the
    loss and its gradient change far less along the gradient). SCIENCE.md
    E2.

    Command: `tfnorm-zoo run santurkar-landscape` (`--smoke` in
    seconds); `tfnorm-zoo reproduce` runs it with the other studies.

    Measured: 4 min 35 s for the 18 runs (6 MLP, 12 deep linear) on 2
    CPU cores, otherwise idle. Verdict: not reproduced, because of the
    ICS criterion. Mean ± std over 3 seeds: the landscape part agrees
    with the paper by a wide margin (early loss band 2.97 ± 0.50 without
    BN vs 0.021 ± 0.001 with, largest gradient change 15.9 ± 1.8 vs 0.70
    ± 0.05; beta-smoothness 16.5 vs 7.1 on average, though its
    coefficient of variation, 0.53 vs 0.59, does not show BN's as
    flatter: BN's falls steadily from about 14 to 3 rather than staying
    level). But BN's internal covariate shift came out clearly smaller,
    not similar or larger: relative ||G - G'|| / ||G|| 0.40 ± 0.03 with
    BN vs 0.84 ± 0.04 without, cosine 0.92 vs 0.49. In the 25-layer deep
    linear net the same at LR 0.01 (0.26 ± 0.01 with BN vs 0.68 ± 0.04
    without); at LR 0.001 the two lie inside the spread over the run
    (0.055 ± 0.015 vs 0.071 ± 0.014), with BN's the larger during the
    first 200 steps (0.057 ± 0.017 vs 0.028 ± 0.009), as in the paper's
    Fig. 5, and the smaller after. BN's deep linear nets ended ahead in
    accuracy at both rates (0.827 vs 0.749 at 0.001, 0.890 vs 0.874 at
    0.01).

    The E1 MLP without BN and with BN before the ReLU, plain SGD at 0.1
    (so the preceding layers' step in Definition 2.1 is exactly
    -0.1 G), batch 128, 600 steps, 3 seeds. Every 25 steps, on the next
    of 20 fixed training batches: `tfnorm.diagnostics.loss_landscape`
    (8 step sizes in [0.05, 0.4]: loss band, gradient-change band,
    beta-smoothness) and `internal_covariate_shift` of every kernel
    layer. The deep linear arm (Fig. 5): 25 Dense layers of 64 units
    without activation, BN after every hidden one or none, plain SGD at
    0.001 and 0.01, the same steps, seeds and batches, ICS only.
    """
    return experiments.Experiment(
        name="santurkar-landscape",
        dataset="digits",
        variants=("none", "bn_before"),
        learning_rate=0.1,
        batch_size=128,
        steps=600,
        eval_every=100,
        log_every=25,
        histogram_every=200,
        threshold=0.9,
    )


def _probe_batches(split, batch_size):
    x = split.model_inputs(split.x_train[: PROBE_BATCHES * batch_size])
    y = split.y_train[: PROBE_BATCHES * batch_size]
    return [
        (
            x[i * batch_size : (i + 1) * batch_size],
            y[i * batch_size :][:batch_size],
        )
        for i in range(PROBE_BATCHES)
    ]


def deep_linear_grid(experiment):
    """(run experiment, arm, seed) of E2's deep linear arm, seed by seed.

    Every variant of `experiment` on the 25-layer linear net at each rate
    of `DEEP_LINEAR_RATES`; a smoke experiment gets a 4-layer net of
    width 8 at the first rate only.
    """
    depth, width = DEEP_LINEAR_DEPTH, DEEP_LINEAR_WIDTH
    if experiment.smoke:
        depth, width = 4, 8
    cells = [
        experiment.replace(
            hidden_units=(width,) * (depth - 1),
            activation="linear",
            learning_rate=rate,
        )
        for rate in _deep_linear_rates(experiment.smoke)
    ]
    return [
        (
            cell,
            experiments.Arm(
                _deep_linear_label(variant, cell.learning_rate),
                variant,
                cell.learning_rate,
            ),
            seed,
        )
        for seed in range(experiment.seeds)
        for cell in cells
        for variant in experiment.variants
    ]


def _deep_linear_rates(smoke):
    return DEEP_LINEAR_RATES[:1] if smoke else DEEP_LINEAR_RATES


def _deep_linear_label(variant, rate):
    return f"{DEEP_LINEAR}_{variant}_lr{rate:g}"


def grid(experiment):
    """The MLP arms of `experiment`, then the deep linear arm.

    A smoke run has both too (the deep linear arm's two runs of a 4-layer
    net take seconds), so that `--smoke` checks every code path.
    """
    runs = [
        (experiment, arm, seed)
        for seed in range(experiment.seeds)
        for arm in experiment.arms()
    ]
    return runs + deep_linear_grid(experiment)


def _is_deep_linear(run):
    return run.config.get("activation") == "linear"


def _landscape_callbacks(experiment, split, run_dir):
    batches = _probe_batches(split, experiment.batch_size)
    period = experiment.log_every
    ics = tfnorm.diagnostics.InternalCovariateShiftCallback(
        batches, period, learning_rate=experiment.learning_rate
    )
    if experiment.activation == "linear":
        # Fig. 5b measures ICS only. With 24 shifted layers the probe
        # loops over them (`unroll=None`): one full gradient per layer,
        # against half a minute to compile the unrolled graph per run.
        return [
            ics,
            recorder.DiagnosticsRecorder(
                run_dir, [(ics, recorder.flatten_ics)]
            ),
        ]
    landscape = tfnorm.diagnostics.LossLandscapeCallback(batches, period)
    return [
        landscape,
        ics,
        recorder.DiagnosticsRecorder(
            run_dir,
            [
                (landscape, recorder.flatten_landscape),
                (ics, recorder.flatten_ics),
            ],
        ),
    ]


def _ics_tags(lines, key):
    # The first kernel layer has no preceding layer: its shift is zero.
    tags = sorted({t for line in lines for t in line if t.endswith(key)})
    return [t for t in tags if not t.startswith("ics/dense_1/")]


def landscape_measures(lines, steps):
    """Per-run scalars of E2 from its diagnostics lines.

    Returns a dict: early (first third of the run) means of the loss band
    `loss_max - loss_min` and of the largest gradient change; the
    coefficient of variation of beta-smoothness over the run; and the
    mean relative ICS, l2 ICS and cosine over layers and probes.
    """
    early = {line["step"] for line in lines if line["step"] <= steps / 3}
    bands = [
        line["landscape/loss_max"] - line["landscape/loss_min"]
        for line in lines
        if line["step"] in early and line.get("landscape/loss_max") is not None
    ]
    changes = [
        line["landscape/grad_change_max"]
        for line in lines
        if line["step"] in early
        and line.get("landscape/grad_change_max") is not None
    ]
    betas = [
        line["landscape/beta_smoothness"]
        for line in lines
        if line.get("landscape/beta_smoothness") is not None
    ]
    nan = float("nan")
    return {
        "loss_band": float(np.mean(bands)) if bands else nan,
        "grad_change": float(np.mean(changes)) if changes else nan,
        "beta_cv": (
            float(np.std(betas) / np.mean(betas)) if len(betas) > 1 else nan
        ),
        "beta_mean": float(np.mean(betas)) if betas else nan,
        **ics_measures(lines),
    }


def evaluate_landscape(measures):
    """E2's checks from `{variant: [landscape_measures per seed]}`."""

    def column(variant, key):
        return common.finite([m[key] for m in measures[variant]])

    return [
        verdict.times(
            "no BN's early loss band is several (>= 3) times BN's",
            column("none", "loss_band"),
            column("bn_before", "loss_band"),
            factor=3.0,
        ),
        verdict.times(
            "no BN's early gradient change is several (>= 3) times BN's",
            column("none", "grad_change"),
            column("bn_before", "grad_change"),
            factor=3.0,
        ),
        verdict.greater(
            "BN's beta-smoothness is flatter (lower coefficient of "
            "variation over the run) than no BN's",
            column("none", "beta_cv"),
            column("bn_before", "beta_cv"),
        ),
        verdict.not_less(
            "BN's ICS (relative ||G - G'|| / ||G||) is not clearly "
            "smaller than no BN's",
            column("bn_before", "ics_relative"),
            column("none", "ics_relative"),
        ),
    ]


def ics_measures(lines):
    """Mean relative ICS, l2 ICS and cosine over layers and probes.

    The first kernel layer, whose shift is zero by definition, is left
    out. NaN where the run recorded none (a diverged run's probes).
    """
    return {
        "ics_relative": common.mean_of(lines, _ics_tags(lines, "/relative")),
        "ics_l2": common.mean_of(lines, _ics_tags(lines, "/l2")),
        "ics_cosine": common.mean_of(lines, _ics_tags(lines, "/cosine")),
    }


def evaluate_deep_linear(measures, depth=DEEP_LINEAR_DEPTH):
    """E2's deep linear checks from `{(variant, lr): [ics_measures]}`.

    One check per learning rate: BN's relative ICS is not clearly smaller
    than no BN's (the paper finds it larger).
    """
    checks = []
    for lr in sorted({lr for _, lr in measures}):

        def column(variant, lr=lr):
            values = measures.get((variant, lr), [])
            return common.finite([m["ics_relative"] for m in values])

        checks.append(
            verdict.not_less(
                f"in the {depth}-layer deep linear net at LR {lr:g}, BN's "
                "ICS (relative ||G - G'|| / ||G||) is not clearly smaller "
                "than no BN's",
                column("bn_before"),
                column("none"),
            )
        )
    return checks


MEASURE_TEXT = {
    "loss_band": "early loss band",
    "grad_change": "early max gradient change",
    "beta_mean": "beta-smoothness, mean",
    "beta_cv": "beta-smoothness, coefficient of variation",
    "ics_relative": "ICS, relative",
    "ics_l2": "ICS, l2",
    "ics_cosine": "ICS, cosine of G and G'",
}


def _evaluate_landscape(exp_dir, runs):
    mlp_runs = [run for run in runs if not _is_deep_linear(run)]
    deep_runs = [run for run in runs if _is_deep_linear(run)]
    # Both deep linear variants at every rate of the grid: a missing one
    # would leave its rate's check unclear against nothing and a verdict
    # on the rest. A KeyError, so that the report names the arm.
    labels = [
        _deep_linear_label(variant, rate)
        for rate in _deep_linear_rates(runs[0].config.get("smoke"))
        for variant in ("none", "bn_before")
    ]
    found = {run.result["arm"] for run in deep_runs}
    missing = [label for label in labels if label not in found]
    if missing:
        raise KeyError(", ".join(missing))
    if not mlp_runs:
        # A folder of the deep linear arm alone (`--variants` cannot make
        # one, but a copy or a cut-off grid can).
        deep = _evaluate_deep_linear(exp_dir, deep_runs)
        return studies.Evaluation(
            checks=deep["checks"],
            headline=f"deep linear net: {deep['headline']}",
            markdown="\n".join(["## Measured", "", *deep["markdown"]]),
            plots=(("deep_linear_ics.png", deep["caption"]),),
        )
    steps = mlp_runs[0].config["steps"]
    measures = {}
    lines_of = {}
    for run in sorted(mlp_runs, key=lambda r: r.result["seed"]):
        lines = recorder.load(studies.run_dir(exp_dir, run))
        lines_of[id(run)] = lines
        measures.setdefault(run.config["variant"], []).append(
            landscape_measures(lines, steps)
        )
    checks = evaluate_landscape(measures)
    table = ["| measure | no BN | BN |", "|---|---|---|"]
    for key, text in MEASURE_TEXT.items():
        cells = [
            verdict.Stat.of(common.finite([m[key] for m in measures[v]])).text(
                3
            )
            for v in ("none", "bn_before")
        ]
        table.append(f"| {text} | {cells[0]} | {cells[1]} |")

    def stat(variant, key):
        values = common.finite([m[key] for m in measures[variant]])
        return verdict.Stat.of(values).mean

    headline = (
        f"early loss band {stat('none', 'loss_band'):.3g} without BN vs "
        f"{stat('bn_before', 'loss_band'):.3g} with; relative ICS "
        f"{stat('none', 'ics_relative'):.3g} vs "
        f"{stat('bn_before', 'ics_relative'):.3g}"
    )
    sections = [
        "## Measured",
        "",
        *table,
        "",
        f"Probes every {mlp_runs[0].config['log_every']} steps on "
        "training batches; early means the first third of the run "
        f"(steps up to {steps // 3}). ICS averages over the kernel "
        "layers after the first and over the probes.",
    ]
    plots = [
        ("landscape.png", "loss and gradient bands, beta-smoothness"),
        ("ics.png", "internal covariate shift"),
    ]
    _plot_landscape(exp_dir, mlp_runs, lines_of)
    if deep_runs:
        deep = _evaluate_deep_linear(exp_dir, deep_runs)
        checks += deep["checks"]
        headline += f"; deep linear net: {deep['headline']}"
        sections += ["", *deep["markdown"]]
        plots.append(("deep_linear_ics.png", deep["caption"]))
    return studies.Evaluation(
        checks=checks,
        headline=headline,
        markdown="\n".join(sections),
        plots=tuple(plots),
    )


def _layer_index(tag, depth):
    """1-based depth of the kernel layer of an `ics/<layer>/...` tag."""
    name = tag.split("/")[1]
    return int(name.split("_")[1]) if name.startswith("dense_") else depth


def _evaluate_deep_linear(exp_dir, runs):
    """Checks, headline, markdown and plot of the deep linear arm."""
    config = runs[0].config
    depth = len(config["hidden_units"]) + 1
    measures, accuracy, lines_of = {}, {}, {}
    for run in sorted(runs, key=lambda r: r.result["seed"]):
        key = common.variant_and_lr(run)
        lines = recorder.load(studies.run_dir(exp_dir, run))
        lines_of[id(run)] = lines
        measures.setdefault(key, []).append(ics_measures(lines))
        accuracy.setdefault(key, []).append(common.final_accuracy(run))
    checks = evaluate_deep_linear(measures, depth)
    rates = sorted({lr for _, lr in measures})

    def cell(table, variant, lr, key=None):
        values = table.get((variant, lr), [])
        if key is not None:
            values = [m[key] for m in values]
        return verdict.Stat.of(common.finite(values)).text(3)

    rows = ["| measure | no BN | BN |", "|---|---|---|"]
    for lr in rates:
        for key, text in (
            ("ics_relative", "ICS, relative"),
            ("ics_l2", "ICS, l2"),
            ("ics_cosine", "ICS, cosine of G and G'"),
        ):
            rows.append(
                f"| {text}, LR {lr:g} | {cell(measures, 'none', lr, key)} | "
                f"{cell(measures, 'bn_before', lr, key)} |"
            )
        rows.append(
            f"| final val accuracy, LR {lr:g} | "
            f"{cell(accuracy, 'none', lr)} | "
            f"{cell(accuracy, 'bn_before', lr)} |"
        )
    headline = ", ".join(
        f"relative ICS at LR {lr:g} "
        f"{verdict.Stat.of(_relative(measures, 'none', lr)).text(2)} "
        f"without BN vs "
        f"{verdict.Stat.of(_relative(measures, 'bn_before', lr)).text(2)}"
        for lr in rates
    )
    width = config["hidden_units"][0]
    markdown = [
        f"### Deep linear net ({depth} layers of {width}, no activation)",
        "",
        *rows,
        "",
        f"{depth} Dense layers without activation, BN after every hidden "
        f"one or none, plain SGD, {config['steps']} steps; ICS of every "
        f"layer every {config['log_every']} steps on the same training "
        "batches as the MLP, averaged over the layers after the first and "
        "over the probes.",
    ]
    _plot_deep_linear(exp_dir, runs, lines_of, rates, depth)
    return {
        "checks": checks,
        "headline": headline,
        "markdown": markdown,
        "caption": "ICS in the deep linear net, over training and by depth",
    }


def _relative(measures, variant, lr):
    return common.finite(
        [m["ics_relative"] for m in measures.get((variant, lr), [])]
    )


def _plot_deep_linear(exp_dir, runs, lines_of, rates, depth):
    plt = common.pyplot()
    fig, axes = plt.subplots(
        2, len(rates), figsize=(5.5 * len(rates), 7.5), squeeze=False
    )
    colors = {"none": "tab:red", "bn_before": "tab:blue"}
    for column, lr in enumerate(rates):
        over_steps, by_layer = axes[0][column], axes[1][column]
        for variant in ("none", "bn_before"):
            group = [
                lines_of[id(run)]
                for run in runs
                if common.variant_and_lr(run) == (variant, lr)
            ]
            if not group:
                continue
            common.shared_band(
                over_steps,
                [_ics_series(lines, "/relative") for lines in group],
                variant,
                colors[variant],
            )
            tags = sorted(
                set.intersection(
                    *(set(_ics_tags(lines, "/relative")) for lines in group)
                ),
                key=lambda tag: _layer_index(tag, depth),
            )
            if tags:
                common.band(
                    by_layer,
                    [_layer_index(tag, depth) for tag in tags],
                    [
                        [common.mean_of(lines, [tag]) for tag in tags]
                        for lines in group
                    ],
                    variant,
                    colors[variant],
                )
        over_steps.set_title(
            f"LR {lr:g}: relative ICS, mean over layers", fontsize="medium"
        )
        over_steps.set_xlabel("training step")
        by_layer.set_title(
            f"LR {lr:g}: relative ICS by layer, mean over probes",
            fontsize="medium",
        )
        by_layer.set_xlabel("layer (1 = input side)")
        for ax in (over_steps, by_layer):
            ax.set_ylabel("||G - G'|| / ||G||")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize="small")
    common.save(fig, exp_dir / "deep_linear_ics.png")


def _series(lines, tags_or_fn):
    out = {}
    for line in lines:
        value = tags_or_fn(line)
        if value is not None and np.isfinite(value):
            out[line["step"]] = value
    return out


def _ics_series(lines, key):
    """`{step: ICS mean over the layers}` of one run's `key` tags."""
    tags = _ics_tags(lines, key)
    return _series(lines, lambda line: common.mean_of([line], tags))


def _plot_landscape(exp_dir, runs, lines_of):
    plt = common.pyplot()

    def get(key):
        return lambda line: line.get(key)

    panels = (
        ("loss along the gradient", "landscape/loss_min", "landscape/loss_max"),
        (
            "gradient change ||g_eta - g||",
            "landscape/grad_change_min",
            "landscape/grad_change_max",
        ),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    colors = {"none": "tab:red", "bn_before": "tab:blue"}
    for variant in ("none", "bn_before"):
        group = [
            lines_of[id(r)] for r in runs if r.config["variant"] == variant
        ]
        for ax, (title, low, high) in zip(axes[:2], panels, strict=True):
            lows = [_series(lines, get(low)) for lines in group]
            highs = [_series(lines, get(high)) for lines in group]
            steps = sorted(set.intersection(*(set(s) for s in lows + highs)))
            if not steps:
                continue
            lo = np.mean([[s[t] for t in steps] for s in lows], axis=0)
            hi = np.mean([[s[t] for t in steps] for s in highs], axis=0)
            ax.fill_between(
                steps, lo, hi, color=colors[variant], alpha=0.35, label=variant
            )
            ax.set_title(title, fontsize="medium")
        betas = [
            _series(lines, get("landscape/beta_smoothness")) for lines in group
        ]
        common.shared_band(axes[2], betas, variant, colors[variant])
    axes[2].set_title("effective beta-smoothness", fontsize="medium")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    common.save(fig, exp_dir / "landscape.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant in ("none", "bn_before"):
        group = [
            lines_of[id(r)] for r in runs if r.config["variant"] == variant
        ]
        for ax, key in zip(axes, ("/relative", "/cosine"), strict=True):
            common.shared_band(
                ax,
                [_ics_series(lines, key) for lines in group],
                variant,
                colors[variant],
            )
    axes[0].set_title("ICS: ||G - G'|| / ||G||", fontsize="medium")
    axes[1].set_title("ICS: cosine of G and G'", fontsize="medium")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    common.save(fig, exp_dir / "ics.png")


studies.register(
    studies.Study(
        name="santurkar-landscape",
        claim="BN does not reduce internal covariate shift (similar or "
        "worse), yet it makes the loss landscape and its gradients much "
        "smoother.",
        paper="Santurkar et al. 2018, https://arxiv.org/abs/1805.11604",
        paper_result="VGG on CIFAR-10: gradient change up to about 250 "
        "without BN vs under 50 with it; beta-smoothness flat near 20 with "
        "BN vs spiking 5-45 without; BN's ICS similar or larger, and in a "
        "25-layer deep linear net clearly larger.",
        criteria="no-BN loss and gradient bands several times wider than "
        "BN's early in training, BN's beta-smoothness flat, BN's ICS not "
        "clearly smaller (in the MLP and in the deep linear net).",
        evaluate=_evaluate_landscape,
        callbacks=_landscape_callbacks,
        grid=grid,
    )
)
