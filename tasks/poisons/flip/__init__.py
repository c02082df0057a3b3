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
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from tasks.data import Dataset
from tasks.models import MODELS, build_model
from tasks.poisons.base import POISONS, PoisonedData, apply_trigger, n_to_poison
from tasks.registry import BOOL, INT_LIST, NONE, ConfigError, Interval, OfType, Options
from tasks.train import resolve_device

__all__ = [
    "FlipAttack", "FlipArtifact", "flip", "flip_margins", "select_flips", "stamp_trigger",
    "expert_poison_sources", "train_experts", "optimise_labels", "sgd_step", "artifact_key",
    "load_or_optimise_logits", "random_flips_to_target", "RECIPES", "resolve_recipe",
]

TRIGGERS = ("checkerboard", "sinusoid")
# the paper's `1xs` trigger adds 6 * sin(linspace(0, 16π, W)) to 0..255 pixels: 6/255 on [0, 1] images
SINUSOID_AMPLITUDE = 6 / 255
SINUSOID_SPAN = 16 * math.pi
# the paper's initial logits: 5 * onehot(y) (`one_hot_temp`)
LABEL_INIT_SCALE = 5.0
# 2: independent dropout masks for expert and student; the checkpoint's scheduled lr in the label stage
ARTIFACT_VERSION = 2
LR_DECAY = 0.1  # the authors' MultiStepLR gamma

# The settings a recipe fixes (a config may still set each one). ``paper``: the authors' defaults
# (SewoongLab/FLIP ``modules/generate_labels/utils.py`` DEFAULT_EXPERT_CONFIG / DEFAULT_ATTACK_CONFIG
# and ``modules/base_utils/util.py`` DEFAULT_SGD_KWARGS / DEFAULT_SGD_SCHED_KWARGS): 50 experts
# trained with SGD lr 0.1 (momentum 0.9, Nesterov, wd 2e-4, batch 256) and MultiStepLR [75, 125]
# x0.1, checkpoints drawn from epochs 1-15 (so 16 epochs are trained; the decay never comes into
# play before epoch 75), 15 label passes. ``fast``: this project's earlier, cheaper settings.
RECIPES = {
    "paper": {"n_experts": 50, "expert_epochs": 16, "expert_lr": 0.1, "expert_lr_milestones": (75, 125),
              "iterations": 15},
    "fast": {"n_experts": 2, "expert_epochs": 4, "expert_lr": 0.01, "expert_lr_milestones": (),
             "iterations": 15},
}


def resolve_recipe(recipe: str, **overrides) -> dict:
    """The recipe's settings with every non-None override applied."""
    if recipe not in RECIPES:
        raise ConfigError(f"poison.params.recipe must be one of {', '.join(RECIPES)}; got {recipe!r}")
    return {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}


# --------------------------------------------------------------------------------------------
# triggers and the expert's poisoned set


def stamp_trigger(x: torch.Tensor, trigger: str, *, patch_size: int = 3,
                  amplitude: float = SINUSOID_AMPLITUDE) -> torch.Tensor:
    """A triggered copy of images ``x`` of shape (n, C, H, W) in [0, 1].

    ``checkerboard``: the BadNets patch of ``tasks.poisons.apply_trigger`` (``patch_size`` square,
    bottom-right). ``sinusoid``: the paper's ``1xs`` stripes, x + amplitude·sin(linspace(0, 16π, W))
    along the width, clipped to [0, 1] (the paper clips to 0..255 likewise).
    """
    if trigger == "checkerboard":
        return apply_trigger(x, trigger="checkerboard", patch_size=patch_size)
    if trigger == "sinusoid":
        wave = amplitude * torch.sin(torch.linspace(0, SINUSOID_SPAN, x.shape[-1], dtype=x.dtype))
        return (x + wave).clamp(0, 1)
    raise ConfigError(f"poison.params.trigger must be one of {', '.join(TRIGGERS)}; got {trigger!r}")


