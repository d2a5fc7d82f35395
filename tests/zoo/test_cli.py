"""`tfnorm-zoo`: help everywhere, clear errors that list the valid choices."""

import pytest

from zoo import cli
from zoo import experiments
from zoo import models

VARIANTS = ", ".join(models.VARIANTS)


def _error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["run", "basic"],
            "tfnorm-zoo run: error: argument NAME: unknown experiment "
            "'basic'. Valid experiments: <EXPERIMENTS>.",
        ),
        # Only the variants the experiment's model can take: the MLP has
        # no feature maps for DropBlock, no residual branches for DropPath.
        (
            ["run", "--variants", "bn_before,batchnorm,ghost"],
            "tfnorm-zoo run: error: argument --variants: unknown variant(s) "
            "'batchnorm'. Valid variants for basics (model mlp): none, "
            "bn_before, bn_after, ghost, renorm, noisy_bn, bn_dropout, "
            "groupnorm.",
        ),
        (
            ["run", "--variants", ","],
            "tfnorm-zoo run: error: argument --variants: expected a "
            "comma-separated list of variant names. Valid variants for "
            "basics (model mlp): none, bn_before, bn_after, ghost, renorm, "
            "noisy_bn, bn_dropout, groupnorm.",
        ),
        (
            ["run", "resnet20-cifar10", "--variants", "foo"],
            "tfnorm-zoo run: error: argument --variants: unknown variant(s) "
            "'foo'. Valid variants for resnet20-cifar10 (model resnet20): "
            f"{VARIANTS}.",
        ),
        # The report's rows are arms; --variants takes their variant part.
        (
            ["run", "santurkar-lr", "--variants", "none_lr0.5,bn_before_lr1"],
            "tfnorm-zoo run: error: argument --variants: unknown variant(s) "
            "'none_lr0.5', 'bn_before_lr1'. Arms such as none_lr0.5 are "
            "variant_lrRATE combinations (santurkar-lr trains each variant "
            "at the learning rates 0.05, 0.5); --variants takes the variant "
            "part: none, bn_before. Valid variants for the study "
            "santurkar-lr: none, bn_before, noisy_bn.",
        ),
        (
            ["run", "santurkar-vgg", "--variants", "none_lr0.1"],
            "tfnorm-zoo run: error: argument --variants: unknown variant(s) "
            "'none_lr0.1'. Arms such as none_lr0.1 are variant_lrRATE "
            "combinations (santurkar-vgg trains each variant at the "
            "learning rates 0.1, 0.5); --variants takes the variant part: "
            "none. Valid variants for santurkar-vgg (model vgg16): "
            f"{', '.join(models.variants_for('vgg16'))}.",
        ),
        # A study needs every one of its variants.
        (
            ["run", "santurkar-landscape", "--variants", "foo"],
            "tfnorm-zoo run: error: argument --variants: unknown variant(s) "
            "'foo'. Valid variants for the study santurkar-landscape: none, "
            "bn_before.",
        ),
        (
            ["run", "--seeds", "0"],
            "tfnorm-zoo run: error: argument --seeds: expected a positive "
            "integer. Received: '0'",
        ),
        (
            ["run", "--steps", "many"],
            "tfnorm-zoo run: error: argument --steps: expected a positive "
            "integer. Received: 'many'",
        ),
        (
            ["train"],
            "tfnorm-zoo: error: argument COMMAND: invalid choice: 'train' "
            "(choose from 'list', 'run', 'report', 'reproduce')",
        ),
    ],
)
def test_bad_names_and_values_list_the_valid_choices(capsys, argv, message):
    # Filled in here, not at import: other modules may register more.
    names = ", ".join(experiments.names())
    assert _error(capsys, argv) == message.replace("<EXPERIMENTS>", names)


def test_report_of_a_folder_without_runs_says_what_it_expected(
    capsys, tmp_path
):
    with pytest.raises(SystemExit) as info:
        cli.main(["report", str(tmp_path)])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # Found after parsing, yet shown as argparse shows the command's own.
    assert lines[0] == "usage: tfnorm-zoo report [-h] DIR [DIR ...]"
    assert lines[-1] == (
        f"tfnorm-zoo report: error: No finished runs in {tmp_path}: "
        "expected folders <variant>/seed_<n>/ with a result.json, as "
        "`tfnorm-zoo run` writes them."
    )


