"""Careless and hostile input (issue 14): every probe is a clear error before Ray starts, naming the
key, the bad value and what is allowed; and a trial's identity is the science as it runs."""

import pytest
import yaml

from poisonsweep.engine.config import ConfigError, build_sweep, check_data, load_sweep, trial_id

BASE = {"name": "t", "data": {"name": "digits", "n_train": 100, "n_test": 50},
        "poison": {"method": "one_shift", "rate": 0.1}, "model": {"name": "mlp"}, "train": {"epochs": 1},
        "detectors": ["loss"]}


def errors_of(tmp_path, config, overrides=()) -> list[str]:
    path = tmp_path / "sweep.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    with pytest.raises(ConfigError) as info:
        load_sweep(path, list(overrides))
    return info.value.errors


@pytest.mark.parametrize("changes, overrides, expected", [
    ({"poison": 0.1}, [], "poison must be a mapping (keys: method, params, rate); got 0.1"),
    ({}, ["poison=5"], "poison must be a mapping (keys: method, params, rate); got 5"),
    ({"detectors": [{"params": {}}]}, [], "detectors[0] has no 'name' (one of abl_isolation, activation_clustering"),
    ({"detectors": [{"name": "loss", "label": [1]}]}, [], "detectors[0].label must be a string; got [1]"),
    ({}, ["poison.rate=["], "--set 'poison.rate=[': the value '[' is not valid YAML"),
    ({}, ["sweep=[1]", "seed=1"], "--set 'sweep=[1]': set one grid axis at a time"),
    ({"name": 5}, [], "name must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    ({"seed": 2**70}, [], "seed must be an int in [0, 9223372036854775807]; got 1180591620717411303424"),
    ({"detectors": [{"name": "loss", "label": 3}]}, [], "detectors[0].label must be a string; got 3"),
    ({"detectors": "loss"}, [], "detectors must be a list of detector names or {name, params, label} mappings, "
                                "e.g. [loss]; got 'loss'"),
    ({"sweep": {"seed": [0, 1]}}, ["seed.x=1"], "seed must be an int in [0, 9223372036854775807]; got {'x': 1}"),
    ({"seed": 3}, ["seed.x=1"], "--set 'seed.x=1': seed.x cannot be set: seed is 3, not a mapping"),
    ({"poison": {"method": "one_shift", "rate": float("nan")}}, [], "poison.rate must be a number in [0, 1]; got nan"),
    ({"name": "../../x"}, [], "got '../../x'"),
    ({"name": "/abs/path"}, [], "got '/abs/path'"),
    ({"name": "x" * 300}, [], "name must be 1-100 letters"),
])
def test_each_probe_is_one_clear_error(tmp_path, changes, overrides, expected):
    errors = errors_of(tmp_path, {**BASE, **changes}, overrides)
    assert len(errors) == 1 and expected in errors[0], errors


def test_unknown_keys_at_every_level_and_bad_values_come_in_one_report(tmp_path):
    errors = errors_of(tmp_path, {**BASE, "colour": 1, "data": {"name": "digits", "bogus": 1},
                                  "poison": {"method": "one_shift", "rate": 2}})
    assert len(errors) == 3
    assert "colour is not a known top-level key" in errors[0]
    assert "data.bogus is not known (allowed: n_test, n_train, name, params, root, seed); remove it" in errors[1]
    assert "poison.rate must be a number in [0, 1]; got 2" in errors[2]


def test_a_config_path_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; give a sweep's YAML file"):
        load_sweep(tmp_path)


def test_exponent_floats_without_a_dot_are_numbers_in_files_and_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE) + "\n")
    assert load_sweep(path, ["train.lr=1e-3"]).trials[0]["train"]["lr"] == 0.001
    path.write_text(yaml.safe_dump({k: v for k, v in BASE.items() if k != "train"}) + "train: {lr: 2e-3, epochs: 1}\n")
    trial = load_sweep(path).trials[0]
    assert trial["train"]["lr"] == 0.002 and trial["train"]["epochs"] == 1 and type(trial["train"]["epochs"]) is int


def test_tracin_with_adam_is_refused_naming_the_option():
    tracin = [{"name": "influence", "params": {"solver": "tracin"}}]
    with pytest.raises(ConfigError) as info:
        build_sweep({**BASE, "train": {"optimizer": "adam"}, "detectors": tracin})
    assert "detectors[0]: influence solver 'tracin' assumes SGD steps (lr x gradient), but train.optimizer is " \
           "'adam'" in str(info.value) and "set train.optimizer: sgd" in str(info.value)
    build_sweep({**BASE, "train": {"optimizer": "sgd"}, "detectors": tracin})  # SGD: fine


def test_a_rate_that_rounds_to_no_poison_is_an_error():
    sweep = build_sweep({**BASE, "poison": {"method": "one_shift", "rate": 1e-9}})
    with pytest.raises(ConfigError, match=r"poison.rate 1e-09 poisons 0 of 100 training samples"):
        check_data(sweep)


# ---------------------------------------------------------------------------- identity


def test_trial_id_hashes_the_resolved_config():
    from poisonsweep.tasks.detect.base import DETECTORS

    implicit = build_sweep(BASE).trials[0]
    defaults = DETECTORS.get("loss").defaults()
    explicit = build_sweep({**BASE, "poison": {"method": "one_shift", "rate": 0.1, "params": {"shift": 1}},
                            "detectors": [{"name": "loss", "params": defaults}]}).trials[0]
    assert trial_id(implicit) == trial_id(explicit)  # a default written out is the same science
    as_int = build_sweep({**BASE, "train": {"epochs": 1, "lr": 1}}).trials[0]
    as_float = build_sweep({**BASE, "train": {"epochs": 1, "lr": 1.0}}).trials[0]
    assert trial_id(as_int) == trial_id(as_float)


def test_a_changed_registry_default_changes_the_trial_id(monkeypatch):
    from poisonsweep.tasks.detect.base import DETECTORS

    before = trial_id(build_sweep(BASE).trials[0])
    entry = DETECTORS.get("loss")
    changed = {**entry.defaults(), "flag_fraction": 0.25}
    monkeypatch.setattr(entry, "defaults", lambda: changed)
    assert trial_id(build_sweep(BASE).trials[0]) != before


# ---------------------------------------------------------------------------- exposure


def test_cluster_yaml_keeps_token_authentication_on_and_the_dashboard_on_loopback():
    from pathlib import Path

    raw = yaml.safe_load((Path(__file__).parent.parent / "cluster.yaml").read_text())
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "0.0.0.0" not in " ".join(starts) and any("--dashboard-host=127.0.0.1" in c for c in starts)
    assert raw["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