def expert_poison_sources(labels: np.ndarray, *, source: int | None, target: int, num_classes: int) -> np.ndarray:
    """Indices of the training images the experts also see triggered and labelled ``target``.

    As in the paper's code: the *last* n // K images of the source class (all non-target classes
    when ``source`` is None), which on CIFAR-10 is the whole source class.
    """
    pool = np.flatnonzero(labels == source) if source is not None else np.flatnonzero(labels != target)
    return pool[-(len(labels) // num_classes):] if len(labels) >= num_classes else pool[:0]


# --------------------------------------------------------------------------------------------
# attack settings and the cached artifact


@dataclass(frozen=True)
class FlipAttack:
    """Every setting that changes the optimised logits (and so the artifact key)."""

    source: int | None = 9
    target: int = 4
    trigger: str = "sinusoid"
    patch_size: int = 3
    amplitude: float = SINUSOID_AMPLITUDE
    n_experts: int = RECIPES["paper"]["n_experts"]
    expert_model: str = "mlp"
    expert_model_params: dict = field(default_factory=dict)
    expert_epochs: int = RECIPES["paper"]["expert_epochs"]
    expert_batch_size: int = 256
    expert_lr: float = RECIPES["paper"]["expert_lr"]
    expert_lr_milestones: tuple = RECIPES["paper"]["expert_lr_milestones"]  # epochs at which lr ×= 0.1
    expert_momentum: float = 0.9
    expert_weight_decay: float = 2e-4
    nesterov: bool = True
    checkpoint_every: int = 10
    iterations: int = RECIPES["paper"]["iterations"]
    label_lr: float = 150.0
    label_momentum: float = 0.5
    attack_seed: int = 0  # the flip() entry point passes the trial seed unless attack_seed is set


@dataclass
class FlipArtifact:
    """What the expensive stage produces: one row of logits per clean training image."""

    logits: np.ndarray  # float32, (n_train, K)
    poison_sources: np.ndarray  # indices the experts saw triggered, (m,)
    losses: np.ndarray  # trajectory-matching loss per minibatch
    expert_seconds: float
    label_seconds: float


def data_digest(data: Dataset) -> str:
    """A fingerprint of the training split (name, shapes, images and labels)."""
    digest = hashlib.sha256()
    digest.update(f"{data.name}|{tuple(data.x_train.shape)}|{data.num_classes}".encode())
    digest.update(data.x_train.numpy().tobytes())
    digest.update(data.y_train.numpy().tobytes())
    return digest.hexdigest()


def _settings(data: Dataset, attack: FlipAttack) -> str:
    return json.dumps({"version": ARTIFACT_VERSION, "dataset": data.name, "n_train": len(data.y_train),
                       "data": data_digest(data), "attack": asdict(attack)}, sort_keys=True)


def artifact_key(data: Dataset, attack: FlipAttack) -> str:
    """Hash of the data identity and every attack setting (never the trial seed or the budget)."""
    return hashlib.sha256(_settings(data, attack).encode()).hexdigest()[:20]


def artifact_path(artifact_dir: str | os.PathLike, key: str) -> Path:
    return Path(artifact_dir) / f"flip-{key}.npz"


def save_artifact(path: Path, artifact: FlipArtifact, settings: str) -> None:
    """Write atomically: a temporary file in the same directory, then ``os.replace``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, logits=artifact.logits, poison_sources=artifact.poison_sources, losses=artifact.losses,
                 expert_seconds=artifact.expert_seconds, label_seconds=artifact.label_seconds,
                 settings=np.array(settings))
    os.replace(tmp, path)


def load_artifact(path: Path, settings: str) -> FlipArtifact:
    """Load a saved artifact; raise if it was made for other settings (a key collision)."""
    with np.load(path) as saved:
        if str(saved["settings"]) != settings:
            raise RuntimeError(f"FLIP artifact {path} was made for other settings:\n{saved['settings']}\n"
                               f"not\n{settings}\nremove the file to recompute it")
        return FlipArtifact(saved["logits"], saved["poison_sources"], saved["losses"],
                            float(saved["expert_seconds"]), float(saved["label_seconds"]))


def load_or_optimise_logits(data: Dataset, attack: FlipAttack, artifact_dir: str | os.PathLike | None,
                            device: torch.device) -> tuple[FlipArtifact, bool]:
    """The optimised logits for ``data`` and ``attack``, and whether a saved artifact was reused.

    With ``artifact_dir`` None the logits are always recomputed. Otherwise an exclusive
    ``fcntl.flock`` on ``flip-<key>.lock`` makes concurrent trials on one machine wait for the
    first to finish instead of computing the same artifact twice (``flock`` may not lock across
    the nodes of a network filesystem; there the atomic write still keeps one whole file).
    """
    if artifact_dir is None:
        return compute_artifact(data, attack, device), False
    settings = _settings(data, attack)
    path = artifact_path(artifact_dir, artifact_key(data, attack))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return load_artifact(path, settings), True
        artifact = compute_artifact(data, attack, device)
        save_artifact(path, artifact, settings)
    return artifact, False


def compute_artifact(data: Dataset, attack: FlipAttack, device: torch.device) -> FlipArtifact:
    """Train the experts, then optimise the logits (the expensive, budget-free stage)."""
    labels = data.y_train.numpy()
    sources = expert_poison_sources(labels, source=attack.source, target=attack.target,
                                    num_classes=data.num_classes)
    x_poison = stamp_trigger(data.x_train[sources], attack.trigger, patch_size=attack.patch_size,
                             amplitude=attack.amplitude)
    x_expert = torch.cat([data.x_train, x_poison])
    y_expert = torch.cat([data.y_train, torch.full((len(sources),), attack.target, dtype=torch.int64)])
    # which clean image stands in for each expert sample in the student's step
    clean_index = np.concatenate([np.arange(len(labels)), sources])

    def new_model(seed: int) -> nn.Module:
        return build_model(attack.expert_model, data.in_shape, data.num_classes, attack.expert_model_params,
                           seed=seed)

    rng = np.random.default_rng([attack.attack_seed, 0])
    steps_per_epoch = math.ceil(len(y_expert) / attack.expert_batch_size)
    plan = checkpoint_plan(attack, steps_per_epoch, rng)
    start = time.perf_counter()
    checkpoints = train_experts(new_model, x_expert, y_expert, attack, plan, device)
    expert_seconds = time.perf_counter() - start
    start = time.perf_counter()
    logits, losses = optimise_labels(new_model(0), data.x_train, data.y_train, x_expert, y_expert, clean_index,
                                     [checkpoints[p] for p in plan], attack, rng, device, data.num_classes)
    return FlipArtifact(logits, sources, losses, expert_seconds, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# experts


@dataclass
class Checkpoint:
    """Weights, buffers, SGD momentum and learning rate of one expert after some step."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]
    lr: float


def checkpoint_plan(attack: FlipAttack, steps_per_epoch: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """The (expert, step) checkpoint each pass of the label stage starts from.

    Checkpoints lie every ``checkpoint_every`` steps; as in the paper the first epoch is skipped
    (it draws epochs min+1..max) unless the experts train for a single epoch.
    """
    total = attack.expert_epochs * steps_per_epoch
    first = steps_per_epoch if attack.expert_epochs > 1 else 1
    steps = [s for s in range(attack.checkpoint_every, total + 1, attack.checkpoint_every) if s >= first]
    if not steps:
        raise ConfigError(f"poison.params.checkpoint_every {attack.checkpoint_every} leaves no checkpoint in the "
                          f"experts' {total} steps after their first epoch; lower it")
    return [(int(rng.integers(attack.n_experts)), int(rng.choice(steps))) for _ in range(attack.iterations)]


def train_experts(new_model, x: torch.Tensor, y: torch.Tensor, attack: FlipAttack, plan: list[tuple[int, int]],
                  device: torch.device) -> dict[tuple[int, int], Checkpoint]:
    """Train the experts with SGD (momentum, Nesterov, weight decay; lr ×0.1 at each epoch of
    ``expert_lr_milestones``, the authors' MultiStepLR) on (x, y).

    Expert ``e`` starts from its own seeded initialisation and shuffle. Only the checkpoints named
    in ``plan`` are kept, so memory does not grow with the trajectory length, and an expert is
    trained only if the plan uses it and only up to its last planned step: the checkpoints are
    the same as if all ``n_experts`` ran every epoch.
    """
    last_step: dict[int, int] = {}
    for expert, step in plan:
        last_step[expert] = max(step, last_step.get(expert, 0))
    wanted = set(plan)
    kept: dict[tuple[int, int], Checkpoint] = {}
    x, y = x.to(device), y.to(device)
    for expert in sorted(last_step):
        seed = attack.attack_seed * 1000 + expert + 1
        model = new_model(seed).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=attack.expert_lr, momentum=attack.expert_momentum,
                                    weight_decay=attack.expert_weight_decay, nesterov=attack.nesterov)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(attack.expert_lr_milestones), LR_DECAY)
        generator = torch.Generator().manual_seed(seed)
        step = 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for _ in range(attack.expert_epochs):
                order = torch.randperm(len(x), generator=generator).to(device)
                for start in range(0, len(x), attack.expert_batch_size):
                    batch = order[start:start + attack.expert_batch_size]
                    loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    if (expert, step) in wanted:
                        kept[(expert, step)] = _snapshot(model, optimizer)
                    if step >= last_step[expert]:
                        break
                schedule.step()
                if step >= last_step[expert]:
                    break
    return kept


def _snapshot(model: nn.Module, optimizer: torch.optim.SGD) -> Checkpoint:
    params = dict(model.named_parameters())
    return Checkpoint(
        params={k: v.detach().clone() for k, v in params.items()},
        buffers={k: v.detach().clone() for k, v in model.named_buffers()},
        momentum={k: optimizer.state[v]["momentum_buffer"].detach().clone() for k, v in params.items()},
        lr=float(optimizer.param_groups[0]["lr"]),
    )


# --------------------------------------------------------------------------------------------
# label optimisation by trajectory matching


def sgd_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], momentum_buffers: dict[str, torch.Tensor],
             *, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> dict[str, torch.Tensor]:
    """One step of ``torch.optim.SGD`` (dampening 0) written out, so that it is differentiable.

    d = g + wd·θ;  buf = momentum·buf + d;  d = d + momentum·buf (Nesterov) or buf;  θ ← θ − lr·d.
    The momentum buffer is the checkpoint's (from a step that already ran), as in the paper.
    """
    updated = {}
    for name, theta in params.items():
        d = grads[name] + weight_decay * theta
        buf = momentum * momentum_buffers[name] + d
        d = d + momentum * buf if nesterov else buf
        updated[name] = theta - lr * d
    return updated


