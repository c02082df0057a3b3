"""Exact k-nearest-neighbour search on the trial's device: blocked torch matrix products on an accelerator,
scikit-learn's brute force (itself chunked, so memory-bounded) on the CPU, where it measured faster.

Every sample's ``k`` nearest *other* samples by Euclidean distance, computed a block of query rows
at a time: ``||a||² + ||b||² - 2 a·b`` for the block against all samples (one matmul), the sample
itself masked out, ``torch.topk`` of the block. Memory is bounded by the block (``block_rows × n``
distances, at most ``MAX_BLOCK_BYTES``) plus the (n, d) samples and the (n, k) result; time still
grows as n² · d (an exact search compares every pair), as one BLAS matmul per block. Distances are
those of the expanded formula, as scikit-learn's brute force returns them.

Agreement with scikit-learn's brute-force ``NearestNeighbors(...).kneighbors()`` (what the detectors
used before): the same neighbour sets whenever the k-th and (k+1)-th distances differ by more than
the float rounding of the expanded formula (relative ~1e-12 in float64, the CPU default; ~1e-5 in
float32, used on a GPU), and the same distances to 1e-7 relative (tests/test_neighbours.py; the
two sum the expanded formula in different orders). Among
exactly tied distances the order is the one ``torch.topk`` returns, not scikit-learn's.

An exact search compares every pair, so it grows as n² · d: at 50,000 MNIST images (784 values) it
took longer than one training epoch (benchmarks/RESULTS.md §20). ``search="hnsw"`` answers from a
hierarchical navigable small-world graph (Malkov & Yashunin 2018, TPAMI; faiss's ``IndexHNSWFlat``,
Douze et al. 2024), built and searched in n log n: M = 16 links per node, efConstruction = 40,
efSearch = max(64, k + 1). It is approximate: on MNIST inputs it returned 98.1-98.3 % of the true 50
nearest neighbours at n = 25,000 and 50,000 (recall measured against the exact search, §22), and
tests/test_neighbours.py holds it to at least 95 % on planted data. Many exact copies of one point are
its known weakness (40 copies each of 5 points: 80 % of rows found only copies). The graph is built on one thread,
which faiss documents as the only reproducible build (its multi-threaded insertion order is not
fixed); the search is deterministic on any number of threads. Distances are the graph's float32
squared distances, square-rooted. ``search="auto"`` (what the detectors use) is exact on an
accelerator, where a blocked matmul is fast at every size, and on the CPU up to ``EXACT_MAX_SAMPLES``
samples, about where the graph measured faster (§22: at 25,000 MNIST images 7.9 s against 13.0 s, at 50,000
18 s against 50 s; at 10,000 CIFAR-sized images the exact search was still faster, 8.6 s against 12.1 s);
above that, the graph. So every set-up up to 20,000 samples is searched exactly, as before.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["EXACT_MAX_SAMPLES", "MAX_BLOCK_BYTES", "SEARCHES", "blocked_nearest_neighbours", "graph_nearest_neighbours",
           "nearest_neighbours", "search_dtype", "uses_graph"]

MAX_BLOCK_BYTES = 256 * 2**20  # one block of query-to-all distances (256 MiB), the search's peak beyond its inputs
SEARCHES = ("auto", "exact", "hnsw")
# samples above which "auto" answers from the graph on the CPU (where it measured faster, §22; the single-threaded
# build costs n log n · d, the exact search n² · d, so the crossover is in n more than in d)
EXACT_MAX_SAMPLES = 20_000
HNSW_LINKS = 16  # M: faiss's default for IndexHNSWFlat examples; 98 % recall of 50 neighbours on MNIST
HNSW_EF_CONSTRUCTION = 40  # faiss's default
HNSW_EF_SEARCH = 64  # at least k + 1 is used


def search_dtype(device: torch.device) -> torch.dtype:
    """float64 on the CPU (scikit-learn's precision), float32 on an accelerator (its fast path)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def block_rows(n: int, itemsize: int, max_bytes: int = MAX_BLOCK_BYTES) -> int:
    """Query rows per block so that ``rows × n`` distances fit in ``max_bytes`` (at least 1)."""
    return max(1, min(n, max_bytes // max(1, n * itemsize)))


def uses_graph(n: int, search: str, device: str | torch.device | None = "cpu") -> bool:
    """Whether ``search`` answers from the HNSW graph for ``n`` samples on ``device``."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}; got {search!r}")
    if search != "auto":
        return search == "hnsw"
    return torch.device(device or "cpu").type == "cpu" and n > EXACT_MAX_SAMPLES


def nearest_neighbours(points: np.ndarray | torch.Tensor, k: int, *, device: str | torch.device | None = "cpu",
                       max_block_bytes: int = MAX_BLOCK_BYTES, search: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices of the ``k`` nearest other samples of every sample, nearest first.

    ``search="exact"``: on the CPU scikit-learn's brute force (its chunked, multi-threaded ``ArgKmin``,
    which measured faster there than torch: 0.42 against 0.61-1.1 CPU-seconds for 6,250 x 128, k = 50),
    on an accelerator :func:`blocked_nearest_neighbours`. ``"hnsw"``: :func:`graph_nearest_neighbours`
    (approximate). ``"auto"``: the graph only on the CPU above ``EXACT_MAX_SAMPLES`` (module docstring).
    """
    device = torch.device(device or "cpu")  # None: the CPU, as DetectionContext.device means
    if uses_graph(len(points), search, device):
        return graph_nearest_neighbours(points, k)
    if device.type == "cpu":
        from sklearn.neighbors import NearestNeighbors

        x = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)
        x = x.reshape(len(x), -1)
        if not 1 <= k < len(x):
            raise ValueError(f"k must be between 1 and n_samples - 1 = {len(x) - 1}; got {k}")
        distances, indices = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(x).kneighbors()
        return distances.astype(np.float64, copy=False), indices.astype(np.int64, copy=False)
    return blocked_nearest_neighbours(points, k, device=device, max_block_bytes=max_block_bytes)


def blocked_nearest_neighbours(points: np.ndarray | torch.Tensor, k: int, *, device: str | torch.device = "cpu",
                               max_block_bytes: int = MAX_BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest_neighbours` as blocked torch matmul + top-k on ``device`` (module docstring).

    Parameters
    ----------
    points : array of shape (n_samples, n_features)
    k : int
        Neighbours per sample, 1 <= k < n_samples.
    device : str or torch.device, default="cpu"
        Where the products run (the trial's device).
    max_block_bytes : int, default=MAX_BLOCK_BYTES
        Bound on one block of distances.

    Returns
    -------
    distances : ndarray of shape (n_samples, k), float64
    indices : ndarray of shape (n_samples, k), int64. Sample i never appears in row i.
    """
    device = torch.device(device or "cpu")
    dtype = search_dtype(device)
    x = torch.as_tensor(np.asarray(points) if not isinstance(points, torch.Tensor) else points)
    x = x.reshape(len(x), -1).to(device=device, dtype=dtype)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and n_samples - 1 = {n - 1}; got {k}")
    squared = (x * x).sum(dim=1)
    rows = block_rows(n, x.element_size(), max_block_bytes)
    distances = torch.empty((n, k), dtype=dtype, device=device)
    indices = torch.empty((n, k), dtype=torch.int64, device=device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        # ||b||² - 2 a·b: the row's own ||a||² does not change its order, so it is added to the k chosen only
        block = torch.addmm(squared[None, :], x[start:stop], x.T, beta=1.0, alpha=-2.0)
        block[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = float("inf")
        nearest = torch.topk(block, k, dim=1, largest=False, sorted=True)
        distances[start:stop] = (nearest.values + squared[start:stop, None]).clamp_(min=0).sqrt_()
        indices[start:stop] = nearest.indices
        del block, nearest
    return distances.double().cpu().numpy(), indices.cpu().numpy()


def graph_nearest_neighbours(points: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest_neighbours` answered by a faiss HNSW graph on the CPU (approximate; module docstring).

    A row whose graph search returns fewer than ``k`` other samples (many exact duplicates of one point
    can crowd it out) is searched exactly instead, so every row holds ``k`` valid indices, never itself.
    """
    import faiss  # imported here: only large CPU searches need it

    x = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)
    x = np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and n_samples - 1 = {n - 1}; got {k}")
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)  # the only reproducible build (module docstring)
        graph = faiss.IndexHNSWFlat(x.shape[1], HNSW_LINKS)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        graph.add(x)
        faiss.omp_set_num_threads(torch.get_num_threads())  # the trial's CPU budget (engine sets it)
        graph.hnsw.efSearch = max(HNSW_EF_SEARCH, k + 1)
        squared, found = graph.search(x, k + 1)
    finally:
        faiss.omp_set_num_threads(threads)
    valid = found >= 0
    short = np.flatnonzero((valid & (found != np.arange(n)[:, None])).sum(axis=1) < k)
    distances, indices = first_others(np.sqrt(np.maximum(squared, 0).astype(np.float64)), found, np.arange(n), k,
                                      valid=valid)
    if len(short):
        distances[short], indices[short] = exact_rows(x, short, k)
    return distances, indices


def exact_rows(x: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` nearest other samples of the samples ``rows`` of ``x`` (float64)."""
    from sklearn.neighbors import NearestNeighbors

    distances, indices = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(x).kneighbors(x[rows])
    return first_others(distances, indices, rows, k)


def first_others(distances: np.ndarray, indices: np.ndarray, rows: np.ndarray, k: int,
                 valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first ``k`` candidates, nearest first, that are not the row's own sample ``rows[i]`` (nor
    marked invalid); the search asked for k + 1 so that the sample itself can be dropped."""
    others = indices != rows[:, None]
    if valid is not None:
        others &= valid
    order = np.argsort(~others, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(indices, order, axis=1).astype(np.int64)
