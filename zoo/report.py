"""Aggregation over seeds: a table, a plot and `report.md`.

The report reads finished run folders only (`config.json`, `result.json`,
`metrics.jsonl`), never live objects, so it can summarize old runs as
well as the grid that just finished: `tfnorm-zoo report runs/basics`.
With several experiment folders (or a log directory holding them),
`write_summary` adds one table across experiments.
"""

import dataclasses
import json
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

REPORT_FILE = "report.md"
PLOT_FILE = "val_accuracy.png"
SUMMARY_FILE = "summary.md"
# The folder (a TensorBoard run of its own) that shows the report's PNG
# plots in the IMAGES tab.
IMAGES_DIR = "report_images"


@dataclasses.dataclass
class Run:
    config: dict
    result: dict
    # [(step, val accuracy)] in step order.
    val_curve: list


@dataclasses.dataclass
class Row:
    """One arm's line in the table: a variant, at one learning rate."""

    variant: str
    runs: int
    accuracies: list
    reached: list
    diverged_at: list
    threshold: float
    # The arm's training steps: a study's arms may train for fewer.
    steps: int

    @property
    def accuracy_text(self):
        n = len(self.accuracies)
        if n == 0:
            return "—"
        mean = statistics.fmean(self.accuracies)
        if n == 1:
            return f"{mean:.3f} (n=1)"
        std = statistics.stdev(self.accuracies)
        return f"{mean:.3f} ± {std:.3f} (n={n})"

    @property
    def steps_text(self):
        if not self.reached:
            return f"never (0/{self.runs})"
        mean = statistics.fmean(self.reached)
        return f"{mean:.0f} ({len(self.reached)}/{self.runs})"

    @property
    def diverged_text(self):
        if not self.diverged_at:
            return f"0/{self.runs}"
        steps = ", ".join(str(s) for s in sorted(self.diverged_at))
        return f"{len(self.diverged_at)}/{self.runs} (at step {steps})"


def finished_results(path):
    """The result.json of every finished run in the folder `path`.

    A run is finished once its folder has its final name: a `.partial`
    folder is a run still being written, or one cut off while it was
    renamed, and holds a result.json already.
    """
    return sorted(
        result
        for result in Path(path).glob("*/seed_*/result.json")
        if not result.parent.name.endswith(".partial")
    )


# What a report reads of each run's files; a file without them was not
# written by `tfnorm-zoo run` (or was damaged since).
_CONFIG_KEYS = (
    "name",
    "variant",
    "dataset",
    "steps",
    "eval_every",
    "learning_rate",
    "threshold",
)
_RESULT_KEYS = ("variant", "seed", "status", "wall_s", "final_val_accuracy")


def read_run_file(path, lines=False):
    """A run file's JSON (a list of records with `lines`), or a
    `ValueError` that names the file."""
    try:
        text = Path(path).read_text()
        if lines:
            return [json.loads(line) for line in text.splitlines() if line]
        return json.loads(text)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Cannot read the run file {path}: {error}. Rerun that run "
            "(delete its folder and run the same command again)."
        ) from None


def _load_run(run_dir, result_file):
    config = read_run_file(run_dir / "config.json")
    result = read_run_file(result_file)
    for path, record, keys in (
        (run_dir / "config.json", config, _CONFIG_KEYS),
        (result_file, result, _RESULT_KEYS),
    ):
        missing = (
            list(keys)
            if not isinstance(record, dict)
            else [k for k in keys if k not in record]
        )
        if missing:
            raise ValueError(
                f"Cannot read the run file {path}: it lacks "
                f"{', '.join(missing)}. Rerun that run (delete its folder "
                "and run the same command again)."
            )
    curve = [
        (record["step"], record["val/accuracy"])
        for record in read_run_file(run_dir / "metrics.jsonl", lines=True)
        if "val/accuracy" in record
    ]
    return Run(config=config, result=result, val_curve=curve)


def load_runs(exp_dir):
    """Every finished run under `exp_dir`, in a stable order.

    Raises:
        ValueError: when the runs belong to several experiments, whose
            arms, rates and steps one report cannot line up.
    """
    runs = []
    for result_file in finished_results(exp_dir):
        run_dir = result_file.parent
        runs.append(_load_run(run_dir, result_file))
    names = sorted(
        {
            run.config["name"] + (" (smoke)" if run.config.get("smoke") else "")
            for run in runs
        }
    )
    if len(names) > 1:
        raise ValueError(
            f"{exp_dir} holds runs of several experiments ({', '.join(names)})"
            ", and a report covers one: move each experiment's runs into a "
            "folder of its own."
        )
    return runs


