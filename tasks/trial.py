"""One trial: data -> poison -> train -> detect -> (unlearn) -> rows. No Ray, no files.

``run_trial(config)`` runs in a notebook as it is; the engine calls the same function inside a
Ray Tune trial and hands it a Ray actor pool as ``map_shards``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

import tasks.detect  # noqa: F401  (registers the detectors)
from tasks.data import load_dataset
from tasks.detect.base import DETECTORS, Detection, DetectionContext, serial_map
from tasks.metrics import detection_metrics
from tasks.models import build_model
from tasks.poisons import apply_poison
from tasks.metrics import poison_success
from tasks.train import TrainConfig, accuracy, resolve_device, train_model

# detectors that read the per-epoch checkpoints of training (TracIn)
CHECKPOINT_DETECTORS = {"influence": lambda params: params.get("solver") == "tracin"}


@dataclass
class TrialResult:
    """Rows for each table, keyed by table name (``trials`` holds exactly one row)."""

    tables: dict[str, list[dict]] = field(default_factory=dict)


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True)


def _needs_checkpoints(detectors: list[dict]) -> bool:
    return any(CHECKPOINT_DETECTORS.get(d["name"], lambda _: False)(d.get("params", {})) for d in detectors)


def run_trial(config: dict, *, map_shards: Callable = serial_map, artifact_dir: str | None = None,
              log: Callable[[str], None] = lambda message: None) -> TrialResult:
    """Run one fully resolved trial config (see ``engine.config``) and return its rows.

    The rows carry no ``trial_id``; the caller adds it. Raises on any failure: the engine
    records the trial as failed with the error text.
    """
    seed = config["seed"]
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    data_cfg, poison_cfg = config["data"], config["poison"]
    data = load_dataset(data_cfg["name"], root=data_cfg.get("root"), n_train=data_cfg.get("n_train"),
                        n_test=data_cfg.get("n_test"), seed=data_cfg.get("seed", 0))
    lap("load_seconds")
    poisoned = apply_poison(data, poison_cfg["method"], rate=poison_cfg["rate"], seed=seed,
                            params=poison_cfg.get("params"), artifact_dir=artifact_dir)
    lap("poison_seconds")
    log(f"poisoned {poisoned.n_poisoned} of {len(poisoned.labels)} training samples")

    model_cfg = config["model"]
    train_config = TrainConfig(**config["train"])
    device = resolve_device(train_config.device)

    def model_factory(model_seed: int) -> torch.nn.Module:
        return build_model(model_cfg["name"], data.in_shape, data.num_classes, model_cfg.get("params"), seed=model_seed)

    model = model_factory(seed)
    history = train_model(model, poisoned.x_train, poisoned.labels, train_config, seed=seed,
                          keep_checkpoints=_needs_checkpoints(config["detectors"]),
                          on_epoch=lambda e, loss, acc: log(f"epoch {e + 1}: loss {loss:.4f} acc {acc:.3f}"))
    lap("train_seconds")
    clean_acc = accuracy(model, data.x_test, data.y_test)
    success = poison_success(model, poisoned)
    lap("eval_seconds")

    context = DetectionContext(
        model=model, x_train=poisoned.x_train, labels=poisoned.labels.numpy(), num_classes=data.num_classes,
        model_name=model_cfg["name"], model_params=model_cfg.get("params") or {}, train_config=train_config,
        x_test=data.x_test, y_test=data.y_test.numpy(), map_shards=map_shards, checkpoints=history.checkpoints,
        sample_losses=history.sample_losses, seed=seed,
    )
    detections: dict[str, Detection] = {}
    tables: dict[str, list[dict]] = {"detections": [], "scores": [], "influence": [], "unlearning": []}
    for detector in config["detectors"]:
        label = detector.get("label") or detector["name"]
        start = time.perf_counter()
        detection = DETECTORS.get(detector["name"]).fn(context, seed=seed, **detector.get("params", {}))
        seconds = time.perf_counter() - start
        detections[label] = detection
        log(f"{label}: {seconds:.1f}s")
        tables["detections"].append({
            "detector": label, "method": detector["name"], "params": _dumps(detector.get("params", {})),
            **detection_metrics(detection.scores, detection.flagged, poisoned.is_poison), "seconds": seconds,
        })
        tables["scores"].extend(_score_rows(label, detection, poisoned))
        tables["influence"].extend(dict(row, detector=label) for row in detection.extras.get("influence", []))
    lap("detect_seconds")

    if config.get("unlearn"):
        from tasks.unlearn import run_unlearning

        tables["unlearning"] = run_unlearning(
            model, poisoned, data.x_test, data.y_test, detections, config["unlearn"], train_config,
            model_factory, seed,
        )
    lap("unlearn_seconds")

    tables["trials"] = [{
        "n_train": len(poisoned.labels), "n_test": len(data.y_test), "num_classes": data.num_classes,
        "n_poisoned": poisoned.n_poisoned, "clean_test_acc": clean_acc, "poison_success": success,
        "train_loss": history.loss[-1], "train_acc": history.accuracy[-1],
        "poison_info": _dumps(_jsonable(poisoned.info)), "device": str(device), **timings,
    }]
    return TrialResult(tables)


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
