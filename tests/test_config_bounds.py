"""Issue 22, points 4 and 5: the config loader bounds what it expands (alias bombs, duplicate keys, grids
counted from their axes), and checks refuse before Ray what every trial would fail on (class indices
over the dataset's classes, +inf where a bound is open, a knn k not below the training samples)."""

import math
import re
import warnings

import numpy as np
import pytest
import yaml

from poisonsweep.engine.config import (
    MAX_ALIAS_VALUES, MAX_TRIALS, ConfigError, build_sweep, check_data, load_sweep, read_yaml,
)
from poisonsweep.tasks.detect.knn import deep_knn
from poisonsweep.tasks.registry import TrialWarning

BASE = {"name": "t", "data": {"name": "digits", "n_train": 300, "n_test": 50},
        "poison": {"method": "one_shift", "rate": 0.1}, "model": {"name": "mlp"}, "train": {"epochs": 1},
        "detectors": ["loss"]}


def errors_of_file(tmp_path, text: str) -> list[str]:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    return info.value.errors


def alias_bomb(key: str, levels: int = 9, width: int = 10) -> str:
    """The "billion laughs" under ``key``: each level a list of ``width`` aliases of the level below."""
    section, _, rest = key.partition(".")
    lines = [] if section == "name" else ["name: t"]
    lines += [f"{section}:"] + ([f"  {rest}:"] if rest else [])
    lines += ["    a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- point 4: what the loader expands

@pytest.mark.parametrize("key", ["model.params", "data.root", "name", "unlearn"])
def test_an_alias_bomb_in_a_trial_key_is_refused_before_it_is_built(tmp_path, key):
    (error,) = errors_of_file(tmp_path, alias_bomb(key))
    added = int(re.search(r"expand to ([\d,]+) more values than are written out", error)[1].replace(",", ""))
    assert added > 10**9 and f"over the limit of {MAX_ALIAS_VALUES:,}" in error


def test_a_few_aliases_still_work():
    config = read_yaml("d: &d {name: loss, params: {flag_rule: fraction}}\ndetectors: [*d, *d]\n")
    assert config["detectors"] == [{"name": "loss", "params": {"flag_rule": "fraction"}}] * 2


def test_an_alias_that_contains_itself_is_refused(tmp_path):
    (error,) = errors_of_file(tmp_path, "name: t\nmodel: &m {name: mlp, params: {x: *m}}\n")
    assert error == "line 2: an alias refers to a value that contains it"


def test_a_duplicate_key_is_an_error_naming_both_lines(tmp_path):
    text = "name: t\ntrain:\n  lr: 0.01\ndata:\n  name: digits\n  n_train: 100\ntrain:\n  epochs: 1\n"
    assert errors_of_file(tmp_path, text) == ["duplicate key 'train' at line 7 (first at line 2); keep one"]


def test_a_duplicate_key_inside_a_section_is_found_too(tmp_path):
    (error,) = errors_of_file(tmp_path, "name: t\ntrain: {lr: 0.01, epochs: 2, lr: 0.1}\n")
    assert error == "duplicate key 'lr' at line 2 (first at line 2); keep one"


def test_yaml_merge_keys_are_no_duplicates():
    config = read_yaml("base: &b {lr: 0.01, epochs: 2}\ntrain: {<<: *b, lr: 0.1}\n")
    assert config["train"] == {"lr": 0.1, "epochs": 2}


def test_a_grid_over_the_limit_is_refused_with_its_size_without_expanding_it():
    axes = {"seed": list(range(1000)), "data.seed": list(range(100)), "poison.rate": [i / 1000 for i in range(100)]}
    assert math.prod(map(len, axes.values())) == 10**7 > MAX_TRIALS
    with pytest.raises(ConfigError) as info:
        build_sweep({**BASE, "sweep": axes})  # expanded in full this would take an hour and 20 GB
    (error,) = info.value.errors
    assert error.startswith("sweep has 10,000,000 grid points (1,000 (seed) x 100 (data.seed) x 100 (poison.rate)), "
                            f"over the limit of {MAX_TRIALS:,} trials per sweep")


def test_a_grid_at_the_limit_is_counted_not_refused():
    from poisonsweep.engine.config import grid_size_error

    assert grid_size_error({"seed": list(range(MAX_TRIALS))}) is None
    assert "100,001 grid points" in grid_size_error({"seed": list(range(MAX_TRIALS + 1))})


def test_the_cli_refuses_a_huge_grid_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from poisonsweep.engine.cli import app

    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump({**BASE, "sweep": {"seed": list(range(10_000)), "data.seed": list(range(1000))}}))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "sweep has 10,000,000 grid points" in result.output
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- point 5: checks before Ray

