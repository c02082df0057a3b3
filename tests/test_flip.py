"""FLIP (tasks/poisons/flip/): flip selection against brute force, the differentiable SGD step against
torch.optim.SGD, the sinusoid against the paper's formula, the label stage against planted flips,
the backdoor against random flips, and the shared artifact (reuse, key, lock)."""

from __future__ import annotations

import inspect
import math
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import poisonsweep.tasks.poisons.flip as flip_module
import poisonsweep.tasks.poisons.flip.artifacts as artifacts_module
import poisonsweep.tasks.poisons.flip.experts as experts_module
from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.poisons.flip import (
    RECIPES, FlipAttack, artifact_key, checkpoint_plan, flip, flip_margins, load_or_optimise_logits, optimise_labels,
    random_flips_to_target, resolve_recipe, select_flips, sgd_step, stamp_trigger, train_experts,
)
from poisonsweep.tasks.models import build_model
from poisonsweep.tasks.metrics import poison_success
from poisonsweep.tasks.poisons import POISONS, apply_poison
from poisonsweep.tasks.registry import ConfigError
from poisonsweep.tasks.train import TrainConfig, accuracy, train_model

# a small attack that runs in a few seconds on digits (1,347 training images, 8x8): the fast recipe
SMALL = dict(RECIPES["fast"], expert_batch_size=64, expert_model_params={"hidden": 64}, iterations=10)
CPU = torch.device("cpu")



@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory, digits):
    """One artifact for the module: later calls with the same settings reuse it."""
    directory = tmp_path_factory.mktemp("flip_artifacts")
    flip(digits, rate=0.0, seed=0, **SMALL, artifact_dir=str(directory))
    return str(directory)


# ------------------------------------------------------------------------------ pure helpers


def _brute_force_flips(logits, labels, b):
    rows = []
    for i, (row, y) in enumerate(zip(logits.tolist(), labels.tolist())):
        ranked = sorted(row, reverse=True)
        top = max(range(len(row)), key=lambda j: row[j])
        margin = ranked[0] - row[y] if top != y else ranked[1] - ranked[0]
        new = max((j for j in range(len(row)) if j != y), key=lambda j: row[j])
        rows.append((-margin, i, new))
    rows.sort()
    return [i for _, i, _ in rows[:b]], [new for _, _, new in rows[:b]]


def test_select_flips_matches_brute_force():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 5)) * 3
    labels = rng.integers(0, 5, size=60)
    labels[:20] = logits[:20].argmax(1)  # a third already agree with their label (margin <= 0)
    for b in (0, 1, 7, 35, 60):
        indices, new = select_flips(logits, labels, b)
        want_indices, want_new = _brute_force_flips(logits, labels, b)
        assert indices.tolist() == want_indices and new.tolist() == want_new
    assert np.all(new != labels[indices])


def test_flip_margins_hand_computed():
    logits = np.array([[5.0, 1.0, 2.0], [1.0, 4.0, 0.0], [0.0, 3.0, 3.5]])
    labels = np.array([0, 0, 1])
    # row 0 agrees: 2nd - 1st = 2 - 5; row 1 disagrees: 4 - 1; row 2 disagrees: 3.5 - 3
    np.testing.assert_allclose(flip_margins(logits, labels), [-3.0, 3.0, 0.5])


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_step_matches_torch_sgd(nesterov):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    settings = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    optimizer = torch.optim.SGD(model.parameters(), **settings)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for _ in range(2):  # leave a non-trivial momentum buffer behind
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    named = dict(model.named_parameters())
    params = {k: v.detach().clone() for k, v in named.items()}
    momentum = {k: optimizer.state[v]["momentum_buffer"].clone() for k, v in named.items()}
    x2, y2 = torch.randn(8, 4), torch.randint(0, 2, (8,))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x2), y2).backward()
    grads = {k: v.grad.clone() for k, v in named.items()}
    optimizer.step()
    stepped = sgd_step(params, grads, momentum, **settings)
    for k, v in named.items():
        torch.testing.assert_close(stepped[k], v.detach(), rtol=1e-6, atol=1e-7)


