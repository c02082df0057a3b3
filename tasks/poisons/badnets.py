"""BadNets (Gu et al. 2017): a pixel trigger stamped on chosen training images, which are relabelled."""

from __future__ import annotations

from numbers import Integral

import numpy as np
import torch

from poisonsweep.tasks.data import Dataset
from poisonsweep.tasks.poisons.base import POISONS, PoisonedData, apply_trigger, check_classes, choose, n_to_poison, poison_mask
from poisonsweep.tasks.registry import CLASS_INDEX, ConfigError, Interval, Options


def _badnets_eligible(class_counts, *, target: int = 0, mode: str = "all_to_one", **_) -> int:
    total = int(sum(class_counts))
    return total - int(class_counts[target]) if mode == "all_to_one" and target < len(class_counts) else total


@POISONS.register(
    "badnets",
    {"target": [CLASS_INDEX], "mode": [Options(("all_to_one", "all_to_all"))],
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
    check_classes(data.num_classes, target=target)
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
    return PoisonedData(x_train, labels, data.y_train, poison_mask(n, poisoned),
                        success_x=stamp(data.x_test[test_keep]), success_y=relabel(data.y_test[test_keep]),
                        info={"target": target, "mode": mode})

