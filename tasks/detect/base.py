"""What every detector receives and returns.

A detector is a function ``detect(context, *, seed, **params) -> Detection`` registered in
``DETECTORS``. Its ``scores`` are continuous, one per training sample, and **higher means
more suspicious**; ``flagged`` is its own keep/remove decision. Detectors never see the
ground-truth poison mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from tasks.registry import Registry
from tasks.models import SplitModel
from tasks.train import TrainConfig, extract_features, predict_logits

DETECTORS = Registry("detector")


def serial_map(fn: Callable, shared: Any, shards: Sequence) -> list:
    """The default ``map_shards``: ``[fn(shared, shard) for shard in shards]`` in this process.

    The engine hands trials a Ray actor pool with the same signature and the same result order.
    """
    return [fn(shared, shard) for shard in shards]


@dataclass
class DetectionContext:
    """The trained model and the (possibly poisoned) training set a detector inspects."""

    model: nn.Module
    x_train: torch.Tensor
    labels: np.ndarray  # the labels given in training (poisoned), shape (n,)
    num_classes: int
    model_name: str = ""
    model_params: dict = field(default_factory=dict)
    train_config: TrainConfig = field(default_factory=TrainConfig)
    x_test: torch.Tensor | None = None
    y_test: np.ndarray | None = None
    map_shards: Callable = serial_map
    checkpoints: list = field(default_factory=list)  # (lr, state_dict) per epoch, for TracIn
    seed: int = 0
    # per-trial scratch space shared by detectors (e.g. cross-validated fold predictions)
    cache: dict = field(default_factory=dict)

    @cached_property
    def features(self) -> np.ndarray:
        """Penultimate activations of every training sample, shape (n, d), float64."""
        return extract_features(self.model, self.x_train)

    @cached_property
    def train_logits(self) -> torch.Tensor:
        """Logits of every training sample: the head applied to the cached ``features`` when the
        model is features -> head (one pass over the images serves every detector)."""
        if isinstance(self.model, SplitModel):
            head = self.model.head
            return predict_logits(head, torch.as_tensor(self.features, dtype=head.weight.dtype))
        return predict_logits(self.model, self.x_train)

    @cached_property
    def pred_probs(self) -> np.ndarray:
        """In-sample softmax probabilities of the trained model, shape (n, K)."""
        return torch.softmax(self.train_logits.double(), 1).numpy()

    @cached_property
    def losses(self) -> np.ndarray:
        """Cross-entropy of every training sample under its given label, float64 (n,)."""
        labels = torch.as_tensor(np.asarray(self.labels), dtype=torch.int64)
        return nn.functional.cross_entropy(self.train_logits.double(), labels, reduction="none").numpy()


@dataclass
class Detection:
    scores: np.ndarray  # float64, shape (n,), higher = more suspicious
    flagged: np.ndarray  # bool, shape (n,)
    extras: dict = field(default_factory=dict)  # extra tables a detector produces (e.g. influence)


def flag_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Flag the round(fraction * n) highest scores (ties broken by index, stably)."""
    n_flag = int(round(fraction * len(scores)))
    flagged = np.zeros(len(scores), dtype=bool)
    if n_flag > 0:
        flagged[np.argsort(-scores, kind="stable")[:n_flag]] = True
    return flagged
