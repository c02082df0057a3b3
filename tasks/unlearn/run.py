"""``run_unlearning``: every method on every forget-set selection, one ``unlearning`` row each,
with the optional accuracy guard (``unlearn.guard``) that refuses an update costing too much retain
accuracy."""

from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from poisonsweep.tasks.detect.base import Detection
from poisonsweep.tasks.metrics import poison_success
from poisonsweep.tasks.poisons import PoisonedData
from poisonsweep.tasks.registry import ConfigError
from poisonsweep.tasks.train import TrainConfig, accuracy, predict_logits
from poisonsweep.tasks.unlearn.methods import UNLEARNERS
from poisonsweep.tasks.unlearn.selection import check_unlearn_config, expand_selections, normalize_methods, select_forget_set

# inputs of the poison's success set whose predictions before and after unlearning are recorded
SUCCESS_EXAMPLES = 8


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
            rows.append({**base, **_run_method(model, name, params, split, base, x_test, y_test, poisoned,
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


def _set_accuracies(model: nn.Module, split: dict, when: str, retain_acc: float | None = None) -> dict:
    """Retain, forget and forget-true accuracy (``retain_acc``: already measured)."""
    return {
        f"retain_acc_{when}": accuracy(model, split["retain_x"], split["retain_y"]) if retain_acc is None else retain_acc,
        f"forget_acc_{when}": accuracy(model, split["forget_x"], split["forget_y"]),
        f"forget_true_acc_{when}": accuracy(model, split["forget_x"], split["forget_true_y"]),
    }


def _run_method(model, name, params, split, before, x_test, y_test, poisoned, train_config, model_factory,
                seed, max_drop: float | None = None) -> dict:
    """One method's row; ``before`` holds the model's ``*_before`` values, which a kept model reuses."""
    entry = UNLEARNERS.get(name)
    row = {"method": name, "params": json.dumps({**entry.defaults(), **params}, sort_keys=True),
           "guard_max_retain_drop": float("nan") if max_drop is None else float(max_drop),
           "guard_refused": False, "refused_retain_acc": float("nan"), "refused_clean_test_acc": float("nan"),
           "refused_poison_success": float("nan")}
    if len(split["forget_x"]) == 0:  # nothing identified: nothing to unlearn, the model stays as it is
        return {**row, "seconds": 0.0, **_kept(before)}
    start = time.perf_counter()
    unlearned = entry.fn(model, retain_x=split["retain_x"], retain_y=split["retain_y"],
                         forget_x=split["forget_x"], forget_y=split["forget_y"], train_config=train_config,
                         seed=seed, model_factory=model_factory, **params)
    row["seconds"] = time.perf_counter() - start
    retain_after = accuracy(unlearned, split["retain_x"], split["retain_y"])
    if max_drop is not None and before["retain_acc_before"] - retain_after > max_drop:
        # the guard refuses the update: the model before it is kept, and the refused one recorded
        row.update(guard_refused=True, refused_retain_acc=retain_after,
                   refused_clean_test_acc=accuracy(unlearned, x_test, y_test),
                   refused_poison_success=poison_success(unlearned, poisoned))
        return {**row, **_kept(before)}
    row.update(clean_test_acc_after=accuracy(unlearned, x_test, y_test),
               poison_success_after=poison_success(unlearned, poisoned),
               success_predictions_after=success_predictions(unlearned, poisoned),
               **_set_accuracies(unlearned, split, "after", retain_acc=retain_after))
    return row


def _kept(before: dict) -> dict:
    """The ``*_after`` values of a model left as it was: its ``*_before`` values (evaluation is deterministic)."""
    return {key.replace("_before", "_after"): value for key, value in before.items() if key.endswith("_before")}
