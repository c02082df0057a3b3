"""Unlearning methods and their registry ``UNLEARNERS``.

An unlearning method is a function registered in ``UNLEARNERS``::

    fn(model, *, retain_x, retain_y, forget_x, forget_y, train_config, seed, model_factory, **params)
        -> nn.Module

It returns a NEW model and never changes ``model``. ``model_factory(seed)`` builds a freshly
initialised model of the same architecture (used by ``retrain``). Labels are the ones given in
training, i.e. poisoned where the sample is poisoned.

Methods here: ``retrain`` (exact unlearning, Goel et al.'s EU with k = -1), ``finetune`` (catastrophic
forgetting, CF), ``ssd`` (Selective Synaptic Dampening, Foster et al., AAAI 2024) and
``gradient_ascent`` (bounded ascent on the forget loss); ``poisonsweep.tasks.unlearn.adaptive`` adds ``assd`` and
``potion``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from numbers import Integral, Real
from typing import Callable

import torch
from torch import nn

from poisonsweep.tasks.registry import NONE, Interval, Options, Registry
from poisonsweep.tasks.train import TrainConfig, copy_model, make_optimizer, per_sample_loss, predict_logits, train_model

UNLEARNERS = Registry("unlearning method")

# Goel et al.'s CF fine-tunes for 1000 iterations after a 4000-iteration pretraining: a quarter of it.
FINETUNE_SHARE_OF_TRAINING = 0.25


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
    reference_x, reference_y = reference_set(retain_x, retain_y, forget_x, forget_y, importance_on)
    forget_importance = minibatch_importance(unlearned, forget_x, forget_y, batch_size=batch_size)
    reference_importance = minibatch_importance(unlearned, reference_x, reference_y, batch_size=batch_size)
    return dampen_(unlearned, forget_importance, reference_importance, alpha=alpha, dampening=dampening)


def reference_set(retain_x, retain_y, forget_x, forget_y, importance_on: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD's reference set: the full training set (retain then forget) or the retain set only."""
    if importance_on == "full":
        return torch.cat([retain_x, forget_x]), torch.cat([retain_y, forget_y])
    return retain_x, retain_y


def dampen_(model: nn.Module, forget_importance: dict[str, torch.Tensor],
            reference_importance: dict[str, torch.Tensor], *, alpha: float, dampening: float) -> nn.Module:
    """Apply SSD's dampening (:func:`ssd_dampen`) to ``model``'s parameters in place; returns it in eval mode."""
    params = dict(model.named_parameters())
    dampened = ssd_dampen({k: p.detach() for k, p in params.items()}, forget_importance, reference_importance,
                          alpha=alpha, dampening=dampening)
    with torch.no_grad():
        for name, value in dampened.items():
            params[name].copy_(value)
    return model.eval()


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
