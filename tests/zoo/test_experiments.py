"""Every registered experiment runs in smoke mode and logs what it should."""

import pytest
from tensorboard.backend.event_processing import event_accumulator

from zoo import cli
from zoo import experiments
from zoo import models

SCALARS = {
    "train/loss",
    "train/accuracy",
    "val/loss",
    "val/accuracy",
    "lr",
    "time/step_ms",
    "outcome/diverged",
}


@pytest.fixture(scope="module")
def smoke_logdir(tmp_path_factory):
    """Runs every registered experiment once, in smoke mode."""
    logdir = tmp_path_factory.mktemp("runs")
    codes = {
        name: cli.main(["run", name, "--smoke", "--logdir", str(logdir)])
        for name in experiments.names()
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
    assert codes == {name: 0 for name in experiments.names()}
    for name in experiments.names():
        experiment = experiments.get(name).shrink()
        exp_dir = logdir / experiment.folder
        assert (exp_dir / "report.md").is_file()
        assert (exp_dir / "val_accuracy.png").stat().st_size > 0
        for variant in experiment.variants:
            run_dir = exp_dir / variant / "seed_0"
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
    for variant in models.VARIANTS:
        assert f"| {variant} | " in text


def test_every_experiment_docstring_opens_with_its_command():
    for name in experiments.names():
        doc = experiments._FACTORIES[name].__doc__
        assert f"tfnorm-zoo run {name}" in doc
        assert "https://arxiv.org/abs/" in doc
        assert "Measured:" in doc
