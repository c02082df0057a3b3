"""How well a detector's scores and flags find the true poisons.

Every function takes the detector's ``scores`` (higher = more suspicious), its boolean
``flagged`` decision and the ground-truth ``is_poison`` mask, all of shape ``(n_samples,)``.
Detectors never see ``is_poison``; only these metrics do.

Conventions for degenerate inputs (they return NaN, never raise):

- ``auroc`` and ``auprc`` are NaN when the training set has no poisons or only poisons,
  since a ranking can only be judged against both kinds of sample.
- ``precision`` / ``recall`` / ``f1`` use scikit-learn's ``zero_division=np.nan``: precision is
  NaN when nothing is flagged (0 / 0), recall is NaN when there are no poisons, and f1 is NaN
  only when both are empty; f1 = 2·TP / (2·TP + FP + FN) otherwise, so it is 0 for a
  detector that flags nothing on a poisoned set. NaN means "undefined", so that averages over
  trials (pandas, DuckDB) skip it instead of counting it as a perfect or a failed score.
- ``recall_at_*``, ``precision_at_n`` and :func:`found_vs_checked` are NaN when there are no
  poisons.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

from poisonsweep.tasks.train import predict_logits

if TYPE_CHECKING:
    from poisonsweep.tasks.poisons import PoisonedData

# the "share of the training set checked" at which recall_at_<k> is reported, in percent
RECALL_AT_PERCENTS = (5, 10, 20)

__all__ = ["RECALL_AT_PERCENTS", "detection_metrics", "found_vs_checked", "poison_success", "precision_at_n", "ranking_order"]


def _check_inputs(scores: np.ndarray, is_poison: np.ndarray, flagged: np.ndarray | None = None):
    scores = np.asarray(scores, dtype=np.float64)
    is_poison = np.asarray(is_poison)
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape (n_samples,); got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores must be finite; got {int((~np.isfinite(scores)).sum())} NaN or infinite values")
    if is_poison.shape != scores.shape or is_poison.dtype != bool:
        raise ValueError(f"is_poison must be a bool array of shape {scores.shape}; "
                         f"got {is_poison.dtype} of shape {is_poison.shape}")
    if flagged is not None:
        flagged = np.asarray(flagged)
        if flagged.shape != scores.shape or flagged.dtype != bool:
            raise ValueError(f"flagged must be a bool array of shape {scores.shape}; "
                             f"got {flagged.dtype} of shape {flagged.shape}")
    return scores, is_poison, flagged


def ranking_order(scores: np.ndarray) -> np.ndarray:
    """Indices from most to least suspicious; equal scores keep index order (stable)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def found_vs_checked(scores: np.ndarray, is_poison: np.ndarray, fractions) -> np.ndarray:
    """Share of all poisons found when checking the top-scored share of the training set.

    This is the "fraction of flips fixed vs fraction of data checked" curve of Koh & Liang
    (2017, Fig. 6): a user inspects training samples from the most suspicious down.

    Parameters
    ----------
    scores : ndarray of shape (n_samples,)
        Detector scores; higher = more suspicious.
    is_poison : ndarray of bool, shape (n_samples,)
        Ground-truth poison mask.
    fractions : array-like of float in [0, 1]
        Shares of the training set checked. ``round(fraction * n_samples)`` samples are
        checked (Python rounding, as in ``flag_top``); ties in score are broken by index.

    Returns
    -------
    found : ndarray of float64, shape (len(fractions),)
        Share of the poisons among the checked samples; NaN for every entry when there are
        no poisons.
    """
    scores, is_poison, _ = _check_inputs(scores, is_poison)
    fractions = np.atleast_1d(np.asarray(fractions, dtype=np.float64))
    if np.any((fractions < 0) | (fractions > 1)):
        raise ValueError(f"fractions must lie in [0, 1]; got {fractions.tolist()}")
    n_poison = int(is_poison.sum())
    if n_poison == 0:
        return np.full(len(fractions), np.nan)
    # found_after[k] = number of poisons among the k most suspicious samples
    found_after = np.concatenate([[0], np.cumsum(is_poison[ranking_order(scores)])])
    n_checked = np.array([int(round(f * len(scores))) for f in fractions])
    return found_after[n_checked] / n_poison


def precision_at_n(scores: np.ndarray, is_poison: np.ndarray) -> float:
    """Share of poisons among the n highest scores, n = the number of poisons.

    At that budget precision equals recall, so it compares detectors' rankings at the one budget
    a perfect detector would use, whatever each detector's own flag rule. Ties in score are
    broken by index (:func:`ranking_order`). NaN when there are no poisons.
    """
    scores, is_poison, _ = _check_inputs(scores, is_poison)
    n_poison = int(is_poison.sum())
    if n_poison == 0:
        return float("nan")
    return float(is_poison[ranking_order(scores)[:n_poison]].sum() / n_poison)


def detection_metrics(scores: np.ndarray, flagged: np.ndarray, is_poison: np.ndarray) -> dict:
    """Ranking and flagging quality of one detector on one trial.

    Parameters
    ----------
    scores : ndarray of shape (n_samples,)
        Detector scores; higher = more suspicious.
    flagged : ndarray of bool, shape (n_samples,)
        The detector's own decision.
    is_poison : ndarray of bool, shape (n_samples,)
        Ground-truth poison mask.

    Returns
    -------
    metrics : dict
        ``auroc`` (ROC AUC of the scores; ties count one half), ``auprc`` (average precision),
        ``precision_at_n`` (:func:`precision_at_n`),
        ``precision``, ``recall``, ``f1`` (of the flags), ``n_flagged`` (int) and
        ``recall_at_5`` / ``recall_at_10`` / ``recall_at_20`` (share of all poisons among the
        top-scored 5 / 10 / 20 % of the training set, see :func:`found_vs_checked`).
        Floats are Python floats; undefined values are NaN (see the module docstring).
    """
    scores, is_poison, flagged = _check_inputs(scores, is_poison, flagged)
    both_kinds = 0 < is_poison.sum() < len(is_poison)
    precision, recall, f1, _ = precision_recall_fscore_support(
        is_poison, flagged, average="binary", zero_division=np.nan)
    metrics = {
        "auroc": float(roc_auc_score(is_poison, scores)) if both_kinds else float("nan"),
        "auprc": float(average_precision_score(is_poison, scores)) if both_kinds else float("nan"),
        "precision_at_n": precision_at_n(scores, is_poison),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "n_flagged": int(flagged.sum()),
    }
    recalls = found_vs_checked(scores, is_poison, [p / 100 for p in RECALL_AT_PERCENTS])
    for percent, value in zip(RECALL_AT_PERCENTS, recalls):
        metrics[f"recall_at_{percent}"] = float(value)
    return metrics


def poison_success(model: torch.nn.Module, poisoned: PoisonedData) -> float:
    """The poison's success on its test inputs (see ``PoisonedData.success_kind``); NaN if there are none."""
    if len(poisoned.success_x) == 0:
        return float("nan")
    hits = predict_logits(model, poisoned.success_x).argmax(1) == poisoned.success_y
    share = hits.float().mean().item()
    return share if poisoned.success_kind == "hit" else 1.0 - share

