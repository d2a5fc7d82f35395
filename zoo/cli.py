"""`tfnorm-zoo`: list, run and report the zoo's experiments.

tfnorm-zoo                      run the default experiment, basics
tfnorm-zoo list                 one line per registered experiment
tfnorm-zoo run NAME [options]   run one experiment's grid
tfnorm-zoo report DIR...        rebuild experiment reports; with several
                                folders (or a log directory), also a
                                summary across experiments
tfnorm-zoo reproduce [--smoke]  run every paper study (CPU defaults) and
                                write one page of claims and verdicts
"""

import argparse
import os
import shlex
import sys
import time

PROG = "tfnorm-zoo"
INTERRUPTED = (
    "Interrupted. Finished runs are kept, and the run in progress "
    "continues from its last checkpoint: run the same command again to "
    "finish."
)


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
    # The names are checked in `_variants_problem`, once the experiment
    # (whose model decides which variants fit) is known.
    names = [name.strip() for name in text.split(",") if name.strip()]
    # Keep the given order, without repeats.
    return tuple(dict.fromkeys(names))


def _variants_problem(experiment, names):
    """What is wrong with `--variants` for `experiment`, or None."""
    from zoo import experiments
    from zoo import models
    from zoo import studies

    if experiment.name in studies.STUDIES:
        # A study's verdict needs every one of its own variants.
        valid = experiments.get(experiment.name).variants
        listing = f"Valid variants for the study {experiment.name}"
    else:
        valid = models.variants_for(experiment.model)
        listing = (
            f"Valid variants for {experiment.name} (model {experiment.model})"
        )
    listing += f": {', '.join(valid)}."
    if not names:
        return f"expected a comma-separated list of variant names. {listing}"
    unknown = [name for name in names if name not in models.VARIANTS]
    if not unknown:
        return None
    problem = f"unknown variant(s) {', '.join(repr(n) for n in unknown)}. "
    # The report's rows of a grid with a learning-rate axis are arms,
    # labelled `variant_lrRATE`, which read like something to pass back.
    arms = [
        name for name in unknown if name.rpartition("_lr")[0] in models.VARIANTS
    ]
    if arms and experiment.learning_rates:
        parts = dict.fromkeys(name.rpartition("_lr")[0] for name in arms)
        rates = ", ".join(f"{lr:g}" for lr in experiment.learning_rates)
        problem += (
            f"Arms such as {arms[0]} are variant_lrRATE combinations "
            f"({experiment.name} trains each variant at the learning rates "
            f"{rates}); --variants takes the variant part: "
            f"{', '.join(parts)}. "
        )
    return problem + listing


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
    run.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="global batch size, split over the replicas (default: the "
        "experiment's; its learning-rate scaling rule, if any, applies)",
    )
    run.add_argument(
        "--strategy",
        choices=("default", "mirrored", "multiworker", "tpu"),
        help="tf.distribute strategy: default (one device), mirrored "
        "(all local GPUs), multiworker (MultiWorkerMirroredStrategy, "
        "cluster from TF_CONFIG), tpu (TPUStrategy; TPU_NAME or the local "
        "TPU VM)",
    )
    run.add_argument(
        "--sync-bn",
        action="store_true",
        help="tfnorm BN normalizes over the global batch across replicas "
        "(synchronized=True)",
    )
    run.add_argument(
        "--precision",
        choices=("float32", "mixed_float16", "mixed_bfloat16"),
        help="Keras dtype policy (default: float32; mixed_float16 adds "
        "loss scaling)",
    )
    run.add_argument(
        "--jit",
        action="store_true",
        help="compile the training step with XLA",
    )
    run.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder of prepared tensorflow-datasets data (default: "
        "TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )

    report = commands.add_parser(
        "report",
        help="write report.md and the plot for experiment folders",
        description=(
            "Read the finished run folders under each DIR (for example "
            "runs/basics) and write report.md and val_accuracy.png there. "
            "A DIR without run folders (for example runs) stands for the "
            "experiments inside it. With more than one experiment, also "
            "write summary.md, one table across them, into their common "
            "parent folder."
        ),
    )
    report.add_argument(
        "dirs",
        nargs="+",
        metavar="DIR",
        help="experiment folders, or log directories holding them",
    )

    reproduce = commands.add_parser(
        "reproduce",
        help="run every paper study and write one page of verdicts",
        description=(
            "Run the CPU default of every paper study (zoo/studies; the "
            "training times measured in their docstrings add up to about "
            "47 min on 2 shared CPU cores), "
            "write each one's report with its claim and verdict, and "
            "write reproduction.md into the log directory: each claim, "
            "the paper's number, what was measured, the verdict and the "
            "plots. Finished runs are kept, so rerunning after an "
            "interruption trains only the missing ones."
        ),
    )
    reproduce.add_argument(
        "--logdir",
        default="runs",
        metavar="DIR",
        help="root folder for run folders and reports (default: runs)",
    )
    reproduce.add_argument(
        "--smoke",
        action="store_true",
        help="every study in smoke size (seconds each); the page says "
        "that its verdicts mean nothing",
    )
    # Errors found after parsing (a folder without runs, a --logdir of
    # another configuration) go through the command's own parser, so that
    # they show its usage, as argparse's own errors on that command do.
    for command in (run, report, reproduce):
        command.set_defaults(error=command.error)
    return parser


def _format_seconds(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _print_report(console, exp_dir):
    from zoo import report
    from zoo import studies

    rows, runs = report.write_report(exp_dir)
    console.print(report.rich_table(rows, runs, title=str(exp_dir)))
    if runs[0].config["name"] in studies.STUDIES:
        # A paper study's report adds the claim and the verdict.
        record = studies.write_report(exp_dir)
        console.print(f"Verdict: {record['verdict']} ({record['headline']})")
    console.print(f"Report: {exp_dir / report.REPORT_FILE}")
    console.print(f"Plot:   {exp_dir / report.PLOT_FILE}")
    console.print("Open the curves and histograms in TensorBoard with:")
    console.print(f"  {report.tensorboard_command(exp_dir)}", highlight=False)


def _run(args, console):
    from zoo import data
    from zoo import experiments
    from zoo import train

    experiment = experiments.get(args.name)
    if args.smoke:
        experiment = experiment.shrink()
    if args.variants is not None:
        problem = _variants_problem(experiment, args.variants)
        if problem:
            # Worded as argparse words the errors of its own checks.
            args.error(f"argument --variants: {problem}")
    changes = {
        key: value
        for key, value in (
            ("seeds", args.seeds),
            ("steps", args.steps),
            ("variants", args.variants),
        )
        if value is not None
    }
    for key, value in (
        ("batch_size", args.batch_size),
        ("strategy", args.strategy),
        ("precision", args.precision),
        ("synchronized", args.sync_bn or None),
        ("jit", args.jit or None),
    ):
        if value is not None:
            changes[key] = value

    started = time.time()
    try:
        experiment = experiment.replace(**changes)
        from zoo import studies

        # A paper study's runs also record its diagnostics.
        run_grid = (
            studies.run_grid
            if experiment.name in studies.STUDIES
            else train.run_grid
        )
        exp_dir, trained, skipped = run_grid(
            experiment,
            args.logdir,
            console=console,
            command=shlex.join([PROG] + sys.argv[1:]),
            data_dir=args.data_dir,
        )
    except KeyboardInterrupt:
        console.print(INTERRUPTED)
        return 130
    except ValueError as error:
        args.error(str(error))
    except data.DataUnavailableError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    elapsed = time.time() - started
    chief, _ = train.worker_role(train.get_strategy(experiment.strategy))
    if not chief:
        # The chief writes the report; a worker only says where it wrote.
        console.print(f"Worker runs written to {exp_dir}.")
        return 0
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

        width = max(map(len, experiments.names()))
        for name in experiments.names():
            # Plain print: one line per experiment, never wrapped.
            print(f"{name:{width}} {experiments.summary(name)}")
        return 0
    if args.command == "report":
        from pathlib import Path

        from zoo import report

        try:
            exp_dirs = report.experiment_dirs(args.dirs)
        except (FileNotFoundError, ValueError) as error:
            args.error(str(error))
        failed = []
        for exp_dir in exp_dirs:
            try:
                _print_report(console, exp_dir)
            except (FileNotFoundError, ValueError) as error:
                if len(exp_dirs) == 1:
                    args.error(str(error))
                # One broken folder does not hide the others' reports.
                print(f"{PROG}: error: {error}", file=sys.stderr)
                failed.append(exp_dir)
        exp_dirs = [d for d in exp_dirs if d not in failed]
        if len(exp_dirs) > 1:
            parent = Path(os.path.commonpath([d.resolve() for d in exp_dirs]))
            path = parent / report.SUMMARY_FILE
            lines = report.write_summary(exp_dirs, path)
            console.print(report.rich_summary(lines, title="summary"))
            console.print(f"Summary: {path}")
        return 1 if failed else 0
    if args.command == "reproduce":
        from zoo import studies

        started = time.time()
        try:
            path = studies.reproduce(
                args.logdir,
                smoke=args.smoke,
                console=console,
                command=shlex.join([PROG] + sys.argv[1:]),
            )
        except KeyboardInterrupt:
            console.print(INTERRUPTED)
            return 130
        except ValueError as error:
            # As for run: a --logdir that is a file, a finished run of
            # another configuration in the folder.
            args.error(str(error))
        console.print(f"Summary: {path}")
        console.print(
            f"Measured wall time: {_format_seconds(time.time() - started)}."
        )
        return 0
    if args.command == "run":
        return _run(args, console)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
