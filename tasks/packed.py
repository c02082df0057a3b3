"""Packed training: k models of one architecture trained at once, as one stacked model.

``torch.func.stack_module_state`` stacks the k models' weights along a new leading dimension and
``vmap(functional_call(...))`` runs the stack on k batches at once (HFTA's horizontal fusion, done
by the compiler of ``torch.func`` instead of hand-fused kernels). Each model keeps what a solo
trial (``poisonsweep.tasks.train.train_model``) gives it:

- its own initial weights: the models are built by the caller exactly as a solo trial builds them;
- its own data stream: its own (possibly poisoned) inputs and labels, shuffled by its own
  ``torch.Generator`` seeded with its seed, one ``randperm`` per epoch as in ``train_model``;
- its own dropout masks: ``nn.Dropout`` draws from a per-model generator seeded with the model's
  seed, in the order and with the arithmetic of ``F.dropout`` on the CPU, so a packed model sees the
  very masks its solo trial draws (on CUDA the fused dropout kernel draws differently: there the
  masks have the same law but other values);
- its own BatchNorm running statistics: buffers are stacked like weights and updated in place
  under ``vmap``, one slice per model;
- its own optimiser state: Adam and SGD (momentum, weight decay) act element by element, so one
  optimiser over the stacked tensors is k optimisers over the single models.

The sum of the k mean losses has, for model i, the gradient of model i's own loss: the models
share no weights. What differs from solo training is only the order of floating-point sums inside
the batched kernels (see ``tests/test_packed.py`` for the measured agreement).
"""

from __future__ import annotations

import copy
import json
import math
import time
from typing import Callable, Iterable, TypeVar

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from poisonsweep.tasks.detect.base import serial_map
from poisonsweep.tasks.train import TrainConfig, TrainHistory, TrainingDiverged, make_optimizer, resolve_device
from poisonsweep.tasks.trial import PreparedTrial, TrialResult, finish_trial, load_trial_data, prepare_trial

T = TypeVar("T")

# modules that draw random numbers in training and that packing does not reproduce per model
UNPACKABLE_RANDOM = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def run_pack(configs: list[dict], *, map_shards: Callable = serial_map, artifact_dir: str | None = None,
             log: Callable[[str], None] = lambda message: None) -> list[TrialResult | Exception]:
    """Run trials whose models can train together; per trial its rows (as ``run_resolved_trial``) or its error.

    Trials that share data, model and training schedule (:func:`pack_key`) train as one pack; any other
    trial trains alone, and its ``pack_note`` says why. One trial's failure never stops the others.
    """
    results: list[TrialResult | Exception | None] = [None] * len(configs)
    prepared: dict[int, PreparedTrial] = {}
    datasets = _shared_datasets(configs)
    for i, config in enumerate(configs):
        try:
            data, load_share = datasets.get(json.dumps(config["data"], sort_keys=True), (None, None))
            prepared[i] = prepare_trial(config, artifact_dir=artifact_dir, data=data, log=log)
            if load_share is not None:
                prepared[i].timings["load_seconds"] = load_share
        except Exception as error:  # the engine records it as this trial's failure
            results[i] = error
    for members in _packs(prepared):
        histories = _train_members([prepared[i] for i in members], log)
        for i, history in zip(members, histories):
            trial = prepared.pop(i)  # dropped after its detectors: frees its data for the next trial's
            if isinstance(history, Exception):
                results[i] = history
                continue
            trial.clock = time.perf_counter()  # eval and detection time starts now, not at preparation
            try:
                results[i] = finish_trial(trial, history, map_shards=map_shards, log=log)
            except Exception as error:
                results[i] = error
    return results


def _shared_datasets(configs: list[dict]) -> dict[str, tuple[object, float]]:
    """Each data config that several trials name, loaded once: (dataset, each trial's share of the load).

    A data config that fails to load is left out: each of its trials then fails on its own load.
    """
    keys = [json.dumps(config["data"], sort_keys=True) for config in configs]
    shared = {}
    for key in {k for k in keys if keys.count(k) > 1}:
        data_cfg, start = json.loads(key), time.perf_counter()
        try:
            data = load_trial_data(data_cfg)
        except Exception:
            continue
        shared[key] = (data, (time.perf_counter() - start) / keys.count(key))
    return shared


