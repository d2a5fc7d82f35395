"""Verdict logic on fabricated per-seed tables: pass, fail, unclear."""

import numpy as np
import pytest

from zoo import verdict
from zoo.studies import dropout_shift
from zoo.studies import ioffe
from zoo.studies import placement
from zoo.studies import precise
from zoo.studies import renorm
from zoo.studies import santurkar


@pytest.mark.parametrize(
    "a, b, outcome",
    [
        ([0.95, 0.94, 0.96], [0.10, 0.11, 0.09], verdict.PASS),
        ([0.10, 0.11, 0.09], [0.95, 0.94, 0.96], verdict.FAIL),
        # Means differ by 0.02, stds sum to 0.04: inside the spread.
        ([0.94, 0.96, 0.98], [0.92, 0.94, 0.96], verdict.UNCLEAR),
        # One seed has no spread to compare against.
        ([0.95], [0.10], verdict.UNCLEAR),
    ],
)
def test_greater(a, b, outcome):
    assert verdict.greater("a > b", a, b).outcome == outcome


def _check(outcome):
    return verdict.Check("", f"measured {outcome}", outcome)


@pytest.mark.parametrize(
    "outcomes, outcome, quoted",
    [
        ([verdict.PASS] * 3, verdict.PASS, None),
        # One checkpoint inside the spread keeps "every" from holding.
        (
            [verdict.PASS, verdict.UNCLEAR, verdict.PASS],
            verdict.UNCLEAR,
            "first unclear at step 2: measured unclear",
        ),
        # A failing checkpoint decides, and is the one quoted.
        (
            [verdict.UNCLEAR, verdict.PASS, verdict.FAIL],
            verdict.FAIL,
            "first fail at step 3: measured fail",
        ),
        ([], verdict.UNCLEAR, None),
    ],
)
def test_at_every_folds_the_checkpoints(outcomes, outcome, quoted):
    checks = [(f"step {i + 1}", _check(o)) for i, o in enumerate(outcomes)]
    folded = verdict.at_every("claim", checks)
    assert folded.outcome == outcome
    counts = ", ".join(
        f"{outcomes.count(o)} {o}"
        for o in (verdict.PASS, verdict.UNCLEAR, verdict.FAIL)
    )
    expected = f"{len(outcomes)} checkpoints: {counts}"
    if quoted is not None:
        expected += f"; {quoted}"
    assert folded.measured == expected


def test_greater_with_margin_needs_the_margin_beyond_the_spread():
    a, b = [0.50, 0.51, 0.52], [0.40, 0.41, 0.42]
    assert verdict.greater("", a, b, margin=0.05).outcome == verdict.PASS
    assert verdict.greater("", a, b, margin=0.09).outcome == verdict.UNCLEAR
    assert verdict.greater("", a, b, margin=0.2).outcome == verdict.FAIL


@pytest.mark.parametrize(
    "a, b, outcome",
    [
        ([0.940, 0.941, 0.942], [0.950, 0.951, 0.952], verdict.PASS),
        ([0.80, 0.81, 0.82], [0.95, 0.951, 0.952], verdict.FAIL),
        ([0.90, 0.93, 0.96], [0.95, 0.951, 0.952], verdict.UNCLEAR),
    ],
)
def test_close(a, b, outcome):
    assert verdict.close("", a, b, tolerance=0.02).outcome == outcome


def test_below_and_not_less():
    assert verdict.below("", [0.1, 0.1, 0.11], 0.2).outcome == verdict.PASS
    assert verdict.below("", [0.9, 0.92, 0.91], 0.2).outcome == verdict.FAIL
    assert verdict.below("", [0.1, 0.2, 0.3], 0.2).outcome == verdict.UNCLEAR
    assert verdict.not_less("", [1, 1.1], [1.05, 1.0]).outcome == verdict.PASS
    assert verdict.not_less("", [0.1, 0.11], [1, 1.1]).outcome == verdict.FAIL


def test_times_compares_the_band_ends():
    wide, narrow = [2.0, 2.2, 1.8], [0.10, 0.12, 0.08]
    check = verdict.times("", wide, narrow, factor=3)
    assert check.outcome == verdict.PASS
    assert "ratio 20" in check.measured
    assert verdict.times("", narrow, wide, 3).outcome == verdict.FAIL
    assert verdict.times("", [0.3, 0.5], [0.1, 0.2], 3).outcome == (
        verdict.UNCLEAR
    )


