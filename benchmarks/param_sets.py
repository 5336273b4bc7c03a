"""Parameter sets of well-known models, as (name, shape) lists built locally (no torchvision, nothing downloaded).

``resnet50()`` matches torchvision's ResNet-50: 25,557,032 elements in 161 tensors, 107 of them named ``weight``.
``vit_b16()`` matches torchvision's ViT-B/16: 86,567,656 elements in 152 tensors.
``gpt2_medium()`` matches GPT-2 medium (Hugging Face layout, LM head tied to the token embedding): 354,823,168
elements in 292 tensors. ``many_tensors(2000)``: 2,000 small tensors (host-cost scaling).
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


def vit_b16(num_classes: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    d, mlp, tokens = 768, 3072, (224 // 16) ** 2 + 1
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("class_token", (1, 1, d)), ("conv_proj.weight", (d, 3, 16, 16)), ("conv_proj.bias", (d,)),
        ("encoder.pos_embedding", (1, tokens, d)),
    ]
    for i in range(12):
        pre = f"encoder.layers.encoder_layer_{i}"
        shapes += [
            (f"{pre}.ln_1.weight", (d,)), (f"{pre}.ln_1.bias", (d,)),
            (f"{pre}.self_attention.in_proj_weight", (3 * d, d)), (f"{pre}.self_attention.in_proj_bias", (3 * d,)),
            (f"{pre}.self_attention.out_proj.weight", (d, d)), (f"{pre}.self_attention.out_proj.bias", (d,)),
            (f"{pre}.ln_2.weight", (d,)), (f"{pre}.ln_2.bias", (d,)),
            (f"{pre}.mlp.0.weight", (mlp, d)), (f"{pre}.mlp.0.bias", (mlp,)),
            (f"{pre}.mlp.3.weight", (d, mlp)), (f"{pre}.mlp.3.bias", (d,)),
        ]
    shapes += [("encoder.ln.weight", (d,)), ("encoder.ln.bias", (d,)),
               ("heads.head.weight", (num_classes, d)), ("heads.head.bias", (num_classes,))]
    return shapes


def gpt2_medium() -> list[tuple[str, tuple[int, ...]]]:
    d, vocab, positions = 1024, 50257, 1024
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (vocab, d)), ("wpe.weight", (positions, d))]
    for i in range(24):
        pre = f"h.{i}"
        shapes += [
            (f"{pre}.ln_1.weight", (d,)), (f"{pre}.ln_1.bias", (d,)),
            (f"{pre}.attn.c_attn.weight", (d, 3 * d)), (f"{pre}.attn.c_attn.bias", (3 * d,)),
            (f"{pre}.attn.c_proj.weight", (d, d)), (f"{pre}.attn.c_proj.bias", (d,)),
            (f"{pre}.ln_2.weight", (d,)), (f"{pre}.ln_2.bias", (d,)),
            (f"{pre}.mlp.c_fc.weight", (d, 4 * d)), (f"{pre}.mlp.c_fc.bias", (4 * d,)),
            (f"{pre}.mlp.c_proj.weight", (4 * d, d)), (f"{pre}.mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def resnet_tiny() -> list[tuple[str, tuple[int, ...]]]:
    """``benchmarks.models.resnet_tiny``'s parameters: a few thousand elements, for smoke runs and CI."""
    from benchmarks.models import resnet_tiny as model

    return [(n, tuple(p.shape)) for n, p in model().named_parameters()]


def many_tensors(n: int = 2000) -> list[tuple[str, tuple[int, ...]]]:
    """``n`` small tensors, half weights (64 x 64) and half biases (64): what a model with many small layers (or one
    param group per layer) hands the optimizer; for host-cost scaling in the number of tensors."""
    return [(f"block{i // 2}.{'weight' if i % 2 == 0 else 'bias'}", (64, 64) if i % 2 == 0 else (64,))
            for i in range(n)]


PARAM_SETS = {"resnet50": resnet50, "vit_b16": vit_b16, "gpt2_medium": gpt2_medium, "resnet_tiny": resnet_tiny,
              "many_2000": many_tensors}


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
