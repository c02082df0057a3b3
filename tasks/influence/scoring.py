"""Fit the inverse curvature once, then score training samples shard by shard (self- and test influence).

Part of ``poisonsweep.tasks.influence`` (gradients -> solvers -> scoring, the split kronfluence uses); the
package docstring defines the quantities and says what to do when a solver fails.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from poisonsweep.tasks.influence.gradients import (
    GradientModel, gradient_model, grad_batches, hessian_matrix, hvp, per_sample_grads,
    select_parameters, uses_head_features,
)
from poisonsweep.tasks.influence.solvers import (
    CLOSED_FORM_SOLVERS, DEFAULT_DAMPING, SOLVERS, IdentityInverse,
    IterativeInverse, arnoldi_inverse, exact_inverse, largest_eigenvalue, warn_if_lissa_too_shallow,
)

DEFAULT_SHARD_SIZE = 512


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
    if settings.solver == "lissa":  # here, in the trial's process, so that the trial records the warning
        warn_if_lissa_too_shallow(shift=shift, scale=float(scale), depth=settings.lissa_depth)
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

