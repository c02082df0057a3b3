"""Activation clustering, spectral signatures and the loss detector against planted signal,
brute-force linear algebra and hand-computed values."""


import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from poisonsweep.tasks.detect import activation_clustering as ac_module  # noqa: F401  (registers the detectors)
from poisonsweep.tasks.detect import loss as loss_module  # noqa: F401
from poisonsweep.tasks.detect import spectral as spectral_module  # noqa: F401
from poisonsweep.tasks.detect.activation_clustering import ClassSplit, activation_clustering, is_poison_cluster
from poisonsweep.tasks.detect.base import DETECTORS, DetectionContext
from poisonsweep.tasks.detect.loss import loss
from poisonsweep.tasks.detect.spectral import spectral_scores, spectral_signature
from poisonsweep.tasks.models import SplitModel, build_model
from poisonsweep.tasks.train import TrainConfig, train_model

RTOL = 1e-9
OUR_DETECTORS = ("activation_clustering", "spectral_signature", "loss", "abl_isolation")


def context_with_features(features: np.ndarray, labels: np.ndarray) -> DetectionContext:
    """A context whose cached ``features`` are preset, so no model is trained or run."""
    context = DetectionContext(model=nn.Identity(), x_train=torch.zeros(len(labels), 1), labels=labels,
                               num_classes=int(labels.max()) + 1)
    context.features = features
    return context


def planted_cluster_data(seed: int, n_per_class: int = 200, dim: int = 32, share: float = 0.2):
    """Three Gaussian classes; in class 0 a `share` of samples is shifted along one direction."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    features = rng.normal(size=(len(labels), dim))
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    planted = np.zeros(len(labels), dtype=bool)
    planted[rng.choice(n_per_class, int(share * n_per_class), replace=False)] = True  # inside class 0
    features[planted] += 8.0 * direction
    features[labels == 1] *= 3.0  # classes on different scales must not matter
    return features, labels, planted


# ---------------------------------------------------------------- activation clustering

def test_preset_features_are_used_instead_of_the_model():
    features = np.arange(6.0).reshape(3, 2)
    context = context_with_features(features, np.array([0, 0, 1]))
    assert context.features is features


# FastICA cannot converge on the 9 Gaussian (non-identifiable) components of this data; expected
@pytest.mark.filterwarnings("ignore:FastICA did not converge")
@pytest.mark.parametrize("reduce", ["pca", "ica"])
@pytest.mark.parametrize("analysis", ["relative_size", "silhouette"])
def test_activation_clustering_flags_exactly_the_planted_cluster(reduce, analysis):
    features, labels, planted = planted_cluster_data(seed=0)
    result = activation_clustering(context_with_features(features, labels), seed=0, reduce=reduce, analysis=analysis)
    np.testing.assert_array_equal(result.flagged, planted)  # clean classes 1 and 2 flag nothing
    assert roc_auc_score(planted, result.scores) > 0.95
    # scores are comparable across classes: every planted sample outranks every sample of a clean class
    assert result.scores[planted].min() > result.scores[labels != 0].max()


def test_smaller_analysis_flags_a_cluster_in_every_class():
    features, labels, planted = planted_cluster_data(seed=1)
    result = activation_clustering(context_with_features(features, labels), seed=0, analysis="smaller")
    assert np.all(result.flagged[planted])
    for label in range(3):
        n_flagged = result.flagged[labels == label].sum()
        assert 0 < n_flagged <= 100  # the smaller of two clusters of 200 samples


def test_size_analyses_follow_the_thresholds():
    def split(fraction, silhouette):
        return ClassSplit(np.zeros(4, bool), np.zeros(4), fraction, silhouette)

    thresholds = {"size_threshold": 0.35, "silhouette_threshold": 0.10}
    assert is_poison_cluster(split(0.2, 0.05), analysis="relative_size", **thresholds)
    assert not is_poison_cluster(split(0.2, 0.05), analysis="silhouette", **thresholds)
    assert is_poison_cluster(split(0.2, 0.30), analysis="silhouette", **thresholds)
    assert not is_poison_cluster(split(0.4, 0.90), analysis="relative_size", **thresholds)
    assert not is_poison_cluster(split(0.4, 0.90), analysis="silhouette", **thresholds)
    assert is_poison_cluster(split(0.5, 0.0), analysis="smaller", **thresholds)


def test_activation_clustering_scores_match_hand_computed_margins():
    # one class on a line: 8 points near 0 and 2 near 10, so the 2-means centres are 0 and 10,
    # the small cluster holds 0.2 of the class, and score = flagged + 0.6 * (1 + margin) / 2 with
    # margin = (|x - 0| - |x - 10|) / 10
    x = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, -0.25, 0.25, 0.0, 9.0, 11.0])
    features = np.stack([x, np.zeros_like(x)], axis=1)
    result = activation_clustering(context_with_features(features, np.zeros(10, int)), seed=0, n_components=2,
                                   analysis="relative_size")
    margin = (np.abs(x) - np.abs(x - 10.0)) / 10.0
    np.testing.assert_allclose(result.scores, (x > 5) + 0.6 * (1 + margin) / 2, rtol=RTOL, atol=1e-12)
    np.testing.assert_array_equal(result.flagged, x > 5)


def test_activation_clustering_skips_classes_it_cannot_cluster():
    rng = np.random.default_rng(0)
    features, labels, planted = planted_cluster_data(seed=2)
    tiny = rng.normal(size=(10, features.shape[1]))  # 10 samples < n_components + 1
    identical = np.tile(rng.normal(size=features.shape[1]), (30, 1))
    rounding_apart = identical * (1 + 1e-15 * rng.integers(-2, 3, size=identical.shape))
    all_features = np.concatenate([features, tiny, identical, rounding_apart])
    all_labels = np.concatenate([labels, np.full(10, 3), np.full(30, 4), np.full(30, 5)])
    result = activation_clustering(context_with_features(all_features, all_labels), seed=0, analysis="relative_size")
    skipped = all_labels >= 3
    assert np.all(result.scores[skipped] == 0) and not result.flagged[skipped].any()
    np.testing.assert_array_equal(result.flagged[:len(planted)], planted)


@pytest.mark.filterwarnings("ignore:FastICA did not converge")
def test_ica_copes_with_fewer_live_units_than_components():
    # 4 live units out of 32 (dead ReLUs): FastICA must reduce to 4 dims, not divide by zero
    rng = np.random.default_rng(3)
    features = np.zeros((150, 32))
    features[:, :4] = rng.normal(size=(150, 4))
    planted = np.arange(150) < 30
    features[planted, 0] += 8.0
    result = activation_clustering(context_with_features(features, np.zeros(150, int)), seed=0, reduce="ica",
                                   analysis="relative_size")
    assert np.all(np.isfinite(result.scores))
    np.testing.assert_array_equal(result.flagged, planted)


# ---------------------------------------------------------------- spectral signatures

def brute_force_tau(features: np.ndarray) -> np.ndarray:
    """The paper's score from a full numpy SVD: ((R_i - mean) . v)^2."""
    centred = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return (centred @ vt[0]) ** 2