def test_verdict_folds_the_outcomes():
    def check(outcome):
        return verdict.Check("c", "m", outcome)

    assert verdict.verdict([check("pass")] * 3) == verdict.REPRODUCED
    assert (
        verdict.verdict([check("pass"), check("unclear")])
        == verdict.INCONCLUSIVE
    )
    assert (
        verdict.verdict([check("unclear"), check("fail")])
        == verdict.NOT_REPRODUCED
    )
    with pytest.raises(ValueError, match="at least one check"):
        verdict.verdict([])


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="finite values"):
        verdict.greater("", [float("nan"), 1.0], [0.0, 1.0])


def _e1_tables(none_high, noisy_drift):
    accuracy = {
        ("bn_before", 0.05): [0.95, 0.951, 0.949],
        ("noisy_bn", 0.05): [0.945, 0.944, 0.946],
        ("none", 0.05): [0.80, 0.81, 0.79],
        ("bn_before", 0.5): [0.96, 0.961, 0.959],
        ("noisy_bn", 0.5): [0.955, 0.954, 0.956],
        ("none", 0.5): none_high,
    }
    drift = {
        (variant, lr): [0.02, 0.021, 0.019]
        for variant in ("bn_before", "none")
        for lr in (0.05, 0.5)
    }
    for lr in (0.05, 0.5):
        drift[("noisy_bn", lr)] = noisy_drift
    return accuracy, drift


@pytest.mark.parametrize(
    "none_high, noisy_drift, expected",
    [
        # The paper's picture: no BN at chance at 0.5, noisy BN drifts most.
        ([0.1, 0.1, 0.1], [0.5, 0.52, 0.48], verdict.REPRODUCED),
        # No BN trains at 0.5 as well as BN: a reversed result.
        ([0.97, 0.971, 0.969], [0.5, 0.52, 0.48], verdict.NOT_REPRODUCED),
        # Noisy BN's drift inside the others' spread: no decision.
        ([0.1, 0.1, 0.1], [0.019, 0.03, 0.022], verdict.INCONCLUSIVE),
    ],
)
def test_santurkar_lr_verdicts(none_high, noisy_drift, expected):
    accuracy, drift = _e1_tables(none_high, noisy_drift)
    checks = santurkar.evaluate_lr(accuracy, drift, [0.05, 0.5])
    assert len(checks) == 11
    assert verdict.verdict(checks) == expected


def _measures(loss_band, grad_change, beta_cv, ics):
    return [
        dict(
            loss_band=loss_band * f,
            grad_change=grad_change * f,
            beta_cv=beta_cv * f,
            ics_relative=ics * f,
        )
        for f in (0.95, 1.0, 1.05)
    ]


@pytest.mark.parametrize(
    "bn, expected",
    [
        # Narrow BN bands, flat beta, BN's ICS larger: as the paper finds.
        (_measures(0.05, 0.5, 0.05, 0.4), verdict.REPRODUCED),
        # BN's ICS clearly smaller: the claim about ICS fails.
        (_measures(0.05, 0.5, 0.05, 0.05), verdict.NOT_REPRODUCED),
        # BN's bands about 3x narrower: "several times" within the spread.
        (_measures(0.33, 3.3, 0.05, 0.4), verdict.INCONCLUSIVE),
        # Only twice narrower, beyond the spread: not several times.
        (_measures(0.5, 5.0, 0.05, 0.4), verdict.NOT_REPRODUCED),
    ],
)
def test_santurkar_landscape_verdicts(bn, expected):
    none = _measures(1.0, 10.0, 0.5, 0.3)
    checks = santurkar.evaluate_landscape({"none": none, "bn_before": bn})
    assert verdict.verdict(checks) == expected


def _seeds(mean, spread=0.01):
    return [mean - spread, mean, mean + spread]


@pytest.mark.parametrize(
    "renorm_small, renorm_control, expected",
    [
        (0.70, 0.951, verdict.REPRODUCED),
        # Renorm behind BN at batch 2 beyond the spread.
        (0.20, 0.951, verdict.NOT_REPRODUCED),
        # Control within 1 point only inside the spread.
        (0.70, 0.941, verdict.INCONCLUSIVE),
    ],
)
def test_renorm_small_batch_verdicts(renorm_small, renorm_control, expected):
    accuracy = {
        ("bn_before", 2): _seeds(0.33),
        ("renorm", 2): _seeds(renorm_small),
        ("bn_before", 4): _seeds(0.5),
        ("renorm", 4): _seeds(0.75),
        ("bn_before", 64): _seeds(0.95, 0.002),
        ("renorm", 64): _seeds(renorm_control, 0.002),
    }
    checks = renorm.evaluate_renorm(accuracy, [2, 4, 64])
    assert [c.criterion for c in checks] == [
        "renorm beats BN at batch 2",
        "renorm beats BN at batch 4",
        "renorm matches BN within 1 point at batch 64",
    ]
    assert verdict.verdict(checks) == expected


