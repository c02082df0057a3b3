"""Exact k-nearest-neighbour search as blocked torch matrix products, on the trial's device.

Every sample's ``k`` nearest *other* samples by Euclidean distance, computed a block of query rows
at a time: ``||a||² + ||b||² - 2 a·b`` for the block against all samples (one matmul), the sample
itself masked out, ``torch.topk`` of the block. Memory is bounded by the block (``block_rows × n``
distances, at most ``MAX_BLOCK_BYTES``) plus the (n, d) samples and the (n, k) result; time still
grows as n² · d (an exact search compares every pair), but as a BLAS matmul rather than a Python
loop. The chosen neighbours' distances are then recomputed directly as ``||a - b||`` so the
returned distances carry no cancellation error of the expanded formula.

Agreement with scikit-learn's brute-force ``NearestNeighbors(...).kneighbors()`` (what the detectors
used before): the same neighbour sets whenever the k-th and (k+1)-th distances differ by more than
the float rounding of the expanded formula (relative ~1e-12 in float64, the CPU default; ~1e-5 in
float32, used on a GPU), and the same distances to 1e-9 relative (tests/test_neighbours.py). Among
exactly tied distances the order is the one ``torch.topk`` returns, not scikit-learn's.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MAX_BLOCK_BYTES", "nearest_neighbours", "search_dtype"]

MAX_BLOCK_BYTES = 256 * 2**20  # one block of query-to-all distances (256 MiB), the search's peak beyond its inputs


def search_dtype(device: torch.device) -> torch.dtype:
    """float64 on the CPU (scikit-learn's precision), float32 on an accelerator (its fast path)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def block_rows(n: int, itemsize: int, max_bytes: int = MAX_BLOCK_BYTES) -> int:
    """Query rows per block so that ``rows × n`` distances fit in ``max_bytes`` (at least 1)."""
    return max(1, min(n, max_bytes // max(1, n * itemsize)))


def nearest_neighbours(points: np.ndarray | torch.Tensor, k: int, *, device: str | torch.device = "cpu",
                       max_block_bytes: int = MAX_BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices of the ``k`` nearest other samples of every sample, nearest first.

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
    device = torch.device(device)
    dtype = search_dtype(device)
    x = torch.as_tensor(np.asarray(points) if not isinstance(points, torch.Tensor) else points)
    x = x.reshape(len(x), -1).to(device=device, dtype=dtype)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and n_samples - 1 = {n - 1}; got {k}")
    squared = (x * x).sum(dim=1)
    rows = block_rows(n, x.element_size(), max_block_bytes)
    indices = torch.empty((n, k), dtype=torch.int64, device=device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        block = squared[start:stop, None] + squared[None, :] - 2.0 * (x[start:stop] @ x.T)
        block[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = float("inf")
        indices[start:stop] = torch.topk(block, k, dim=1, largest=False, sorted=True).indices
        del block
    distances = exact_distances(x, indices, max_block_bytes)
    # re-sort by the exact distances (the expanded formula may swap near-equal neighbours)
    order = torch.argsort(distances, dim=1, stable=True)
    distances, indices = torch.gather(distances, 1, order), torch.gather(indices, 1, order)
    return distances.double().cpu().numpy(), indices.cpu().numpy()


def exact_distances(x: torch.Tensor, indices: torch.Tensor, max_bytes: int = MAX_BLOCK_BYTES) -> torch.Tensor:
    """``||x_i - x_j||`` for every j in ``indices[i]``, in chunks of rows of at most ``max_bytes`` (rows × k × d)."""
    out = torch.empty(indices.shape, dtype=x.dtype, device=x.device)
    chunk = max(1, max_bytes // max(1, indices.shape[1] * x.shape[1] * x.element_size()))
    for start in range(0, len(x), chunk):
        stop = min(start + chunk, len(x))
        out[start:stop] = torch.linalg.vector_norm(x[indices[start:stop]] - x[start:stop, None, :], dim=2)
    return out