# what members of one pack share: the training set (its data section), the model and its schedule
PACK_KEYS = ("data", "model", "train")


def pack_key(config: dict) -> str:
    """What trials must share to train together (``PACK_KEYS``): the one rule, for the engine that plans the
    packs (``poisonsweep.engine.packs.plan_packs``) as for :func:`run_pack` that trains them."""
    return json.dumps({key: config[key] for key in PACK_KEYS}, sort_keys=True)


def group_by_pack_key(configs: Iterable[T], config_of: Callable[[T], dict] = lambda config: config) -> dict[str, list[T]]:
    """``configs`` (or items whose config ``config_of`` gives) grouped by :func:`pack_key`, in order."""
    groups: dict[str, list[T]] = {}
    for item in configs:
        groups.setdefault(pack_key(config_of(item)), []).append(item)
    return groups


def _packs(prepared: dict[int, PreparedTrial]) -> list[list[int]]:
    """Trial indices grouped by :func:`pack_key`; a trial alone in its group is told why."""
    groups = list(group_by_pack_key(prepared, lambda i: prepared[i].config).values())
    for members in groups:
        if len(members) == 1 and len(prepared) > 1:
            prepared[members[0]].pack_note = "no other trial of its pack shares its data, model and training schedule"
    return groups


def _train_members(trials: list[PreparedTrial], log: Callable[[str], None]) -> list[TrainHistory | Exception]:
    """Train the trials' models together when there are several and they can be packed, else one by one."""
    reason = (why_not_packable(trials[0].model) or _unmet_needs(trials) or _unequal_shapes(trials)
              if len(trials) > 1 else None)
    if len(trials) > 1 and reason is None:
        seeds = [t.config["seed"] for t in trials]
        start = time.perf_counter()
        histories = train_packed(
            [t.model for t in trials], [t.poisoned.x_train for t in trials], [t.poisoned.labels for t in trials],
            trials[0].train_config, seeds=seeds, keep_checkpoints=any(t.keeps_checkpoints for t in trials),
            on_epoch=lambda i, e, loss, acc: log(f"seed {seeds[i]} epoch {e + 1}: loss {loss:.4f} acc {acc:.3f}"))
        share = (time.perf_counter() - start) / len(trials)  # each trial's share of the pack's training
        for trial in trials:
            trial.timings["train_seconds"] = share
            trial.pack_size = len(trials)
        return histories
    if reason:
        log(f"training {len(trials)} trials one by one: {reason}")
    histories = []
    for trial in trials:
        trial.pack_note = trial.pack_note or (f"not packable: {reason}" if reason else None)
        trial.clock = time.perf_counter()
        try:
            histories.append(trial.train_alone())
        except Exception as error:
            histories.append(error)
    return histories


def _unmet_needs(trials: list[PreparedTrial]) -> str | None:
    """Packed training records no per-sample losses: a trial whose detectors need them trains alone."""
    if any("sample_losses" in trial.needs for trial in trials):
        return "a detector needs per-sample training losses (e.g. abl_isolation), which packed training does not record"
    return None


def _unequal_shapes(trials: list[PreparedTrial]) -> str | None:
    """Models train together on training sets of one shape: a poison that changed its set's shape trains alone."""
    shapes = {(tuple(t.poisoned.x_train.shape), len(t.poisoned.labels)) for t in trials}
    return f"their poisoned training sets differ in shape ({len(shapes)} shapes)" if len(shapes) > 1 else None


