"""One trial: data -> poison -> train -> detect -> (unlearn) -> rows. No Ray, no files.

``run_resolved_trial(config)`` runs one trial config with every default filled in (one of
``poisonsweep.engine.config.build_sweep(...).trials``); the public ``poisonsweep.run_trial`` takes a sweep
config and an index, resolves it and calls this. The engine calls the same function inside a Ray Tune trial
and hands it a Ray actor pool as ``map_shards``.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
import torch

import poisonsweep.tasks.detect  # noqa: F401  (registers the detectors)
from poisonsweep.tasks.data import check_fingerprint, load_dataset
from poisonsweep.tasks.detect.base import DETECTORS, Detection, DetectionContext, serial_map
from poisonsweep.tasks.metrics import detection_metrics, poison_success
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.poisons import POISONS, apply_poison
from poisonsweep.tasks.registry import TrialWarning
from poisonsweep.tasks.train import (
    TrainConfig, TrainHistory, accuracy, check_not_diverged, resolve_device, train_model,
)


WARNINGS_MAX_CHARS = 2000  # the trials row's ``warnings`` keeps this much of the trial's warnings


@dataclass
class TrialResult:
    """Rows for each table, keyed by table name (``trials`` holds exactly one row)."""

    tables: dict[str, list[dict]] = field(default_factory=dict)


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True)


def trial_needs(config: dict) -> frozenset:
    """What the trial's poison and detectors declare they need (``poisonsweep.tasks.registry.Entry.needs``)."""
    poison = config["poison"]
    needs = set(POISONS.get(poison["method"]).needs_for(poison.get("params") or {}))
    for detector in config["detectors"]:
        needs |= DETECTORS.get(detector["name"]).needs_for(detector.get("params", {}))
    return frozenset(needs)


@dataclass
class PreparedTrial:
    """A trial up to training: its data poisoned, its model built with its seed's initial weights."""

    config: dict
    data: object  # poisonsweep.tasks.data.Dataset
    poisoned: object  # poisonsweep.tasks.poisons.PoisonedData
    train_config: TrainConfig
    model: torch.nn.Module | None  # built by prepare_trial, trained in place
    timings: dict[str, float] = field(default_factory=dict)
    clock: float = field(default_factory=time.perf_counter)
    pack_size: int = 1  # how many models trained together with this one (1: trained alone)
    pack_note: str | None = None  # why a trial asked to be packed was trained alone

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self.clock
        self.clock = now

    def model_factory(self, model_seed: int) -> torch.nn.Module:
        model_cfg = self.config["model"]
        return build_model(model_cfg["name"], self.data.in_shape, self.data.num_classes, model_cfg.get("params"),
                           seed=model_seed)

    @cached_property
    def needs(self) -> frozenset:
        return trial_needs(self.config)

    @property
    def keeps_checkpoints(self) -> bool:
        return "checkpoints" in self.needs

    def train_alone(self, on_epoch=None) -> TrainHistory:
        """Train this trial's model by itself (as a solo trial does), timed as ``train_seconds``."""
        try:
            return train_model(self.model, self.poisoned.x_train, self.poisoned.labels, self.train_config,
                               seed=self.config["seed"], keep_checkpoints=self.keeps_checkpoints, on_epoch=on_epoch)
        finally:
            self.lap("train_seconds")


def _no_stage(stage: str) -> None:
    pass


def run_resolved_trial(config: dict, *, map_shards: Callable = serial_map, artifact_dir: str | None = None,
                       log: Callable[[str], None] = lambda message: None,
                       on_stage: Callable[[str], None] = _no_stage) -> TrialResult:
    """Run one fully resolved trial config (see ``poisonsweep.engine.config``) and return its rows.

    The rows carry no ``trial_id``; the caller adds it. Raises on any failure: the engine
    records the trial as failed with the error text. ``on_stage`` hears what the trial starts next
    ("training epoch 3/20", "detector loss (2/3)", "unlearning"), for a live display.
    """
    on_stage("loading and poisoning the data")
    trial = prepare_trial(config, artifact_dir=artifact_dir, log=log)
    epochs = trial.train_config.epochs
    on_stage(f"training epoch 1/{epochs}")

    def epoch_done(epoch: int, loss: float, acc: float) -> None:
        log(f"epoch {epoch + 1}: loss {loss:.4f} acc {acc:.3f}")
        on_stage(f"training epoch {epoch + 2}/{epochs}" if epoch + 1 < epochs else "evaluating")

    history = trial.train_alone(on_epoch=epoch_done)
    return finish_trial(trial, history, map_shards=map_shards, log=log, on_stage=on_stage)


