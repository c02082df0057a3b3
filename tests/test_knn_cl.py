"""Deep k-NN and confident learning, checked against planted label errors, brute force and
instrumented training (which model saw which sample)."""

from __future__ import annotations

import pickle

import numpy as np
from cleanlab.filter import find_label_issues
import pytest
import torch
from sklearn.metrics import roc_auc_score

import poisonsweep.tasks.detect.confident_learning as cl
from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.detect.base import DETECTORS, DetectionContext, label_issue_count, serial_map
from poisonsweep.tasks.detect.confident_learning import (
    FILTERS, RANKINGS, assign_folds, confident_learning, cross_val_pred_probs,
)
from poisonsweep.tasks.detect.knn import TIE_BREAK_WEIGHT, deep_knn, knn
from poisonsweep.tasks.detect.label_issues import lift_flagged
from poisonsweep.tasks.registry import TrialWarning
from poisonsweep.tasks.train import TrainConfig

ATOL = 1e-12


def context_with_features(features: np.ndarray, labels: np.ndarray, num_classes: int) -> DetectionContext:
    context = DetectionContext(model=torch.nn.Identity(), x_train=torch.as_tensor(features, dtype=torch.float32),
                               labels=labels, num_classes=num_classes)
    context.features = features  # cached_property lives in __dict__, so this skips the model
    return context


