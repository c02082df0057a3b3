"""Spectral signatures (Tran, Li & Madry, NeurIPS 2018, Algorithm 1).

For each given label y, centre the penultimate representations of the samples labelled y,
take the top right-singular vector v of the centred matrix, and score every sample by its
squared projection τ_i = ((R_i − R̄_y)·v)². Poisons that share a feature the clean samples
of y lack pull the top direction towards them and get the largest τ. The paper removes the
1.5·ε·n_y highest-scoring samples of every class, where ε is an upper bound on the poison
fraction (``flag_rule="fraction"``).

The default (``flag_rule="auto"``) needs no ε and scores on one scale for every class: a sample's
score is the Iglewicz-Hoaglin modified z-score |M| of its signed projection within its class
(``base.modified_z_scores``; median and MAD are the clean majority's while poisons are under half the
class), which is a standard-normal deviate for a clean Gaussian class. The samples flagged are the
N̂ highest scores over all classes, N̂ the Meinshausen & Rice (2006) lower confidence bound on the
number of non-null samples among the two-sided normal p-values of those z (:func:`outlier_count`):
it counts how many more small p-values there are than a clean (uniform) set would show, so it grows
with the contamination and is about 0 on clean data. Every flagged sample outscores every other. A
class where poisons are about half or more has no majority to measure from and adds few flags
(activation clustering and SCAn are the detectors for that regime).

The linear algebra (per-class covariance, blocked; its top eigenvector) runs in torch on
``context.device``.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch
from scipy.stats import norm

from poisonsweep.tasks.detect import linalg
from poisonsweep.tasks.detect.base import (DETECTORS, FLAG_RULES, Detection, DetectionContext, flag_top, flag_top_n,
                                           modified_z_scores)
from poisonsweep.tasks.registry import BOOL, Interval, Options

# the paper removes 1.5·ε·n_y samples per class; ART calls this factor eps_multiplier
EPS_MULTIPLIER = 1.5

# Meinshausen & Rice's bounding constant β for the standardised uniform empirical process
# sup_t (F_n(t) − t) / sqrt(t(1 − t) / n) over t ∈ [1/n, 1/2]: its 0.95 quantile, simulated (200 seeded
# draws of uniform p-values; 3.13 at n = 1,000, 3.11 at 7,500, 3.29 at 50,000). Calibrated under the null only.
OUTLIER_BOUND_BETA = 3.3

__all__ = ["EPS_MULTIPLIER", "OUTLIER_BOUND_BETA", "spectral_projections", "spectral_scores", "spectral_flags",
           "class_z_scores", "outlier_count", "flag_outliers", "spectral_outlier_count", "cached_projections",
           "spectral_signature"]


def spectral_projections(features: np.ndarray, labels: np.ndarray, *, device=None) -> np.ndarray:
    """Signed projection of every sample on its class's top direction, float64 (n,).

    Each label's samples are centred on their own mean (``linalg.top_direction``, in torch on
    ``device``); 0 for every sample of a class with no spread (a single sample, or identical rows),
    since rounding noise must not rank.
    """
    x = linalg.as_tensor(features, device)
    labels = np.asarray(labels)
    projections = np.zeros(len(x))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        class_features = x[torch.as_tensor(members, device=x.device)]
        if not bool(torch.all(class_features == class_features[0])):
            centred = class_features - class_features.mean(dim=0)
            projections[members] = linalg.top_direction(centred).cpu().numpy()
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


Z_DECIMALS = 9  # far below any z that ranks differently, far above float64 noise (1e-16 relative)


def class_z_scores(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each value's modified z-score within its label (``base.modified_z_scores``); 0 for a class
    whose values are all equal (no spread, nothing to rank). Rounded to ``Z_DECIMALS`` decimals: the two
    middle values of an even-sized class lie at the same distance from its median up to one ulp, and
    without rounding their order in ``|z|`` (so AUROC) would be decided by floating-point noise."""
    values = np.asarray(values, dtype=np.float64)
    z = np.zeros(len(values))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if np.ptp(values[members]) > 0:
            z[members] = modified_z_scores(values[members])
    return np.round(z, Z_DECIMALS)


