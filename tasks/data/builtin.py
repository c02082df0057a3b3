"""The registered datasets: scikit-learn's digits (built in), the file-backed image datasets, and your own
images as an ``.npz`` of arrays (``arrays``) or a folder tree (``image_folder``)."""

from __future__ import annotations

from numbers import Integral
from pathlib import Path
import numpy as np

from poisonsweep.tasks.data.base import DATASETS, Dataset, as_dataset
from poisonsweep.tasks.data.fingerprint import FINGERPRINTS, user_path_fingerprint
from poisonsweep.tasks.data.formats import GTSRB_CLASSES, read_arrays, read_image_folder
from poisonsweep.tasks.data.sources import DataNotFoundError, load_arrays
from poisonsweep.tasks.registry import NONE, STR, Interval, Options


@DATASETS.register("digits", num_classes=10)
def digits(*, root: str | None, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """scikit-learn's built-in 8x8 digits (1,797 images), split 75/25 with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        x, bunch.target, test_size=0.25, stratify=bunch.target, random_state=0
    )
    return as_dataset("digits", x_train, y_train, x_test, y_test, 10, n_train, n_test, seed)


@DATASETS.register("mnist", num_classes=10)
def mnist(*, root: str | None, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """MNIST handwritten digits: 60,000 train / 10,000 test, 1x28x28 grey, 10 classes."""
    return as_dataset("mnist", *load_arrays("mnist", root), 10, n_train, n_test, seed)


@DATASETS.register("fashion_mnist", num_classes=10)
def fashion_mnist(*, root: str | None, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """Fashion-MNIST clothing images: 60,000 train / 10,000 test, 1x28x28 grey, 10 classes."""
    return as_dataset("fashion_mnist", *load_arrays("fashion_mnist", root), 10, n_train, n_test, seed)


@DATASETS.register("cifar10", num_classes=10)
def cifar10(*, root: str | None, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """CIFAR-10 natural images: 50,000 train / 10,000 test, 3x32x32 RGB, 10 classes."""
    return as_dataset("cifar10", *load_arrays("cifar10", root), 10, n_train, n_test, seed)


@DATASETS.register("cifar100", num_classes=100)
def cifar100(*, root: str | None, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """CIFAR-100 natural images: 50,000 train / 10,000 test, 3x32x32 RGB, 100 (fine) classes."""
    return as_dataset("cifar100", *load_arrays("cifar100", root), 100, n_train, n_test, seed)


@DATASETS.register("svhn", num_classes=10)
def svhn(*, root: str | None, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """SVHN house-number digits: 73,257 train / 26,032 test (no 'extra'), 3x32x32 RGB, 10 classes."""
    return as_dataset("svhn", *load_arrays("svhn", root), 10, n_train, n_test, seed)


@DATASETS.register("gtsrb", {"size": [Interval(Integral, 8, 512)]}, num_classes=GTSRB_CLASSES)
def gtsrb(*, root: str | None, n_train: int | None, n_test: int | None, seed: int, size: int = 32) -> Dataset:
    """German traffic signs: 39,209 train / 12,630 test, 3 x size x size RGB (resized), 43 classes."""
    return as_dataset("gtsrb", *load_arrays("gtsrb", root, size), GTSRB_CLASSES, n_train, n_test, seed)


def _user_path(dataset: str, path: str, kind: str) -> Path:
    """``data.params.path`` as a path (relative: to the working directory), or ``DataNotFoundError``."""
    resolved = Path(path).expanduser()
    exists = resolved.is_dir() if kind == "folder" else resolved.is_file()
    if not exists:
        where = "" if resolved.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise DataNotFoundError(f"dataset {dataset!r}: data.params.path {path!r} is not an existing {kind}{where}")
    return resolved


@DATASETS.register("arrays", {"path": [STR], "layout": [Options(("NCHW", "NHWC"))],
                              "num_classes": [NONE, Interval(Integral, 2)]})
def arrays(*, root: str | None, n_train: int | None, n_test: int | None, seed: int, path: str,
           layout: str = "NCHW", num_classes: int | None = None) -> Dataset:
    """Your own .npz: x_train, y_train, x_test, y_test; images uint8 or float 0..1, any C x H x W; labels 0..K-1.

    ``layout``: how the 4-d image arrays are ordered (3-d arrays are grey ``(n, H, W)``); ``num_classes``: K
    (None: the largest label + 1)."""
    splits, classes = read_arrays(_user_path("arrays", path, "file"), layout=layout, num_classes=num_classes)
    return as_dataset("arrays", *splits, classes, n_train, n_test, seed)


@DATASETS.register("image_folder", {"path": [STR], "size": [Interval(Integral, 8, 512)], "channels": [Options((1, 3))]})
def image_folder(*, root: str | None, n_train: int | None, n_test: int | None, seed: int, path: str,
                 size: int = 32, channels: int = 3) -> Dataset:
    """Your own images, path/{train,test}/<class>/<image> (ImageFolder), resized to channels x size x size.

    The classes are train/'s sorted folder names; test/ may lack a class but not add one."""
    splits, classes = read_image_folder(_user_path("image_folder", path, "folder"), size, channels)
    return as_dataset("image_folder", *splits, len(classes), n_train, n_test, seed)


FINGERPRINTS.update(arrays=user_path_fingerprint, image_folder=user_path_fingerprint)
JITTER_SEED = 24  # fixed: the jitter is part of the dataset, the same in every trial and subset
JITTER_MAX_SHIFT = 4  # pixels, each axis


def jitter_images(images: np.ndarray, seed: int = JITTER_SEED) -> np.ndarray:
    """Each image shifted, rescaled in contrast and, for half of them, inverted, by seeded per-image draws.

    The shift (up to ``JITTER_MAX_SHIFT`` px each axis, zero fill), the contrast c ~ U(0.4, 1), the
    offset b ~ U(0, 1 - c) and the inversion (p = 1/2) move an image's pixels far more than they
    change what it shows: pixel neighbours stop sharing a class, as on natural images, while a CNN
    (translation-equivariant, free to learn both polarities) still learns the classes. uint8 in
    (N, 1, H, W), uint8 out.
    """
    rng = np.random.default_rng(seed)
    n = len(images)
    shifts = rng.integers(-JITTER_MAX_SHIFT, JITTER_MAX_SHIFT + 1, size=(n, 2))
    contrast = rng.uniform(0.4, 1.0, size=n)
    offset = rng.uniform(0.0, 1.0, size=n) * (1.0 - contrast)
    invert = rng.random(n) < 0.5
    pad = JITTER_MAX_SHIFT
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    height, width = images.shape[2:]
    out = np.empty_like(images)
    for dy, dx in {tuple(s) for s in shifts.tolist()}:  # one slice per distinct shift
        chosen = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
        out[chosen] = padded[chosen, :, pad - dy:pad - dy + height, pad - dx:pad - dx + width]
    scaled = out * contrast[:, None, None, None] + 255.0 * offset[:, None, None, None]
    scaled[invert] = 255.0 - scaled[invert]
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


@DATASETS.register("fashion_mnist_jitter", num_classes=10)
def fashion_mnist_jitter(*, root: str | None, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """Fashion-MNIST with a fixed per-image shift, contrast and inversion (:func:`jitter_images`): a proxy
    of natural-image difficulty, where pixel k-NN fails but a CNN still learns (issue 24)."""
    x_train, y_train, x_test, y_test = load_arrays("fashion_mnist", root)
    return as_dataset("fashion_mnist_jitter", jitter_images(np.asarray(x_train)), y_train,
                      jitter_images(np.asarray(x_test), JITTER_SEED + 1), y_test, 10, n_train, n_test, seed)
