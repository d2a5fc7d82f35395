"""The training path: run folders, resume, divergence, TensorBoard tags."""

import json

import numpy as np
import pytest
from rich.console import Console

from zoo import models
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


def test_dropout_options_swap_in_uout_or_keep_only_the_last_dropout():
    model = models.build(
        "mlp", (8,), 3, "bn_dropout", hidden_units=(4, 4, 4), dropout_rate=0.3
    )

    def kinds(m):
        return {
            layer.name: type(layer).__name__
            for layer in m.layers
            if "dropout" in layer.name
        }

    assert train.with_dropout_options(model) is model
    uout = train.with_dropout_options(model, layer="uout")
    assert kinds(uout) == {f"dropout_{i}": "Uout" for i in (1, 2, 3)}
    assert uout.get_layer("dropout_2").rate == pytest.approx(0.3)
    last = train.with_dropout_options(model, blocks="last")
    assert kinds(last) == {"dropout_3": "Dropout"}
    # The other layers keep their weights, in a graph of their own.
    x = np.random.default_rng(0).random((5, 8), np.float32)
    for clone in (uout, last):
        np.testing.assert_array_equal(
            clone(x, training=False), model(x, training=False)
        )
        assert clone.get_layer("dense_2") is not model.get_layer("dense_2")
        # The probes read layer inputs, which must lie in the clone's own
        # graph (reused layers would point back at the original's).
        probe = models.preactivation_model(clone)(x)
        for name, values in models.preactivation_model(model)(x).items():
            np.testing.assert_array_equal(probe[name], values)

    plain = models.build("mlp", (8,), 3, "bn_before", hidden_units=(4,))
    with pytest.raises(ValueError) as info:
        train.with_dropout_options(plain, blocks="last")
    assert str(info.value) == (
        "dropout_layer='dropout' and dropout_blocks='last' change the "
        "Dropout layers of a model, and 'mlp_bn_before' has none. Use a "
        "variant with elementwise dropout, such as bn_dropout."
    )
