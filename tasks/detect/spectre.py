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
import torch

from poisonsweep.tasks.detect import linalg
from poisonsweep.tasks.detect.base import DETECTORS, FLAG_RULES, Detection, DetectionContext, flag_top_n
from poisonsweep.tasks.detect.spectral import (EPS_MULTIPLIER, cached_projections, class_z_scores, spectral_flags,
                                               spectral_outlier_count)
from poisonsweep.tasks.registry import Interval, Options

__all__ = ["que_scores", "robust_selection", "spectre_class", "spectre_scores", "spectre_z_scores", "spectre"]

QUE_ALPHA = 4.0  # the authors' α
TAU = 0.1  # failure probability τ of the filter (the authors' default)
FILTER_C = 10.0  # the constant C of dkk17.jl
TAIL_SHIFT = 3.0  # deviations below this are never filtered (dkk17.jl's `shift`)
FILTER_LIMIT = 2.0  # the filter removes at most 2·ε·n_y points (`limit1`)
REMOVE_MULTIPLIER = EPS_MULTIPLIER  # the final rule removes 1.5·ε·n_y points (`limit2`)
PCA_DIM = 64  # the authors' largest k and the space in which k is chosen
RIDGE = 1e-8  # added to the second moment before inverting (as in dkk17.jl)
EIG_TOL = 1e-3  # relative accuracy of the top eigenpair of the fourth-moment operator
EIG_MAXITER = 50  # Lanczos restarts before the best Ritz pair so far is taken


def centred_pca(points: torch.Tensor, k: int) -> torch.Tensor:
    """Coordinates of the centred ``points`` on their top-``k`` principal directions, (n, k).

    The directions are the top eigenvectors of the blocked d × d scatter matrix (the right-singular
    vectors of the centred matrix, up to sign; the scores below do not depend on the sign)."""
    centred = points - points.mean(dim=0)
    _, vectors = torch.linalg.eigh(linalg.second_moment(centred))
    return centred @ vectors.flip(1)[:, :k]


def _tail_bound(t: np.ndarray, eps: float) -> np.ndarray:
    # dkk17.jl's cov_Tail: no filtering below 10·log(1/ε), then a 3ε/(T log T)² tail
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = 3 * eps / (t * np.log(t)) ** 2
    return np.where(t <= 10 * math.log(1 / eps), 1.0, tail)


def _fourth_moment_operator(white: torch.Tensor):
    """v ↦ vec(E[(y⊗y)(y⊗y)ᵀ] vec⁻¹(v)) − tr(vec⁻¹(v)) vec(I) on the whitened points y, in O(n d²).

    In float32 (``white`` is cast): the eigenpair is only needed to EIG_TOL = 1e-3, far above
    float32 rounding, and float32 products cost half as much on a CPU (far less on a GPU)."""
    white = white.float()
    n, d = white.shape
    identity = torch.eye(d, dtype=white.dtype, device=white.device).ravel()

    def apply(v: torch.Tensor) -> torch.Tensor:
        matrix = v.reshape(d, d)
        quad = ((white @ matrix) * white).sum(dim=1)
        return ((white.T * quad) @ white / n).ravel() - torch.trace(matrix) * identity

    return apply


def _filter_step(points: torch.Tensor, eps: float, limit: int,
                 start: torch.Tensor) -> tuple[np.ndarray | None, torch.Tensor]:
    """One pass of the DKK17 covariance filter: the points to keep (None when it stops), and the
    top direction of the fourth-moment operator (the next pass's start; ``start`` if none was needed).

    None means either that the fourth moment along the top direction is already Gaussian-like
    (the estimate is accepted) or that no tail threshold was found.
    """
    n, d = points.shape
    eye = torch.eye(d, dtype=points.dtype, device=points.device)
    white = points @ linalg.inverse_sqrt(points.T @ points / n + RIDGE * eye, RIDGE)
    norms = (white * white).sum(dim=1).cpu().numpy()
    far = norms >= FILTER_C * d * math.log(n / TAU)
    if far.any():  # gross outliers first
        return ~far | flag_top_n(-norms, n - limit), start
    value, vector = linalg.top_eigenpair(_fourth_moment_operator(white), start.float(), tol=EIG_TOL,
                                         max_restarts=EIG_MAXITER)
    vector = vector.double()
    # Q(G, P)/2 = ‖P‖_F² = 1 for the unit eigenvector
    if value <= 1 + FILTER_C * eps * math.log(1 / eps) ** 2:
        return None, vector
    direction = vector.reshape(d, d)
    direction = (direction + direction.T) / 2
    quad = ((((white @ direction) * white).sum(dim=1) - torch.trace(direction)) / math.sqrt(2)).cpu().numpy()
    deviations = np.abs(quad - np.median(quad))
    thresholds = np.sort(deviations) - TAIL_SHIFT
    ranks = np.arange(1, n + 1)
    found = np.flatnonzero((thresholds > 0) & (ranks / n >= _tail_bound(np.maximum(thresholds, 1e-300), eps)))
    if len(found) == 0:
        return None, vector
    threshold = thresholds[found[0]]
    return (deviations <= threshold) | flag_top_n(-deviations, n - limit), vector


