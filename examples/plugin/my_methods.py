"""A poisonsweep plugin: a dataset, a poison, a model and a detector, in a plain Python module.

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

from poisonsweep import (DATASETS, DETECTORS, MODELS, POISONS, Dataset, Detection, DetectionContext, Interval,
                         PoisonedData, SplitModel, as_dataset, flag_top)


@DATASETS.register("digits_4x4", num_classes=10)
def digits_4x4(*, root: str | None, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """scikit-learn's 8x8 digits average-pooled to 4x4: any arrays become a dataset through ``as_dataset``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pooled = (bunch.images / 16.0).reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))[:, None]  # (n, 1, 4, 4) in [0, 1]
    x_train, x_test, y_train, y_test = train_test_split(pooled, bunch.target, test_size=0.25, stratify=bunch.target,
                                                        random_state=0)
    # as_dataset: seeded class-stratified subsets of n_train / n_test, float32 tensors, int64 labels
    return as_dataset("digits_4x4", x_train, y_train, x_test, y_test, 10, n_train, n_test, seed)


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
