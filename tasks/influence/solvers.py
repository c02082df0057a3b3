"""Inverse-curvature solvers: exact Cholesky, conjugate gradients, LiSSA, Arnoldi, identity.

Part of ``poisonsweep.tasks.influence`` (gradients -> solvers -> scoring, the split kronfluence uses); the
package docstring defines the quantities and says what to do when a solver fails.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from poisonsweep.tasks.influence.gradients import GradBatch, GradientModel, hvp
from poisonsweep.tasks.registry import TrialWarning

SOLVERS = ("exact", "cg", "lissa", "arnoldi", "grad_norm", "tracin")
# On a linear head these need no iteration: closed-form gradients and Hessian in the model's own
# dtype (float32), chunk sums and the Cholesky factor in float64. Against float64 throughout, on
# MNIST keras_cnn: relative error 5e-7, identical ranking, 1.7x faster (benchmarks/RESULTS.md §4).
# CG, LiSSA and Arnoldi iterate on Hessian-vector products and keep float64 there.
CLOSED_FORM_SOLVERS = ("exact", "grad_norm", "tracin")
DEFAULT_DAMPING = 0.01
LISSA_GROWTH = 10.0  # a converging LiSSA iterate obeys ||h_t|| <= (t + 1) ||v||
LISSA_RESIDUAL = 0.1  # warn when more than this share of LiSSA's slowest error component is left


class InfluenceSolverError(RuntimeError):
    """An inverse-Hessian solver failed; the message says which knob to change."""


def _as_batch(grads: torch.Tensor | GradBatch) -> GradBatch:
    return grads if isinstance(grads, GradBatch) else GradBatch(grads)


class FactorInverse:
    """H^{-1} ~ W W^T with a low-rank W (p, r) (Arnoldi)."""

    def __init__(self, factor: torch.Tensor):
        self.factor = factor

    def to(self, device):
        return self if self.factor.device == torch.device(device) else FactorInverse(self.factor.to(device))

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        w = self.factor
        return ((vectors.to(w.dtype) @ w) @ w.T).to(vectors.dtype)

    def self_influence(self, grads: torch.Tensor | GradBatch) -> torch.Tensor:
        return (_as_batch(grads).matmul(self.factor).double() ** 2).sum(1)


class CholeskyInverse:
    """(H + shift I)^{-1} through the Cholesky factor L L^T = H + shift I (float64): the exact solver.

    Self-influence is ||L^{-1} g||^2, one triangular solve per gradient (half the work of a dense
    p x p product), in the gradients' dtype: L is conditioned like sqrt(H), so float32 gradients
    lose only about sqrt(cond(H)) x 1e-7 of relative precision.
    """

    def __init__(self, chol: torch.Tensor):
        self.chol = chol
        self._cast = {chol.dtype: chol}  # the factor in each gradient dtype seen, cast once (not per shard)

    def to(self, device):
        return self if self.chol.device == torch.device(device) else CholeskyInverse(self.chol.to(device))

    def _factor(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._cast:
            self._cast[dtype] = self.chol.to(dtype)
        return self._cast[dtype]

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(vectors.to(self.chol.dtype).T, self.chol).T.to(vectors.dtype)

    def self_influence(self, grads: torch.Tensor | GradBatch) -> torch.Tensor:
        flat = _as_batch(grads).flat()
        whitened = torch.linalg.solve_triangular(self._factor(flat.dtype), flat.T, upper=False)
        return (whitened.double() ** 2).sum(0)


class IdentityInverse:
    """H = I: gradient norms and gradient dot products (grad_norm, TracIn)."""

    def to(self, device):
        return self

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors

    def self_influence(self, grads: torch.Tensor | GradBatch) -> torch.Tensor:
        return _as_batch(grads).squared_norms()


@dataclass
class IterativeInverse:
    """H^{-1} v by CG or LiSSA on Hessian-vector products over the Hessian samples."""

    method: str  # "cg" | "lissa"
    gm: GradientModel
    inputs: torch.Tensor  # prepared Hessian samples
    labels: torch.Tensor
    shift: float  # l2 + damping
    cg_tol: float = 1e-4
    cg_maxiter: int = 300
    lissa_scale: float = 10.0
    lissa_depth: int = 1000
    lissa_repeats: int = 1
    lissa_batch_size: int = 128
    seed: int = 0

    def to(self, device):
        device = torch.device(device)
        if self.gm.device == device:
            return self
        return IterativeInverse(**{**self.__dict__, "gm": self.gm.to(device), "inputs": self.inputs.to(device),
                                   "labels": self.labels.to(device)})

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        vectors = vectors.to(self.gm.dtype)
        if self.method == "cg":
            return conjugate_gradient(lambda v: hvp(self.gm, self.inputs, self.labels, v, self.shift), vectors,
                                      tol=self.cg_tol, maxiter=self.cg_maxiter)
        return lissa(self.gm, self.inputs, self.labels, vectors, shift=self.shift, scale=self.lissa_scale,
                     depth=self.lissa_depth, repeats=self.lissa_repeats, batch_size=self.lissa_batch_size,
                     seed=self.seed)

    def self_influence(self, grads: torch.Tensor | GradBatch) -> torch.Tensor:
        flat = _as_batch(grads).flat()
        return (flat.double() * self.solve(flat).double()).sum(1)


def exact_inverse(H: torch.Tensor, shift: float) -> CholeskyInverse:
    """Cholesky-factor H + shift I in float64 (the inverse of the exact solver).

    Cholesky rather than an eigendecomposition: several times cheaper, and it fails exactly when
    the damped Hessian is not positive definite (then the eigenvalues go into the message).
    """
    H = H.double()
    eye = torch.eye(len(H), dtype=H.dtype, device=H.device)
    chol, info = torch.linalg.cholesky_ex(H + shift * eye)
    if info.item() != 0:
        evals = torch.linalg.eigvalsh(H)
        raise InfluenceSolverError(
            f"H + (l2 + damping) I is not positive definite: its smallest eigenvalue is "
            f"{(evals.min() + shift).item():.3g} (Hessian min eigenvalue {evals.min().item():.3g}); raise damping "
            f"above {max(-evals.min().item(), 0) * 1.1:.3g}")
    return CholeskyInverse(chol)


def conjugate_gradient(apply_a: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, tol: float,
                       maxiter: int) -> torch.Tensor:
    """Solve A x = b for every row of b (m, p) by conjugate gradients, A symmetric positive definite.

    Each row stops once ||r|| <= tol ||b||; only unconverged rows cost Hessian-vector products.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rs = (r * r).sum(1)
    b_norm = rs.sqrt()
    active = b_norm > 0
    for _ in range(maxiter):
        idx = active.nonzero().squeeze(1)
        if len(idx) == 0:
            return x
        ad = apply_a(d[idx])
        curvature = (d[idx] * ad).sum(1)
        if (curvature <= 0).any():
            raise InfluenceSolverError("CG met negative curvature (p^T H p <= 0): H + damping I is not positive "
                                       "definite; raise damping")
        alpha = rs[idx] / curvature
        x[idx] += alpha[:, None] * d[idx]
        r[idx] -= alpha[:, None] * ad
        rs_new = (r[idx] ** 2).sum(1)
        d[idx] = r[idx] + (rs_new / rs[idx])[:, None] * d[idx]
        rs[idx] = rs_new
        active[idx] = rs_new.sqrt() > tol * b_norm[idx]
    if active.any():
        worst = (rs[active].sqrt() / b_norm[active]).max().item()
        raise InfluenceSolverError(f"CG did not reach relative residual {tol:g} in {maxiter} iterations "
                                   f"(worst {worst:.3g}); raise cg_maxiter, or damping to improve conditioning")
    return x


