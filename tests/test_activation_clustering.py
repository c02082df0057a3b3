"""Activation clustering's exclusionary reclassification: the decision rule on known answers, the
whole detector on planted activations, and on a CNN trained on poisoned digits, with floors that
flagging the wrong cluster of a class would fail."""

import numpy as np
import pytest
import torch
from torch import nn

from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.detect.activation_clustering import ClassSplit, activation_clustering, judge_by_reclassification
from poisonsweep.tasks.detect.base import DetectionContext
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.poisons import apply_poison
from poisonsweep.tasks.train import TrainConfig, train_model


def split_of(in_small: list[bool]) -> ClassSplit:
    in_small = np.array(in_small)
    return ClassSplit(in_small, np.zeros(len(in_small)), in_small.mean(), float("nan"))


# ---------------------------------------------------------------- the decision on known predictions

def test_a_small_cluster_predicted_as_another_label_is_flagged():
    split = split_of([True] * 2 + [False] * 6)
    predicted = np.array([3, 3, 0, 0, 0, 0, 0, 3])  # label 0; one big-cluster member is misread
    np.testing.assert_array_equal(judge_by_reclassification(predicted, 0, split.in_small), split.in_small)


def test_a_large_cluster_predicted_as_another_label_is_flagged_not_the_smaller_one():
    # the poisons are the majority of their class: the size rules would flag the clean cluster
    split = split_of([True] * 3 + [False] * 5)
    predicted = np.array([0, 0, 0, 4, 4, 4, 4, 0])
    np.testing.assert_array_equal(judge_by_reclassification(predicted, 0, split.in_small), ~split.in_small)