def test_sinusoid_is_the_papers_stripe_poisoner():
    # the paper's StripePoisoner on a 0..255 H x W x C array, horizontal=True, strength 6, freq 16
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 32, 3)).astype(np.float64)
    w, h, d = image.shape
    mask = np.full((d, w, h), np.sin(np.linspace(0, 16 * np.pi, h))).swapaxes(0, 2).swapaxes(0, 1)
    want = np.uint8((image + 6 * mask).clip(0, 255))
    x = torch.tensor(image / 255, dtype=torch.float32).permute(2, 0, 1)[None]
    got = stamp_trigger(x, "sinusoid")[0].permute(1, 2, 0).double().numpy() * 255
    # the paper truncates to uint8; we keep the fraction
    assert np.all((got - want >= -1e-3) & (got - want < 1 + 1e-3))


def test_checkerboard_is_the_badnets_patch():
    x = torch.full((2, 1, 8, 8), 0.5)
    out = stamp_trigger(x, "checkerboard", patch_size=3)
    assert torch.equal(out[0, 0, -3:, -3:], torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]]))
    assert torch.all(out[..., :5, :] == 0.5) and torch.all(x == 0.5)


# ------------------------------------------------------------------------------ the label stage


def test_label_stage_recovers_planted_relabels(digits):
    """With no trigger, experts trained on some relabelled images are matched best by exactly those
    relabels: the top-b margins must be the planted flips, to the planted classes."""
    x, y = digits.x_train, digits.y_train
    n = len(y)
    rng = np.random.default_rng(0)
    planted = rng.choice(n, 30, replace=False)
    planted_labels = y.clone()
    planted_labels[planted] = (y[planted] + torch.as_tensor(rng.integers(1, 10, 30))) % 10
    attack = FlipAttack(**{**SMALL, "iterations": 5})
    plan = checkpoint_plan(attack, math.ceil(n / attack.expert_batch_size), np.random.default_rng(1))

    def new_model(seed):
        return build_model("mlp", digits.in_shape, 10, {"hidden": 64}, seed=seed)

    checkpoints = train_experts(new_model, x, planted_labels, attack, plan, CPU)
    logits, _ = optimise_labels(new_model(0), x, y, x, planted_labels, np.arange(n), [checkpoints[p] for p in plan],
                                attack, np.random.default_rng(2), CPU, 10)
    indices, new = select_flips(logits, y.numpy(), 30)
    hits = np.isin(indices, planted)
    assert hits.sum() >= 27
    assert np.mean(new[hits] == planted_labels.numpy()[indices[hits]]) >= 0.9


def _train_user(digits, labels, seed):
    model = build_model("mlp", digits.in_shape, 10, {"hidden": 64}, seed=seed)
    train_model(model, digits.x_train, labels, TrainConfig(epochs=20, batch_size=64, lr=3e-3, device="cpu"), seed=seed)
    return model


@pytest.mark.slow  # a second or more of training
def test_flip_labels_plant_a_backdoor_random_flips_do_not(digits, artifact_dir):
    poisoned = flip(digits, rate=0.05, seed=0, **SMALL, artifact_dir=artifact_dir)
    # the paper's precomputed CIFAR labels: small budgets are all source -> target flips
    assert poisoned.info["flips_source_to_target"] >= 0.9 * poisoned.n_poisoned
    random_labels = torch.as_tensor(random_flips_to_target(digits.y_train.numpy(), poisoned.n_poisoned,
                                                           target=4, seed=0))
    scores = {"flip": [], "random": []}
    for seed in (0, 1):
        for name, labels in (("flip", poisoned.labels), ("random", random_labels)):
            model = _train_user(digits, labels, seed)
            scores[name].append((accuracy(model, digits.x_test, digits.y_test), poison_success(model, poisoned)))
    flip_cta, flip_pta = np.mean(scores["flip"], axis=0)
    random_cta, random_pta = np.mean(scores["random"], axis=0)
    assert flip_pta >= random_pta + 0.25, scores
    assert flip_cta >= random_cta - 0.05, scores


