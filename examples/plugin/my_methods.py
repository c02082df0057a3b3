"""A poisonsweep plugin: one detector, one poison and one model, in a plain Python module.

Name it in a sweep config (``plugins: [my_methods.py]``, relative to the config file) and its entries are
checked, listed (``poisonsweep list -c digits_plugin.yaml``) and run like the built-in ones, on every Ray
node: the engine ships this file with the job. Editing it makes its recorded trials stale
(``poisonsweep run ... --rerun stale`` recomputes them).
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from torch import nn

from poisonsweep import (DETECTORS, MODELS, POISONS, Dataset, Detection, DetectionContext, Interval, PoisonedData,
                         SplitModel, flag_top)


@DETECTORS.register("margin", {"flag_fraction": [Interval(Real, 0, 1)]})
def margin(context: DetectionContext, *, seed: int, flag_fraction: float = 0.1) -> Detection:
    """Probability margin: the best other class's probability minus the given label's (higher = more suspicious)."""
    probs = context.pred_probs  # (n, K), the trained model's in-sample softmax
    given = np.asarray(context.labels)
    own = probs[np.arange(len(given)), given]
    others = probs.copy()
    others[np.arange(len(given)), given] = -np.inf
    scores = others.max(axis=1) - own
    return Detection(scores=scores.astype(np.float64), flagged=flag_top(scores, flag_fraction))


def _not_target(class_counts, *, target: int = 0, **_) -> int:
    """How many training samples the poison may relabel: those not already of class ``target``."""
    return int(sum(class_counts) - class_counts[target])


@POISONS.register("to_target", {"target": [Interval(Integral, 0)]}, eligible=_not_target)
def to_target(data: Dataset, *, rate: float, seed: int, target: int = 0) -> PoisonedData:
    """All-to-one label flip: relabel round(rate * n) samples of other classes as ``target``."""
    y = data.y_train.numpy()
    if not 0 <= target < data.num_classes:
        raise ValueError(f"poison.params.target must be a class in [0, {data.num_classes - 1}]; got {target}")
    candidates = np.flatnonzero(y != target)
    count = int(round(rate * len(y)))
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, size=count, replace=False))
    labels = data.y_train.clone()
    labels[torch.as_tensor(chosen, dtype=torch.int64)] = target
    is_poison = np.zeros(len(y), dtype=bool)
    is_poison[chosen] = True
    keep = data.y_test != target  # success: test images of other classes predicted as the target
    return PoisonedData(data.x_train, labels, data.y_train, is_poison, success_x=data.x_test[keep],
                        success_y=torch.full((int(keep.sum()),), target, dtype=torch.int64))


@MODELS.register("tanh_mlp", {"hidden": [Interval(Integral, 1)]})
def tanh_mlp(in_shape: tuple[int, int, int], num_classes: int, *, hidden: int = 64) -> SplitModel:
    """One tanh hidden layer on the flattened image; the detectors read its activations."""
    features = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(in_shape)), hidden), nn.Tanh())
    return SplitModel(features, nn.Linear(hidden, num_classes))