def test_spectral_scores_equal_brute_force_svd():
    rng = np.random.default_rng(0)
    # class 0 has more samples than dimensions, class 1 fewer (the other Gram-matrix branch)
    features = np.concatenate([rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8)), rng.normal(size=(5, 8))])
    labels = np.array([0] * 60 + [1] * 5)
    raw = spectral_scores(features, labels, normalize=False)
    normalized = spectral_scores(features, labels)
    for label in (0, 1):
        members = labels == label
        tau = brute_force_tau(features[members])
        sigma_sq = np.linalg.svd(features[members] - features[members].mean(0), compute_uv=False)[0] ** 2
        np.testing.assert_allclose(raw[members], tau, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(normalized[members], tau * members.sum() / sigma_sq, rtol=1e-8, atol=1e-10)


def test_spectral_ranks_the_planted_direction_first_and_flags_it():
    rng = np.random.default_rng(1)
    n, dim, n_planted = 200, 20, 20
    features = rng.normal(size=(n, dim))
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    planted = np.zeros(n, dtype=bool)
    planted[rng.choice(n, n_planted, replace=False)] = True
    features[planted] += 10.0 * direction
    result = spectral_signature(context_with_features(features, np.zeros(n, int)), seed=0, flag_rule="fraction",
                                eps=0.1)
    top = np.argsort(-result.scores)[:n_planted]
    assert set(top) == set(np.flatnonzero(planted))
    assert result.flagged.sum() == 30 and result.flagged[planted].all()  # 1.5 * 0.1 * 200 = 30


@pytest.mark.parametrize("eps, expected", [(0.1, {0: 6, 1: 15, 2: 1}), (0.05, {0: 3, 1: 8, 2: 1}),
                                           (0.3, {0: 17, 1: 45, 2: 3})])
def test_spectral_flags_round_of_one_and_a_half_eps_per_class(eps, expected):
    # class sizes 37, 100, 7: 1.5*eps*n = 5.55, 15, 1.05 | 2.775, 7.5, 0.525 | 16.65, 45, 3.15
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1, 2], [37, 100, 7])
    result = spectral_signature(context_with_features(rng.normal(size=(len(labels), 6)), labels), seed=0,
                                flag_rule="fraction", eps=eps)
    assert {c: int(result.flagged[labels == c].sum()) for c in range(3)} == expected