@pytest.mark.parametrize(
    "ratio, precise, expected",
    [
        (1.0, 0.93, verdict.REPRODUCED),
        # The shift is twice the formula's.
        (2.0, 0.93, verdict.NOT_REPRODUCED),
        # Re-estimation gains less than the seed spread.
        (1.0, 0.905, verdict.INCONCLUSIVE),
    ],
)
def test_dropout_variance_shift_verdicts(ratio, precise, expected):
    rates = (0.1, 0.3, 0.5)
    ratios = {r: _seeds(ratio, 0.02) for r in rates}
    ema = {r: _seeds(0.9) for r in rates}
    recovered = {r: _seeds(precise) for r in rates}
    checks = dropout_shift.evaluate_shift(ratios, ema, recovered, rates)
    assert verdict.verdict(checks) == expected


def test_dropout_shift_ratio_of_fabricated_layers():
    rows = [
        {
            "test_variance": 1.0,
            "train_variance": 1.5,
            "moving_variance": 1.4,
            "predicted_variance": 1.5,
        },
        {
            "test_variance": 2.0,
            "train_variance": 3.0,
            "moving_variance": 2.8,
            "predicted_variance": 4.0,
        },
    ]
    # Shifts 0.5 / 0.5 and 0.5 / 1.0.
    assert dropout_shift.shift_ratio(rows) == pytest.approx(0.75)
    assert dropout_shift.shift(rows) == pytest.approx(0.5)
    assert dropout_shift.shift(rows, "moving_variance") == pytest.approx(0.4)
    # A record from before the training variance was measured.
    old = [{k: v for k, v in r.items() if k != "train_variance"} for r in rows]
    assert np.isnan(dropout_shift.shift_ratio(old))
    assert np.isnan(dropout_shift.shift(old))


def _gaps(gap, early, late):
    # run_gaps' layout: mean, early, late, EMA accuracy, PreciseBN's.
    return [
        (gap + d, early + d, late + d, 0.9, 0.9 + gap + d)
        for d in (-0.002, 0.0, 0.002)
    ]


def _points(table, behind_at=None):
    # Per seed, {step: (EMA, PreciseBN)} at three checkpoints with the
    # run's mean gap; `behind_at` puts PreciseBN far behind there.
    points = {}
    for key, seeds in table.items():
        points[key] = [
            {
                step: (0.9, 0.9 + gap - (0.3 if step == behind_at else 0.0))
                for step in (25, 50, 75)
            }
            for gap, *_ in seeds
        ]
    return points


@pytest.mark.parametrize(
    "small_high_lr, expected",
    [
        (_gaps(0.2, 0.3, 0.05), verdict.REPRODUCED),
        # PreciseBN far behind the EMA in one arm.
        (_gaps(-0.2, -0.1, -0.3), verdict.NOT_REPRODUCED),
    ],
)
def test_precise_bn_verdicts(small_high_lr, expected):
    table = {
        (0.05, 2): _gaps(0.05, 0.08, 0.01),
        (0.05, 128): _gaps(0.0, 0.01, 0.0),
        (0.5, 2): small_high_lr,
        (0.5, 128): _gaps(0.02, 0.04, 0.0),
    }
    checks = precise.evaluate_precise(table, _points(table))
    assert len(checks) == 7
    assert verdict.verdict(checks) == expected


def test_precise_bn_behind_at_one_checkpoint_is_not_reproduced():
    # Ahead on average, but clearly behind at step 50 in every arm:
    # "at least as accurate at every checkpoint" fails.
    table = {
        (0.05, 2): _gaps(0.05, 0.08, 0.01),
        (0.05, 128): _gaps(0.01, 0.02, 0.0),
        (0.5, 2): _gaps(0.2, 0.3, 0.05),
        (0.5, 128): _gaps(0.02, 0.04, 0.0),
    }
    ahead = precise.evaluate_precise(table, _points(table))
    assert verdict.verdict(ahead) == verdict.REPRODUCED
    behind = precise.evaluate_precise(table, _points(table, behind_at=50))
    assert verdict.verdict(behind) == verdict.NOT_REPRODUCED
    assert "first fail at step 50" in behind[0].measured


