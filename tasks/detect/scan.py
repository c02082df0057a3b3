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
The paper fits the global model on a trusted clean subset; we have none, and that changes four things:

- **The global model is fitted on the subgroups.** Fitted on the poisoned classes, S_ε absorbs the
  gap between a contaminated class's two identities, and whitening by F = S_ε⁻¹ then shrinks the
  very direction the test needs: on MNIST with BadNets all-to-one at 10 % the target class's J* was
  -1.1 (e² is 7.4). So the model is fitted twice: once on the classes, to split each class, and
  again with each class's two subgroups as two identities, under which every class's split is
  scored. A clean class splits one identity in two and gains little; a contaminated one loses
  its inflated S_ε (J* 45 and 57 on two seeds there; no class above 5 on clean MNIST and Fashion-MNIST).
- **Each split is the best of several starts.** The two-subgroup EM from one random start (as in
  the toolkits) stops in local optima; the split kept is the one with the largest log-likelihood
  ratio J over ``SPLIT_STARTS`` seeded starts.
- **The poisonous subgroup is chosen by exclusionary reclassification** (as in
  ``activation_clustering``): the subgroup whose members a leave-one-out neighbour vote in input
  space mostly gives to other labels. The toolkits pick the subgroup holding fewer clean samples;
  "the smaller subgroup" fails where the poisons are half the target class (all-to-one at 10 %
  over ten classes). ``subgroup="smaller"`` keeps that rule.
- **A class is flagged only when its statistic is unusually large** (the toolkits take |J*|,
  which would also flag a class whose statistic is unusually small, i.e. unusually homogeneous).