def outlier_count(p_values: np.ndarray, beta: float = OUTLIER_BOUND_BETA) -> int:
    """Meinshausen & Rice (2006) lower bound on how many of ``p_values`` are not from the null.

    N̂ = max_t [#{p ≤ t} − n·t − β·sqrt(n·t(1 − t))] / (1 − t) over the sorted p-values t in
    [1/n, 1/2] ("Estimating the proportion of false null hypotheses among a large number of
    independently tested hypotheses", Ann. Statist. 34(1), eq. 6, bounding function sqrt(t(1 − t))):
    with probability about 0.95 under the null it is at most the true count, and it grows with the
    excess of small p-values, however weak each one is.
    """
    p = np.sort(np.asarray(p_values, dtype=np.float64))
    n = len(p)
    if n == 0:
        return 0
    inside = (p >= 1 / n) & (p <= 0.5)
    ranks, t = np.arange(1, n + 1)[inside], p[inside]
    bound = (ranks - n * t - beta * np.sqrt(n * t * (1 - t))) / (1 - t)
    return int(max(0, math.ceil(np.max(bound, initial=0.0))))


def flag_outliers(z: np.ndarray, *, two_sided: bool) -> np.ndarray:
    """The top :func:`outlier_count` of the standard-normal scores ``z`` (|z| when ``two_sided``)."""
    z = np.asarray(z, dtype=np.float64)
    p = 2 * norm.sf(np.abs(z)) if two_sided else norm.sf(z)
    return flag_top_n(np.abs(z) if two_sided else z, outlier_count(p))


def spectral_outlier_count(projections: np.ndarray, labels: np.ndarray) -> int:
    """How many samples ``spectral_signature``'s default rule flags: the Meinshausen-Rice count of the
    two-sided p-values of the per-class modified z-scores of the top-direction ``projections``."""
    z = class_z_scores(projections, np.asarray(labels))
    return outlier_count(2 * norm.sf(np.abs(z)))


def cached_projections(context: DetectionContext) -> np.ndarray:
    """``spectral_projections`` of the trial's features, computed once per trial: spectral signatures and
    SPECTRE's count take the same per-class eigen-solves."""
    if "spectral_projections" not in context.cache:
        context.cache["spectral_projections"] = spectral_projections(
            context.features, np.asarray(context.labels), device=context.device)
    return context.cache["spectral_projections"]


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
        ``"auto"``: scores are the per-class modified z-scores |M| of the signed projection, and the
        flags the Meinshausen-Rice count of outliers among them (module docstring);
        ``"fraction"``: the paper's rule, the top 1.5·eps·n_y of every class, scored by τ (a per-class
        budget: a flagged sample outscores the unflagged ones of its own class only).
    eps : float, default=0.1
        Used with ``flag_rule="fraction"``: upper bound on the poison share of a class; the top round(1.5·eps·n_y) samples of
        every class are flagged (so 15 % of each class by default). The paper evaluates
        ε = 5 % and 10 %, and its official code removes the top 15 % (85th percentile),
        i.e. 1.5 × 0.1; ART's default of 0.33 would flag 49.5 % of every class.
    normalize : bool, default=True
        With ``flag_rule="fraction"``: divide each class's τ by its class mean (see :func:`spectral_scores`).

    Returns
    -------
    detection : Detection
        ``scores`` float64 of shape (n_samples,), ``flagged`` bool of shape (n_samples,).
    """
    labels = np.asarray(context.labels)
    projections = cached_projections(context)
    if flag_rule == "auto":
        scores = np.abs(class_z_scores(projections, labels))
        return Detection(scores=scores, flagged=flag_outliers(scores, two_sided=True))
    scores = spectral_scores(context.features, labels, normalize=normalize, projections=projections)
    return Detection(scores=scores, flagged=spectral_flags(scores, labels, eps))