def largest_eigenvalue(apply_a: Callable[[torch.Tensor], torch.Tensor], p: int, *, dtype, device, seed: int,
                       iters: int = 30) -> float:
    """The largest-magnitude eigenvalue of a symmetric operator, by power iteration."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(p, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    v /= v.norm()
    value = 0.0
    for _ in range(iters):
        w = apply_a(v[None])[0]
        value = torch.dot(v, w).item()
        v = w / w.norm()
    return abs(value)


def warn_if_lissa_too_shallow(*, shift: float, scale: float, depth: int) -> None:
    """The recursion shrinks its error along the flattest direction (eigenvalue ~ shift) by
    (1 - shift/scale) per step; warn when more than ``LISSA_RESIDUAL`` of it is left after ``depth``."""
    if shift >= scale:
        return  # a scale below the damping diverges, and lissa() says so
    if shift <= 0:
        advice = "with damping 0 the flattest direction never converges: raise damping"
        left = 1.0
    else:
        contraction = 1.0 - shift / scale
        left = contraction ** depth
        needed = math.ceil(math.log(LISSA_RESIDUAL) / math.log(contraction))
        advice = f"raise lissa_depth to at least {needed} (or raise damping, or use solver 'cg' or 'exact')"
    if left > LISSA_RESIDUAL:
        warnings.warn(f"LiSSA has not converged: after lissa_depth {depth} steps with lissa_scale {scale:.3g} and "
                      f"damping {shift:g}, {left:.0%} of the error along the flattest direction is left; {advice}",
                      LissaNotConverged, stacklevel=3)


class LissaNotConverged(TrialWarning):
    """LiSSA's depth is too small for its scale and damping: its estimate is biased toward v / scale."""


