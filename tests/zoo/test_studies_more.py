"""ghost-large-batch and dropout-family: smoke runs, verdicts, the log fit."""

import itertools
import json
import math
import shutil

import keras
import numpy as np
import pytest

from zoo import cli
from zoo import experiments
from zoo import studies
from zoo import verdict
from zoo.studies import dropout_family
from zoo.studies import ghost
from zoo.studies import recorder


def _smoke(tmp_path_factory, name):
    logdir = tmp_path_factory.mktemp("runs")
    code = cli.main(["run", name, "--smoke", "--logdir", str(logdir)])
    return logdir / f"{name}_smoke", code


@pytest.fixture(scope="module")
def ghost_smoke(tmp_path_factory):
    return _smoke(tmp_path_factory, "ghost-large-batch")


@pytest.fixture(scope="module")
def family_smoke(tmp_path_factory):
    return _smoke(tmp_path_factory, "dropout-family")


def test_ghost_smoke_runs_every_arm_and_records_the_distance(ghost_smoke):
    exp_dir, code = ghost_smoke
    assert code == 0
    experiment = experiments.get("ghost-large-batch").shrink()
    expected = {
        "bn_b64": (64, 12, 0.1),
        "bn_b1024_short": (1024, 1, 0.4),
        "ghost_b1024_short": (1024, 1, 0.4),
        "bn_b1024": (1024, 12, 0.4),
        "ghost_b1024": (1024, 12, 0.4),
    }
    assert [label for label, *_ in ghost.arms(experiment)] == list(expected)
    for label, (batch, steps, lr) in expected.items():
        run_dir = exp_dir / label / "seed_0"
        config = json.loads((run_dir / "config.json").read_text())
        assert (config["batch_size"], config["steps"]) == (batch, steps)
        assert config["scaled_learning_rate"] == pytest.approx(lr)
        lines = recorder.load(run_dir)
        assert [line["step"] for line in lines] == ghost.probe_steps(steps)
        distances = [line[ghost.DISTANCE_TAG] for line in lines]
        assert all(d > 0 for d in distances), distances
        # The initial weights are only kept while the run trains.
        assert not (run_dir / ghost.INITIAL_WEIGHTS_FILE).exists()
    record = json.loads((exp_dir / studies.VERDICT_FILE).read_text())
    assert record["verdict"] == "inconclusive"
    assert len(record["checks"]) == 4 + 2 * 3
    for plot in ("weight_distance.png", "accuracy_by_arm.png"):
        assert (exp_dir / plot).stat().st_size > 0
    report = (exp_dir / "report.md").read_text()
    assert "| bn_b1024_short | 1024 | 1 | 0.4 |" in report


def test_ghost_accuracy_table_states_each_arm_s_own_step(ghost_smoke):
    exp_dir, _ = ghost_smoke
    lines = (exp_dir / "report.md").read_text().splitlines()
    header = lines.index(
        "| variant | val accuracy at each arm's last step | steps to 90% "
        "val accuracy | diverged |"
    )
    rows = itertools.takewhile(lambda line: line, lines[header + 2 :])
    accuracy = {row.split(" | ")[0][2:]: row.split(" | ")[1] for row in rows}
    # The `_short` arms stop at step 1 of the smoke run's 12.
    steps = {
        "bn_b64": 12,
        "bn_b1024_short": 1,
        "ghost_b1024_short": 1,
        "bn_b1024": 12,
        "ghost_b1024": 12,
    }
    assert sorted(accuracy) == sorted(steps)
    for label, step in steps.items():
        assert accuracy[label].endswith(f"(n=1) at step {step}"), accuracy


def test_ghost_report_of_a_folder_without_an_arm_says_which(
    ghost_smoke, tmp_path
):
    exp_dir, _ = ghost_smoke
    for label, *_ in ghost.arms(experiments.get("ghost-large-batch").shrink()):
        copy = tmp_path / label / exp_dir.name
        shutil.copytree(exp_dir, copy)
        shutil.rmtree(copy / label)
        # A ValueError the CLI prints, never a KeyError or StopIteration.
        with pytest.raises(ValueError, match="lacks the finished runs"):
            studies.write_report(copy)


def test_dropout_family_smoke_runs_every_flavor_in_one_network(family_smoke):
    exp_dir, code = family_smoke
    assert code == 0
    for variant in dropout_family.FLAVORS:
        run_dir = exp_dir / variant / "seed_0"
        config = json.loads((run_dir / "config.json").read_text())
        assert (config["model"], config["width"]) == ("resconvnet1d", 0.5)
        lines = recorder.load(run_dir)
        # The smoke run evaluates every 6 of its 12 steps.
        assert [line["step"] for line in lines] == [6, 12]
        assert 0 <= lines[-1][dropout_family.TRAIN_ACCURACY_TAG] <= 1
    record = json.loads((exp_dir / studies.VERDICT_FILE).read_text())
    assert record["verdict"] == "inconclusive"
    assert len(record["checks"]) == 7
    assert (exp_dir / "flavors.png").stat().st_size > 0
    report = (exp_dir / "report.md").read_text()
    assert "| DropPath | stochastic_depth |" in report


