"""Faults that need no cluster: bad input caught before Ray starts, each with a clear message, and
Parquet writes that no crash can leave half-visible. (Killed workers and a killed driver on a real
cluster: tests/test_cluster.py.)"""

import threading

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

import poisonsweep.engine.record as sink
from poisonsweep.engine import cluster as cluster_module
from poisonsweep.engine.cli import app
from test_data import write_cifar10

CONFIG = {
    "name": "faults",
    "data": {"name": "digits", "n_train": 100, "n_test": 50},
    "poison": {"method": "one_shift", "rate": 0.1},
    "model": {"name": "mlp", "params": {"hidden": 8, "depth": 1}},
    "train": {"epochs": 1},
    "detectors": ["loss"],
}


def run_cli(*args):
    """The CLI in this process (no Ray is started: every case here fails before that)."""
    result = CliRunner().invoke(app, ["run", *map(str, args)], env={"COLUMNS": "400"})
    return result.exit_code, " ".join(result.output.split())


def write_config(folder, **changes):
    path = folder / "faults.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, **changes}))
    return path


# ---------------------------------------------------------------------------- bad input, before Ray


def test_an_output_directory_that_cannot_be_written_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, output = run_cli(write_config(tmp_path), "--out", blocker / "results")
    assert code == 2
    assert f"output directory '{blocker / 'results'}' cannot be written: Not a directory; choose another with --out" \
        in output


def test_an_output_uri_that_cannot_be_written_is_a_clear_error(tmp_path):
    code, output = run_cli(write_config(tmp_path), "--out", "nosuchscheme://bucket/sweep")
    assert code == 2
    assert "output URI 'nosuchscheme://bucket/sweep' cannot be written" in output and "--out" in output


def test_a_corrupt_dataset_file_is_named_before_any_trial_runs(tmp_path):
    write_cifar10(tmp_path / "data", per_batch=10, n_test=20)
    corrupt = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3"
    corrupt.write_bytes(corrupt.read_bytes()[:1000])  # a truncated download
    config = write_config(tmp_path, data={"name": "cifar10", "n_train": 20, "n_test": 10})
    code, output = run_cli(config, "--out", tmp_path / "out", "--data-root", tmp_path / "data")
    assert code == 2
    assert f"data.name 'cifar10': dataset file {corrupt} is unreadable: not a readable pickle" in output
    assert "Delete or replace it" in output
    assert not (tmp_path / "out" / "trials").exists()


class _Payload:
    """A pickle that runs a shell command when loaded by ``pickle.load``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_a_crafted_dataset_pickle_is_refused_and_runs_nothing(tmp_path):
    import pickle

    write_cifar10(tmp_path / "data", per_batch=10, n_test=20)
    marker = tmp_path / "pwned"
    crafted = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2"
    crafted.write_bytes(pickle.dumps({b"data": _Payload(f"touch {marker}"), b"labels": []}))
    config = write_config(tmp_path, data={"name": "cifar10", "n_train": 20, "n_test": 10})
    code, output = run_cli(config, "--out", tmp_path / "out", "--data-root", tmp_path / "data")
    assert code == 2
    assert f"dataset file {crafted} is unreadable: not a dataset pickle: it refers to " in output
    assert "which a dataset file never needs (only numpy arrays are allowed)" in output
    assert not marker.exists()


@pytest.mark.parametrize("resources, available, message", [
    ({"gpu": 0.25}, {"CPU": 8}, "resources ask for GPUs (gpu: 0.25, actor_gpu: 0) but the Ray cluster has none"),
    ({"actors": 2, "actor_gpu": 0.5}, {"CPU": 8},
     "resources ask for GPUs (gpu: 0, actor_gpu: 0.5) but the Ray cluster has none"),
    ({"cpu": 2, "actors": 3}, {"CPU": 4},
     "one trial needs 5 CPUs (trial + influence actors) but the largest the Ray cluster can offer is 4"),
    ({"gpu": 1, "actors": 2, "actor_gpu": 1}, {"CPU": 8, "GPU": 2},
     "one trial needs 3 GPUs (trial + influence actors) but the largest the Ray cluster can offer is 2"),
])
def test_resources_the_cluster_can_never_offer_are_a_clear_error(monkeypatch, resources, available, message):
    monkeypatch.setattr(cluster_module, "_most_resources", lambda: available)
    wanted = {"cpu": 1, "gpu": 0, "actors": 0, "actor_cpu": 1, "actor_gpu": 0, **resources}
    with pytest.raises(RuntimeError) as info:
        cluster_module.check_cluster_resources(wanted)
    assert message in str(info.value)


def test_resources_that_fit_pass_the_check(monkeypatch):
    monkeypatch.setattr(cluster_module, "_most_resources", lambda: {"CPU": 4, "GPU": 1})
    cluster_module.check_cluster_resources({"cpu": 1, "gpu": 0.25, "actors": 3, "actor_cpu": 1,
                                          "actor_gpu": 0.25})  # 4 CPUs, 1 GPU: exactly fits


# ---------------------------------------------------------------------------- atomic Parquet writes


def trials_row(trial_id: str, acc: float) -> dict:
    return {"trial_id": trial_id, "status": "ok", "clean_test_acc": acc}


def score_rows(trial_id: str, n: int) -> list[dict]:
    return [{"trial_id": trial_id, "detector": "loss", "index": i, "label_given": 0, "label_true": 0,
             "is_poison": False, "score": float(i), "flagged": False} for i in range(n)]


def test_a_writer_that_dies_mid_write_leaves_the_old_file_or_none(tmp_path, monkeypatch):
    out = str(tmp_path)
    sink.write_trial_table(out, "trials", "a", [trials_row("a", 0.5)])
    real_write = pq.write_table

    def dies_halfway(table, where, **kwargs):  # writes half the bytes, then the process "dies"
        real_write(table, where, **kwargs)
        with open(where, "r+b") as f:
            f.truncate(len(open(where, "rb").read()) // 2)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pq, "write_table", dies_halfway)
    for trial_id in ("a", "b"):  # a replacement of an existing file, and a first write
        with pytest.raises(KeyboardInterrupt):
            sink.write_trial_table(out, "trials", trial_id, [trials_row(trial_id, 0.9)])
    monkeypatch.setattr(pq, "write_table", real_write)

    visible = sorted(p.name for p in (tmp_path / "trials").glob("*.parquet"))
    assert visible == ["a.parquet"]
    assert pd.read_parquet(tmp_path / "trials").clean_test_acc.tolist() == [0.5]  # the old row, intact
    assert sink.read_table(out, "trials").num_rows == 1
    assert len(list((tmp_path / "trials").glob(".*.tmp"))) == 2  # the dead writers' leftovers, hidden
    assert sink.remove_temporaries(out) == 2
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == ["a.parquet"]


def test_readers_never_see_a_partial_file_while_trials_are_rewritten(tmp_path):
    out = str(tmp_path)
    sink.write_trial_table(out, "scores", "t", score_rows("t", 20_000))
    stop = threading.Event()

    def rewrite():
        while not stop.is_set():
            sink.write_trial_table(out, "scores", "t", score_rows("t", 20_000))

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        counts = [sink.read_table(out, "scores", ["index"]).num_rows for _ in range(30)]
        direct = [pq.read_table(tmp_path / "scores" / "t.parquet").num_rows for _ in range(30)]
    finally:
        stop.set()
        writer.join()
    assert set(counts) == {20_000} and set(direct) == {20_000}