def _arm(run):
    # Runs written before arms existed are labelled by their variant.
    return run.result.get("arm", run.result["variant"])


def _arm_order(runs):
    """Arm labels by learning rate, then in the registry's variant order.

    The registry's order reads from the baseline to the variations;
    unknown variants (from another version of the zoo) go last.
    """
    from zoo import models

    known = list(models.VARIANTS)

    def key(run):
        variant = run.result["variant"]
        rank = known.index(variant) if variant in known else len(known)
        return (run.config["learning_rate"], rank, variant)

    return list(dict.fromkeys(_arm(run) for run in sorted(runs, key=key)))


def summarize(runs):
    """One `Row` per arm over its seeds."""
    by_arm = {}
    for run in runs:
        by_arm.setdefault(_arm(run), []).append(run)
    rows = []
    for variant in _arm_order(runs):
        group = by_arm[variant]
        threshold = group[0].config["threshold"]
        accuracies, reached, diverged_at = [], [], []
        for run in group:
            if run.result["status"] == "diverged":
                diverged_at.append(run.result["diverged_at"])
                continue
            accuracies.append(run.result["final_val_accuracy"])
            hits = [step for step, acc in run.val_curve if acc >= threshold]
            if hits:
                reached.append(hits[0])
        rows.append(
            Row(
                variant,
                len(group),
                accuracies,
                reached,
                diverged_at,
                threshold,
                group[0].config["steps"],
            )
        )
    return rows


def _mixed_steps(rows):
    return len({row.steps for row in rows}) > 1


def _headers(rows):
    threshold = rows[0].threshold if rows else 0.0
    if _mixed_steps(rows):
        # Each cell states its arm's step (a study's shorter arms).
        accuracy = "val accuracy at each arm's last step"
    else:
        accuracy = f"val accuracy at step {rows[0].steps if rows else 0}"
    return (
        "variant",
        accuracy,
        f"steps to {threshold:.0%} val accuracy",
        "diverged",
    )


def _cells(row, rows):
    accuracy = row.accuracy_text
    if _mixed_steps(rows) and row.accuracies:
        accuracy += f" at step {row.steps}"
    return (row.variant, accuracy, row.steps_text, row.diverged_text)


def markdown_table(rows, runs):
    headers = _headers(rows)
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cells(row, rows)) + " |")
    return "\n".join(lines)


def rich_table(rows, runs, title=None):
    from rich.table import Table

    table = Table(title=title)
    for header in _headers(rows):
        table.add_column(header)
    for row in rows:
        table.add_row(*_cells(row, rows))
    return table


def plot(runs, rows, path):
    """Validation accuracy per variant: mean over seeds with a ±1 std band.

    Diverged runs are left out of the curves (their accuracy after the
    divergence is meaningless); the table counts them.
    """
    import matplotlib

    # A file backend: the zoo runs on machines without a display.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    plotted = 0
    for row in rows:
        curves = [
            dict(run.val_curve)
            for run in runs
            if _arm(run) == row.variant and run.result["status"] == "completed"
        ]
        if not curves:
            continue
        # Seeds share the evaluation schedule; keep the common steps only.
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[s] for s in steps] for c in curves])
        mean = values.mean(axis=0)
        plotted += 1
        (line,) = ax.plot(steps, mean, label=f"{row.variant} (n={len(curves)})")
        if len(curves) > 1:
            std = values.std(axis=0, ddof=1)
            ax.fill_between(
                steps,
                np.clip(mean - std, 0.0, 1.0),
                np.clip(mean + std, 0.0, 1.0),
                color=line.get_color(),
                alpha=0.2,
            )
    if rows:
        ax.axhline(rows[0].threshold, color="grey", linestyle=":", lw=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    if plotted:
        # Beside the axes: inside, it hid whichever curve ran along its
        # corner (a diverged or untrained variant sits at the bottom).
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small"
        )
    else:
        ax.set_title("no run finished without diverging")
    fig.tight_layout()
    # Saved under a temporary name and renamed, like every result file.
    partial = Path(path).with_suffix(".partial.png")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    os.replace(partial, path)