def test_probe_steps_are_log_spaced_from_the_first_to_the_last_step():
    steps = ghost.probe_steps(640)
    assert steps[0] == 1 and steps[-1] == 640
    # Rounding merges the first few; from step 10 on each is about 1.18
    # times the one before (640 ** (1 / 39)).
    ratios = [b / a for a, b in itertools.pairwise(steps) if a >= 10]
    assert all(1.1 < r < 1.25 for r in ratios), ratios
    assert ghost.probe_steps(12) == list(range(1, 13))


def test_growth_fits_tell_log_from_sqrt_and_linear_growth():
    t = np.array(ghost.probe_steps(1_000), float)
    log = ghost.growth_fits(t, 3.0 * np.log(t) + 1.0, 1_000)
    assert log["r2_log"] == pytest.approx(1.0, abs=1e-12)
    assert log["r2_log"] > log["r2_sqrt"] > log["r2_linear"]
    assert log["per_decade"] == pytest.approx(3.0 * math.log(10))
    # Steps below 1% of the run are left out of the fit.
    assert log["points"] == sum(1 for s in t if s >= 10)

    linear = ghost.growth_fits(t, 0.01 * t, 1_000)
    assert linear["r2_linear"] == pytest.approx(1.0, abs=1e-12)
    assert linear["r2_log"] < 0.9, linear

    sqrt = ghost.growth_fits(t, np.sqrt(t), 1_000)
    assert sqrt["r2_sqrt"] == pytest.approx(1.0, abs=1e-12)
    assert max(sqrt["r2_log"], sqrt["r2_linear"]) < 0.99, sqrt


def test_growth_fits_skip_missing_values_and_need_three_points():
    fits = ghost.growth_fits([10, 100, 1_000], [1.0, None, 3.0], 1_000)
    assert fits["points"] == 2
    assert all(math.isnan(fits[k]) for k in ("r2_log", "per_decade"))


def test_weight_distance_measures_from_the_saved_start_after_a_resume(
    tmp_path,
):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.optimizer.build(model.trainable_variables)
    start = [np.asarray(v.numpy()) for v in model.trainable_variables]
    probe = ghost.WeightDistance([3], tmp_path)
    probe.set_model(model)
    probe.on_train_begin()
    assert (tmp_path / ghost.INITIAL_WEIGHTS_FILE).is_file()

    # Kernel moved by (3, 4), bias unchanged: distance 5.
    kernel, bias = model.trainable_variables
    kernel.assign(start[0] + np.array([[3.0], [4.0]]))
    model.optimizer.iterations.assign(3)
    resumed = ghost.WeightDistance([3], tmp_path)
    resumed.set_model(model)
    resumed.on_train_begin()
    resumed.on_train_batch_end(0)
    step, result = resumed.history[0]
    assert step == 3
    assert result["distance"] == pytest.approx(5.0)
    expected_norm = math.sqrt(
        float(np.sum(kernel.numpy() ** 2) + np.sum(bias.numpy() ** 2))
    )
    assert result["norm"] == pytest.approx(expected_norm)
    resumed.on_train_end()
    assert not (tmp_path / ghost.INITIAL_WEIGHTS_FILE).exists()

    lost = ghost.WeightDistance([3], tmp_path)
    lost.set_model(model)
    with pytest.raises(FileNotFoundError) as info:
        lost.on_train_begin()
    assert str(info.value) == (
        "The run resumes at step 3, but its initial weights "
        f"({tmp_path / ghost.INITIAL_WEIGHTS_FILE}) are gone, so the "
        "distance from them cannot be measured. Delete the run's .partial "
        "folder to start it again."
    )


def test_ghost_grid_refuses_a_small_batch_as_large_as_the_large_one():
    experiment = experiments.get("ghost-large-batch").replace(batch_size=1024)
    with pytest.raises(ValueError) as info:
        ghost.grid(experiment)
    assert str(info.value) == (
        "ghost-large-batch compares batch 1024 with a smaller one. "
        "Received: batch_size=1024"
    )


def test_at_least_passes_fails_and_stays_unclear_around_the_threshold():
    assert ghost.at_least("c", [0.98, 0.99], 0.95).outcome == verdict.PASS
    assert ghost.at_least("c", [0.80, 0.82], 0.95).outcome == verdict.FAIL
    assert ghost.at_least("c", [0.93, 0.97], 0.95).outcome == verdict.UNCLEAR
    assert ghost.at_least("c", [0.99], 0.95).outcome == verdict.UNCLEAR


LARGE = {
    "bn": "bn_b1024",
    "ghost": "ghost_b1024",
    "bn_short": "bn_b1024_short",
    "ghost_short": "ghost_b1024_short",
}


def _fit(r2_log, r2_sqrt=0.90, r2_linear=0.70):
    return {"r2_log": r2_log, "r2_sqrt": r2_sqrt, "r2_linear": r2_linear}


