"""Samples for the report: one trial per setting, its scores, and its training images rebuilt.

The report shows *one* trial of each setting (the ok trial with the lowest seed), so its cost is
flat in the number of seeds: it reads that trial's ``scores`` file once (a few columns) and never
the scores of the others. The images are not stored in the record; they are rebuilt from the
trial's recorded config (``config_json``) with the same code the trial ran: ``load_dataset`` and
``apply_poison`` with the trial's seed, triggers included. The rebuild is checked against the
record (given label, true label and poison mask of every sample shown), so a changed dataset
file or poison code is reported instead of showing the wrong images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from poisonsweep.engine.artifacts import ARTIFACT_DIR
from poisonsweep.engine.record.read import read_table as read_record
from poisonsweep.engine.storage import filesystem

SCORE_COLUMNS = ["detector", "index", "label_given", "label_true", "is_poison", "score", "flagged"]


def _poison_entry(method: str):
    """The poison's registry entry (its ``rebuild`` metadata), or None when it is not registered here (a
    plugin's poison, its plugin not loaded)."""
    from poisonsweep.tasks.poisons import POISONS

    return POISONS.get(method) if method in POISONS else None


def representative_trials(trials: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    """One ok trial per setting, the one with the lowest seed (ties: lowest trial id)."""
    ok = trials[trials["status"] == "ok"]
    first = ok.sort_values(["seed", "trial_id"]).groupby(setting, dropna=False).head(1)
    return first.sort_values(setting).reset_index(drop=True)


def _read_trial_file(out: str, table: str, trial_id: str, columns: list[str] | None = None) -> pd.DataFrame | None:
    """One trial's rows of ``table`` (only ``columns``), per-trial or compacted, or None when it has none."""
    rows = read_record(out, table, columns, trial_ids={trial_id})
    return rows.to_pandas() if rows.num_rows else None


def read_scores(out: str, trial_id: str) -> pd.DataFrame | None:
    """One trial's ``scores`` rows (the columns the report needs), or None when the file is absent."""
    return _read_trial_file(out, "scores", trial_id, SCORE_COLUMNS)


def flag_threshold(scores: pd.DataFrame) -> float | None:
    """The detector's own cut: the lowest score among the samples it flagged (None if it flagged none)."""
    flagged = scores.loc[scores["flagged"].fillna(False).astype(bool), "score"]  # a missing flag is "not flagged"
    return float(flagged.min()) if len(flagged) else None


def ranked(scores: pd.DataFrame) -> pd.DataFrame:
    """One detector's rows, most suspicious first (ties by index, as the found-vs-checked curves),
    with ``rank`` 1..n."""
    order = np.lexsort((scores["index"].to_numpy(), -scores["score"].to_numpy()))
    return scores.iloc[order].assign(rank=np.arange(1, len(scores) + 1))


def gallery_rows(scores: pd.DataFrame, top: int, missed: int) -> pd.DataFrame:
    """Per detector: its ``top`` highest-ranked samples (``part`` "top") and the ``missed`` poisons it
    ranked lowest (``part`` "missed", lowest rank last)."""
    parts = []
    for _, rows in scores.groupby("detector", sort=True):
        order = ranked(rows)
        parts.append(order.head(top).assign(part="top"))
        poisons = order[order["is_poison"]]
        parts.append(poisons.tail(missed).assign(part="missed"))
    return pd.concat(parts, ignore_index=True) if parts else scores.assign(rank=[], part=[])


@dataclass
class Rebuilt:
    """Training images of one trial, rebuilt from its config, and how well they match the record."""

    images: dict[int, np.ndarray] = field(default_factory=dict)  # index -> (C, H, W) float in [0, 1]
    mismatches: int = 0  # samples shown whose recorded labels or poison flag the rebuild does not reproduce
    checked: int = 0
    note: str = ""  # how the images were obtained, or why they could not be

    @property
    def exact(self) -> bool:
        return self.checked > 0 and self.mismatches == 0


def rebuild_images(config_json: str, out: str, rows: pd.DataFrame) -> Rebuilt:
    """The training images ``rows["index"]`` of the trial whose resolved config is ``config_json``.

    Checks the rebuilt given label, true label and poison flag of every row against the record.
    A dataset that cannot be loaded gives an empty result whose ``note`` says why.
    """
    if not isinstance(config_json, str):  # a row written without its config (older or hand-made records)
        return Rebuilt(note="images not shown: the trial's row holds no config to rebuild them from")
    config = json.loads(config_json)
    poison_cfg = config["poison"]
    try:
        data = _dataset(**_data_key(config))
    except (OSError, ValueError) as error:  # data absent here (e.g. a report made away from the cluster)
        return Rebuilt(note=f"images not shown: {type(error).__name__}: {str(error).splitlines()[0]}")
    indices = rows["index"].to_numpy()
    if len(indices) and indices.max() >= len(data.y_train):
        return Rebuilt(mismatches=len(indices), checked=len(indices),
                       note=f"the record's indices exceed the rebuilt training set ({len(data.y_train)} samples)")
    true_ok = data.y_train.numpy()[indices] == rows["label_true"].to_numpy()
    entry = _poison_entry(poison_cfg["method"])
    if entry is None:
        return Rebuilt(note=f"images not shown: poison {poison_cfg['method']!r} is not registered here (load its plugin)")
    if entry.rebuild == "clean":
        x, agree = data.x_train, true_ok
        note = f"clean images ({poison_cfg['method']} changes labels only); true labels checked"
    else:
        poisoned = _poisoned(config_json, _artifact_dir(out))
        x = poisoned.x_train
        agree = (true_ok & (poisoned.labels.numpy()[indices] == rows["label_given"].to_numpy())
                 & (poisoned.is_poison[indices] == rows["is_poison"].to_numpy()))
        note = "rebuilt from the trial config (data + poison with the trial's seed); given and true labels checked"
    images = {int(i): x[int(i)].numpy() for i in np.unique(indices)}
    return Rebuilt(images=images, mismatches=int((~agree).sum()), checked=len(indices), note=note)


def _data_key(config: dict) -> dict:
    data = config["data"]
    return {"name": data["name"], "n_train": data.get("n_train"), "n_test": data.get("n_test"),
            "seed": data.get("seed", 0), "params": json.dumps(data.get("params") or {}, sort_keys=True)}


@lru_cache(maxsize=2)
def _dataset(name: str, n_train: int | None, n_test: int | None, seed: int, params: str = "{}"):
    """The trial's dataset, loaded once for all the settings that share it (poisons copy, never modify it);
    ``params``: its ``data.params`` as JSON (hashable)."""
    from poisonsweep.tasks.data import load_dataset

    return load_dataset(name, n_train=n_train, n_test=n_test, seed=seed, params=json.loads(params))


@lru_cache(maxsize=2)
def _poisoned(config_json: str, artifact_dir: str | None):
    """The trial's poisoned data rebuilt from its config: once for its gallery and its unlearning picture."""
    from poisonsweep.tasks.poisons import apply_poison

    config = json.loads(config_json)
    poison_cfg = config["poison"]
    return apply_poison(_dataset(**_data_key(config)), poison_cfg["method"], rate=poison_cfg["rate"],
                        seed=config["seed"], params=poison_cfg.get("params"), artifact_dir=artifact_dir)


def _artifact_dir(out: str) -> str | None:
    """The sweep's shared artifacts (FLIP's experts), when the record is a local directory."""
    fs, root = filesystem(out)
    return f"{root}/{ARTIFACT_DIR}" if isinstance(fs, pafs.LocalFileSystem) else None


@dataclass
class SuccessSet:
    """The first inputs of a poison's success set (e.g. triggered test images), rebuilt from a trial config."""

    x: np.ndarray  # (n, C, H, W)
    wanted: np.ndarray  # what the attacker wants predicted ("hit"), or the true label ("miss")
    kind: str  # "hit" or "miss", as PoisonedData.success_kind


def rebuild_success_set(config_json: str, out: str, n: int) -> SuccessSet | None:
    """The first ``n`` inputs of the trial's success set, or None where they cannot be rebuilt cheaply
    (no data here, its poison not registered here, or a costly poison without its cached work, e.g. a FLIP
    trial without its expert artifact)."""
    if not isinstance(config_json, str):  # no config recorded: nothing to rebuild from
        return None
    config = json.loads(config_json)
    poison_cfg = config["poison"]
    artifacts = _artifact_dir(out)
    entry = _poison_entry(poison_cfg["method"])
    if entry is None or (entry.rebuild == "clean" and not (entry.rebuild_cached and entry.rebuild_cached(artifacts))):
        return None
    try:
        _dataset(**_data_key(config))  # loaded here to tell missing data apart; _poisoned reuses it
    except (OSError, ValueError):
        return None
    poisoned = _poisoned(config_json, artifacts)
    return SuccessSet(poisoned.success_x[:n].numpy(), poisoned.success_y[:n].numpy(), poisoned.success_kind)


def unlearning_examples(rows: pd.DataFrame) -> pd.DataFrame:
    """The unlearning runs worth a picture: the oracle at its largest fraction and every detector's
    flagged selection, each method once; rows without recorded predictions are dropped."""
    recorded = rows["success_predictions_after"].map(lambda p: p is not None and len(p) > 0).astype(bool)
    rows = rows[recorded]
    oracle = rows[rows["selection_kind"] == "oracle"]
    oracle = oracle[oracle["identified_fraction"] == oracle["identified_fraction"].max()]
    return pd.concat([oracle, rows[rows["selection_kind"] == "flagged"]], ignore_index=True)
