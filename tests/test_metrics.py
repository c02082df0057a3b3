"""Detection metrics against values counted by hand and brute-force pair counting."""

import math

import numpy as np
import pytest

from poisonsweep.tasks.metrics import detection_metrics, found_vs_checked

# six samples; poisons score 0.9, 0.8, 0.2 and clean samples 0.8, 0.3, 0.1 (one tied pair)
SCORES = np.array([0.9, 0.8, 0.8, 0.3, 0.2, 0.1])
IS_POISON = np.array([True, False, True, False, True, False])
FLAGGED = np.array([True, True, False, False, False, False])


def test_six_samples_by_hand():
    m = detection_metrics(SCORES, FLAGGED, IS_POISON)
    # poison-clean pairs won: 0.9 beats 3; 0.8 ties one (1/2) and beats 2; 0.2 beats 1 -> 6.5 of 9
    assert m["auroc"] == pytest.approx(6.5 / 9)
    # thresholds 0.9, 0.8, 0.3, 0.2, 0.1 -> (recall, precision) = (1/3, 1), (2/3, 2/3), (2/3, 1/2),
    # (1, 3/5), (1, 1/2); AP = sum of recall steps times precision = 1/3 + 2/9 + 1/5
    assert m["auprc"] == pytest.approx(1 / 3 + 2 / 9 + 1 / 5)
    # flags: TP 1 (index 0), FP 1 (index 1), FN 2
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))
    assert m["n_flagged"] == 2 and isinstance(m["n_flagged"], int)
    # 5 % of 6 -> 0 checked; 10 % and 20 % -> round(0.6) = round(1.2) = 1 checked: index 0, a poison
    assert (m["recall_at_5"], m["recall_at_10"], m["recall_at_20"]) == pytest.approx((0, 1 / 3, 1 / 3))


def test_found_vs_checked_breaks_ties_by_index():
    # order: 0 (poison), then the tie 1 (clean) before 2 (poison), 3, 4 (poison), 5
    found = found_vs_checked(SCORES, IS_POISON, [0, 1 / 6, 2 / 6, 3 / 6, 5 / 6, 1])
    np.testing.assert_allclose(found, [0, 1 / 3, 1 / 3, 2 / 3, 1, 1])


def test_recall_at_counts_poisons_in_the_top_share_by_score_not_by_index():
    rng = np.random.default_rng(0)
    n = 40
    rank_of_index = rng.permutation(n)  # index i has the rank_of_index[i]-th highest score
    scores = 1.0 - rank_of_index / n
    is_poison = np.isin(rank_of_index, [0, 3, 5, 9, 30])
    m = detection_metrics(scores, np.zeros(n, bool), is_poison)
    # top 2 (5 %) hold rank 0; top 4 (10 %) ranks 0, 3; top 8 (20 %) ranks 0, 3, 5
    assert (m["recall_at_5"], m["recall_at_10"], m["recall_at_20"]) == pytest.approx((1 / 5, 2 / 5, 3 / 5))


def test_auroc_equals_brute_force_pair_count_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=50).astype(float)  # many ties
    is_poison = rng.random(50) < 0.3
    poison, clean = scores[is_poison], scores[~is_poison]
    wins = sum((p > c) + 0.5 * (p == c) for p in poison for c in clean)
    m = detection_metrics(scores, scores > 3, is_poison)
    assert m["auroc"] == pytest.approx(wins / (len(poison) * len(clean)))


def test_perfect_detector():
    is_poison = np.array([False, True, False, True, False])
    scores = is_poison.astype(float)
    m = detection_metrics(scores, is_poison, is_poison)
    assert m["auroc"] == 1 and m["auprc"] == 1
    assert m["precision"] == m["recall"] == m["f1"] == 1
    assert m["recall_at_20"] == 0.5  # round(0.2 * 5) = 1 sample checked, 1 of 2 poisons


def test_no_poisons_gives_nan_for_ranking_metrics_and_recall():
    m = detection_metrics(np.array([0.3, 0.2, 0.1]), np.array([True, False, False]), np.zeros(3, bool))
    for key in ("auroc", "auprc", "recall", "recall_at_5", "recall_at_10", "recall_at_20"):
        assert math.isnan(m[key]), key
    assert m["precision"] == 0 and m["f1"] == 0 and m["n_flagged"] == 1


def test_only_poisons_gives_nan_auroc_and_auprc():
    m = detection_metrics(np.array([0.3, 0.2, 0.1]), np.array([True, False, False]), np.ones(3, bool))
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"])
    assert m["precision"] == 1 and m["recall"] == pytest.approx(1 / 3)


def test_no_flags_gives_nan_precision_and_zero_f1():
    m = detection_metrics(SCORES, np.zeros(6, bool), IS_POISON)
    assert math.isnan(m["precision"]) and m["recall"] == 0 and m["f1"] == 0 and m["n_flagged"] == 0
    m = detection_metrics(SCORES, np.zeros(6, bool), np.zeros(6, bool))
    assert math.isnan(m["precision"]) and math.isnan(m["recall"]) and math.isnan(m["f1"])


def test_found_vs_checked_without_poisons_is_nan():
    assert np.isnan(found_vs_checked(SCORES, np.zeros(6, bool), [0.1, 0.5])).all()


@pytest.mark.parametrize("scores, flagged, is_poison, message", [
    (np.array([0.1, np.nan]), np.zeros(2, bool), np.zeros(2, bool), "finite"),
    (np.array([0.1, 0.2]), np.zeros(3, bool), np.zeros(2, bool), "flagged"),
    (np.array([0.1, 0.2]), np.zeros(2, bool), np.array([0, 1]), "is_poison"),
    (np.zeros((2, 2)), np.zeros(2, bool), np.zeros(2, bool), "shape"),
])
def test_bad_inputs_are_rejected(scores, flagged, is_poison, message):
    with pytest.raises(ValueError, match=message):
        detection_metrics(scores, flagged, is_poison)


def test_fractions_outside_unit_interval_are_rejected():
    with pytest.raises(ValueError, match="fractions"):
        found_vs_checked(SCORES, IS_POISON, [1.5])
