"""Deep k-NN (Peri et al., 2020): a label that disagrees with its feature-space neighbours is suspect.

Peri et al., "Deep k-NN Defense against Clean-label Data Poisoning Attacks" (ECCV-W 2020,
arXiv 1909.13374). Every training sample is embedded with the trained network's penultimate
layer; a sample whose given label is not the plurality label of its ``k`` nearest neighbours
(Euclidean distance) is removed. The authors' code (``neeharperi/DeepKNNDefense``,
``dataLoader.py``) fits scikit-learn's ``KNeighborsClassifier(algorithm='brute')`` on the
training features and predicts those same features, so there each sample also votes for itself;
here the sample is left out of its own neighbour list, as the detector is meant to ask what the
*other* samples around it say.

Choice of the default ``k = 50``: the authors sweep k in {1, 2, 5, 10, 20, 50, 100, 200, 500}
on a fine-tuning set of 50 images per class (``runAllExperiments.py``); their ablation gives a
guideline for k that we did not retrieve verbatim, so the default rests on this argument: the
neighbourhood must out-vote poisons that sit together in feature space (a flip or one-shift
attack puts many same-label poisons in one region), which wants k well above 1, yet stay inside
one class, which wants k at most a class size. 50 is one of their swept values, below the class
size of the small set-ups this tool runs (digits: ~135 per class; MNIST or CIFAR-10 subsets:
hundreds), and cheap. Raise ``k`` towards the per-class count for high poison rates.

Decision. The paper removes every sample whose label is not its neighbours' plurality label
(``flag_rule="plurality"``). That also removes every clean sample on a class boundary, which at
low poison rates outnumbers the poisons (MNIST 7,500, one-shift 1 %: 220 flags for 75 poisons,
benchmarks/RESULTS.md §9). The default ``flag_rule="cleanlab"`` is confident learning's filter
on the neighbours' vote shares instead: they are out-of-sample class probabilities (the sample
never votes for itself), so ``cleanlab.filter.find_label_issues`` (its default
``prune_by_noise_rate``; Northcutt, Jiang & Chuang, JAIR 2021) decides on them as on any
held-out probabilities, pruning per given label by the margin of the out-voting class.
``flag_rule="auto"`` flags the highest disagreement scores, as many as cleanlab counts label
errors in the same shares (``base.label_issue_count``). Whatever the rule, a flagged sample's
score is lifted by one constant where needed so that it is at least every unflagged score
(``label_issues.lift_flagged``): the cleanlab and plurality flags are not always the top
disagreement shares.
"""

from __future__ import annotations

import warnings

import numpy as np

from poisonsweep.tasks.detect.base import DETECTORS, Detection, DetectionContext, flag_top_n, label_issue_count
from poisonsweep.tasks.detect.label_issues import cleanlab_flags, lift_flagged
from poisonsweep.tasks.detect.neighbours import SEARCHES, nearest_neighbours
from poisonsweep.tasks.registry import BelowData, Options, TrialWarning

KNN_FLAG_RULES = ("cleanlab", "auto", "plurality")

# The tie-break term is at most this share of one neighbour's vote (1/k), so it orders samples
# with equal disagreement shares and never reorders samples whose shares differ.
TIE_BREAK_WEIGHT = 1e-3


