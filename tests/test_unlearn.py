"""Corrective unlearning: SSD against hand-computed and closed-form values, forget-set isolation of
the training-based methods, planted backdoors, exact forget-set selections and config checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import poisonsweep.tasks.unlearn.methods as unlearn_methods
from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.detect.base import Detection
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.poisons import PoisonedData, apply_poison
from poisonsweep.tasks.metrics import poison_success
from poisonsweep.tasks.registry import ConfigError
from poisonsweep.tasks.train import TrainConfig, accuracy, per_sample_loss, train_model
from poisonsweep.tasks.unlearn import (SUCCESS_EXAMPLES, UNLEARNERS, check_unlearn_config, expand_selections,
                           minibatch_importance, run_unlearning, select_forget_set, ssd, ssd_dampen)
from poisonsweep.tasks.unlearn.run import _split

ATOL = 1e-6  # float32 gradients against float64 closed forms
TRAIN = TrainConfig(epochs=10, batch_size=64, lr=1e-3, device="cpu")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# shared planted case: an MLP on sklearn digits with a BadNets all-to-one backdoor on 10 %


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def backdoor(digits):
    poisoned = apply_poison(digits, "badnets", rate=0.1, seed=0, params={"target": 0, "mode": "all_to_one"})
    factory = lambda seed: build_model("mlp", digits.in_shape, 10, {"hidden": 64}, seed=seed)  # noqa: E731
    model = factory(0)
    train_model(model, poisoned.x_train, poisoned.labels, TRAIN, seed=0)
    return poisoned, model, factory


def _oracle_split(poisoned, fraction: float, seed: int = 0) -> dict:
    forget = select_forget_set({"kind": "oracle", "fraction": fraction}, detections={},
                               is_poison=poisoned.is_poison, seed=seed)
    return _split(poisoned, forget)


def _call(name: str, model, split: dict, factory, **params):
    return UNLEARNERS.get(name).fn(model, retain_x=split["retain_x"], retain_y=split["retain_y"],
                                   forget_x=split["forget_x"], forget_y=split["forget_y"], train_config=TRAIN,
                                   seed=0, model_factory=factory, **params)


# ---------------------------------------------------------------------------------------------
# SSD: the formula, the importance and the whole method


def test_ssd_dampen_matches_hand_computed_factors():
    params = {"w": torch.tensor([2.0, -4.0, 6.0, 8.0]), "b": torch.tensor([1.0, 3.0])}
    forget = {"w": torch.tensor([5.0, 0.5, 30.0, 0.0]), "b": torch.tensor([3.0, 4.0])}
    full = {"w": torch.tensor([1.0, 1.0, 1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}
    out = ssd_dampen(params, forget, full, alpha=2.0, dampening=0.5)
    # w0: 5 > 2*1, beta = 0.5*1/5 = 0.1; w1: 0.5 <= 2, kept; w2: 30 > 2, beta = 0.5/30;
    # w3: 0 > 0 is false, kept; b0: 3 > 0, beta = 0.5*0/3 = 0; b1: 4 > 2, beta = 0.5/4
    torch.testing.assert_close(out["w"], torch.tensor([0.2, -4.0, 0.1, 8.0]))
    torch.testing.assert_close(out["b"], torch.tensor([0.0, 0.375]))
    assert params["w"].tolist() == [2.0, -4.0, 6.0, 8.0]  # inputs untouched


def test_ssd_dampen_never_amplifies():
    # selected (5 > 1*1) but dampening*full/forget = 10/5 = 2 is clipped to 1
    out = ssd_dampen({"w": torch.tensor([3.0])}, {"w": torch.tensor([5.0])}, {"w": torch.tensor([1.0])},
                     alpha=1.0, dampening=10.0)
    assert out["w"].item() == 3.0


def _linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def _closed_form_importance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict:
    """Mean over minibatches of the squared CE gradient of a linear softmax model, by hand in float64."""
    w = model[1].weight.detach().double().numpy()
    b = model[1].bias.detach().double().numpy()
    xs, ys = x.reshape(len(x), -1).double().numpy(), y.numpy()
    sums = {"1.weight": np.zeros_like(w), "1.bias": np.zeros_like(b)}
    starts = range(0, len(xs), batch_size)
    for start in starts:
        xb, yb = xs[start:start + batch_size], ys[start:start + batch_size]
        logits = xb @ w.T + b
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        residual = (probs - np.eye(w.shape[0])[yb]) / len(xb)  # d mean-CE / d logits
        sums["1.weight"] += (residual.T @ xb) ** 2
        sums["1.bias"] += residual.sum(0) ** 2
    return {k: v / len(starts) for k, v in sums.items()}


def test_minibatch_importance_matches_closed_form_gradients():
    model = _linear_model()
    x = torch.randn(10, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    got = minibatch_importance(model, x, y, batch_size=4)  # batches of 4, 4 and 2
    expected = _closed_form_importance(model, x, y, batch_size=4)
    for name in expected:
        np.testing.assert_allclose(got[name].double().numpy(), expected[name], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize(("importance_on", "alpha"), [("full", 2.0), ("retain", 10.0)])
def test_ssd_method_dampens_exactly_by_the_formula(importance_on, alpha):
    gen = torch.Generator().manual_seed(2)
    retain_x, forget_x = torch.randn(12, 1, 2, 2, generator=gen), torch.randn(5, 1, 2, 2, generator=gen) + 2
    retain_y, forget_y = torch.randint(0, 3, (12,), generator=gen), torch.zeros(5, dtype=torch.int64)
    model = _linear_model()
    before = _state(model)
    out = ssd(model, retain_x=retain_x, retain_y=retain_y, forget_x=forget_x, forget_y=forget_y,
              train_config=TRAIN, seed=0, model_factory=_linear_model, alpha=alpha, dampening=0.7,
              importance_on=importance_on, batch_size=4)
    ref_x = torch.cat([retain_x, forget_x]) if importance_on == "full" else retain_x
    ref_y = torch.cat([retain_y, forget_y]) if importance_on == "full" else retain_y
    forget_imp = _closed_form_importance(model, forget_x, forget_y, 4)
    ref_imp = _closed_form_importance(model, ref_x, ref_y, 4)
    n_selected = 0
    for name, theta in before.items():
        f, r = forget_imp[name], ref_imp[name]
        selected = f > alpha * r
        n_selected += selected.sum()
        beta = np.where(selected, np.minimum(0.7 * r / np.where(selected, f, 1), 1), 1)
        np.testing.assert_allclose(out.state_dict()[name].double().numpy(), theta.double().numpy() * beta,
                                   atol=ATOL, rtol=1e-4)
    assert 0 < n_selected < sum(v.numel() for v in before.values())  # the case exercises both branches
    assert _same_state(before, _state(model)), "ssd must not change its input model"


def test_ssd_removes_a_planted_backdoor_from_a_tenth_of_the_poisons(backdoor, digits):
    poisoned, model, factory = backdoor
    assert poison_success(model, poisoned) > 0.9
    out = _call("ssd", model, _oracle_split(poisoned, 0.1), factory)
    assert poison_success(out, poisoned) < 0.3
    assert accuracy(out, digits.x_test, digits.y_test) > 0.8


# ---------------------------------------------------------------------------------------------
# training-based methods see only the retain set


@pytest.mark.parametrize("method", ["retrain", "finetune"])
def test_training_methods_never_see_a_forget_sample(method, monkeypatch):
    n = 40
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 2, 2, generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    is_poison = np.zeros(n, dtype=bool)
    is_poison[::4] = True
    poisoned = PoisonedData(x, labels, labels, is_poison, x[:2], labels[:2])
    seen = []

    def spy(model, x_fit, y_fit, config, *, seed):
        seen.append((x_fit.clone(), y_fit.clone(), config))
        return train_model(model, x_fit, y_fit, config, seed=seed)

    monkeypatch.setattr(unlearn_methods, "train_model", spy)
    config = {"methods": [method], "selections": [{"kind": "oracle", "fraction": 0.6}]}
    train = TrainConfig(epochs=7, batch_size=8, device="cpu")
    run_unlearning(_linear_model(), poisoned, x[:5], labels[:5], {}, config, train, _linear_model, seed=0)

    forget = select_forget_set(config["selections"][0], detections={}, is_poison=is_poison, seed=0)
    retain = np.setdiff1d(np.arange(n), forget)
    assert len(forget) == round(0.6 * 10) and len(seen) == 1
    x_seen, y_seen, config_seen = seen[0]
    rows_seen = {tuple(r) for r in x_seen.reshape(len(x_seen), -1).tolist()}
    assert rows_seen == {tuple(r) for r in x[retain].reshape(len(retain), -1).tolist()}
    assert rows_seen.isdisjoint(tuple(r) for r in x[forget].reshape(len(forget), -1).tolist())
    assert torch.equal(y_seen, labels[retain])
    # retrain gets the full budget; finetune a quarter of it, rounded up (7 -> 2)
    assert config_seen.epochs == (7 if method == "retrain" else 2)


def test_retrain_on_all_poisons_removes_the_backdoor(backdoor, digits):
    poisoned, model, factory = backdoor
    clean = factory(0)
    train_model(clean, digits.x_train, digits.y_train, TRAIN, seed=0)
    out = _call("retrain", model, _oracle_split(poisoned, 1.0), factory)
    assert poison_success(model, poisoned) > 0.9
    assert poison_success(out, poisoned) <= poison_success(clean, poisoned) + 0.05
    assert accuracy(out, digits.x_test, digits.y_test) > 0.9


def test_finetune_returns_a_new_trained_model(backdoor):
    poisoned, model, factory = backdoor
    before = _state(model)
    out = _call("finetune", model, _oracle_split(poisoned, 1.0), factory, epochs=1, lr=1e-3)
    assert out is not model and _same_state(before, _state(model))
    assert not _same_state(before, _state(out))


# ---------------------------------------------------------------------------------------------
# gradient ascent


def _forget_loss(model, split) -> float:
    return float(per_sample_loss(model, split["forget_x"], split["forget_y"]).mean())


def test_gradient_ascent_raises_the_forget_loss_up_to_its_bound(backdoor):
    poisoned, model, factory = backdoor
    split = _oracle_split(poisoned, 0.5)
    start = _forget_loss(model, split)
    assert start < 0.1  # the poisons are memorised
    assert _forget_loss(_call("gradient_ascent", model, split, factory), split) > start + 0.1
    # with epochs to spare, ascent runs until the default bound, the chance-level loss ln(10) ...
    out = _call("gradient_ascent", model, split, factory, epochs=100)
    assert _forget_loss(out, split) >= math.log(10)
    # ... and a lower bound stops it earlier
    low = _call("gradient_ascent", model, split, factory, epochs=100, max_loss=0.5)
    assert 0.5 <= _forget_loss(low, split) < _forget_loss(out, split)


def test_gradient_ascent_takes_no_step_when_already_past_the_bound(backdoor):
    poisoned, model, factory = backdoor
    out = _call("gradient_ascent", model, _oracle_split(poisoned, 0.5), factory, max_loss=1e-12)
    assert _same_state(_state(model), _state(out))


# ---------------------------------------------------------------------------------------------
# forget-set selections


def test_oracle_selection_takes_a_seeded_nested_share_of_true_poisons():
    is_poison = np.zeros(200, dtype=bool)
    is_poison[np.random.default_rng(0).choice(200, 37, replace=False)] = True
    previous = np.array([], dtype=int)
    for fraction in [0.0, 0.1, 0.25, 0.5, 1.0]:
        picked = select_forget_set({"kind": "oracle", "fraction": fraction}, detections={},
                                   is_poison=is_poison, seed=5)
        assert len(picked) == round(fraction * 37)
        assert is_poison[picked].all() and np.all(np.diff(picked) > 0)
        assert set(previous) <= set(picked)
        previous = picked
    a, b = (select_forget_set({"kind": "oracle", "fraction": 0.5}, detections={}, is_poison=is_poison, seed=s)
            for s in (5, 6))
    assert not np.array_equal(a, b)


def test_top_and_flagged_selections_read_the_detection():
    scores = np.random.default_rng(1).permutation(50).astype(float)
    flagged = scores % 3 == 0
    detections = {"d": Detection(scores=scores, flagged=flagged)}
    top = select_forget_set({"kind": "top", "detector": "d", "fraction": 0.2}, detections=detections,
                            is_poison=np.zeros(50, bool), seed=0)
    brute = sorted(i for i in range(50) if scores[i] >= 40)  # the 10 highest of the scores 0..49
    assert top.tolist() == brute
    got = select_forget_set({"kind": "flagged", "detector": "d"}, detections=detections,
                            is_poison=np.zeros(50, bool), seed=0)
    assert got.tolist() == np.flatnonzero(flagged).tolist()


def test_expand_selections_gives_one_selection_per_fraction():
    out = expand_selections([{"kind": "oracle", "fractions": [0.1, 1.0]}, {"kind": "flagged", "detector": "d"},
                             {"kind": "top", "detector": "d", "fraction": 0.3}])
    assert out == [{"kind": "oracle", "fraction": 0.1}, {"kind": "oracle", "fraction": 1.0},
                   {"kind": "flagged", "detector": "d"}, {"kind": "top", "detector": "d", "fraction": 0.3}]


# ---------------------------------------------------------------------------------------------
# config check


def test_valid_unlearn_config_has_no_errors():
    config = {
        "methods": ["ssd", "retrain", {"name": "finetune", "params": {"epochs": 2}}, "gradient_ascent"],
        "selections": [{"kind": "oracle", "fractions": [0.1, 0.25, 0.5, 1.0]},
                       {"kind": "flagged", "detector": "activation_clustering"},
                       {"kind": "top", "detector": "spectral_signature", "fractions": [0.1]}],
    }
    assert check_unlearn_config(config, ["activation_clustering", "spectral_signature", "loss"]) == []


def test_check_unlearn_config_reports_every_error():
    config = {
        "methods": ["sdd", {"name": "ssd", "params": {"alpha": -1, "lambda": 1}}, {"name": "finetune", "extra": 1}],
        "selections": [{"kind": "oracle", "fractions": [0.1, 1.5]}, {"kind": "flagged", "detector": "knn"},
                       {"kind": "random"}, {"kind": "top", "detector": "loss"},
                       {"kind": "oracle", "fraction": 0.5, "detector": "loss"}],
        "schedule": "now",
    }
    errors = check_unlearn_config(config, ["loss"])
    expected = [
        "unlearn.schedule is not a key of unlearn",
        "unlearn.methods[0].name must be one of: assd, finetune, gradient_ascent, potion, retrain, ssd; got 'sdd'",
        "unlearn.methods[1].params.alpha must be a number in (0, inf); got -1",
        "unlearn.methods[1].params.lambda is not a parameter of 'ssd'",
        "unlearn.methods[2].extra is not a key of a method",
        "unlearn.selections[0].fractions[1] must be a number in [0, 1]; got 1.5",
        "unlearn.selections[1].detector must be one of the trial's detectors (loss); got 'knn'",
        "unlearn.selections[2].kind must be one of: oracle, flagged, top; got 'random'",
        "unlearn.selections[3] needs exactly one of fraction",
        "unlearn.selections[4].detector is not a key of a oracle selection",
    ]
    assert len(errors) == len(expected)
    for error, start in zip(errors, expected):
        assert error.startswith(start), (error, start)


@pytest.mark.parametrize("name", ["unlearn_badnets", "unlearn_oneshift"])
def test_shipped_unlearn_configs_pass_the_check(name):
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml").read_text())
    assert check_unlearn_config(config["unlearn"], config["detectors"]) == []


# ---------------------------------------------------------------------------------------------
# orchestration


def test_run_unlearning_rows_measure_the_selection(backdoor, digits):
    poisoned, model, factory = backdoor
    before = _state(model)
    poisons, clean = np.flatnonzero(poisoned.is_poison), np.flatnonzero(~poisoned.is_poison)
    flagged = np.zeros(len(poisoned.labels), dtype=bool)
    flagged[poisons[:6]] = True
    flagged[clean[:4]] = True  # precision 6/10, recall 6/n_poison
    detections = {"planted": Detection(scores=flagged.astype(float), flagged=flagged)}
    config = {"methods": ["ssd", {"name": "finetune", "params": {"epochs": 1}}],
              "selections": [{"kind": "flagged", "detector": "planted"}, {"kind": "oracle", "fraction": 0.0}]}
    rows = run_unlearning(model, poisoned, digits.x_test, digits.y_test, detections, config, TRAIN, factory, seed=0)

    assert _same_state(before, _state(model))
    assert [(r["selection"], r["selection_kind"], r["method"]) for r in rows] == [
        ("planted", "flagged", "ssd"), ("planted", "flagged", "finetune"),
        ("oracle", "oracle", "ssd"), ("oracle", "oracle", "finetune")]
    n_poison = len(poisons)
    first = rows[0]
    assert first["n_forget"] == 10
    assert first["forget_poison_share"] == pytest.approx(0.6)
    assert first["poisons_in_forget"] == first["identified_fraction"] == pytest.approx(6 / n_poison)
    assert first["forget_acc_before"] == pytest.approx(1.0)  # the model fits the given labels
    assert first["forget_true_acc_before"] == pytest.approx(0.4)  # only the 4 clean ones are right
    assert first["clean_test_acc_before"] == pytest.approx(accuracy(model, digits.x_test, digits.y_test))
    assert first["poison_success_before"] == pytest.approx(poison_success(model, poisoned))
    assert json.loads(first["params"]) == {"alpha": 10.0, "dampening": 1.0, "importance_on": "full",
                                           "batch_size": 64}
    assert json.loads(rows[1]["params"]) == {"epochs": 1, "lr": None}
    for empty in rows[2:]:  # nothing identified: nothing changes, no crash
        assert empty["n_forget"] == 0 and empty["seconds"] == 0.0
        for key in ("clean_test_acc", "poison_success", "retain_acc", "success_predictions"):
            assert empty[f"{key}_after"] == empty[f"{key}_before"]
    # the predictions on the first triggered test images, as the report shows them
    triggered = poisoned.success_x[:SUCCESS_EXAMPLES]
    assert first["success_predictions_before"] == [int(model(x[None]).argmax()) for x in triggered]
    assert all(len(r["success_predictions_after"]) == SUCCESS_EXAMPLES for r in rows)
    expected_keys = {
        "selection", "selection_kind", "identified_fraction", "top_fraction", "method", "params", "n_forget",
        "forget_poison_share", "poisons_in_forget", "seconds", "guard_max_retain_drop", "guard_refused",
        "refused_retain_acc", "refused_clean_test_acc", "refused_poison_success",
        *(f"{k}_{w}" for k in ("clean_test_acc", "poison_success", "retain_acc", "forget_acc",
                               "forget_true_acc", "success_predictions") for w in ("before", "after")),
    }
    assert all(set(r) == expected_keys for r in rows)


def test_identified_fraction_is_always_a_share_of_the_poisons_and_top_fraction_of_the_training_set():
    from poisonsweep.tasks.unlearn.run import _describe_selection

    is_poison = np.zeros(100, dtype=bool)
    is_poison[:10] = True  # 10 poisons in 100 samples
    forget = np.array([0, 1, 2, 50, 51])  # a top-5 % set holding 3 of the 10 poisons
    top = _describe_selection({"kind": "top", "detector": "d", "fraction": 0.05}, forget, is_poison)
    assert top["identified_fraction"] == pytest.approx(0.3) and top["top_fraction"] == 0.05
    oracle = _describe_selection({"kind": "oracle", "fraction": 0.5}, np.arange(5), is_poison)
    assert oracle["identified_fraction"] == 0.5 and np.isnan(oracle["top_fraction"])


def test_run_unlearning_rejects_a_bad_config(backdoor, digits):
    poisoned, model, factory = backdoor
    with pytest.raises(ConfigError, match="unlearn.methods\\[0\\].name"):
        run_unlearning(model, poisoned, digits.x_test, digits.y_test, {},
                       {"methods": ["nope"], "selections": [{"kind": "oracle", "fraction": 1.0}]},
                       TRAIN, factory, seed=0)
