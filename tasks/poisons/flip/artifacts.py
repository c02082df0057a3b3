"""FLIP's cached artifact: the optimised logits of one attack set-up, keyed by the hash of the data and
every attack setting, computed once and reused by every later trial (``load_or_optimise_logits``)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from poisonsweep.tasks.data import Dataset
from poisonsweep.tasks.files import atomic_write
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.poisons.flip.attack import FlipAttack, expert_poison_sources, stamp_trigger
from poisonsweep.tasks.poisons.flip.experts import checkpoint_plan, optimise_labels, train_experts

# 2: independent dropout masks for expert and student; the checkpoint's scheduled lr in the label stage
ARTIFACT_VERSION = 2


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
    digest.update(np.ascontiguousarray(data.x_train.numpy()))  # the same bytes as tobytes(), without a copy
    digest.update(np.ascontiguousarray(data.y_train.numpy()))
    return digest.hexdigest()


def _settings(data: Dataset, attack: FlipAttack) -> str:
    return json.dumps({"version": ARTIFACT_VERSION, "dataset": data.name, "n_train": len(data.y_train),
                       "data": data_digest(data), "attack": asdict(attack)}, sort_keys=True)


def artifact_key(data: Dataset, attack: FlipAttack) -> str:
    """Hash of the data identity and every attack setting (never the trial seed or the budget)."""
    return _key(_settings(data, attack))


def _key(settings: str) -> str:
    return hashlib.sha256(settings.encode()).hexdigest()[:20]


def artifact_path(artifact_dir: str | os.PathLike, key: str) -> Path:
    return Path(artifact_dir) / f"flip-{key}.npz"


def has_cached_experts(artifact_dir: str | os.PathLike | None) -> bool:
    """Whether ``artifact_dir`` holds any cached expert logits (so FLIP runs again in seconds, not minutes)."""
    return artifact_dir is not None and any(Path(artifact_dir).glob(artifact_path("", "*").name))


def save_artifact(path: Path, artifact: FlipArtifact, settings: str) -> None:
    """Write atomically (``poisonsweep.tasks.files.atomic_write``): a reader never sees half a file."""

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.savez(handle, logits=artifact.logits, poison_sources=artifact.poison_sources, losses=artifact.losses,
                     expert_seconds=artifact.expert_seconds, label_seconds=artifact.label_seconds,
                     settings=np.array(settings))

    atomic_write(path, write)


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
    ``filelock.FileLock`` on ``flip-<key>.lock`` (cross-platform) makes concurrent trials on one
    machine wait for the first to finish instead of computing the same artifact twice (a file lock
    may not hold across the nodes of a network filesystem; there the atomic write still keeps one
    whole file).
    """
    if artifact_dir is None:
        return compute_artifact(data, attack, device), False
    settings = _settings(data, attack)
    path = artifact_path(artifact_dir, _key(settings))  # the data are hashed once here, not again for the key
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock")):
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