def lissa(gm: GradientModel, inputs: torch.Tensor, labels: torch.Tensor, vectors: torch.Tensor, *, shift: float,
          scale: float, depth: int, repeats: int, batch_size: int, seed: int) -> torch.Tensor:
    """LiSSA (Agarwal et al. 2016, as in Koh & Liang's code): rows ~ (H + shift I)^{-1} v.

    h_0 = v; h_t = v + h_{t-1} - (H_batch + shift I) h_{t-1} / scale with a fresh seeded
    mini-batch per step; the estimate h_depth / scale is averaged over ``repeats`` runs.
    """
    warn_if_lissa_too_shallow(shift=shift, scale=scale, depth=depth)
    g = torch.Generator().manual_seed(seed)
    n = len(inputs)
    v_norm = vectors.norm(dim=1).clamp_min(torch.finfo(vectors.dtype).tiny)
    total = torch.zeros_like(vectors)
    for _ in range(repeats):
        h = vectors.clone()
        for t in range(depth):
            batch = torch.randperm(n, generator=g)[:batch_size].to(inputs.device)
            h = vectors + h - hvp(gm, inputs[batch], labels[batch], h, shift) / scale
            if t % 25 == 0 or t == depth - 1:
                growth = (h.norm(dim=1) / v_norm).max().item()
                if not math.isfinite(growth) or growth > LISSA_GROWTH * (t + 2):
                    raise InfluenceSolverError(
                        f"LiSSA diverged at step {t} (||h|| = {growth:.3g} ||v||): lissa_scale {scale:g} is below the "
                        f"largest eigenvalue of the damped mini-batch Hessian; raise lissa_scale (or use 'auto')")
        total += h / scale
    return total / repeats


def arnoldi_inverse(apply_h: Callable[[torch.Tensor], torch.Tensor], p: int, *, iters: int, rank: int,
                    damping: float, dtype, device, seed: int) -> tuple[FactorInverse, torch.Tensor]:
    """Schioppa et al. 2022: Arnoldi on H, keep the ``rank`` eigenpairs of largest |lambda|.

    Returns the factor W = V (Lambda + damping)^{-1/2} (so H^{-1} ~ W W^T on the top eigenspace)
    and the kept eigenvalues. The Krylov basis is re-orthogonalised twice (classical
    Gram-Schmidt) and the iteration stops early once the Krylov space is invariant.
    """
    iters = min(iters, p)
    g = torch.Generator().manual_seed(seed)
    basis = torch.zeros(iters + 1, p, dtype=dtype, device=device)
    start = torch.randn(p, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    basis[0] = start / start.norm()
    proj = torch.zeros(iters + 1, iters, dtype=torch.float64)
    size = iters
    for i in range(iters):
        w = apply_h(basis[i][None])[0]
        for _ in range(2):
            coef = basis[:i + 1] @ w
            w = w - coef @ basis[:i + 1]
            proj[:i + 1, i] += coef.double().cpu()
        norm = w.norm()
        proj[i + 1, i] = norm.item()
        if norm.item() <= 1e-10 * proj[:i + 1, :i + 1].abs().max().item():
            size = i + 1
            break
        basis[i + 1] = w / norm
    tri = proj[:size, :size]
    evals, evecs = torch.linalg.eigh((tri + tri.T) / 2)  # symmetric H: the Hessenberg matrix is tridiagonal
    keep = torch.argsort(evals.abs(), descending=True)[:rank]
    evals, evecs = evals[keep], evecs[:, keep]
    damped = evals + damping
    if damped.min() <= 0:
        raise InfluenceSolverError(
            f"Arnoldi kept eigenvalue {evals[damped.argmin()].item():.3g} of H, so lambda + damping <= 0; "
            f"raise damping above {-evals.min().item() * 1.1:.3g}")
    vectors = evecs.T.to(dtype=dtype, device=device) @ basis[:size]  # (rank, p)
    return FactorInverse(vectors.T * damped.rsqrt().to(dtype=dtype, device=device)), evals
