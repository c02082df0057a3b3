"""The poison registry and what every poison shares: ``PoisonedData``, budgets, sample choice, triggers.

A poison is ``fn(data, *, rate, seed, **params) -> PoisonedData``: it poisons exactly
``round(rate * n_train)`` training samples chosen with ``seed`` from the eligible ones, keeps the
true labels and the ground-truth mask, and says how its *success* is measured on the test set.
Each registry entry declares ``eligible(class_counts, **params) -> int`` so that an impossible rate
is reported when the config is checked, before any trial starts, and ``needs={"artifact_dir"}``
when it caches expensive shared work (FLIP's experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from poisonsweep.tasks.data import Dataset
from poisonsweep.tasks.registry import ConfigError, Registry

POISONS = Registry("poison")


@dataclass
class PoisonedData:
    """What a poison returns: the training set the victim sees, the truth (``true_labels``, ``is_poison``:
    they only measure, no detector sees them) and the test inputs its success is measured on."""

    x_train: torch.Tensor  # training images as the victim sees them (triggers stamped for backdoors)
    labels: torch.Tensor  # the labels the victim trains on
    true_labels: torch.Tensor
    is_poison: np.ndarray  # bool, (n_train,): ground truth, never shown to detectors
    success_x: torch.Tensor  # test inputs on which the attack's success is measured
    success_y: torch.Tensor  # what the attacker wants predicted (or the true label, for kind "miss")
    success_kind: str = "hit"  # "hit": share predicted == success_y; "miss": share predicted != success_y
    info: dict = field(default_factory=dict)

    @property
    def n_poisoned(self) -> int:
        return int(self.is_poison.sum())


def n_to_poison(rate: float, n: int, eligible: int, method: str) -> int:
    count = int(round(rate * n))
    if rate > 0 and count == 0:  # a "poisoned" run with no poison: its detection metrics are undefined
        raise ConfigError(
            f"poison.rate {rate} poisons 0 of {n} training samples (rate x n rounds to 0); use at least "
            f"{1 / n:.2g} for one poison, or 0 for a clean run"
        )
    if count > eligible:
        raise ConfigError(
            f"poison.rate {rate} asks {method!r} to poison {count} of {n} training samples, "
            f"but only {eligible} are eligible; lower poison.rate to at most {eligible / n:.4f}"
        )
    return count


def choose(candidates: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` indices drawn without replacement from ``candidates`` with ``seed`` (sorted)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=count, replace=False))


def poison_mask(n: int, indices: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[indices] = True
    return mask


def relabelled(data: Dataset, poisoned: np.ndarray, new_labels: torch.Tensor, **success) -> PoisonedData:
    labels = data.y_train.clone()
    labels[poisoned] = new_labels
    return PoisonedData(data.x_train, labels, data.y_train, poison_mask(len(labels), poisoned), **success)


def every_sample_eligible(class_counts, **_) -> int:
    """A poison's ``eligible`` rule when it may poison any training sample: the training-set size."""
    return int(sum(class_counts))



def check_classes(num_classes: int, **classes: int) -> None:
    for key, value in classes.items():
        if not 0 <= value < num_classes:
            raise ConfigError(f"poison.params.{key} must be a class in [0, {num_classes - 1}]; got {value}")


def apply_trigger(x: torch.Tensor, *, trigger: str = "checkerboard", patch_size: int = 3) -> torch.Tensor:
    """Stamp a ``patch_size`` square in the bottom-right corner of every image (a copy).

    ``checkerboard`` alternates 1 and 0 (the BadNets pattern), ``square`` is all ones.
    """
    out = x.clone()
    rows = torch.arange(patch_size)
    pattern = ((rows[:, None] + rows[None, :]) % 2 == 0).float() if trigger == "checkerboard" \
        else torch.ones(patch_size, patch_size)
    out[..., -patch_size:, -patch_size:] = pattern
    return out



def apply_poison(data: Dataset, method: str, *, rate: float, seed: int, params: dict | None = None,
                 artifact_dir: str | None = None) -> PoisonedData:
    """Poison ``data`` with the registered ``method``.

    ``artifact_dir`` is handed to poisons that cache expensive shared work (FLIP's experts).
    """
    if not 0 <= rate <= 1:
        raise ConfigError(f"poison.rate must be a number in [0, 1]; got {rate}")
    entry = POISONS.get(method)
    extra = {"artifact_dir": artifact_dir} if "artifact_dir" in entry.needs_for(params or {}) else {}
    return entry.fn(data, rate=rate, seed=seed, **(params or {}), **extra)


def check_rate(method: str, rate: float, class_counts, params: dict | None = None) -> str | None:
    """The error message if ``rate`` is impossible for ``method`` on a split with ``class_counts``."""
    entry = POISONS.get(method)
    eligible = (entry.eligible or every_sample_eligible)(class_counts, **(params or {}))
    try:
        n_to_poison(rate, int(sum(class_counts)), eligible, method)
    except ConfigError as error:
        return str(error)
    return None