def test_a_cluster_with_half_its_members_predicted_as_their_label_is_poisonous():
    split = split_of([True] * 4 + [False] * 6)
    predicted = np.array([0, 0, 7, 7, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(judge_by_reclassification(predicted, 0, split.in_small), split.in_small)


@pytest.mark.parametrize("predicted", [[0, 0, 0, 0, 0, 0], [1, 2, 1, 1, 2, 1]])
def test_nothing_is_flagged_when_both_clusters_agree(predicted):
    # both predicted as their label: a clean class; both as others: a class the vote cannot judge
    split = split_of([True] * 2 + [False] * 4)
    assert not judge_by_reclassification(np.array(predicted), 0, split.in_small).any()


# ---------------------------------------------------------------- the detector on planted activations

def blobs(rng: np.random.Generator, counts: list[int], dim: int = 16, gap: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs, one per content, ``gap`` apart along their own axis; returns points and content."""
    content = np.repeat(np.arange(len(counts)), counts)
    points = rng.normal(size=(len(content), dim))
    points[np.arange(len(content)), content] += gap
    return points, content


def context_for(features: np.ndarray, labels: np.ndarray, inputs: np.ndarray | None = None) -> DetectionContext:
    inputs = features if inputs is None else inputs
    context = DetectionContext(model=nn.Identity(), x_train=torch.as_tensor(inputs, dtype=torch.float32),
                               labels=labels, num_classes=int(labels.max()) + 1)
    context.features = features
    return context


@pytest.mark.parametrize("n_poison", [150, 20])
@pytest.mark.parametrize("representation", ["input", "features"])
def test_flags_exactly_the_planted_flips_whether_they_are_the_majority_of_their_class_or_few(n_poison, representation):
    # content 0: 100 samples; content 1: 400, of which n_poison are labelled 0 (150: 60 % of label 0,
    # and fewer than the 250 left under label 1, so the content still belongs to label 1)
    rng = np.random.default_rng(0)
    features, content = blobs(rng, [100, 400, 200])
    labels = content.copy()
    poison = np.zeros(len(labels), dtype=bool)
    poison[rng.choice(np.flatnonzero(content == 1), n_poison, replace=False)] = True
    labels[poison] = 0
    result = activation_clustering(context_for(features, labels), seed=0, representation=representation)
    np.testing.assert_array_equal(result.flagged, poison)
    assert result.scores[poison].min() > result.scores[~poison].max()


def test_input_space_vote_finds_a_trigger_the_activations_map_onto_the_target():
    # a learned backdoor: in the activations the 150 triggered samples (contents 1 and 2, labelled 0)
    # sit together in a place of their own; in the inputs they sit with their source contents
    rng = np.random.default_rng(1)
    inputs, content = blobs(rng, [150, 300, 300])
    labels = content.copy()
    triggered = np.zeros(len(labels), dtype=bool)
    triggered[rng.choice(np.flatnonzero(content > 0), 150, replace=False)] = True
    labels[triggered] = 0
    features = inputs.copy()
    features[triggered] = rng.normal(size=(150, inputs.shape[1])) + 10.0 * np.eye(inputs.shape[1])[5]
    by_input = activation_clustering(context_for(features, labels, inputs), seed=0)
    np.testing.assert_array_equal(by_input.flagged, triggered)
    by_features = activation_clustering(context_for(features, labels, inputs), seed=0, representation="features")
    assert not by_features.flagged.any()  # the triggered group votes for its own label


def test_classes_too_small_to_cluster_are_scored_but_not_flagged():
    rng = np.random.default_rng(2)
    features, content = blobs(rng, [200, 200, 5])
    labels = content.copy()
    labels[-5:] = 0  # five samples of content 2 labelled 0 ...
    labels[-2:] = 2  # ... and class 2 keeps only 2 samples, too few for 10 components
    result = activation_clustering(context_for(features, labels), seed=0)
    small = labels == 2
    assert not result.flagged[small].any()
    assert np.all((result.scores >= 0) & (result.scores < 2))


# ---------------------------------------------------------------- a CNN trained on poisoned digits

def trained_context(method: str, rate: float, params: dict | None = None):
    data = load_dataset("digits", seed=0)
    poisoned = apply_poison(data, method, rate=rate, seed=0, params=params)
    model = build_model("keras_cnn", data.in_shape, data.num_classes, None, seed=0)
    train_model(model, poisoned.x_train, poisoned.labels, TrainConfig(epochs=20, batch_size=64, device="cpu"), seed=0)
    context = DetectionContext(model=model, x_train=poisoned.x_train, labels=poisoned.labels.numpy(),
                               num_classes=data.num_classes)
    return context, poisoned.is_poison


def precision_recall(flagged: np.ndarray, poison: np.ndarray) -> tuple[float, float]:
    hits = np.count_nonzero(flagged & poison)
    return hits / max(flagged.sum(), 1), hits / poison.sum()


@pytest.mark.slow  # a second or more of training
def test_one_shift_at_a_third_flags_the_poisons_not_the_clean_cluster():
    # a third of every class is the previous digit: its clean cluster holds all its clean examples
    context, poison = trained_context("one_shift", 0.33)
    result = activation_clustering(context, seed=0)
    precision, recall = precision_recall(result.flagged, poison)
    assert precision >= 0.9 and recall >= 0.9  # measured 0.96 / 1.00; the clean clusters would give ~0


@pytest.mark.slow  # a second or more of training
def test_badnets_with_the_target_class_half_poison_flags_the_triggered_cluster():
    # a 1-pixel trigger (a 3x3 patch is 14 % of an 8x8 digit and would dominate the pixel distance)
    context, poison = trained_context("badnets", 0.10, {"target": 0, "mode": "all_to_one", "patch_size": 1})
    assert poison[context.labels == 0].mean() >= 0.5
    result = activation_clustering(context, seed=0)
    precision, recall = precision_recall(result.flagged, poison)
    assert precision >= 0.9 and recall >= 0.75  # measured 0.97 / 0.83; the clean zeros would give ~0.15 / ~0.2


@pytest.mark.slow  # a second or more of training
def test_badnets_at_one_percent_flags_the_few_poisons():
    context, poison = trained_context("badnets", 0.01, {"target": 0, "mode": "all_to_one"})
    result = activation_clustering(context, seed=0)
    precision, recall = precision_recall(result.flagged, poison)
    assert precision >= 0.9 and recall >= 0.75  # measured 1.00 / 0.85


@pytest.mark.slow  # a second or more of training
def test_a_clean_training_set_is_not_flagged():
    context, _ = trained_context("none", 0.0)
    result = activation_clustering(context, seed=0)
    assert result.flagged.mean() <= 0.02  # measured 0: no class has a cluster its neighbours relabel


# ---------------------------------------------------------------- the paper's reclassifier: retrained without the suspects

def mlp_context(method: str, rate: float, params: dict | None = None):
    data = load_dataset("digits", seed=0)
    poisoned = apply_poison(data, method, rate=rate, seed=0, params=params)
    train = TrainConfig(epochs=8, batch_size=32, lr=1e-3, device="cpu")
    model = build_model("mlp", data.in_shape, data.num_classes, {"hidden": 64}, seed=0)
    train_model(model, poisoned.x_train, poisoned.labels, train, seed=0)
    context = DetectionContext(model=model, x_train=poisoned.x_train, labels=poisoned.labels.numpy(),
                               num_classes=data.num_classes, model_name="mlp", model_params={"hidden": 64},
                               train_config=train)
    return context, poisoned.is_poison


@pytest.fixture(scope="module")
def one_shift_third():
    return mlp_context("one_shift", 0.33)


def test_retrained_reclassifier_flags_one_shift_poisons_at_a_third(one_shift_third):
    context, poison = one_shift_third
    result = activation_clustering(context, seed=0, reclassifier="retrain")
    precision, recall = precision_recall(result.flagged, poison)
    assert precision >= 0.8 and recall >= 0.8
    assert result.scores[result.flagged].min() >= result.scores[~result.flagged].max()


def test_retrained_reclassifier_never_trains_on_a_flagged_sample(one_shift_third, monkeypatch):
    import poisonsweep.tasks.detect.activation_clustering as ac

    context, _ = one_shift_third
    context.cache.clear()
    seen = []
    real_train = ac.train_model
    monkeypatch.setattr(ac, "train_model", lambda model, x, y, *a, **kw: (seen.append(x), real_train(model, x, y, *a, **kw)))
    result = activation_clustering(context, seed=0, reclassifier="retrain")
    assert len(seen) == 1 and len(seen[0]) < len(context.labels)
    trained = {row.numpy().tobytes() for row in seen[0]}
    flagged_inputs = {row.numpy().tobytes() for row in context.x_train[torch.as_tensor(result.flagged)]}
    assert not trained & flagged_inputs  # the flags come from a model that never saw them