def tensorboard_command(exp_dir):
    """The command that opens `exp_dir` in TensorBoard from this shell.

    Inside a virtual environment that is not activated, `tensorboard` is
    not on the PATH; the command then names the environment's own script,
    relative to the current directory when it lies below it.
    """
    program = "tensorboard"
    script = Path(sys.executable).parent / "tensorboard"
    on_path = shutil.which("tensorboard")
    if script.exists() and (
        on_path is None or Path(on_path).resolve() != script.resolve()
    ):
        relative = os.path.relpath(script)
        program = str(script) if relative.startswith("..") else relative
    return f"{program} --logdir {shlex.quote(str(exp_dir))}"


def _model_text(config):
    model = config.get("model", "mlp")
    if model == "mlp":
        hidden = config["hidden_units"]
        return (
            f"an MLP with {len(hidden)} hidden layers of {hidden[0]} units "
            f"({config['activation']})"
        )
    width = config.get("width", 1.0)
    return f"{model}" + (f" at {width:g}x width" if width != 1.0 else "")


def describe_runs(runs):
    """`describe` of each network among `runs`, with its variants.

    A study may train several networks (E2's MLP and its deep linear
    net): each is described with its own learning rates, not the first
    run's network with every rate of the grid.
    """
    groups = {}
    for run in runs:
        groups.setdefault(_model_text(run.config), []).append(run)
    if len(groups) == 1:
        (group,) = groups.values()
        rates = sorted({run.config["learning_rate"] for run in group})
        return describe(group[0].config, rates)
    parts = []
    for group in groups.values():
        rates = sorted({run.config["learning_rate"] for run in group})
        variants = ", ".join(dict.fromkeys(_arm(run) for run in group))
        parts.append(
            f"({variants}) {describe(group[0].config, rates).rstrip('.')}"
        )
    return "; ".join(parts) + "."


def describe(config, learning_rates):
    """One sentence: the model and how it was trained."""
    sgd = "SGD"
    if config.get("momentum"):
        nesterov = "Nesterov " if config.get("nesterov") else ""
        sgd += f" with {nesterov}momentum {config['momentum']:g}"
    if config.get("weight_decay"):
        sgd += f", weight decay {config['weight_decay']:g},"
    rates = ", ".join(f"{lr:g}" for lr in learning_rates)
    plural = "s" if len(learning_rates) > 1 else ""
    text = f"{_model_text(config)}, {sgd} at learning rate{plural} {rates}"
    if config.get("lr_scaling", "none") != "none":
        factor = config["scaled_learning_rate"] / config["learning_rate"]
        text += (
            f" (times {factor:.3g} for batch {config['batch_size']}, "
            f"{config['lr_scaling']} rule from batch "
            f"{config['base_batch_size']})"
        )
    boundaries = config.get("lr_boundaries") or []
    if boundaries:
        steps = ", ".join(str(round(f * config["steps"])) for f in boundaries)
        text += f", multiplied by {config['lr_decay']:g} at steps {steps}"
    text += f", batch {config['batch_size']}, {config['steps']} steps."
    extras = []
    if config.get("augment"):
        extras.append("crop-and-flip augmentation")
    if config.get("precision", "float32") != "float32":
        extras.append(f"{config['precision']} precision")
    if config.get("synchronized"):
        extras.append("synchronized BN")
    if config.get("strategy", "default") != "default":
        extras.append(f"{config['strategy']} strategy")
    if extras:
        text += " " + ", ".join(extras).capitalize() + "."
    return text


def write_plot_images(exp_dir, files):
    """Puts the report's PNG plots into TensorBoard's IMAGES tab.

    Each file becomes the image `report/<file stem>` of the run
    `report_images` inside `exp_dir`. The folder is written anew and
    swapped in whole, so rebuilding a report leaves one copy of each
    plot, not a growing history.

    Args:
        exp_dir: The experiment folder.
        files: PNG file names, relative to `exp_dir`.
    """
    import tensorflow as tf

    exp_dir = Path(exp_dir)
    partial = exp_dir / (IMAGES_DIR + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    writer = tf.summary.create_file_writer(str(partial))
    with writer.as_default():
        for file in files:
            image = tf.io.decode_png((exp_dir / file).read_bytes(), channels=4)
            tf.summary.image(f"report/{Path(file).stem}", image[None], step=0)
    writer.close()
    target = exp_dir / IMAGES_DIR
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)


