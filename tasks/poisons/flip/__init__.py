"""FLIP: a backdoor planted by flipping labels only (Jha, Hayase & Oh, "Label Poisoning is All You
Need", NeurIPS 2023; code ``SewoongLab/FLIP``).

No training image is changed. The attacker

1. trains *expert* models on the clean training set plus triggered source-class images labelled
   as the target (appended, as in the paper's ``get_matching_datasets``), keeping checkpoints
   (weights and SGD momentum) along each trajectory;
2. optimises one vector of logits ℓ_i per clean training image by *trajectory matching*: from a
   checkpoint θ_k the expert takes one real SGD step on a poisoned minibatch (θ*), the student one
   differentiable SGD step on the clean versions of the same images with soft labels softmax(ℓ)
   (θ̂(ℓ)), and ℓ descends ‖θ̂ − θ*‖² / ‖θ_k − θ*‖²;
3. flips the b labels whose logits disagree most with the true label (``select_flips``).

Steps 1–2 do not depend on the budget b or on the trial's seed, so they run once per attack set-up
and are cached as an artifact (``flip-<key>.npz``) that every later trial with the same data and
attack settings reuses (``load_or_optimise_logits``).

Modules: ``attack`` (settings, recipes, triggers, choosing the flips), ``experts`` (steps 1–2),
``artifacts`` (the cache); this module registers the ``flip`` poison. None of them imports
``poisonsweep.tasks.poisons`` itself, only ``poisonsweep.tasks.poisons.base``.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch

from poisonsweep.tasks.data import Dataset
from poisonsweep.tasks.models import MODELS
from poisonsweep.tasks.poisons.base import POISONS, PoisonedData, every_sample_eligible, n_to_poison
from poisonsweep.tasks.poisons.flip.artifacts import (
    FlipArtifact, artifact_key, compute_artifact, data_digest, has_cached_experts, load_or_optimise_logits,
)
from poisonsweep.tasks.poisons.flip.attack import (
    RECIPES, SINUSOID_AMPLITUDE, TRIGGERS, FlipAttack, expert_poison_sources, flip_margins, random_flips_to_target,
    resolve_recipe, select_flips, stamp_trigger,
)
from poisonsweep.tasks.poisons.flip.experts import Checkpoint, checkpoint_plan, optimise_labels, sgd_step, train_experts
from poisonsweep.tasks.registry import BOOL, CLASS_INDEX, INT_LIST, NONE, ConfigError, Interval, OfType, Options
from poisonsweep.tasks.train import resolve_device

__all__ = [
    "FlipAttack", "FlipArtifact", "Checkpoint", "flip", "flip_margins", "select_flips", "stamp_trigger",
    "expert_poison_sources", "train_experts", "optimise_labels", "sgd_step", "checkpoint_plan", "artifact_key",
    "data_digest", "compute_artifact", "load_or_optimise_logits", "random_flips_to_target", "RECIPES",
    "resolve_recipe", "SINUSOID_AMPLITUDE",
]


@POISONS.register(
    "flip",
    {
        "source": [CLASS_INDEX, Options(("all",)), NONE],
        "target": [CLASS_INDEX],
        "trigger": [Options(TRIGGERS)],
        "patch_size": [Interval(Integral, 1)],
        "amplitude": [Interval(Real, 0, 1, "right")],
        "recipe": [Options(tuple(RECIPES))],
        "n_experts": [Interval(Integral, 1), NONE],
        "expert_model": [Options(tuple(MODELS.names()))],
        "expert_model_params": [OfType((dict,), "a mapping"), NONE],
        "expert_epochs": [Interval(Integral, 1), NONE],
        "expert_batch_size": [Interval(Integral, 1)],
        "expert_lr": [Interval(Real, 0, None, "neither"), NONE],
        "expert_lr_milestones": [INT_LIST, NONE],
        "expert_momentum": [Interval(Real, 0, 1, "left")],
        "expert_weight_decay": [Interval(Real, 0)],
        "nesterov": [BOOL],
        "checkpoint_every": [Interval(Integral, 1)],
        "iterations": [Interval(Integral, 1), NONE],
        "label_lr": [Interval(Real, 0, None, "neither")],
        "label_momentum": [Interval(Real, 0, 1, "left")],
        "attack_seed": [Interval(Integral, 0), NONE],
        "device": [Options(("auto", "cpu", "cuda"))],
    },
    eligible=every_sample_eligible,
    needs={"artifact_dir"},
    placement={"device"},  # where the experts train, not what they compute
    rebuild="clean", rebuild_cached=has_cached_experts,  # labels only, and minutes to train the experts again
)
def flip(data: Dataset, *, rate: float, seed: int, source: int | str | None = 9, target: int = 4,
         trigger: str = "sinusoid", patch_size: int = 3, amplitude: float = SINUSOID_AMPLITUDE,
         recipe: str = "paper", n_experts: int | None = None, expert_model: str = "mlp",
         expert_model_params: dict | None = None, expert_epochs: int | None = None, expert_batch_size: int = 256,
         expert_lr: float | None = None, expert_lr_milestones: list | None = None, expert_momentum: float = 0.9,
         expert_weight_decay: float = 2e-4, nesterov: bool = True, checkpoint_every: int = 10,
         iterations: int | None = None, label_lr: float = 150.0, label_momentum: float = 0.5,
         attack_seed: int | None = None, device: str = "auto", artifact_dir: str | None = None) -> PoisonedData:
    """FLIP (Jha et al. 2023): flip the round(rate·n) labels that best plant a ``trigger`` backdoor.

    Parameters
    ----------
    data : Dataset
        The clean split; its images are never changed.
    rate : float
        Share of training labels flipped (the paper's budget b = round(rate·n)).
    seed : int
        The trial seed. It seeds the experts and the label stage unless ``attack_seed`` is given, so the
        spread over a sweep's seeds includes the attack's own randomness.
    source, target : int, default=9, 4
        Triggered ``source`` images should be classified as ``target`` (the paper's CIFAR-10
        truck→deer indices; on MNIST 9 and 4 are a visually close pair). ``source`` None or
        "all": every non-target class.
    trigger : {"checkerboard", "sinusoid"}, default="sinusoid"
        ``stamp_trigger``; ``patch_size`` sizes the checkerboard, ``amplitude`` the sinusoid.
    recipe : {"paper", "fast"}, default="paper"
        Fills in every setting below that is None (see ``RECIPES``). ``paper``: the authors'
        defaults, 50 experts (only those the label stage draws are trained), 16 epochs at SGD lr 0.1
        with MultiStepLR [75, 125], 15 passes. ``fast``: 2 experts, 4 epochs at lr 0.01, no decay,
        15 passes (this project's earlier settings; seconds on MNIST 7,500 on a CPU).
    n_experts, expert_model, expert_model_params, expert_epochs, expert_batch_size, expert_lr, \
expert_lr_milestones, expert_momentum, expert_weight_decay, nesterov, checkpoint_every
        The experts: a registered model trained with SGD, lr ×0.1 at each epoch in
        ``expert_lr_milestones``; checkpoints every ``checkpoint_every`` steps after the first epoch.
    iterations, label_lr, label_momentum : int, float, float, default=recipe, 150, 0.5
        Passes of trajectory matching and the SGD settings of the logits (the paper's defaults).
    attack_seed : int or None, default=None
        Seeds the experts and the label stage; None uses the trial ``seed``. Fix it (e.g. 0) to share one
        attack, computed once, between the seeds of a sweep: the spread over seeds then measures
        training and detection only.
    device : {"auto", "cpu", "cuda"}, default="auto"
        Where the experts and the label stage run (not part of the artifact key).
    artifact_dir : str or None
        Directory of cached artifacts (handed by the engine); None recomputes every time.

    Returns
    -------
    PoisonedData
        Flipped labels, ``is_poison`` = flipped, success = triggered source test images → target.
    """
    source = None if source == "all" else source
    _check_pair(data.num_classes, source, target)
    recipe_settings = resolve_recipe(recipe, n_experts=n_experts, expert_epochs=expert_epochs, expert_lr=expert_lr,
                                     expert_lr_milestones=expert_lr_milestones, iterations=iterations)
    recipe_settings["expert_lr_milestones"] = tuple(int(m) for m in recipe_settings["expert_lr_milestones"])
    attack = FlipAttack(source=source, target=target, trigger=trigger, patch_size=patch_size, amplitude=amplitude,
                        expert_model=expert_model, expert_model_params=dict(expert_model_params or {}),
                        expert_batch_size=expert_batch_size, expert_momentum=expert_momentum,
                        expert_weight_decay=expert_weight_decay, nesterov=nesterov, checkpoint_every=checkpoint_every,
                        label_lr=label_lr, label_momentum=label_momentum,
                        attack_seed=seed if attack_seed is None else attack_seed, **recipe_settings)
    stamp_trigger(data.x_test[:1], trigger, patch_size=patch_size, amplitude=amplitude)  # fail fast on a bad trigger
    n = len(data.y_train)
    budget = n_to_poison(rate, n, n, "flip")
    artifact, reused = load_or_optimise_logits(data, attack, artifact_dir, resolve_device(device))
    true = data.y_train.numpy()
    flipped, new_labels = select_flips(artifact.logits, true, budget)
    labels = data.y_train.clone()
    labels[flipped] = torch.as_tensor(new_labels, dtype=torch.int64)
    is_poison = np.zeros(n, dtype=bool)
    is_poison[flipped] = True
    attacked = (data.y_test == source) if source is not None else (data.y_test != target)
    success_x = stamp_trigger(data.x_test[attacked], trigger, patch_size=patch_size, amplitude=amplitude)
    info = {
        "source": "all" if source is None else source, "target": target, "trigger": trigger, "recipe": recipe,
        "artifact_key": artifact_key(data, attack), "artifact_reused": reused,
        "expert_seconds": artifact.expert_seconds, "label_seconds": artifact.label_seconds,
        "flips_to_target": int((new_labels == target).sum()),
        "flips_source_to_target": int(((new_labels == target) & (true[flipped] == source)).sum())
        if source is not None else int((new_labels == target).sum()),
    }
    return PoisonedData(data.x_train, labels, data.y_train, is_poison, success_x=success_x,
                        success_y=torch.full((len(success_x),), target, dtype=torch.int64), info=info)


def _check_pair(num_classes: int, source: int | None, target: int) -> None:
    for key, value in (("source", source), ("target", target)):
        if value is not None and not 0 <= value < num_classes:
            raise ConfigError(f"poison.params.{key} must be a class in [0, {num_classes - 1}]; got {value}")
    if source == target:
        raise ConfigError("poison.params.source and poison.params.target must differ")
