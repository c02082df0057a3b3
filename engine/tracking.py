"""An optional experiment-tracker hook (``poisonsweep run CONFIG --mlflow URI``): one MLflow run per trial,
with its resolved config as params and its metrics (trial and per detector), off by default.

The driver writes the runs as Tune reports each trial finished, reading what the trial just recorded
(the Parquet record is the truth; nothing extra travels from the trials, so a trial costs the same
with or without a tracker). A trial that failed gets a run with status FAILED and its error as a tag.
The MLflow client is imported only when asked for (``pip install "poisonsweep[mlflow]"``).
"""

from __future__ import annotations

import json
import re
import time

from ray.tune import Callback

from poisonsweep.tasks.registry import ConfigError

TRIAL_METRICS = ("clean_test_acc", "poison_success", "n_poisoned", "n_train", "train_loss", "train_acc",
                 "train_seconds", "detect_seconds", "unlearn_seconds", "total_seconds")
DETECTION_METRICS = ("auroc", "auprc", "precision_at_n", "precision", "recall", "f1", "n_flagged", "recall_at_5",
                     "recall_at_10", "recall_at_20", "seconds")
PARAM_CHARS = 500  # MLflow's smallest limit on a param value (older servers); longer values are cut
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
_NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow accepts in a metric or param name


def flat_params(config: dict) -> dict[str, str]:
    """Dotted keys of the resolved config (``poison.rate``), as the report lists them: values as compact
    JSON, strings as they are, cut to ``PARAM_CHARS``."""
    from poisonsweep.engine.report.run import _flatten

    def plain(text: str) -> str:
        value = json.loads(text)
        return value if isinstance(value, str) else text

    return {_name(key): plain(text)[:PARAM_CHARS] for key, text in _flatten(config).items()}


def _name(text: str) -> str:
    return _NOT_IN_A_NAME.sub("_", str(text))


def trial_metrics(trial: dict, detections: list[dict]) -> dict[str, float]:
    """The trial's numbers, and each detector's as ``<detector>.<metric>`` (``loss.auroc``); missing ones left out."""
    metrics = {m: float(trial[m]) for m in TRIAL_METRICS if trial.get(m) is not None}
    for row in detections:
        for m in DETECTION_METRICS:
            if row.get(m) is not None:
                metrics[f"{_name(row['detector'])}.{m}"] = float(row[m])
    return {k: v for k, v in metrics.items() if v == v}  # NaN: undefined (no poisons), not a number to plot


class MlflowTracker(Callback):
    """A Tune callback (driver side) that logs each finished trial of the record in ``out`` as an MLflow run
    of the experiment named after the sweep. Made before any trial starts: a bad URI or a missing client
    is a ``ConfigError`` then."""

    def __init__(self, uri: str, out: str, experiment: str):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError('--mlflow needs the MLflow client: pip install "poisonsweep[mlflow]" '
                              "(or mlflow-skinny)") from None
        self.uri, self.out, self.logged = uri, out, set()
        self.earlier: dict[str, tuple] = {}  # trial_id -> (started_at, finished_at) of a row older than this run
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        except Exception as error:  # MLflow raises its own and the store's errors: one line before any trial
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(f"--mlflow {uri!r}: {first}") from None

    def __getstate__(self):
        # Tune pickles its run config; the client (connections) stays in the driver
        return {k: v for k, v in self.__dict__.items() if k != "client"}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.log_trials(trial.config["trial_ids"])

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log_trials(trial.config["trial_ids"])  # those whose row is there now; the rest at log_trials' next call

    def log_trials(self, trial_ids: list[str]) -> int:
        """Log each of ``trial_ids`` that the record holds and that was not logged yet; returns how many."""
        wanted = [tid for tid in trial_ids if tid not in self.logged]
        if not wanted:
            return 0
        # a trial about to rerun still shows its earlier row until the new one is written: not this run's
        rows = [row for row in self._rows("trials", wanted)
                if (row["started_at"], row["finished_at"]) != self.earlier.get(row["trial_id"])]
        detections: dict[str, list[dict]] = {}
        for row in self._rows("detections", [r["trial_id"] for r in rows]):
            detections.setdefault(row["trial_id"], []).append(row)
        for row in rows:
            self._log_run(row, detections.get(row["trial_id"], []))
            self.logged.add(row["trial_id"])
        return len(rows)

    def _rows(self, table: str, trial_ids: list[str]) -> list[dict]:
        """The rows of ``trial_ids`` from their own per-trial files (a trial just written has one), and from
        the whole record only for those compacted meanwhile: the cost per trial stays flat in the sweep's size."""
        import pyarrow.parquet as pq

        from poisonsweep.engine.record.read import read_table
        from poisonsweep.engine.storage import filesystem

        fs, root = filesystem(self.out)
        rows, elsewhere = [], []
        for tid in trial_ids:
            try:
                rows += pq.read_table(f"{root}/{table}/{tid}.parquet", filesystem=fs).to_pylist()
            except (FileNotFoundError, OSError):
                elsewhere.append(tid)
        if elsewhere:
            rows += read_table(self.out, table, trial_ids=elsewhere).to_pylist()
        return rows

    def _log_run(self, trial: dict, detections: list[dict]) -> None:
        from mlflow.entities import Metric, Param

        tid = trial["trial_id"]
        tags = {"poisonsweep.trial_id": tid, "poisonsweep.sweep": str(trial.get("sweep")),
                "poisonsweep.status": str(trial.get("status")), "poisonsweep.code_version": str(trial.get("code_version"))}
        if trial.get("error"):
            tags["poisonsweep.error"] = (trial["error"].strip().splitlines() or ["error"])[0][:PARAM_CHARS]
        run = self.client.create_run(self.experiment_id, run_name=tid, tags=tags)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in flat_params(json.loads(trial.get("config_json") or "{}")).items()]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[start:start + PARAMS_PER_BATCH])
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in trial_metrics(trial, detections).items()]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per call
            self.client.log_batch(run_id, metrics=metrics[start:start + 1000])
        self.client.set_terminated(run_id, status="FINISHED" if trial.get("status") == "ok" else "FAILED")