def test_spectral_normalisation_removes_class_scale_but_keeps_ranking():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(80, 5))
    labels = np.repeat([0, 1], 40)
    scaled = features.copy()
    scaled[labels == 1] *= 1000.0
    np.testing.assert_allclose(spectral_scores(scaled, labels), spectral_scores(features, labels), rtol=1e-8)
    np.testing.assert_allclose(spectral_scores(scaled, labels, normalize=False)[labels == 1],
                               1e6 * spectral_scores(features, labels, normalize=False)[labels == 1], rtol=1e-8)
    members = labels == 0
    assert np.array_equal(np.argsort(spectral_scores(features, labels)[members]),
                          np.argsort(brute_force_tau(features[members])))


def test_spectral_gives_classes_without_spread_zero_and_no_flags():
    rng = np.random.default_rng(4)
    features = np.concatenate([rng.normal(size=(20, 4)), np.full((6, 4), 0.1), rng.normal(size=(1, 4))])
    labels = np.array([0] * 20 + [1] * 6 + [2])
    result = spectral_signature(context_with_features(features, labels), seed=0, flag_rule="fraction", eps=0.3)
    assert np.all(result.scores[labels > 0] == 0) and not result.flagged[labels > 0].any()
    assert result.flagged[labels == 0].sum() == 9  # round(1.5 * 0.3 * 20)


# ---------------------------------------------------------------- loss

def test_loss_detector_equals_hand_computed_cross_entropy():
    torch.manual_seed(0)
    model = SplitModel(nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.randn(6, 1, 2, 2, dtype=torch.float64)
    labels = np.array([0, 1, 2, 0, 1, 2])
    context = DetectionContext(model=model, x_train=x, labels=labels, num_classes=3)
    result = loss(context, seed=0, flag_rule="fraction", flag_fraction=0.5)

    weight = model.head.weight.detach().numpy()
    bias = model.head.bias.detach().numpy()
    logits = x.reshape(6, 4).numpy() @ weight.T + bias
    shift = logits.max(1, keepdims=True)
    log_normaliser = shift[:, 0] + np.log(np.exp(logits - shift).sum(1))
    expected = log_normaliser - logits[np.arange(6), labels]
    np.testing.assert_allclose(result.scores, expected, rtol=1e-6)
    assert set(np.flatnonzero(result.flagged)) == set(np.argsort(-expected)[:3])


# ---------------------------------------------------------------- registry and a real model

@pytest.fixture(scope="module")
def tiny_trained_mlp():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(150, 1, 8, 8, generator=generator)
    labels = np.repeat(np.arange(3), 50)
    model = build_model("mlp", (1, 8, 8), 3, {"hidden": 16}, seed=0)
    history = train_model(model, x, torch.as_tensor(labels), TrainConfig(epochs=2, batch_size=32, device="cpu"), seed=0)
    return model, x, labels, history.sample_losses


@pytest.mark.parametrize("name", OUR_DETECTORS)
def test_detectors_on_a_real_model_are_well_formed_and_deterministic(tiny_trained_mlp, name):
    model, x, labels, sample_losses = tiny_trained_mlp
    runs = [DETECTORS.get(name).fn(DetectionContext(model=model, x_train=x, labels=labels, num_classes=3,
                                                    sample_losses=sample_losses), seed=7)
            for _ in range(2)]
    for run in runs:
        assert run.scores.shape == (150,) and run.scores.dtype == np.float64
        assert np.all(np.isfinite(run.scores))
        assert run.flagged.shape == (150,) and run.flagged.dtype == bool
    np.testing.assert_array_equal(runs[0].scores, runs[1].scores)
    np.testing.assert_array_equal(runs[0].flagged, runs[1].flagged)
