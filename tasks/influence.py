"""Influence functions (Koh & Liang 2017) and TracIn (Pruthi et al. 2020) for classifiers trained
with cross-entropy, in plain PyTorch (``torch.func``). No Ray here: the per-sample work is handed
to a ``map_shards(fn, shared, shards)`` callable (a plain map, or the engine's actor pool).

Definitions (theta = the chosen parameter subset, g_i = gradient of sample i's loss at theta)

- ``H`` is the Hessian of the training objective: the mean cross-entropy Hessian over the
  training samples (or a seeded subset of ``hessian_samples``), plus ``l2 * I`` for the L2 term
  the optimiser applied (``train.weight_decay``), plus ``damping * I``.
- **Self-influence** of training sample i: ``g_i^T H^{-1} g_i`` (Koh & Liang §5.4 rank points to
  check by it; it is n times the predicted loss increase on z_i when z_i is left out). Positive
  for a positive definite H; higher = more suspicious.
- **Train -> test influence**: ``(1/n) g_test^T H^{-1} g_i``, the first-order prediction of how the
  test loss changes when training sample i is removed and the model retrained (Koh & Liang's
  ``predicted_loss_diffs``). Negative: removing i lowers the test loss, i is *harmful*;
  positive: i is *helpful*.
- ``grad_norm`` takes H = I (Kronfluence's "identity"; self-influence = ||g_i||^2).
- ``tracin`` sums over saved checkpoints c: lr_c <g_c(test), g_c(i)>, self-influence
  lr_c ||g_c(i)||^2 (TracInCP, no 1/n). Positive = proponent, the same sign as "helpful".

Solvers for H^{-1} v, and what to do when one fails (each raises ``InfluenceSolverError``
whose message says the same):

- ``exact``: the explicit Hessian (at most ``EXACT_MAX_PARAMS`` parameters; for a linear head in
  closed Kronecker form), Cholesky-factored in float64; self-influence ||L^{-1} g||^2 by triangular
  solves. A non-convex model can make ``H + damping I`` indefinite: raise ``damping`` above the
  most negative eigenvalue (the message prints it; Koh & Liang chose damping that way).
- ``cg``: conjugate gradients on Hessian-vector products, one solve per right-hand side, batched.
  Negative curvature (p^T H p <= 0) or no convergence in ``cg_maxiter``: raise ``damping``
  (conditioning) or ``cg_maxiter``.
- ``lissa``: Koh & Liang's stochastic recursion h <- v + h - (H_batch h)/scale, estimate h/scale,
  averaged over ``repeats``. It converges only if scale exceeds the largest eigenvalue of the
  mini-batch Hessians, and needs depth >> scale / damping steps. Divergence (the iterate grows
  past ``LISSA_GROWTH`` x its bound): raise ``lissa_scale`` ("auto" = 2 x the largest
  eigenvalue of H found by power iteration).
- ``arnoldi``: Schioppa et al. 2022: ``iters`` Arnoldi steps on H, keep the ``rank``
  eigenpairs of largest magnitude, H^{-1} ~ V diag(1/(lambda + damping)) V^T. A kept
  eigenvalue with lambda + damping <= 0: raise ``damping``.

Defaults: ``damping = 0.01`` (Koh & Liang's MNIST CNN value). Precision: ``exact``, ``grad_norm``
and ``tracin`` on a linear head run in the model's dtype with float64 sums and factors
(``CLOSED_FORM_SOLVERS``); otherwise float64 wherever the functional part is small (the linear
head, or at most ``FLOAT64_MAX_PARAMS`` parameters), else the model's dtype with float64 small
matrices.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from tasks.train import inference_batches, inference_model

SOLVERS = ("exact", "cg", "lissa", "arnoldi", "grad_norm", "tracin")
# On a linear head these need no iteration: closed-form gradients and Hessian in the model's own
# dtype (float32), chunk sums and the Cholesky factor in float64. Against float64 throughout, on
# MNIST keras_cnn: relative error 5e-7, identical ranking, 1.7x faster (benchmarks/RESULTS.md §4).
# CG, LiSSA and Arnoldi iterate on Hessian-vector products and keep float64 there.
CLOSED_FORM_SOLVERS = ("exact", "grad_norm", "tracin")
PARAM_SUBSETS = ("last_layer", "last_k_layers", "all")
DEFAULT_DAMPING = 0.01
EXACT_MAX_PARAMS = 10_000  # an explicit p x p Hessian in float64 is 800 MB at this size
FLOAT64_MAX_PARAMS = 200_000  # above this the functional model stays in its own dtype
WORK_BUDGET = 2 ** 24  # floats held by one vmapped call (gradients + activations), ~64-128 MB
LISSA_GROWTH = 10.0  # a converging LiSSA iterate obeys ||h_t|| <= (t + 1) ||v||
LISSA_RESIDUAL = 0.1  # warn when more than this share of LiSSA's slowest error component is left
DEFAULT_SHARD_SIZE = 512


class InfluenceSolverError(RuntimeError):
    """An inverse-Hessian solver failed; the message says which knob to change."""


# --------------------------------------------------------------------------- parameters


def select_parameters(model: nn.Module, subset: str = "last_layer", k: int = 1) -> list[str]:
    """Names of the parameters an influence computation differentiates.

    Parameters
    ----------
    model : nn.Module
    subset : {"last_layer", "last_k_layers", "all"}, default="last_layer"
        ``last_layer`` is ``model.head`` when the model has one (``SplitModel``), else the last
        module that owns parameters; ``last_k_layers`` the last ``k`` modules that own
        parameters, in registration order; ``all`` every parameter.
    k : int, default=1

    Returns
    -------
    names : list of str, in ``model.named_parameters()`` order.
    """
    if subset not in PARAM_SUBSETS:
        raise ValueError(f"params must be one of {PARAM_SUBSETS}; got {subset!r}")
    names = [name for name, _ in model.named_parameters()]
    if subset == "all":
        return names
    if subset == "last_layer" and isinstance(getattr(model, "head", None), nn.Linear):
        return [n for n in names if n.startswith("head.")]
    if subset == "last_layer":
        k = 1
    if k < 1:
        raise ValueError(f"k must be an int >= 1; got {k}")
    owners = [name for name, module in model.named_modules()
              if any(True for _ in module.parameters(recurse=False))]
    chosen = owners[-k:]
    return [n for n in names if n.rpartition(".")[0] in chosen]


@dataclass
class GradientModel:
    """A classifier's cross-entropy loss as a function of the chosen parameters (kept flat in ``theta``).

    When every chosen parameter belongs to ``model.head`` (a ``SplitModel``), the functional part
    is the head alone and its inputs are the penultimate features (``prepare(x) = body(x)``):
    gradients and Hessians then never touch the body. Otherwise the inputs are the images.
    """

    module: nn.Module  # eval-mode copy, no parameter requires grad
    names: tuple[str, ...]  # chosen parameter names, relative to ``module``
    shapes: tuple[torch.Size, ...]
    theta: torch.Tensor  # flat chosen parameters, (p,)
    body: nn.Module | None = None  # the feature extractor when ``module`` is the head
    _act_numel: dict = field(default_factory=dict, repr=False)

    @property
    def p(self) -> int:
        return self.theta.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    @property
    def device(self) -> torch.device:
        return self.theta.device

    @property
    def is_linear_head(self) -> bool:
        """The functional part is a linear head on features: closed-form gradients and Hessian apply."""
        return self.body is not None and isinstance(self.module, nn.Linear)

    def to(self, device: torch.device | str) -> "GradientModel":
        """A copy on ``device`` (the same object when it is there already)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return GradientModel(copy.deepcopy(self.module).to(device), self.names, self.shapes, self.theta.to(device),
                             None if self.body is None else copy.deepcopy(self.body).to(device))

    @torch.no_grad()
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs of the functional part: features of ``x`` for a head, else ``x`` itself."""
        if self.body is None:
            return x.to(device=self.device, dtype=self.dtype)
        features = [self.body(batch) for batch in inference_batches(x, self.device)] or [self.body(x.to(self.device))]
        return torch.cat(features).to(self.dtype)

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of a flat (..., p) tensor as the chosen parameters, shaped (..., *shape) each."""
        lead = flat.shape[:-1]
        sizes = [math.prod(shape) for shape in self.shapes]
        return tuple(part.reshape(*lead, *shape) for part, shape in zip(flat.split(sizes, dim=-1), self.shapes))

    @staticmethod
    def flatten(parts: Sequence[torch.Tensor], batch_dims: int = 1) -> torch.Tensor:
        """The inverse of ``split``: per-parameter tensors with ``batch_dims`` leading axes -> (..., p)."""
        return torch.cat([part.reshape(*part.shape[:batch_dims], -1) for part in parts], dim=batch_dims)

    def params(self) -> tuple[torch.Tensor, ...]:
        return self.split(self.theta)

    def logits(self, params: Sequence[torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, dict(zip(self.names, params)), (inputs,), strict=False)

    def loss(self, params: Sequence[torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the samples (``inputs`` already prepared).

        Differentiated w.r.t. the tuple of parameter tensors, never a flat vector: slicing a flat
        vector would make every backward pass fill a p-sized zero tensor per parameter.
        """
        return nn.functional.cross_entropy(self.logits(params, inputs), labels)

    def activation_numel(self, inputs: torch.Tensor) -> int:
        """Floats of activations one sample produces (measured once by a forward hook)."""
        if "value" not in self._act_numel:
            sizes = []
            hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()))
                     for m in self.module.modules() if not list(m.children())]
            with torch.no_grad():
                self.logits(self.params(), inputs[:1])
            for hook in hooks:
                hook.remove()
            self._act_numel["value"] = max(1, inputs[:1].numel() + sum(sizes))
        return self._act_numel["value"]


def uses_head_features(model: nn.Module, names: Sequence[str]) -> bool:
    """True when every chosen parameter belongs to a linear ``model.head`` fed by ``model.features``."""
    return (isinstance(getattr(model, "head", None), nn.Linear) and hasattr(model, "features")
            and len(names) > 0 and all(n.startswith("head.") for n in names))


def gradient_model(model: nn.Module, names: Sequence[str], dtype: torch.dtype | None = None) -> GradientModel:
    """Wrap a copy of ``model`` as a function of the chosen parameters ``names``.

    ``dtype`` None picks float64 for a linear head or a model of at most ``FLOAT64_MAX_PARAMS``
    parameters (cheap, and the curvature is better conditioned), else the model's own dtype.
    """
    names = list(names)
    on_features = uses_head_features(model, names)
    source = model.head if on_features else model
    relative = [n[len("head."):] for n in names] if on_features else names
    if dtype is None:
        small = on_features or sum(p.numel() for p in source.parameters()) <= FLOAT64_MAX_PARAMS
        dtype = torch.float64 if small else next(model.parameters()).dtype
    module = copy.deepcopy(source).eval().to(dtype)
    for param in module.parameters():
        param.requires_grad_(False)
    params = dict(module.named_parameters())
    missing = [n for n in relative if n not in params]
    if missing:
        raise ValueError(f"the model has no parameters named {missing}")
    theta = torch.cat([params[n].reshape(-1) for n in relative]).detach().clone()
    body = None
    if on_features:
        body = inference_model(copy.deepcopy(model.features))
        for param in body.parameters():
            param.requires_grad_(False)
    return GradientModel(module, tuple(relative), tuple(params[n].shape for n in relative), theta, body)


# --------------------------------------------------------------------------- gradients and HVPs


class GradBatch:
    """Per-sample gradients of a batch, kept as one (b, size) block per parameter.

    Scoring needs only ``G @ M`` and row norms, which blocks give without the (b, p) copy that
    concatenating them costs (for a full CNN that copy is as slow as the gradients themselves).
    """

    def __init__(self, parts: torch.Tensor | Sequence[torch.Tensor]):
        parts = [parts] if isinstance(parts, torch.Tensor) else list(parts)
        self.parts = [part.reshape(len(part), -1) for part in parts]

    def __len__(self) -> int:
        return len(self.parts[0])

    def matmul(self, matrix: torch.Tensor) -> torch.Tensor:
        """``G @ matrix`` for a (p, r) matrix, in the matrix's dtype."""
        out, start = None, 0
        for part in self.parts:
            end = start + part.shape[1]
            product = part.to(matrix.dtype) @ matrix[start:end]
            out = product if out is None else out + product
            start = end
        return out

    def squared_norms(self) -> torch.Tensor:
        return sum((part.double() ** 2).sum(1) for part in self.parts)

    def flat(self) -> torch.Tensor:
        return torch.cat(self.parts, 1) if len(self.parts) > 1 else self.parts[0]


def grad_batches(gm: GradientModel, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None):
    """Yield ``GradBatch``es of per-sample cross-entropy gradients w.r.t. the chosen parameters.

    ``vmap(grad(loss of one sample))`` over batches of ``batch_size`` samples (default: as many as
    ``WORK_BUDGET`` allows for p-sized gradients plus the sample's activations).
    """
    labels = labels.to(gm.device)
    if batch_size is None:
        batch_size = max(1, WORK_BUDGET // (gm.p + gm.activation_numel(inputs))) if len(inputs) else 1
    if gm.is_linear_head:
        for start in range(0, len(inputs), batch_size):
            yield linear_head_grads(gm, inputs[start:start + batch_size], labels[start:start + batch_size])
        return

    def one_loss(params, x, y):
        return gm.loss(params, x[None], y[None])

    sample_grad = vmap(grad(one_loss), in_dims=(None, 0, 0))
    params = gm.params()
    for start in range(0, len(inputs), batch_size):
        yield GradBatch(sample_grad(params, inputs[start:start + batch_size], labels[start:start + batch_size]))


def linear_head_grads(gm: GradientModel, features: torch.Tensor, labels: torch.Tensor) -> GradBatch:
    """Per-sample cross-entropy gradients of a linear head in closed form (no autograd).

    For logits z = W h + b and residual r = softmax(z) - onehot(y): dL/dW = r h^T, dL/db = r.
    """
    residual = torch.softmax(gm.logits(gm.params(), features), dim=1)
    residual[torch.arange(len(labels), device=residual.device), labels] -= 1
    parts = {"weight": residual[:, :, None] * features[:, None, :], "bias": residual}
    return GradBatch([parts[name] for name in gm.names])


def per_sample_grads(gm: GradientModel, inputs: torch.Tensor, labels: torch.Tensor,
                     batch_size: int | None = None) -> torch.Tensor:
    """Gradient of each sample's cross-entropy w.r.t. the chosen parameters, shape (n, p)."""
    batches = [batch.flat() for batch in grad_batches(gm, inputs, labels, batch_size)]
    return torch.cat(batches) if batches else torch.zeros(0, gm.p, dtype=gm.dtype, device=gm.device)


def hvp(gm: GradientModel, inputs: torch.Tensor, labels: torch.Tensor, vectors: torch.Tensor,
        shift: float = 0.0) -> torch.Tensor:
    """Rows ``(H_data + shift I) v`` for each row v of ``vectors`` (m, p); H_data = mean CE Hessian.

    Forward-over-reverse (``jvp`` of ``grad``) vmapped over the vectors, summed over chunks of
    samples sized so one call holds about ``WORK_BUDGET`` floats.
    """
    labels = labels.to(gm.device)
    n, m = len(inputs), len(vectors)
    chunk = max(1, (WORK_BUDGET // max(m, 1) - gm.p) // gm.activation_numel(inputs))
    out = torch.zeros_like(vectors)
    params, tangents = gm.params(), gm.split(vectors)
    for start in range(0, n, chunk):
        xb, yb = inputs[start:start + chunk], labels[start:start + chunk]
        # the closures run inside this iteration, so binding the loop variables late is safe
        loss_grad = grad(lambda p: gm.loss(p, xb, yb))  # noqa: B023
        product = vmap(lambda *v: jvp(loss_grad, (params,), (v,))[1])(*tangents)  # noqa: B023
        out += gm.flatten(product) * (len(xb) / n)
    return out + shift * vectors


def linear_head_hessian(gm: GradientModel, features: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Exact mean cross-entropy Hessian of a linear head, shape (p, p), float64.

    For logits z = W h + b the Hessian is sum_i A_i (x) h~_i h~_i^T with h~ = [h, 1] and
    A_i = diag(p_i) - p_i p_i^T (softmax p_i): a block-diagonal sum minus Q^T Q with rows
    Q_i = p_i (x) h~_i. This costs n K^2 d^2 instead of p Hessian-vector products. Each chunk
    is computed in the head's dtype and the chunks are summed in float64.
    """
    if list(gm.names) not in (["weight", "bias"], ["weight"]):
        raise ValueError(f"linear_head_hessian needs parameters ordered weight, bias; got {gm.names}")
    named = dict(zip(gm.names, gm.params()))
    weight, bias = named["weight"], named.get("bias")
    k, d = weight.shape
    da = d + int(bias is not None)
    H = torch.zeros(k * da, k * da, dtype=torch.float64, device=gm.device)
    for start in range(0, len(features), chunk):
        h = features[start:start + chunk].to(gm.dtype)
        probs = torch.softmax(nn.functional.linear(h, weight, bias), dim=1)
        h_aug = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype, device=h.device)], 1) if bias is not None else h
        q = (probs[:, :, None] * h_aug[:, None, :]).reshape(len(h), -1)
        blocks = torch.einsum("na,ni,nj->aij", probs, h_aug, h_aug)
        for a in range(k):  # Q^T Q is symmetric: the class blocks on and right of the diagonal suffice
            rows = slice(a * da, (a + 1) * da)
            H[rows, a * da:] -= (q[:, rows].T @ q[:, a * da:]).double()
            H[rows, rows] += blocks[a].double()
    for a in range(k):  # mirror them below the diagonal
        H[a * da:, a * da:(a + 1) * da] = H[a * da:(a + 1) * da, a * da:].T.clone()
    H /= len(features)
    # reorder from the augmented layout (class, feature|bias) to [weight.flatten(), bias]
    order = [a * da + j for a in range(k) for j in range(d)]
    if bias is not None:
        order += [a * da + d for a in range(k)]
    order = torch.as_tensor(order, device=gm.device)
    return H[order][:, order]


def hessian_matrix(gm: GradientModel, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The explicit mean cross-entropy Hessian of the chosen parameters, (p, p) float64."""
    if gm.p > EXACT_MAX_PARAMS:
        raise ValueError(f"solver 'exact' builds a {gm.p} x {gm.p} Hessian; it allows at most "
                         f"{EXACT_MAX_PARAMS} parameters: use params: last_layer, or solver cg/arnoldi")
    if gm.is_linear_head:
        return linear_head_hessian(gm, inputs)
    eye = torch.eye(gm.p, dtype=gm.dtype, device=gm.device)
    block = max(1, min(gm.p, 64))
    H = torch.cat([hvp(gm, inputs, labels, eye[i:i + block]) for i in range(0, gm.p, block)]).double()
    return (H + H.T) / 2


# --------------------------------------------------------------------------- inverse curvature


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


def _warn_if_lissa_too_shallow(*, shift: float, scale: float, depth: int) -> None:
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


class LissaNotConverged(UserWarning):
    """LiSSA's depth is too small for its scale and damping: its estimate is biased toward v / scale."""


def lissa(gm: GradientModel, inputs: torch.Tensor, labels: torch.Tensor, vectors: torch.Tensor, *, shift: float,
          scale: float, depth: int, repeats: int, batch_size: int, seed: int) -> torch.Tensor:
    """LiSSA (Agarwal et al. 2016, as in Koh & Liang's code): rows ~ (H + shift I)^{-1} v.

    h_0 = v; h_t = v + h_{t-1} - (H_batch + shift I) h_{t-1} / scale with a fresh seeded
    mini-batch per step; the estimate h_depth / scale is averaged over ``repeats`` runs.
    """
    _warn_if_lissa_too_shallow(shift=shift, scale=scale, depth=depth)
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


# --------------------------------------------------------------------------- fitting and scoring


@dataclass
class SolverSettings:
    """Knobs of the inverse-Hessian solvers (see the module docstring)."""

    solver: str = "exact"
    damping: float = DEFAULT_DAMPING
    l2: float = 0.0
    hessian_samples: int | None = None
    cg_tol: float = 1e-4
    cg_maxiter: int = 300
    lissa_scale: float | str = "auto"
    lissa_depth: int = 1000
    lissa_repeats: int = 1
    lissa_batch_size: int = 128
    arnoldi_iters: int = 100
    arnoldi_rank: int = 50

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {self.solver!r}")


@dataclass
class InfluenceTerm:
    """One (model, inverse curvature) pair; scores sum over terms (TracIn: one per checkpoint).

    ``features`` holds the prepared training inputs when the driver already computed them;
    otherwise each shard prepares its slice of ``x_train``.
    """

    gm: GradientModel
    inverse: object  # CholeskyInverse | FactorInverse | IdentityInverse | IterativeInverse
    self_weight: float
    test_vectors: torch.Tensor | None  # (m, p): test_weight * H^{-1} g_test, or None
    features: torch.Tensor | None = None


@dataclass
class InfluencePayload:
    """What every shard needs, shipped once (``map_shards``' ``shared``)."""

    terms: list[InfluenceTerm]
    x_train: torch.Tensor
    labels: torch.Tensor


@dataclass
class InfluenceScores:
    self_influence: np.ndarray  # (n,) float64
    test_influence: np.ndarray | None  # (m, n) float64, predicted test-loss change on removal


def shard_indices(n: int, shard_size: int = DEFAULT_SHARD_SIZE) -> list[np.ndarray]:
    """Consecutive chunks of ``range(n)`` of at most ``shard_size`` indices."""
    return [np.arange(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def _fit_inverse(gm: GradientModel, inputs: torch.Tensor, labels: torch.Tensor, settings: SolverSettings,
                 seed: int):
    """The inverse curvature for one of exact/cg/lissa/arnoldi on the Hessian samples given."""
    shift = settings.l2 + settings.damping
    if settings.solver == "exact":
        return exact_inverse(hessian_matrix(gm, inputs, labels), shift)
    if settings.solver == "arnoldi":
        factor, _ = arnoldi_inverse(lambda v: hvp(gm, inputs, labels, v, settings.l2), gm.p,
                                    iters=settings.arnoldi_iters, rank=settings.arnoldi_rank,
                                    damping=settings.damping, dtype=gm.dtype, device=gm.device, seed=seed)
        return factor
    scale = settings.lissa_scale
    if settings.solver == "lissa" and scale == "auto":
        top = largest_eigenvalue(lambda v: hvp(gm, inputs, labels, v, shift), gm.p, dtype=gm.dtype,
                                 device=gm.device, seed=seed)
        scale = 2.0 * top
    return IterativeInverse(settings.solver, gm, inputs, labels, shift, settings.cg_tol, settings.cg_maxiter,
                            float(scale) if settings.solver == "lissa" else 10.0, settings.lissa_depth,
                            settings.lissa_repeats, settings.lissa_batch_size, seed)


def _hessian_subset(n: int, hessian_samples: int | None, seed: int) -> np.ndarray:
    if hessian_samples is None or hessian_samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 7]).choice(n, size=hessian_samples, replace=False))


def fit_influence(model: nn.Module, x_train: torch.Tensor, labels: torch.Tensor, settings: SolverSettings, *,
                  params: str = "last_layer", k: int = 1, x_test: torch.Tensor | None = None,
                  y_test: torch.Tensor | None = None, checkpoints: Sequence[tuple[float, dict]] = (),
                  features: torch.Tensor | np.ndarray | None = None, seed: int = 0,
                  dtype: torch.dtype | None = None) -> InfluencePayload:
    """Fit the curvature and the test vectors on the driver; return the payload shards score with.

    Parameters
    ----------
    model : nn.Module
        The trained classifier (any device); it is copied, never modified.
    x_train : Tensor (n, ...); labels : Tensor (n,)
        The training inputs and the labels it was trained on (for poisoning: the given labels).
    settings : SolverSettings
    params : {"last_layer", "last_k_layers", "all"}; k : int
    x_test, y_test : optional test inputs and labels whose train -> test influence is wanted.
    checkpoints : list of (lr, state_dict), required for ``tracin``.
    features : optional ``model.features(x_train)`` already computed (reused for a linear head).
    seed : int
        Seeds the Hessian subset, Arnoldi's start vector and LiSSA's mini-batches.
    """
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    device = next(model.parameters()).device
    names = select_parameters(model, params, k)
    if dtype is None and settings.solver in CLOSED_FORM_SOLVERS and uses_head_features(model, names):
        dtype = next(model.parameters()).dtype  # see CLOSED_FORM_SOLVERS
    n = len(x_train)
    want_test = x_test is not None and len(x_test) > 0
    if settings.solver == "tracin":
        if not checkpoints:
            raise ValueError("solver 'tracin' needs the per-epoch checkpoints of training: the trial must train "
                             "with keep_checkpoints=True")
        terms = []
        for lr, state in checkpoints:
            snapshot = copy.deepcopy(model)
            snapshot.load_state_dict(state)
            gm = gradient_model(snapshot, names, dtype).to(device)
            test_vectors = lr * _test_grads(gm, x_test, y_test) if want_test else None
            terms.append(InfluenceTerm(_cpu(gm), IdentityInverse(), float(lr), _cpu(test_vectors)))
        return InfluencePayload(terms, x_train.cpu(), labels)

    gm = gradient_model(model, names, dtype).to(device)
    if gm.body is not None and features is not None:
        train_inputs = torch.as_tensor(np.asarray(features)).to(device=device, dtype=gm.dtype)
    else:
        train_inputs = gm.prepare(x_train)
    if settings.solver == "grad_norm":
        inverse = IdentityInverse()
    else:
        subset = torch.as_tensor(_hessian_subset(n, settings.hessian_samples, seed), device=device)
        inverse = _fit_inverse(gm, train_inputs[subset], labels.to(device)[subset], settings, seed)
    test_vectors = inverse.solve(_test_grads(gm, x_test, y_test)) / n if want_test else None
    features_kept = train_inputs if gm.body is not None else None
    return InfluencePayload([InfluenceTerm(_cpu(gm), _cpu(inverse), 1.0, _cpu(test_vectors), _cpu(features_kept))],
                            x_train.cpu(), labels)


def _test_grads(gm: GradientModel, x_test: torch.Tensor, y_test) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y_test), dtype=torch.int64)
    return per_sample_grads(gm, gm.prepare(x_test), y)


def _cpu(obj):
    return None if obj is None else obj.to("cpu")


def score_shard(payload: InfluencePayload, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Self-influence (len,) and train -> test influence (m, len) of the training samples ``indices``.

    A module-level function so that the engine's actor pool can ship it. Runs on CUDA when the
    process sees a GPU, else on the CPU; returns float64 numpy.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    self_scores = torch.zeros(len(idx), dtype=torch.float64)
    test_scores = None
    for term in payload.terms:
        gm = term.gm.to(device)
        inverse = term.inverse.to(device)
        inputs = (term.features[idx].to(device) if term.features is not None
                  else gm.prepare(payload.x_train[idx]))
        labels = payload.labels[idx].to(device)
        test_vectors = None if term.test_vectors is None else term.test_vectors.to(device).T.contiguous()
        start = 0
        for batch in grad_batches(gm, inputs, labels):
            part = slice(start, start + len(batch))
            start += len(batch)
            self_scores[part] += term.self_weight * inverse.self_influence(batch).double().cpu()
            if test_vectors is not None:
                if test_scores is None:
                    test_scores = torch.zeros(test_vectors.shape[1], len(idx), dtype=torch.float64)
                test_scores[:, part] += batch.matmul(test_vectors).double().T.cpu()
    return {"self": self_scores.numpy(), "test": None if test_scores is None else test_scores.numpy()}


def score_influence(payload: InfluencePayload, map_shards: Callable, shard_size: int = DEFAULT_SHARD_SIZE
                    ) -> InfluenceScores:
    """Score every training sample, shard by shard, through ``map_shards(score_shard, payload, shards)``."""
    shards = shard_indices(len(payload.x_train), shard_size)
    results = map_shards(score_shard, payload, shards)
    self_scores = np.concatenate([r["self"] for r in results]) if results else np.zeros(0)
    tests = [r["test"] for r in results]
    test_scores = np.concatenate(tests, axis=1) if tests and tests[0] is not None else None
    return InfluenceScores(self_scores, test_scores)


def compute_influence(model: nn.Module, x_train: torch.Tensor, labels, settings: SolverSettings, *,
                      map_shards: Callable | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                      **fit_kwargs) -> InfluenceScores:
    """``fit_influence`` then ``score_influence`` (a plain map when ``map_shards`` is None)."""
    payload = fit_influence(model, x_train, labels, settings, **fit_kwargs)
    return score_influence(payload, map_shards or (lambda fn, shared, shards: [fn(shared, s) for s in shards]),
                           shard_size)
