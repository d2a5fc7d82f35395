"""The paper experiments: claims, their CPU designs, and verdicts.

A study is a registered experiment (`zoo.experiments`) plus what the
paper claims about it: the claim in words, the paper's numbers at full
scale, the criteria of SCIENCE.md, the diagnostics its runs record, and
an `evaluate` function that turns the finished run folders into checks
(`zoo.verdict`), tables and plots. Runs train through `zoo.train`'s one
training path, with the study's probes as extra callbacks; their results
land in each run folder's `diagnostics.jsonl` (`recorder`).

`run_grid` trains a study's missing runs, `write_report` writes its
report.md with the claim and the verdict on top, and `reproduce` does
both for every study and writes one summary page.
"""

import dataclasses
import json
import os
import time
from pathlib import Path

from zoo import verdict as verdicts

VERDICT_FILE = "verdict.json"
REPRODUCTION_FILE = "reproduction.md"


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What `Study.evaluate` returns for one experiment folder.

    Attributes:
        checks: `zoo.verdict.Check`s, one per criterion.
        headline: One line for the summary page: the key measurement.
        markdown: Tables and notes for the report, in markdown.
        plots: `(file name, caption)` of PNGs written into the folder.
    """

    checks: list
    headline: str
    markdown: str = ""
    plots: tuple = ()


@dataclasses.dataclass(frozen=True)
class Study:
    """A paper's claim about a registered experiment, and how to judge it.

    Attributes:
        name: The experiment's registered name.
        claim: The claim, in one or two sentences.
        paper: Authors, year and arXiv link.
        paper_result: The paper's numbers at full scale.
        criteria: What counts as reproducing it at CPU scale.
        evaluate: `evaluate(exp_dir, runs) -> Evaluation`, where `runs`
            are `zoo.report.load_runs(exp_dir)`.
        callbacks: Optional `callbacks(experiment, split, run_dir)`
            returning the Keras callbacks (probes and their recorder) of
            one run; `run_dir` is the folder the run is written in.
        grid: Optional `grid(experiment)` returning `(run experiment, arm,
            seed)` triples, for studies whose arms change more than the
            variant and learning rate (a batch size); default: every
            (arm, seed) of `zoo.train.grid` with the experiment itself.
    """

    name: str
    claim: str
    paper: str
    paper_result: str
    criteria: str
    evaluate: object
    callbacks: object = None
    grid: object = None


STUDIES = {}


def register(study):
    """Adds `study` to the registry; its experiment must be registered."""
    if study.name in STUDIES:
        raise ValueError(f"Study {study.name!r} is registered twice.")
    STUDIES[study.name] = study
    return study


def names():
    return list(STUDIES)


def run_dir(exp_dir, run):
    """The folder of a run loaded by `zoo.report.load_runs`."""
    from zoo import train

    label = run.result.get("arm", run.result["variant"])
    return train.run_dir_for(exp_dir, label, run.result["seed"])


def check_variants(experiment):
    """Refuses a study run that leaves out a variant its verdict compares.

    Raises:
        ValueError: naming the variants the study needs, before anything
            is trained.
    """
    from zoo import experiments

    needed = experiments.get(experiment.name).variants
    missing = [v for v in needed if v not in experiment.variants]
    if missing:
        raise ValueError(
            f"The study '{experiment.name}' compares the variants "
            f"{', '.join(needed)}, and its verdict needs every one of "
            f"them; {', '.join(missing)} would be left out. Run it "
            "without --variants. Received: "
            f"variants={','.join(experiment.variants)}"
        )


def check_batch_size(experiment, batches):
    """Refuses a batch size for a study whose grid sets every arm's own.

    Such a grid replaces `experiment.batch_size` in each arm, so another
    value (`--batch-size`) would be silently ignored.

    Args:
        experiment: The study's experiment, as the command line built it.
        batches: The batch sizes the grid trains at.

    Raises:
        ValueError: when `experiment.batch_size` is not the registered
            one, before anything is trained.
    """
    from zoo import experiments

    registered = experiments.get(experiment.name)
    if experiment.smoke:
        registered = registered.shrink()
    if experiment.batch_size != registered.batch_size:
        raise ValueError(
            f"The study '{experiment.name}' trains at batch sizes of its "
            f"own ({', '.join(map(str, batches))}) and takes no other. Run "
            "it without --batch-size (expected: batch_size="
            f"{registered.batch_size}, the registered one). Received: "
            f"batch_size={experiment.batch_size}"
        )


def run_grid(
    experiment,
    logdir,
    console=None,
    command=None,
    after_run=None,
    data_dir=None,
):
    """Trains the study's missing runs, as `zoo.train.run_grid` does.

    The same run folders and resume rules; each run also gets the study's
    callbacks. Returns `(exp_dir, trained, skipped)`.
    """
    from rich.console import Console

    from zoo import data
    from zoo import train

    console = console or Console()
    # First, before any other TensorFlow op: multi-worker and TPU
    # strategies must be created at start-up. Each worker of a cluster
    # writes its own folder, as in `zoo.train.run_grid`.
    strategy = train.get_strategy(experiment.strategy)
    study = STUDIES[experiment.name]
    check_variants(experiment)
    exp_dir = train.experiment_dir(experiment, logdir, strategy)
    if study.grid is None:
        runs = [(experiment, arm, seed) for arm, seed in train.grid(experiment)]
    else:
        runs = study.grid(experiment)
    train.preflight(experiment, [arm.variant for _, arm, _ in runs], data_dir)
    train.write_hparams_config(exp_dir, experiment)
    trained = skipped = 0
    for index, (run_experiment, arm, seed) in enumerate(runs, start=1):
        folder = train.run_dir_for(exp_dir, arm.label, seed)
        if train.is_finished(folder):
            train.check_compatible(folder, run_experiment, arm, seed)
            skipped += 1
            continue
        callbacks = ()
        if study.callbacks is not None:
            split = data.load(experiment.dataset, data_dir)
            partial = folder.with_name(folder.name + train.PARTIAL_SUFFIX)
            callbacks = study.callbacks(run_experiment, split, partial)
        result = train.train_run(
            run_experiment,
            arm.variant,
            seed,
            folder,
            command=command,
            learning_rate=arm.learning_rate,
            label=arm.label,
            data_dir=data_dir,
            callbacks=callbacks,
        )
        trained += 1
        console.print(
            f"run {index}/{len(runs)} {arm.label} seed {seed}: "
            f"{train.outcome_text(result)} ({result['wall_s']:.1f} s)"
        )
        if after_run is not None:
            after_run(result)
    if skipped:
        console.print(f"{skipped} of {len(runs)} runs were already finished.")
    return exp_dir, trained, skipped


def _checks_table(checks):
    lines = [
        "| criterion | measured | outcome |",
        "|---|---|---|",
    ]
    for check in checks:
        lines.append(
            f"| {check.criterion} | {check.measured} | {check.outcome} |"
        )
    return "\n".join(lines)


def write_report(exp_dir):
    """Writes report.md with the claim and verdict, the plots and verdict.json.

    The accuracy table and curve come from `zoo.report.write_report`; the
    claim, the checks and the study's own tables and plots go on top.

    Returns:
        The summary record written to verdict.json (a dict).

    Raises:
        FileNotFoundError: when `exp_dir` holds no finished run.
        KeyError: when the runs belong to no registered study.
    """
    from zoo import report

    exp_dir = Path(exp_dir)
    _, runs = report.write_report(exp_dir)
    config = runs[0].config
    study = STUDIES[config["name"]]
    try:
        evaluation = study.evaluate(exp_dir, runs)
    except KeyError as error:
        # An arm without a finished run (an interrupted grid, or runs
        # copied in part): there is nothing to compare it with.
        raise ValueError(
            f"The study '{config['name']}' in {exp_dir} lacks the finished "
            f"runs of an arm its verdict compares (missing: {error}). "
            f"Finish them with `tfnorm-zoo run {config['name']}"
            f"{' --smoke' if config.get('smoke') else ''} --logdir "
            f"{exp_dir.parent}`."
        ) from None
    outcome = verdicts.verdict(evaluation.checks)
    seeds = sorted({run.result["seed"] for run in runs})
    train_s = sum(run.result["wall_s"] for run in runs)
    smoke = bool(config.get("smoke"))

    body = (exp_dir / report.REPORT_FILE).read_text().split("\n", 1)[1]
    text = [
        f"# {config['name']}" + (" (smoke)" if smoke else ""),
        "",
        f"**Claim** ({study.paper}): {study.claim}",
        "",
        f"**Paper, full scale**: {study.paper_result}",
        "",
        f"**Reproduced if** (SCIENCE.md): {study.criteria}",
        "",
        f"**Verdict: {outcome}**, from {len(runs)} runs (seeds "
        f"{', '.join(map(str, seeds))}), {train_s:.0f} s of training.",
        "",
        _checks_table(evaluation.checks),
        "",
        "Each check compares mean ± sample std over seeds (diverged runs "
        "count at chance accuracy): pass when the claimed difference "
        "exceeds the sum of the two stds, fail when the opposite does, "
        "unclear inside that spread or with one seed. Verdict: reproduced "
        "when every check passes, not reproduced when one fails, "
        "inconclusive otherwise (`zoo/verdict.py`).",
        "",
    ]
    if smoke:
        seed_text = "one seed" if len(seeds) == 1 else f"{len(seeds)} seeds"
        text += [
            f"This is a smoke run (tiny network, few steps, {seed_text}): "
            "it shows that the pipeline works, not what the paper claims.",
            "",
        ]
    if evaluation.markdown:
        text += [evaluation.markdown, ""]
    for file, caption in evaluation.plots:
        text += [f"![{caption}]({file})", ""]
    text += ["## Accuracy", body]
    partial = exp_dir / (report.REPORT_FILE + ".partial")
    partial.write_text("\n".join(text))
    os.replace(partial, exp_dir / report.REPORT_FILE)
    plots = [report.PLOT_FILE] + [f for f, _ in evaluation.plots]
    report.write_plot_images(exp_dir, plots)

    record = {
        "name": config["name"],
        "smoke": smoke,
        "claim": study.claim,
        "paper": study.paper,
        "paper_result": study.paper_result,
        "verdict": outcome,
        "headline": evaluation.headline,
        "checks": [dataclasses.asdict(c) for c in evaluation.checks],
        "runs": len(runs),
        "seeds": len(seeds),
        "train_s": round(train_s, 1),
        "plots": plots,
    }
    partial = exp_dir / (VERDICT_FILE + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, exp_dir / VERDICT_FILE)
    return record


def write_summary(records, path, wall_s=None):
    """Writes the reproduction page: each claim, its verdict and plots.

    Args:
        records: `(exp_dir, record)` pairs, as `write_report` returns
            them.
        path: The markdown file to write.
        wall_s: The measured wall time of the whole reproduction.
    """
    path = Path(path)
    smoke = any(record["smoke"] for _, record in records)
    lines = [
        "# Reproducing the papers' claims" + (" (smoke)" if smoke else ""),
        "",
        "Each claim from SCIENCE.md, the CPU-scale measurement and the "
        "verdict computed from it (`zoo/verdict.py`): reproduced, not "
        "reproduced, or inconclusive (inside the seed spread).",
        "",
    ]
    if wall_s is not None:
        minutes, seconds = divmod(round(wall_s), 60)
        lines += [
            f"Wall time of this command: {minutes} min {seconds:02d} s "
            "(runs already finished are kept, not retrained; each study's "
            "training time is in the table).",
            "",
        ]
    lines += [
        "| experiment | claim | paper | measured | seeds | training | "
        "verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for exp_dir, record in records:
        report_link = os.path.relpath(Path(exp_dir) / "report.md", path.parent)
        lines.append(
            f"| [{record['name']}]({report_link}) | {record['claim']} | "
            f"{record['paper_result']} | {record['headline']} | "
            f"{record['seeds']} | {record['train_s']:.0f} s | "
            f"**{record['verdict']}** |"
        )
    lines.append("")
    for exp_dir, record in records:
        lines += [f"## {record['name']}: {record['verdict']}", ""]
        lines += [f"{record['claim']} ({record['paper']})", ""]
        for check in record["checks"]:
            lines.append(
                f"- {check['outcome']}: {check['criterion']} "
                f"({check['measured']})"
            )
        lines.append("")
        for plot in record["plots"]:
            link = os.path.relpath(Path(exp_dir) / plot, path.parent)
            lines += [f"![{record['name']}: {plot}]({link})", ""]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines))
    os.replace(partial, path)


def reproduce(logdir, smoke=False, console=None, command=None, data_dir=None):
    """Runs every study (its CPU default, or `--smoke`) and the summary.

    Finished runs are kept, so an interrupted reproduction continues
    where it stopped.

    Returns:
        The path of the summary page.
    """
    from rich.console import Console

    from zoo import experiments

    console = console or Console()
    started = time.time()
    records = []
    for name in names():
        experiment = experiments.get(name)
        if smoke:
            experiment = experiment.shrink()
        console.print(f"[bold]{name}[/bold]: {experiments.summary(name)}")
        exp_dir, _, _ = run_grid(
            experiment,
            logdir,
            console=console,
            command=command,
            data_dir=data_dir,
        )
        record = write_report(exp_dir)
        console.print(f"{name}: {record['verdict']} ({record['headline']})")
        records.append((exp_dir, record))
    suffix = "_smoke" if smoke else ""
    path = Path(logdir) / REPRODUCTION_FILE.replace(".md", f"{suffix}.md")
    write_summary(records, path, wall_s=time.time() - started)
    return path


# Importing the studies registers them, in SCIENCE.md's order.
from zoo.studies import santurkar  # noqa: E402, F401, I001
from zoo.studies import ioffe  # noqa: E402, F401
from zoo.studies import renorm  # noqa: E402, F401
from zoo.studies import dropout_shift  # noqa: E402, F401
from zoo.studies import precise  # noqa: E402, F401
from zoo.studies import placement  # noqa: E402, F401
from zoo.studies import ghost  # noqa: E402, F401
from zoo.studies import dropout_family  # noqa: E402, F401
