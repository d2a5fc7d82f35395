"""The training path: run folders, resume, divergence, TensorBoard tags."""

import json

import pytest
from rich.console import Console

from zoo import report
from zoo import train


def _quiet():
    return Console(quiet=True)


class Interrupt(KeyboardInterrupt):
    pass


def test_an_interrupted_grid_resumes_without_losing_or_duplicating(
    tmp_path, tiny
):
    experiment = tiny.replace(seeds=2)

    def stop_after_first(result):
        raise Interrupt

    with pytest.raises(Interrupt):
        train.run_grid(
            experiment, tmp_path, console=_quiet(), after_run=stop_after_first
        )
    exp_dir = tmp_path / experiment.folder
    first = exp_dir / "none" / "seed_0"
    assert train.is_finished(first)
    assert not (exp_dir / "bn_before" / "seed_0").exists()
    first_result = (first / "result.json").read_text()
    first_events = sorted(p.name for p in first.glob("events.out.*"))

    # A run killed mid-way leaves only a partial folder behind.
    partial = exp_dir / "bn_before" / "seed_0.partial"
    partial.mkdir(parents=True)
    (partial / "metrics.jsonl").write_text('{"step": 1}\n')

    _, trained, skipped = train.run_grid(experiment, tmp_path, console=_quiet())
    assert (trained, skipped) == (3, 1)
    assert (first / "result.json").read_text() == first_result
    assert sorted(p.name for p in first.glob("events.out.*")) == first_events
    assert not partial.exists()
    folders = sorted(
        str(p.relative_to(exp_dir)) for p in exp_dir.glob("*/seed_*")
    )
    assert folders == [
        "bn_before/seed_0",
        "bn_before/seed_1",
        "none/seed_0",
        "none/seed_1",
    ]

    # Once complete, the same command trains nothing.
    _, trained, skipped = train.run_grid(experiment, tmp_path, console=_quiet())
    assert (trained, skipped) == (0, 4)


def test_a_finished_run_with_another_config_is_not_mixed_in(tmp_path, tiny):
    experiment = tiny.replace(variants=("none",))
    train.run_grid(experiment, tmp_path, console=_quiet())
    with pytest.raises(ValueError) as info:
        train.run_grid(experiment.replace(steps=9), tmp_path, console=_quiet())
    run_dir = tmp_path / experiment.folder / "none" / "seed_0"
    assert str(info.value) == (
        f"{run_dir} holds a finished run with a different configuration "
        "(steps=6 there, 9 now). Pick another --logdir, or delete that "
        "folder to rerun it."
    )


def test_a_diverging_run_is_recorded_and_the_grid_goes_on(tmp_path, tiny):
    # A learning rate this large sends the unnormalized net's loss to
    # inf or NaN within a few steps (at 1e6 one seed's ReLUs all die
    # instead, and its loss stays finite).
    experiment = tiny.replace(
        variants=("none",), seeds=2, learning_rate=1e12, steps=30
    )
    train.run_grid(experiment, tmp_path, console=_quiet())
    exp_dir = tmp_path / experiment.folder
    results = [
        json.loads((exp_dir / "none" / f"seed_{s}" / "result.json").read_text())
        for s in (0, 1)
    ]

    def strict(constant):
        raise AssertionError(f"{constant} is not JSON")

    for s in (0, 1):
        # Strict parsers (JavaScript's JSON.parse, jq --strict) reject NaN.
        text = (exp_dir / "none" / f"seed_{s}" / "result.json").read_text()
        json.loads(text, parse_constant=strict)
    for result in results:
        assert result["status"] == "diverged"
        assert 1 <= result["diverged_at"] < 30
        assert result["steps_run"] == result["diverged_at"]

    rows, _ = report.write_report(exp_dir)
    steps = ", ".join(str(s) for s in sorted(r["diverged_at"] for r in results))
    assert rows[0].diverged_text == f"2/2 (at step {steps})"
    assert rows[0].accuracy_text == "—"
    assert (
        f"| none | — | never (0/2) | 2/2 (at step {steps}) |"
        in (exp_dir / "report.md").read_text()
    )


def test_a_finished_run_of_another_batch_sampling_is_refused(tmp_path, tiny):
    experiment = tiny.replace(variants=("none",), batch_size=32)
    train.run_grid(experiment, tmp_path, console=_quiet())
    two_classes = experiment.replace(batch_sampling="two_classes")
    with pytest.raises(ValueError) as info:
        train.run_grid(two_classes, tmp_path, console=_quiet())
    assert "(batch_sampling='iid' there, 'two_classes' now)" in str(info.value)
    with pytest.raises(ValueError) as info:
        experiment.replace(batch_sampling="pairs")
    assert str(info.value) == (
        "Unknown batch_sampling 'pairs'. Valid: iid, two_classes."
    )


def _fake_run(arm, hidden, activation, lr):
    config = {
        "hidden_units": hidden,
        "activation": activation,
        "learning_rate": lr,
        "batch_size": 128,
        "steps": 600,
    }
    return report.Run(config, {"arm": arm, "variant": arm}, [])


def test_describe_runs_names_each_network_with_its_own_rates():
    mlp = [_fake_run(v, [256] * 6, "relu", 0.1) for v in ("none", "bn")]
    deep = [
        _fake_run(f"dln_{v}_lr{lr:g}", [64] * 24, "linear", lr)
        for lr in (0.001, 0.01)
        for v in ("none", "bn")
    ]
    assert report.describe_runs(mlp) == (
        "an MLP with 6 hidden layers of 256 units (relu), SGD at learning "
        "rate 0.1, batch 128, 600 steps."
    )
    assert report.describe_runs(mlp + deep) == (
        "(none, bn) an MLP with 6 hidden layers of 256 units (relu), SGD at "
        "learning rate 0.1, batch 128, 600 steps; (dln_none_lr0.001, "
        "dln_bn_lr0.001, dln_none_lr0.01, dln_bn_lr0.01) an MLP with 24 "
        "hidden layers of 64 units (linear), SGD at learning rates 0.001, "
        "0.01, batch 128, 600 steps."
    )


def test_report_skips_partial_run_folders_and_refuses_mixed_ones(
    tmp_path, tiny
):
    import shutil

    experiment = tiny.replace(variants=("none",))
    exp_dir, _, _ = train.run_grid(experiment, tmp_path, console=_quiet())
    assert len(report.load_runs(exp_dir)) == 1
    # A run cut off while its folder was renamed: result.json is written
    # inside the .partial folder first. It is not a finished run.
    shutil.copytree(
        exp_dir / "none" / "seed_0", exp_dir / "none" / "seed_1.partial"
    )
    runs = report.load_runs(exp_dir)
    assert [run.result["seed"] for run in runs] == [0]

    # Runs of another experiment copied in: one report cannot line them up.
    other = tmp_path / "other"
    other_dir, _, _ = train.run_grid(
        experiment.replace(name="other"), other, console=_quiet()
    )
    shutil.copytree(other_dir / "none", exp_dir / "other_arm")
    with pytest.raises(ValueError) as info:
        report.load_runs(exp_dir)
    assert str(info.value) == (
        f"{exp_dir} holds runs of several experiments (basics (smoke), "
        "other (smoke)), and a report covers one: move each experiment's "
        "runs into a folder of its own."
    )
