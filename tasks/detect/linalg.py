"""Torch linear algebra the feature-space detectors share, on the trial's device, in float64.

Every function takes and returns ``torch.Tensor`` on the device of its input (``as_tensor`` puts a
numpy array there). Sums over samples run in row blocks of ``BLOCK_ROWS``, so a (d, d) statistic of
n samples needs O(d² + BLOCK_ROWS·d) memory beyond the input, whatever n.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

__all__ = ["BLOCK_ROWS", "as_tensor", "resolve", "second_moment", "centred_covariance", "top_direction",
           "inverse_sqrt", "top_eigenpair"]

BLOCK_ROWS = 8192  # rows per block of a blocked sum: 8192 x 512 float64 is 32 MiB
RIDGE = 1e-8


def resolve(device: str | torch.device | None) -> torch.device:
    """``None`` means the CPU (a detector run outside a trial); so does MPS, which has no float64."""
    device = torch.device(device if device is not None else "cpu")
    return torch.device("cpu") if device.type == "mps" else device


def as_tensor(values, device: str | torch.device | None = None) -> torch.Tensor:
    """``values`` as float64 on ``device`` (no copy when it already is)."""
    return torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values, dtype=torch.float64,
                           device=resolve(device))


def second_moment(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i w_i x_i x_iᵀ (w = 1 by default), summed in row blocks: (d, d)."""
    total = x.new_zeros((x.shape[1], x.shape[1]))
    for start in range(0, len(x), BLOCK_ROWS):
        block = x[start:start + BLOCK_ROWS]
        weighted = block if weights is None else block * weights[start:start + BLOCK_ROWS, None]
        total += weighted.T @ block
    return total


def centred_covariance(x: torch.Tensor, *, ddof: int = 1) -> torch.Tensor:
    """The covariance of the rows of ``x`` (``np.cov(x, rowvar=False, ddof=ddof)``), blocked."""
    centred = x - x.mean(dim=0)
    return second_moment(centred) / max(len(x) - ddof, 1)


def top_direction(centred: torch.Tensor) -> torch.Tensor:
    """M · v for the top right-singular vector v of the centred matrix M (sign arbitrary), (n,).

    From the eigen-decomposition of the smaller Gram matrix: MᵀM (d × d, blocked) when n ≥ d, else
    MMᵀ (n × n), where M v = σ₁ u₁ = sqrt(λ_max) u₁. Both avoid the full n × d SVD.
    """
    n, d = centred.shape
    if n >= d:
        _, vectors = torch.linalg.eigh(second_moment(centred))
        return centred @ vectors[:, -1]
    values, vectors = torch.linalg.eigh(centred @ centred.T)
    return torch.sqrt(values[-1].clamp(min=0)) * vectors[:, -1]


def inverse_sqrt(matrix: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """S^(-1/2) of a symmetric matrix, eigenvalues floored at ``ridge``."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors / torch.sqrt(values.clamp(min=ridge))) @ vectors.T


def top_eigenpair(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, *, tol: float,
                  max_restarts: int, steps: int = 20) -> tuple[float, torch.Tensor]:
    """Largest eigenvalue and unit eigenvector of a symmetric operator, by restarted Lanczos.

    Lanczos bases of up to ``steps`` vectors (fully re-orthogonalised) from ``start``, restarted from
    the top Ritz vector; stops as soon as the Ritz pair's residual ‖Av − θv‖ = β_j |y_j| is at most
    tol·|θ| (ARPACK's criterion), so a start near the answer costs a few products. After
    ``max_restarts`` restarts the last Ritz pair is returned (as ``eigsh`` gives up with its best pair).
    The tridiagonal eigen-problems are solved on the CPU (they are at most ``steps`` × ``steps``).
    """
    dim = start.numel()
    vector = start / torch.linalg.vector_norm(start)
    value = float("nan")
    basis = start.new_empty((steps, dim))
    for _ in range(max_restarts):
        basis[0] = vector
        alphas: list[float] = []
        betas: list[float] = []
        for j in range(steps):
            image = matvec(basis[j])
            alphas.append(float(basis[j] @ image))
            done = basis[:j + 1]
            image = image - done.T @ (done @ image)
            image = image - done.T @ (done @ image)  # twice is enough (Kahan-Parlett)
            beta = float(torch.linalg.vector_norm(image))
            values, vectors = eigh_tridiagonal(np.array(alphas), np.array(betas)) if j else (
                np.array(alphas), np.ones((1, 1)))
            value, ritz = float(values[-1]), vectors[:, -1]
            converged = beta * abs(ritz[-1]) <= tol * abs(value) or beta <= 1e-14 * max(abs(value), 1e-300)
            if converged or j == steps - 1:
                vector = torch.as_tensor(ritz, dtype=basis.dtype, device=basis.device) @ done
                vector = vector / torch.linalg.vector_norm(vector)
                if converged:
                    return value, vector
                break
            betas.append(beta)
            basis[j + 1] = image / beta
    return value, vector
