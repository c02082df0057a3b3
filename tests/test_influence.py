"""Influence functions against independent truth: autograd loops, torch.func.hessian, LOO retraining."""

from __future__ import annotations

import ast
import copy
import inspect
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn

import poisonsweep.tasks.detect.influence as detect_influence
from poisonsweep.tasks import influence as infl
from poisonsweep.tasks.influence import scoring as infl_scoring
from poisonsweep.tasks.data import load_dataset
from poisonsweep.tasks.detect.base import DETECTORS, DetectionContext, serial_map
from poisonsweep.tasks.detect.influence import choose_test_points, influence_rows
from poisonsweep.tasks.models import SplitModel, build_model
from poisonsweep.tasks.train import TrainConfig, train_model

ATOL = 1e-10  # float64 gradients and Hessians, computed two ways



@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", n_train=200, n_test=50, seed=0)


@pytest.fixture(scope="module")
def small_mlp(digits):
    """A non-convex model small enough for the exact Hessian of all its 610 parameters."""
    model = build_model("mlp", digits.in_shape, 10, {"hidden": 8, "depth": 1}, seed=0)
    train_model(model, digits.x_train, digits.y_train, TrainConfig(epochs=40, batch_size=32, lr=1e-2), seed=0)
    return model


def _autograd_grads(model, names, x, y):
    """Brute force: one autograd.grad call per sample, on a float64 copy of the model."""
    model = copy.deepcopy(model).double().eval()
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i:i + 1].double()), y[i:i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_select_parameters_by_subset():
    model = build_model("mlp", (1, 8, 8), 10, {"hidden": 4, "depth": 2}, seed=0)
    assert infl.select_parameters(model, "last_layer") == ["head.weight", "head.bias"]
    assert infl.select_parameters(model, "last_k_layers", 2) == ["features.3.weight", "features.3.bias",
                                                                 "head.weight", "head.bias"]
    assert infl.select_parameters(model, "all") == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("subset,k", [("last_layer", 1), ("last_k_layers", 2), ("all", 1)])
def test_per_sample_grads_equal_a_per_sample_autograd_loop(digits, subset, k):
    model = build_model("keras_cnn", digits.in_shape, 10, {"width": 2, "hidden": 8}, seed=1).double()
    names = infl.select_parameters(model, subset, k)
    gm = infl.gradient_model(model, names)
    x, y = digits.x_train[:12], digits.y_train[:12]
    fast = infl.per_sample_grads(gm, gm.prepare(x.double()), y, batch_size=5)  # batches of 5 cover the seam
    assert (gm.body is not None) == (subset == "last_layer")
    torch.testing.assert_close(fast, _autograd_grads(model, names, x, y), atol=ATOL, rtol=0)


def test_linear_head_hessian_equals_torch_func_hessian(digits, small_mlp):
    gm = infl.gradient_model(small_mlp, infl.select_parameters(small_mlp, "last_layer"))
    features = gm.prepare(digits.x_train)
    fast = infl.linear_head_hessian(gm, features, chunk=64)
    truth = torch.func.hessian(lambda theta: gm.loss(gm.split(theta), features, digits.y_train))(gm.theta)
    torch.testing.assert_close(fast, truth, atol=ATOL, rtol=0)


def test_explicit_hessian_from_hvps_equals_torch_func_hessian(digits, small_mlp):
    gm = infl.gradient_model(small_mlp, infl.select_parameters(small_mlp, "all"))
    x, y = gm.prepare(digits.x_train[:60]), digits.y_train[:60]
    truth = torch.func.hessian(lambda theta: gm.loss(gm.split(theta), x, y))(gm.theta)
    torch.testing.assert_close(infl.hessian_matrix(gm, x, y), truth, atol=ATOL, rtol=0)


ITERATIVE = {
    "cg": {"cg_tol": 1e-8},
    "lissa": {"lissa_depth": 200, "lissa_batch_size": 64},
    "arnoldi": {"arnoldi_iters": 100, "arnoldi_rank": 60},
}


@pytest.mark.parametrize("solver", sorted(ITERATIVE))
def test_iterative_self_influence_agrees_with_exact(digits, small_mlp, solver):
    gm = infl.gradient_model(small_mlp, infl.select_parameters(small_mlp, "all"))
    x, y = gm.prepare(digits.x_train), digits.y_train
    grads = infl.per_sample_grads(gm, x[:40], y[:40])
    damping = 0.1  # above the most negative Hessian eigenvalue of this non-convex model
    exact = infl.exact_inverse(infl.hessian_matrix(gm, x, y), damping).self_influence(grads).numpy()
    settings = infl.SolverSettings(solver=solver, damping=damping, **ITERATIVE[solver])
    approx = infl_scoring._fit_inverse(gm, x, y, settings, seed=0).self_influence(grads).numpy()
    relative_error = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    print(f"{solver}: Spearman {spearmanr(approx, exact)[0]:.4f}, relative error {relative_error:.2e}")
    assert spearmanr(approx, exact)[0] >= 0.95
    if solver == "cg":
        assert relative_error < 1e-6


def test_float32_closed_form_exact_matches_float64_brute_force(digits):
    """The default exact path on a float32 head (closed-form gradients and Hessian, float32 triangular
    solves) against float64 autograd gradients, torch.func.hessian and a dense solve."""
    model = build_model("keras_cnn", digits.in_shape, 10, {"width": 4, "hidden": 16}, seed=0)
    train_model(model, digits.x_train, digits.y_train, TrainConfig(epochs=15, batch_size=32, lr=1e-2), seed=0)
    x, y = digits.x_train, digits.y_train
    settings = infl.SolverSettings(solver="exact", damping=0.01)
    payload = infl.fit_influence(model, x, y, settings)
    assert payload.terms[0].gm.dtype == torch.float32 and payload.terms[0].gm.is_linear_head
    fast = infl.score_influence(payload, lambda fn, shared, shards: [fn(shared, s) for s in shards], 64)

    names = infl.select_parameters(model, "last_layer")
    model64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        features = model64.features(x.double())
    head = {n: p.detach() for n, p in model64.head.named_parameters()}
    theta = torch.cat([head["weight"].reshape(-1), head["bias"]])

    def mean_loss(flat):
        weight, bias = flat[:head["weight"].numel()].reshape(head["weight"].shape), flat[head["weight"].numel():]
        return nn.functional.cross_entropy(features @ weight.T + bias, y)

    H = torch.func.hessian(mean_loss)(theta) + 0.01 * torch.eye(len(theta), dtype=torch.float64)
    grads = _autograd_grads(model, names, x, y)
    truth = (grads * torch.linalg.solve(H, grads.T).T).sum(1).numpy()
    relative_error = np.linalg.norm(fast.self_influence - truth) / np.linalg.norm(truth)
    print(f"float32 closed form vs float64 brute force: relative error {relative_error:.2e}")
    assert relative_error < 1e-4
    assert spearmanr(fast.self_influence, truth)[0] > 0.9999


def _logistic_regression_fit(model, x, y, l2, drop=None):
    """Minimise (1/n) sum_{j != drop} CE_j + l2/2 ||theta||^2 to convergence (LBFGS, float64, warm start)."""
    weights = torch.ones(len(x), dtype=torch.float64)
    if drop is not None:
        weights[drop] = 0.0
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        loss = (weights * losses).sum() / len(x) + l2 / 2 * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


@pytest.mark.slow  # a second or more of training
def test_exact_influence_predicts_leave_one_out_retraining():
    """Koh & Liang Fig. 2: on a convex model the predicted and the retrained loss changes agree."""
    data = load_dataset("digits", n_train=300, n_test=100, seed=0)
    x, y, l2 = data.x_train.double(), data.y_train, 1e-2
    torch.manual_seed(0)
    model = _logistic_regression_fit(SplitModel(nn.Flatten(), nn.Linear(64, 10)).double(), x, y, l2)

    def loss_of(m, xs, ys):
        with torch.no_grad():
            return nn.functional.cross_entropy(m(xs.double()), ys, reduction="none").numpy()

    test = int(np.argmax(loss_of(model, data.x_test, data.y_test)))  # a misclassified test point
    xt, yt = data.x_test[test:test + 1], data.y_test[test:test + 1]
    settings = infl.SolverSettings(solver="exact", damping=0.0, l2=l2)
    payload = infl.fit_influence(model, data.x_train, y, settings, x_test=xt, y_test=yt)
    scores = infl.score_influence(payload, serial_map, shard_size=64)
    predicted = scores.test_influence[0]
    chosen = np.argsort(-np.abs(predicted), kind="stable")[:30]
    test_change, own_change = [], []
    for i in chosen:
        retrained = _logistic_regression_fit(copy.deepcopy(model), x, y, l2, drop=int(i))
        test_change.append(loss_of(retrained, xt, yt)[0] - loss_of(model, xt, yt)[0])
        own_change.append(loss_of(retrained, x[i:i + 1], y[i:i + 1])[0] - loss_of(model, x[i:i + 1], y[i:i + 1])[0])
    print(f"test loss: Pearson {pearsonr(predicted[chosen], test_change)[0]:.4f}; own loss: Pearson "
          f"{pearsonr(scores.self_influence[chosen], own_change)[0]:.4f}")
    assert pearsonr(predicted[chosen], test_change)[0] >= 0.9
    # self-influence / n predicts the increase of the sample's own loss when it is left out
    assert pearsonr(scores.self_influence[chosen] / len(x), own_change)[0] >= 0.9


def test_tracin_and_grad_norm_equal_brute_force_sums(digits):
    model = build_model("mlp", digits.in_shape, 10, {"hidden": 6, "depth": 1}, seed=0)
    history = train_model(model, digits.x_train, digits.y_train, TrainConfig(epochs=3, lr=5e-3), seed=0,
                          keep_checkpoints=True)
    x, y, xt, yt = digits.x_train[:30], digits.y_train[:30], digits.x_test[:4], digits.y_test[:4]
    names = infl.select_parameters(model, "last_k_layers", 2)
    payload = infl.fit_influence(model, x, y, infl.SolverSettings(solver="tracin"), params="last_k_layers", k=2,
                                 x_test=xt, y_test=yt, checkpoints=history.checkpoints)
    tracin = infl.score_influence(payload, serial_map, shard_size=7)
    self_truth, test_truth = np.zeros(30), np.zeros((4, 30))
    for lr, state in history.checkpoints:
        snapshot = copy.deepcopy(model)
        snapshot.load_state_dict(state)
        g, gt = _autograd_grads(snapshot, names, x, y), _autograd_grads(snapshot, names, xt, yt)
        self_truth += lr * (g ** 2).sum(1).numpy()
        test_truth += lr * (gt @ g.T).numpy()
    np.testing.assert_allclose(tracin.self_influence, self_truth, rtol=1e-9)
    np.testing.assert_allclose(tracin.test_influence, test_truth, rtol=1e-9, atol=1e-14)

    grad_norm = infl.score_influence(infl.fit_influence(model, x, y, infl.SolverSettings(solver="grad_norm"),
                                                        params="all"), serial_map)
    g = _autograd_grads(model, infl.select_parameters(model, "all"), x, y)
    np.testing.assert_allclose(grad_norm.self_influence, (g ** 2).sum(1).numpy(), rtol=1e-9)


def test_failing_solvers_say_which_knob_to_turn(digits, small_mlp):
    gm = infl.gradient_model(small_mlp, infl.select_parameters(small_mlp, "all"))
    x, y = gm.prepare(digits.x_train), digits.y_train
    H = infl.hessian_matrix(gm, x, y)
    assert torch.linalg.eigvalsh(H).min() < 0  # the MLP is non-convex
    with pytest.raises(infl.InfluenceSolverError, match="raise damping"):
        infl.exact_inverse(H, 0.0)
    grads = infl.per_sample_grads(gm, x[:5], y[:5])
    too_small = infl.SolverSettings(solver="lissa", damping=0.1, lissa_scale=0.05, lissa_depth=200)
    with pytest.raises(infl.InfluenceSolverError, match="raise lissa_scale"):
        infl_scoring._fit_inverse(gm, x, y, too_small, seed=0).solve(grads)
    too_few = infl.SolverSettings(solver="cg", damping=0.1, cg_maxiter=2, cg_tol=1e-10)
    with pytest.raises(infl.InfluenceSolverError, match="raise cg_maxiter"):
        infl_scoring._fit_inverse(gm, x, y, too_few, seed=0).solve(grads)


def test_a_lissa_too_shallow_to_converge_warns_with_the_depth_it_needs(digits, small_mlp):
    gm = infl.gradient_model(small_mlp, infl.select_parameters(small_mlp, "all"))
    x, y = gm.prepare(digits.x_train), digits.y_train
    grads = infl.per_sample_grads(gm, x[:5], y[:5])
    shallow = infl.SolverSettings(solver="lissa", damping=0.1, lissa_scale=10.0, lissa_depth=20)
    # (1 - 0.1/10)^20 = 82 % of the slowest error left; 10 % needs ln(0.1)/ln(0.99) = 230 steps
    with pytest.warns(infl.LissaNotConverged, match="82% of the error .* raise lissa_depth to at least 230"):
        infl_scoring._fit_inverse(gm, x, y, shallow, seed=0).solve(grads)
    deep = infl.SolverSettings(solver="lissa", damping=0.1, lissa_scale=10.0, lissa_depth=230)
    with warnings.catch_warnings():
        warnings.simplefilter("error", infl.LissaNotConverged)
        infl_scoring._fit_inverse(gm, x, y, deep, seed=0).solve(grads)


def test_influence_rows_list_top_harmful_and_helpful_by_sign():
    values = np.array([[0.3, -0.2, 0.0, -0.5, 0.1], [-0.1, -0.4, -0.3, -0.2, -0.05]])
    rows = influence_rows(values, np.array([7, 9]), top_k=2)
    as_tuples = [(r["test_index"], r["kind"], r["rank"], r["train_index"]) for r in rows]
    assert as_tuples == [(7, "harmful", 1, 3), (7, "harmful", 2, 1), (7, "helpful", 1, 0), (7, "helpful", 2, 4),
                         (9, "harmful", 1, 1), (9, "harmful", 2, 2)]
    assert rows[0]["influence"] == -0.5


def test_choose_test_points_is_seeded_and_checks_lists():
    assert np.array_equal(choose_test_points(100, 5, seed=3), choose_test_points(100, 5, seed=3))
    assert len(set(choose_test_points(100, 5, seed=3))) == 5
    assert choose_test_points(100, [4, 2], seed=0).tolist() == [4, 2]
    with pytest.raises(ValueError, match="outside"):
        choose_test_points(10, [3, 10], seed=0)


def test_detector_constraints_name_its_keyword_parameters():
    entry = DETECTORS.get("influence")
    keywords = {n for n, p in inspect.signature(entry.fn).parameters.items() if p.kind is p.KEYWORD_ONLY} - {"seed"}
    assert set(entry.constraints) == keywords
    assert entry.check_params("d", {"solver": "newton"}) and entry.check_params("d", {"lissa_scale": 0})
    assert not entry.check_params("d", {"solver": "tracin", "test_points": [1, 2], "lissa_scale": "auto"})


def test_detector_ranks_planted_label_flips_first(digits):
    """10 % of the labels flipped: self-influence must put them well above the clean samples."""
    rng = np.random.default_rng(0)
    labels = digits.y_train.numpy().copy()
    flipped = rng.choice(len(labels), size=20, replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, size=20)) % 10
    model = build_model("mlp", digits.in_shape, 10, {"hidden": 32, "depth": 1}, seed=0)
    train_model(model, digits.x_train, torch.as_tensor(labels), TrainConfig(epochs=30, batch_size=32, lr=3e-3),
                seed=0)
    context = DetectionContext(model=model, x_train=digits.x_train, labels=labels, num_classes=10,
                               x_test=digits.x_test, y_test=digits.y_test.numpy())
    detection = DETECTORS.get("influence").fn(context, seed=0, test_points=3, top_k=4, flag_rule="fraction",
                                              flag_fraction=0.1)
    again = DETECTORS.get("influence").fn(context, seed=0, test_points=3, top_k=4, flag_rule="fraction",
                                              flag_fraction=0.1)
    scores = detection.scores
    assert scores.dtype == np.float64 and scores.shape == (200,) and np.isfinite(scores).all()
    assert np.array_equal(scores, again.scores) and detection.flagged.sum() == 20
    is_flipped = np.isin(np.arange(200), flipped)
    ranks = scores.argsort().argsort()
    auroc = (ranks[is_flipped][:, None] > ranks[~is_flipped][None, :]).mean()
    assert auroc > 0.85
    rows = detection.extras["influence"]
    assert {r["test_index"] for r in rows} == set(choose_test_points(50, 3, seed=0).tolist())
    assert all((r["influence"] < 0) == (r["kind"] == "harmful") for r in rows)
    assert all(1 <= r["rank"] <= 4 for r in rows)


@pytest.mark.slow  # starts Ray or a subprocess
def test_tasks_influence_never_imports_ray():
    code = "import sys, poisonsweep.tasks.influence; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    # the detector module adds only tasks.* imports, none of which may be ray
    tree = ast.parse(pathlib.Path(detect_influence.__file__).read_text())
    imported = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [m for m in imported if m == "ray" or m.startswith("ray.")]