@pytest.mark.slow  # a second or more of training
def test_flip_changes_only_labels_and_exactly_the_budget(digits, artifact_dir):
    n = len(digits.y_train)
    for rate in (0.01, 0.05, 0.2):
        poisoned = flip(digits, rate=rate, seed=3, **SMALL, artifact_dir=artifact_dir)
        assert poisoned.x_train is digits.x_train or torch.equal(poisoned.x_train, digits.x_train)
        assert poisoned.n_poisoned == round(rate * n)
        assert torch.equal(poisoned.true_labels, digits.y_train)
        assert np.array_equal(poisoned.is_poison, (poisoned.labels != digits.y_train).numpy())
    source_test = digits.x_test[digits.y_test == 9]
    assert torch.equal(poisoned.success_x, stamp_trigger(source_test, "sinusoid"))
    assert torch.all(poisoned.success_y == 4)


def test_all_sources_attack_every_non_target_class(digits, artifact_dir):
    cheap = {**SMALL, "n_experts": 1, "expert_epochs": 2, "iterations": 1}
    poisoned = flip(digits, rate=0.01, seed=0, source="all", target=4, **cheap, artifact_dir=artifact_dir)
    assert len(poisoned.success_x) == int((digits.y_test != 4).sum()) and poisoned.info["source"] == "all"


# ------------------------------------------------------------------------------ the artifact


def test_artifact_is_reused_across_seeds_and_budgets(digits, artifact_dir, monkeypatch):
    first = flip(digits, rate=0.02, seed=0, **SMALL, artifact_dir=artifact_dir)

    def no_training(*args, **kwargs):
        raise AssertionError("the experts were trained again")

    monkeypatch.setattr(artifacts_module, "train_experts", no_training)
    again = flip(digits, rate=0.02, seed=7, attack_seed=0, **SMALL, artifact_dir=artifact_dir)
    assert again.info["artifact_reused"] and again.info["artifact_key"] == first.info["artifact_key"]
    assert torch.equal(again.labels, first.labels)  # a fixed attack_seed shares the attack between seeds
    with pytest.raises(AssertionError, match="trained again"):  # by default the trial seed seeds the attack
        flip(digits, rate=0.02, seed=7, **SMALL, artifact_dir=artifact_dir)
    bigger = flip(digits, rate=0.04, seed=0, **SMALL, artifact_dir=artifact_dir)
    assert np.all(bigger.is_poison[first.is_poison])  # a larger budget extends the same ranking
    # another attack setting or another data subset is another artifact: the experts must train
    with pytest.raises(AssertionError, match="trained again"):
        flip(digits, rate=0.02, seed=0, **{**SMALL, "iterations": 9}, artifact_dir=artifact_dir)
    subset = load_dataset("digits", n_train=1000, seed=0)
    with pytest.raises(AssertionError, match="trained again"):
        flip(subset, rate=0.02, seed=0, **SMALL, artifact_dir=artifact_dir)


def test_artifact_key_covers_data_and_settings_not_the_seed(digits):
    attack = FlipAttack(**SMALL)
    assert artifact_key(digits, attack) == artifact_key(load_dataset("digits"), FlipAttack(**SMALL))
    assert artifact_key(digits, attack) != artifact_key(digits, FlipAttack(**{**SMALL, "attack_seed": 1}))
    assert artifact_key(digits, attack) != artifact_key(load_dataset("digits", n_train=1300, seed=1), attack)


def test_concurrent_trials_compute_the_artifact_once(digits, tmp_path, monkeypatch):
    calls = []
    fake = flip_module.FlipArtifact(np.zeros((len(digits.y_train), 10), np.float32), np.arange(3), np.zeros(1), 0.0, 0.0)

    def slow_compute(data, attack, device):
        calls.append(1)
        time.sleep(0.3)
        return fake

    monkeypatch.setattr(artifacts_module, "compute_artifact", slow_compute)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        load_or_optimise_logits(digits, FlipAttack(), str(tmp_path), CPU)[1])) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and sorted(results) == [False, True, True]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".npz"] == [f"flip-{artifact_key(digits, FlipAttack())}.npz"]


# ------------------------------------------------------------------------------ config