def optimise_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_expert: torch.Tensor,
                    y_expert: torch.Tensor, clean_index: np.ndarray, starts: list[Checkpoint], attack: FlipAttack,
                    rng: np.random.Generator, device: torch.device, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimise logits ℓ (n, K) so that a step on clean images with labels softmax(ℓ) matches the
    expert's step on the poisoned images (the paper's ``generate_labels``).

    One pass over the expert's data per entry of ``starts`` (the checkpoint θ_k of that pass),
    in minibatches of ``expert_batch_size`` (the last, partial one is dropped, as in the paper).

    Returns
    -------
    logits : ndarray of float32, shape (n_samples, n_classes)
    losses : ndarray of float64, the matching loss of every minibatch
    """
    model.to(device).train()
    logits = (LABEL_INIT_SCALE * nn.functional.one_hot(y, num_classes).float()).to(device).requires_grad_(True)
    optimizer = torch.optim.SGD([logits], lr=attack.label_lr, momentum=attack.label_momentum)
    x, x_expert, y_expert = x.to(device), x_expert.to(device), y_expert.to(device)
    clean_index = torch.as_tensor(clean_index, device=device)
    # the step uses the checkpoint's scheduled lr, as the authors load it with the optimizer state
    step = dict(momentum=attack.expert_momentum, weight_decay=attack.expert_weight_decay, nesterov=attack.nesterov)
    n_batches = max(1, len(y_expert) // attack.expert_batch_size)
    losses = []
    for start_point in starts:
        order = torch.as_tensor(rng.permutation(len(y_expert)), device=device)
        theta = {k: v.to(device).requires_grad_(True) for k, v in start_point.params.items()}
        buffers = {k: v.to(device) for k, v in start_point.buffers.items()}
        momentum = {k: v.to(device) for k, v in start_point.momentum.items()}
        for b in range(n_batches):
            rows = order[b * attack.expert_batch_size:(b + 1) * attack.expert_batch_size]
            clean = clean_index[rows]
            # expert and student are two separate forward passes in the authors' code, so their
            # dropout masks are independent draws
            expert_seed, student_seed = (int(v) for v in rng.integers(2**31, size=2))
            expert_loss = nn.functional.cross_entropy(
                _forward(model, theta, buffers, x_expert[rows], expert_seed), y_expert[rows])
            expert_grads = dict(zip(theta, torch.autograd.grad(expert_loss, list(theta.values()))))
            with torch.no_grad():
                theta_star = sgd_step(theta, expert_grads, momentum, lr=start_point.lr, **step)
            soft = torch.softmax(logits[clean], dim=1)
            student_out = _forward(model, theta, buffers, x[clean], student_seed)
            student_loss = -(soft * torch.log_softmax(student_out, dim=1)).sum(1).mean()
            student_grads = dict(zip(theta, torch.autograd.grad(student_loss, list(theta.values()), create_graph=True)))
            theta_hat = sgd_step(theta, student_grads, momentum, lr=start_point.lr, **step)
            distance = sum(((theta_hat[k] - theta_star[k]) ** 2).sum() for k in theta)
            scale = sum(((theta[k].detach() - theta_star[k]) ** 2).sum() for k in theta)
            loss = distance / scale
            optimizer.zero_grad(set_to_none=True)
            (logits.grad,) = torch.autograd.grad(loss, [logits])
            optimizer.step()
            losses.append(loss.item())
    return logits.detach().cpu().numpy().astype(np.float32), np.asarray(losses)


def _forward(model: nn.Module, theta: dict, buffers: dict, x: torch.Tensor, dropout_seed: int) -> torch.Tensor:
    # dropout masks are drawn from ``dropout_seed``; buffers are copied so that batch-norm
    # running statistics of the checkpoint stay untouched
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(dropout_seed)
        return functional_call(model, ({**theta, **{k: v.clone() for k, v in buffers.items()}}), (x,))


# --------------------------------------------------------------------------------------------
# flip selection


def flip_margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How strongly each row of ``logits`` asks to leave its true label (the paper's ``select_flips``).

    m_i = max_j ℓ_ij − ℓ_{i,y_i} (> 0) when argmax ℓ_i ≠ y_i, else 2nd-largest − largest (≤ 0).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    ordered = np.sort(logits, axis=1)
    disagrees = logits.argmax(1) != labels
    return np.where(disagrees, ordered[:, -1] - logits[rows, labels], ordered[:, -2] - ordered[:, -1])


def select_flips(logits: np.ndarray, labels: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``b`` samples with the largest margin and the label each is flipped to.

    Returns
    -------
    indices : ndarray of int, shape (b,), sorted by decreasing margin (ties by index)
    new_labels : ndarray of int, shape (b,), argmax over j ≠ y_i of ℓ_ij
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if not 0 <= b <= len(labels):
        raise ValueError(f"b must lie in [0, {len(labels)}]; got {b}")
    indices = np.argsort(-flip_margins(logits, labels), kind="stable")[:b]
    others = logits[indices].copy()
    others[np.arange(b), labels[indices]] = -np.inf
    return indices, others.argmax(1)


def random_flips_to_target(labels: np.ndarray, b: int, *, target: int, seed: int) -> np.ndarray:
    """The paper's random baseline: ``b`` labels of non-target samples, drawn with ``seed``, set to ``target``."""
    labels = np.asarray(labels).copy()
    chosen = np.random.default_rng(seed).choice(np.flatnonzero(labels != target), size=b, replace=False)
    labels[chosen] = target
    return labels


# --------------------------------------------------------------------------------------------
# the registered poison


def _all_samples(class_counts, **_) -> int:
    return int(sum(class_counts))


@POISONS.register(
    "flip",
    {
        "source": [Interval(Integral, 0), Options(("all",)), NONE],
        "target": [Interval(Integral, 0)],
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
    eligible=_all_samples,
    needs={"artifact_dir"},
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
