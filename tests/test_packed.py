"""Packed training trains the very models solo training does, up to floating-point reordering.

Tolerances: a packed step runs the same arithmetic as a solo step, but ``vmap`` turns k matrix
products / convolutions into one batched kernel whose sums may run in another order, so each step
can differ by a few float32 ulps (~1e-7 relative). Over a few dozen steps of a small, well
conditioned network that stays far below rtol 1e-4 / atol 1e-5 (measured: mlp bit-identical,
keras_cnn <= 3e-8 absolute after 26 Adam steps). A deep BatchNorm network amplifies such
differences step after step (normalising by the variance of a handful of values), so ResNet-18 is
compared after ONE step, relative to the size of that step's update. Every comparison also checks
that model i is not model j: the tolerances are far tighter than the distance between two seeds.
"""

import pytest
import torch
from torch import nn

from poisonsweep.engine.config import build_sweep
from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.packed import run_pack, train_packed, why_not_packable
from poisonsweep.tasks.train import TrainConfig, TrainingDiverged, predict_logits, train_model
from poisonsweep.tasks.trial import run_resolved_trial

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", n_train=240, n_test=120, seed=0)


def _streams(data, seeds):
    """Per model: its own labels (model 1 has 40 flipped) and inputs (model 2's are shifted)."""
    ys = [data.y_train.clone() for _ in seeds]
    ys[1][:40] = (ys[1][:40] + 1) % data.num_classes
    xs = [data.x_train, data.x_train, data.x_train + 0.05][:len(seeds)]
    return xs, ys


def _solo_and_packed(name, params, data, config, seeds):
    xs, ys = _streams(data, seeds)
    solo = []
    for seed, x, y in zip(seeds, xs, ys):
        model = build_model(name, data.in_shape, data.num_classes, params, seed=seed)
        train_model(model, x, y, config, seed=seed)
        solo.append(model)
    packed = [build_model(name, data.in_shape, data.num_classes, params, seed=seed) for seed in seeds]
    histories = train_packed(packed, xs, ys, config, seeds=seeds)
    return solo, packed, histories


def _assert_same_models(solo, packed, x_test, distinct=True):
    for i, (a, b) in enumerate(zip(solo, packed)):
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=RTOL, atol=ATOL, msg=f"model {i} {key}")
        agree = (predict_logits(a, x_test).argmax(1) == predict_logits(b, x_test).argmax(1)).float().mean()
        assert agree >= 0.99
    if not distinct:
        return
    first, second = solo[0].state_dict(), packed[1].state_dict()
    assert any(not torch.allclose(first[k].float(), second[k].float(), rtol=RTOL, atol=ATOL) for k in first)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_packed_mlp_is_the_solo_mlp(digits, optimizer):
    config = TrainConfig(epochs=2, batch_size=32, lr=0.01, optimizer=optimizer, momentum=0.9, weight_decay=1e-3)
    solo, packed, histories = _solo_and_packed("mlp", {"hidden": 32, "depth": 2}, digits, config, [3, 4, 5])
    _assert_same_models(solo, packed, digits.x_test)
    assert all(len(h.loss) == 2 for h in histories)


def test_packed_keras_cnn_draws_the_solo_dropout_masks(digits):
    # dropout 0.25 / 0.5 is on: the models agree only if each packed model sees its solo masks
    config = TrainConfig(epochs=2, batch_size=20, lr=1e-3)
    params = {"width": 4, "hidden": 16, "dropout": 0.25}
    solo, packed, _ = _solo_and_packed("keras_cnn", params, digits, config, [0, 1, 2])
    _assert_same_models(solo, packed, digits.x_test)


@pytest.mark.slow  # a second or more of training
def test_packed_resnet18_keeps_batchnorm_statistics_per_model():
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 3, 8, 8, generator=generator) for _ in range(2)]
    ys = [torch.randint(0, 3, (16,), generator=generator) for _ in range(2)]
    config, seeds = TrainConfig(epochs=1, batch_size=16, lr=0.05, optimizer="sgd"), [1, 2]  # one step
    initial = [build_model("resnet18", (3, 8, 8), 3, seed=s).state_dict() for s in seeds]
    solo = []
    for seed, x, y in zip(seeds, xs, ys):
        model = build_model("resnet18", (3, 8, 8), 3, seed=seed)
        train_model(model, x, y, config, seed=seed)
        solo.append(model.state_dict())
    models = [build_model("resnet18", (3, 8, 8), 3, seed=s) for s in seeds]
    train_packed(models, xs, ys, config, seeds=seeds)
    for start, want, got in zip(initial, solo, [m.state_dict() for m in models]):
        for key in want:
            if key.endswith("num_batches_tracked"):
                assert got[key] == want[key] == 1
                continue
            update = (want[key] - start[key]).norm()
            assert (got[key] - want[key]).norm() <= 1e-3 * update + 1e-6, key
    stats = "features.net.bn1.running_mean"
    assert not torch.allclose(models[0].state_dict()[stats], models[1].state_dict()[stats])