def why_not_packable(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained in a pack, or None when it can."""
    for name, module in model.named_modules():
        if isinstance(module, UNPACKABLE_RANDOM):
            return f"{name} is {type(module).__name__}, whose per-model random masks packing does not draw"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
            return f"{name} uses a cumulative BatchNorm average (momentum=None), which packing does not track"
    return None


class _PackedDropout(nn.Module):
    """``nn.Dropout`` whose noise is handed in from outside ``vmap`` (one slice per model).

    With no noise set it records the shape of its input (one sample), so the caller learns which
    masks one step needs before drawing them.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.noise: torch.Tensor | None = None
        self.sample_shape: tuple[int, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.noise is None:
            self.sample_shape = tuple(x.shape[1:])
            return x
        return x * self.noise


def _functional_base(model: nn.Module) -> tuple[nn.Module, list[_PackedDropout]]:
    """A weightless (meta) copy of ``model`` for ``functional_call``, with its dropouts made packable."""
    base = copy.deepcopy(model).to("meta")
    dropouts = []
    for name, module in list(base.named_modules()):
        if type(module) is nn.Dropout:
            replacement = _PackedDropout(module.p) if module.p > 0 else nn.Identity()
            parent_name, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent_name) if parent_name else base, child, replacement)
            if module.p > 0:
                dropouts.append(replacement)
    return base, dropouts


def _record_dropout_shapes(base: nn.Module, sample_shape) -> None:
    base.train()
    with torch.no_grad():
        base(torch.empty((2, *sample_shape), device="meta"))


def _draw_noise(dropouts: list[_PackedDropout], generators: list[torch.Generator], batch: int,
                device: torch.device) -> list[torch.Tensor]:
    """Each dropout's stacked noise for one step: per model, layer by layer, the draws ``F.dropout``
    makes on the CPU (``bernoulli_(1 - p)`` on an empty tensor, times ``1 / (1 - p)``)."""
    noises = [[] for _ in dropouts]
    for generator in generators:  # model by model, in forward order: the order of a solo trial's draws
        for layer, dropout in enumerate(dropouts):
            keep = 1 - dropout.p
            noise = torch.empty((batch, *dropout.sample_shape), device=device).bernoulli_(keep, generator=generator)
            noises[layer].append(noise.mul_(1 / keep) if keep > 0 else noise)  # p = 1: F.dropout gives zeros
    return [torch.stack(layer) for layer in noises]


def train_packed(models: list[nn.Module], xs: list[torch.Tensor], ys: list[torch.Tensor], config: TrainConfig, *,
                 seeds: list[int], keep_checkpoints: bool = False,
                 on_epoch: Callable[[int, int, float, float], None] | None = None,
                 ) -> list[TrainHistory | TrainingDiverged]:
    """Train ``models`` (same architecture) in place, model i on (xs[i], ys[i]) with seed seeds[i].

    Returns, per model, its ``TrainHistory`` (``seconds`` is the pack's training time) or the
    ``TrainingDiverged`` error a solo trial would have raised; a diverged model does not stop the
    others. ``on_epoch(model_index, epoch, loss, accuracy)`` is called per model and epoch.
    """
    if not (len(models) == len(xs) == len(ys) == len(seeds)) or not models:
        raise ValueError(f"train_packed needs as many models, inputs, labels and seeds; got {len(models)}, "
                         f"{len(xs)}, {len(ys)}, {len(seeds)}")
    if reason := why_not_packable(models[0]):
        raise ValueError(f"cannot pack this model: {reason}")
    shapes = {tuple(x.shape) for x in xs} | {(len(y),) + tuple(xs[0].shape[1:]) for y in ys}
    if len(shapes) != 1:
        raise ValueError(f"packed models need training sets of one shape; got {sorted(shapes)}")
    device = resolve_device(config.device)
    start = time.perf_counter()
    params, buffers = stack_module_state([m.to(device) for m in models])
    base, dropouts = _functional_base(models[0])
    _record_dropout_shapes(base, xs[0].shape[1:])
    optimizer = make_optimizer(list(params.values()), config)
    shufflers = [torch.Generator().manual_seed(seed) for seed in seeds]
    droppers = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    shared_x = all(xi is xs[0] or torch.equal(xi, xs[0]) for xi in xs)  # label-only poisons: one input tensor
    x, y = _on_device_if_it_fits([xs[0] if shared_x else torch.stack(xs), torch.stack(ys)], device)

    def member_loss(p, b, noise, xb, yb):
        for dropout, n in zip(dropouts, noise):
            dropout.noise = n
        logits = functional_call(base, (p, b), (xb,))
        return nn.functional.cross_entropy(logits, yb), logits

    step = vmap(member_loss)
    histories = [TrainHistory() for _ in models]
    diverged: dict[int, TrainingDiverged] = {}
    base.train()
    for epoch in range(config.epochs):
        losses, accuracies = _train_epoch(step, params, buffers, x, shared_x, y, optimizer, config.batch_size, shufflers,
                                          droppers, dropouts, device)
        for i, (loss, acc) in enumerate(zip(losses, accuracies)):
            if i in diverged:
                continue
            if not math.isfinite(loss):
                diverged[i] = TrainingDiverged(f"training loss is {loss} in epoch {epoch + 1}; lower train.lr")
                continue
            histories[i].loss.append(loss)
            histories[i].accuracy.append(acc)
            if keep_checkpoints:
                histories[i].checkpoints.append((config.lr, _member_state(models[0], params, buffers, i)))
            if on_epoch:
                on_epoch(i, epoch, loss, acc)
    for dropout in dropouts:
        dropout.noise = None
    _unstack_into(models, params, buffers)
    seconds = time.perf_counter() - start
    for history in histories:
        history.seconds = seconds
    return [diverged.get(i, history) for i, history in enumerate(histories)]


