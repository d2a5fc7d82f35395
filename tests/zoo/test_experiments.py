"""Every registered experiment runs in smoke mode and logs what it should."""

import json

import pytest
from tensorboard.backend.event_processing import event_accumulator

from zoo import cli
from zoo import experiments
from zoo import models
from zoo import studies

SCALARS = {
    "train/loss",
    "train/accuracy",
    "val/loss",
    "val/accuracy",
    "lr",
    "time/step_ms",
    "outcome/diverged",
}


# The paper studies run in smoke mode in test_studies.py, through
# `tfnorm-zoo reproduce --smoke`; running them twice would double the
# suite's slowest part.
GRIDS = [name for name in experiments.names() if name not in studies.STUDIES]


@pytest.fixture(scope="module")
def smoke_logdir(tmp_path_factory):
    """Runs every registered experiment once, in smoke mode."""
    logdir = tmp_path_factory.mktemp("runs")
    codes = {
        name: cli.main(["run", name, "--smoke", "--logdir", str(logdir)])
        for name in GRIDS
    }
    return logdir, codes


def _tags(folder):
    acc = event_accumulator.EventAccumulator(
        str(folder), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    tags = acc.Tags()["tensors"]
    return {
        tag: acc.SummaryMetadata(tag).plugin_data.plugin_name for tag in tags
    }


def test_every_registered_experiment_runs_in_smoke_mode(smoke_logdir):
    logdir, codes = smoke_logdir
    assert codes == {name: 0 for name in GRIDS}
    for name in GRIDS:
        experiment = experiments.get(name).shrink()
        exp_dir = logdir / experiment.folder
        assert (exp_dir / "report.md").is_file()
        assert (exp_dir / "val_accuracy.png").stat().st_size > 0
        for arm in experiment.arms():
            run_dir = exp_dir / arm.label / "seed_0"
            for file in (
                "config.json",
                "command.txt",
                "metrics.jsonl",
                "result.json",
            ):
                assert (run_dir / file).is_file(), run_dir / file
        assert not list(exp_dir.glob("*/*.partial"))


def test_each_run_logs_the_expected_tensorboard_tags(smoke_logdir):
    logdir, _ = smoke_logdir
    experiment = experiments.get("basics").shrink()
    exp_dir = logdir / experiment.folder
    layers = len(experiment.hidden_units)
    histograms = {f"preactivations/act_{i}" for i in range(1, layers + 1)}
    for variant in experiment.variants:
        tags = _tags(exp_dir / variant / "seed_0")
        assert {t: tags.get(t) for t in SCALARS} == dict.fromkeys(
            SCALARS, "scalars"
        )
        assert {t: tags.get(t) for t in histograms} == dict.fromkeys(
            histograms, "histograms"
        )
        assert tags.get("_hparams_/session_start_info") == "hparams"
        if models.uses_renorm(variant):
            assert tags.get("renorm/rmax") == "scalars"
    # The experiment folder declares the hparams for the HPARAMS tab.
    assert _tags(exp_dir).get("_hparams_/experiment") == "hparams"


def test_report_names_the_tensorboard_command(smoke_logdir):
    logdir, _ = smoke_logdir
    exp_dir = logdir / experiments.get("basics").shrink().folder
    text = (exp_dir / "report.md").read_text()
    assert f"tensorboard --logdir {exp_dir}" in text
    assert "| variant | val accuracy at step 12 |" in text
    for variant in experiments.BASICS_VARIANTS:
        assert f"| {variant} | " in text


def test_every_experiment_docstring_opens_with_its_command():
    for name in experiments.names():
        doc = experiments._FACTORIES[name].__doc__
        assert f"tfnorm-zoo run {name}" in doc
        assert "https://arxiv.org/abs/" in doc
        assert "Measured:" in doc


def test_learning_rate_arms_get_their_own_folders_and_rows(smoke_logdir):
    logdir, _ = smoke_logdir
    exp_dir = logdir / "santurkar-vgg_smoke"
    text = (exp_dir / "report.md").read_text()
    for label in ("none_lr0.1", "bn_before_lr0.1", "none_lr0.5"):
        assert (exp_dir / label / "seed_0" / "result.json").is_file()
        assert f"| {label} | " in text
    config = json.loads(
        (exp_dir / "none_lr0.5" / "seed_0" / "config.json").read_text()
    )
    assert (config["variant"], config["learning_rate"]) == ("none", 0.5)


def test_report_of_a_log_directory_summarizes_every_experiment(
    smoke_logdir, capsys
):
    logdir, _ = smoke_logdir
    assert cli.main(["report", str(logdir)]) == 0
    text = (logdir / "summary.md").read_text()
    for name in GRIDS:
        assert f"| {name} (smoke) | " in text
    assert "| resnet110-stochastic-depth (smoke) | resnet8 | digits32 | " in (
        text
    )


def test_full_scale_configs_state_their_recipe():
    he = experiments.get("resnet20-cifar10")
    assert (he.model, he.batch_size, he.momentum, he.weight_decay) == (
        "resnet20",
        128,
        0.9,
        1e-4,
    )
    assert (he.steps, he.lr_boundaries, he.learning_rate) == (
        64_000,
        (0.5, 0.75),
        0.1,
    )
    hoffer = experiments.get("hoffer-ghost")
    assert hoffer.batch_size == 4096 and hoffer.virtual_batch_size == 128
    assert hoffer.learning_rate * hoffer.lr_factor() == pytest.approx(
        0.1 * (4096 / 128) ** 0.5
    )
    assert experiments.get("resnet56-cifar10").model == "resnet56"
    assert experiments.get("santurkar-vgg").learning_rates == (0.1, 0.5)
    assert experiments.get("resnet110-stochastic-depth").dropout_rate == 0.5
