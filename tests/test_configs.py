"""Every shipped config validates; the CIFAR-10 reference config runs end-to-end on a tiny
CIFAR-format fixture (the real data cannot be fetched here)."""

from pathlib import Path

import pandas as pd
import pytest

from poisonsweep.engine.config import load_sweep
from poisonsweep.engine.worker import record_trial
from test_data import write_cifar10

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_validates(path):
    sweep = load_sweep(path)
    assert sweep.trials and sweep.name


def test_reference_configs_match_the_reference_experiments():
    mnist = load_sweep(Path(__file__).parents[1] / "configs/mnist_oneshift.yaml")
    assert {(t["poison"]["rate"], t["seed"]) for t in mnist.trials} == {(r, s) for r in (0.01, 0.33) for s in (0, 1, 2)}
    trial = mnist.trials[0]
    assert (trial["data"]["n_train"], trial["data"]["n_test"], trial["model"]["name"]) == (7500, 10000, "keras_cnn")
    assert trial["train"]["epochs"] == 3 and trial["poison"]["method"] == "one_shift"


def test_cifar10_config_end_to_end_on_a_cifar_format_fixture(tmp_path):
    write_cifar10(tmp_path / "data", per_batch=10, n_test=20)
    sweep = load_sweep(Path(__file__).parents[1] / "configs/cifar10_oneshift.yaml",
                       ["train.epochs=1", "train.device=cpu", "sweep.seed=[0]", "poison.rate=0.33"],
                       data_root=str(tmp_path / "data"))
    assert len(sweep.trials) == 1
    out = tmp_path / "out"
    row = record_trial(sweep.trials[0], str(out))
    assert row["status"] == "ok", row.get("error")
    trials = pd.read_parquet(out / "trials")
    assert trials.loc[0, "n_train"] == 50 and trials.loc[0, "n_poisoned"] == round(0.33 * 50)
    assert trials.loc[0, "data_name"] == "cifar10"
    detections = pd.read_parquet(out / "detections")
    assert set(detections.detector) == {d["label"] for d in sweep.trials[0]["detectors"]}
    assert len(pd.read_parquet(out / "scores")) == 50 * len(detections)
