"""Activation clustering (Chen et al. 2018, arXiv 1811.03728; ART ``ActivationDefence``).

For each given label, reduce the penultimate activations of the samples carrying that label
to a few dimensions (PCA by default, as ART does; FastICA as in the paper) and split them with
2-means. Poisons carry their source class's features (or a trigger), so in a poisoned class
they form one of the two clusters; a clean class splits into two halves of one content.

Which cluster is poisonous is decided by the paper's *exclusionary reclassification* (the
default ``analysis``, see :func:`judge_by_reclassification`): a cluster is poisonous when its
members are mostly classified as another label by a classifier that does not rest on the
poisoned network. The paper's size and silhouette analyses remain as options.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from poisonsweep.tasks.detect.base import DETECTORS, Detection, DetectionContext
from poisonsweep.tasks.detect.knn import plurality_labels
from poisonsweep.tasks.detect.neighbours import SEARCHES, nearest_neighbours
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.registry import Interval, Options
from poisonsweep.tasks.train import predict_logits, train_model

REDUCERS = ("ica", "pca")
ANALYSES = ("exclusionary_reclassification", "relative_size", "silhouette", "smaller")
REPRESENTATIONS = ("input", "features")
RECLASSIFIERS = ("neighbours", "retrain")
KMEANS_INITS = 10  # k-means restarts per class (fixed, so results depend only on the seed)
SPREAD_RTOL = 1e-12  # a class whose activations vary less than this (relative) has no spread
SILHOUETTE_MAX_SAMPLES = 5_000  # silhouette is O(n²): larger classes use a seeded sample

__all__ = ["ANALYSES", "REDUCERS", "REPRESENTATIONS", "ClassSplit", "split_class", "is_poison_cluster",
           "reclassify_by_neighbours", "cached_reclassification", "judge_by_reclassification",
           "activation_clustering"]


@dataclass(frozen=True)
class ClassSplit:
    """The 2-means split of one class: which samples are in the smaller cluster, and how strongly."""

    in_small: np.ndarray  # bool, (n_class,)
    margin: np.ndarray  # float in [-1, 1], (n_class,): + = closer to the small cluster's centre
    small_fraction: float  # share of the class in the smaller cluster, in (0, 0.5]
    silhouette: float  # mean silhouette of the split (NaN unless asked for)


def reduce_activations(centred: np.ndarray, n_components: int, reduce: str, seed: int) -> np.ndarray:
    """Project one class's centred activations to ``n_components`` dimensions.

    FastICA is capped at the rank of the activations (dead ReLU units, tiny classes): its
    whitening divides by the variance of each direction and would blow up on zero ones.
    """
    if reduce == "pca":
        return PCA(n_components, random_state=seed).fit_transform(centred)
    rank = np.linalg.matrix_rank(centred)  # >= 1: split_class rejects classes without spread
    # ART's settings: FastICA(n_components=10, max_iter=1000, tol=0.005)
    ica = FastICA(min(n_components, rank), whiten="unit-variance", max_iter=1000, tol=0.005, random_state=seed)
    return ica.fit_transform(centred)


def split_class(features: np.ndarray, *, n_components: int, reduce: str, seed: int,
                with_silhouette: bool = False) -> ClassSplit | None:
    """Reduce and 2-means one class; None when the class is too small or has no spread.

    Too small means fewer than ``n_components + 1`` samples: with so few points a 2-means
    split says nothing about poisoning (3 samples always split 1/2 and a third is < 0.35).
    """
    n = len(features)
    if n < n_components + 1 or np.ptp(features, axis=0).max() <= SPREAD_RTOL * np.abs(features).max():
        return None
    centred = features - features.mean(axis=0)
    if centred.shape[1] <= n_components:
        reduced = centred  # as in ART: activations no wider than n_components are used as they are
    else:
        reduced = reduce_activations(centred, n_components, reduce, seed)
    kmeans = KMeans(n_clusters=2, n_init=KMEANS_INITS, random_state=seed).fit(reduced)
    sizes = np.bincount(kmeans.labels_, minlength=2)
    if sizes.min() == 0:
        return None
    small = int(np.argmin(sizes))  # an even split marks cluster 0, like ART's "smaller"
    small_centre, big_centre = kmeans.cluster_centers_[small], kmeans.cluster_centers_[1 - small]
    gap = np.linalg.norm(big_centre - small_centre)
    if not gap > 0:
        return None
    # (distance to big centre − distance to small centre) / distance between centres: the
    # triangle inequality keeps it in [-1, 1] whatever the scale of this class's space
    margin = (np.linalg.norm(reduced - big_centre, axis=1) - np.linalg.norm(reduced - small_centre, axis=1)) / gap
    silhouette = float("nan")
    if with_silhouette:
        sample_size = SILHOUETTE_MAX_SAMPLES if n > SILHOUETTE_MAX_SAMPLES else None
        silhouette = float(silhouette_score(reduced, kmeans.labels_, sample_size=sample_size, random_state=seed))
    return ClassSplit(kmeans.labels_ == small, np.clip(margin, -1.0, 1.0), sizes[small] / n, silhouette)


def is_poison_cluster(split: ClassSplit, *, analysis: str, size_threshold: float, silhouette_threshold: float) -> bool:
    """Chen et al.'s size-based cluster analyses of the smaller cluster, with ART's thresholds.

    ``relative_size``: the small cluster holds less than ``size_threshold`` of the class.
    ``silhouette``: that, and the split is clear (mean silhouette > ``silhouette_threshold``).
    ``smaller``: ART's default; the small cluster of every class is poison.
    """
    if analysis == "smaller":
        return True
    small_enough = split.small_fraction < size_threshold
    if analysis == "relative_size":
        return small_enough
    return small_enough and split.silhouette > silhouette_threshold


def reclassify_by_neighbours(space: np.ndarray, labels: np.ndarray, num_classes: int, k: int,
                             device: str = "cpu", search: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """Classify every sample by the plurality label of its ``k`` nearest *other* samples
    (``neighbours.nearest_neighbours`` on ``device``, exact or from the HNSW graph by ``search``).

    Returns the predicted labels (n,) and each sample's share of neighbours whose label differs
    from its own (n,), in [0, 1]. The sample itself never votes, its cluster-mates do.
    """
    k_used = min(int(k), len(labels) - 1)
    _, neighbours = nearest_neighbours(space, k_used, device=device, search=search)
    neighbour_labels = labels[neighbours]
    disagreement = (neighbour_labels != labels[:, None]).mean(axis=1)
    return plurality_labels(neighbour_labels, num_classes), disagreement


def judge_by_reclassification(predicted: np.ndarray, label: int, in_small: np.ndarray) -> np.ndarray:
    """Exclusionary reclassification of one class's two clusters: which members to flag.

    A cluster is poisonous when its members are mostly predicted as a label other than
    ``label`` (at most half predicted as ``label``). When both clusters are judged poisonous,
    neither is flagged: the clean data holds examples of every class, so a class all of whose
    content the reclassifier gives to other labels is a class it cannot judge (for example a
    source class of which the poison relabelled half), not one made only of poisons.

    Parameters
    ----------
    predicted : ndarray of shape (n_class,), int
        The reclassified labels of the class's members.
    label : int
    in_small : ndarray of shape (n_class,), bool
        Which members are in one cluster (the rest are in the other).

    Returns
    -------
    flagged : ndarray of shape (n_class,), bool
    """
    clusters = (in_small, ~in_small)
    poisonous = [2 * np.count_nonzero(predicted[members] == label) <= members.sum() for members in clusters]
    flagged = np.zeros(len(predicted), dtype=bool)
    if not all(poisonous):
        for members, is_poisonous in zip(clusters, poisonous):
            flagged[members] = is_poisonous
    return flagged


def cached_reclassification(context: DetectionContext, representation: str, k: int,
                            search: str) -> tuple[np.ndarray, np.ndarray]:
    """``reclassify_by_neighbours`` of the trial's samples, computed once per (representation, k, search):
    activation clustering and SCAn take the same vote."""
    key = ("reclassify_by_neighbours", representation, int(k), search)
    if key not in context.cache:
        context.cache[key] = reclassify_by_neighbours(reclassification_space(context, representation),
                                                      np.asarray(context.labels), context.num_classes, k,
                                                      device=context.device, search=search)
    return context.cache[key]


def retrained_probs(context: DetectionContext, suspects: np.ndarray, seed: int) -> np.ndarray:
    """Class probabilities of every sample under a model trained *without* the ``suspects``.

    Chen et al.'s exclusionary reclassification (2018, §4.1): train a fresh network of the
    trial's own architecture, parameters and training settings (``context.train_config``, on
    its device) on the training set minus the suspect clusters, then classify the suspects.
    The model never sees a suspect, so a trigger or a flip carried only by the suspects is not
    learned; what it predicts for them is what the rest of the data says. Seeded from ``seed``.
    """
    keep = np.flatnonzero(~suspects)
    model_seed = int(np.random.SeedSequence([seed, 1811]).generate_state(1)[0])
    model = build_model(context.model_name, tuple(context.x_train.shape[1:]), context.num_classes,
                        context.model_params, seed=model_seed)
    labels = torch.as_tensor(np.asarray(context.labels)[keep], dtype=torch.int64)
    train_model(model, context.x_train[torch.as_tensor(keep)], labels, context.train_config, seed=model_seed)
    return torch.softmax(predict_logits(model, context.x_train).double(), dim=1).numpy()


def cached_retrained_probs(context: DetectionContext, suspects: np.ndarray, seed: int) -> np.ndarray:
    """``retrained_probs`` once per (suspect set, seed) of the trial."""
    key = ("activation_clustering.retrained_probs", seed, hashlib.sha1(np.packbits(suspects).tobytes()).hexdigest())
    if key not in context.cache:
        context.cache[key] = retrained_probs(context, suspects, seed)
    return context.cache[key]


def reclassification_space(context: DetectionContext, representation: str):
    """The samples as the reclassifier sees them: flattened inputs or penultimate activations."""
    if representation == "features":
        return np.asarray(context.features, dtype=np.float64)
    images = context.x_train.detach()
    return images.reshape(len(images), -1)


@DETECTORS.register(
    "activation_clustering",
    {
        "n_components": [Interval(Integral, 1)],
        "reduce": [Options(REDUCERS)],
        "analysis": [Options(ANALYSES)],
        "representation": [Options(REPRESENTATIONS)],
        "reclassifier": [Options(RECLASSIFIERS)],
        "k": [Interval(Integral, 1)],
        "search": [Options(SEARCHES)],
        "size_threshold": [Interval(Real, 0, 0.5)],
        "silhouette_threshold": [Interval(Real, -1, 1)],
    },
    help="Chen et al. 2018: 2-means on each class's reduced penultimate activations, "
         "clusters judged by exclusionary reclassification.",
)
def activation_clustering(context: DetectionContext, *, seed: int, n_components: int = 10, reduce: str = "pca",
                          analysis: str = "exclusionary_reclassification", reclassifier: str = "neighbours",
                          representation: str = "input",
                          k: int = 50, search: str = "auto", size_threshold: float = 0.35,
                          silhouette_threshold: float = 0.10) -> Detection:
    """Activation clustering of the penultimate activations; higher = more suspicious.

    Parameters
    ----------
    context : DetectionContext
        Uses ``context.features`` (clustering), ``context.labels`` (the given labels) and,
        with ``representation="input"``, ``context.x_train``.
    seed : int
        Seeds FastICA / PCA, k-means (``n_init=10``) and the silhouette sample.
    n_components : int, default=10
        Dimensions per class after reduction (the paper's 10).
    reduce : {"ica", "pca"}, default="pca"
        FastICA as in the paper, or PCA as in ART's ``ActivationDefence`` (its default).
        PCA is the default because it finds the poisons far better here: FastICA whitens
        every component to unit variance, so the high-variance poison direction weighs no
        more in k-means than nine noise directions, and on ~130-sample classes it often
        does not converge. One-shift flips of 10 % of sklearn digits, AUROC ica / pca:
        MLP 0.73 / 0.94, Keras CNN 0.81 / 0.995 (both take < 1 s).
    analysis : {"exclusionary_reclassification", "relative_size", "silhouette", "smaller"}, \
default="exclusionary_reclassification"
        How the clusters of a class are judged. The default is the paper's decisive analysis,
        exclusionary reclassification (ExRe): leave the cluster's samples out, classify them
        with what the rest of the data says, and call the cluster poisonous when its members are
        mostly classified as a label other than their own (:func:`judge_by_reclassification`).
        The paper retrains the network without the cluster; here the reclassifier is a
        k-nearest-neighbour vote (:func:`reclassify_by_neighbours`), and two changes make it
        hold when poisons are a third or half of their class, as follows.

        *What is left out is the sample, not the whole cluster.* When one cluster holds every
        clean example of its class (one-shift at 33 % puts each digit under two labels; BadNets
        all-to-one at 10 % makes the target class half poison), training without that cluster
        leaves the class without its content, so the clean cluster is classified as another
        label and both clusters look poisonous. Leaving out one member at a time keeps its
        cluster-mates as evidence, so the vote counts which label holds most of the content.

        *The reclassifier does not rest on the poisoned network.* A learned backdoor maps
        triggered images onto the target class in the penultimate activations, so a classifier
        on those activations sends them back to the target even without the poisons: refitting
        the last layer without the trigger cluster still predicted the target for 97 % of it
        (sklearn digits, BadNets all-to-one 10 %), and a neighbour vote on them flags nothing.
        ``representation="input"`` (the default) votes among the training inputs themselves,
        which no training has shaped; see ``representation``.

        ``relative_size``, ``silhouette`` and ``smaller`` are the paper's / ART's analyses of
        the smaller cluster (:func:`is_poison_cluster`); they cannot tell which of two clusters
        is poisonous when the poisons are the larger one.
    reclassifier : {"neighbours", "retrain"}, default="neighbours"
        What classifies the samples in exclusionary reclassification. ``"neighbours"``: the
        leave-one-out k-NN vote in ``representation`` (above). ``"retrain"``: the paper's own
        reclassifier, a fresh model of the trial's architecture and training settings trained
        without every class's smaller cluster (the suspects), which then predicts every sample
        (:func:`retrained_probs`; costs one training). It rests on no pixel similarity, so it
        suits natural images; a smaller cluster is poisonous when at most half its members are
        predicted as their label. Its limit is the one the paper has: when the poisons are the
        *larger* cluster of their class, the clean cluster is left out and judged by a model
        that never saw the class's content. Scores s_i = (1 − p_i(y_i)) · (1 − 1e-6), p_i the
        retrained model's probabilities.
    representation : {"input", "features"}, default="input"
        Where the reclassifying vote is taken: the flattened training inputs (Euclidean), or
        the penultimate activations. Input space suits data whose pixel distances follow the
        content (digits, MNIST); there a small trigger moves an image little, so a triggered
        image's neighbours are its source class. A trigger that dominates the pixel distance
        (a 3×3 patch on 8×8 digits) makes triggered images each other's neighbours, and on
        natural images pixel neighbours rarely share a class; "features" is then the better
        vote for label flips, but misses learned backdoors (see ``analysis``).
    k : int, default=50
        Neighbours in the vote, the default of the ``knn`` detector (Peri et al. 2020): enough
        to out-vote a group of same-label poisons that sit together, fewer than a class holds.
    search : {"auto", "exact", "hnsw"}, default="auto"
        How the vote's neighbours are found (``neighbours.nearest_neighbours``): ``"exact"`` compares
        every pair (time n² times the input size, memory bounded); ``"hnsw"`` answers from a faiss
        HNSW graph in n log n, approximate (98 % of the true 50 neighbours on MNIST, 99.5 % of the
        votes unchanged; benchmarks/RESULTS.md §22); ``"auto"``: exact on an accelerator and up to
        ``neighbours.EXACT_MAX_SAMPLES`` (20,000) samples on the CPU, the graph above.
    size_threshold : float, default=0.35
        The relative-size threshold of Chen et al. / ART (``analysis`` "relative_size" and
        "silhouette").
    silhouette_threshold : float, default=0.10
        The silhouette threshold of ART (``analysis="silhouette"`` only).

    Returns
    -------
    detection : Detection
        ``flagged``: the members of the clusters judged poisonous.
        ``scores`` (float64 in [0, 2)): ``j_i + s_i``, where j_i is 1 for members of a cluster
        judged poisonous and 0 otherwise, and s_i ∈ [0, 1) ranks samples within that decision.
        Every member of a poisonous cluster therefore scores above every other sample.
        With exclusionary reclassification s_i = e_i · k / (k + 1), e_i being the share of
        sample i's k neighbours whose label differs from its own. With a size analysis
        s_i = (1 − 2·f_c) · (1 + m_i) / 2, where f_c is the share of class c in its smaller
        cluster and m_i ∈ [-1, 1] the margin (‖z_i − big centre‖ − ‖z_i − small centre‖) /
        ‖big centre − small centre‖ in c's reduced space: a scale-free soft membership of the
        small cluster (0.5 on the boundary, 1 at its centre) times how suspicious that
        cluster's size is (0 for an even split, near 1 for a tiny cluster). Classes that
        cannot be clustered (fewer than ``n_components + 1`` samples, or activations identical
        up to rounding) are never flagged; they score e_i with exclusionary reclassification
        and 0 with a size analysis.
    """
    features = np.asarray(context.features, dtype=np.float64)
    labels = np.asarray(context.labels)
    flagged = np.zeros(len(features), dtype=bool)
    by_reclassification = analysis == "exclusionary_reclassification"
    # one thread: a class's PCA and 2-means are small (n_c x 128), and on a shared machine OpenMP / BLAS
    # threads spin-wait for each other (5,000 x 128 class: 0.07 CPU-s on one thread, 3 CPU-s and 50 s wall on
    # two under load 17; benchmarks/RESULTS.md, "Label-noise decisions")
    with threadpool_limits(limits=1):
        splits = {label: split_class(features[labels == label], n_components=n_components, reduce=reduce,
                                     seed=seed, with_silhouette=analysis == "silhouette")
                  for label in np.unique(labels)}
    if by_reclassification and reclassifier == "retrain":
        suspects = np.zeros(len(labels), dtype=bool)
        for label, split in splits.items():
            if split is not None:
                suspects[np.flatnonzero(labels == label)[split.in_small]] = True
        probs = cached_retrained_probs(context, suspects, seed)
        predicted = probs.argmax(axis=1)
        # strictly below 1, so that the +1 of a flagged sample puts it above every unflagged one
        scores = (1.0 - probs[np.arange(len(labels)), labels]) * (1.0 - 1e-6)
    elif by_reclassification:
        predicted, disagreement = cached_reclassification(context, representation, k, search)
        scores = disagreement * k / (k + 1)
    else:
        scores = np.zeros(len(features))
    for label, split in splits.items():
        members = np.flatnonzero(labels == label)
        if split is None:
            continue
        if by_reclassification:
            flagged[members] = judge_by_reclassification(predicted[members], label, split.in_small)
        else:
            scores[members] = (1 - 2 * split.small_fraction) * (1 + split.margin) / 2
            flagged[members[split.in_small]] = is_poison_cluster(
                split, analysis=analysis, size_threshold=size_threshold, silhouette_threshold=silhouette_threshold)
    scores[flagged] += 1.0
    return Detection(scores=scores, flagged=flagged)
