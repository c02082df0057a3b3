"""Spectral signatures (Tran, Li & Madry, NeurIPS 2018, Algorithm 1).

For each given label y, centre the penultimate representations of the samples labelled y,
take the top right-singular vector v of the centred matrix, and score every sample by its
squared projection τ_i = ((R_i − R̄_y)·v)². Poisons that share a feature the clean samples
of y lack pull the top direction towards them and get the largest τ. The paper removes the
1.5·ε·n_y highest-scoring samples of every class, where ε is an upper bound on the poison
fraction.
"""

from __future__ import annotations

from numbers import Real

import numpy as np

from tasks.detect.base import DETECTORS, Detection, DetectionContext, flag_top
from tasks.registry import BOOL, Interval

# the paper removes 1.5·ε·n_y samples per class; ART calls this factor eps_multiplier
EPS_MULTIPLIER = 1.5

__all__ = ["EPS_MULTIPLIER", "spectral_scores", "spectral_flags", "spectral_signature"]


def squared_top_projection(centred: np.ndarray) -> np.ndarray:
    """τ_i = (M_i · v)², with v the top right-singular vector of the centred matrix M.

    Computed from the eigen-decomposition of the smaller Gram matrix: MᵀM (d×d) when
    n ≥ d, else MMᵀ (n×n), where M v = σ₁ u₁ and so τ = λ_max · u₁². Both avoid the full
    n×d SVD and give the same τ; the sign of v does not matter because τ is squared.
    """
    n, d = centred.shape
    if n >= d:
        _, vectors = np.linalg.eigh(centred.T @ centred)
        return (centred @ vectors[:, -1]) ** 2
    values, vectors = np.linalg.eigh(centred @ centred.T)
    return max(values[-1], 0.0) * vectors[:, -1] ** 2


def spectral_scores(features: np.ndarray, labels: np.ndarray, *, normalize: bool = True) -> np.ndarray:
    """Per-class spectral-signature scores; higher = more suspicious.

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

    Returns
    -------
    scores : ndarray of float64, shape (n_samples,)
        0 for every sample of a class with no spread (a single sample, or identical rows).
    """
    features = np.asarray(features, dtype=np.float64)
    scores = np.zeros(len(features))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        class_features = features[members]
        if np.all(class_features == class_features[0]):
            continue  # no spread: centring leaves only rounding noise, which must not rank
        tau = squared_top_projection(class_features - class_features.mean(axis=0))
        energy = tau.sum()  # = σ₁², the top squared singular value
        scores[members] = tau * len(members) / energy if normalize else tau
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


@DETECTORS.register(
    "spectral_signature",
    {"eps": [Interval(Real, 0, 1 / EPS_MULTIPLIER)], "normalize": [BOOL]},
    help="Tran et al. 2018: squared projection on the top singular vector of each class's centred features.",
)
def spectral_signature(context: DetectionContext, *, seed: int, eps: float = 0.1,
                       normalize: bool = True) -> Detection:
    """Spectral signatures of the penultimate activations; higher = more suspicious.

    Parameters
    ----------
    context : DetectionContext
        Uses ``context.features`` and ``context.labels`` (the given labels).
    seed : int
        Unused: the method is deterministic.
    eps : float, default=0.1
        Upper bound on the poison share of a class; the top round(1.5·eps·n_y) samples of
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
    scores = spectral_scores(context.features, labels, normalize=normalize)
    return Detection(scores=scores, flagged=spectral_flags(scores, labels, eps))
