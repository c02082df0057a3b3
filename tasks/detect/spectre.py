"""SPECTRE (Hayase, Kong, Somani & Oh, "SPECTRE: Defending Against Backdoor Attacks Using Robust
Statistics", ICML 2021).

For each given label y, on the penultimate representations of the samples labelled y:

1. project onto the top-k principal directions (centred PCA);
2. estimate the covariance robustly with the filter of Diakonikolas, Kamath, Kane, Li, Moitra &
   Stewart (2017): whiten with the empirical second moment, find the top eigenvector of the
   fourth-moment operator T = E[(y⊗y)(y⊗y)ᵀ] − vec(I)vec(I)ᵀ, and while its eigenvalue is too large
   for a Gaussian, drop the points whose quadratic form along it lies in the tail; never more than
   2·ε·n_y points in all;
3. whiten every point with the robust estimate and score it by its quantum-entropy (QUE) score
   τ_i = x_iᵀ M x_i, M = exp(α (Σ′ − I) / (‖Σ′‖ − 1)) / tr(·), Σ′ the covariance of the whitened
   points (Dong, Hopkins & Li, NeurIPS 2019); a poison cluster makes one direction of Σ′ stand
   out, which M weighs exponentially;
4. remove the round(1.5·ε·n_y) highest scores.

k is chosen per class, as in the authors' ``rcov_auto_quantum_filter``: for k ∈ {1, 4, 9, …, 64}
run steps 1–3, recompute the whitened covariance in the 64-dimensional PCA space without the
removed points, and keep the k whose QUE statistic tr(Σ′M)/tr(M) is the largest.

Read (not copied) from the authors' Julia code as kept in ``vtu81/backdoor-toolbox``
(``cleansers_tool_box/spectre/quantum_filters.jl`` and ``dkk17.jl``): α = 4, τ = 0.1, the filter's
C = 10, the tail bound ``cov_Tail``, the shift of 3 on the quadratic-form deviations, the 2ε removal
limit of the filter and the 1.5ε removal of the final rule. The authors run it on one (target)
class with ε the number of poisons; without a known target we run it on every class with
ε = ``eps`` · n_y, like ``spectral_signature``.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from poisonsweep.tasks.detect.base import DETECTORS, Detection, DetectionContext, flag_top_n
from poisonsweep.tasks.detect.spectral import EPS_MULTIPLIER, spectral_flags
from poisonsweep.tasks.registry import Interval

__all__ = ["que_scores", "robust_selection", "spectre_class", "spectre_scores", "spectre"]

QUE_ALPHA = 4.0  # the authors' α
TAU = 0.1  # failure probability τ of the filter (the authors' default)
FILTER_C = 10.0  # the constant C of dkk17.jl
TAIL_SHIFT = 3.0  # deviations below this are never filtered (dkk17.jl's `shift`)
FILTER_LIMIT = 2.0  # the filter removes at most 2·ε·n_y points (`limit1`)
REMOVE_MULTIPLIER = EPS_MULTIPLIER  # the final rule removes 1.5·ε·n_y points (`limit2`)
PCA_DIM = 64  # the authors' largest k and the space in which k is chosen
RIDGE = 1e-8  # added to the second moment before inverting (as in dkk17.jl)
EIG_TOL = 1e-3  # relative accuracy of the top eigenpair of the fourth-moment operator
EIG_MAXITER = 50  # ARPACK restarts before the best Ritz pair so far is taken


def centred_pca(points: np.ndarray, k: int) -> np.ndarray:
    """Coordinates of the centred ``points`` on their top-``k`` principal directions, (n, k)."""
    centred = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:k].T


def _inverse_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors / np.sqrt(np.maximum(values, RIDGE))) @ vectors.T


def _tail_bound(t: float, eps: float) -> float:
    # dkk17.jl's cov_Tail: no filtering below 10·log(1/ε), then a 3ε/(T log T)² tail
    if t <= 10 * math.log(1 / eps):
        return 1.0
    return 3 * eps / (t * math.log(t)) ** 2


def _top_eigenpair(operator: LinearOperator, d: int) -> tuple[float, np.ndarray] | None:
    """Top eigenpair of the d²×d² fourth-moment operator, to ``EIG_TOL`` within ``EIG_MAXITER`` restarts.

    The eigenvalue is only compared with a threshold and the direction only ranks points, so a
    loose tolerance suffices; when the top eigenvalues are too close for ARPACK to separate in time
    (near-Gaussian data in high k) the best Ritz pair found is used, or None (accept the estimate).
    """
    start = np.ones(d * d) / d  # deterministic start vector, as the authors' `ones(d^2)`
    try:
        values, vectors = eigsh(operator, k=1, which="LA", v0=start, tol=EIG_TOL, maxiter=EIG_MAXITER)
    except ArpackNoConvergence as error:
        if len(error.eigenvalues) == 0:
            return None
        values, vectors = error.eigenvalues, error.eigenvectors
    return float(values[0]), vectors


def _filter_step(points: np.ndarray, eps: float, limit: int) -> np.ndarray | None:
    """One pass of the DKK17 covariance filter; the points to keep, or None when it stops.

    None means either that the fourth moment along the top direction is already Gaussian-like
    (the estimate is accepted) or that no tail threshold was found.
    """
    n, d = points.shape
    white = points @ _inverse_sqrt(points.T @ points / n + RIDGE * np.eye(d))
    norms = np.einsum("ij,ij->i", white, white)
    far = norms >= FILTER_C * d * math.log(n / TAU)
    if far.any():  # gross outliers first
        return ~far | flag_top_n(-norms, n - limit)

    def fourth_moment(v: np.ndarray) -> np.ndarray:
        matrix = v.reshape(d, d)
        quad = ((white @ matrix) * white).sum(axis=1)
        return ((white.T * quad) @ white / n).ravel() - np.trace(matrix) * np.eye(d).ravel()

    top = _top_eigenpair(LinearOperator((d * d, d * d), matvec=fourth_moment, dtype=np.float64), d)
    if top is None:
        return None
    value, vector = top
    # Q(G, P)/2 = ‖P‖_F² = 1 for the unit eigenvector
    if value <= 1 + FILTER_C * eps * math.log(1 / eps) ** 2:
        return None
    direction = vector[:, 0].reshape(d, d)
    direction = (direction + direction.T) / 2
    quad = (np.einsum("ij,jk,ik->i", white, direction, white) - np.trace(direction)) / math.sqrt(2)
    deviations = np.abs(quad - np.median(quad))
    for rank, deviation in enumerate(np.sort(deviations), start=1):
        threshold = deviation - TAIL_SHIFT
        if threshold <= 0:
            continue
        if rank / n >= _tail_bound(threshold, eps):
            return (deviations <= threshold) | flag_top_n(-deviations, n - limit)
    return None


def robust_selection(points: np.ndarray, n_poison: float) -> np.ndarray:
    """The points the iterated DKK17 filter keeps (bool mask), removing at most 2·``n_poison``.

    Parameters
    ----------
    points : ndarray of shape (n, d)
        Centred points (e.g. PCA coordinates).
    n_poison : float
        The assumed number of poisons ε·n (the filter's ε is n_poison / n).
    """
    n = len(points)
    eps = min(max(n_poison / n, 1e-6), 0.5)
    limit = int(round(FILTER_LIMIT * n_poison))
    kept = np.arange(n)
    while limit > 0 and len(kept) > points.shape[1] + 1:
        keep = _filter_step(points[kept], eps, limit)
        if keep is None or keep.all():
            break
        limit -= int((~keep).sum())
        kept = kept[keep]
    mask = np.zeros(n, dtype=bool)
    mask[kept] = True
    return mask


def que_weights(covariance: np.ndarray, alpha: float) -> np.ndarray:
    """M = exp(α (Σ′ − I) / (‖Σ′‖₂ − 1)), normalised to trace 1."""
    values, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
    scale = max(values[-1] - 1, 1e-12)
    weights = np.exp(alpha * (values - 1) / scale - alpha * (values[-1] - 1) / scale)  # max term = 1
    matrix = (vectors * weights) @ vectors.T
    return matrix / np.trace(matrix)


def que_scores(white: np.ndarray, alpha: float = QUE_ALPHA) -> tuple[np.ndarray, float]:
    """QUE scores x_iᵀ M x_i of whitened points, and the statistic tr(Σ′M)/tr(M)."""
    if white.shape[1] == 1:
        return white[:, 0] ** 2, float(np.var(white[:, 0], ddof=1))
    covariance = np.cov(white, rowvar=False)
    matrix = que_weights(covariance, alpha)
    return np.einsum("ij,jk,ik->i", white, matrix, white), float(np.trace(covariance @ matrix))


def _whiten(points: np.ndarray, selected: np.ndarray) -> np.ndarray:
    covariance = np.cov(points[selected], rowvar=False, bias=True)
    return points @ _inverse_sqrt(np.atleast_2d(covariance))


def _quantum_filter(reps: np.ndarray, n_poison: float, k: int, alpha: float) -> np.ndarray:
    """QUE scores at PCA dimension k after robust whitening (the authors' ``rcov_quantum_filter``)."""
    projected = reps[:, :k]
    if k == 1:
        return que_scores(projected, alpha)[0]
    selected = robust_selection(projected, n_poison)
    return que_scores(_whiten(projected, selected), alpha)[0]


def spectre_class(features: np.ndarray, n_poison: float, *, alpha: float = QUE_ALPHA) -> tuple[np.ndarray, int, float]:
    """SPECTRE on one class: QUE scores at the chosen k, that k, and its QUE statistic.

    For each candidate k the round(1.5·``n_poison``) top-scored points are removed and the QUE
    statistic of the rest is measured in the common PCA space; the largest statistic wins.
    """
    dim = min(PCA_DIM, features.shape[1], len(features) - 2)
    reps = centred_pca(features, dim)
    n_remove = int(round(REMOVE_MULTIPLIER * n_poison))
    candidates = sorted({min(dim, int(round(r ** 2))) for r in np.linspace(1, math.sqrt(PCA_DIM), 8)})
    best = (-np.inf, None, 0)
    for k in candidates:
        scores = _quantum_filter(reps, n_poison, k, alpha)
        kept = ~flag_top_n(scores, n_remove)
        statistic = que_scores(_whiten(reps, kept), alpha)[1]
        if statistic > best[0]:
            best = (statistic, scores, k)
    statistic, scores, k = best
    return scores, k, statistic


def spectre_scores(features: np.ndarray, labels: np.ndarray, *, eps: float,
                   alpha: float = QUE_ALPHA) -> np.ndarray:
    """Per-class SPECTRE QUE scores, each divided by its class mean; higher = more suspicious.

    The division makes classes comparable (the within-class ranking is SPECTRE's). Classes with
    too few samples or no spread to whiten (fewer than 4 samples) score 0.
    """
    features = np.asarray(features, dtype=np.float64)
    scores = np.zeros(len(features))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        class_features = features[members]
        if len(members) < 4 or np.all(class_features == class_features[0]):
            continue
        class_scores, _, _ = spectre_class(class_features, eps * len(members), alpha=alpha)
        mean = class_scores.mean()
        scores[members] = class_scores / mean if mean > 0 else 0.0
    return scores


@DETECTORS.register(
    "spectre",
    {"eps": [Interval(Real, 0, 1 / REMOVE_MULTIPLIER, "right")], "alpha": [Interval(Real, 0, None, "neither")]},
    help="Hayase et al. 2021: robust-covariance whitening, then quantum-entropy scores per class.",
)
def spectre(context: DetectionContext, *, seed: int, eps: float = 0.1, alpha: float = QUE_ALPHA) -> Detection:
    """SPECTRE on the penultimate activations; higher = more suspicious.

    Parameters
    ----------
    context : DetectionContext
        Uses ``context.features`` and ``context.labels``.
    seed : int
        Unused: the method is deterministic (its eigen-solver starts from a fixed vector).
    eps : float, default=0.1
        Upper bound on the poison share of a class; the filter removes at most 2·eps·n_y points of
        class y to estimate its covariance and the top round(1.5·eps·n_y) QUE scores are flagged
        (the same budget as ``spectral_signature``).
    alpha : float, default=4
        The QUE exponent α (4 in the authors' code; α → 0 weighs every direction alike, large α
        only the top one).

    Returns
    -------
    detection : Detection
    """
    labels = np.asarray(context.labels)
    scores = spectre_scores(context.features, labels, eps=eps, alpha=alpha)
    # the same per-class rule as spectral signatures: the top round(1.5·eps·n_y) of every class
    return Detection(scores=scores, flagged=spectral_flags(scores, labels, eps))
