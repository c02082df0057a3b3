"""The registered datasets: scikit-learn's digits (built in) and the file-backed image datasets."""

from __future__ import annotations

from poisonsweep.tasks.data.base import DATASETS, Dataset, as_dataset
from poisonsweep.tasks.data.sources import load_arrays


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