def test_a_diverging_model_does_not_stop_the_others(digits):
    config = TrainConfig(epochs=1, batch_size=32, lr=0.01)
    xs, ys = [digits.x_train, digits.x_train * 1e38], [digits.y_train, digits.y_train]
    models = [build_model("mlp", digits.in_shape, 10, {"hidden": 16}, seed=s) for s in (0, 1)]
    histories = train_packed(models, xs, ys, config, seeds=[0, 1])
    assert isinstance(histories[1], TrainingDiverged) and len(histories[0].loss) == 1
    solo = build_model("mlp", digits.in_shape, 10, {"hidden": 16}, seed=0)
    train_model(solo, digits.x_train, digits.y_train, config, seed=0)
    _assert_same_models([solo], models[:1], digits.x_test, distinct=False)


def test_models_with_unpackable_randomness_are_refused(digits):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout2d(0.5), nn.Flatten(), nn.Linear(72, 10))
    assert "Dropout2d" in why_not_packable(model)
    with pytest.raises(ValueError, match="Dropout2d"):
        train_packed([model, model], [digits.x_train] * 2, [digits.y_train] * 2, TrainConfig(), seeds=[0, 1])


def test_a_pack_gives_each_trial_its_solo_rows():
    sweep = build_sweep({
        "data": {"name": "digits", "n_train": 200, "n_test": 80},
        "poison": {"method": "one_shift", "rate": 0.1},
        "model": {"name": "mlp", "params": {"hidden": 16, "depth": 1}},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.01},
        "detectors": ["spectral_signature", "loss"],
        "sweep": {"seed": [0, 1], "poison.rate": [0.1, 0.3]},
    })
    packed = run_pack(sweep.trials)
    for config, result in zip(sweep.trials, packed):
        solo = run_resolved_trial(config).tables
        row, want = result.tables["trials"][0], solo["trials"][0]
        assert row["pack_size"] == 4 and want["pack_size"] == 1 and row["pack_note"] is None
        assert set(row) == set(want)
        for key, value in want.items():
            if isinstance(value, float) and not key.endswith("seconds"):
                assert row[key] == pytest.approx(value, rel=RTOL, abs=ATOL, nan_ok=True), key
        for got, expected in zip(result.tables["detections"], solo["detections"]):
            for key, value in expected.items():
                if key != "seconds":
                    assert got[key] == (pytest.approx(value, rel=RTOL, abs=ATOL, nan_ok=True)
                                        if isinstance(value, float) else value), key


def test_trials_that_cannot_train_together_train_alone_and_say_why(monkeypatch):
    base = {"data": {"name": "digits", "n_train": 100, "n_test": 40}, "poison": {"method": "one_shift", "rate": 0.1},
            "model": {"name": "mlp", "params": {"hidden": 8, "depth": 1}}, "train": {"epochs": 1},
            "detectors": ["loss"]}
    configs = build_sweep({**base, "sweep": {"seed": [0, 1], "model.params.hidden": [8, 12]}}).trials[:3]
    rows = [r.tables["trials"][0] for r in run_pack(configs)]  # (seed, hidden): (0, 8), (0, 12), (1, 8)
    assert [r["pack_size"] for r in rows] == [2, 1, 2]
    assert rows[0]["pack_note"] is None and "training schedule" in rows[1]["pack_note"]
    monkeypatch.setattr("poisonsweep.tasks.packed.why_not_packable", lambda model: "a made-up reason")
    rows = [r.tables["trials"][0] for r in run_pack([configs[0], configs[2]])]
    assert [r["pack_size"] for r in rows] == [1, 1] and rows[0]["pack_note"] == "not packable: a made-up reason"


def test_trials_whose_detectors_need_per_sample_losses_train_alone():
    """abl_isolation reads per-sample training losses, which packed training does not record."""
    configs = build_sweep({"data": {"name": "digits", "n_train": 100, "n_test": 40},
                           "poison": {"method": "one_shift", "rate": 0.1},
                           "model": {"name": "mlp", "params": {"hidden": 8, "depth": 1}}, "train": {"epochs": 2},
                           "detectors": ["abl_isolation"], "sweep": {"seed": [0, 1]}}).trials
    results = run_pack(configs)
    assert not any(isinstance(r, Exception) for r in results), results
    rows = [r.tables["trials"][0] for r in results]
    assert [r["pack_size"] for r in rows] == [1, 1] and all("per-sample training losses" in r["pack_note"] for r in rows)
    assert [d["detector"] for r in results for d in r.tables["detections"]] == ["abl_isolation"] * 2