@pytest.mark.parametrize(
    "argv", [[], ["list"], ["run"], ["report"], ["reproduce"]]
)
def test_help_everywhere(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv + ["--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: tfnorm-zoo")


def test_list_shows_one_line_per_experiment(capsys):
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == experiments.names()
    assert lines[0].startswith("basics ")


def test_ctrl_c_keeps_finished_runs_and_says_how_to_resume(
    capsys, monkeypatch, tmp_path
):
    from zoo import studies
    from zoo import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_grid", interrupted)
    monkeypatch.setattr(studies, "run_grid", interrupted)
    message = (
        "Interrupted. Finished runs are kept, and the run in progress "
        "continues from its last checkpoint: run the same command again "
        "to finish."
    ).split()
    for command in ("run", "reproduce"):
        argv = [command, "--smoke", "--logdir", str(tmp_path)]
        assert cli.main(argv) == 130
        # reproduce names the study it was running first.
        assert capsys.readouterr().out.split()[-len(message) :] == message


def test_an_unavailable_dataset_fails_fast_and_says_how_to_provide_it(
    capsys, monkeypatch, tmp_path
):
    from zoo import data

    monkeypatch.setattr(
        data, "_unreachable_reason", lambda: "no network in this test"
    )
    # An existing, empty folder (tests/zoo/test_data.py has one that does
    # not exist).
    empty = tmp_path / "tfds"
    empty.mkdir()
    argv = ["run", "resnet20-cifar10", "--steps", "1", "--seeds", "1"]
    argv += ["--logdir", str(tmp_path / "runs"), "--data-dir", str(empty)]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.strip() == (
        f"tfnorm-zoo: error: Dataset 'cifar10' is not prepared in {empty} "
        "and cannot be downloaded from this machine (no network in this "
        'test). On a machine with a network, run `python -c "import '
        "tensorflow_datasets as tfds; tfds.builder('cifar10')."
        'download_and_prepare()"`, copy its ~/tensorflow_datasets folder '
        "here and pass it with `--data-dir DIR` (or set TFDS_DATA_DIR)."
    )


@pytest.mark.parametrize("command", ["run", "reproduce"])
@pytest.mark.parametrize("below", ["", "/runs"])
def test_a_logdir_that_is_a_file_is_refused(tmp_path, capsys, below, command):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    logdir = f"{afile}{below}"
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--smoke", "--logdir", logdir])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: tfnorm-zoo {command} [-h] ")
    assert err.endswith(
        f"tfnorm-zoo {command}: error: The log directory must be a folder, "
        f"and {afile} is a file. Pass another --logdir. Received: "
        f"logdir={logdir!r}\n"
    )
    assert afile.read_text() == "not a folder"


def _assert_names_the_damaged_file(info, capsys, damaged, problem):
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: Cannot read the run file {damaged}: " in err
    assert problem in err
    assert err.endswith(
        "Rerun that run (delete its folder and run the same command again).\n"
    )


@pytest.mark.parametrize(
    "file, text, problem",
    [
        ("result.json", '{"variant": "none",\n', "Expecting"),
        ("result.json", "{}", "it lacks variant, seed, status"),
        ("config.json", "null", "it lacks name, variant, dataset"),
        ("metrics.jsonl", '{"step": 1,\n', "Expecting"),
    ],
)
def test_report_of_a_damaged_run_file_names_the_file(
    tmp_path, capsys, file, text, problem
):
    argv = ["run", "--smoke", "--variants", "none", "--logdir", str(tmp_path)]
    assert cli.main(argv) == 0
    damaged = tmp_path / "basics_smoke" / "none" / "seed_0" / file
    damaged.write_text(text)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(["report", str(tmp_path / "basics_smoke")])
    _assert_names_the_damaged_file(info, capsys, damaged, problem)


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"name": ', "Expecting value"),
        ("null", "it holds no config"),
        (None, "No such file or directory"),
    ],
)
def test_rerun_over_a_damaged_config_names_the_file(
    tmp_path, capsys, text, problem
):
    argv = ["run", "--smoke", "--variants", "none", "--logdir", str(tmp_path)]
    assert cli.main(argv) == 0
    damaged = tmp_path / "basics_smoke" / "none" / "seed_0" / "config.json"
    if text is None:
        damaged.unlink()
    else:
        damaged.write_text(text)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    _assert_names_the_damaged_file(info, capsys, damaged, problem)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--variants", "none,dropblock"],
            "Model 'mlp' has no place for dropout flavor 'dropblock' "
            "(variant 'dropblock'). Its variants with dropout: bn_dropout.",
        ),
        (
            ["--variants", "none", "--batch-size", "8192"],
            "batch_size=8192 is larger than the 4000 training examples of "
            "'digits'.",
        ),
    ],
)
def test_a_grid_that_cannot_run_is_refused_before_it_trains(
    tmp_path, capsys, options, message
):
    argv = ["run", "--smoke", "--logdir", str(tmp_path)] + options
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tfnorm-zoo run [-h] ")
    assert err.endswith(f"tfnorm-zoo run: error: {message}\n")
    # Nothing was trained or written: not even the first variant's run.
    assert list(tmp_path.iterdir()) == []
