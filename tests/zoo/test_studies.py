"""The paper studies run in smoke mode; `reproduce` writes the summary."""

import json

import keras
import pytest
from tensorboard.backend.event_processing import event_accumulator

from zoo import cli
from zoo import experiments
from zoo import report
from zoo import studies
from zoo import verdict
from zoo.studies import dropout_shift
from zoo.studies import recorder
from zoo.studies import renorm


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


def test_every_check_of_a_smoke_run_measured_every_arm(reproduced):
    # One seed decides nothing, but each quantity a check compares must
    # still have been measured: a tag renamed in a study or a probe that
    # returns NaN would leave an empty side ("—", n=0) or a NaN here, and
    # the verdict would stay "inconclusive" without it.
    logdir, _ = reproduced
    for name in studies.names():
        record = json.loads(
            (logdir / f"{name}_smoke" / studies.VERDICT_FILE).read_text()
        )
        for check in record["checks"]:
            text = check["measured"]
            assert "—" not in text and "nan" not in text.lower(), (
                f"{name}: {check['criterion']}: {text}"
            )
            assert "(n=1)" in text or "checkpoints:" in text, (
                f"{name}: {check['criterion']}: {text}"
            )


def test_each_study_plot_is_an_image_in_tensorboard(reproduced):
    logdir, _ = reproduced
    for name in studies.names():
        exp_dir = logdir / f"{name}_smoke"
        record = json.loads((exp_dir / studies.VERDICT_FILE).read_text())
        acc = event_accumulator.EventAccumulator(
            str(exp_dir / "report_images"),
            size_guidance={event_accumulator.TENSORS: 0},
        )
        acc.Reload()
        expected = {
            f"report/{plot.removesuffix('.png')}" for plot in record["plots"]
        }
        assert set(acc.Tags()["tensors"]) == expected, name
        # The PNG itself, as TensorBoard's image plugin stores it: width,
        # height and the encoded file.
        event = acc.Tensors(f"report/{record['plots'][0][:-4]}")[0]
        width, height, png = event.tensor_proto.string_val
        assert png.startswith(b"\x89PNG") and int(width) > 100 < int(height)
    assert not (logdir / f"{name}_smoke" / "report_images.partial").exists()


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
    assert "4 of 4 runs were already finished." in out
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


def test_renorm_smoke_trains_the_two_class_arm(reproduced):
    logdir, _ = reproduced
    exp_dir = logdir / "renorm-small-batch_smoke"
    for variant in ("bn_before", "renorm"):
        run_dir = exp_dir / f"{variant}_b32_two_classes" / "seed_0"
        config = json.loads((run_dir / "config.json").read_text())
        assert config["batch_sampling"] == "two_classes"
        assert config["batch_size"] == 32
        assert (run_dir / renorm.BATCH_STATS_FILE).is_file()
    text = (exp_dir / "report.md").read_text()
    assert "| 32, 2 classes | renorm |" in text
    assert (
        "| renorm beats BN on non-i.i.d. batches of 32 (2 classes each) |"
        in (text)
    )


def test_dropout_shift_smoke_trains_the_remedies(reproduced):
    logdir, _ = reproduced
    exp_dir = logdir / "dropout-variance-shift_smoke"

    def shift_record(arm):
        path = exp_dir / arm / "seed_0" / dropout_shift.SHIFT_FILE
        return json.loads(path.read_text())

    # The smoke MLP has two blocks: one BN (norm_2) follows a dropout.
    uout = shift_record("bn_uout_p0.5")
    assert uout["dropout_layer"] == "uout"
    assert [row["layer"] for row in uout["layers"]] == ["norm_2"]
    # With dropout after the last BN only, no BN sees it.
    assert shift_record("bn_dropout_last_p0.5")["layers"] == []
    text = (exp_dir / "report.md").read_text()
    assert "| dropout after the last BN | 0.5 | — | — |" in text
    assert "| Uout before BN | 0.5 |" in text
    assert "dropout's variance shift is at least 3 times Uout's" in text


@pytest.mark.parametrize(
    "name, batches, registered",
    [
        ("renorm-small-batch", "2, 64, 32", 64),
        ("precise-bn", "2, 128", 32),
    ],
)
def test_a_study_with_its_own_batch_sizes_refuses_batch_size(
    tmp_path, capsys, name, batches, registered
):
    argv = ["run", name, "--smoke", "--logdir", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        cli.main(argv + ["--batch-size", "16"])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"error: The study '{name}' trains at batch sizes of its own "
        f"({batches}) and takes no other. Run it without --batch-size "
        f"(expected: batch_size={registered}, the registered one). "
        "Received: batch_size=16\n"
    )
    # Refused before anything is trained.
    assert list(tmp_path.iterdir()) == []


