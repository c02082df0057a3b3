"""cleanlab's label-issue decision for the label-noise detectors, and the score lift that keeps the contract.

The label-noise detectors (``loss``, ``knn``, ``influence``, ``confident_learning``) each hold class
probabilities: the trained model's in-sample softmax, the neighbours' vote shares, cross-validated
fold predictions. Their ``flag_rule="cleanlab"`` decision is ``cleanlab.filter.find_label_issues``
on those probabilities (Northcutt, Jiang & Chuang, "Confident Learning", JAIR 2021), with one of its
documented ``filter_by`` methods (default ``prune_by_noise_rate``: per given label, remove the
confident joint's off-diagonal count of samples, those with the largest margin of the other class
over the given one).

cleanlab decides per class and by its own margin, so its flags need not be the detector's top
scores. The record's contract (a flagged sample scores at least as high as every unflagged one,
design.md) is kept by :func:`lift_flagged`: flagged scores are shifted up by one constant, just
enough to clear the highest unflagged score, which keeps the detector's order inside each group.
"""

from __future__ import annotations

import numpy as np

from poisonsweep.tasks.detect.base import flag_by_rule

__all__ = ["FILTERS", "DEFAULT_FILTER", "LABEL_NOISE_FLAG_RULES", "cleanlab_flags", "lift_flagged", "decide_by_cleanlab",
           "decide_label_noise"]

# cleanlab.filter.find_label_issues(filter_by=...) methods (cleanlab 2.x)
FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given",
           "low_normalized_margin", "low_self_confidence")
DEFAULT_FILTER = "prune_by_noise_rate"  # find_label_issues' own default


def cleanlab_flags(labels: np.ndarray, pred_probs: np.ndarray, filter_by: str = DEFAULT_FILTER) -> np.ndarray:
    """``cleanlab.filter.find_label_issues(labels, pred_probs, filter_by=...)`` as a bool mask.

    ``n_jobs=1``: cleanlab's multiprocessing misbehaves inside workers (cleanlab #150) and a trial
    already runs beside others. Rows of ``pred_probs`` are renormalised to sum to 1 (vote shares
    and softmax outputs already do, up to rounding), since cleanlab checks it.
    """
    from cleanlab.filter import find_label_issues  # imported here: only the cleanlab decision needs it

    if filter_by not in FILTERS:
        raise ValueError(f"filter_by must be one of {FILTERS}; got {filter_by!r}")
    probs = np.asarray(pred_probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    mask = find_label_issues(np.asarray(labels, dtype=np.int64), probs, filter_by=filter_by, n_jobs=1)
    return np.asarray(mask, dtype=bool)


def lift_flagged(scores: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """``scores`` with every flagged score shifted up by one constant so that min(flagged) >= max(unflagged).

    The shift is ``max(unflagged) - min(flagged)`` when positive (0 otherwise, scores returned as
    they are), so the order inside the flagged and inside the unflagged samples is unchanged and
    the lowest flagged sample ties the highest unflagged one at most. Returns a new float64 array.
    """
    scores = np.asarray(scores, dtype=np.float64).copy()
    flagged = np.asarray(flagged, dtype=bool)
    if flagged.any() and (~flagged).any():
        shift = scores[~flagged].max() - scores[flagged].min()
        if shift > 0:
            scores[flagged] += shift
    return scores


def decide_by_cleanlab(scores: np.ndarray, labels: np.ndarray, pred_probs: np.ndarray,
                       filter_by: str = DEFAULT_FILTER) -> tuple[np.ndarray, np.ndarray]:
    """(lifted scores, flags): cleanlab's flags on ``pred_probs`` and ``scores`` lifted to agree with them."""
    flagged = cleanlab_flags(labels, pred_probs, filter_by)
    return lift_flagged(scores, flagged), flagged


# the flag rules of the score-only label-noise detectors (loss, influence): cleanlab's filter on the
# model's probabilities, or base.flag_by_rule's "auto" (top n, n = cleanlab's count) and "fraction"
LABEL_NOISE_FLAG_RULES = ("cleanlab", "auto", "fraction")


def decide_label_noise(scores: np.ndarray, context, *, flag_rule: str, flag_fraction: float,
                       filter_by: str = DEFAULT_FILTER) -> tuple[np.ndarray, np.ndarray]:
    """(scores, flags) of a score-only label-noise detector under ``flag_rule``.

    ``"cleanlab"``: :func:`decide_by_cleanlab` on the trained model's in-sample probabilities
    (``context.pred_probs``), scores lifted; ``"auto"`` / ``"fraction"``: ``base.flag_by_rule``
    (top scores), scores unchanged.
    """
    if flag_rule == "cleanlab":
        return decide_by_cleanlab(scores, context.labels, context.pred_probs, filter_by)
    return scores, flag_by_rule(scores, flag_rule, flag_fraction, lambda: context.n_label_issues)
