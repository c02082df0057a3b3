"""A frozen copy of the numpy implementations of spectral signatures, SPECTRE and SCAn as they were
before they moved to torch (issue 25): the reference the torch versions are compared with.
Not used by the package."""
# flake8: noqa

import math
from dataclasses import dataclass

import numpy as np
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from poisonsweep.tasks.detect.base import flag_top_n

EPS_MULTIPLIER = 1.5

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



THRESHOLD = math.exp(2)  # the paper's and BackdoorBench's cut on the anomaly index
TOLERANCE = 1e-5  # EM convergence (the toolkits' EPS)
MAX_ITERATIONS = 100
MAD_TO_SIGMA = 1.4826
SPLIT_STARTS = 8  # random starts of each class's two-subgroup EM; the largest J is kept
SUBGROUP_RULES = ("reclassification", "smaller")


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


def best_split(x: np.ndarray, model: GlobalModel, rng: np.random.Generator,
               starts: int = SPLIT_STARTS) -> np.ndarray:
    """The two-subgroup split of one class with the largest statistic J over ``starts`` random starts."""
    splits = [split_class(x, model.precision, rng) for _ in range(starts)]
    return max(splits, key=lambda group: split_statistic(x, group, model))


def scan_classes(features: np.ndarray, labels: np.ndarray, *, seed: int) -> dict:
    """Global models, per-class splits and statistics: ``{"classes", "index": J* per class,
    "group": each sample's subgroup (bool) in its class's split, "model": the subgroup-level model,
    "distance": each sample's squared Mahalanobis distance from its class's mean under that model}``."""
    features = np.asarray(features, dtype=np.float64)
    classes, inverse = np.unique(np.asarray(labels), return_inverse=True)
    x = features - features.mean(axis=0)
    class_model = fit_global_model(features, inverse)
    rng = np.random.default_rng(seed)
    group = np.zeros(len(inverse), dtype=bool)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    for rows in members:
        if len(rows) >= 2:
            group[rows] = best_split(x[rows], class_model, rng)
    # the same splits scored under a model whose identities are the subgroups (see the module's notes)
    model = fit_global_model(features, 2 * inverse + group)
    statistics = np.array([split_statistic(x[rows], group[rows], model) if len(rows) >= 2 else 0.0
                           for rows in members])
    distance = np.zeros(len(inverse))
    for rows in members:
        offsets = x[rows] - x[rows].mean(axis=0)
        distance[rows] = np.einsum("ij,jk,ik->i", offsets, model.precision, offsets)
    return {"classes": classes, "index": anomaly_index(statistics), "group": group, "model": model,
            "distance": distance}


