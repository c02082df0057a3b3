"""The ``influence`` detector: self-influence of every training sample (Koh & Liang 2017, §5.4).

Score = self-influence g_i^T H^{-1} g_i of the sample under its *given* label (TracIn: the sum
over checkpoints of lr ||g_i||^2; grad_norm: ||g_i||^2). Higher = more suspicious: a mislabelled
sample is one the model can fit only by bending towards it, so removing it would change its own
loss the most. By default (``flag_rule="cleanlab"``) the flags are ``cleanlab.filter.find_label_issues``
on the trained model's in-sample probabilities (Northcutt et al., JAIR 2021;
``label_issues.decide_by_cleanlab``), and the flagged scores are lifted by one constant so that
they all score at least as high as every unflagged sample. Self-influence has no class
probabilities of its own; the model it measures influence in does, and deciding with them is the
label-noise decision of that same model (it equals the ``loss`` detector's flags, ranked by
self-influence instead of loss). ``flag_rule="auto"`` flags the n highest scores, n = confident
learning's estimate of the number of label errors (``base.label_issue_count``);
``flag_rule="fraction"`` the top ``flag_fraction``. Like ``loss``, the
score is oriented for label noise: a learned backdoor's samples are fitted easily and score low.

With ``test_points`` > 0 it also returns, in ``extras["influence"]``, the ``top_k`` most harmful and
most helpful training samples of each chosen test point (see ``influence_rows``).

The per-sample work runs through ``context.map_shards`` (a plain map, or the engine's Ray actors,
``resources.actors``), in shards of ``SHARD_SIZE`` training indices.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch

from poisonsweep.tasks.detect.base import DETECTORS, FLAG_CONSTRAINTS, Detection, DetectionContext
from poisonsweep.tasks.detect.label_issues import DEFAULT_FILTER, FILTERS, LABEL_NOISE_FLAG_RULES, decide_label_noise
from poisonsweep.tasks.influence import (DEFAULT_DAMPING, DEFAULT_SHARD_SIZE, PARAM_SUBSETS, SOLVERS, SolverSettings,
                             fit_influence, score_influence, select_parameters, uses_head_features)
from poisonsweep.tasks.registry import INT_LIST, NONE, ConfigError, Interval, Options

SHARD_SIZE = DEFAULT_SHARD_SIZE

CONSTRAINTS = {
    "solver": [Options(SOLVERS)],
    "parameters": [Options(PARAM_SUBSETS)],
    "layers": [Interval(Integral, 1)],
    "damping": [Interval(Real, 0)],
    **FLAG_CONSTRAINTS,
    "flag_rule": [Options(LABEL_NOISE_FLAG_RULES)],
    "filter_by": [Options(FILTERS)],
    "test_points": [Interval(Integral, 0), INT_LIST],
    "top_k": [Interval(Integral, 1)],
    "hessian_samples": [Interval(Integral, 1), NONE],
    "cg_tol": [Interval(Real, 0, 1, "neither")],
    "cg_maxiter": [Interval(Integral, 1)],
    "lissa_scale": [Interval(Real, 0, None, "neither"), Options(("auto",))],
    "lissa_depth": [Interval(Integral, 1)],
    "lissa_repeats": [Interval(Integral, 1)],
    "lissa_batch_size": [Interval(Integral, 1)],
    "arnoldi_iters": [Interval(Integral, 1)],
    "arnoldi_rank": [Interval(Integral, 1)],
}


def choose_test_points(n_test: int, test_points: int | list, seed: int) -> np.ndarray:
    """Indices of the test points: a seeded sample of ``test_points`` of them, or the list given."""
    if isinstance(test_points, (list, tuple)):
        chosen = np.asarray(test_points, dtype=np.int64)
        bad = chosen[(chosen < 0) | (chosen >= n_test)]
        if len(bad):
            raise ValueError(f"test_points {bad.tolist()} are outside the {n_test} test samples")
        return chosen
    count = min(int(test_points), n_test)
    return np.sort(np.random.default_rng([seed, 11]).choice(n_test, size=count, replace=False))


def influence_rows(test_influence: np.ndarray, test_indices: np.ndarray, top_k: int) -> list[dict]:
    """The ``top_k`` harmful and helpful training samples of each test point.

    ``test_influence[j, i]`` is the predicted change of test point j's loss when training sample i
    is removed: harmful samples have the most negative values (removing them helps), helpful the
    most positive. Rank 1 is the strongest of its kind; samples of the wrong sign are not listed.
    """
    rows = []
    for j, test_index in enumerate(test_indices):
        values = test_influence[j]
        order = np.argsort(values, kind="stable")
        harmful = [i for i in order[:top_k] if values[i] < 0]
        helpful = [i for i in order[::-1][:top_k] if values[i] > 0]
        for kind, chosen in (("harmful", harmful), ("helpful", helpful)):
            rows += [{"test_index": int(test_index), "train_index": int(i), "influence": float(values[i]),
                      "rank": rank, "kind": kind} for rank, i in enumerate(chosen, start=1)]
    return rows


def tracin_optimizer_error(solver: str, optimizer: str) -> str | None:
    """TracIn weighs each checkpoint by the SGD step lr x gradient; Adam's steps are rescaled per
    coordinate, so lr_c <g_c(test), g_c(i)> is not the loss change it claims to be (Pruthi et al. 2020, sec. 3)."""
    if solver == "tracin" and optimizer != "sgd":
        return (f"influence solver 'tracin' assumes SGD steps (lr x gradient), but train.optimizer is {optimizer!r}, "
                "whose steps are rescaled per coordinate; set train.optimizer: sgd, or choose another influence "
                "solver (e.g. solver: exact)")
    return None


def _tracin_needs_sgd(params: dict, trial: dict) -> str | None:
    """``trial_check``: the solver against the trial's ``train.optimizer``, before any trial starts."""
    return tracin_optimizer_error(params.get("solver"), trial["train"]["optimizer"])


