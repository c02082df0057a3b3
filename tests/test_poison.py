"""Poisons against hand-checkable truth: exact counts, mappings, eligibility, success."""

import numpy as np
import pytest
import torch

from poisonsweep.tasks.data import Dataset
from poisonsweep.tasks.poisons import POISONS, apply_poison, apply_trigger, check_rate
from poisonsweep.tasks.metrics import poison_success
from poisonsweep.tasks.registry import ConfigError


def toy_data(n_per_class=20, k=10, size=8, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per_class)
    x = torch.rand(len(y), 1, size, size, generator=g) * 0.5
    return Dataset("toy", x, y, x[: 5 * k].clone(), y[: 5 * k].clone(), k)


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.33, 1.0])
def test_one_shift_flips_exactly_round_rate_n_to_the_next_class(rate):
    data = toy_data()
    p = apply_poison(data, "one_shift", rate=rate, seed=3)
    n = len(data.y_train)
    assert p.n_poisoned == round(rate * n)
    changed = (p.labels != data.y_train).numpy()
    np.testing.assert_array_equal(changed, p.is_poison)
    assert torch.equal(p.labels[p.is_poison], (data.y_train[p.is_poison] + 1) % 10)
    assert torch.equal(p.true_labels, data.y_train)
    assert torch.equal(p.x_train, data.x_train)  # a label flip never touches an image


def test_one_shift_shift_parameter_and_success_target():
    data = toy_data()
    p = apply_poison(data, "one_shift", rate=0.5, seed=0, params={"shift": 3})
    assert torch.equal(p.labels[p.is_poison], (data.y_train[p.is_poison] + 3) % 10)
    assert torch.equal(p.success_y, (data.y_test + 3) % 10)


def test_poisoned_indices_depend_only_on_the_seed():
    data = toy_data()
    a = apply_poison(data, "random_flip", rate=0.2, seed=5)
    b = apply_poison(data, "random_flip", rate=0.2, seed=5)
    c = apply_poison(data, "random_flip", rate=0.2, seed=6)
    assert np.array_equal(a.is_poison, b.is_poison) and torch.equal(a.labels, b.labels)
    assert not np.array_equal(a.is_poison, c.is_poison)


def test_random_flip_always_picks_another_label_and_covers_them():
    data = toy_data(n_per_class=100)
    p = apply_poison(data, "random_flip", rate=1.0, seed=1)
    assert (p.labels != data.y_train).all()
    offsets = ((p.labels - data.y_train) % 10).numpy()
    assert set(offsets) == set(range(1, 10))  # every other label is reachable


def test_pair_flip_takes_only_the_source_class_and_rejects_impossible_rates():
    data = toy_data()
    p = apply_poison(data, "pair_flip", rate=0.05, seed=0, params={"source": 2, "target": 7})
    assert p.n_poisoned == 10
    assert (data.y_train[p.is_poison] == 2).all() and (p.labels[p.is_poison] == 7).all()
    assert (p.success_y == 7).all() and len(p.success_x) == int((data.y_test == 2).sum())
    with pytest.raises(ConfigError, match="only 20 are eligible"):
        apply_poison(data, "pair_flip", rate=0.2, seed=0, params={"source": 2, "target": 7})


def test_check_rate_reports_impossible_rates_from_class_counts_alone():
    counts = [100] * 10
    assert check_rate("one_shift", 1.0, counts) is None
    assert "at most 0.1000" in check_rate("pair_flip", 0.2, counts, {"source": 1, "target": 2})
    assert check_rate("badnets", 0.9, counts, {"target": 0}) is None
    assert "eligible" in check_rate("badnets", 0.95, counts, {"target": 0})


def test_rate_outside_unit_interval_is_an_error():
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        apply_poison(toy_data(), "one_shift", rate=1.5, seed=0)


def test_badnets_all_to_one_stamps_the_patch_and_relabels_to_target():
    data = toy_data()
    p = apply_poison(data, "badnets", rate=0.1, seed=0, params={"target": 4, "patch_size": 3})
    assert p.n_poisoned == 20
    assert (data.y_train[p.is_poison] != 4).all() and (p.labels[p.is_poison] == 4).all()
    expected_patch = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert torch.equal(p.x_train[p.is_poison][:, 0, -3:, -3:], expected_patch.expand(20, 3, 3))
    assert torch.equal(p.x_train[~p.is_poison], data.x_train[~p.is_poison])
    # success is measured on triggered test images of the other classes
    assert len(p.success_x) == int((data.y_test != 4).sum()) and (p.success_y == 4).all()
    assert torch.equal(p.success_x[:, 0, -3:, -3:], expected_patch.expand(len(p.success_x), 3, 3))


def test_badnets_all_to_all_maps_each_class_to_the_next():
    data = toy_data()
    p = apply_poison(data, "badnets", rate=0.5, seed=0, params={"mode": "all_to_all"})
    assert torch.equal(p.labels[p.is_poison], (data.y_train[p.is_poison] + 1) % 10)
    assert torch.equal(p.success_y, (data.y_test + 1) % 10)


def test_trigger_square_is_all_ones():
    x = torch.zeros(2, 3, 8, 8)
    out = apply_trigger(x, trigger="square", patch_size=2)
    assert out[..., -2:, -2:].eq(1).all() and out[..., :-2, :].eq(0).all() and x.eq(0).all()


class ConstantModel(torch.nn.Module):
    def __init__(self, k, answer):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.nn.functional.one_hot(torch.tensor(answer), k).float() * 10)

    def forward(self, x):
        return self.bias.expand(len(x), -1)


def test_poison_success_counts_hits_and_misses():
    data = toy_data()
    p = apply_poison(data, "pair_flip", rate=0.05, seed=0, params={"source": 2, "target": 7})
    assert poison_success(ConstantModel(10, 7), p) == 1.0
    assert poison_success(ConstantModel(10, 2), p) == 0.0
    q = apply_poison(data, "random_flip", rate=0.1, seed=0)  # success = test error rate
    assert poison_success(ConstantModel(10, 0), q) == pytest.approx(float((data.y_test != 0).float().mean()))


def test_every_registered_poison_declares_constraints_for_real_parameters():
    for name in POISONS.names():
        entry = POISONS.get(name)
        assert entry.eligible is not None, name