def _train_epoch(step, params, buffers, x, shared_x, y, optimizer, batch_size, shufflers, droppers, dropouts,
                 device) -> tuple[list[float], list[float]]:
    k, n = y.shape
    order = torch.stack([torch.randperm(n, generator=g) for g in shufflers]).to(x.device)
    rows = torch.arange(k, device=x.device)[:, None]
    # summed on the device and read once per epoch: a read per step would make the host wait for
    # the accelerator at every step, instead of queueing the next step while this one runs
    total_loss = torch.zeros(k, dtype=torch.float64, device=device)
    correct = torch.zeros(k, dtype=torch.int64, device=device)
    for start in range(0, n, batch_size):
        batch = order[:, start:start + batch_size]
        xb = (x[batch] if shared_x else x[rows, batch]).to(device, non_blocking=True)
        yb = y[rows, batch].to(device, non_blocking=True)
        noise = _draw_noise(dropouts, droppers, batch.shape[1], device)
        loss, logits = step(params, buffers, noise, xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # model i's weights get the gradient of model i's own mean loss
        optimizer.step()
        total_loss += loss.detach().double() * batch.shape[1]
        correct += (logits.argmax(2) == yb).sum(1)
    return (total_loss / n).tolist(), (correct.double() / n).tolist()


def _on_device_if_it_fits(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The training set moved to the accelerator once, if it takes at most a quarter of its free
    memory; else left where it is and copied batch by batch, as a solo trial does."""
    if device.type != "cuda":
        return tensors
    free, _ = torch.cuda.mem_get_info(device)
    if sum(t.numel() * t.element_size() for t in tensors) > free / 4:
        return tensors
    return [t.to(device) for t in tensors]


def _member_state(model: nn.Module, params: dict, buffers: dict, i: int) -> dict:
    """Model i's weights as a CPU ``state_dict`` (the keys in ``model.state_dict()``'s order)."""
    stacked = {**params, **buffers}
    return {key: stacked[key][i].detach().cpu().clone() for key in model.state_dict()}


def _unstack_into(models: list[nn.Module], params: dict, buffers: dict) -> None:
    with torch.no_grad():
        for i, model in enumerate(models):
            for key, tensor in model.state_dict(keep_vars=True).items():
                tensor.copy_((params.get(key) if key in params else buffers[key])[i])
            model.eval()