def _seeds(mean, spread=0.01):
    return [mean - spread, mean, mean + spread]


def _renorm_table():
    return {
        (variant, batch): _seeds(0.9 if variant == "renorm" else 0.5)
        for variant in ("bn_before", "renorm")
        for batch in (2, 4)
    } | {
        ("bn_before", 64): _seeds(0.95, 0.002),
        ("renorm", 64): _seeds(0.95, 0.002),
    }


@pytest.mark.parametrize(
    "bn, renorm_acc, expected",
    [
        # SCIENCE.md's first trial: BN 0.75, renorm 0.83.
        (0.75, 0.83, verdict.REPRODUCED),
        # BN ahead on the two-class batches beyond the spread.
        (0.90, 0.83, verdict.NOT_REPRODUCED),
        # Renorm ahead inside the spread.
        (0.82, 0.83, verdict.INCONCLUSIVE),
    ],
)
def test_renorm_non_iid_verdicts(bn, renorm_acc, expected):
    non_iid = {"bn_before": _seeds(bn), "renorm": _seeds(renorm_acc)}
    checks = renorm.evaluate_renorm(_renorm_table(), [2, 4, 64], non_iid)
    assert checks[-1].criterion == (
        "renorm beats BN on non-i.i.d. batches of 32 (2 classes each)"
    )
    assert [c.outcome for c in checks[:-1]] == [verdict.PASS] * 3
    assert verdict.verdict(checks) == expected


@pytest.mark.parametrize(
    "last, uout_acc, uout_shift, expected",
    [
        # Both remedies ahead, Uout's shift a tenth of dropout's.
        (0.95, 0.95, 0.05, verdict.REPRODUCED),
        # Uout's shift as large as dropout's.
        (0.95, 0.95, 0.5, verdict.NOT_REPRODUCED),
        # Dropout after the last BN ahead only inside the spread.
        (0.905, 0.95, 0.05, verdict.INCONCLUSIVE),
    ],
)
def test_dropout_remedy_verdicts(last, uout_acc, uout_shift, expected):
    accuracy = {
        "dropout": _seeds(0.9),
        "last": _seeds(last),
        "uout": _seeds(uout_acc),
    }
    shift = {"dropout": _seeds(0.5, 0.02), "uout": _seeds(uout_shift, 0.005)}
    checks = dropout_shift.evaluate_remedies(accuracy, shift, 0.5)
    assert [c.criterion for c in checks] == [
        "dropout after the last BN beats dropout before BN at p 0.5 (val "
        "accuracy)",
        "Uout before BN beats dropout before BN at p 0.5 (val accuracy)",
        "dropout's variance shift is at least 3 times Uout's at p 0.5",
    ]
    assert verdict.verdict(checks) == expected


def _shift_runs(smoke, labels):
    # Configs as the grid writes them; no run folder, so every measure is
    # at chance (accuracy) or missing (shift).
    experiment = experiments.get("dropout-variance-shift")
    experiment = experiment.shrink() if smoke else experiment
    runs = []
    for run_experiment, arm, seed in dropout_shift.grid(experiment):
        if arm.label in labels:
            config = run_experiment.run_config(
                arm.variant, seed, arm.learning_rate, arm.label
            )
            result = {
                "variant": arm.variant,
                "arm": arm.label,
                "seed": seed,
                "status": "completed",
            }
            runs.append(report.Run(config, result, []))
    return runs


@pytest.mark.parametrize(
    "smoke, kept, missing",
    [
        # A lower rate lost: its check would vanish from the verdict.
        (
            False,
            ("bn_dropout_p0.1", "bn_dropout_p0.5", "bn_dropout_last_p0.5"),
            "bn_dropout_p0.3, bn_uout_p0.5",
        ),
        # The largest rate lost: the remedies had nothing to beat.
        (
            True,
            ("bn_dropout_last_p0.5", "bn_uout_p0.5", "bn_before"),
            "bn_dropout_p0.5",
        ),
    ],
)
def test_dropout_shift_evaluation_names_a_missing_arm(
    tmp_path, smoke, kept, missing
):
    runs = _shift_runs(smoke, kept)
    with pytest.raises(KeyError) as info:
        dropout_shift._evaluate(tmp_path, runs)
    assert info.value.args == (missing,)


def test_uout_noise_variance_enters_the_predicted_shift():
    assert dropout_shift.noise_variance("dropout", 0.5) == pytest.approx(1.0)
    assert dropout_shift.noise_variance("uout", 0.5) == pytest.approx(1 / 12)
