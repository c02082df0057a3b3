"""Poisons: label flips and pixel-trigger backdoors.

A poison is ``fn(data, *, rate, seed, **params) -> PoisonedData``: it poisons exactly
``round(rate * n_train)`` training samples chosen with ``seed`` from the eligible ones, keeps the
true labels and the ground-truth mask, and says how its *success* is measured on the test set.
Each registry entry also carries ``eligible(class_counts, **params) -> int`` so that an
impossible rate is reported when the config is checked, before any trial starts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from numbers import Integral

import numpy as np
import torch

from tasks.data import Dataset
from tasks.registry import ConfigError, Interval, Options, Registry

POISONS = Registry("poison")


@dataclass
class PoisonedData:
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


def _mask(n: int, indices: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[indices] = True
    return mask


def _flip(data: Dataset, poisoned: np.ndarray, new_labels: torch.Tensor, **success) -> PoisonedData:
    labels = data.y_train.clone()
    labels[poisoned] = new_labels
    return PoisonedData(data.x_train, labels, data.y_train, _mask(len(labels), poisoned), **success)


def _all(class_counts, **_) -> int:
    return int(sum(class_counts))


@POISONS.register("none", eligible=_all)
def no_poison(data: Dataset, *, rate: float, seed: int) -> PoisonedData:
    """The clean baseline: nothing is poisoned (``rate`` must be 0)."""
    if rate != 0:
        raise ConfigError(f"poison.method 'none' needs poison.rate 0; got {rate}")
    return _flip(data, np.array([], dtype=int), torch.tensor([], dtype=torch.int64),
                 success_x=data.x_test, success_y=data.y_test, success_kind="miss")


@POISONS.register("one_shift", {"shift": [Interval(Integral, 1)]}, eligible=_all)
def one_shift(data: Dataset, *, rate: float, seed: int, shift: int = 1) -> PoisonedData:
    """Relabel class i as (i + shift) mod K; success = test predictions equal to that mapping."""
    n, k = len(data.y_train), data.num_classes
    if shift % k == 0:
        raise ConfigError(f"poison.params.shift {shift} is a multiple of the {k} classes: nothing would flip")
    poisoned = choose(np.arange(n), n_to_poison(rate, n, n, "one_shift"), seed)
    return _flip(data, poisoned, (data.y_train[poisoned] + shift) % k,
                 success_x=data.x_test, success_y=(data.y_test + shift) % k)


@POISONS.register("random_flip", eligible=_all)
def random_flip(data: Dataset, *, rate: float, seed: int) -> PoisonedData:
    """Relabel to a uniformly chosen *other* class; success = the test error rate (no fixed mapping)."""
    n, k = len(data.y_train), data.num_classes
    poisoned = choose(np.arange(n), n_to_poison(rate, n, n, "random_flip"), seed)
    offsets = np.random.default_rng([seed, 1]).integers(1, k, size=len(poisoned))
    new = (data.y_train[poisoned] + torch.as_tensor(offsets)) % k
    return _flip(data, poisoned, new, success_x=data.x_test, success_y=data.y_test, success_kind="miss")


def _source_count(class_counts, *, source: int = 0, **_) -> int:
    return int(class_counts[source]) if source < len(class_counts) else 0


@POISONS.register("pair_flip", {"source": [Interval(Integral, 0)], "target": [Interval(Integral, 0)]},
                  eligible=_source_count)
def pair_flip(data: Dataset, *, rate: float, seed: int, source: int = 0, target: int = 1) -> PoisonedData:
    """Relabel samples of ``source`` as ``target``; success = source test images predicted as target."""
    _check_classes(data.num_classes, source=source, target=target)
    if source == target:
        raise ConfigError("poison.params.source and poison.params.target must differ")
    candidates = np.flatnonzero(data.y_train.numpy() == source)
    poisoned = choose(candidates, n_to_poison(rate, len(data.y_train), len(candidates), "pair_flip"), seed)
    from_source = data.y_test == source
    return _flip(data, poisoned, torch.full((len(poisoned),), target),
                 success_x=data.x_test[from_source], success_y=torch.full((int(from_source.sum()),), target))


def _check_classes(num_classes: int, **classes: int) -> None:
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


def _badnets_eligible(class_counts, *, target: int = 0, mode: str = "all_to_one", **_) -> int:
    total = int(sum(class_counts))
    return total - int(class_counts[target]) if mode == "all_to_one" and target < len(class_counts) else total


@POISONS.register(
    "badnets",
    {"target": [Interval(Integral, 0)], "mode": [Options(("all_to_one", "all_to_all"))],
     "trigger": [Options(("checkerboard", "square"))], "patch_size": [Interval(Integral, 1)]},
    eligible=_badnets_eligible,
)
def badnets(data: Dataset, *, rate: float, seed: int, target: int = 0, mode: str = "all_to_one",
            trigger: str = "checkerboard", patch_size: int = 3) -> PoisonedData:
    """BadNets (Gu et al. 2017): stamp a pixel patch on chosen training images and relabel them.

    ``all_to_one``: images of every class but ``target`` become ``target``; ``all_to_all``: class i
    becomes (i + 1) mod K. Success = attack success rate on triggered test images of non-target classes
    (all_to_one) or on all triggered test images (all_to_all).
    """
    _check_classes(data.num_classes, target=target)
    if patch_size >= min(data.in_shape[1:]):
        raise ConfigError(f"poison.params.patch_size {patch_size} must be smaller than the image {data.in_shape[1:]}")
    k, n = data.num_classes, len(data.y_train)
    stamp = lambda x: apply_trigger(x, trigger=trigger, patch_size=patch_size)  # noqa: E731
    if mode == "all_to_one":
        candidates = np.flatnonzero(data.y_train.numpy() != target)
        relabel = lambda y: torch.full_like(y, target)  # noqa: E731
        test_keep = data.y_test != target
    else:
        candidates = np.arange(n)
        relabel = lambda y: (y + 1) % k  # noqa: E731
        test_keep = torch.ones_like(data.y_test, dtype=torch.bool)
    poisoned = choose(candidates, n_to_poison(rate, n, len(candidates), "badnets"), seed)
    x_train = data.x_train.clone()
    x_train[poisoned] = stamp(x_train[poisoned])
    labels = data.y_train.clone()
    labels[poisoned] = relabel(labels[poisoned])
    return PoisonedData(x_train, labels, data.y_train, _mask(n, poisoned),
                        success_x=stamp(data.x_test[test_keep]), success_y=relabel(data.y_test[test_keep]),
                        info={"target": target, "mode": mode})


def apply_poison(data: Dataset, method: str, *, rate: float, seed: int, params: dict | None = None,
                 artifact_dir: str | None = None) -> PoisonedData:
    """Poison ``data`` with the registered ``method``.

    ``artifact_dir`` is handed to poisons that cache expensive shared work (FLIP's experts).
    """
    if not 0 <= rate <= 1:
        raise ConfigError(f"poison.rate must be a number in [0, 1]; got {rate}")
    fn = POISONS.get(method).fn
    extra = {"artifact_dir": artifact_dir} if "artifact_dir" in inspect.signature(fn).parameters else {}
    return fn(data, rate=rate, seed=seed, **(params or {}), **extra)


def check_rate(method: str, rate: float, class_counts, params: dict | None = None) -> str | None:
    """The error message if ``rate`` is impossible for ``method`` on a split with ``class_counts``."""
    entry = POISONS.get(method)
    eligible = entry.extra.get("eligible", _all)(class_counts, **(params or {}))
    try:
        n_to_poison(rate, int(sum(class_counts)), eligible, method)
    except ConfigError as error:
        return str(error)
    return None


def poison_success(model: torch.nn.Module, poisoned: PoisonedData) -> float:
    """The poison's success on its test inputs (see ``PoisonedData.success_kind``); NaN if there are none."""
    from tasks.train import predict_logits

    if len(poisoned.success_x) == 0:
        return float("nan")
    hits = predict_logits(model, poisoned.success_x).argmax(1) == poisoned.success_y
    share = hits.float().mean().item()
    return share if poisoned.success_kind == "hit" else 1.0 - share


import tasks.flip  # noqa: E402,F401  (registers the "flip" poison; it builds on the helpers above)
