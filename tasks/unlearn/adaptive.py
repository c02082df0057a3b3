"""Adaptive Selective Synaptic Dampening and Potion: SSD without a hand-set selection weight alpha.

SSD dampens the parameters whose forget importance exceeds ``alpha`` times their reference
importance, and alpha is "quite sensitive". Schoepf, Foster & Brintrup set it from the data instead:

- **ASSD** ("Parameter-tuning-free data entry error unlearning with adaptive selective synaptic
  dampening", 2024): alpha is the ``100 − ln(1 + 100·s)`` percentile of the importance ratios
  I_forget / I_reference over all parameters, where s is the forget set's share of the training
  data, and lambda = 1. About ln(1 + 100·s) % of the parameters are dampened.
- **Potion** ("Potion: Towards Poison Unlearning", DMLR 2024): the same dampening, searched: start
  from s, and while the model still predicts the forget set's (poisoned) labels on more than
  ``p_cut`` times the share it did before, restart from the original model with s × 1.1.

Read (not copied) from the authors' ``if-loops/towards_poison_unlearning``: ``src/utils.py``
(``ParameterPerturber.modify_weight`` with ``adaptive=True``, ``assd_tuning``: squared minibatch
gradients averaged over batches, ratios without NaN/inf, ``np.nanpercentile``, lambda 1),
``src/methods.py`` (class ``ASSD``: ``STEP_MULT = 1.1``, ``MAX_TRY = 500``, stop when forget accuracy
≤ ``min_acc · original``), ``src/main.py`` (Potion's s starts at |forget| / |train| / 25; the
reference importance is computed on the retain set) and ``src/opts.py`` (batch 512, ``p_cut`` default 0; its run script
sweeps 0–0.75).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Callable

import numpy as np
import torch
from torch import nn

from poisonsweep.tasks.train import TrainConfig, accuracy, copy_model
from poisonsweep.tasks.unlearn.methods import UNLEARNERS, dampen_, minibatch_importance, reference_set
from poisonsweep.tasks.registry import Interval, Options

__all__ = ["adaptive_alpha", "assd", "potion", "forget_share"]

# ASSD: s = |forget| / |train| (the share left in assd_tuning's comment); Potion starts at a 25th of
# it (main.py, "Adaptive calc original") and grows it
ASSD_SHARE_DIVISOR = 1.0
POTION_SHARE_DIVISOR = 25.0
STEP_MULTIPLIER = 1.1  # Potion's growth of s per failed try
MAX_TRIES = 500


def forget_share(n_forget: int, n_retain: int, divisor: float) -> float:
    """s = |forget| / (|forget| + |retain|) / divisor."""
    return n_forget / (n_forget + n_retain) / divisor


def selection_percentile(share: float) -> float:
    """100 − ln(1 + 100·s): the percentile of the importance ratios used as alpha."""
    return 100.0 - math.log1p(100.0 * share)


def adaptive_alpha(forget_importance: dict[str, torch.Tensor], reference_importance: dict[str, torch.Tensor],
                   percentile: float) -> float:
    """The ``percentile`` of I_forget / I_reference over every parameter (NaN and inf left out)."""
    ratios = torch.cat([(forget_importance[k] / reference_importance[k]).reshape(-1) for k in forget_importance])
    ratios = ratios[torch.isfinite(ratios)].double().cpu().numpy()
    if len(ratios) == 0:
        return math.inf
    return float(np.percentile(ratios, min(max(percentile, 0.0), 100.0)))


class _Dampener:
    """Importances computed once, then SSD dampening at any share s (a fresh copy each time)."""

    def __init__(self, model: nn.Module, reference_x, reference_y, forget_x, forget_y, batch_size: int):
        self.model = model
        probe = copy_model(model)
        self.forget = minibatch_importance(probe, forget_x, forget_y, batch_size=batch_size)
        self.reference = minibatch_importance(probe, reference_x, reference_y, batch_size=batch_size)

    def at_share(self, share: float) -> nn.Module:
        alpha = adaptive_alpha(self.forget, self.reference, selection_percentile(share))
        return dampen_(copy_model(self.model), self.forget, self.reference, alpha=alpha, dampening=1.0)


def _dampener(model, retain_x, retain_y, forget_x, forget_y, importance_on: str, batch_size: int) -> _Dampener:
    reference_x, reference_y = reference_set(retain_x, retain_y, forget_x, forget_y, importance_on)
    return _Dampener(model, reference_x, reference_y, forget_x, forget_y, batch_size)


ADAPTIVE_CONSTRAINTS = {"importance_on": [Options(("retain", "full"))], "batch_size": [Interval(Integral, 1)],
                        "share_divisor": [Interval(Real, 0, None, "neither")]}


@UNLEARNERS.register("assd", ADAPTIVE_CONSTRAINTS)
def assd(model: nn.Module, *, retain_x: torch.Tensor, retain_y: torch.Tensor, forget_x: torch.Tensor,
         forget_y: torch.Tensor, train_config: TrainConfig, seed: int, model_factory: Callable[[int], nn.Module],
         importance_on: str = "retain", batch_size: int = 512,
         share_divisor: float = ASSD_SHARE_DIVISOR) -> nn.Module:
    """Adaptive SSD: one dampening step with alpha = the 100 − ln(1 + 100·s) percentile of the ratios.

    Parameters
    ----------
    importance_on : {"retain", "full"}, default="retain"
        Reference set of the importances (the authors' code passes the retain set).
    batch_size : int, default=512
        Minibatch size of the importance computation (the authors' default).
    share_divisor : float, default=1
        s = forget share / ``share_divisor``; 1 dampens ln(1 + 100·share) % of the parameters
        (the formula left in the authors' ``assd_tuning``); their Potion code passes a 25th.
    """
    if len(forget_x) == 0:
        return copy_model(model)
    dampener = _dampener(model, retain_x, retain_y, forget_x, forget_y, importance_on, batch_size)
    return dampener.at_share(forget_share(len(forget_x), len(retain_x), share_divisor))


@UNLEARNERS.register("potion", {**ADAPTIVE_CONSTRAINTS, "p_cut": [Interval(Real, 0, 1)]})
def potion(model: nn.Module, *, retain_x: torch.Tensor, retain_y: torch.Tensor, forget_x: torch.Tensor,
           forget_y: torch.Tensor, train_config: TrainConfig, seed: int, model_factory: Callable[[int], nn.Module],
           importance_on: str = "retain", batch_size: int = 512, share_divisor: float = POTION_SHARE_DIVISOR,
           p_cut: float = 0.0) -> nn.Module:
    """Potion: adaptive SSD with the share s grown ×1.1 until the forget set is unlearned.

    A try is accepted once the accuracy on the forget set's given (poisoned) labels is at most
    ``p_cut`` times its value before unlearning; at most 500 tries, and none past the point where
    every parameter would be selected (the percentile reaches 0). Every try starts from the original
    model. If no try is accepted the last one is returned (the accuracy guard of ``run_unlearning``
    can still refuse it).

    Parameters
    ----------
    importance_on, batch_size
        As for ``assd``.
    share_divisor : float, default=25
        The search starts at s = forget share / 25 (the authors' ``main.py``).
    p_cut : float in [0, 1], default=0
        The authors' ``p_cut`` (``min_acc_val``): their default is 0 (predict none of the poisoned
        labels); their run script sweeps 0 to 0.75.
    """
    if len(forget_x) == 0:
        return copy_model(model)
    dampener = _dampener(model, retain_x, retain_y, forget_x, forget_y, importance_on, batch_size)
    target = p_cut * accuracy(model, forget_x, forget_y)
    share = forget_share(len(forget_x), len(retain_x), share_divisor)
    for _ in range(MAX_TRIES):
        candidate = dampener.at_share(share)
        if accuracy(candidate, forget_x, forget_y) <= target or selection_percentile(share) <= 0:
            break
        share *= STEP_MULTIPLIER
    return candidate
