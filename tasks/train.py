"""Seeded training and inference in plain PyTorch.

Same config and seed -> same weights on the same machine: shuffling uses its own
``torch.Generator`` and dropout draws from a forked, seeded global RNG.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Callable

import numpy as np
import torch
from torch import nn

from poisonsweep.tasks.registry import Interval, Options, check_value

OPTIMIZERS = ("adam", "sgd")

# constraints of the `train:` config section, checked by engine/schema.py
TRAIN_CONSTRAINTS = {
    "epochs": [Interval(Integral, 1)],
    "batch_size": [Interval(Integral, 1)],
    "lr": [Interval(Real, 0, None, "neither")],
    "optimizer": [Options(OPTIMIZERS)],
    "momentum": [Interval(Real, 0, 1, "left")],
    "weight_decay": [Interval(Real, 0)],
    "device": [Options(("auto", "cpu", "cuda"))],
}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    device: str = "auto"

    def __post_init__(self):
        for key, allowed in TRAIN_CONSTRAINTS.items():
            message = check_value(f"train.{key}", getattr(self, key), allowed)
            if message:
                raise ValueError(message)


@dataclass
class TrainHistory:
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    # (learning rate, weights) at the end of each epoch, for TracIn; filled only when asked
    checkpoints: list[tuple[float, dict]] = field(default_factory=list)
    # sample_losses[e, i]: cross-entropy of sample i in its minibatch of epoch e, before that step
    # (free: the batch loss is their mean); read by the ``abl_isolation`` detector
    sample_losses: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite, or ended far above that of a uniform guess."""


# A trial is failed (``TrainingDiverged``) when its final training loss exceeds this multiple of ln K.
# ln K is the cross-entropy of predicting every one of the K classes with probability 1/K: a freshly
# initialised network starts near it, and any model that has learned something, even of labels that are
# all poisoned, ends below it (predicting the label frequencies costs at most ln K). A final loss above
# ln K means confident wrong predictions, the signature of a step size that blew the weights up; twice
# ln K leaves room for the noise of a short, high-lr schedule that is merely slow, while a diverged run
# (train.lr 1e6 on digits: 1.5e22) lies far beyond it. Its accuracies would be chance and every detector
# row meaningless, so the trial fails rather than warns.
DIVERGED_LOSS_FACTOR = 2.0


def check_not_diverged(final_loss: float, num_classes: int) -> None:
    """Raise ``TrainingDiverged`` if ``final_loss`` (the last epoch's mean training loss) is not finite or
    exceeds ``DIVERGED_LOSS_FACTOR`` x ln(``num_classes``) (see the constant for why)."""
    limit = DIVERGED_LOSS_FACTOR * math.log(num_classes)
    if not math.isfinite(final_loss) or final_loss > limit:
        raise TrainingDiverged(f"training diverged: final loss {final_loss:.4g} > {DIVERGED_LOSS_FACTOR:g}·ln K = "
                               f"{limit:.3g} (K = {num_classes} classes; a uniform guess scores ln K); "
                               "lower train.lr")


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is an error."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA GPU is visible to this process")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_optimizer(model: nn.Module | list[torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser of ``config`` over a model's parameters (or a list of tensors, e.g. stacked ones)."""
    params = model.parameters() if isinstance(model, nn.Module) else model
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, *, seed: int,
                keep_checkpoints: bool = False,
                on_epoch: Callable[[int, float, float], None] | None = None) -> TrainHistory:
    """Train ``model`` in place on (x, y) with cross-entropy; return per-epoch loss and accuracy.

    A NaN or infinite epoch loss raises ``TrainingDiverged`` at once. A trial also checks the final
    loss against ``DIVERGED_LOSS_FACTOR`` x ln K (``check_not_diverged``): training that ends worse than
    twice a uniform guess has diverged, and the trial is recorded failed with that error.
    """
    device = resolve_device(config.device)
    model.to(device)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(seed)
    history = TrainHistory(sample_losses=np.zeros((config.epochs, len(x)), dtype=np.float32))
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for epoch in range(config.epochs):
            loss, accuracy = _train_epoch(model, x, y, optimizer, config.batch_size, generator, device,
                                          history.sample_losses[epoch])
            if not math.isfinite(loss):
                raise TrainingDiverged(f"training loss is {loss} in epoch {epoch + 1}; lower train.lr")
            history.loss.append(loss)
            history.accuracy.append(accuracy)
            if keep_checkpoints:
                weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                history.checkpoints.append((config.lr, weights))
            if on_epoch:
                on_epoch(epoch, loss, accuracy)
    history.seconds = time.perf_counter() - start
    model.eval()
    return history


def _train_epoch(model, x, y, optimizer, batch_size, generator, device, sample_losses) -> tuple[float, float]:
    """One pass over (x, y) in seeded random order; writes each sample's minibatch loss into
    ``sample_losses`` (shape (n,)) and returns the epoch's mean loss and accuracy."""
    model.train()
    order = torch.randperm(len(x), generator=generator)
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        batch = order[start:start + batch_size]
        xb, yb = x[batch].to(device, non_blocking=True), y[batch].to(device, non_blocking=True)
        logits = model(xb)
        losses = nn.functional.cross_entropy(logits, yb, reduction="none")
        loss = losses.mean()
        sample_losses[batch.numpy()] = losses.detach().float().cpu().numpy()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(batch)
        correct += (logits.argmax(1) == yb).sum().item()
    return total_loss / len(x), correct / len(x)


# Inference batches: on the CPU small enough that a convolution's output stays in cache (keras_cnn
# on MNIST, channels-last: 1.1 s at 128 or 256, 1.9 s at 512; benchmarks/RESULTS.md §4).
INFERENCE_BATCH = {"cpu": 128, "cuda": 512}


def inference_model(model: nn.Module) -> nn.Module:
    """``model`` in eval mode, laid out for batched inference.

    On the CPU a model with 2-d convolutions comes back as a channels-last copy: oneDNN runs its
    convolutions about 1.5x faster in that layout (keras_cnn on MNIST, benchmarks/RESULTS.md §4).
    Training stays in the default layout, where channels-last is no faster on the CPU.
    """
    model.eval()
    first = next(model.parameters(), None)
    if first is not None and first.device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return copy.deepcopy(model).to(memory_format=torch.channels_last)
    return model


def inference_batches(x: torch.Tensor, device: torch.device, batch_size: int | None = None):
    """Consecutive batches of ``x`` on ``device``, ``INFERENCE_BATCH`` samples each by default."""
    batch_size = batch_size or INFERENCE_BATCH.get(device.type, INFERENCE_BATCH["cuda"])
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size].to(device)


@torch.no_grad()
def _batched(model: nn.Module, x: torch.Tensor, batch_size: int | None, features_only: bool = False) -> torch.Tensor:
    model = inference_model(model)
    fn = model.features if features_only else model
    device = next(model.parameters()).device
    return torch.cat([fn(batch).cpu() for batch in inference_batches(x, device, batch_size)])


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    return _batched(model, x, batch_size)


def extract_features(model: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
    """Penultimate activations (``model.features``) as float64 numpy, shape (n, d)."""
    return _batched(model, x, batch_size, features_only=True).double().numpy()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(x) == 0:
        return float("nan")
    return (predict_logits(model, x).argmax(1) == y.cpu()).float().mean().item()


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    logits = predict_logits(model, x)
    return nn.functional.cross_entropy(logits, y.cpu(), reduction="none").double().numpy()


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
