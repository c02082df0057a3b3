"""What every detector receives and returns, and the flag rules detectors share.

A detector is a function ``detect(context, *, seed, **params) -> Detection`` registered in
``DETECTORS``. Its ``scores`` are continuous, one per training sample, and **higher means
more suspicious**; ``flagged`` is its own keep/remove decision. Detectors never see the
ground-truth poison mask.

Flag rules (``flag_rule`` of the score-only detectors): ``"fraction"`` flags a fixed share
(``flag_top``), which cannot adapt to the contamination; ``"auto"`` estimates how many samples
to flag without the truth, with one of two documented estimators:

- :func:`label_issue_count`, for detectors whose score measures label noise (loss, influence):
  confident learning's estimate of the number of label errors (Northcutt et al., JAIR 2021).
- :func:`robust_outliers`, for scores with a clean bulk and an outlying tail (spectral
  signatures, per class): the modified z-score of Iglewicz & Hoaglin (1993), flagged above 3.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from numbers import Real
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from poisonsweep.tasks.registry import Interval, Options, Registry
from poisonsweep.tasks.models import SplitModel
from poisonsweep.tasks.train import TrainConfig, extract_features, predict_logits

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
    # (epochs, n): each sample's minibatch loss in each training epoch (TrainHistory.sample_losses)
    sample_losses: np.ndarray | None = None
    seed: int = 0
    # per-trial scratch space shared by detectors (e.g. cross-validated fold predictions)
    cache: dict = field(default_factory=dict)
    # where detectors run their heavy linear algebra (torch): the trial's training device; None = CPU
    device: str | None = None

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

    @cached_property
    def n_label_issues(self) -> int:
        """Confident learning's estimate of the number of wrong labels, from ``pred_probs``
        (:func:`label_issue_count`): the ``"auto"`` flag count of the label-noise detectors."""
        return label_issue_count(self.labels, self.pred_probs)


@dataclass
class Detection:
    """What a detector returns: a score per training sample (higher = more suspicious) and its own flags;
    ``extras[table]``: rows of the extra record tables its registry entry declares (``tables=``)."""

    scores: np.ndarray  # float64, shape (n,), higher = more suspicious
    flagged: np.ndarray  # bool, shape (n,)
    extras: dict = field(default_factory=dict)  # extra tables a detector produces (e.g. influence)



def flag_top_n(scores: np.ndarray, n_flag: int) -> np.ndarray:
    """Flag the ``n_flag`` highest scores (ties broken by index, stably)."""
    flagged = np.zeros(len(scores), dtype=bool)
    if n_flag > 0:
        flagged[np.argsort(-np.asarray(scores), kind="stable")[:n_flag]] = True
    return flagged


def flag_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Flag the round(fraction * n) highest scores (ties broken by index, stably)."""
    return flag_top_n(scores, int(round(fraction * len(scores))))


FLAG_RULES = ("auto", "fraction")
# constraints of the shared ``flag_rule`` / ``flag_fraction`` detector parameters
FLAG_CONSTRAINTS = {"flag_rule": [Options(FLAG_RULES)], "flag_fraction": [Interval(Real, 0, 1)]}

# Iglewicz & Hoaglin (1993), "How to Detect and Handle Outliers", ASQC Basic References in
# Quality Control vol. 16: M_i = 0.6745 (x_i - median) / MAD; |M_i| > 3.5 marks a potential
# outlier. 0.6745 is the 0.75 quantile of N(0, 1), so M is a z-score for normal data.
MODIFIED_Z_CONSTANT = 0.6745
MODIFIED_Z_THRESHOLD = 3.5


def modified_z_scores(values: np.ndarray) -> np.ndarray:
    """Iglewicz-Hoaglin modified z-scores 0.6745 (x - median(x)) / MAD(x).

    Median and MAD do not move while less than half of ``values`` are outliers, so a poison
    group below half cannot hide by inflating the scale. With MAD 0 (over half the values tie)
    a value at the median gets 0 and any other value +-inf.
    """
    values = np.asarray(values, dtype=np.float64)
    deviation = values - np.median(values)
    mad = np.median(np.abs(deviation))
    if mad > 0:
        return MODIFIED_Z_CONSTANT * deviation / mad
    return np.where(deviation == 0, 0.0, np.copysign(np.inf, deviation))


def robust_outliers(values: np.ndarray, *, two_sided: bool = False) -> np.ndarray:
    """Values whose modified z-score exceeds 3.5 (Iglewicz & Hoaglin 1993), high side only unless
    ``two_sided``. On normal data this marks about 0.02 % of the values per side."""
    z = modified_z_scores(values)
    return (np.abs(z) if two_sided else z) > MODIFIED_Z_THRESHOLD


def label_issue_count(labels: np.ndarray, pred_probs: np.ndarray) -> int:
    """Confident learning's estimate of how many given labels are wrong.

    ``cleanlab.count.num_label_issues`` with its default ``estimation_method="off_diagonal"``:
    the off-diagonal count of the calibrated confident joint (Northcutt, Jiang & Chuang, JAIR
    2021), i.e. how many samples are confidently predicted as a class other than their label.
    """
    from cleanlab.count import num_label_issues  # imported here: only the "auto" rule needs it

    return int(num_label_issues(np.asarray(labels, dtype=np.int64), np.asarray(pred_probs, dtype=np.float64)))


def flag_by_rule(scores: np.ndarray, flag_rule: str, flag_fraction: float,
                 auto_count: Callable[[], int]) -> np.ndarray:
    """A score-only detector's flags: the top ``flag_fraction`` of the scores (``"fraction"``) or
    the top ``auto_count()`` (``"auto"``; called only then, since the estimate may cost a pass)."""
    if flag_rule == "fraction":
        return flag_top(scores, flag_fraction)
    if flag_rule == "auto":
        return flag_top_n(scores, auto_count())
    raise ValueError(f"flag_rule must be one of {FLAG_RULES}; got {flag_rule!r}")