def _ghost_verdict(accuracy=None, fits=None):
    """The verdict on a table where every check passes, with changes."""
    table = {
        "bn_b64": [0.950, 0.952, 0.948],
        "bn_b1024_short": [0.850, 0.860, 0.855],
        "ghost_b1024_short": [0.870, 0.865, 0.875],
        "bn_b1024": [0.946, 0.948, 0.947],
        "ghost_b1024": [0.949, 0.951, 0.950],
    }
    table.update(accuracy or {})
    growth = {
        label: [_fit(0.99), _fit(0.985), _fit(0.995)]
        for label in ("bn_b64", "bn_b1024", "ghost_b1024")
    }
    growth.update(fits or {})
    checks = ghost.evaluate_ghost(table, growth, "bn_b64", LARGE)
    return verdict.verdict(checks), checks


def test_ghost_verdict_reproduced_when_every_check_passes():
    outcome, checks = _ghost_verdict()
    assert outcome == verdict.REPRODUCED, checks
    assert len(checks) == 10


def test_ghost_verdict_not_reproduced_when_the_distance_grows_like_sqrt_t():
    outcome, checks = _ghost_verdict(
        fits={"bn_b1024": [_fit(0.90, 0.999)] * 2 + [_fit(0.91, 0.998)]}
    )
    assert outcome == verdict.NOT_REPRODUCED
    failed = [c.criterion for c in checks if c.outcome == verdict.FAIL]
    assert failed == [
        "bn_b1024: ||w_t - w_0|| is linear in log t (R^2 of the log fit "
        ">= 0.95)",
        "bn_b1024: log t fits better than sqrt t and t (R^2, the better of "
        "the two)",
    ]


def test_ghost_verdict_not_reproduced_when_the_large_batch_lags():
    outcome, checks = _ghost_verdict({"ghost_b1024": [0.920, 0.922, 0.921]})
    assert outcome == verdict.NOT_REPRODUCED
    gap = checks[3]
    assert gap.criterion.startswith("with the sqrt rule, ghost BN")
    assert gap.outcome == verdict.FAIL


def test_ghost_verdict_inconclusive_inside_the_seed_spread():
    # Ghost's long runs spread too widely to tell whether they are within
    # a point of the small batch.
    outcome, checks = _ghost_verdict({"ghost_b1024": [0.935, 0.955, 0.960]})
    assert outcome == verdict.INCONCLUSIVE
    assert [c.outcome for c in checks].count(verdict.UNCLEAR) == 1


def _family(**changes):
    accuracy = {
        "bn_before": [0.975, 0.977, 0.976],
        "bn_dropout": [0.978, 0.979, 0.977],
        "bn_spatial_dropout": [0.981, 0.982, 0.980],
        "dropblock": [0.985, 0.986, 0.984],
        "stochastic_depth": [0.977, 0.978, 0.976],
    }
    accuracy.update(changes)
    checks = dropout_family.evaluate_family(accuracy)
    return verdict.verdict(checks), checks


def test_dropout_family_verdicts_from_fabricated_tables():
    outcome, checks = _family()
    assert outcome == verdict.REPRODUCED, checks

    # Spatial dropout clearly worse than elementwise dropout: a reversal.
    outcome, checks = _family(bn_spatial_dropout=[0.960, 0.961, 0.962])
    assert outcome == verdict.NOT_REPRODUCED
    failed = {c.criterion for c in checks if c.outcome == verdict.FAIL}
    assert failed == {
        "SpatialDropout at least as good as elementwise Dropout",
        "SpatialDropout no worse than none",
    }

    # DropBlock ahead of none, but inside the spread.
    outcome, checks = _family(dropblock=[0.970, 0.985, 0.990])
    assert outcome == verdict.INCONCLUSIVE
    assert checks[0].outcome == verdict.UNCLEAR


def test_a_study_needs_every_variant_its_verdict_compares(tmp_path, capsys):
    argv = ["run", "bn-placement", "--smoke", "--logdir", str(tmp_path)]
    # Refused before anything is trained.
    with pytest.raises(SystemExit) as info:
        cli.main(argv + ["--variants", "bn_after"])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: The study 'bn-placement' compares the variants bn_before, "
        "bn_after, and its verdict needs every one of them; bn_before "
        "would be left out. Run it without --variants. Received: "
        "variants=bn_after\n"
    )
    assert not (tmp_path / "bn-placement_smoke").exists()

    # A folder that lost an arm's runs gets a report error, not a
    # traceback; beside another experiment, that one is still reported.
    assert cli.main(argv) == 0
    assert (
        cli.main(
            ["run", "--smoke", "--variants", "none", "--logdir", str(tmp_path)]
        )
        == 0
    )
    shutil.rmtree(tmp_path / "bn-placement_smoke" / "bn_before")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(["report", str(tmp_path / "bn-placement_smoke")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: The study 'bn-placement' in " in err
    assert "lacks the finished runs of an arm its verdict compares" in err
    assert cli.main(["report", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "lacks the finished runs" in captured.err
    assert "basics_smoke" in captured.out
