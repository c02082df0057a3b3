"""Confident learning (Northcutt et al., JAIR 2021) through cleanlab, on out-of-sample predictions.

cleanlab's ``find_label_issues`` estimates the joint distribution of given and true labels from
predicted probabilities and flags the samples it attributes to the off-diagonal; its docstring
asks for **out-of-sample** probabilities from cross-validation. So this detector re-trains the
trial's own model (same architecture, parameters and training settings) ``folds`` times with
stratified k-fold cross-validation and predicts every sample with the one model that never saw
it. The fold trainings go through the trial's ``map_shards`` (Ray actors under the engine) and
are cached in ``context.cache``, so several entries that differ only in ``filter_by`` or
``rank_by`` share one set of trainings.
"""

from __future__ import annotations

from numbers import Integral
from typing import Callable, NamedTuple

import numpy as np
import torch
from cleanlab.rank import get_label_quality_scores
from sklearn.model_selection import StratifiedKFold

from poisonsweep.tasks.detect.base import DETECTORS, Detection, DetectionContext, serial_map
from poisonsweep.tasks.detect.label_issues import FILTERS, decide_by_cleanlab
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.registry import Interval, Options
from poisonsweep.tasks.train import TrainConfig, predict_logits, train_model

# cleanlab.rank.get_label_quality_scores(method=...) methods
RANKINGS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")


class FoldPredictions(NamedTuple):
    """Out-of-sample predictions of k-fold cross-validation.

    pred_probs : ndarray of shape (n_samples, n_classes), float64
        Row i comes from the model of fold ``fold_of[i]``, which was trained without sample i.
    fold_of : ndarray of shape (n_samples,), int64
        The fold each sample is held out in.
    train_indices : list of ndarray
        ``train_indices[f]``: the sample indices the model of fold f was trained on, as reported
        by the worker that trained it.
    """

    pred_probs: np.ndarray
    fold_of: np.ndarray
    train_indices: list


def assign_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Seeded stratified fold id of every sample, shape (n_samples,)."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold_of[held_out] = fold
    return fold_of


def fold_seed(seed: int, fold: int) -> int:
    """An independent, reproducible seed for the model of one fold."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def predict_held_out_fold(shared: dict, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train a fresh model on every fold but ``fold`` and predict the held-out fold.

    Module-level so that ``map_shards`` can ship it to Ray actors.

    Parameters
    ----------
    shared : dict
        ``x``, ``labels``, ``fold_of``, ``num_classes``, ``model_name``, ``model_params``,
        ``train_config`` and ``seed``, sent once to every worker.
    fold : int

    Returns
    -------
    held_out, trained_on : ndarrays of sample indices
    probs : ndarray of shape (len(held_out), n_classes), float64
    """
    fold_of, x = shared["fold_of"], shared["x"]
    held_out, trained_on = np.flatnonzero(fold_of == fold), np.flatnonzero(fold_of != fold)
    seed = fold_seed(shared["seed"], fold)
    model = build_model(shared["model_name"], tuple(x.shape[1:]), shared["num_classes"],
                        shared["model_params"], seed=seed)
    labels = torch.as_tensor(shared["labels"][trained_on], dtype=torch.int64)
    train_model(model, x[trained_on], labels, shared["train_config"], seed=seed)
    probs = torch.softmax(predict_logits(model, x[held_out]).double(), dim=1).numpy()
    return held_out, trained_on, probs


def cross_val_pred_probs(x: torch.Tensor, labels: np.ndarray, *, num_classes: int, model_name: str,
                         model_params: dict, train_config: TrainConfig, folds: int = 5, seed: int = 0,
                         map_shards: Callable = serial_map) -> FoldPredictions:
    """Out-of-sample predicted probabilities by seeded stratified k-fold cross-validation.

    Parameters
    ----------
    x : Tensor of shape (n_samples, C, H, W)
    labels : ndarray of shape (n_samples,), int
        Given (possibly poisoned) labels; the folds are stratified on them.
    num_classes : int
    model_name, model_params : the registered model to re-train in each fold
    train_config : TrainConfig
    folds : int, default=5
    seed : int, default=0
        Seeds the fold split and every fold's initial weights and shuffling.
    map_shards : callable, default=serial_map
        ``map_shards(fn, shared, shards)``; one shard per fold, results in fold order.

    Returns
    -------
    predictions : FoldPredictions
    """
    labels = np.asarray(labels, dtype=np.int64)
    fold_of = assign_folds(labels, folds, seed)
    shared = {"x": x, "labels": labels, "fold_of": fold_of, "num_classes": num_classes,
              "model_name": model_name, "model_params": dict(model_params or {}),
              "train_config": train_config, "seed": seed}
    results = map_shards(predict_held_out_fold, shared, list(range(folds)))
    pred_probs = np.full((len(labels), num_classes), np.nan)
    train_indices = []
    for held_out, trained_on, probs in results:
        pred_probs[held_out] = probs
        train_indices.append(trained_on)
    return FoldPredictions(pred_probs, fold_of, train_indices)


def cached_fold_predictions(context: DetectionContext, folds: int, seed: int) -> FoldPredictions:
    """``cross_val_pred_probs`` for this trial, computed once per (folds, seed)."""
    key = ("confident_learning.cross_val_pred_probs", folds, seed)
    if key not in context.cache:
        context.cache[key] = cross_val_pred_probs(
            context.x_train, context.labels, num_classes=context.num_classes,
            model_name=context.model_name, model_params=context.model_params,
            train_config=context.train_config, folds=folds, seed=seed, map_shards=context.map_shards,
        )
    return context.cache[key]


@DETECTORS.register(
    "confident_learning",
    {"folds": [Interval(Integral, 2)], "filter_by": [Options(FILTERS)], "rank_by": [Options(RANKINGS)]},
    help="Confident learning (cleanlab find_label_issues) on k-fold out-of-sample predictions",
)
def confident_learning(context: DetectionContext, *, seed: int, folds: int = 5,
                       filter_by: str = "prune_by_noise_rate",
                       rank_by: str = "self_confidence") -> Detection:
    """cleanlab's label issues on cross-validated predictions of the trial's own model.

    Parameters
    ----------
    context : DetectionContext
    seed : int
        Seeds the fold split and the fold models.
    folds : int, default=5
        Cross-validation folds (cleanlab's own ``cv_n_folds`` default).
    filter_by : str, default="prune_by_noise_rate"
        ``find_label_issues`` method that decides ``flagged``.
    rank_by : str, default="self_confidence"
        ``get_label_quality_scores`` method behind ``scores``.

    Returns
    -------
    detection : Detection
        ``scores`` = 1 - label quality (float64, higher = more suspicious), the flagged ones
        lifted by one constant so that each scores at least as high as every unflagged sample
        (``label_issues.lift_flagged``; cleanlab prunes per class by margin, so its flags need not
        be the lowest qualities); ``flagged`` = the ``find_label_issues`` mask on the fold
        predictions (``label_issues.cleanlab_flags``); ``extras["fold_of"]`` = fold id of every sample.
    """
    predictions = cached_fold_predictions(context, folds, seed)
    labels = np.asarray(context.labels, dtype=np.int64)
    quality = get_label_quality_scores(labels, predictions.pred_probs, method=rank_by)
    scores, flagged = decide_by_cleanlab((1.0 - quality).astype(np.float64), labels, predictions.pred_probs, filter_by)
    return Detection(scores=scores, flagged=flagged, extras={"fold_of": predictions.fold_of.copy()})
