"""Verdicts from measurements: pure functions over per-seed numbers.

A paper's claim is checked as a list of `Check`s, each comparing the
per-seed values of a measured quantity (final accuracy of an arm, the
early loss band of a network, ...). Every check has one of three
outcomes, and `verdict` folds them into the experiment's verdict:

- `pass`: the difference goes the claimed way by more than the seed
  spread;
- `fail`: it goes the other way by more than the seed spread (or, for a
  threshold, lies beyond it);
- `unclear`: it lies inside the seed spread, or there are fewer than two
  seeds to measure a spread with.

The seed spread of a comparison is the sum of the two sample standard
deviations: "beyond the spread" means the mean ± std bands of the two
arms do not overlap. That is stricter than a t-test at n = 3, on
purpose: a zoo run should only call a claim reproduced when the seeds
leave no doubt.

Verdict: `reproduced` when every check passes, `not reproduced` when any
check fails, `inconclusive` otherwise.
"""

import dataclasses
import math
import statistics

PASS = "pass"
FAIL = "fail"
UNCLEAR = "unclear"

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean, sample std and count of one quantity over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values):
        values = [float(v) for v in values]
        if any(not math.isfinite(v) for v in values):
            raise ValueError(
                "Verdicts need finite values (map a diverged run to its "
                f"outcome first). Received: {values!r}"
            )
        if not values:
            return cls(float("nan"), float("nan"), 0)
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        return cls(statistics.fmean(values), std, len(values))

    def text(self, digits=3):
        if self.n == 0:
            return "—"
        if self.n == 1:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


@dataclasses.dataclass(frozen=True)
class Check:
    """One criterion of a claim, its measured values, and its outcome."""

    criterion: str
    measured: str
    outcome: str


def _spread(*stats):
    """Sum of the stds, or None when some quantity has fewer than 2 seeds."""
    if any(s.n < 2 for s in stats):
        return None
    return sum(s.std for s in stats)


def greater(criterion, a, b, margin=0.0, digits=3):
    """Checks `mean(a) > mean(b) + margin` beyond the seed spread.

    Args:
        criterion: What is claimed, in words, for the report.
        a, b: Per-seed values of the two arms.
        margin: How much larger `a` must be (0: just larger).
        digits: Decimals in the report.
    """
    sa, sb = Stat.of(a), Stat.of(b)
    measured = f"{sa.text(digits)} vs {sb.text(digits)}"
    spread = _spread(sa, sb)
    if spread is None:
        return Check(criterion, measured, UNCLEAR)
    difference = sa.mean - sb.mean
    if difference - margin > spread:
        return Check(criterion, measured, PASS)
    if difference - margin < -spread:
        return Check(criterion, measured, FAIL)
    return Check(criterion, measured, UNCLEAR)


def not_less(criterion, a, b, digits=3):
    """Checks that `a` is not smaller than `b` beyond the seed spread.

    Passes when `a` is larger or the two agree within the spread; fails
    only when `a` is clearly smaller. With fewer than two seeds, unclear.
    """
    sa, sb = Stat.of(a), Stat.of(b)
    measured = f"{sa.text(digits)} vs {sb.text(digits)}"
    spread = _spread(sa, sb)
    if spread is None:
        return Check(criterion, measured, UNCLEAR)
    outcome = FAIL if sa.mean - sb.mean < -spread else PASS
    return Check(criterion, measured, outcome)


def close(criterion, a, b, tolerance, digits=3):
    """Checks `|mean(a) - mean(b)| <= tolerance`.

    Passes when the difference and its spread both fit inside the
    tolerance, fails when the difference exceeds it by more than the
    spread, and is unclear in between.
    """
    sa, sb = Stat.of(a), Stat.of(b)
    measured = f"{sa.text(digits)} vs {sb.text(digits)}"
    spread = _spread(sa, sb)
    if spread is None:
        return Check(criterion, measured, UNCLEAR)
    gap = abs(sa.mean - sb.mean)
    if gap + spread <= tolerance:
        return Check(criterion, measured, PASS)
    if gap - spread > tolerance:
        return Check(criterion, measured, FAIL)
    return Check(criterion, measured, UNCLEAR)


def below(criterion, a, threshold, digits=3):
    """Checks `mean(a) < threshold` beyond the seed spread of `a`."""
    sa = Stat.of(a)
    measured = f"{sa.text(digits)} vs threshold {threshold:.{digits}g}"
    if sa.n < 2:
        return Check(criterion, measured, UNCLEAR)
    if sa.mean + sa.std < threshold:
        return Check(criterion, measured, PASS)
    if sa.mean - sa.std > threshold:
        return Check(criterion, measured, FAIL)
    return Check(criterion, measured, UNCLEAR)


def times(criterion, a, b, factor, digits=3):
    """Checks `mean(a) >= factor * mean(b)` beyond the seed spreads.

    For positive quantities such as band widths: passes when even the low
    end of `a` (mean - std) is at least `factor` times the high end of `b`
    (mean + std), fails when the high end of `a` is below `factor` times
    the low end of `b`, and is unclear in between.
    """
    sa, sb = Stat.of(a), Stat.of(b)
    ratio = sa.mean / sb.mean if sb.mean else float("inf")
    measured = (
        f"{sa.text(digits)} vs {sb.text(digits)} (ratio {ratio:.{digits}g})"
    )
    if _spread(sa, sb) is None:
        return Check(criterion, measured, UNCLEAR)
    if sa.mean - sa.std >= factor * (sb.mean + sb.std):
        return Check(criterion, measured, PASS)
    if sa.mean + sa.std < factor * (sb.mean - sb.std):
        return Check(criterion, measured, FAIL)
    return Check(criterion, measured, UNCLEAR)


def at_every(criterion, checks):
    """Folds one check per checkpoint into one, for "at every checkpoint".

    Args:
        criterion: What is claimed, in words, for the report.
        checks: `(label, Check)` pairs, one per checkpoint in order (the
            label, such as "step 300", names it in the report).

    Passes when every checkpoint passes, fails when any fails, and is
    unclear otherwise (also with no checkpoint at all). The measured
    text counts the outcomes and quotes the first failing (else the
    first unclear) checkpoint.
    """
    checks = list(checks)
    outcomes = [check.outcome for _, check in checks]
    counts = ", ".join(
        f"{outcomes.count(o)} {o}" for o in (PASS, UNCLEAR, FAIL)
    )
    measured = f"{len(checks)} checkpoints: {counts}"
    for wanted in (FAIL, UNCLEAR):
        first = [(label, c) for label, c in checks if c.outcome == wanted]
        if first:
            label, check = first[0]
            measured += f"; first {wanted} at {label}: {check.measured}"
            break
    if checks and all(o == PASS for o in outcomes):
        outcome = PASS
    elif FAIL in outcomes:
        outcome = FAIL
    else:
        outcome = UNCLEAR
    return Check(criterion, measured, outcome)


def verdict(checks):
    """The experiment's verdict from its checks' outcomes.

    Raises:
        ValueError: for an empty list: no criterion, no verdict.
    """
    if not checks:
        raise ValueError("A verdict needs at least one check. Received: []")
    outcomes = [check.outcome for check in checks]
    if any(outcome == FAIL for outcome in outcomes):
        return NOT_REPRODUCED
    if all(outcome == PASS for outcome in outcomes):
        return REPRODUCED
    return INCONCLUSIVE
