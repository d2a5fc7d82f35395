"""Helpers the studies share: per-seed tables from run folders, plots."""

import os
from pathlib import Path

import numpy as np

# Every dataset of the CPU studies has 10 classes: a diverged run counts
# as guessing.
CHANCE = 0.1


def final_accuracy(run):
    """The run's final validation accuracy; chance if it diverged."""
    if run.result["status"] == "diverged":
        return CHANCE
    return run.result["final_val_accuracy"]


def by_arm(runs, value):
    """`{(variant, learning rate): [value(run) per seed]}`, seed order."""
    table = {}
    for run in sorted(runs, key=lambda r: r.result["seed"]):
        key = (run.config["variant"], run.config["learning_rate"])
        table.setdefault(key, []).append(value(run))
    return table


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
