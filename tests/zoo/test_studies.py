"""The paper studies run in smoke mode; `reproduce` writes the summary."""

import json

import keras
import pytest
from tensorboard.backend.event_processing import event_accumulator

from zoo import cli
from zoo import experiments
from zoo import studies
from zoo.studies import recorder


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("runs")
    code = cli.main(["reproduce", "--smoke", "--logdir", str(logdir)])
    return logdir, code


def test_every_study_is_a_registered_experiment():
    assert set(studies.names()) <= set(experiments.names())
    for name in studies.names():
        study = studies.STUDIES[name]
        assert "https://arxiv.org/abs/" in study.paper


def test_reproduce_smoke_writes_the_summary_page(reproduced):
    logdir, code = reproduced
    assert code == 0
    page = (logdir / "reproduction_smoke.md").read_text()
    assert page.startswith("# Reproducing the papers' claims (smoke)")
    for name in studies.names():
        record = json.loads(
            (logdir / f"{name}_smoke" / studies.VERDICT_FILE).read_text()
        )
        # One seed has no spread: a smoke run never decides a claim.
        assert record["verdict"] == "inconclusive"
        assert f"| [{name}]({name}_smoke/report.md) |" in page
        assert f"## {name}: inconclusive" in page
        for plot in record["plots"]:
            assert (logdir / f"{name}_smoke" / plot).stat().st_size > 0
            assert f"({name}_smoke/{plot})" in page


def test_each_study_report_states_claim_paper_and_verdict(reproduced):
    logdir, _ = reproduced
    for name in studies.names():
        study = studies.STUDIES[name]
        text = (logdir / f"{name}_smoke" / "report.md").read_text()
        assert text.startswith(f"# {name} (smoke)\n")
        assert f"**Claim** ({study.paper}): {study.claim}" in text
        assert f"**Paper, full scale**: {study.paper_result}" in text
        assert "**Verdict: inconclusive**" in text
        assert "| criterion | measured | outcome |" in text
        assert "## Accuracy" in text


def _scalar_tags(folder):
    acc = event_accumulator.EventAccumulator(
        str(folder), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return set(acc.Tags()["tensors"])


def test_landscape_runs_record_diagnostics_in_files_and_tensorboard(
    reproduced,
):
    logdir, _ = reproduced
    run_dir = logdir / "santurkar-landscape_smoke" / "bn_before" / "seed_0"
    lines = recorder.load(run_dir)
    # Smoke runs probe at every logging step (3) of their 12 steps.
    assert [line["step"] for line in lines] == [3, 6, 9, 12]
    assert lines[0]["ics/dense_1/l2"] == 0.0
    assert lines[0]["ics/dense_2/relative"] > 0
    assert lines[0]["landscape/loss_max"] >= lines[0]["landscape/loss_min"]
    tags = _scalar_tags(run_dir)
    assert "diagnostics/landscape/beta_smoothness" in tags
    assert "diagnostics/ics/dense_2/cosine" in tags
    drift = recorder.load(
        logdir / "santurkar-lr_smoke" / "noisy_bn_lr0.5" / "seed_0"
    )
    assert [line["step"] for line in drift] == [6, 12]
    assert "layers/dense_2/input_mean_drift" in drift[1]


def test_rerunning_a_finished_study_trains_nothing(reproduced, capsys):
    logdir, _ = reproduced
    argv = ["run", "santurkar-landscape", "--smoke", "--logdir", str(logdir)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 of 2 runs were already finished." in out
    assert "Verdict: inconclusive" in out


def test_recorder_drops_lines_after_the_resumed_step(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(20)
    path = tmp_path / recorder.DIAGNOSTICS_FILE
    path.write_text(
        "".join(json.dumps({"step": s, "x": 1.0}) + "\n" for s in (10, 20, 30))
    )
    callback = recorder.DiagnosticsRecorder(tmp_path, [])
    callback.set_model(model)
    callback.on_train_begin()
    assert [line["step"] for line in recorder.load(tmp_path)] == [10, 20]
