"""Corrective unlearning: remove a poison's effect given the part of it that was identified.

Setting (Goel et al., "Corrective Machine Unlearning", TMLR 2024): some training samples were
manipulated, a detector (or an oracle) identifies a subset of them, the *forget set*; the rest of the
training set, unidentified poisons included, is the *retain set*. An unlearning method turns the
trained model into a new one that should no longer show the poison's effect (poison success) while
keeping clean accuracy.

An unlearning method is a function registered in ``UNLEARNERS``::

    fn(model, *, retain_x, retain_y, forget_x, forget_y, train_config, seed, model_factory, **params)
        -> nn.Module

It returns a NEW model and never changes ``model``. ``model_factory(seed)`` builds a freshly
initialised model of the same architecture (used by ``retrain``). Labels are the ones given in
training, i.e. poisoned where the sample is poisoned.

Methods: ``retrain`` (exact unlearning, Goel et al.'s EU with k = -1), ``finetune`` (catastrophic
forgetting, CF), ``ssd`` (Selective Synaptic Dampening, Foster et al., AAAI 2024),
``gradient_ascent`` (bounded ascent on the forget loss), and in ``tasks.unlearn_adaptive``
``assd`` (adaptive SSD) and ``potion`` (Schoepf et al. 2024). An optional accuracy guard
(``unlearn.guard``) refuses any method's update that costs too much retain accuracy.

Forget sets come from ``select_forget_set`` (oracle share of true poisons, a detector's flagged set,
or the top share of a detector's scores) and ``run_unlearning`` produces the rows of the
``unlearning`` table, one per selection x method.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from numbers import Integral, Real
from typing import Callable

import numpy as np
import torch
from torch import nn

from tasks.detect.base import Detection, flag_top
from tasks.poisons import PoisonedData
from tasks.metrics import poison_success
from tasks.registry import NONE, ConfigError, Interval, Options, Registry
from tasks.train import (TrainConfig, accuracy, copy_model, make_optimizer, per_sample_loss, predict_logits,
                         train_model)

UNLEARNERS = Registry("unlearning method")

# Goel et al.'s CF fine-tunes for 1000 iterations after a 4000-iteration pretraining: a quarter of it.
FINETUNE_SHARE_OF_TRAINING = 0.25
# inputs of the poison's success set whose predictions before and after unlearning are recorded
SUCCESS_EXAMPLES = 8


# ---------------------------------------------------------------------------------------------
# methods


@UNLEARNERS.register("retrain")
def retrain(model: nn.Module, *, retain_x: torch.Tensor, retain_y: torch.Tensor, forget_x: torch.Tensor,
            forget_y: torch.Tensor, train_config: TrainConfig, seed: int,
            model_factory: Callable[[int], nn.Module]) -> nn.Module:
    """Exact unlearning: a fresh model trained from scratch on the retain set with the full budget.

    The gold standard of privacy unlearning; in the corrective setting it still learns whatever
    poisons remain unidentified in the retain set.
    """
    fresh = model_factory(seed)
    train_model(fresh, retain_x, retain_y, train_config, seed=seed)
    return fresh


@UNLEARNERS.register(
    "finetune",
    {"epochs": [Interval(Integral, 1), NONE], "lr": [Interval(Real, 0, None, "neither"), NONE]},
)
def finetune(model: nn.Module, *, retain_x: torch.Tensor, retain_y: torch.Tensor, forget_x: torch.Tensor,
             forget_y: torch.Tensor, train_config: TrainConfig, seed: int,
             model_factory: Callable[[int], nn.Module], epochs: int | None = None,
             lr: float | None = None) -> nn.Module:
    """Catastrophic forgetting: continue training a copy on the retain set only.

    Parameters
    ----------
    epochs : int or None, default=None
        None means a quarter of ``train_config.epochs``, rounded up: Goel et al.'s CF runs 1000
        iterations after a 4000-iteration pretraining (SSD's protocol uses 5 epochs after 20-200).
    lr : float or None, default=None
        None means ``train_config.lr``.
    """
    tuned = copy_model(model)
    if epochs is None:
        epochs = max(1, math.ceil(FINETUNE_SHARE_OF_TRAINING * train_config.epochs))
    config = replace(train_config, epochs=epochs, lr=train_config.lr if lr is None else lr)
    train_model(tuned, retain_x, retain_y, config, seed=seed)
    return tuned


@UNLEARNERS.register(
    "ssd",
    {
        "alpha": [Interval(Real, 0, None, "neither")],
        "dampening": [Interval(Real, 0, None, "neither")],
        "importance_on": [Options(("full", "retain"))],
        "batch_size": [Interval(Integral, 1)],
    },
)
def ssd(model: nn.Module, *, retain_x: torch.Tensor, retain_y: torch.Tensor, forget_x: torch.Tensor,
        forget_y: torch.Tensor, train_config: TrainConfig, seed: int,
        model_factory: Callable[[int], nn.Module], alpha: float = 10.0, dampening: float = 1.0,
        importance_on: str = "full", batch_size: int = 64) -> nn.Module:
    """Selective Synaptic Dampening (Foster, Schoepf, Brintrup, AAAI 2024); no training steps.

    Importances ``I`` are the mean over minibatches of the squared minibatch gradient of the
    cross-entropy (a diagonal-Fisher stand-in), with the model in eval mode. A parameter whose
    forget importance exceeds ``alpha`` times its reference importance is multiplied by
    ``min(dampening * I_ref / I_forget, 1)``.

    Parameters
    ----------
    alpha : float, default=10
        The selection weighting (the paper's alpha; ``selection_weighting`` in its code).
    dampening : float, default=1
        The dampening constant (the paper's lambda; ``dampening_constant`` in its code).
    importance_on : {"full", "retain"}, default="full"
        Reference set: the full training set (retain then forget, as the paper's ``ConcatDataset``)
        or the retain set only (Goel et al.'s variant). With "full" the reference averages over the
        forget batches too, so ``I_full >~ (forget share of the batches) * I_forget``: once the forget
        set is more than about ``1 / alpha`` of the training set nothing can be selected.
    batch_size : int, default=64
        Minibatch size of the importance computation (64 in the paper's code).
    """
    unlearned = copy_model(model)
    if len(forget_x) == 0:
        return unlearned
    if importance_on == "full":
        reference_x, reference_y = torch.cat([retain_x, forget_x]), torch.cat([retain_y, forget_y])
    else:
        reference_x, reference_y = retain_x, retain_y
    forget_importance = minibatch_importance(unlearned, forget_x, forget_y, batch_size=batch_size)
    reference_importance = minibatch_importance(unlearned, reference_x, reference_y, batch_size=batch_size)
    params = dict(unlearned.named_parameters())
    dampened = ssd_dampen({k: p.detach() for k, p in params.items()}, forget_importance,
                          reference_importance, alpha=alpha, dampening=dampening)
    with torch.no_grad():
        for name, value in dampened.items():
            params[name].copy_(value)
    return unlearned


def minibatch_importance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                         batch_size: int) -> dict[str, torch.Tensor]:
    """SSD's importance: mean over minibatches (in order) of the squared gradient of the batch-mean CE.

    The model is put in eval mode (no dropout, batch-norm uses running statistics) as in the paper.
    Parameters that get no gradient have importance 0.

    Returns
    -------
    importance : dict of str to torch.Tensor
        One tensor per named parameter, shaped like it.
    """
    model.eval()
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    importance = {name: torch.zeros_like(p) for name, p in params.items()}
    n_batches = 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        loss = nn.functional.cross_entropy(model(xb), yb)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads):
            if grad is not None:
                importance[name] += grad.detach() ** 2
        n_batches += 1
    return {name: value / max(n_batches, 1) for name, value in importance.items()}


def ssd_dampen(params: dict[str, torch.Tensor], forget_importance: dict[str, torch.Tensor],
               full_importance: dict[str, torch.Tensor], *, alpha: float,
               dampening: float) -> dict[str, torch.Tensor]:
    """SSD's dampening step on given importances (pure: returns new tensors).

    ``theta_i <- beta_i * theta_i`` where ``beta_i = min(dampening * I_full_i / I_forget_i, 1)`` for the
    parameters with ``I_forget_i > alpha * I_full_i`` and ``beta_i = 1`` for all others.
    """
    out = {}
    for name, theta in params.items():
        forget, full = forget_importance[name], full_importance[name]
        selected = forget > alpha * full  # never true where forget == 0, so the ratio below is finite
        beta = torch.ones_like(theta)
        beta[selected] = torch.clamp(dampening * full[selected] / forget[selected], max=1.0)
        out[name] = theta * beta
    return out


@UNLEARNERS.register(
    "gradient_ascent",
    {
        "epochs": [Interval(Integral, 1)],
        "lr": [Interval(Real, 0, None, "neither"), NONE],
        "max_loss": [Interval(Real, 0, None, "neither"), NONE],
    },
)
def gradient_ascent(model: nn.Module, *, retain_x: torch.Tensor, retain_y: torch.Tensor,
                    forget_x: torch.Tensor, forget_y: torch.Tensor, train_config: TrainConfig, seed: int,
                    model_factory: Callable[[int], nn.Module], epochs: int = 20, lr: float | None = None,
                    max_loss: float | None = None) -> nn.Module:
    """Bounded gradient ascent: maximise the cross-entropy on the forget set (its given labels).

    Minibatch steps (``train_config``'s optimizer and batch size, seeded shuffling) on the negated
    forget loss, for at most ``epochs`` epochs. Before every step the mean forget loss is measured in
    eval mode; ascent stops once it reaches ``max_loss``, because beyond that the model is being
    destroyed rather than made to forget (unbounded ascent diverges). The retain set is not used.

    Parameters
    ----------
    epochs : int, default=20
        The most passes over the forget set; ascent ends earlier once the bound is reached.
    lr : float or None, default=None
        None means a tenth of ``train_config.lr``: one Adam step at the training lr already takes a
        memorised forget set from a loss near 0 to about 4 (badnets on digits), far past the bound.
    max_loss : float or None, default=None
        None means ``ln(num_classes)``: the loss of a uniform prediction, i.e. the model predicts the
        forget labels no better than chance.
    """
    unlearned = copy_model(model)
    if len(forget_x) == 0:
        return unlearned
    device = next(unlearned.parameters()).device
    bound = math.log(_num_outputs(unlearned, forget_x)) if max_loss is None else max_loss
    optimizer = make_optimizer(unlearned, replace(train_config, lr=train_config.lr / 10 if lr is None else lr))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(forget_x), generator=generator)
            for start in range(0, len(forget_x), train_config.batch_size):
                if _mean_loss(unlearned, forget_x, forget_y) >= bound:
                    unlearned.eval()
                    return unlearned
                batch = order[start:start + train_config.batch_size]
                unlearned.train()
                logits = unlearned(forget_x[batch].to(device))
                loss = -nn.functional.cross_entropy(logits, forget_y[batch].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    unlearned.eval()
    return unlearned


def _num_outputs(model: nn.Module, x: torch.Tensor) -> int:
    return predict_logits(model, x[:1]).shape[1]


def _mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(per_sample_loss(model, x, y).mean())


# ---------------------------------------------------------------------------------------------
# forget-set selection

SELECTION_KINDS = ("oracle", "flagged", "top")
_SELECTION_KEYS = {
    "oracle": {"kind", "fraction", "fractions"},
    "flagged": {"kind", "detector"},
    "top": {"kind", "detector", "fraction", "fractions"},
}
_METHOD_KEYS = {"name", "params"}
_UNLEARN_KEYS = {"methods", "selections", "guard"}
_GUARD_KEYS = {"max_retain_drop"}


def select_forget_set(selection: dict, *, detections: dict[str, Detection], is_poison: np.ndarray,
                      seed: int) -> np.ndarray:
    """The training indices (sorted) that a selection identifies as the forget set.

    Parameters
    ----------
    selection : dict
        ``{kind: oracle, fraction: f}``: a seeded random ``round(f * n_poison)`` of the true poisons
        (nested: for one seed a smaller f picks a subset of a larger f's set);
        ``{kind: flagged, detector: NAME}``: the detector's flagged samples;
        ``{kind: top, detector: NAME, fraction: q}``: the ``round(q * n_train)`` highest scores of the
        detector (ties broken by index).
    detections : dict of str to Detection
        The trial's detections by detector name.
    is_poison : ndarray of bool, shape (n_train,)
        Ground truth; only the oracle reads it.
    """
    kind = selection["kind"]
    if kind == "oracle":
        poisons = np.flatnonzero(is_poison)
        count = int(round(selection["fraction"] * len(poisons)))
        order = np.random.default_rng(seed).permutation(poisons)
        return np.sort(order[:count])
    if kind == "flagged":
        return np.flatnonzero(detections[selection["detector"]].flagged)
    if kind == "top":
        return np.flatnonzero(flag_top(detections[selection["detector"]].scores, selection["fraction"]))
    raise ConfigError(f"unknown selection kind {kind!r}; choose one of: {', '.join(SELECTION_KINDS)}")


def expand_selections(selections: list[dict]) -> list[dict]:
    """One selection per fraction: ``{kind, fractions: [a, b]}`` becomes two selections with ``fraction``."""
    expanded = []
    for selection in selections:
        if "fractions" in selection:
            base = {k: v for k, v in selection.items() if k != "fractions"}
            expanded += [{**base, "fraction": f} for f in selection["fractions"]]
        else:
            expanded.append(dict(selection))
    return expanded


def normalize_methods(methods: list) -> list[tuple[str, dict]]:
    """``[ssd, {name: finetune, params: {epochs: 2}}]`` -> ``[("ssd", {}), ("finetune", {"epochs": 2})]``."""
    return [(m, {}) if isinstance(m, str) else (m["name"], dict(m.get("params") or {})) for m in methods]


# ---------------------------------------------------------------------------------------------
# config check


def _is_fraction(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and 0 <= value <= 1


def check_unlearn_config(config: dict, detector_names: list[str]) -> list[str]:
    """Every problem with an ``unlearn:`` section, as messages naming the key path and what is allowed.

    Parameters
    ----------
    config : dict
        The ``unlearn:`` section: ``{methods: [...], selections: [...]}``.
    detector_names : list of str
        The detectors the trial runs; a selection may only name one of these.
    """
    if not isinstance(config, dict):
        return [f"unlearn must be a mapping with keys methods and selections; got {config!r}"]
    errors = [f"unlearn.{key} is not a key of unlearn (allowed: methods, selections, guard); remove it"
              for key in config if key not in _UNLEARN_KEYS]
    errors += _check_guard(config.get("guard"))
    for key, check in (("methods", _check_method), ("selections", _check_selection)):
        items = config.get(key)
        if not isinstance(items, list) or not items:
            errors.append(f"unlearn.{key} must be a non-empty list; got {items!r}")
            continue
        for i, item in enumerate(items):
            errors += check(f"unlearn.{key}[{i}]", item, detector_names)
    return errors


def _check_guard(guard) -> list[str]:
    if guard is None:
        return []
    if not isinstance(guard, dict):
        return [f"unlearn.guard must be a mapping {{max_retain_drop: a number in [0, 1]}}; got {guard!r}"]
    errors = [f"unlearn.guard.{k} is not a key of guard (allowed: max_retain_drop); remove it"
              for k in guard if k not in _GUARD_KEYS]
    drop = guard.get("max_retain_drop")
    if not _is_fraction(drop):
        errors.append(f"unlearn.guard.max_retain_drop must be a number in [0, 1]; got {drop!r}")
    return errors


def _check_method(path: str, method, detector_names: list[str]) -> list[str]:
    if isinstance(method, str):
        name, params = method, {}
    elif isinstance(method, dict):
        unknown = [f"{path}.{k} is not a key of a method (allowed: name, params); remove it"
                   for k in method if k not in _METHOD_KEYS]
        name, params = method.get("name"), method.get("params") or {}
        if not isinstance(params, dict):
            return unknown + [f"{path}.params must be a mapping; got {params!r}"]
        if unknown:
            return unknown
    else:
        return [f"{path} must be a method name or {{name: ..., params: {{...}}}}; got {method!r}"]
    if name not in UNLEARNERS:
        return [f"{path}.name must be one of: {', '.join(UNLEARNERS.names())}; got {name!r}"]
    return UNLEARNERS.get(name).check_params(f"{path}.params", params)


def _check_selection(path: str, selection, detector_names: list[str]) -> list[str]:
    if not isinstance(selection, dict):
        return [f"{path} must be a mapping with a kind; got {selection!r}"]
    kind = selection.get("kind")
    if kind not in SELECTION_KINDS:
        return [f"{path}.kind must be one of: {', '.join(SELECTION_KINDS)}; got {kind!r}"]
    allowed = _SELECTION_KEYS[kind]
    errors = [f"{path}.{k} is not a key of a {kind} selection (allowed: {', '.join(sorted(allowed))}); remove it"
              for k in selection if k not in allowed]
    if "detector" in allowed:
        detector = selection.get("detector")
        if detector not in detector_names:
            listed = ", ".join(detector_names) or "none"
            errors.append(f"{path}.detector must be one of the trial's detectors ({listed}); got {detector!r}")
    if "fraction" in allowed:
        errors += _check_fractions(path, selection)
    return errors


def _check_fractions(path: str, selection: dict) -> list[str]:
    has_one, has_list = "fraction" in selection, "fractions" in selection
    if has_one == has_list:
        return [f"{path} needs exactly one of fraction (a number in [0, 1]) or fractions (a list of them)"]
    if has_one:
        value = selection["fraction"]
        return [] if _is_fraction(value) else [f"{path}.fraction must be a number in [0, 1]; got {value!r}"]
    values = selection["fractions"]
    if not isinstance(values, list) or not values:
        return [f"{path}.fractions must be a non-empty list of numbers in [0, 1]; got {values!r}"]
    return [f"{path}.fractions[{i}] must be a number in [0, 1]; got {v!r}"
            for i, v in enumerate(values) if not _is_fraction(v)]


# ---------------------------------------------------------------------------------------------
# orchestration


def run_unlearning(model: nn.Module, poisoned: PoisonedData, x_test: torch.Tensor, y_test: torch.Tensor,
                   detections: dict[str, Detection], unlearn_config: dict, train_config: TrainConfig,
                   model_factory: Callable[[int], nn.Module], seed: int) -> list[dict]:
    """Run every method on every forget-set selection; one row per selection x method.

    Row columns: ``selection`` (detector name or ``"oracle"``), ``selection_kind``,
    ``identified_fraction`` (a share of the poisons: f for oracle, and for flagged and top the share of
    the true poisons in the forget set), ``top_fraction`` (q for top, the share of the training set it
    forgets; NaN otherwise), ``method``, ``params`` (JSON, defaults filled in), ``n_forget``,
    ``forget_poison_share`` (precision), ``poisons_in_forget`` (recall), and before/after values of
    ``clean_test_acc``, ``poison_success``, ``retain_acc`` and ``forget_acc`` (retain and forget accuracy
    are measured against the labels GIVEN in training, i.e. the poisoned ones), plus
    ``forget_true_acc_before/after`` against the true labels, ``success_predictions_before/after``
    (the classes predicted for the first ``SUCCESS_EXAMPLES`` inputs of the poison's success set, e.g.
    triggered test images: what the report shows as images), and ``seconds`` (the method alone).
    An empty forget set gives a row whose after values equal the before values.

    With ``guard: {max_retain_drop: d}`` an update whose retain accuracy falls by more than ``d``
    is refused and the model before it is kept (the after values are then the before values);
    ``guard_max_retain_drop`` (NaN without a guard), ``guard_refused`` and the refused update's
    ``refused_retain_acc``, ``refused_clean_test_acc`` and ``refused_poison_success`` (NaN when
    nothing was refused) record it. Retain accuracy is against the given labels, so unidentified
    poisons in the retain set count: removing their effect lowers it by up to their share of the
    retain set, and ``d`` should allow for that.
    """
    errors = check_unlearn_config(unlearn_config, list(detections))
    if errors:
        raise ConfigError("; ".join(errors))
    methods = normalize_methods(unlearn_config["methods"])
    max_drop = (unlearn_config.get("guard") or {}).get("max_retain_drop")
    before = {"clean_test_acc_before": accuracy(model, x_test, y_test),
              "poison_success_before": poison_success(model, poisoned),
              "success_predictions_before": success_predictions(model, poisoned)}
    rows = []
    for selection in expand_selections(unlearn_config["selections"]):
        forget = select_forget_set(selection, detections=detections, is_poison=poisoned.is_poison, seed=seed)
        split = _split(poisoned, forget)
        base = {**_describe_selection(selection, forget, poisoned.is_poison), **before,
                **_set_accuracies(model, split, "before")}
        for name, params in methods:
            rows.append({**base, **_run_method(model, name, params, split, x_test, y_test, poisoned,
                                               train_config, model_factory, seed, max_drop)})
    return rows


def success_predictions(model: nn.Module, poisoned: PoisonedData) -> list[int]:
    """The classes ``model`` predicts for the first ``SUCCESS_EXAMPLES`` inputs of the poison's success set."""
    examples = poisoned.success_x[:SUCCESS_EXAMPLES]
    if len(examples) == 0:
        return []
    return predict_logits(model, examples).argmax(1).tolist()


def _split(poisoned: PoisonedData, forget: np.ndarray) -> dict[str, torch.Tensor]:
    keep = np.ones(len(poisoned.labels), dtype=bool)
    keep[forget] = False
    if not keep.any():
        raise ConfigError("the forget set is the whole training set; nothing is left to retain")
    retain_idx, forget_idx = torch.as_tensor(np.flatnonzero(keep)), torch.as_tensor(forget, dtype=torch.int64)
    return {
        "retain_x": poisoned.x_train[retain_idx], "retain_y": poisoned.labels[retain_idx],
        "forget_x": poisoned.x_train[forget_idx], "forget_y": poisoned.labels[forget_idx],
        "forget_true_y": poisoned.true_labels[forget_idx],
    }


def _describe_selection(selection: dict, forget: np.ndarray, is_poison: np.ndarray) -> dict:
    n_poison, hits = int(is_poison.sum()), int(is_poison[forget].sum())
    recall = hits / n_poison if n_poison else float("nan")
    kind = selection["kind"]
    return {
        "selection": "oracle" if kind == "oracle" else selection["detector"],
        "selection_kind": kind,
        # one meaning per column: identified_fraction is a share of the poisons (the oracle's f as set,
        # else the share the forget set holds); top_fraction is top-q's q, a share of the training set
        "identified_fraction": float(selection["fraction"]) if kind == "oracle" else recall,
        "top_fraction": float(selection["fraction"]) if kind == "top" else float("nan"),
        "n_forget": len(forget),
        "forget_poison_share": hits / len(forget) if len(forget) else float("nan"),
        "poisons_in_forget": recall,
    }


def _set_accuracies(model: nn.Module, split: dict, when: str) -> dict:
    return {
        f"retain_acc_{when}": accuracy(model, split["retain_x"], split["retain_y"]),
        f"forget_acc_{when}": accuracy(model, split["forget_x"], split["forget_y"]),
        f"forget_true_acc_{when}": accuracy(model, split["forget_x"], split["forget_true_y"]),
    }


def _run_method(model, name, params, split, x_test, y_test, poisoned, train_config, model_factory,
                seed, max_drop: float | None = None) -> dict:
    entry = UNLEARNERS.get(name)
    row = {"method": name, "params": json.dumps({**entry.defaults(), **params}, sort_keys=True),
           "guard_max_retain_drop": float("nan") if max_drop is None else float(max_drop),
           "guard_refused": False, "refused_retain_acc": float("nan"), "refused_clean_test_acc": float("nan"),
           "refused_poison_success": float("nan")}
    if len(split["forget_x"]) == 0:
        # nothing identified: nothing to unlearn, the model stays as it is
        row.update(clean_test_acc_after=accuracy(model, x_test, y_test),
                   poison_success_after=poison_success(model, poisoned), seconds=0.0,
                   success_predictions_after=success_predictions(model, poisoned),
                   **_set_accuracies(model, split, "after"))
        return row
    start = time.perf_counter()
    unlearned = entry.fn(model, retain_x=split["retain_x"], retain_y=split["retain_y"],
                         forget_x=split["forget_x"], forget_y=split["forget_y"], train_config=train_config,
                         seed=seed, model_factory=model_factory, **params)
    row["seconds"] = time.perf_counter() - start
    if max_drop is not None:
        unlearned = _guard(model, unlearned, split, max_drop, row, x_test, y_test, poisoned)
    row.update(clean_test_acc_after=accuracy(unlearned, x_test, y_test),
               poison_success_after=poison_success(unlearned, poisoned),
               success_predictions_after=success_predictions(unlearned, poisoned),
               **_set_accuracies(unlearned, split, "after"))
    return row


def _guard(model: nn.Module, unlearned: nn.Module, split: dict, max_drop: float, row: dict, x_test, y_test,
           poisoned: PoisonedData) -> nn.Module:
    """``unlearned``, or ``model`` when the update costs more than ``max_drop`` retain accuracy.

    A refused update is recorded in ``row`` (``guard_refused`` and the refused model's accuracies).
    """
    retain_after = accuracy(unlearned, split["retain_x"], split["retain_y"])
    if accuracy(model, split["retain_x"], split["retain_y"]) - retain_after <= max_drop:
        return unlearned
    row.update(guard_refused=True, refused_retain_acc=retain_after,
               refused_clean_test_acc=accuracy(unlearned, x_test, y_test),
               refused_poison_success=poison_success(unlearned, poisoned))
    return model


# registers ``assd`` and ``potion`` in UNLEARNERS (at the end: that module imports this one)
from tasks import unlearn_adaptive  # noqa: E402,F401
