"""Model builders. Every model splits into ``features`` (the penultimate activations the
detectors read) and ``head`` (the final linear layer), and ``forward = head(features(x))``."""

from __future__ import annotations

from numbers import Integral, Real

import torch
from torch import nn

from poisonsweep.tasks import models_zoo
from poisonsweep.tasks.models_zoo import SplitModel as SplitModel  # its public home (plugins import it from here)
from poisonsweep.tasks.registry import ConfigError, Entry, Interval, Registry


class ModelRegistry(Registry):
    """The model registry, which also knows every ``torchvision:<name>`` (torchvision's classification models,
    looked up when named, so that torchvision is imported only by a config that uses one)."""

    def names(self) -> list[str]:
        return super().names() + [models_zoo.TORCHVISION_PATTERN]

    def __contains__(self, name: str) -> bool:
        if isinstance(name, str) and name.startswith(models_zoo.TORCHVISION_PREFIX):
            try:
                models_zoo.torchvision_entry(name)
            except ConfigError:
                return False
            return True
        return super().__contains__(name)

    def get(self, name: str) -> Entry:
        if name == models_zoo.TORCHVISION_PATTERN:
            return models_zoo.PATTERN_ENTRY  # what ``poisonsweep list`` shows; building it says to name a model
        if isinstance(name, str) and name.startswith(models_zoo.TORCHVISION_PREFIX):
            return models_zoo.torchvision_entry(name)
        return super().get(name)


MODELS = ModelRegistry("model")


def _conv_out(size: int) -> int:
    # two unpadded 3x3 convolutions, then 2x2 max-pooling
    return (size - 4) // 2


@MODELS.register(
    "keras_cnn",
    {"width": [Interval(Integral, 1)], "hidden": [Interval(Integral, 1)], "dropout": [Interval(Real, 0, 1, "left")]},
)
def keras_cnn(in_shape: tuple[int, int, int], num_classes: int, *, width: int = 32, hidden: int = 128,
              dropout: float = 0.25) -> SplitModel:
    """The basic Keras MNIST CNN: Conv32-Conv64-MaxPool-Dropout-Dense128-Dropout-DenseK."""
    channels, height, width_px = in_shape
    if min(height, width_px) < 6:
        raise ValueError(f"keras_cnn needs images of at least 6x6 pixels; got {height}x{width_px}")
    flat = 2 * width * _conv_out(height) * _conv_out(width_px)
    features = nn.Sequential(
        nn.Conv2d(channels, width, 3), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(dropout), nn.Flatten(),
        nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(2 * dropout),
    )
    return SplitModel(features, nn.Linear(hidden, num_classes))


@MODELS.register("mlp", {"hidden": [Interval(Integral, 1)], "depth": [Interval(Integral, 1)]})
def mlp(in_shape: tuple[int, int, int], num_classes: int, *, hidden: int = 256, depth: int = 2) -> SplitModel:
    """A fully connected ReLU network on the flattened image."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_shape[0] * in_shape[1] * in_shape[2]
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return SplitModel(nn.Sequential(*layers), nn.Linear(width, num_classes))


class _ResNetFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.relu(n.bn1(n.conv1(x)))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)


@MODELS.register("resnet18")
def resnet18(in_shape: tuple[int, int, int], num_classes: int) -> SplitModel:
    """ResNet-18, CIFAR variant: 3x3 stem with stride 1 and no max-pool."""
    from torchvision.models.resnet import BasicBlock, ResNet  # imported here: torchvision is slow to import

    net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    head = net.fc
    net.fc = nn.Identity()
    return SplitModel(_ResNetFeatures(net), head)


MODELS.register("preact_resnet18")(models_zoo.preact_resnet18)


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int, params: dict | None = None,
                seed: int = 0) -> SplitModel:
    """Build a registered model with seeded initial weights."""
    entry = MODELS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.fn(tuple(in_shape), num_classes, **(params or {}))
