"""The dataset type, the ``DATASETS`` registry, seeded class-stratified subsets and ``load_dataset``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from poisonsweep.tasks.registry import ConfigError, Registry

DATASETS = Registry("dataset")


@dataclass
class Dataset:
    """A dataset's two splits as tensors: images float32 (n, C, H, W) in [0, 1], labels int64 0..K-1."""

    name: str
    x_train: torch.Tensor  # float32, (n, C, H, W), in [0, 1]
    y_train: torch.Tensor  # int64, (n,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


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


def as_dataset(name, x_train, y_train, x_test, y_test, num_classes, n_train, n_test, seed) -> Dataset:
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


def load_dataset(name: str, *, root: str | None = None, n_train: int | None = None,
                 n_test: int | None = None, seed: int = 0, params: dict | None = None) -> Dataset:
    """Load a registered dataset, optionally a seeded class-stratified subset of each split; ``params``: the
    dataset's own parameters (config ``data.params``, e.g. ``{"path": "my.npz"}`` for ``arrays``).

    Raises ``ConfigError`` for an unknown name or a subset larger than its split,
    ``DataNotFoundError`` when no source of the data is found, and ``DatasetFileError`` (naming
    the file) when a data file is corrupt.
    """
    return DATASETS.get(name).fn(root=root, n_train=n_train, n_test=n_test, seed=seed, **(params or {}))