# the names these two parameters had until 2026-12 ("k" read as neighbours beside knn's k; "params" inside params)
RENAMED = {"params": "parameters", "k": "layers"}


@DETECTORS.register("influence", CONSTRAINTS, tables=("influence",), trial_check=_tracin_needs_sgd, renamed=RENAMED,
                    needs=lambda params: {"checkpoints"} if params["solver"] == "tracin" else set())
def detect(context: DetectionContext, *, seed: int, solver: str = "exact", parameters: str = "last_layer", layers: int = 2,
           damping: float = DEFAULT_DAMPING, flag_rule: str = "cleanlab", flag_fraction: float = 0.1,
           filter_by: str = DEFAULT_FILTER, test_points: int | list = 0,
           top_k: int = 10, hessian_samples: int | None = None, cg_tol: float = 1e-4, cg_maxiter: int = 300,
           lissa_scale: float | str = "auto", lissa_depth: int = 1000, lissa_repeats: int = 1,
           lissa_batch_size: int = 128, arnoldi_iters: int = 100, arnoldi_rank: int = 50) -> Detection:
    """Self-influence of each training sample (higher = more suspicious); influence on test points.

    Parameters
    ----------
    solver : {"exact", "cg", "lissa", "arnoldi", "grad_norm", "tracin"}, default="exact"
    parameters : {"last_layer", "last_k_layers", "all"}, default="last_layer"
        Which of the model's parameters the influence is differentiated in (formerly ``params``).
    layers : int, default=2
        Layers differentiated when ``parameters="last_k_layers"`` (formerly ``k``).
    damping : float, default=0.01
        Added to the Hessian (with ``train.weight_decay``, the L2 term of the objective).
    flag_rule : {"cleanlab", "auto", "fraction"}, default="cleanlab"
        ``"cleanlab"``: cleanlab's ``find_label_issues`` on the model's probabilities, scores
        lifted; ``"auto"``: the top n, n = confident learning's count (module docstring).
    flag_fraction : float, default=0.1
        Share flagged with ``flag_rule="fraction"``.
    filter_by : str, default="prune_by_noise_rate"
        ``find_label_issues``' method with ``flag_rule="cleanlab"``.
    test_points : int or list of int, default=0
        How many test points (seeded) or which ones get a train -> test influence table.
    top_k : int, default=10
        Harmful and helpful training samples listed per test point.
    hessian_samples : int or None, default=None
        Estimate the Hessian on a seeded subset of this many training samples (None: all).
    cg_tol, cg_maxiter, lissa_scale, lissa_depth, lissa_repeats, lissa_batch_size,
    arnoldi_iters, arnoldi_rank : solver knobs, see ``poisonsweep.tasks.influence``.

    Returns
    -------
    detection : Detection
        ``scores`` float64 (n,), ``flagged`` by ``flag_rule``, ``extras["influence"]``.
    """
    if message := tracin_optimizer_error(solver, context.train_config.optimizer):
        raise ConfigError(message)
    settings = SolverSettings(solver=solver, damping=damping, l2=context.train_config.weight_decay,
                              hessian_samples=hessian_samples, cg_tol=cg_tol, cg_maxiter=cg_maxiter,
                              lissa_scale=lissa_scale, lissa_depth=lissa_depth, lissa_repeats=lissa_repeats,
                              lissa_batch_size=lissa_batch_size, arnoldi_iters=arnoldi_iters,
                              arnoldi_rank=arnoldi_rank)
    test_indices = np.zeros(0, dtype=np.int64)
    if test_points:
        if context.x_test is None or context.y_test is None:
            raise ValueError("influence.test_points needs the test split in the detection context")
        test_indices = choose_test_points(len(context.x_test), test_points, seed)
    x_test = context.x_test[torch.as_tensor(test_indices)] if len(test_indices) else None
    y_test = np.asarray(context.y_test)[test_indices] if len(test_indices) else None
    # the linear-head path reuses the penultimate features other detectors already computed
    head_only = uses_head_features(context.model, select_parameters(context.model, parameters, layers))
    features = context.features if head_only and solver != "tracin" else None
    payload = fit_influence(context.model, context.x_train, context.labels, settings, params=parameters, k=layers,
                            x_test=x_test, y_test=y_test, checkpoints=context.checkpoints, features=features,
                            seed=seed)
    result = score_influence(payload, context.map_shards, SHARD_SIZE)
    scores = np.asarray(result.self_influence, dtype=np.float64)
    rows = influence_rows(result.test_influence, test_indices, top_k) if result.test_influence is not None else []
    scores, flagged = decide_label_noise(scores, context, flag_rule=flag_rule, flag_fraction=flag_fraction,
                                         filter_by=filter_by)
    return Detection(scores=scores, flagged=flagged, extras={"influence": rows})