def write_report(exp_dir):
    """Writes `report.md` and the plot into `exp_dir`.

    Returns:
        `(rows, runs)`, for printing the table.

    Raises:
        FileNotFoundError: when `exp_dir` holds no finished run.
    """
    exp_dir = Path(exp_dir)
    runs = load_runs(exp_dir)
    if not runs:
        raise FileNotFoundError(
            f"No finished runs in {exp_dir}: expected folders "
            "<variant>/seed_<n>/ with a result.json, as `tfnorm-zoo run` "
            "writes them."
        )
    rows = summarize(runs)
    plot(runs, rows, exp_dir / PLOT_FILE)
    write_plot_images(exp_dir, [PLOT_FILE])

    config = runs[0].config
    seeds = sorted({run.result["seed"] for run in runs})
    train_s = sum(run.result["wall_s"] for run in runs)
    text = [
        f"# {config['name']}",
        "",
        f"{len(runs)} runs ({len(rows)} variants, seeds "
        f"{', '.join(map(str, seeds))}) on `{config['dataset']}`: "
        f"{describe_runs(runs)} "
        f"Training took {train_s:.0f} s in total.",
        "",
        markdown_table(rows, runs),
        "",
        "Validation accuracy: mean ± sample standard deviation over the n "
        "seeds that did not diverge, at the last step. Steps to the "
        "threshold: first evaluation (every "
        f"{config['eval_every']} steps) at or above it, mean over the seeds "
        "that reached it (count in brackets). Diverged: runs whose training "
        "loss became non-finite, and at which step.",
        "",
        f"![validation accuracy per variant]({PLOT_FILE})",
        "",
        "Curves, pre-activation histograms, the HPARAMS comparison and "
        "this report's plots (IMAGES tab):",
        "",
        "```",
        tensorboard_command(exp_dir),
        "```",
        "",
    ]
    partial = exp_dir / (REPORT_FILE + ".partial")
    partial.write_text("\n".join(text))
    os.replace(partial, exp_dir / REPORT_FILE)
    return rows, runs


def experiment_dirs(paths):
    """The experiment folders among `paths`, or inside them.

    A path with run folders is an experiment; a path without any (a log
    directory such as `runs`) stands for the experiments inside it.

    Raises:
        FileNotFoundError: for a path with no finished run at all.
    """
    found = []
    for path in map(Path, paths):
        if finished_results(path):
            found.append(path)
            continue
        inner = sorted(p for p in path.glob("*") if finished_results(p))
        if not inner:
            raise FileNotFoundError(
                f"No finished runs in {path}: expected folders "
                "<variant>/seed_<n>/ with a result.json, as `tfnorm-zoo run` "
                "writes them."
            )
        found.extend(inner)
    return list(dict.fromkeys(found))


def summary_rows(exp_dirs):
    """`(experiment, model, dataset, Row)` for every arm of every folder."""
    lines = []
    for exp_dir in exp_dirs:
        runs = load_runs(exp_dir)
        config = runs[0].config
        name = config["name"] + (" (smoke)" if config.get("smoke") else "")
        for row in summarize(runs):
            lines.append(
                (name, config.get("model", "mlp"), config["dataset"], row)
            )
    return lines


SUMMARY_HEADERS = (
    "experiment",
    "model",
    "dataset",
    "arm",
    "final val accuracy",
    "diverged",
)


def _summary_cells(line):
    name, model, dataset, row = line
    return (
        name,
        model,
        dataset,
        row.variant,
        row.accuracy_text,
        row.diverged_text,
    )


def write_summary(exp_dirs, path):
    """Writes the cross-experiment table to `path`; returns its lines."""
    lines = summary_rows(exp_dirs)
    text = [
        "# Summary",
        "",
        f"{len(exp_dirs)} experiments: "
        + ", ".join(f"`{d}`" for d in exp_dirs)
        + ". Final validation accuracy as mean ± sample standard deviation "
        "over the seeds that did not diverge (n in brackets); each "
        "experiment's report.md has the details.",
        "",
        "| " + " | ".join(SUMMARY_HEADERS) + " |",
        "|" + "|".join("---" for _ in SUMMARY_HEADERS) + "|",
    ]
    for line in lines:
        text.append("| " + " | ".join(_summary_cells(line)) + " |")
    text.append("")
    partial = Path(path).with_name(Path(path).name + ".partial")
    partial.write_text("\n".join(text))
    os.replace(partial, path)
    return lines


def rich_summary(lines, title=None):
    from rich.table import Table

    table = Table(title=title)
    for header in SUMMARY_HEADERS:
        table.add_column(header)
    for line in lines:
        table.add_row(*_summary_cells(line))
    return table
