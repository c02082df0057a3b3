"""Parameters, per-sample gradients and Hessians of a classifier's cross-entropy (``torch.func``).

Part of ``poisonsweep.tasks.influence`` (gradients -> solvers -> scoring, the split kronfluence uses); the
package docstring defines the quantities and says what to do when a solver fails.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from poisonsweep.tasks.train import inference_batches, inference_model

PARAM_SUBSETS = ("last_layer", "last_k_layers", "all")
FLOAT64_MAX_PARAMS = 200_000  # above this the functional model stays in its own dtype
EXACT_MAX_PARAMS = 10_000  # an explicit p x p Hessian in float64 is 800 MB at this size
WORK_BUDGET = 2 ** 24  # floats held by one vmapped call (gradients + activations), ~64-128 MB


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