def planted_blobs(seed=0, per_class=60, classes=4, dim=5, n_flips=8):
    """Well-separated Gaussian blobs with ``n_flips`` labels moved to another class."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(classes, dim)
    true = np.repeat(np.arange(classes), per_class)
    features = centres[true] + 0.3 * rng.standard_normal((len(true), dim))
    planted = rng.choice(len(true), size=n_flips, replace=False)
    given = true.copy()
    given[planted] = (true[planted] + rng.integers(1, classes, n_flips)) % classes
    is_planted = np.zeros(len(true), dtype=bool)
    is_planted[planted] = True
    return features, given, is_planted


# ----------------------------------------------------------------------------------------- knn

def test_knn_flags_exactly_the_planted_flips_and_ranks_them_first():
    features, given, is_planted = planted_blobs()
    context = context_with_features(features, given, 4)
    assert context.features is features  # the model was never asked
    detection = knn(context, seed=0, k=10, flag_rule="plurality")
    np.testing.assert_array_equal(detection.flagged, is_planted)
    assert detection.scores[is_planted].min() > detection.scores[~is_planted].max()
    assert detection.scores.dtype == np.float64 and detection.flagged.dtype == bool


def test_knn_auto_rule_flags_the_cleanlab_count_of_brute_force_vote_shares():
    """auto = the top-n scores, n = cleanlab's count on the leave-self-out vote shares, here
    recomputed from a brute-force distance matrix."""
    features, given, is_planted = planted_blobs()
    k = 10
    distances = np.linalg.norm(features[:, None] - features[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    neighbours = np.argsort(distances, axis=1, kind="stable")[:, :k]
    shares = np.stack([(given[neighbours] == c).mean(axis=1) for c in range(4)], axis=1)
    expected_n = label_issue_count(given, shares)
    detection = knn(context_with_features(features, given, 4), seed=0, k=k, flag_rule="auto")
    assert detection.flagged.sum() == expected_n > 0
    assert is_planted[detection.flagged].all()  # the flags are the most disagreeing samples
    cleanlab_flags = knn(context_with_features(features, given, 4), seed=0, k=k, flag_rule="cleanlab").flagged
    np.testing.assert_array_equal(cleanlab_flags, find_label_issues(given, shares, filter_by="prune_by_noise_rate"))


def brute_force_deep_knn(features, labels, num_classes, k):
    """Loop over every pair: exclude self, sort by distance, vote, break ties by nearest."""
    n = len(labels)
    neighbours = []
    for i in range(n):
        dist = np.array([np.sqrt(((features[i] - features[j]) ** 2).sum()) for j in range(n)])
        dist[i] = np.inf  # never its own neighbour
        order = np.argsort(dist, kind="stable")[:k]
        neighbours.append((order, dist[order]))
    eps = 1e-9 * np.median([d for _, dists in neighbours for d in dists])
    scores, flagged = np.empty(n), np.empty(n, dtype=bool)
    for i, (order, dists) in enumerate(neighbours):
        votes = [int(labels[j]) for j in order]
        top = max(votes.count(c) for c in range(num_classes))
        winner = next(v for v in votes if votes.count(v) == top)  # nearest among the tied labels
        disagree = np.array([v != labels[i] for v in votes])
        weights = 1.0 / (dists + eps)
        scores[i] = disagree.mean() + TIE_BREAK_WEIGHT / k * (weights * disagree).sum() / weights.sum()
        flagged[i] = winner != labels[i]
    return scores, flagged


def test_knn_matches_a_brute_force_search():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((30, 4))
    labels = rng.integers(0, 3, 30)
    detection = deep_knn(features, labels, 3, k=5, flag_rule="plurality")
    scores, flagged = brute_force_deep_knn(features, labels, 3, 5)
    # the plurality flags are not the top shares, so their scores are lifted (tested by hand in test_label_issues)
    np.testing.assert_allclose(detection.scores, lift_flagged(scores, flagged), rtol=0, atol=ATOL)
    np.testing.assert_array_equal(detection.flagged, flagged)


def test_knn_plurality_tie_goes_to_the_nearest_tied_label():
    # sample 0 at the origin; its two neighbours: label 1 at distance 1, label 2 at distance 2
    features = np.array([[0.0], [1.0], [-2.0], [50.0], [60.0]])
    labels = np.array([2, 1, 2, 0, 0])
    detection = deep_knn(features, labels, 3, k=2, flag_rule="plurality")
    assert detection.extras["plurality_label"][0] == 1
    assert detection.flagged[0]
    # same layout, but the nearer neighbour carries the sample's own label: the tie keeps it
    detection = deep_knn(features, np.array([2, 2, 1, 0, 0]), 3, k=2, flag_rule="plurality")
    assert detection.extras["plurality_label"][0] == 2
    assert not detection.flagged[0]


def test_knn_equal_shares_are_ordered_by_how_close_the_disagreeing_neighbour_is():
    # samples 0 and 3 (label 0) each have one label-1 and one label-0 neighbour (share 1/2);
    # sample 0's disagreeing neighbour is nearer, so sample 0 must score higher
    features = np.array([[0.0], [0.1], [-1.0], [100.0], [101.0], [99.9]])
    labels = np.array([0, 1, 0, 0, 1, 0])
    detection = deep_knn(features, labels, 2, k=2, flag_rule="auto")
    share = detection.scores.round(2)
    assert share[0] == share[3] == 0.5
    assert detection.scores[0] > detection.scores[3]
    assert detection.scores[0] - 0.5 < TIE_BREAK_WEIGHT / 2  # the term stays below one vote


def test_knn_never_counts_the_sample_itself_and_caps_k():
    # a lone sample of class 0 inside a class-1 cluster: all its neighbours disagree
    features = np.array([[0.0], [0.01], [0.02], [0.03]])
    labels = np.array([0, 1, 1, 1])
    with pytest.warns(TrialWarning, match="knn k=10 is not below the 4 samples it votes over: used k=3"):
        detection = deep_knn(features, labels, 2, k=10, flag_rule="plurality")
    assert detection.extras["k"] == 3  # capped at n - 1, and said so
    assert detection.scores[0] == pytest.approx(1.0 + TIE_BREAK_WEIGHT / 3, abs=ATOL)
    np.testing.assert_array_equal(detection.flagged, [True, False, False, False])


def test_knn_reads_the_models_penultimate_features():
    from poisonsweep.tasks.models import build_model

    data = load_dataset("digits", n_train=40, n_test=10, seed=0)
    model = build_model("mlp", data.in_shape, 10, {"hidden": 16, "depth": 1}, seed=0)
    context = DetectionContext(model=model, x_train=data.x_train, labels=data.y_train.numpy(), num_classes=10)
    detection = knn(context, seed=0, k=5)
    assert context.features.shape == (40, 16)
    expected = deep_knn(context.features, context.labels, 10, 5)
    np.testing.assert_array_equal(detection.scores, expected.scores)


# ----------------------------------------------------------------------- confident learning

@pytest.fixture(scope="module")
def flipped_digits():
    """500 digits with 10% of labels moved to a random other class."""
    data = load_dataset("digits", n_train=500, n_test=10, seed=0)
    rng = np.random.default_rng(0)
    given = data.y_train.numpy().copy()
    planted = rng.choice(len(given), size=len(given) // 10, replace=False)
    given[planted] = (given[planted] + rng.integers(1, 10, len(planted))) % 10
    is_planted = np.zeros(len(given), dtype=bool)
    is_planted[planted] = True
    return data.x_train, given, is_planted


def digits_context(x, given, map_shards=serial_map) -> DetectionContext:
    return DetectionContext(model=torch.nn.Identity(), x_train=x, labels=given, num_classes=10, model_name="mlp",
                            model_params={"hidden": 64, "depth": 1}, map_shards=map_shards,
                            train_config=TrainConfig(epochs=20, batch_size=32, lr=3e-3, device="cpu"))


@pytest.fixture(scope="module")
def flipped_context(flipped_digits):
    x, given, _ = flipped_digits
    return digits_context(x, given)


@pytest.mark.parametrize("rank_by", RANKINGS)
def test_confident_learning_ranks_planted_flips_first(flipped_context, flipped_digits, rank_by):
    _, _, is_planted = flipped_digits
    detection = confident_learning(flipped_context, seed=0, rank_by=rank_by)
    assert roc_auc_score(is_planted, detection.scores) > 0.9
    assert detection.scores.dtype == np.float64 and np.isfinite(detection.scores).all()


@pytest.mark.parametrize("filter_by", FILTERS)
def test_confident_learning_flags_most_planted_flips(flipped_context, flipped_digits, filter_by):
    _, _, is_planted = flipped_digits
    detection = confident_learning(flipped_context, seed=0, filter_by=filter_by)
    flagged = detection.flagged
    assert flagged.dtype == bool
    # cleanlab's own mask on the same fold predictions, and scores that agree with it
    predictions = flipped_context.cache[("confident_learning.cross_val_pred_probs", 5, 0)]
    np.testing.assert_array_equal(flagged, find_label_issues(flipped_context.labels, predictions.pred_probs,
                                                             filter_by=filter_by, n_jobs=1))
    assert detection.scores[flagged].min() >= detection.scores[~flagged].max()
    assert flagged[is_planted].mean() >= 0.8  # recall
    assert is_planted[flagged].mean() >= 0.5  # precision (chance: 0.1)


class TrainingRecorder:
    """Wraps train_model and predict_logits; keeps each model alive so identities stay unique."""

    def __init__(self, x: torch.Tensor):
        self.row_of = {x[i].numpy().tobytes(): i for i in range(len(x))}
        assert len(self.row_of) == len(x), "test data must have distinct rows"
        self.trained, self.predicted = [], []

    def rows(self, x: torch.Tensor) -> set:
        return {self.row_of[r.numpy().tobytes()] for r in x.cpu()}

    def install(self, monkeypatch):
        real_train, real_predict = cl.train_model, cl.predict_logits

        def train(model, x, y, config, **kwargs):
            self.trained.append((model, self.rows(x)))
            return real_train(model, x, y, config, **kwargs)

        def predict(model, x, *args, **kwargs):
            self.predicted.append((model, self.rows(x)))
            return real_predict(model, x, *args, **kwargs)

        monkeypatch.setattr(cl, "train_model", train)
        monkeypatch.setattr(cl, "predict_logits", predict)


def blob_images(n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n // 3)
    x = torch.as_tensor(3.0 * np.eye(3, 6)[labels] + rng.standard_normal((n, 6)), dtype=torch.float32)
    return x.reshape(n, 1, 1, 6), labels


def test_no_sample_is_scored_by_a_model_that_trained_on_it(monkeypatch):
    x, labels = blob_images()
    recorder = TrainingRecorder(x)
    recorder.install(monkeypatch)
    context = DetectionContext(model=torch.nn.Identity(), x_train=x, labels=labels, num_classes=3,
                               model_name="mlp", model_params={"hidden": 8, "depth": 1},
                               train_config=TrainConfig(epochs=2, batch_size=16, device="cpu"))
    detection = confident_learning(context, seed=1, folds=4)
    predictions = context.cache[("confident_learning.cross_val_pred_probs", 4, 1)]
    assert len(recorder.trained) == len(recorder.predicted) == 4
    everything = set(range(len(x)))
    predicted_by = {}
    for model, predicted in recorder.predicted:
        trained = next(rows for m, rows in recorder.trained if m is model)
        assert not predicted & trained  # the independent check: no leak
        assert predicted | trained == everything  # and the model used all the rest
        for i in predicted:
            assert i not in predicted_by
            predicted_by[i] = model
    assert set(predicted_by) == everything
    for i, model in predicted_by.items():
        # row i of pred_probs is that model's output, and fold_of groups samples by model
        probs = torch.softmax(model(x[i:i + 1]).double(), 1).detach().numpy()[0]
        np.testing.assert_allclose(predictions.pred_probs[i], probs, rtol=0, atol=1e-6)
        same_fold = np.flatnonzero(detection.extras["fold_of"] == detection.extras["fold_of"][i])
        assert all(predicted_by[j] is model for j in same_fold)
    for fold, trained_on in enumerate(predictions.train_indices):
        np.testing.assert_array_equal(trained_on, np.flatnonzero(predictions.fold_of != fold))


def test_other_filters_and_rankings_reuse_the_fold_models(monkeypatch, flipped_digits):
    x, given, _ = flipped_digits
    calls = []
    real_train = cl.train_model
    monkeypatch.setattr(cl, "train_model", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    context = digits_context(x[:150], given[:150])
    context.train_config = TrainConfig(epochs=1, batch_size=64, device="cpu")
    first = confident_learning(context, seed=0, folds=3)
    second = confident_learning(context, seed=0, folds=3, filter_by="both", rank_by="normalized_margin")
    assert len(calls) == 3
    np.testing.assert_array_equal(first.extras["fold_of"], second.extras["fold_of"])
    confident_learning(context, seed=0, folds=2)  # a new split needs new models
    confident_learning(context, seed=5, folds=3)  # and so does a new seed
    assert len(calls) == 3 + 2 + 3


def test_map_shards_gets_one_shard_per_fold_and_matches_serial(flipped_digits):
    x, given, _ = flipped_digits
    x, given = x[:150], given[:150]
    seen = []

    def like_ray(fn, shared, shards):
        """Serialise what goes to the workers, run the folds out of order, return in fold order."""
        seen.append(list(shards))
        fn, shared = pickle.loads(pickle.dumps((fn, shared)))
        done = {shard: fn(shared, shard) for shard in reversed(list(shards))}
        return [done[shard] for shard in shards]

    kwargs = dict(num_classes=10, model_name="mlp", model_params={"hidden": 16, "depth": 1},
                  train_config=TrainConfig(epochs=2, batch_size=32, device="cpu"), folds=3, seed=4)
    serial = cross_val_pred_probs(x, given, **kwargs)
    parallel = cross_val_pred_probs(x, given, map_shards=like_ray, **kwargs)
    assert seen == [[0, 1, 2]]
    np.testing.assert_array_equal(parallel.pred_probs, serial.pred_probs)
    np.testing.assert_array_equal(parallel.fold_of, serial.fold_of)
    assert np.isfinite(serial.pred_probs).all()
    np.testing.assert_allclose(serial.pred_probs.sum(1), 1.0, rtol=0, atol=1e-9)


def test_folds_are_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [20, 21, 22, 23])
    fold_of = assign_folds(labels, 5, seed=0)
    for c in range(4):
        per_fold = np.bincount(fold_of[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    np.testing.assert_array_equal(fold_of, assign_folds(labels, 5, seed=0))
    assert not np.array_equal(fold_of, assign_folds(labels, 5, seed=1))


# ----------------------------------------------------------------------------- registration

def test_bad_parameters_are_rejected_with_the_key():
    (error,) = DETECTORS.get("knn").check_params("detectors[0].params", {"k": 0})
    assert error.startswith("detectors[0].params.k must be an int") and error.endswith("got 0")
    assert DETECTORS.get("knn").check_params("d", {"k": 1}) == []
    errors = DETECTORS.get("confident_learning").check_params("d", {"filter_by": "prune", "folds": 1})
    assert len(errors) == 2 and "d.filter_by" in errors[0] and "d.folds" in errors[1]
