"""`tfnorm-zoo`: list, run and report the zoo's experiments.

tfnorm-zoo                      run the default experiment, basics
tfnorm-zoo list                 one line per registered experiment
tfnorm-zoo run NAME [options]   run one experiment's grid
tfnorm-zoo report DIR           rebuild the report of an experiment folder
"""

import argparse
import os
import shlex
import sys
import time

PROG = "tfnorm-zoo"


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer. Received: {text!r}"
        )
    return value


def _experiment_name(text):
    from zoo import experiments

    if text not in experiments.names():
        raise argparse.ArgumentTypeError(
            f"unknown experiment {text!r}. "
            f"Valid experiments: {', '.join(experiments.names())}."
        )
    return text


def _variant_list(text):
    from zoo import models

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in models.VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(repr(n) for n in unknown)}. "
            f"Valid variants: {', '.join(models.VARIANTS)}."
            if unknown
            else "expected a comma-separated list of variant names. "
            f"Valid variants: {', '.join(models.VARIANTS)}."
        )
    # Keep the given order, without repeats.
    return tuple(dict.fromkeys(names))


def _parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Train and compare normalization variants on real data, "
            "offline. Without a command, runs the default experiment "
            "(basics) with its default options."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    commands.add_parser(
        "list",
        help="list the registered experiments",
        description="List the registered experiments, one line each.",
    )

    run = commands.add_parser(
        "run",
        help="run an experiment's grid of variants and seeds",
        description=(
            "Train every (variant, seed) of an experiment that has no "
            "finished run folder yet, then write the report. Rerunning "
            "after an interruption finishes the missing runs."
        ),
    )
    run.add_argument(
        "name",
        nargs="?",
        default="basics",
        type=_experiment_name,
        metavar="NAME",
        help="experiment to run (default: basics; see `tfnorm-zoo list`)",
    )
    run.add_argument(
        "--seeds",
        type=_positive_int,
        metavar="N",
        help="number of seeds per variant (default: the experiment's)",
    )
    run.add_argument(
        "--steps",
        type=_positive_int,
        metavar="N",
        help="training steps per run (default: the experiment's)",
    )
    run.add_argument(
        "--variants",
        type=_variant_list,
        metavar="A,B,...",
        help="comma-separated subset of variants (default: all of the "
        "experiment's)",
    )
    run.add_argument(
        "--logdir",
        default="runs",
        metavar="DIR",
        help="root folder for run folders and reports (default: runs)",
    )
    run.add_argument(
        "--smoke",
        action="store_true",
        help="shrink the experiment to seconds (tiny layers, few steps, "
        "one seed) to check that everything runs; written to NAME_smoke",
    )

    report = commands.add_parser(
        "report",
        help="write report.md and the plot for an experiment folder",
        description=(
            "Read the finished run folders under DIR (for example "
            "runs/basics) and write report.md and val_accuracy.png there."
        ),
    )
    report.add_argument("dir", metavar="DIR", help="an experiment folder")
    return parser


def _format_seconds(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _print_report(console, exp_dir):
    from zoo import report

    rows, runs = report.write_report(exp_dir)
    console.print(report.rich_table(rows, runs, title=str(exp_dir)))
    console.print(f"Report: {exp_dir / report.REPORT_FILE}")
    console.print(f"Plot:   {exp_dir / report.PLOT_FILE}")
    console.print("Open the curves and histograms in TensorBoard with:")
    console.print(f"  {report.tensorboard_command(exp_dir)}", highlight=False)


def _run(args, parser, console):
    from zoo import experiments
    from zoo import train

    experiment = experiments.get(args.name)
    if args.smoke:
        experiment = experiment.shrink()
    changes = {
        key: value
        for key, value in (
            ("seeds", args.seeds),
            ("steps", args.steps),
            ("variants", args.variants),
        )
        if value is not None
    }
    experiment = experiment.replace(**changes)

    started = time.time()
    try:
        exp_dir, trained, skipped = train.run_grid(
            experiment,
            args.logdir,
            console=console,
            command=shlex.join([PROG] + sys.argv[1:]),
        )
    except KeyboardInterrupt:
        console.print(
            "Interrupted. Finished runs are kept; run the same command "
            "again to train the missing ones."
        )
        return 130
    except ValueError as error:
        parser.error(str(error))
    elapsed = time.time() - started
    _print_report(console, exp_dir)
    console.print(
        f"Measured wall time: {_format_seconds(elapsed)} "
        f"({trained} runs trained, {skipped} already finished)."
    )
    return 0


def main(argv=None):
    # Before TensorFlow is imported: its C++ start-up chatter would bury
    # the progress display.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv or ["run"])

    from rich.console import Console

    console = Console()
    if args.command == "list":
        from zoo import experiments

        for name in experiments.names():
            # Plain print: one line per experiment, never wrapped.
            print(f"{name:12} {experiments.summary(name)}")
        return 0
    if args.command == "report":
        from pathlib import Path

        try:
            _print_report(console, Path(args.dir))
        except FileNotFoundError as error:
            parser.error(str(error))
        return 0
    if args.command == "run":
        return _run(args, parser, console)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
