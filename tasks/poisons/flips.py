"""Label flips: the clean baseline, one-shift, random and pair flips. Only labels change."""

from __future__ import annotations


import numpy as np
import torch

from poisonsweep.tasks.data import Dataset
from poisonsweep.tasks.poisons.base import (
    POISONS, PoisonedData, check_classes, choose, every_sample_eligible, n_to_poison, relabelled,
)
from poisonsweep.tasks.registry import CLASS_INDEX, BelowData, ConfigError


@POISONS.register("none", eligible=every_sample_eligible)
def no_poison(data: Dataset, *, rate: float, seed: int) -> PoisonedData:
    """The clean baseline: nothing is poisoned (``rate`` must be 0)."""
    if rate != 0:
        raise ConfigError(f"poison.method 'none' needs poison.rate 0; got {rate}")
    return relabelled(data, np.array([], dtype=int), torch.tensor([], dtype=torch.int64),
                       success_x=data.x_test, success_y=data.y_test, success_kind="miss")


@POISONS.register("one_shift", {"shift": [BelowData(low=1)]}, eligible=every_sample_eligible)
def one_shift(data: Dataset, *, rate: float, seed: int, shift: int = 1) -> PoisonedData:
    """Relabel class i as (i + shift) mod K; success = test predictions equal to that mapping."""
    n, k = len(data.y_train), data.num_classes
    if not 1 <= shift < k:  # 0 or K flips nothing; K + 1 is 1 again under another trial id
        raise ConfigError(f"poison.params.shift must be an int in [1, {k - 1}] for {k} classes; got {shift}")
    poisoned = choose(np.arange(n), n_to_poison(rate, n, n, "one_shift"), seed)
    return relabelled(data, poisoned, (data.y_train[poisoned] + shift) % k,
                       success_x=data.x_test, success_y=(data.y_test + shift) % k)


@POISONS.register("random_flip", eligible=every_sample_eligible)
def random_flip(data: Dataset, *, rate: float, seed: int) -> PoisonedData:
    """Relabel to a uniformly chosen *other* class; success = the test error rate (no fixed mapping)."""
    n, k = len(data.y_train), data.num_classes
    poisoned = choose(np.arange(n), n_to_poison(rate, n, n, "random_flip"), seed)
    offsets = np.random.default_rng([seed, 1]).integers(1, k, size=len(poisoned))
    new = (data.y_train[poisoned] + torch.as_tensor(offsets)) % k
    return relabelled(data, poisoned, new, success_x=data.x_test, success_y=data.y_test, success_kind="miss")


def _source_count(class_counts, *, source: int = 0, **_) -> int:
    return int(class_counts[source]) if source < len(class_counts) else 0


@POISONS.register("pair_flip", {"source": [CLASS_INDEX], "target": [CLASS_INDEX]},
                  eligible=_source_count)
def pair_flip(data: Dataset, *, rate: float, seed: int, source: int = 0, target: int = 1) -> PoisonedData:
    """Relabel samples of ``source`` as ``target``; success = source test images predicted as target."""
    check_classes(data.num_classes, source=source, target=target)
    if source == target:
        raise ConfigError("poison.params.source and poison.params.target must differ")
    candidates = np.flatnonzero(data.y_train.numpy() == source)
    poisoned = choose(candidates, n_to_poison(rate, len(data.y_train), len(candidates), "pair_flip"), seed)
    from_source = data.y_test == source
    return relabelled(data, poisoned, torch.full((len(poisoned),), target),
                       success_x=data.x_test[from_source], success_y=torch.full((int(from_source.sum()),), target))

