"""Helpers the studies share: per-seed tables from run folders, plots."""

import os
from pathlib import Path

import numpy as np

from zoo import verdict

# Every dataset of the CPU studies has 10 classes: a diverged run counts
# as guessing.
CHANCE = 0.1


def final_accuracy(run):
    """The run's final validation accuracy; chance if it diverged."""
    if run.result["status"] == "diverged":
        return CHANCE
    return run.result["final_val_accuracy"]


def variant_and_lr(run):
    return run.config["variant"], run.config["learning_rate"]


def by_arm(runs, value, key=variant_and_lr):
    """`{key(run): [value(run) per seed]}`, in seed order.

    The key defaults to `(variant, learning rate)`; studies whose arms
    differ in other fields (a batch size, a dropout rate) pass their own.
    """
    table = {}
    for run in sorted(runs, key=lambda r: r.result["seed"]):
        table.setdefault(key(run), []).append(value(run))
    return table


def measured(table, note):
    """The report's "Measured" section: a markdown table and its note."""
    return "\n".join(["## Measured", "", *table, "", note])


def mean_of(lines, tags, steps=None):
    """Mean of the finite values of `tags` over `lines` (diagnostics).

    `steps` limits the lines to those steps; NaN when nothing is left.
    """
    values = [
        line[tag]
        for line in lines
        if steps is None or line["step"] in steps
        for tag in tags
        if line.get(tag) is not None
    ]
    return float(np.mean(values)) if values else float("nan")


def finite(values):
    return [v for v in values if np.isfinite(v)]


def save(fig, path):
    """Saves a matplotlib figure atomically and closes it."""
    import matplotlib.pyplot as plt

    partial = Path(path).with_suffix(".partial.png")
    fig.tight_layout()
    fig.savefig(partial, dpi=110)
    plt.close(fig)
    os.replace(partial, path)


def pyplot():
    import matplotlib

    # A file backend: the zoo runs on machines without a display.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def errorbars(ax, xs, values, label, **style):
    """Mean ± sample std over seeds at each x: `values[i]` is x_i's list.

    One seed draws its point without a bar.
    """
    stats = [verdict.Stat.of(v) for v in values]
    ax.errorbar(
        xs,
        [s.mean for s in stats],
        yerr=[0 if s.n < 2 else s.std for s in stats],
        capsize=3,
        label=label,
        **{"marker": "o", **style},
    )


def band(ax, steps, curves, label, color=None):
    """Mean over seeds of `curves` (rows) with a ±1 std band."""
    curves = np.asarray(curves, dtype=float)
    mean = np.nanmean(curves, axis=0)
    (line,) = ax.plot(steps, mean, label=label, color=color)
    if len(curves) > 1:
        std = np.nanstd(curves, axis=0, ddof=1)
        ax.fill_between(
            steps, mean - std, mean + std, color=line.get_color(), alpha=0.2
        )
    return line


def shared_band(ax, series, label, color=None):
    """`band` over the steps that every seed's series has.

    `series` holds one `{step: value}` dict per seed. Seeds share the
    probe schedule, but a diverged run stops early or drops non-finite
    values, so only the common steps compare. Nothing is drawn where
    there are none.
    """
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if steps:
        band(ax, steps, [[s[t] for t in steps] for s in series], label, color)
