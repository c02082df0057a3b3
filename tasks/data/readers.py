"""Dataset file formats: IDX (MNIST), the classic ``mnist.pkl.gz``, CIFAR-10 python batches, and the
restricted unpickler those pickles are read with. Each reader checks what it reads and names the file."""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# x_train (n, C, H, W) uint8, y_train (n,) int64, x_test, y_test
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class DatasetFileError(ValueError):
    """A dataset file exists but cannot be read (corrupt, truncated, wrong format)."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        super().__init__(f"dataset file {self.path} is unreadable: {problem}. "
                         f"Delete or replace it (e.g. re-download or reinstall its package).")


# inflated in pieces of this size, so a file never costs more memory than what it may hold
_CHUNK = 1 << 24
# a dataset pickle (CIFAR-10's batches: 31 MB each; mnist.pkl.gz: 220 MB) never inflates beyond this
PICKLE_MAX_BYTES = 1 << 30


def _gzipped(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(2) == b"\x1f\x8b"


@contextmanager
def _opened(path: Path):
    """The file's content as a stream, gunzipped when it starts with the gzip magic (whatever its name);
    any read error becomes a ``DatasetFileError`` naming the file."""
    try:
        with (gzip.open(path, "rb") if _gzipped(path) else open(path, "rb")) as stream:
            yield stream
    except DatasetFileError:
        raise
    except (OSError, EOFError, zlib.error) as error:
        what = "broken gzip stream" if isinstance(error, (gzip.BadGzipFile, EOFError, zlib.error)) else "read error"
        raise DatasetFileError(path, f"{what} ({error})") from error


def _read_at_most(stream, limit: int) -> bytes:
    """Up to ``limit + 1`` bytes of ``stream``, read in pieces: one byte more than ``limit`` says there is more."""
    chunks, total = [], 0
    while total <= limit:
        chunk = stream.read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _read_bytes(path: Path, limit: int) -> bytes:
    """The (gunzipped) content of a file that may hold at most ``limit`` bytes, inflating no more than that."""
    with _opened(path) as stream:
        data = _read_at_most(stream, limit)
    if len(data) > limit:
        raise DatasetFileError(path, f"it holds more than {limit} bytes (inflated), more than any such file")
    return data


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path | str) -> np.ndarray:
    """Read one IDX file (the MNIST format: 2 zero bytes, dtype code, ndim, big-endian int32 dims, data).

    Gzipped and plain files are both accepted. The header is read first and the data inflated only up to
    the size it declares (a small file that inflates to gigabytes stops there). Raises
    ``DatasetFileError`` naming the file if the header is invalid or the data is shorter or longer than
    the header says.
    """
    path = Path(path)
    with _opened(path) as stream:
        start = _read_at_most(stream, 3)
        if len(start) < 4 or start[:2] != b"\x00\x00" or start[2] not in _IDX_DTYPES:
            raise DatasetFileError(path, f"not an IDX file (header bytes {start[:4]!r})")
        ndim = start[3]
        dims = _read_at_most(stream, 4 * ndim - 1) if ndim else b""
        if len(dims) < 4 * ndim:
            raise DatasetFileError(path, f"truncated IDX header ({4 + len(dims)} bytes, need {4 + 4 * ndim})")
        shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4", count=ndim))
        dtype = np.dtype(_IDX_DTYPES[start[2]])
        expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
        data = _read_at_most(stream, expected)
    if len(data) != expected:
        held = f"more than {expected}" if len(data) > expected else f"{len(data)}"
        raise DatasetFileError(path, f"header says shape {shape} ({expected} data bytes) but the file holds "
                                     f"{held} (truncated or not an IDX file)")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _checked_labels(path: Path, labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFileError(path, f"labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFileError(path, f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


IDX_FILES = {
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
    """MNIST-style train/test arrays from the four IDX files named by ``IDX_FILES``'s keys."""
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
    data = _read_bytes(path, PICKLE_MAX_BYTES)
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


CIFAR10_FILES = {**{f"data_batch_{i}": f"data_batch_{i}" for i in range(1, 6)}, "test_batch": "test_batch"}


def _read_cifar_batch(path: Path, label_key: bytes = b"labels", num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch (CIFAR-10: ``b'labels'``; CIFAR-100: ``b'fine_labels'``) as (n, 3, 32, 32) uint8."""
    batch = _unpickle(path, "bytes")
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DatasetFileError(path, f"expected a dict with b'data' and {label_key!r} (CIFAR python format)")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetFileError(path, f"b'data' must be uint8 of shape (n, 3072), got {data.dtype} {data.shape}")
    labels = _checked_labels(path, np.asarray(batch[label_key]), num_classes)
    if len(labels) != len(data):
        raise DatasetFileError(path, f"{len(data)} images but {len(labels)} labels")
    # each 3072-row is the 1024 red, then green, then blue values of a 32x32 image, row-major
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(files: dict[str, Path]) -> Arrays:
    """CIFAR-10 arrays from the official python batches (``data_batch_1..5`` and ``test_batch``)."""
    train = [_read_cifar_batch(files[f"data_batch_{i}"]) for i in range(1, 6)]
    x_test, y_test = _read_cifar_batch(files["test_batch"])
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), x_test, y_test
