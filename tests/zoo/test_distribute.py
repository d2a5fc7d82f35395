"""tf.distribute through the zoo's training path.

MirroredStrategy runs on the two logical CPU devices that
`tests/conftest.py` configures; the multi-worker run uses two local
processes talking over 127.0.0.1 only.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfnorm
from zoo import experiments
from zoo import train

REPO = Path(__file__).resolve().parents[2]


class MovingStatistics(keras.callbacks.Callback):
    """Keeps every tfnorm BN layer's moving statistics at the end."""

    def on_train_end(self, logs=None):
        self.stats = {
            f"{layer.name}/{name}": keras.ops.convert_to_numpy(
                getattr(layer, name)
            )
            for layer in self.model.layers
            if isinstance(layer, tfnorm.BatchNormalization)
            for name in ("moving_mean", "moving_variance")
        }


def _resnet8(**changes):
    """A ResNet-8 on 32x32x3 digits with augmentation, 1 step of 32."""
    return (
        experiments.get("resnet20-cifar10")
        .shrink()
        .replace(steps=1, eval_every=1, log_every=1, **changes)
    )


def test_mirrored_synchronized_bn_equals_one_device_on_the_global_batch(
    tmp_path,
):
    stats = {}
    for strategy in ("default", "mirrored"):
        experiment = _resnet8(strategy=strategy, synchronized=True)
        probe = MovingStatistics()
        result = train.train_run(
            experiment,
            "bn_before",
            0,
            tmp_path / strategy,
            callbacks=[probe],
        )
        assert result["status"] == "completed"
        stats[strategy] = probe.stats
    assert train.get_strategy("mirrored").num_replicas_in_sync == 2
    # The stem and two per block, three blocks: 7 layers, 2 statistics.
    assert len(stats["default"]) == 2 * 7
    # Equal up to float32 summation order: a channel mean near zero is a
    # sum of 16k values of size about 1 that cancel, so the tolerance has
    # an absolute part. One step only: over several steps the two runs'
    # weights drift apart by about 0.2% per step (gradients of tfnorm's
    # synchronized BN inside deeper conv nets; reported, not a zoo bug).
    for name, single in stats["default"].items():
        np.testing.assert_allclose(
            stats["mirrored"][name], single, rtol=1e-5, atol=1e-6, err_msg=name
        )


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_local_workers_finish_and_agree(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    command = [
        sys.executable,
        "-m",
        "zoo",
        "run",
        "resnet20-cifar10",
        "--smoke",
        "--variants",
        "bn_before",
        "--steps",
        "4",
        "--strategy",
        "multiworker",
        "--logdir",
        str(tmp_path),
    ]
    processes = []
    for index in range(2):
        tf_config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps(tf_config),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            # Loopback only, whatever proxy the machine may define.
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
        }
        processes.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=150)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]

    chief = tmp_path / "resnet20-cifar10_smoke"
    other = tmp_path / "resnet20-cifar10_smoke.worker1"
    results = [
        json.loads((folder / "bn_before/seed_0/result.json").read_text())
        for folder in (chief, other)
    ]
    assert results[0]["status"] == results[1]["status"] == "completed"
    for key in ("final_val_accuracy", "final_val_loss", "weights_checksum"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-6)
    # Only the chief writes the report.
    assert (chief / "report.md").is_file()
    assert not (other / "report.md").exists()


def _tiny_fit(strategy):
    keras.utils.set_random_seed(3)
    x = np.random.default_rng(3).normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8),
                tfnorm.BatchNormalization(),
                keras.layers.Dense(2),
            ]
        )
        model.compile(
            "sgd",
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    return history.history, model.get_weights()


def test_multiworker_workaround_leaves_other_strategies_alone():
    # zoo.multiworker patches Keras's trainer for the whole process; every
    # other strategy must train exactly as with Keras untouched.
    from keras.src.backend.tensorflow import trainer as tf_trainer

    from zoo import multiworker

    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )
    before = _tiny_fit(strategy)
    original = tf_trainer.reduce_per_replica
    try:
        multiworker.apply()
        multiworker.apply()
        assert tf_trainer.reduce_per_replica is multiworker._reduce_per_replica
        after = _tiny_fit(strategy)
    finally:
        # Other tests in this process see Keras as installed.
        tf_trainer.reduce_per_replica = original
        tf_trainer.TensorFlowTrainer._maybe_symbolic_build = (
            multiworker._original_symbolic_build
        )
        multiworker._applied = False
    assert before[0] == after[0]
    for a, b in zip(before[1], after[1], strict=True):
        np.testing.assert_array_equal(a, b)
