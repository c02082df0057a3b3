"""preact_resnet18 (BackdoorBench's PreAct-ResNet-18) and torchvision:<name> models: shapes on small colour and
grey inputs, the head being the last linear layer, a seeded train step through the normal trial path, and
their names in `poisonsweep list` and the config checker."""

import pytest
import torch
from torch import nn

from poisonsweep.engine.config import ConfigError, sweep_from_mapping
from poisonsweep.tasks.models import MODELS, build_model
from poisonsweep.tasks.models_zoo import PreActBlock


def sweep(model: dict, **extra):
    return sweep_from_mapping({"name": "t", "model": model, "detectors": ["loss"], **extra})


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (1, 8, 8)])
def test_preact_resnet18_shapes_and_head(shape):
    model = build_model("preact_resnet18", shape, 10, seed=0).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        assert model(x).shape == (2, 10) and model.features(x).shape == (2, 512)
        assert torch.equal(model(x), model.head(model.features(x)))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [model.head] and (model.head.in_features, model.head.out_features) == (512, 10)


def test_preact_resnet18_has_backdoorbenchs_layers():
    model = build_model("preact_resnet18", (3, 32, 32), 10)
    # 11,171,146 parameters: PreAct-ResNet-18 for CIFAR-10, counted by hand (stem 1,728; stages 147,968 +
    # 525,184 + 2,098,944 + 8,392,192; head 5,130) and the figure published for this architecture
    assert sum(p.numel() for p in model.parameters()) == 11_171_146
    blocks = [m for m in model.modules() if isinstance(m, PreActBlock)]
    assert [b.conv1.out_channels for b in blocks] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [b.conv1.stride[0] for b in blocks] == [1, 1, 2, 1, 2, 1, 2, 1]
    assert [b.shortcut is not None for b in blocks] == [False, False, True, False, True, False, True, False]
    stem = model.features[0]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (3, 64, (3, 3), (1, 1))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.features[-3:])  # no BN after the last block


def test_preact_block_is_residual():
    """With its second convolution zeroed, a block that keeps the shape passes its input through unchanged."""
    block = PreActBlock(8, 8, 1).eval()
    nn.init.zeros_(block.conv2.weight)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(block(x), x)


def test_preact_resnet18_trains_one_epoch_on_digits_through_the_trial_path():
    from poisonsweep.tasks.trial import run_resolved_trial

    trial = sweep({"name": "preact_resnet18"}, data={"name": "digits", "n_train": 32, "n_test": 10},
                  train={"epochs": 1, "batch_size": 32}).trials[0]
    row = run_resolved_trial(trial).tables["trials"][0]
    assert 0 < row["train_loss"] < 10 and 0 <= row["clean_test_acc"] <= 1


@pytest.mark.parametrize("name, shape", [("resnet34", (1, 28, 28)), ("resnet34", (3, 32, 32)),
                                         ("mobilenet_v3_small", (1, 28, 28)), ("shufflenet_v2_x0_5", (3, 32, 32))])
def test_torchvision_models_on_small_colour_and_grey_inputs(name, shape):
    model = build_model(f"torchvision:{name}", shape, 7, seed=0).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        assert model(x).shape == (2, 7) and torch.equal(model(x), model.head(model.features(x)))
        assert model.features(x).shape == (2, model.head.in_features)
    first_conv = next(m for m in model.features.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == shape[0]
    assert not any(isinstance(m, nn.Linear) and m.out_features == 7 for m in model.features.modules())


def test_torchvision_head_is_torchvisions_last_linear_layer():
    """Our split model, loaded into torchvision's own resnet18, gives the same output: head is its fc."""
    import torchvision

    model = build_model("torchvision:resnet18", (3, 32, 32), 5, {"stem": "keep"}, seed=3).eval()
    reference = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    state = {k.removeprefix("features."): v for k, v in model.state_dict().items() if k.startswith("features.")}
    state.update({"fc.weight": model.head.weight, "fc.bias": model.head.bias})
    reference.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert model.head.in_features == 512


def test_small_stem_is_cifar_style_and_keep_is_imagenet_style():
    small = build_model("torchvision:resnet18", (1, 28, 28), 10)
    assert (small.features.conv1.kernel_size, small.features.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(small.features.maxpool, nn.Identity)
    kept = build_model("torchvision:resnet18", (1, 28, 28), 10, {"stem": "keep"})
    assert (kept.features.conv1.in_channels, kept.features.conv1.kernel_size) == (1, (7, 7))
    assert isinstance(kept.features.maxpool, nn.MaxPool2d)


def test_torchvision_models_that_cannot_be_split_or_fed_say_why():
    with pytest.raises(ValueError, match=r"torchvision:squeezenet1_0 has no nn.Linear layer"):
        build_model("torchvision:squeezenet1_0", (3, 32, 32), 10)
    with pytest.raises(ValueError, match=r"torchvision:vit_b_16 cannot take 3x32x32 images"):
        build_model("torchvision:vit_b_16", (3, 32, 32), 10)


def test_config_checker_knows_both_and_validates_the_torchvision_prefix():
    assert sweep({"name": "preact_resnet18"}).trials[0]["model"] == {"name": "preact_resnet18", "params": {}}
    trial = sweep({"name": "torchvision:resnet34"}).trials[0]
    assert trial["model"] == {"name": "torchvision:resnet34", "params": {"stem": "auto"}}
    for bad in ("torchvision:resnet343", "torchvision:<name>", "torchvision:"):
        with pytest.raises(ConfigError) as info:
            sweep({"name": bad})
        assert f"model.name must be one of keras_cnn, mlp, preact_resnet18, resnet18, torchvision:<name>; got {bad!r}" \
            in str(info.value)
    with pytest.raises(ConfigError, match=r"model.params.stem must be one of 'auto', 'small', 'keep'; got 'big'"):
        sweep({"name": "torchvision:resnet34", "params": {"stem": "big"}})
    assert "torchvision:resnet34" in MODELS and "torchvision:fasterrcnn_resnet50_fpn" not in MODELS  # not a classifier


def test_list_shows_both():
    from typer.testing import CliRunner

    from poisonsweep.engine.cli import app

    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for text in ("preact_resnet18", "torchvision:<name>", "stem='auto'", "arrays", "image_folder", "gtsrb", "svhn",
                 "cifar100", "path='…'"):
        assert text in result.output, text


@pytest.mark.parametrize("name", ["preact_resnet18", "torchvision:resnet18"])
def test_initial_weights_follow_the_seed(name):
    first, again, other = (build_model(name, (1, 28, 28), 10, seed=s).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["head.weight"], other["head.weight"])


def test_the_data_check_refuses_a_model_that_cannot_take_the_datas_images_before_any_trial():
    from poisonsweep.engine.config import check_data

    checked = sweep({"name": "keras_cnn"}, data={"name": "digits"},
                    sweep={"model.name": ["keras_cnn", "torchvision:squeezenet1_0", "preact_resnet18"]})
    with pytest.raises(ConfigError) as info:
        check_data(checked)
    text = str(info.value)
    assert "model.name 'torchvision:squeezenet1_0' on digits (1x8x8 images): torchvision:squeezenet1_0 has no " \
           "nn.Linear layer" in text
    assert "keras_cnn" not in text and "preact_resnet18" not in text