# ----------------------------------------------------------------------------------- the engine

PACK_SWEEP = {
    "name": "packs",
    "data": {"name": "digits", "n_train": 160, "n_test": 60},
    "poison": {"method": "one_shift", "rate": 0.1},
    "model": {"name": "keras_cnn", "params": {"width": 4, "hidden": 16}},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.01},
    "detectors": ["spectral_signature", "loss"],
    # lr 1e30 diverges: a pack whose every member fails, recorded member by member
    "sweep": {"seed": [0, 1], "train.lr": [0.01, 1.0e30]},
    "resources": {"cpu": 1, "max_failures": 0, "pack": 4},
}


def test_plan_packs_groups_by_data_model_and_schedule():
    from poisonsweep.engine.packs import plan_packs

    grid = {**PACK_SWEEP["sweep"], "seed": [0, 1, 2, 3, 4], "poison.rate": [0.1, 0.3]}
    sweep = build_sweep({**PACK_SWEEP, "sweep": grid})
    packs = plan_packs(sweep.trials, 4)
    assert sorted(len(p) for p in packs) == [3, 3, 3, 3, 4, 4]  # 10 per learning rate: 4 + 3 + 3
    for pack in packs:
        assert len({t["train"]["lr"] for t in pack}) == 1
    assert sorted(id(t) for p in packs for t in p) == sorted(id(t) for t in sweep.trials)


def test_packing_without_a_gpu_share_is_pointed_out():
    from poisonsweep.engine.api import cpu_pack_note

    assert "slower per model" in cpu_pack_note({"pack": 8, "gpu": 0})
    assert cpu_pack_note({"pack": 8, "gpu": 0.25}) is None and cpu_pack_note({"pack": 1, "gpu": 0}) is None


@pytest.mark.slow  # starts Ray or a subprocess
def test_a_packed_sweep_records_what_a_solo_sweep_records(tmp_path):
    import pandas as pd
    import yaml

    from poisonsweep.engine.packs import ALONE
    from poisonsweep.engine.worker import record_trial
    from test_end_to_end import poisonsweep

    config = tmp_path / "packs.yaml"
    config.write_text(yaml.safe_dump(PACK_SWEEP))
    run = poisonsweep("run", str(config), "--out", str(tmp_path / "packed"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 trials run" in run.stdout and "2 failed" in run.stdout
    assert "resources.pack is 4 but the trials get no GPU" in run.stdout  # packing is slower on a CPU
    for trial in build_sweep(PACK_SWEEP).trials:  # what pack: 1 writes for each trial, without Ray
        record_trial(trial, str(tmp_path / "solo"))
    for table in ("trials", "detections", "scores"):
        packed = pd.read_parquet(tmp_path / "packed" / table)
        solo = pd.read_parquet(tmp_path / "solo" / table)
        assert list(packed.columns) == list(solo.columns) and len(packed) == len(solo)
        keys = ["trial_id"] + [c for c in ("detector", "index") if c in solo]
        packed, solo = packed.sort_values(keys, ignore_index=True), solo.sort_values(keys, ignore_index=True)
        assert list(packed.trial_id) == list(solo.trial_id)
        numbers = [c for c in solo.select_dtypes("number") if not c.endswith("seconds") and c != "pack_size"]
        pd.testing.assert_frame_equal(packed[numbers], solo[numbers], rtol=RTOL, atol=ATOL)
    trials = pd.read_parquet(tmp_path / "packed" / "trials")
    ok = trials[trials.status == "ok"]
    assert len(ok) == 2 and set(ok.pack_size) == {2} and ok.pack_note.isna().all()
    assert trials[trials.status == "failed"].error.str.contains("TrainingDiverged").all()
    # a rerun with a third seed packs only what is not yet ok: at lr 0.01 the new trial alone, at
    # lr 1e30 the 2 failed ones and the new one
    again = poisonsweep("run", str(config), "--out", str(tmp_path / "packed"), "--set", "sweep.seed=[0, 1, 2]")
    assert again.returncode == 0 and "4 trials run, 2 already done" in again.stdout, again.stdout + again.stderr
    trials = pd.read_parquet(tmp_path / "packed" / "trials")
    new = trials.query("status == 'ok' and seed == 2")
    assert len(trials) == 6 and list(new.pack_size) == [1] and list(new.pack_note) == [ALONE]
