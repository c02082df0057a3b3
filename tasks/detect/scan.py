"""SCAn (Tang, Wang, Tang & Zhang, "Demon in the Variant: Statistical Analysis of DNNs for Robust
Backdoor Contamination Detection", USENIX Security 2021).

Every representation is modelled as r = μ_y + ε, an identity part μ_y ~ N(0, S_μ) shared by a
class plus a within-class variation ε ~ N(0, S_ε) shared by all classes.

1. **Global model**: S_μ and S_ε are estimated over all classes by the paper's EM (the E-step
   takes the posterior mean of each class's identity, the M-step the covariances of identities
   and of residuals).
2. **Local model**: each class is split into two subgroups with means u₁, u₂ under the shared
   S_ε (EM on the linear discriminant 2·xᵀF(u₁ − u₂) > u₁ᵀFu₁ − u₂ᵀFu₂, F = S_ε⁻¹).
3. **Statistic**: the log-likelihood ratio J_y of "two subgroups" against "one identity" for the
   class, per sample; a contaminated class is one whose J is an outlier among the classes:
   the anomaly index J*_y = (J_y/max J − median) / (1.4826·MAD) exceeds e² (≈ 7.39).

Read (not copied) from the SCAn code that BackdoorBench and ``vtu81/backdoor-toolbox`` ship
(``SCAn.build_global_model``, ``build_local_model``, ``find_split``, ``calc_test``,
``calc_anomaly_index``, threshold ``np.exp(2)``), itself from the authors' ``TDteach/Demon-in-the-Variant``.
Differences, all because we have no trusted clean subset: the global model is fitted on the whole
(possibly poisoned) training set; the poison subgroup of a flagged class is the smaller one (the
toolkits pick the one holding fewer clean samples); and a class is flagged only when its
statistic is unusually *large* (the toolkits take |J* |, which would also flag a class whose
statistic is unusually small, i.e. unusually homogeneous).

Per-sample scores are ours (the paper decides per class): p_i (1 + max(J*_y, 0)), where p_i is the
logistic of sample i's discriminant towards its class's smaller subgroup. Within a class they
rank by subgroup membership, across classes by J*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import numpy as np
from scipy.special import expit

from poisonsweep.tasks.detect.base import DETECTORS, Detection, DetectionContext
from poisonsweep.tasks.registry import Interval

__all__ = ["GlobalModel", "fit_global_model", "split_class", "split_statistic", "anomaly_index", "scan"]

THRESHOLD = math.exp(2)  # the paper's and BackdoorBench's cut on the anomaly index
TOLERANCE = 1e-5  # EM convergence (the toolkits' EPS)
MAX_ITERATIONS = 100
MAD_TO_SIGMA = 1.4826


@dataclass
class GlobalModel:
    identity_cov: np.ndarray  # S_μ, (d, d)
    variation_cov: np.ndarray  # S_ε, (d, d)
    precision: np.ndarray  # F = pinv(S_ε)


def _posterior_identity(sums: np.ndarray, count: int, identity_cov: np.ndarray, variation_cov: np.ndarray,
                        precision: np.ndarray) -> np.ndarray:
    """E[μ | the class's samples] = S_ε (n S_μ + S_ε)⁻¹ S_μ F · Σ_i x_i, as in the toolkits' E-step."""
    gain = np.linalg.pinv(count * identity_cov + variation_cov) @ identity_cov @ precision
    return variation_cov @ gain @ sums


def fit_global_model(features: np.ndarray, labels: np.ndarray) -> GlobalModel:
    """S_μ and S_ε by EM over every class (features centred on their overall mean)."""
    x = features - features.mean(axis=0)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, inverse, x)
    identities = sums / counts[:, None]
    identity_cov = np.cov(identities[inverse], rowvar=False)
    variation_cov = np.cov(x - identities[inverse], rowvar=False)
    for _ in range(MAX_ITERATIONS):
        precision = np.linalg.pinv(variation_cov)
        identities = np.stack([_posterior_identity(sums[c], counts[c], identity_cov, variation_cov, precision)
                               for c in range(len(classes))])
        new_identity = np.cov(identities[inverse], rowvar=False)
        new_variation = np.cov(x - identities[inverse], rowvar=False)
        change = np.linalg.norm(new_identity - identity_cov) + np.linalg.norm(new_variation - variation_cov)
        identity_cov, variation_cov = new_identity, new_variation
        if change <= TOLERANCE:
            break
    return GlobalModel(identity_cov, variation_cov, np.linalg.pinv(variation_cov))


def split_class(x: np.ndarray, precision: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two-subgroup EM of one class; True for the members of subgroup 1.

    Starts from a random assignment and alternates subgroup means and the linear discriminant
    until the assignment (or its complement) repeats.
    """
    n = len(x)
    group = rng.random(n) >= 0.5
    if group.all() or not group.any():
        group[0] = not group[0]
    previous = None
    for _ in range(MAX_ITERATIONS):
        if group.all() or not group.any():
            break
        u1, u2 = x[group].mean(axis=0), x[~group].mean(axis=0)
        bias = u1 @ precision @ u1 - u2 @ precision @ u2
        new = bias - 2 * (x @ precision @ (u1 - u2)) < 0
        if previous is not None and (np.array_equal(new, previous) or np.array_equal(new, ~previous)):
            group = new
            break
        previous, group = group, new
    return group


def split_statistic(x: np.ndarray, group: np.ndarray, model: GlobalModel) -> float:
    """The per-sample log-likelihood ratio J of two subgroups against one identity (``calc_test``)."""
    n = len(x)
    precision = model.precision
    mu = _posterior_identity(x.sum(axis=0), n, model.identity_cov, model.variation_cov, precision)
    means = [x[group].mean(axis=0) if group.any() else mu, x[~group].mean(axis=0) if (~group).any() else mu]
    statistic = 0.0
    for members, u in ((group, means[0]), (~group, means[1])):
        count = int(members.sum())
        statistic += count * (mu @ precision @ mu - u @ precision @ u)
        statistic -= 2 * float(x[members].sum(axis=0) @ precision @ (mu - u))
    return statistic / n


def anomaly_index(values: np.ndarray) -> np.ndarray:
    """(v/max v − median) / (1.4826·MAD), signed (the toolkits' ``calc_anomaly_index`` without |·|)."""
    scaled = values / np.max(np.abs(values))
    median = np.median(scaled)
    mad = MAD_TO_SIGMA * np.median(np.abs(scaled - median))
    return (scaled - median) / mad if mad > 0 else np.zeros_like(scaled)


def _minority_probability(x: np.ndarray, group: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask of the smaller subgroup, and each sample's logistic discriminant towards it."""
    minority = group if group.sum() <= (~group).sum() else ~group
    if minority.all() or not minority.any():
        return np.zeros(len(x), dtype=bool), np.full(len(x), 0.5)
    um, uM = x[minority].mean(axis=0), x[~minority].mean(axis=0)
    discriminant = 2 * (x @ precision @ (um - uM)) - (um @ precision @ um - uM @ precision @ uM)
    return minority, expit(discriminant)


def scan_classes(features: np.ndarray, labels: np.ndarray, *, seed: int) -> dict:
    """Global model, per-class splits and statistics: ``{"index": J* per class, "classes", "minority",
    "probability"}`` (the last two per sample)."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    model = fit_global_model(features, labels)
    x = features - features.mean(axis=0)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    statistics = np.zeros(len(classes))
    minority = np.zeros(len(labels), dtype=bool)
    probability = np.zeros(len(labels))
    for c, label in enumerate(classes):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        group = split_class(x[members], model.precision, rng)
        statistics[c] = split_statistic(x[members], group, model)
        minority[members], probability[members] = _minority_probability(x[members], group, model.precision)
    return {"classes": classes, "index": anomaly_index(statistics), "minority": minority,
            "probability": probability}


@DETECTORS.register(
    "scan",
    {"threshold": [Interval(Real, 0, None, "neither")]},
    help="Tang et al. 2021: two-subgroup decomposition per class against a global identity/variation model.",
)
def scan(context: DetectionContext, *, seed: int, threshold: float = THRESHOLD) -> Detection:
    """SCAn on the penultimate activations; higher = more suspicious.

    Parameters
    ----------
    context : DetectionContext
        Uses ``context.features`` and ``context.labels``.
    seed : int
        Seeds the random initial split of each class.
    threshold : float, default=e²
        A class is contaminated when its anomaly index J* exceeds this (the paper's e²); its smaller
        subgroup is flagged.

    Returns
    -------
    detection : Detection
        ``scores`` p_i (1 + max(J*_y, 0)); ``flagged`` the smaller subgroup of every class with J* > threshold.
    """
    labels = np.asarray(context.labels)
    result = scan_classes(context.features, labels, seed=seed)
    per_sample_index = result["index"][np.searchsorted(result["classes"], labels)]
    scores = result["probability"] * (1 + np.maximum(per_sample_index, 0))
    contaminated = per_sample_index > threshold
    return Detection(scores=scores, flagged=result["minority"] & contaminated)
