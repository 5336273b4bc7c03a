"""Models for the end-to-end benchmark and the trainer, built here so that nothing needs torchvision.

``resnet50()`` is torchvision's ResNet-50 (v1.5: stride in the 3x3 convolution): its layout and parameter names
(checked against ``param_sets.resnet50``) and its default initialisation (``zero_init_residual=False``): convolutions
``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BatchNorm weight 1 and bias 0, the classifier
``nn.Linear``'s own default. Modules are built in torchvision's order (a block's downsample before its
convolutions), so the same seed gives the same weights. ``get_model`` always builds it here: a run does not
depend on whether torchvision is installed. ``resnet_tiny()`` is the same code with one narrow block per stage,
for CPU tests.
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out = width * self.expansion
        downsample = None  # built first and registered last, as torchvision does
        if stride != 1 or inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], widths: tuple[int, ...], num_classes: int = 1000,
                 stem: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = stem
        for i, (n, width) in enumerate(zip(blocks, widths), start=1):
            layer = []
            for b in range(n):
                layer.append(Bottleneck(inplanes, width, stride=2 if b == 0 and i > 1 else 1))
                inplanes = width * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes)


def resnet_tiny(num_classes: int = 10) -> ResNet:
    return ResNet((1, 1), (8, 16), num_classes, stem=8)


def get_model(arch: str, num_classes: int) -> nn.Module:
    """``resnet50`` (torchvision's ResNet-50, built here whether or not torchvision imports) or ``resnet_tiny``."""
    if arch == "resnet50":
        return resnet50(num_classes)
    if arch == "resnet_tiny":
        return resnet_tiny(num_classes)
    raise ValueError(f"unknown arch {arch!r}; choose resnet50 or resnet_tiny")
