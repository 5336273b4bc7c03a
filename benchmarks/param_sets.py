"""Parameter sets of well-known models, as (name, shape) lists built locally (no torchvision, nothing downloaded).

``resnet50()`` matches torchvision's ResNet-50: 25,557,032 elements in 161 tensors, 107 of them named ``weight``.
"""

from __future__ import annotations

import math

import torch


def resnet50(num_classes: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,)),
    ]
    inplanes = 64
    for li, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for bi in range(blocks):
            pre = f"layer{li}.{bi}"
            convs = ((width, inplanes, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1))
            for ci, shape in enumerate(convs, start=1):
                shapes += [(f"{pre}.conv{ci}.weight", shape), (f"{pre}.bn{ci}.weight", (shape[0],)),
                           (f"{pre}.bn{ci}.bias", (shape[0],))]
            if bi == 0:
                shapes += [(f"{pre}.downsample.0.weight", (4 * width, inplanes, 1, 1)),
                           (f"{pre}.downsample.1.weight", (4 * width,)), (f"{pre}.downsample.1.bias", (4 * width,))]
            inplanes = 4 * width
    shapes += [("fc.weight", (num_classes, 2048)), ("fc.bias", (num_classes,))]
    return shapes


PARAM_SETS = {"resnet50": resnet50}


def numel(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(math.prod(s) for _, s in shapes)


def make_params(
    shapes: list[tuple[str, tuple[int, ...]]], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters with random values and random gradients, named as in the model."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.05).to(device, dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device, dtype)
        out.append((name, p))
    return out
