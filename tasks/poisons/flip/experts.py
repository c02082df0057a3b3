"""FLIP's expensive stage: train the experts on the poisoned set, keeping checkpoints, then optimise one
vector of logits per clean training image by trajectory matching (the paper's ``generate_labels``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from poisonsweep.tasks.poisons.flip.attack import FlipAttack
from poisonsweep.tasks.registry import ConfigError

# the paper's initial logits: 5 * onehot(y) (`one_hot_temp`)
LABEL_INIT_SCALE = 5.0
LR_DECAY = 0.1  # the authors' MultiStepLR gamma


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