def load_trial_data(data_cfg: dict):
    """The dataset a trial's ``data`` section names (its subset drawn with the section's own seed), refused if a
    user's file no longer has the content the sweep was checked with (its ``fingerprint``)."""
    check_fingerprint(data_cfg["name"], data_cfg.get("params"), data_cfg.get("fingerprint"))
    return load_dataset(data_cfg["name"], root=data_cfg.get("root"), n_train=data_cfg.get("n_train"),
                        n_test=data_cfg.get("n_test"), seed=data_cfg.get("seed", 0), params=data_cfg.get("params"))


def prepare_trial(config: dict, *, artifact_dir: str | None = None, data=None,
                  log: Callable[[str], None] = lambda message: None) -> PreparedTrial:
    """Load (unless ``data`` is the trial's dataset, already loaded) and poison the trial's data, and
    build its untrained model. Poisons copy what they change, so trials may share one ``data``."""
    started = time.perf_counter()
    data_cfg, poison_cfg = config["data"], config["poison"]
    if data is None:
        data = load_trial_data(data_cfg)
    load_seconds = time.perf_counter() - started
    poisoned = apply_poison(data, poison_cfg["method"], rate=poison_cfg["rate"], seed=config["seed"],
                            params=poison_cfg.get("params"), artifact_dir=artifact_dir)
    log(f"poisoned {poisoned.n_poisoned} of {len(poisoned.labels)} training samples")
    trial = PreparedTrial(config, data, poisoned, TrainConfig(**config["train"]), model=None,
                          timings={"load_seconds": load_seconds}, clock=started + load_seconds)
    trial.lap("poison_seconds")
    trial.model = trial.model_factory(config["seed"])
    return trial


@contextlib.contextmanager
def recorded_warnings():
    """Collect the ``TrialWarning``s raised inside (every one, even a repeat); others pass through as usual.

    Yields a list that holds, on exit, the de-duplicated first lines (``Category: message``)."""
    found: list[str] = []
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TrialWarning)
            yield found
    finally:  # outside the catch (a failed trial too): sort what was caught
        for warning in caught:
            if issubclass(warning.category, TrialWarning):
                line = f"{warning.category.__name__}: {str(warning.message).strip().splitlines()[0]}"
                if line not in found:
                    found.append(line)
            else:  # not ours: hand it on to the filters outside
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno,
                                       source=warning.source)


def finish_trial(trial: PreparedTrial, history: TrainHistory, *, map_shards: Callable = serial_map,
                 log: Callable[[str], None] = lambda message: None,
                 on_stage: Callable[[str], None] = _no_stage) -> TrialResult:
    """Evaluate the trained model, run the detectors and the unlearning, and return the rows; the
    ``TrialWarning``s raised meanwhile go into the ``trials`` row's ``warnings`` (None if none).
    Raises ``TrainingDiverged`` first when the training diverged (``check_not_diverged``)."""
    check_not_diverged(history.loss[-1], trial.data.num_classes)
    with recorded_warnings() as found:
        tables, clean_acc, success = _evaluate(trial, history, map_shards=map_shards, log=log, on_stage=on_stage)
    tables["trials"] = [measured_row(trial, history, clean_acc=clean_acc, success=success, warning_lines=found)]
    return TrialResult(tables)


