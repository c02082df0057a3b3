"""Models of the backdoor benchmarks and of torchvision, split as every model here is: ``features`` (up to the
penultimate activations the detectors read) and ``head`` (the last linear layer).

- ``preact_resnet18``: the pre-activation ResNet-18 of BackdoorBench (``models/preact_resnet.py``), written here
  from its description: a 3x3 stride-1 stem of 64 channels, four stages of two ``PreActBlock`` (64, 128, 256,
  512 channels; stages 2-4 halve the size), adaptive average pooling and a linear head. As in BackdoorBench
  there is no batch norm between the last block and the pooling; the stem takes any channel count.
- ``torchvision:<name>``: any classification model of ``torchvision.models`` (``list_models(module=
  torchvision.models)``), built with ``weights=None`` and ``num_classes`` of the data. Its first convolution is
  rebuilt for the data's channel count, and, with ``stem="small"`` (``"auto"``: images of at most 64 pixels a
  side), as a 3x3 stride-1 convolution with the max-pool right after the stem removed, the CIFAR adaptation
  of ResNets. Its last ``nn.Linear`` becomes ``head``; a dry run on two images checks that ``head(features(x))``
  is the model's own output, so a model whose last linear layer is not its last step is refused.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from poisonsweep.tasks.registry import ConfigError, Entry, Options


class SplitModel(nn.Module):
    """A feature extractor followed by a linear head; the detectors read ``features``."""

    def __init__(self, features: nn.Module, head: nn.Linear):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


TORCHVISION_PREFIX = "torchvision:"
TORCHVISION_PATTERN = TORCHVISION_PREFIX + "<name>"
SMALL_IMAGE = 64  # "auto" stem: images of at most this many pixels a side get the small stem
# models whose default builds auxiliary classifiers: without them the forward pass returns one tensor
_NO_AUX = {"googlenet": {"aux_logits": False, "init_weights": True},
           "inception_v3": {"aux_logits": False, "init_weights": True}}


class PreActBlock(nn.Module):
    """He et al. (2016)'s pre-activation basic block: BN-ReLU-conv3x3 twice, plus the input; where the shape
    changes, the shortcut is a 1x1 convolution of the first pre-activation (as in BackdoorBench)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        reshapes = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False) if reshapes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        return self.conv2(F.relu(self.bn2(self.conv1(pre)))) + skip


def preact_resnet_features(in_channels: int, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512)) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
    channels = widths[0]
    for stage, (count, width) in enumerate(zip(blocks, widths)):
        for i in range(count):
            layers.append(PreActBlock(channels, width, 2 if stage > 0 and i == 0 else 1))
            channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def preact_resnet18(in_shape: tuple[int, int, int], num_classes: int):
    """PreAct-ResNet-18 as in BackdoorBench: 3x3 stem, PreActBlock x [2, 2, 2, 2], 64-512 channels."""
    return SplitModel(preact_resnet_features(in_shape[0]), nn.Linear(512, num_classes))


# ---------------------------------------------------------------------------- torchvision


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """The classification models of ``torchvision.models`` (not detection, segmentation or video)."""
    import torchvision.models

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _parent_and_name(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, name = _parent_and_name(root, path)
    setattr(parent, name, module)


def _adapt_stem(net: nn.Module, channels: int, small: bool) -> None:
    """Rebuild the first convolution for ``channels`` inputs (and, ``small``, as 3x3 stride 1), and, ``small``,
    drop a max-pool among the three modules after it (ResNet's ``maxpool``, DenseNet's ``pool0``...)."""
    leaves = [(path, m) for path, m in net.named_modules() if not list(m.children())]
    first = next((i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return
    path, conv = leaves[first]
    if conv.in_channels != channels or small:
        kernel, stride, padding = ((3, 3), 1, 1) if small else (conv.kernel_size, conv.stride, conv.padding)
        groups = conv.groups if channels % conv.groups == 0 else 1
        _replace(net, path, nn.Conv2d(channels, conv.out_channels, kernel, stride, padding, conv.dilation, groups,
                                      bias=conv.bias is not None))
    if small:
        for pool_path, module in leaves[first + 1:first + 4]:
            if isinstance(module, nn.MaxPool2d):
                _replace(net, pool_path, nn.Identity())
                break


def _check_split(name: str, net: nn.Module, head_path: str, in_shape: tuple[int, int, int]) -> nn.Linear:
    """Cut the last linear layer off ``net`` (in place) and check that ``head(net(x))`` is ``net``'s output."""
    x = torch.randn(2, *in_shape, generator=torch.Generator().manual_seed(0))
    head = net.get_submodule(head_path)
    net.eval()
    try:
        with torch.no_grad():
            whole = net(x)
            _replace(net, head_path, nn.Identity())
            features = net(x)
            split = head(features)
    except Exception as error:
        raise ValueError(f"{TORCHVISION_PREFIX}{name} cannot take {'x'.join(map(str, in_shape))} images: "
                         f"{type(error).__name__}: {' '.join(str(error).split())[:300]}") from error
    finally:
        net.train()
    if not isinstance(whole, torch.Tensor) or features.shape != (2, head.in_features) or not torch.allclose(
            whole, split, atol=1e-5, rtol=1e-4):
        raise ValueError(f"{TORCHVISION_PREFIX}{name}'s last linear layer ({head_path}) is not its last step, so "
                         "it cannot serve as the head the detectors read features before")
    return head


def torchvision_model(name: str, in_shape: tuple[int, int, int], num_classes: int, *, stem: str = "auto"):
    """torchvision's ``name`` with ``weights=None``, its first conv fitted to the data, its last linear as head."""
    import torchvision.models

    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_NO_AUX.get(name, {}))
    small = stem == "small" or (stem == "auto" and min(in_shape[1:]) <= SMALL_IMAGE)
    _adapt_stem(net, in_shape[0], small)
    linears = [path for path, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{TORCHVISION_PREFIX}{name} has no nn.Linear layer to serve as the head")
    head = _check_split(name, net, linears[-1], tuple(in_shape))
    return SplitModel(net, head)


TORCHVISION_CONSTRAINTS = {"stem": [Options(("auto", "small", "keep"))]}
TORCHVISION_HELP = ("any torchvision classification model by name, e.g. torchvision:resnet34 (weights=None; first "
                    "conv fitted to the channels, stem 'small' for <= 64 px; last linear layer = head)")


def _pattern(in_shape, num_classes, *, stem: str = "auto"):
    raise ConfigError(f"{TORCHVISION_PATTERN} stands for a torchvision model: name one, e.g. torchvision:resnet34")


PATTERN_ENTRY = Entry(TORCHVISION_PATTERN, _pattern, TORCHVISION_CONSTRAINTS, TORCHVISION_HELP)


@functools.cache
def torchvision_entry(full_name: str) -> Entry:
    """The registry entry of ``torchvision:<name>``; ``ConfigError`` if torchvision has no such classifier."""
    name = full_name[len(TORCHVISION_PREFIX):]
    if name not in torchvision_names():
        raise ConfigError(f"unknown torchvision model {name!r} in model {full_name!r}; torchvision's classification "
                          f"models: {', '.join(torchvision_names())}")
    return Entry(full_name, functools.partial(torchvision_model, name), TORCHVISION_CONSTRAINTS,
                 f"torchvision.models.{name} (weights=None), last linear layer as head")
