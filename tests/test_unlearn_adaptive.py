"""ASSD and Potion against hand-computed percentiles and a planted digits backdoor; the accuracy
guard against a planted destructive update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_unlearn import TRAIN, _call, _oracle_split, backdoor, digits  # noqa: F401  (fixtures)

from poisonsweep.tasks.metrics import poison_success
from poisonsweep.tasks.train import accuracy, copy_model
from poisonsweep.tasks.unlearn import UNLEARNERS, check_unlearn_config, run_unlearning
from poisonsweep.tasks.unlearn.adaptive import adaptive_alpha, selection_percentile


def test_selection_percentile_is_100_minus_log_share():
    assert selection_percentile(0.0) == 100.0
    assert selection_percentile(0.01) == pytest.approx(100 - math.log(2))


def test_adaptive_alpha_is_the_percentile_of_the_finite_ratios():
    forget = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 0.0]), "b": torch.tensor([10.0])}
    reference = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]), "b": torch.tensor([2.0])}
    # finite ratios 1, 2, 3, 4 and 5 (1/0 is inf and 0/0 NaN, both left out); the 50th percentile is 3
    assert adaptive_alpha(forget, reference, 50.0) == pytest.approx(3.0)
    assert adaptive_alpha(forget, reference, 100.0) == pytest.approx(5.0)


def test_assd_dampens_about_log_share_percent_of_the_parameters(backdoor):  # noqa: F811
    poisoned, model, factory = backdoor
    split = _oracle_split(poisoned, 1.0)
    unlearned = _call("assd", model, split, factory)
    changed = sum(int((a != b).sum()) for a, b in zip(model.parameters(), unlearned.parameters()))
    total = sum(p.numel() for p in model.parameters())
    share = len(split["forget_x"]) / len(poisoned.labels)
    # at most the top ln(1 + 100 s) % of the ratios are selected (fewer if some get factor 1)
    assert 0 < changed <= math.ceil(total * math.log1p(100 * share) / 100) + 1


@pytest.mark.parametrize("method, fraction, ceiling", [("potion", 0.1, 0.1), ("potion", 0.25, 0.1),
                                                       ("assd", 1.0, 0.5)])
def test_adaptive_methods_reduce_the_planted_backdoor(backdoor, digits, method, fraction, ceiling):  # noqa: F811
    poisoned, model, factory = backdoor
    assert poison_success(model, poisoned) > 0.9
    unlearned = _call(method, model, _oracle_split(poisoned, fraction), factory)
    assert poison_success(unlearned, poisoned) <= ceiling
    assert accuracy(unlearned, digits.x_test, digits.y_test) >= accuracy(model, digits.x_test, digits.y_test) - 0.06


def test_potion_stops_once_the_forget_labels_are_unlearned(backdoor):  # noqa: F811
    poisoned, model, factory = backdoor
    split = _oracle_split(poisoned, 0.25)
    before = accuracy(model, split["forget_x"], split["forget_y"])
    for p_cut in (0.0, 0.5):
        unlearned = _call("potion", model, split, factory, p_cut=p_cut)
        assert accuracy(unlearned, split["forget_x"], split["forget_y"]) <= p_cut * before


# ---------------------------------------------------------------------------------------------
# the accuracy guard


def _destroy(model, *, epochs=None, lr=None, **_):  # finetune's signature, so its defaults resolve
    wrecked = copy_model(model)
    with torch.no_grad():
        for p in wrecked.parameters():
            p.zero_()
    return wrecked


def test_guard_refuses_a_destructive_update_and_keeps_the_model(backdoor, digits, monkeypatch):  # noqa: F811
    poisoned, model, factory = backdoor
    monkeypatch.setattr(UNLEARNERS.get("finetune"), "fn", _destroy)
    # every poison identified: the retain set is clean, so removing the backdoor costs it nothing
    selections = [{"kind": "oracle", "fraction": 1.0}]
    guarded = run_unlearning(model, poisoned, digits.x_test, digits.y_test, {},
                             {"methods": ["finetune", "potion"], "selections": selections,
                              "guard": {"max_retain_drop": 0.05}}, TRAIN, factory, seed=0)
    refused, kept = guarded
    assert refused["guard_refused"] and refused["guard_max_retain_drop"] == 0.05
    for key in ("clean_test_acc", "poison_success", "retain_acc"):
        assert refused[f"{key}_after"] == refused[f"{key}_before"]
    assert refused["refused_retain_acc"] < 0.2  # an all-zero network predicts one class
    assert not kept["guard_refused"] and np.isnan(kept["refused_retain_acc"])
    assert kept["poison_success_after"] < kept["poison_success_before"]

    unguarded = run_unlearning(model, poisoned, digits.x_test, digits.y_test, {},
                               {"methods": ["finetune"], "selections": selections}, TRAIN, factory, seed=0)
    assert not unguarded[0]["guard_refused"] and np.isnan(unguarded[0]["guard_max_retain_drop"])
    assert unguarded[0]["retain_acc_after"] < 0.2


def test_guard_config_is_checked():
    base = {"methods": ["ssd"], "selections": [{"kind": "oracle", "fraction": 1.0}]}
    assert check_unlearn_config({**base, "guard": {"max_retain_drop": 0.02}}, []) == []
    errors = check_unlearn_config({**base, "guard": {"max_retain_drop": 2, "floor": 1}}, [])
    assert any("unlearn.guard.floor" in e for e in errors)
    assert any("unlearn.guard.max_retain_drop must be a number in [0, 1]" in e for e in errors)


def test_potion_assd_and_the_guard_run_from_a_config():
    from poisonsweep.engine.config import build_sweep
    from poisonsweep.tasks.trial import run_resolved_trial

    sweep = build_sweep({
        "data": {"name": "digits", "n_train": 400, "n_test": 100},
        "poison": {"method": "badnets", "rate": 0.05, "params": {"target": 0, "mode": "all_to_one"}},
        "model": {"name": "mlp", "params": {"hidden": 32, "depth": 1}},
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.01},
        "detectors": ["loss"],
        "unlearn": {"methods": ["assd", {"name": "potion", "params": {"p_cut": 0.1}}],
                    "selections": [{"kind": "oracle", "fraction": 1.0}], "guard": {"max_retain_drop": 0.5}},
    })
    rows = run_resolved_trial(sweep.trials[0]).tables["unlearning"]
    assert [r["method"] for r in rows] == ["assd", "potion"]
    assert all(r["guard_max_retain_drop"] == 0.5 for r in rows)
