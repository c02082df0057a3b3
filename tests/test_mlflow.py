"""The optional MLflow hook (issue 26, point 7): one run per trial with its config as params and its metrics,
written from the driver as trials finish, checked against a local file store. Skipped without the client
(``pip install "poisonsweep[mlflow]"``)."""

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient

from poisonsweep.engine.record import write_trial
from poisonsweep.engine.tracking import MlflowTracker, flat_params
from poisonsweep.tasks.registry import ConfigError

CONFIG = {"data": {"name": "digits", "n_train": 300}, "poison": {"method": "one_shift", "rate": 0.1, "params": {}},
          "model": {"name": "mlp", "params": {"hidden": 32}}, "seed": 1, "detectors": ["loss"]}


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for the opt-in to its file store
    return f"file:{tmp_path / 'mlruns'}"


def write_two_trials(out):
    keys = {"data_name": "digits", "poison_method": "one_shift", "poison_rate": 0.1, "seed": 1}
    write_trial(str(out), "ok1", {
        "trials": [{"trial_id": "ok1", **keys, "sweep": "s", "status": "ok", "config_json": json.dumps(CONFIG),
                    "clean_test_acc": 0.91, "poison_success": 0.05, "n_poisoned": 30}],
        "detections": [{"trial_id": "ok1", **keys, "detector": "loss", "auroc": 0.83, "f1": 0.4, "n_flagged": 12},
                       {"trial_id": "ok1", **keys, "detector": "spectral_signature", "auroc": 0.97, "f1": float("nan")}]})
    write_trial(str(out), "bad2", {
        "trials": [{"trial_id": "bad2", **keys, "sweep": "s", "status": "failed", "config_json": json.dumps(CONFIG),
                    "error": "TrainingDiverged: loss nan\ntraceback..."}]})


def test_each_trial_becomes_one_run_with_its_config_and_metrics(tmp_path, file_store):
    write_two_trials(tmp_path / "out")
    tracker = MlflowTracker(file_store, str(tmp_path / "out"), "s")
    tracker.on_trial_complete(0, [], SimpleNamespace(config={"trial_ids": ["ok1", "bad2"]}))
    assert tracker.log_trials(["ok1", "bad2"]) == 0  # each trial once, however often Tune reports it
    client = MlflowClient(tracking_uri=file_store)
    experiment = client.get_experiment_by_name("s")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"ok1", "bad2"}
    ok, bad = runs["ok1"], runs["bad2"]
    assert ok.info.status == "FINISHED" and bad.info.status == "FAILED"
    assert ok.data.params["poison.rate"] == "0.1" and ok.data.params["model.params.hidden"] == "32"
    assert ok.data.params["data.name"] == "digits" and ok.data.params["detectors"] == '["loss"]'
    assert ok.data.metrics["clean_test_acc"] == pytest.approx(0.91)
    assert ok.data.metrics["loss.auroc"] == pytest.approx(0.83)
    assert ok.data.metrics["spectral_signature.auroc"] == pytest.approx(0.97)
    assert "spectral_signature.f1" not in ok.data.metrics  # undefined (NaN) is left out, not logged as a number
    assert bad.data.tags["poisonsweep.error"] == "TrainingDiverged: loss nan"
    assert ok.data.tags["poisonsweep.trial_id"] == "ok1"


def test_params_are_dotted_and_cut_to_mlflows_limit():
    params = flat_params({"a": {"b": 1, "c": "x" * 900}, "d/e f": [1, 2], "g!": {}})
    assert params["a.b"] == "1" and len(params["a.c"]) == 500 and params["d/e f"] == "[1, 2]" and params["g_"] == "{}"


def test_a_store_that_cannot_be_used_is_one_line_before_any_trial(tmp_path, monkeypatch):
    import poisonsweep

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    config = {"name": "m", "data": {"name": "digits", "n_train": 100, "n_test": 50},
              "poison": {"method": "one_shift", "rate": 0.1}, "model": {"name": "mlp"}, "detectors": ["loss"]}
    with pytest.raises(ConfigError, match="--mlflow .*MLFLOW_ALLOW_FILE_STORE") as error:
        poisonsweep.run(config, out=str(tmp_path / "out"), mlflow=f"file:{tmp_path / 'mlruns'}")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "trials").exists()