def robust_selection(points, n_poison: float) -> np.ndarray:
    """The points the iterated DKK17 filter keeps (bool mask), removing at most 2·``n_poison``.

    Each pass's eigen-solve starts from the previous pass's top direction (the first from the
    authors' ``ones(d²)``): a pass removes a few points, so the direction moves little and the
    solve takes a few products instead of a full Lanczos run; it is solved to the same tolerance.

    Parameters
    ----------
    points : ndarray or Tensor of shape (n, d)
        Centred points (e.g. PCA coordinates); a Tensor stays on its device.
    n_poison : float
        The assumed number of poisons ε·n (the filter's ε is n_poison / n).
    """
    points = linalg.as_tensor(points, points.device if torch.is_tensor(points) else None)
    n, d = points.shape
    eps = min(max(n_poison / n, 1e-6), 0.5)
    limit = int(round(FILTER_LIMIT * n_poison))
    kept = np.arange(n)
    start = torch.ones(d * d, dtype=points.dtype, device=points.device) / d
    while limit > 0 and len(kept) > d + 1:
        keep, start = _filter_step(points[torch.as_tensor(kept, device=points.device)], eps, limit, start)
        if keep is None or keep.all():
            break
        limit -= int((~keep).sum())
        kept = kept[keep]
    mask = np.zeros(n, dtype=bool)
    mask[kept] = True
    return mask


def que_weights(covariance: torch.Tensor, alpha: float) -> torch.Tensor:
    """M = exp(α (Σ′ − I) / (‖Σ′‖₂ − 1)), normalised to trace 1."""
    values, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)
    scale = max(float(values[-1]) - 1, 1e-12)
    weights = torch.exp(alpha * (values - values[-1]) / scale)  # max term = 1
    matrix = (vectors * weights) @ vectors.T
    return matrix / torch.trace(matrix)


def que_scores(white, alpha: float = QUE_ALPHA) -> tuple[np.ndarray, float]:
    """QUE scores x_iᵀ M x_i of whitened points, and the statistic tr(Σ′M)/tr(M)."""
    white = linalg.as_tensor(white, white.device if torch.is_tensor(white) else None)
    if white.shape[1] == 1:
        return (white[:, 0] ** 2).cpu().numpy(), float(torch.var(white[:, 0]))
    covariance = linalg.centred_covariance(white)
    matrix = que_weights(covariance, alpha)
    scores = ((white @ matrix) * white).sum(dim=1)
    return scores.cpu().numpy(), float(torch.trace(covariance @ matrix))


def _whiten(points: torch.Tensor, selected: np.ndarray) -> torch.Tensor:
    covariance = linalg.centred_covariance(points[torch.as_tensor(selected, device=points.device)], ddof=0)
    return points @ linalg.inverse_sqrt(covariance, RIDGE)


def _quantum_filter(reps: torch.Tensor, n_poison: float, k: int, alpha: float) -> np.ndarray:
    """QUE scores at PCA dimension k after robust whitening (the authors' ``rcov_quantum_filter``)."""
    projected = reps[:, :k]
    if k == 1:
        return que_scores(projected, alpha)[0]
    selected = robust_selection(projected, n_poison)
    return que_scores(_whiten(projected, selected), alpha)[0]


def spectre_class(features, n_poison: float, *, alpha: float = QUE_ALPHA,
                  device=None) -> tuple[np.ndarray, int, float]:
    """SPECTRE on one class: QUE scores at the chosen k, that k, and its QUE statistic.

    For each candidate k the round(1.5·``n_poison``) top-scored points are removed and the QUE
    statistic of the rest is measured in the common PCA space; the largest statistic wins. Runs in
    torch on ``device`` (or on the device of a ``features`` Tensor).
    """
    features = linalg.as_tensor(features, features.device if torch.is_tensor(features) else device)
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


