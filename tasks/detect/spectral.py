"""Spectral signatures (Tran, Li & Madry, NeurIPS 2018, Algorithm 1).

For each given label y, centre the penultimate representations of the samples labelled y,
take the top right-singular vector v of the centred matrix, and score every sample by its
squared projection τ_i = ((R_i − R̄_y)·v)². Poisons that share a feature the clean samples
of y lack pull the top direction towards them and get the largest τ. The paper removes the
1.5·ε·n_y highest-scoring samples of every class, where ε is an upper bound on the poison
fraction (``flag_rule="fraction"``).

The default decision (``flag_rule="auto"``) needs no ε: within each class, a sample is flagged
when its signed projection on the top direction is an outlier by the Iglewicz-Hoaglin modified
z-score (|M| > 3.5, ``base.robust_outliers``). Median and MAD are those of the clean majority
while poisons are under half the class, so a poison cluster far along v is flagged whatever its
share; a class where poisons are about half or more has no majority to measure from and gets few
or no flags (activation clustering is the detector for that regime).
"""

from __future__ import annotations

from numbers import Real

import numpy as np

from poisonsweep.tasks.detect.base import DETECTORS, FLAG_RULES, Detection, DetectionContext, flag_top, robust_outliers
from poisonsweep.tasks.registry import BOOL, Interval, Options

# the paper removes 1.5·ε·n_y samples per class; ART calls this factor eps_multiplier
EPS_MULTIPLIER = 1.5

__all__ = ["EPS_MULTIPLIER", "spectral_projections", "spectral_scores", "spectral_flags", "spectral_outlier_flags",
           "spectral_signature"]


def top_projection(centred: np.ndarray) -> np.ndarray:
    """M_i · v, with v the top right-singular vector of the centred matrix M (sign arbitrary).

    Computed from the eigen-decomposition of the smaller Gram matrix: MᵀM (d×d) when
    n ≥ d, else MMᵀ (n×n), where M v = σ₁ u₁ = sqrt(λ_max) u₁. Both avoid the full n×d SVD.
    """
    n, d = centred.shape
    if n >= d:
        _, vectors = np.linalg.eigh(centred.T @ centred)
        return centred @ vectors[:, -1]
    values, vectors = np.linalg.eigh(centred @ centred.T)
    return np.sqrt(max(values[-1], 0.0)) * vectors[:, -1]


def spectral_projections(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Signed projection of every sample on its class's top direction, float64 (n,).

    Each label's samples are centred on their own mean; 0 for every sample of a class with no
    spread (a single sample, or identical rows), since rounding noise must not rank.
    """
    features = np.asarray(features, dtype=np.float64)
    projections = np.zeros(len(features))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        class_features = features[members]
        if not np.all(class_features == class_features[0]):
            projections[members] = top_projection(class_features - class_features.mean(axis=0))
    return projections


def spectral_scores(features: np.ndarray, labels: np.ndarray, *, normalize: bool = True,
                    projections: np.ndarray | None = None) -> np.ndarray:
    """Per-class spectral-signature scores τ_i = ((R_i − R̄_y)·v)²; higher = more suspicious.

    Parameters
    ----------
    features : ndarray of shape (n_samples, n_features)
        Penultimate activations.
    labels : ndarray of int, shape (n_samples,)
        The given (possibly poisoned) labels; each label's samples are scored on their own.
    normalize : bool, default=True
        If True, divide each class's τ by its mean over the class, σ₁²/n_y (Σ_i τ_i = σ₁²),
        so a score is "this many times the class's average energy along its top direction".
        The within-class ranking is the paper's; the division only makes classes comparable:
        raw τ scales with each class's activation magnitude, so a class with large
        activations would otherwise dominate a cross-class ranking (AUROC) although its
        samples are no more atypical. For a clean Gaussian class the normalised score is
        about χ²₁ (mean 1); a poison cluster holding a share ε of its class scores about
        (1 − ε)/ε. If False, return the paper's raw τ.
    projections : ndarray of shape (n_samples,), optional
        :func:`spectral_projections` of the same inputs, when already computed.

    Returns
    -------
    scores : ndarray of float64, shape (n_samples,)
        0 for every sample of a class with no spread (a single sample, or identical rows).
    """
    tau = (spectral_projections(features, labels) if projections is None else projections) ** 2
    if not normalize:
        return tau
    scores = np.zeros(len(tau))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        energy = tau[members].sum()  # = σ₁², the top squared singular value
        if energy > 0:
            scores[members] = tau[members] * len(members) / energy
    return scores


def spectral_flags(scores: np.ndarray, labels: np.ndarray, eps: float) -> np.ndarray:
    """Flag the round(1.5·eps·n_y) top-scored samples of every label y (ties by index).

    A class whose scores are all 0 (no spread, so no direction to rank by) gets no flags.
    """
    flagged = np.zeros(len(scores), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if np.any(scores[members] > 0):
            flagged[members] = flag_top(scores[members], EPS_MULTIPLIER * eps)
    return flagged


def spectral_outlier_flags(projections: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Flag, within every label, the samples whose signed top-direction projection is a
    two-sided modified-z outlier (|M| > 3.5, ``base.robust_outliers``)."""
    flagged = np.zeros(len(projections), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if np.any(projections[members] != 0):
            flagged[members] = robust_outliers(projections[members], two_sided=True)
    return flagged


@DETECTORS.register(
    "spectral_signature",
    {"flag_rule": [Options(FLAG_RULES)], "eps": [Interval(Real, 0, 1 / EPS_MULTIPLIER)], "normalize": [BOOL]},
    help="Tran et al. 2018: squared projection on the top singular vector of each class's centred features.",
)
def spectral_signature(context: DetectionContext, *, seed: int, flag_rule: str = "auto", eps: float = 0.1,
                       normalize: bool = True) -> Detection:
    """Spectral signatures of the penultimate activations; higher = more suspicious.

    Parameters
    ----------
    context : DetectionContext
        Uses ``context.features`` and ``context.labels`` (the given labels).
    seed : int
        Unused: the method is deterministic.
    flag_rule : {"auto", "fraction"}, default="auto"
        ``"auto"``: per-class modified-z outliers of the signed projection (module docstring);
        ``"fraction"``: the paper's rule, the top 1.5·eps·n_y of every class.
    eps : float, default=0.1
        Used with ``flag_rule="fraction"``: upper bound on the poison share of a class; the top round(1.5·eps·n_y) samples of
        every class are flagged (so 15 % of each class by default). The paper evaluates
        ε = 5 % and 10 %, and its official code removes the top 15 % (85th percentile),
        i.e. 1.5 × 0.1; ART's default of 0.33 would flag 49.5 % of every class.
    normalize : bool, default=True
        Divide each class's scores by their class mean (see :func:`spectral_scores`).

    Returns
    -------
    detection : Detection
        ``scores`` float64 of shape (n_samples,), ``flagged`` bool of shape (n_samples,).
    """
    labels = np.asarray(context.labels)
    projections = spectral_projections(context.features, labels)
    scores = spectral_scores(context.features, labels, normalize=normalize, projections=projections)
    if flag_rule == "auto":
        return Detection(scores=scores, flagged=spectral_outlier_flags(projections, labels))
    return Detection(scores=scores, flagged=spectral_flags(scores, labels, eps))