def measured_row(trial: PreparedTrial, history: TrainHistory, *, clean_acc: float, success: float,
                 warning_lines: list[str]) -> dict:
    """What the trial measured, for its ``trials`` row: every trial's, solo or packed, is built here (the
    engine adds the trial's identity and run, ``poisonsweep.engine.record.row.trials_row``). ``warning_lines``:
    the first lines of its ``TrialWarning``s."""
    data, poisoned = trial.data, trial.poisoned
    return {
        "n_train": len(poisoned.labels), "n_test": len(data.y_test), "num_classes": data.num_classes,
        "n_poisoned": poisoned.n_poisoned, "clean_test_acc": clean_acc, "poison_success": success,
        "train_loss": history.loss[-1], "train_acc": history.accuracy[-1],
        "poison_info": _dumps(_jsonable(poisoned.info)), "device": str(resolve_device(trial.train_config.device)),
        **trial.timings, "pack_size": trial.pack_size, "pack_note": trial.pack_note,
        "warnings": "\n".join(warning_lines)[:WARNINGS_MAX_CHARS] or None,
    }


def _evaluate(trial: PreparedTrial, history: TrainHistory, *, map_shards: Callable, log: Callable,
              on_stage: Callable[[str], None] = _no_stage) -> tuple[dict[str, list[dict]], float, float]:
    """``finish_trial``'s work: evaluate, detect, unlearn; the rows of every table but ``trials``, the clean
    test accuracy and the poison's success."""
    config, data, poisoned, model = trial.config, trial.data, trial.poisoned, trial.model
    seed, model_cfg, train_config = config["seed"], config["model"], trial.train_config
    clean_acc = accuracy(model, data.x_test, data.y_test)
    success = poison_success(model, poisoned)
    trial.lap("eval_seconds")

    context = DetectionContext(
        model=model, x_train=poisoned.x_train, labels=poisoned.labels.numpy(), num_classes=data.num_classes,
        model_name=model_cfg["name"], model_params=model_cfg.get("params") or {}, train_config=train_config,
        x_test=data.x_test, y_test=data.y_test.numpy(), map_shards=map_shards, checkpoints=history.checkpoints,
        sample_losses=history.sample_losses, seed=seed, device=str(resolve_device(train_config.device)),
    )
    detections: dict[str, Detection] = {}
    tables: dict[str, list[dict]] = {"detections": [], "scores": [], "unlearning": []}
    for number, detector in enumerate(config["detectors"], 1):
        label = detector.get("label") or detector["name"]
        on_stage(f"detector {label} ({number}/{len(config['detectors'])})")
        start = time.perf_counter()
        entry = DETECTORS.get(detector["name"])
        detection = entry.fn(context, seed=seed, **detector.get("params", {}))
        seconds = time.perf_counter() - start
        detections[label] = detection
        log(f"{label}: {seconds:.1f}s")
        tables["detections"].append({
            "detector": label, "method": detector["name"], "params": _dumps(detector.get("params", {})),
            **detection_metrics(detection.scores, detection.flagged, poisoned.is_poison), "seconds": seconds,
        })
        tables["scores"].extend(_score_rows(label, detection, poisoned))
        for table in entry.tables:  # the extra tables the detector declares, e.g. influence
            tables.setdefault(table, []).extend(dict(row, detector=label) for row in detection.extras.get(table, []))
    trial.lap("detect_seconds")

    if config.get("unlearn"):
        from poisonsweep.tasks.unlearn import run_unlearning

        on_stage("unlearning")
        tables["unlearning"] = run_unlearning(
            model, poisoned, data.x_test, data.y_test, detections, config["unlearn"], train_config,
            trial.model_factory, seed,
        )
    trial.lap("unlearn_seconds")

    return tables, clean_acc, success


def _jsonable(info: dict) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in info.items()}


def _score_rows(label: str, detection: Detection, poisoned) -> list[dict]:
    given, true = poisoned.labels.numpy(), poisoned.true_labels.numpy()
    return [
        {"detector": label, "index": i, "label_given": int(given[i]), "label_true": int(true[i]),
         "is_poison": bool(poisoned.is_poison[i]), "score": float(detection.scores[i]),
         "flagged": bool(detection.flagged[i])}
        for i in range(len(given))
    ]