def errors_of(changes: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check_data(build_sweep({**BASE, **changes}))
    return info.value.errors


@pytest.mark.parametrize("poison, expected", [
    ({"method": "pair_flip", "rate": 0.01, "params": {"target": 10}},
     "poison.params.target must be an int in [0, 9] (digits has 10 classes); got 10"),
    ({"method": "pair_flip", "rate": 0.01, "params": {"source": 12}},
     "poison.params.source must be an int in [0, 9] (digits has 10 classes); got 12"),
    ({"method": "badnets", "rate": 0.1, "params": {"target": 11}},
     "poison.params.target must be an int in [0, 9] (digits has 10 classes); got 11"),
    ({"method": "one_shift", "rate": 0.1, "params": {"shift": 10}},
     "poison.params.shift must be an int in [1, 9] (digits has 10 classes); got 10"),
    ({"method": "flip", "rate": 0.1, "params": {"target": 10}},
     "poison.params.target must be an int in [0, 9] (digits has 10 classes); got 10"),
])
def test_a_class_index_outside_the_dataset_is_refused_without_loading_it(poison, expected):
    with pytest.raises(ConfigError) as info:
        build_sweep({**BASE, "poison": poison})  # build_sweep reads no data: the registry knows digits has 10
    assert info.value.errors == [expected]


def test_a_class_index_is_checked_against_the_loaded_data_when_the_entry_declares_no_classes(monkeypatch):
    from poisonsweep.tasks.data import DATASETS

    monkeypatch.setattr(DATASETS.get("digits"), "num_classes", None)  # as a plugin dataset that says nothing
    sweep = build_sweep({**BASE, "poison": {"method": "pair_flip", "rate": 0.01, "params": {"target": 10}}})
    with pytest.raises(ConfigError) as info:
        check_data(sweep)
    assert info.value.errors == ["poison.params.target must be an int in [0, 9] (digits has 10 classes); got 10"]


def test_class_indices_inside_the_dataset_pass():
    check_data(build_sweep({**BASE, "poison": {"method": "pair_flip", "rate": 0.01, "params": {"source": 9,
                                                                                               "target": 0}}}))


@pytest.mark.parametrize("changes, expected", [
    ({"train": {"epochs": 1, "lr": math.inf}}, "train.lr must be a number in (0, inf); got inf"),
    ({"resources": {"cpu": math.inf}}, "resources.cpu must be a number in (0, inf); got inf"),
    ({"resources": {"gpu": math.inf}}, "resources.gpu must be a number in [0, inf); got inf"),
    ({"train": {"epochs": 1, "weight_decay": math.nan}}, "train.weight_decay must be a number in [0, inf); got nan"),
])
def test_inf_and_nan_are_refused_where_the_bound_is_open(changes, expected):
    with pytest.raises(ConfigError) as info:
        build_sweep({**BASE, **changes})
    assert info.value.errors == [expected]


def test_inf_from_yaml_is_refused(tmp_path):
    text = yaml.safe_dump({k: v for k, v in BASE.items() if k != "train"}) + "train: {lr: .inf}\n"
    assert errors_of_file(tmp_path, text) == ["train.lr must be a number in (0, inf); got inf"]


def test_knn_with_k_not_below_the_training_samples_is_refused_before_any_trial():
    detectors = [{"name": "knn", "params": {"k": 100_000}}]
    assert errors_of({"detectors": detectors}) == [
        "detectors[0].params.k must be an int in [1, 299] (digits has 300 training samples); got 100000"]
    with pytest.raises(ConfigError, match=r"must be an int in \[1, 1346\] \(digits has 1347 training samples\)"):
        check_data(build_sweep({**BASE, "data": {"name": "digits"}, "detectors": detectors}))  # n_train from the data
    check_data(build_sweep({**BASE, "detectors": [{"name": "knn", "params": {"k": 299}}]}))


def test_knn_called_directly_with_k_too_large_warns_instead_of_clamping_silently():
    features = np.random.default_rng(0).normal(size=(30, 4))
    labels = np.arange(30) % 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detection = deep_knn(features, labels, 3, k=100)
    (warning,) = [w for w in caught if issubclass(w.category, TrialWarning)]
    assert "knn k=100 is not below the 30 samples it votes over: used k=29" in str(warning.message)
    assert detection.extras["k"] == 29