def test_constraints_name_every_science_parameter_and_defaults_agree():
    entry = POISONS.get("flip")
    keywords = [k for k, p in inspect.signature(flip).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert set(entry.constraints) == set(keywords) - {"rate", "seed", "artifact_dir"}
    attack_defaults = {k: v for k, v in vars(FlipAttack()).items() if k not in ("expert_model_params", "attack_seed")}
    # the recipe's settings default to None in the config and resolve to the paper's values
    assert entry.defaults()["recipe"] == "paper"
    assert all(entry.defaults()[k] is None for k in RECIPES["paper"])
    assert attack_defaults == {**{k: entry.defaults()[k] for k in attack_defaults}, **RECIPES["paper"]}
    assert entry.defaults()["attack_seed"] is None  # None: the trial seed seeds the attack


@pytest.mark.parametrize("params, message", [
    ({"source": 4, "target": 4}, "must differ"),
    ({"source": 12}, r"source must be a class in \[0, 9\]"),
    ({"trigger": "blend"}, "trigger must be one of"),
    ({"checkpoint_every": 10_000}, "checkpoint_every"),
])
def test_bad_settings_raise_config_errors(digits, params, message):
    with pytest.raises(ConfigError, match=message):
        flip(digits, rate=0.01, seed=0, **{**SMALL, **params})


# ------------------------------------------------------------------------------ recipes


def test_recipes_resolve_to_the_authors_defaults_and_the_fast_preset():
    paper = resolve_recipe("paper")
    assert paper == {"n_experts": 50, "expert_epochs": 16, "expert_lr": 0.1, "expert_lr_milestones": (75, 125),
                     "iterations": 15}
    assert resolve_recipe("fast") == {"n_experts": 2, "expert_epochs": 4, "expert_lr": 0.01,
                                      "expert_lr_milestones": (), "iterations": 15}
    assert resolve_recipe("paper", n_experts=3, iterations=None)["n_experts"] == 3  # None keeps the recipe's
    with pytest.raises(ConfigError, match="recipe must be one of paper, fast"):
        resolve_recipe("slow")


def test_paper_recipe_is_the_default_of_a_config(digits, monkeypatch):
    seen = []

    def record(data, attack, artifact_dir, device):
        seen.append(attack)
        return flip_module.FlipArtifact(np.zeros((len(data.y_train), 10), np.float32), np.arange(3), np.zeros(1),
                                        0.0, 0.0), False

    monkeypatch.setattr(flip_module, "load_or_optimise_logits", record)
    poisoned = apply_poison(digits, "flip", rate=0.01, seed=0)
    fast = apply_poison(digits, "flip", rate=0.01, seed=0, params={"recipe": "fast", "n_experts": 3})
    assert seen[0] == FlipAttack()
    assert (seen[1].n_experts, seen[1].expert_lr, seen[1].expert_epochs) == (3, 0.01, 4)
    assert poisoned.info["recipe"] == "paper" and fast.info["recipe"] == "fast"


def test_the_lr_schedule_decays_at_the_milestones_and_checkpoints_carry_it(digits):
    attack = FlipAttack(**{**SMALL, "expert_lr": 0.1, "expert_lr_milestones": (1, 2), "n_experts": 1,
                           "expert_epochs": 3})
    steps_per_epoch = math.ceil(len(digits.y_train) / attack.expert_batch_size)
    plan = [(0, steps_per_epoch - 1), (0, steps_per_epoch + 1), (0, 2 * steps_per_epoch + 1)]
    new_model = lambda seed: build_model("mlp", digits.in_shape, 10, {"hidden": 64}, seed=seed)  # noqa: E731
    kept = train_experts(new_model, digits.x_train, digits.y_train, attack, plan, CPU)
    assert [kept[p].lr for p in plan] == pytest.approx([0.1, 0.01, 0.001])


def test_expert_and_student_draw_independent_dropout_masks(digits, monkeypatch):
    seeds = []
    original = experts_module._forward

    def spy(model, theta, buffers, x, dropout_seed):
        seeds.append(dropout_seed)
        return original(model, theta, buffers, x, dropout_seed)

    monkeypatch.setattr(experts_module, "_forward", spy)
    attack = FlipAttack(**{**SMALL, "iterations": 1, "n_experts": 1, "expert_epochs": 2})
    flip_module.compute_artifact(digits, attack, CPU)
    expert, student = seeds[0::2], seeds[1::2]
    assert len(expert) == len(student) > 0
    assert all(e != s for e, s in zip(expert, student))