def spectre_classes(features: np.ndarray, labels: np.ndarray, *, eps: float, alpha: float = QUE_ALPHA,
                    device=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-class SPECTRE QUE scores, each divided by its class mean, and each class's QUE statistic
    tr(Σ′M)/tr(M) at its chosen k (0 for a class too small to whiten), in ``np.unique(labels)`` order.

    The within-class ranking is SPECTRE's. Classes with too few samples or no spread to whiten
    (fewer than 4 samples) score 0. The features go to ``device`` once; each class is a slice there.
    """
    x = linalg.as_tensor(features, device)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    scores, statistics = np.zeros(len(x)), np.zeros(len(classes))
    for c, label in enumerate(classes):
        members = np.flatnonzero(labels == label)
        class_features = x[torch.as_tensor(members, device=x.device)]
        if len(members) < 4 or bool(torch.all(class_features == class_features[0])):
            continue
        class_scores, _, statistics[c] = spectre_class(class_features, eps * len(members), alpha=alpha)
        mean = class_scores.mean()
        scores[members] = class_scores / mean if mean > 0 else 0.0
    return scores, statistics


def spectre_scores(features: np.ndarray, labels: np.ndarray, *, eps: float, alpha: float = QUE_ALPHA,
                   device=None) -> np.ndarray:
    """The QUE scores of :func:`spectre_classes`; higher = more suspicious."""
    return spectre_classes(features, labels, eps=eps, alpha=alpha, device=device)[0]


def spectre_z_scores(que: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each QUE score on one scale for every class: the modified z-score, within its class, of its
    cube root (Wilson & Hilferty 1931: the cube root of a χ²-like quadratic form is close to
    normal, so a clean class's z is close to standard normal; the QUE score of a whitened Gaussian
    point is a weighted sum of χ²₁). Monotone in the QUE score within a class."""
    return class_z_scores(np.cbrt(que), labels)


@DETECTORS.register(
    "spectre",
    {"flag_rule": [Options(FLAG_RULES)], "eps": [Interval(Real, 0, 1 / REMOVE_MULTIPLIER, "right")],
     "alpha": [Interval(Real, 0, None, "neither")]},
    help="Hayase et al. 2021: robust-covariance whitening, then quantum-entropy scores per class.",
)
def spectre(context: DetectionContext, *, seed: int, flag_rule: str = "auto", eps: float = 0.1,
            alpha: float = QUE_ALPHA) -> Detection:
    """SPECTRE on the penultimate activations; higher = more suspicious.

    Parameters
    ----------
    context : DetectionContext
        Uses ``context.features``, ``context.labels`` and ``context.device`` (where the linear algebra runs).
    seed : int
        Unused: the method is deterministic (its eigen-solver starts from a fixed vector).
    flag_rule : {"auto", "fraction"}, default="auto"
        ``"auto"``: the scores are :func:`spectre_z_scores` (one scale for every class) and the
        flags the top N̂ of them, N̂ the contamination ``spectral_signature`` estimates
        (``spectral.spectral_outlier_count``: the Meinshausen-Rice count of outlying top-direction
        projections), an estimate, not a budget. SPECTRE's own QUE scores cannot give that count:
        its filter removes its full 2·eps·n_y on real features (MNIST keras_cnn, every class), so a
        tenth of every class lies far outside the robust covariance and any tail count of the QUE
        scores flags about 15 % of the data whatever the contamination. ``"fraction"``: the paper's rule, the top
        round(1.5·eps·n_y) QUE scores of every class (as ``spectral_signature``), scored by QUE
        score over its class mean (a flagged sample outscores the unflagged ones of its class).
    eps : float, default=0.1
        Upper bound on the poison share of a class: the robust filter removes at most 2·eps·n_y
        points of class y to estimate its covariance, and the k search removes 1.5·eps·n_y before
        measuring each k (the authors' rule); with ``flag_rule="fraction"`` also the flag budget.
    alpha : float, default=4
        The QUE exponent α (4 in the authors' code; α → 0 weighs every direction alike, large α
        only the top one).

    Returns
    -------
    detection : Detection
    """
    labels = np.asarray(context.labels)
    que = spectre_scores(context.features, labels, eps=eps, alpha=alpha, device=context.device)
    if flag_rule == "auto":
        scores = spectre_z_scores(que, labels)
        count = spectral_outlier_count(cached_projections(context), labels)
        return Detection(scores=scores, flagged=flag_top_n(scores, count))
    return Detection(scores=que, flagged=spectral_flags(que, labels, eps))
