"""E2's deep linear arm: its grid, a smoke run, and its verdict logic."""

import json
import shutil

import pytest

from zoo import experiments
from zoo import studies
from zoo import verdict
from zoo.studies import recorder
from zoo.studies import santurkar

NAME = "santurkar-landscape"


def test_grid_adds_the_deep_linear_arm_to_the_mlp_arms():
    experiment = experiments.get(NAME)
    runs = santurkar.grid(experiment)
    mlp = [(e, arm, seed) for e, arm, seed in runs if e is experiment]
    deep = [(e, arm, seed) for e, arm, seed in runs if e is not experiment]
    assert len(mlp) == 2 * experiment.seeds
    # Two variants at two rates, every seed.
    assert len(deep) == 2 * 2 * experiment.seeds
    labels = sorted({arm.label for _, arm, _ in deep})
    assert labels == [
        "dln_bn_before_lr0.001",
        "dln_bn_before_lr0.01",
        "dln_none_lr0.001",
        "dln_none_lr0.01",
    ]
    for run_experiment, arm, _ in deep:
        # 24 hidden layers and the logits: 25 kernel layers.
        assert run_experiment.hidden_units == (64,) * 24
        assert run_experiment.activation == "linear"
        assert run_experiment.learning_rate == arm.learning_rate
        assert run_experiment.steps == experiment.steps
    # The smoke grid has both: the two MLP runs and a small deep linear
    # net at the first rate.
    smoke = experiment.shrink()
    assert [arm.label for _, arm, _ in santurkar.grid(smoke)] == [
        "none",
        "bn_before",
        "dln_none_lr0.001",
        "dln_bn_before_lr0.001",
    ]


@pytest.fixture(scope="module")
def landscape_smoke(tmp_path_factory):
    experiment = experiments.get(NAME).shrink()
    logdir = tmp_path_factory.mktemp("runs")
    exp_dir, trained, _ = studies.run_grid(experiment, logdir)
    assert trained == 4
    return exp_dir


def test_deep_linear_smoke_records_ics_and_reports_its_check(
    landscape_smoke, tmp_path
):
    exp_dir = landscape_smoke

    run_dir = exp_dir / "dln_bn_before_lr0.001" / "seed_0"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["activation"] == "linear"
    assert config["hidden_units"] == [8, 8, 8]
    assert config["learning_rate"] == 0.001
    lines = recorder.load(run_dir)
    assert [line["step"] for line in lines] == [3, 6, 9, 12]
    # ICS of all 4 layers, no landscape probe in this arm.
    tags = [tag for tag in lines[0] if tag != "step"]
    assert sorted({tag.split("/")[1] for tag in tags}) == [
        "dense_1",
        "dense_2",
        "dense_3",
        "logits",
    ]
    assert all(tag.startswith("ics/") for tag in tags)
    assert lines[0]["ics/dense_1/l2"] == 0.0
    assert lines[-1]["ics/logits/relative"] > 0

    record = studies.write_report(exp_dir)
    deep = [c for c in record["checks"] if "deep linear" in c["criterion"]]
    assert [c["criterion"] for c in deep] == [
        "in the 4-layer deep linear net at LR 0.001, BN's ICS (relative "
        "||G - G'|| / ||G||) is not clearly smaller than no BN's"
    ]
    # One seed has no spread: unclear, and the smoke decides nothing.
    assert deep[0]["outcome"] == verdict.UNCLEAR
    assert record["verdict"] == verdict.INCONCLUSIVE
    assert "deep linear net: relative ICS at LR 0.001" in record["headline"]
    text = (exp_dir / "report.md").read_text()
    assert "### Deep linear net (4 layers of 8, no activation)" in text
    assert "| ICS, relative, LR 0.001 |" in text
    assert (exp_dir / "deep_linear_ics.png").stat().st_size > 0

    # A folder of the deep linear arm alone still gets its report.
    copy = tmp_path / exp_dir.name
    shutil.copytree(exp_dir, copy)
    for arm in ("none", "bn_before"):
        shutil.rmtree(copy / arm)
    alone = studies.write_report(copy)
    assert [c["criterion"] for c in alone["checks"]] == [
        c["criterion"] for c in deep
    ]
    assert alone["headline"].startswith("deep linear net: relative ICS")


@pytest.mark.parametrize(
    "arms",
    [
        ["dln_none_lr0.001"],
        ["dln_bn_before_lr0.001"],
        # The MLP arm alone, as a grid cut off before the deep linear net.
        ["dln_none_lr0.001", "dln_bn_before_lr0.001"],
    ],
)
def test_report_of_a_folder_without_a_deep_linear_arm_says_which(
    landscape_smoke, tmp_path, arms
):
    copy = tmp_path / landscape_smoke.name
    shutil.copytree(landscape_smoke, copy)
    for arm in arms:
        shutil.rmtree(copy / arm)
    # Not a verdict with the lost arm's side of its check left empty.
    with pytest.raises(ValueError) as info:
        studies.write_report(copy)
    assert str(info.value) == (
        f"The study '{NAME}' in {copy} lacks the finished runs of an arm "
        f"its verdict compares (missing: '{', '.join(arms)}'). Finish them "
        f"with `tfnorm-zoo run {NAME} --smoke --logdir {tmp_path}`."
    )


def _seeds(relative):
    return [{"ics_relative": relative * f} for f in (0.9, 1.0, 1.1)]


@pytest.mark.parametrize(
    "bn, outcome",
    [
        # BN's ICS larger, as the paper finds in its deep linear net.
        (0.8, verdict.PASS),
        # Inside the seed spread: not clearly smaller, still a pass.
        (0.45, verdict.PASS),
        # BN's ICS clearly smaller: the claim about ICS fails.
        (0.1, verdict.FAIL),
    ],
)
def test_deep_linear_check_from_fabricated_seeds(bn, outcome):
    measures = {
        ("none", 0.01): _seeds(0.5),
        ("bn_before", 0.01): _seeds(bn),
    }
    (check,) = santurkar.evaluate_deep_linear(measures)
    assert check.outcome == outcome
    assert check.criterion.startswith(
        "in the 25-layer deep linear net at LR 0.01, BN's ICS"
    )


def test_deep_linear_checks_one_per_rate_and_unclear_without_spread():
    measures = {
        ("none", 0.01): _seeds(0.5),
        ("bn_before", 0.01): _seeds(0.1),
        ("none", 0.001): [{"ics_relative": 0.05}],
        # A diverged run's probes recorded nothing: NaN is left out.
        ("bn_before", 0.001): [
            {"ics_relative": 0.2},
            {"ics_relative": float("nan")},
        ],
    }
    checks = santurkar.evaluate_deep_linear(measures)
    assert [c.outcome for c in checks] == [verdict.UNCLEAR, verdict.FAIL]
    assert "at LR 0.001," in checks[0].criterion
    assert verdict.verdict(checks) == verdict.NOT_REPRODUCED