def vote_counts(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """How many of each sample's neighbours carry each label, int64 of shape (n_samples, num_classes)."""
    n = len(neighbour_labels)
    counts = np.zeros((n, num_classes), dtype=np.int64)
    rows = np.broadcast_to(np.arange(n)[:, None], neighbour_labels.shape)
    np.add.at(counts, (rows, neighbour_labels), 1)
    return counts


def plurality_labels(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Most common label per row; a tie goes to the tied label of the nearest neighbour.

    Parameters
    ----------
    neighbour_labels : ndarray of shape (n_samples, k), int
        Labels of each sample's neighbours, nearest first.
    num_classes : int

    Returns
    -------
    plurality : ndarray of shape (n_samples,), int64
    """
    n = len(neighbour_labels)
    rows = np.arange(n)[:, None]
    counts = vote_counts(neighbour_labels, num_classes)
    is_top = counts == counts.max(axis=1, keepdims=True)
    # columns are in distance order, so the first neighbour carrying a top label decides the tie
    first_top = np.argmax(is_top[rows, neighbour_labels], axis=1)
    return neighbour_labels[np.arange(n), first_top].astype(np.int64)


def disagreement_scores(distances: np.ndarray, disagrees: np.ndarray) -> np.ndarray:
    """Share of disagreeing neighbours, plus a tiny closeness term that orders equal shares.

    score_i = share_i + TIE_BREAK_WEIGHT / k * w_i, where share_i is the fraction of the k
    neighbours whose label differs from label i, and w_i in [0, 1] is the same fraction weighted
    by inverse distance (1 / (d + eps)). Between two samples with the same share, the one whose
    disagreeing neighbours are closer scores higher; since w_i <= 1 and shares are multiples of
    1/k, the term never overturns a difference in share.

    Parameters
    ----------
    distances : ndarray of shape (n_samples, k)
    disagrees : ndarray of shape (n_samples, k), bool
        Whether each neighbour's label differs from the sample's given label.

    Returns
    -------
    scores : ndarray of shape (n_samples,), float64, higher = more suspicious
    """
    k = distances.shape[1]
    share = disagrees.sum(axis=1) / k
    # eps keeps duplicates (distance 0) finite; scaled to the data so units do not matter
    eps = 1e-9 * max(float(np.median(distances)), np.finfo(np.float64).tiny)
    inverse = 1.0 / (distances + eps)
    weighted_share = (inverse * disagrees).sum(axis=1) / inverse.sum(axis=1)
    return (share + TIE_BREAK_WEIGHT / k * weighted_share).astype(np.float64)


def deep_knn(features: np.ndarray, labels: np.ndarray, num_classes: int, k: int,
             flag_rule: str = "cleanlab", device: str = "cpu", search: str = "exact") -> Detection:
    """Deep k-NN scores and flags on given features (the pure part of the ``knn`` detector).

    Parameters
    ----------
    features : ndarray of shape (n_samples, n_features)
    labels : ndarray of shape (n_samples,), int
        Given (possibly poisoned) labels.
    num_classes : int
    k : int
        Neighbours per sample; lowered to n_samples - 1 when the set is smaller, with a
        ``TrialWarning`` (the value used is returned in ``extras["k"]``). A sweep refuses such a
        ``k`` before any trial starts (its ``BelowData`` constraint).
    flag_rule : {"cleanlab", "auto", "plurality"}, default="cleanlab"
        ``"cleanlab"``: cleanlab's own decision on the neighbours' vote shares
        (``find_label_issues``, its default ``prune_by_noise_rate``), which ranks by the margin
        of the out-voting class, as the plurality rule does, rather than by the pooled
        disagreement share; ``"auto"``: the top n scores, n = confident learning's count of label
        errors from those shares; ``"plurality"``: the paper's rule (module docstring).
    device : str, default="cpu"
    search : {"exact", "hnsw", "auto"}, default="exact"
        How the neighbours are found (``neighbours.nearest_neighbours``).

    Returns
    -------
    detection : Detection
        ``scores`` (float64, higher = more suspicious) from :func:`disagreement_scores`, the
        flagged ones lifted to the unflagged maximum where lower (``label_issues.lift_flagged``);
        ``flagged`` by ``flag_rule``;
        ``extras["plurality_label"]`` and ``extras["k"]``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n < 2:
        raise ValueError(f"knn needs at least 2 training samples; got {n}")
    k_used = min(int(k), n - 1)
    if k_used < k:  # a sweep's config check refuses this; a direct call is told what it got
        warnings.warn(TrialWarning(
            f"knn k={k} is not below the {n} samples it votes over: used k={k_used}, so every sample's neighbours "
            "are all the others and the votes say little; set detectors[].params.k below the training samples"), stacklevel=2)
    distances, indices = nearest_neighbours(np.asarray(features, dtype=np.float64), k_used, device=device,
                                             search=search)
    neighbour_labels = labels[indices]
    plurality = plurality_labels(neighbour_labels, num_classes)
    scores = disagreement_scores(distances, neighbour_labels != labels[:, None])
    shares = vote_counts(neighbour_labels, num_classes) / k_used
    if flag_rule == "plurality":
        flagged = plurality != labels
    elif flag_rule == "cleanlab":
        flagged = cleanlab_flags(labels, shares)
    elif flag_rule == "auto":
        flagged = flag_top_n(scores, label_issue_count(labels, shares))
    else:
        raise ValueError(f"knn flag_rule must be one of {KNN_FLAG_RULES}; got {flag_rule!r}")
    return Detection(scores=lift_flagged(scores, flagged), flagged=flagged,
                     extras={"plurality_label": plurality, "k": k_used})


@DETECTORS.register(
    "knn",
    {"k": [BelowData(low=1, of="train_samples")], "flag_rule": [Options(KNN_FLAG_RULES)], "search": [Options(SEARCHES)]},
    help="Deep k-NN (Peri et al. 2020): share of the k nearest neighbours whose label disagrees",
)
def knn(context: DetectionContext, *, seed: int, k: int = 50, flag_rule: str = "cleanlab", search: str = "auto") -> Detection:
    """Deep k-NN on the penultimate features of the trained model.

    Parameters
    ----------
    context : DetectionContext
    seed : int
        Unused: the search is deterministic (exact, or a graph built on one thread).
    k : int, default=50
        Neighbours per sample (see the module docstring for the choice).
    flag_rule : {"cleanlab", "auto", "plurality"}, default="cleanlab"
        ``"cleanlab"``: cleanlab's ``find_label_issues`` on the vote shares; ``"auto"``: flag as
        many as confident learning counts label errors in them; ``"plurality"``: the paper's
        plurality label != given label (see :func:`deep_knn`).
    search : {"auto", "exact", "hnsw"}, default="auto"
        How the neighbours are found: exact, from a faiss HNSW graph (approximate, n log n), or
        exact up to ``neighbours.EXACT_MAX_SAMPLES`` (20,000) samples on the CPU and the graph above
        (``neighbours.nearest_neighbours``; at 50,000 samples of 128 features the graph is used).

    Returns
    -------
    detection : Detection
        Score = share of the k neighbours whose label differs from the given label (plus a
        closeness tie-break below 1/k); ``flagged`` by ``flag_rule``.
    """
    return deep_knn(context.features, context.labels, context.num_classes, k, flag_rule, device=context.device,
                    search=search)
