"""cleanlab's decision in the label-noise detectors: the same flags as calling cleanlab directly, and scores
that agree with them (every flagged sample scores at least as high as every unflagged one)."""

import numpy as np
import pytest
from cleanlab.filter import find_label_issues
from sklearn.neighbors import NearestNeighbors

from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.detect.base import DETECTORS, DetectionContext
from poisonsweep.tasks.detect.label_issues import cleanlab_flags, lift_flagged
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.poisons import apply_poison
from poisonsweep.tasks.train import TrainConfig, train_model


def test_lift_flagged_by_hand():
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.3])
    flagged = np.array([True, False, True, False, False])
    lifted = lift_flagged(scores, flagged)
    # shift = max unflagged (0.9) - min flagged (0.1) = 0.8, added to the flagged only
    np.testing.assert_allclose(lifted, [0.9, 0.9, 1.3, 0.2, 0.3])
    assert lifted[flagged].min() >= lifted[~flagged].max()
    # already consistent, nothing flagged, everything flagged: unchanged
    np.testing.assert_array_equal(lift_flagged(scores, scores >= 0.5), scores)
    np.testing.assert_array_equal(lift_flagged(scores, np.zeros(5, bool)), scores)
    np.testing.assert_array_equal(lift_flagged(scores, np.ones(5, bool)), scores)


@pytest.fixture(scope="module")
def one_shift_digits():
    data = load_dataset("digits", seed=0)
    poisoned = apply_poison(data, "one_shift", rate=0.1, seed=0, params={"shift": 1})
    model = build_model("mlp", data.in_shape, 10, {"hidden": 64}, seed=0)
    train = TrainConfig(epochs=10, batch_size=32, lr=1e-3, device="cpu")
    train_model(model, poisoned.x_train, poisoned.labels, train, seed=0)
    context = DetectionContext(model=model, x_train=poisoned.x_train, labels=poisoned.labels.numpy(), num_classes=10,
                               model_name="mlp", model_params={"hidden": 64}, train_config=train)
    return context, poisoned.is_poison


def assert_contract(detection):
    assert detection.scores[detection.flagged].min() >= detection.scores[~detection.flagged].max()


@pytest.mark.parametrize("name", ["loss", "influence"])
def test_model_probability_detectors_flag_what_cleanlab_flags(one_shift_digits, name):
    context, is_poison = one_shift_digits
    detection = DETECTORS.get(name).fn(context, seed=0)
    expected = find_label_issues(context.labels, context.pred_probs, filter_by="prune_by_noise_rate", n_jobs=1)
    np.testing.assert_array_equal(detection.flagged, expected)
    assert_contract(detection)
    assert is_poison[detection.flagged].mean() >= 0.5


def test_loss_lift_keeps_the_loss_order_inside_each_group(one_shift_digits):
    context, _ = one_shift_digits
    detection = DETECTORS.get("loss").fn(context, seed=0)
    for group in (detection.flagged, ~detection.flagged):
        np.testing.assert_array_equal(np.argsort(detection.scores[group], kind="stable"),
                                      np.argsort(context.losses[group], kind="stable"))


@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "both", "predicted_neq_given"])
def test_loss_passes_the_filter_on(one_shift_digits, filter_by):
    context, _ = one_shift_digits
    detection = DETECTORS.get("loss").fn(context, seed=0, filter_by=filter_by)
    np.testing.assert_array_equal(detection.flagged, cleanlab_flags(context.labels, context.pred_probs, filter_by))
    assert_contract(detection)


def test_knn_cleanlab_rule_is_cleanlab_on_brute_force_vote_shares(one_shift_digits):
    context, _ = one_shift_digits
    k = 10
    _, neighbours = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(context.features).kneighbors()
    shares = np.stack([(context.labels[neighbours] == c).mean(axis=1) for c in range(10)], axis=1)
    detection = DETECTORS.get("knn").fn(context, seed=0, k=k, flag_rule="cleanlab")
    np.testing.assert_array_equal(detection.flagged, find_label_issues(context.labels, shares, n_jobs=1))
    assert_contract(detection)


@pytest.mark.parametrize("flag_rule", ["auto", "plurality"])
def test_knn_other_rules_keep_the_contract(one_shift_digits, flag_rule):
    detection = DETECTORS.get("knn").fn(one_shift_digits[0], seed=0, flag_rule=flag_rule)
    assert_contract(detection)


def test_unknown_filter_is_refused():
    with pytest.raises(ValueError, match="filter_by"):
        cleanlab_flags(np.zeros(3, int), np.full((3, 2), 0.5), "by_magic")
