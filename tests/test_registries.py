"""One contract for every registry entry (datasets, poisons, models, detectors, unlearning methods):
its declared constraints name exactly the parameters a config may set, its defaults pass its own
checks, what it declares it needs is known to the trial, and ``poisonsweep list`` shows it."""

from __future__ import annotations

import inspect

import pytest
from typer.testing import CliRunner

import poisonsweep.tasks.detect  # noqa: F401  (registers the detectors)
from poisonsweep.engine.cli import app
from poisonsweep.tasks.data import DATASETS
from poisonsweep.tasks.detect.base import DETECTORS
from poisonsweep.tasks.models import MODELS
from poisonsweep.tasks.poisons import POISONS
from poisonsweep.tasks.registry import NEEDS
from poisonsweep.tasks.unlearn import UNLEARNERS

# what the trial hands each kind itself: never a config parameter
GIVEN_BY_THE_TRIAL = {
    "dataset": {"root", "n_train", "n_test", "seed"},
    "poison": {"data", "rate", "seed", "artifact_dir"},
    "model": set(),
    "detector": {"context", "seed"},
    "unlearning method": {"model", "retain_x", "retain_y", "forget_x", "forget_y", "train_config", "seed",
                          "model_factory"},
}
REGISTRIES = [DATASETS, POISONS, MODELS, DETECTORS, UNLEARNERS]
ENTRIES = [(registry, name) for registry in REGISTRIES for name in registry.names()]


def _config_parameters(registry, fn) -> set[str]:
    parameters = inspect.signature(fn).parameters.values()
    if registry is MODELS:  # in_shape and num_classes come from the data, positionally
        return {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}
    return {p.name for p in parameters} - GIVEN_BY_THE_TRIAL[registry.kind]


@pytest.mark.parametrize("registry,name", ENTRIES, ids=[f"{r.kind}:{n}" for r, n in ENTRIES])
def test_every_entry_keeps_the_registry_contract(registry, name):
    entry = registry.get(name)
    assert set(entry.constraints) == _config_parameters(registry, entry.fn)
    assert entry.check_params(name, entry.defaults()) == []
    assert entry.needs_for({}) <= set(NEEDS)
    if registry is POISONS:
        assert entry.eligible is not None  # an impossible rate is caught before any trial
        takes_artifacts = "artifact_dir" in inspect.signature(entry.fn).parameters
        assert takes_artifacts == ("artifact_dir" in entry.needs_for({}))
    if entry.tables:
        from poisonsweep.engine.record import TABLES

        assert set(entry.tables) <= set(TABLES)  # an extra table the record has a schema for


def test_list_shows_every_registered_name():
    shown = CliRunner().invoke(app, ["list"], env={"COLUMNS": "400"})
    assert shown.exit_code == 0, shown.output
    missing = [f"{registry.kind} {name}" for registry, name in ENTRIES if name not in shown.output]
    assert not missing


def test_needs_decide_what_a_trial_keeps():
    from poisonsweep.tasks.trial import trial_needs

    base = {"poison": {"method": "one_shift", "params": {}}}
    assert "checkpoints" in trial_needs({**base, "detectors": [{"name": "influence", "params": {"solver": "tracin"}}]})
    assert "checkpoints" not in trial_needs({**base, "detectors": [{"name": "influence", "params": {}}]})
    assert "artifact_dir" in trial_needs({"poison": {"method": "flip", "params": {}}, "detectors": []})
