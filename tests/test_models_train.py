"""Models expose their penultimate features; training is seeded and reproducible."""

import numpy as np
import pytest
import torch

from poisonsweep.tasks.models import MODELS, build_model
from poisonsweep.tasks.train import TrainConfig, extract_features, predict_logits, train_model


@pytest.mark.parametrize("name,shape", [("keras_cnn", (1, 8, 8)), ("keras_cnn", (3, 32, 32)),
                                        ("mlp", (1, 8, 8)), ("resnet18", (3, 16, 16))])
def test_forward_is_head_of_features(name, shape):
    model = build_model(name, shape, 10, seed=0).eval()
    x = torch.rand(4, *shape)
    with torch.no_grad():
        assert torch.allclose(model(x), model.head(model.features(x)))
    assert model.features(x).shape == (4, model.head.in_features)


@pytest.mark.slow  # a second or more of training
@pytest.mark.parametrize("name,shape", [("keras_cnn", (1, 28, 28)), ("resnet18", (3, 16, 16))])
def test_fast_inference_layout_matches_the_plain_forward_and_leaves_the_model_alone(name, shape):
    model = build_model(name, shape, 10, seed=0).eval()
    x = torch.rand(300, *shape)  # more than one CPU inference batch
    with torch.no_grad():
        plain = model(x)
    torch.testing.assert_close(predict_logits(model, x), plain, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.as_tensor(extract_features(model, x), dtype=torch.float32),
                               model.features(x).detach(), atol=1e-5, rtol=1e-4)
    assert all(p.is_contiguous() for p in model.parameters())  # the channels-last copy was a copy


def test_keras_cnn_has_the_reference_layers():
    model = build_model("keras_cnn", (1, 28, 28), 10)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (3, 3)), (64, (3, 3))]
    dense = [m for m in model.features if isinstance(m, torch.nn.Linear)]
    assert dense[0].in_features == 64 * 12 * 12 and dense[0].out_features == 128
    assert model.head.out_features == 10


def test_same_seed_same_weights_and_training():
    x = torch.rand(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    config = TrainConfig(epochs=2, batch_size=16, lr=0.01)
    runs = []
    for _ in range(2):
        model = build_model("keras_cnn", (1, 8, 8), 10, seed=1)
        history = train_model(model, x, y, config, seed=1)
        runs.append((history.loss, extract_features(model, x)))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    other = build_model("keras_cnn", (1, 8, 8), 10, seed=2)
    train_model(other, x, y, config, seed=2)
    assert not np.array_equal(extract_features(other, x), runs[0][1])


def test_training_learns_a_separable_problem_and_keeps_checkpoints():
    torch.manual_seed(0)
    y = torch.randint(0, 2, (200,))
    x = torch.rand(200, 1, 8, 8) * 0.2
    x[y == 1, :, :4] += 0.8
    model = build_model("mlp", (1, 8, 8), 2, seed=0)
    history = train_model(model, x, y, TrainConfig(epochs=5, batch_size=32, lr=0.01), seed=0, keep_checkpoints=True)
    assert history.accuracy[-1] > 0.95
    assert len(history.checkpoints) == 5 and history.checkpoints[0][0] == 0.01


def test_bad_train_config_names_the_key():
    with pytest.raises(ValueError, match="train.lr"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="train.optimizer"):
        TrainConfig(optimizer="rmsprop")


def test_registry_lists_models_and_rejects_unknown_names():
    assert {"keras_cnn", "mlp", "resnet18"} <= set(MODELS.names())
    with pytest.raises(ValueError, match="keras_cnn"):
        build_model("vgg", (1, 8, 8), 10)


def test_a_trial_whose_loss_ends_far_above_a_uniform_guess_fails_as_diverged():
    # issue 22: train.lr 1e6 on digits ends at a finite loss of ~1e22 with chance accuracy, once recorded ok
    from poisonsweep.engine.config import build_sweep
    from poisonsweep.tasks.train import TrainingDiverged
    from poisonsweep.tasks.trial import run_resolved_trial

    config = {"name": "t", "data": {"name": "digits", "n_train": 100, "n_test": 20},
              "poison": {"method": "one_shift", "rate": 0.1}, "model": {"name": "mlp"},
              "train": {"epochs": 2, "lr": 1e6}, "detectors": ["loss"]}  # epoch 1 means pre-step losses
    with pytest.raises(TrainingDiverged, match=r"training diverged: final loss \S+ > 2·ln K = 4.61 \(K = 10"):
        run_resolved_trial(build_sweep(config).trials[0])
    config["train"]["lr"] = 1e-3  # the same trial at a sane step size stays below 2 ln K
    assert run_resolved_trial(build_sweep(config).trials[0]).tables["trials"][0]["train_loss"] < 2 * np.log(10)


@pytest.mark.parametrize("loss, num_classes, fails", [
    (4.6, 10, False), (4.61, 10, True), (float("nan"), 10, True), (float("inf"), 2, True),
    (1.38, 2, False), (1.39, 2, True)])
def test_the_divergence_rule_is_twice_ln_k(loss, num_classes, fails):
    from poisonsweep.tasks.train import DIVERGED_LOSS_FACTOR, TrainingDiverged, check_not_diverged

    assert DIVERGED_LOSS_FACTOR == 2.0
    if fails:
        with pytest.raises(TrainingDiverged):
            check_not_diverged(loss, num_classes)
    else:
        check_not_diverged(loss, num_classes)