Per-sample scores are ours (the paper decides per class): j_i + m_i / (m_i + r), where j_i is 1
for the flagged samples and 0 otherwise, m_i is sample i's squared Mahalanobis distance from its
class's mean under F, i.e. how badly the one-identity model of its class explains it, and r the
rank of F, the value m takes on average under that model (so a typical sample scores about 0.5). Every
flagged sample therefore outranks every other, as in ``activation_clustering``. (The first form,
membership of the smaller subgroup times 1 + J*, ranked poisons *below* clean samples wherever no
class was flagged, AUROC 0.29-0.44 at one-shift 1 % and random flip 10 % on MNIST and
Fashion-MNIST: with a few poisons per class, the best split of a class follows its own variation,
and the poisons may sit on either side of it.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch

from poisonsweep.tasks.detect import linalg
from poisonsweep.tasks.detect.activation_clustering import (REPRESENTATIONS, cached_reclassification,
                                                             judge_by_reclassification)
from poisonsweep.tasks.detect.base import DETECTORS, Detection, DetectionContext
from poisonsweep.tasks.detect.neighbours import SEARCHES
from poisonsweep.tasks.registry import Interval, Options

__all__ = ["GlobalModel", "fit_global_model", "split_class", "best_split", "split_statistic", "anomaly_index",
           "scan_classes", "scan"]

THRESHOLD = math.exp(2)  # the paper's and BackdoorBench's cut on the anomaly index
TOLERANCE = 1e-5  # EM convergence (the toolkits' EPS)
MAX_ITERATIONS = 100
MAD_TO_SIGMA = 1.4826
SPLIT_STARTS = 8  # random starts of each class's two-subgroup EM; the largest J is kept
SUBGROUP_RULES = ("reclassification", "smaller")


@dataclass
class GlobalModel:
    identity_cov: torch.Tensor  # S_μ, (d, d)
    variation_cov: torch.Tensor  # S_ε, (d, d)
    precision: torch.Tensor  # F = pinv(S_ε)


def _posterior_identities(sums: torch.Tensor, counts: torch.Tensor, identity_cov: torch.Tensor,
                          variation_cov: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """E[μ_c | class c's samples] = S_ε (n_c S_μ + S_ε)⁻¹ S_μ F · Σ_i x_i for every class c at once
    (the toolkits' E-step; one batched pseudo-inverse): (classes, d)."""
    gains = torch.linalg.pinv(counts[:, None, None] * identity_cov + variation_cov) @ (identity_cov @ precision)
    return (variation_cov @ gains @ sums[:, :, None])[:, :, 0]


def _spread(identities: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
    """``np.cov(identities[inverse], rowvar=False)`` without the (n, d) copy: each class's identity
    weighted by its count."""
    mean = (counts[:, None] * identities).sum(dim=0) / total
    centred = identities - mean
    return linalg.second_moment(centred, counts) / (total - 1)


def fit_global_model(features, labels: np.ndarray) -> GlobalModel:
    """S_μ and S_ε by EM over every class (features centred on their overall mean), in torch on the
    device of ``features`` (a numpy array runs on the CPU)."""
    features = linalg.as_tensor(features, features.device if torch.is_tensor(features) else None)
    x = features - features.mean(dim=0)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = torch.as_tensor(inverse, device=x.device)
    counts = torch.as_tensor(counts, dtype=x.dtype, device=x.device)
    sums = x.new_zeros((len(classes), x.shape[1])).index_add_(0, inverse, x)
    identities = sums / counts[:, None]
    identity_cov = _spread(identities, counts, len(x))
    variation_cov = linalg.centred_covariance(x - identities[inverse])
    for _ in range(MAX_ITERATIONS):
        precision = torch.linalg.pinv(variation_cov)
        identities = _posterior_identities(sums, counts, identity_cov, variation_cov, precision)
        new_identity = _spread(identities, counts, len(x))
        new_variation = linalg.centred_covariance(x - identities[inverse])
        change = float(torch.linalg.norm(new_identity - identity_cov) + torch.linalg.norm(new_variation - variation_cov))
        identity_cov, variation_cov = new_identity, new_variation
        if change <= TOLERANCE:
            break
    return GlobalModel(identity_cov, variation_cov, torch.linalg.pinv(variation_cov))


def split_class(x: torch.Tensor, precision: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """Two-subgroup EM of one class; True for the members of subgroup 1.

    Starts from a random assignment (drawn by ``rng`` in numpy, as before the move to torch) and
    alternates subgroup means and the linear discriminant until the assignment (or its complement) repeats.
    """
    n = len(x)
    group = rng.random(n) >= 0.5
    if group.all() or not group.any():
        group[0] = not group[0]
    previous = None
    for _ in range(MAX_ITERATIONS):
        if group.all() or not group.any():
            break
        mask = torch.as_tensor(group, device=x.device)
        u1, u2 = x[mask].mean(dim=0), x[~mask].mean(dim=0)
        bias = u1 @ precision @ u1 - u2 @ precision @ u2
        new = (bias - 2 * (x @ (precision @ (u1 - u2))) < 0).cpu().numpy()
        if previous is not None and (np.array_equal(new, previous) or np.array_equal(new, ~previous)):
            group = new
            break
        previous, group = group, new
    return group


def class_identity(x: torch.Tensor, model: GlobalModel) -> torch.Tensor:
    """The posterior identity of all of ``x`` taken as one class (the null of ``split_statistic``)."""
    count = torch.tensor([len(x)], dtype=x.dtype, device=x.device)
    return _posterior_identities(x.sum(dim=0)[None], count, model.identity_cov, model.variation_cov, model.precision)[0]


def split_statistic(x: torch.Tensor, group: np.ndarray, model: GlobalModel, mu: torch.Tensor | None = None) -> float:
    """The per-sample log-likelihood ratio J of two subgroups against one identity (``calc_test``);
    ``mu``: ``class_identity(x, model)`` when the caller already has it (it depends on the class only)."""
    n = len(x)
    precision = model.precision
    mu = class_identity(x, model) if mu is None else mu
    mask = torch.as_tensor(group, device=x.device)
    statistic = 0.0
    for members in (mask, ~mask):
        size = int(members.sum())
        u = x[members].mean(dim=0) if size else mu
        statistic += size * float(mu @ precision @ mu - u @ precision @ u)
        statistic -= 2 * float(x[members].sum(dim=0) @ precision @ (mu - u))
    return statistic / n


def anomaly_index(values: np.ndarray) -> np.ndarray:
    """(v/max v − median) / (1.4826·MAD), signed (the toolkits' ``calc_anomaly_index`` without |·|)."""
    scaled = values / np.max(np.abs(values))
    median = np.median(scaled)
    mad = MAD_TO_SIGMA * np.median(np.abs(scaled - median))
    return (scaled - median) / mad if mad > 0 else np.zeros_like(scaled)


def best_split(x: torch.Tensor, model: GlobalModel, rng: np.random.Generator,
               starts: int = SPLIT_STARTS) -> np.ndarray:
    """The two-subgroup split of one class with the largest statistic J over ``starts`` random starts."""
    splits = [split_class(x, model.precision, rng) for _ in range(starts)]
    mu = class_identity(x, model)  # one pseudo-inverse for every start
    return max(splits, key=lambda group: split_statistic(x, group, model, mu))


def scan_classes(features: np.ndarray, labels: np.ndarray, *, seed: int, device=None) -> dict:
    """Global models, per-class splits and statistics: ``{"classes", "index": J* per class,
    "group": each sample's subgroup (bool) in its class's split, "model": the subgroup-level model,
    "distance": each sample's squared Mahalanobis distance from its class's mean under that model}``.
    The linear algebra runs in torch on ``device``."""
    features = linalg.as_tensor(features, device)
    classes, inverse = np.unique(np.asarray(labels), return_inverse=True)
    x = features - features.mean(dim=0)
    class_model = fit_global_model(features, inverse)
    rng = np.random.default_rng(seed)
    group = np.zeros(len(inverse), dtype=bool)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    rows_of = [torch.as_tensor(rows, device=x.device) for rows in members]
    for rows, index in zip(members, rows_of):
        if len(rows) >= 2:
            group[rows] = best_split(x[index], class_model, rng)
    # the same splits scored under a model whose identities are the subgroups (see the module's notes)
    model = fit_global_model(features, 2 * inverse + group)
    statistics = np.array([split_statistic(x[index], group[rows], model) if len(rows) >= 2 else 0.0
                           for rows, index in zip(members, rows_of)])
    distance = np.zeros(len(inverse))
    for rows, index in zip(members, rows_of):
        offsets = x[index] - x[index].mean(dim=0)
        distance[rows] = ((offsets @ model.precision) * offsets).sum(dim=1).cpu().numpy()
    return {"classes": classes, "index": anomaly_index(statistics), "group": group, "model": model,
            "distance": distance}


def poisonous_subgroups(result: dict, labels: np.ndarray, contaminated: np.ndarray, *, rule: str,
                        reclassify) -> np.ndarray:
    """Which samples to flag: in each ``contaminated`` class, the subgroup judged poisonous.

    ``rule="smaller"``: the smaller subgroup. ``rule="reclassification"``: the subgroup that
    exclusionary reclassification judges poisonous (none when it judges both or neither);
    ``reclassify()`` gives every sample's reclassified label, asked for only if some class is flagged.
    """
    group, classes = result["group"], result["classes"]
    flagged = np.zeros(len(labels), dtype=bool)
    predicted = None
    for label in classes[contaminated]:
        rows = np.flatnonzero(labels == label)
        smaller = group[rows] if group[rows].sum() <= (~group[rows]).sum() else ~group[rows]
        if rule == "smaller":
            flagged[rows] = smaller
            continue
        if predicted is None:  # one vote over the whole training set
            predicted = reclassify()
        flagged[rows] = judge_by_reclassification(predicted[rows], label, smaller)
    return flagged


@DETECTORS.register(
    "scan",
    {"threshold": [Interval(Real, 0, None, "neither")], "subgroup": [Options(SUBGROUP_RULES)],
     "representation": [Options(REPRESENTATIONS)], "k": [Interval(Integral, 1)], "search": [Options(SEARCHES)]},
    help="Tang et al. 2021: two-subgroup decomposition per class against a global identity/variation model.",
)
def scan(context: DetectionContext, *, seed: int, threshold: float = THRESHOLD, subgroup: str = "reclassification",
         representation: str = "input", k: int = 50, search: str = "auto") -> Detection:
    """SCAn on the penultimate activations; higher = more suspicious.

    Parameters
    ----------
    context : DetectionContext
        Uses ``context.features``, ``context.labels`` and, to judge the subgroups of a flagged
        class in input space, ``context.x_train``.
    seed : int
        Seeds the random starts of each class's split.
    threshold : float, default=e²
        A class is contaminated when its anomaly index J* exceeds this (the paper's e²).
    subgroup : {"reclassification", "smaller"}, default="reclassification"
        Which subgroup of a contaminated class is flagged: the one exclusionary reclassification
        judges poisonous (see the module's notes), or the smaller one.
    representation : {"input", "features"}, default="input"
        Where the reclassifying neighbour vote is taken (as in ``activation_clustering``).
    k : int, default=50
        Neighbours in that vote (as in ``activation_clustering``).
    search : {"auto", "exact", "hnsw"}, default="auto"
        How that vote's neighbours are found (as in ``activation_clustering``).

    Returns
    -------
    detection : Detection
        ``flagged``: the poisonous subgroup of every class with J* > threshold. ``scores`` (float64
        in [0, 2)): j_i + m_i / (m_i + r), j_i = 1 for flagged samples, m_i the squared Mahalanobis
        distance from the class mean under the global model, r the rank of its precision (see the
        module's notes).
    """
    labels = np.asarray(context.labels)
    result = scan_classes(context.features, labels, seed=seed, device=context.device)
    flagged = poisonous_subgroups(
        result, labels, result["index"] > threshold, rule=subgroup,
        reclassify=lambda: cached_reclassification(context, representation, k, search)[0])
    distance = result["distance"]
    expected = max(int(torch.linalg.matrix_rank(result["model"].precision)), 1)  # E[m] under the model
    return Detection(scores=flagged + distance / (distance + expected), flagged=flagged)