def test_precise_bn_smoke_sized_tables_decide_nothing():
    table = {key: _gaps(0.1, 0.2, 0.0)[:1] for key in [(0.05, 2), (0.5, 128)]}
    checks = precise.evaluate_precise(table, _points(table))
    assert {c.outcome for c in checks} == {verdict.UNCLEAR}


@pytest.mark.parametrize(
    "bn_accuracy, none_drift, expected",
    [
        (0.9, 0.5, verdict.REPRODUCED),
        # The plain net ahead of BN beyond the spread.
        (0.6, 0.5, verdict.NOT_REPRODUCED),
        # The bands drift about as much with and without BN.
        (0.9, 0.11, verdict.INCONCLUSIVE),
    ],
)
def test_ioffe_mnist_verdicts(bn_accuracy, none_drift, expected):
    accuracy, drift = {}, {}
    for lr in (0.1, 0.5):
        accuracy[("bn_before", lr)] = _curves(bn_accuracy)
        accuracy[("none", lr)] = _curves(0.8)
        drift[("bn_before", lr)] = _seeds(0.1)
        drift[("none", lr)] = _seeds(none_drift)
    checks = ioffe.evaluate_ioffe(accuracy, drift, [0.1, 0.5])
    assert verdict.verdict(checks) == expected


def _curves(accuracy, steps=(100, 200, 300), at=None):
    # One {step: accuracy} per seed; `at` overrides some checkpoints.
    return [
        {s: (at or {}).get(s, accuracy) + d for s in steps}
        for d in (-0.01, 0.0, 0.01)
    ]


def test_ioffe_mnist_needs_bn_ahead_at_every_checkpoint():
    drift = {("bn_before", 0.1): _seeds(0.1), ("none", 0.1): _seeds(0.5)}
    # Far ahead on average, level with no BN at the first checkpoint.
    accuracy = {
        ("bn_before", 0.1): _curves(0.9, at={100: 0.8}),
        ("none", 0.1): _curves(0.8),
    }
    level = ioffe.evaluate_ioffe(accuracy, drift, [0.1])
    assert level[0].outcome == verdict.UNCLEAR
    assert "first unclear at step 100" in level[0].measured
    assert verdict.verdict(level) == verdict.INCONCLUSIVE
    # Behind no BN there beyond the spread.
    accuracy[("bn_before", 0.1)] = _curves(0.9, at={100: 0.5})
    behind = ioffe.evaluate_ioffe(accuracy, drift, [0.1])
    assert verdict.verdict(behind) == verdict.NOT_REPRODUCED


def test_ioffe_checkpoint_accuracy_counts_a_diverged_run_at_chance():
    class Run:
        config = {"eval_every": 100, "steps": 300}
        val_curve = [(100, 0.5), (200, 0.7), (300, 0.8)]
        result = {"status": "completed"}

    assert ioffe.checkpoint_accuracy(Run) == {100: 0.5, 200: 0.7, 300: 0.8}
    Run.result = {"status": "diverged", "diverged_at": 150}
    Run.val_curve = [(100, 0.5)]
    assert ioffe.checkpoint_accuracy(Run) == {100: 0.5, 200: 0.1, 300: 0.1}


def test_ioffe_band_drift_is_the_std_of_each_percentile():
    lines = [
        {
            "step": s,
            "ioffe/sigmoid_input_p15": -1.0 + s,
            "ioffe/sigmoid_input_p50": 0.0,
            "ioffe/sigmoid_input_p85": 1.0,
        }
        for s in (0, 2)
    ]
    # Stds 1, 0 and 0 over the two checkpoints.
    assert ioffe.band_drift(lines) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "after, expected",
    [
        (0.941, verdict.REPRODUCED),
        (0.90, verdict.NOT_REPRODUCED),
        (0.932, verdict.INCONCLUSIVE),
    ],
)
def test_bn_placement_verdicts(after, expected):
    accuracy = {
        "bn_before": _seeds(0.94, 0.002),
        "bn_after": _seeds(after, 0.002),
    }
    checks = placement.evaluate_placement(accuracy)
    assert verdict.verdict(checks) == expected
