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
    # an absolute part. One step only: on these digits the early layers'
    # gradients are small sums of large cancelling terms, whose float32
    # rounding differs between one device and two by about 1% of the
    # update, and training amplifies that over steps. The next test shows
    # that this is rounding, not a missing term, against float64.
    for name, single in stats["default"].items():
        np.testing.assert_allclose(
            stats["mirrored"][name], single, rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_mirrored_synchronized_gradients_are_as_exact_as_one_device():
    # On the zoo's ResNet-8 and a batch of the padded digits (70% of
    # each image is background, so BN's gradient cancels heavily), both
    # float32 gradients are compared with float64 on one device. A lost
    # cross-replica term (each replica normalizing alone) is off by
    # 20-50%; measured: one device 0.9-2.5% (its summation order is the
    # worse one here), two replicas at most 0.25%.
    from zoo import data
    from zoo import models

    split = data.load("digits32")
    x = np.asarray(split.x_train[:32], "float32")
    x = (x - x.mean()) / x.std()
    t = np.asarray(split.y_train[:32])
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"
    )

    def make(dtype="float32"):
        # The builder casts the logits to float32 (for mixed precision),
        # which bounds the oracle at about 1e-6: far below what matters.
        policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy(dtype)
        try:
            keras.utils.set_random_seed(0)
            return models.build(
                "resnet8", (32, 32, 3), 10, "bn_before", synchronized=True
            )
        finally:
            keras.config.set_dtype_policy(policy)

    def gradients(model, inputs, labels):
        with tf.GradientTape() as tape:
            value = loss(labels, model(inputs, training=True)) / len(x)
        return tape.gradient(value, model.trainable_variables)

    single = make()
    weights = single.get_weights()
    exact = make("float64")
    exact.set_weights([w.astype("float64") for w in weights])
    want = gradients(exact, x.astype("float64"), t)
    one = gradients(single, x, t)

    strategy = train.get_strategy("mirrored")
    with strategy.scope():
        mirrored = make()
    mirrored.set_weights(weights)

    def step(xi, ti):
        return gradients(mirrored, xi, ti)

    ds = tf.data.Dataset.from_tensor_slices((x, t)).batch(len(x))
    xs, ts = next(iter(strategy.experimental_distribute_dataset(ds)))
    two = tf.function(lambda a, b: strategy.run(step, args=(a, b)))(xs, ts)
    for variable, w, g1, g2 in zip(
        single.trainable_variables, want, one, two, strict=True
    ):
        w = w.numpy()
        scale = np.abs(w).max()
        total = sum(
            v.numpy().astype("float64")
            for v in strategy.experimental_local_results(g2)
        )
        error_one = np.abs(g1.numpy() - w).max() / scale
        error_two = np.abs(total - w).max() / scale
        assert error_two <= max(2 * error_one, 1e-4), (
            f"{variable.path}: two replicas {error_two:.1e} from float64, "
            f"one device {error_one:.1e}"
        )
        assert error_two < 1e-2, f"{variable.path}: {error_two:.1e}"


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
