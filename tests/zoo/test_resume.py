"""A killed run, started again with the same command, ends as if never
killed; mixed precision and XLA runs through the same path."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from zoo import cli
from zoo import experiments
from zoo import train

REPO = Path(__file__).resolve().parents[2]

# Stochastic depth, momentum, augmentation: the run's state includes
# random-generator states, optimizer slots and a data position.
ARGS = [
    "run",
    "resnet110-stochastic-depth",
    "--smoke",
    "--variants",
    "stochastic_depth",
]

# Runs the CLI in a fresh process and SIGKILLs it right after step 9 (the
# smoke run checkpoints at step 6 and ends at step 12).
_KILLED = """
import os, signal, sys
from zoo import cli, train
original = train.RunLogger.on_train_batch_end
def on_train_batch_end(self, batch, logs=None):
    original(self, batch, logs)
    if self.step == 9:
        os.kill(os.getpid(), signal.SIGKILL)
train.RunLogger.on_train_batch_end = on_train_batch_end
sys.exit(cli.main(sys.argv[1:]))
"""


def _run_in_subprocess(script, argv):
    return subprocess.run(
        [sys.executable, "-c", script, *argv],
        cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=240,
    )


def _lines(run_dir):
    lines = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("time/step_ms", None)
        lines.append(record)
    return lines


def test_a_killed_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    killed = _run_in_subprocess(
        _KILLED, ARGS + ["--logdir", str(tmp_path / "resumed")]
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    exp = "resnet110-stochastic-depth_smoke/stochastic_depth"
    partial = tmp_path / "resumed" / exp / "seed_0.partial"
    assert (partial / "checkpoint.npz").is_file()
    assert not (tmp_path / "resumed" / exp / "seed_0").exists()

    # The same command again, then an uninterrupted run, both in this
    # process: they must agree to the last bit.
    assert cli.main(ARGS + ["--logdir", str(tmp_path / "resumed")]) == 0
    assert cli.main(ARGS + ["--logdir", str(tmp_path / "straight")]) == 0
    resumed = tmp_path / "resumed" / exp / "seed_0"
    straight = tmp_path / "straight" / exp / "seed_0"
    results = [
        json.loads((d / "result.json").read_text()) for d in (resumed, straight)
    ]
    assert results[0]["resumed"] and not results[1]["resumed"]
    for key in (
        "status",
        "steps_run",
        "final_val_accuracy",
        "final_val_loss",
        "weights_checksum",
    ):
        assert results[0][key] == results[1][key], key
    assert _lines(resumed) == _lines(straight)
    assert not (resumed / "checkpoint.npz").exists()


class _Compiled(keras.callbacks.Callback):
    """Records how the model trains: XLA or not, each layer's dtypes."""

    def on_train_begin(self, logs=None):
        self.jit = self.model.jit_compile
        self.policies = {
            type(layer).__name__: (layer.compute_dtype, layer.variable_dtype)
            for layer in self.model.layers
            if layer.weights
        }

    def on_train_batch_end(self, batch, logs=None):
        self.loss = logs["loss"]


@pytest.mark.parametrize(
    "options",
    [
        ["--precision", "mixed_float16"],
        ["--precision", "mixed_bfloat16"],
        ["--jit"],
    ],
    ids=["mixed_float16", "mixed_bfloat16", "jit"],
)
def test_mixed_precision_and_xla_smoke_runs(tmp_path, options):
    argv = [
        "run",
        "resnet20-cifar10",
        "--smoke",
        "--variants",
        "bn_before",
        "--steps",
        "4",
        "--logdir",
        str(tmp_path),
    ]
    # The CLI writes the options into the run's config ...
    assert cli.main(argv + options) == 0
    run_dir = tmp_path / "resnet20-cifar10_smoke" / "bn_before" / "seed_0"
    config = json.loads((run_dir / "config.json").read_text())
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed"
    assert math.isfinite(result["final_val_loss"])
    precision = options[1] if options[0] == "--precision" else "float32"
    assert config["precision"] == precision
    assert config["jit"] is ("--jit" in options)

    # ... and that config trains as it says: under XLA, or with the
    # layers computing in the low precision on float32 variables (the
    # logits in float32, for a stable loss).
    probe = _Compiled()
    experiment = experiments.get("resnet20-cifar10").shrink()
    experiment = experiment.replace(
        steps=4, precision=precision, jit="--jit" in options
    )
    train.train_run(
        experiment, "bn_before", 0, tmp_path / "again", callbacks=[probe]
    )
    assert probe.jit is ("--jit" in options)
    low = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(
        precision, "float32"
    )
    assert probe.policies["Conv2D"] == (low, "float32")
    assert probe.policies["BatchNormalization"] == (low, "float32")
    assert probe.policies["Dense"] == ("float32", "float32")
    assert math.isfinite(probe.loss)
    # The global policy is restored for whatever runs next.
    assert keras.mixed_precision.global_policy().name == "float32"
