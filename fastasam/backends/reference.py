"""The reference oracle: ASAM/SAM written tensor by tensor in plain PyTorch.

This file is the one place the formula lives. Every fast backend is tested against it, and it is the
backend that always works, on every device and dtype.

For a parameter ``w`` with gradient ``g`` (math in fp32 for fp16/bf16/fp32 storage, fp64 for fp64):

    T_w   = |w| + eta          if the tensor is adaptive, else 1
    norm  = sqrt( sum over all tensors of sum((T_w * g)^2) )                  (one global scalar)
    scale = rho / (norm + eps)  if norm is finite and > 0, else 0               (per group: rho is the group's)
    e     = T_w * (T_w * g) * scale, and 0 wherever the norm is not finite       (no NaN ever reaches w)
    w    <- w + e

and the restore either copies the saved ``w`` back (``restore="copy"``, bit-exact) or subtracts the stored ``e``
(``restore="subtract"``, what the official asam.py does). In ``subtract`` mode ``e`` is rounded to the storage dtype
once and that rounded value is both added and subtracted.
"""

from __future__ import annotations

import torch

from .._plan import Bucket, accumulate_dtype

name = "reference"
traceable = True  # torch.compile traces its tensor ops


def device_supported(device: torch.device) -> str | None:
    """Every device works."""
    return None


def _scaled_grad(w: torch.Tensor, g: torch.Tensor, adaptive: bool, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T_w, T_w * g)`` in the accumulate dtype; ``T_w`` is 1 (a 0-d tensor) for a non-adaptive tensor."""
    acc = accumulate_dtype(w.dtype)
    g = g.to(acc)
    if not adaptive:
        return torch.ones((), dtype=acc, device=g.device), g
    t = w.to(acc).abs() + eta
    return t, t * g


def grad_sqnorm(bucket: Bucket) -> torch.Tensor:
    """``sum over the bucket of sum((T_w * g)^2)`` as a 0-d tensor on the bucket's device. Reads only."""
    acc = accumulate_dtype(bucket.dtype)
    total = torch.zeros((), dtype=acc, device=bucket.device)
    for w, g, adaptive, eta in zip(bucket.params, bucket.grads, bucket.adaptive, bucket.eta):
        _, tg = _scaled_grad(w, g, adaptive, eta)
        total = total + (tg * tg).sum()
    return total


def perturb_(bucket: Bucket, restore: str) -> None:
    """``w <- w + e`` for every tensor of the bucket; writes what the restore needs into ``bucket.buffers``.

    Mutates ``bucket.params`` and ``bucket.buffers`` in place; reads ``grads``, ``scales`` and ``finite``.
    """
    acc = accumulate_dtype(bucket.dtype)
    for w, g, buf, adaptive, eta, scale in zip(
        bucket.params, bucket.grads, bucket.buffers, bucket.adaptive, bucket.eta, bucket.scales
    ):
        t, tg = _scaled_grad(w, g, adaptive, eta)
        e = torch.where(bucket.finite, t * tg * scale, 0.0)
        w32 = w.to(acc)
        if restore == "copy":
            buf.copy_(w)
            w.copy_(w32 + e)
        else:
            buf.copy_(e)  # rounded to the storage dtype once
            w.copy_(w32 + buf.to(acc))


def restore_(bucket: Bucket, restore: str) -> None:
    """Undo :func:`perturb_`: ``w <- saved w`` (copy) or ``w <- w - e`` (subtract). Mutates ``bucket.params``."""
    acc = accumulate_dtype(bucket.dtype)
    for w, buf in zip(bucket.params, bucket.buffers):
        if restore == "copy":
            w.copy_(buf)
        else:
            w.copy_(w.to(acc) - buf.to(acc))


# --- LookSAM / GSAM: the decompositions' sums and combinations (fastasam.variants), tensor by tensor ----------------


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor | None:
    """sum_i <a_i, b_i>: products in the accumulate dtype, each tensor's sum in fp64, the sums added in order, on the
    first tensor's device (None: no tensors)."""
    total = None
    for x, y in zip(a, b, strict=True):
        acc = accumulate_dtype(x.dtype)
        part = (x.to(acc) * y.to(acc)).sum(dtype=torch.float64)
        total = part if total is None else total + part.to(total.device)
    return total


def axpby_(y: list[torch.Tensor], x: list[torch.Tensor], a: torch.Tensor | float, b: torch.Tensor | float) -> None:
    """y_i <- a * y_i + b * x_i: each product rounded, then the sum, in the accumulate dtype; stored in y_i's."""
    for yi, xi in zip(y, x, strict=True):
        acc = accumulate_dtype(yi.dtype)
        yi.copy_(a * yi.to(acc) + b * xi.to(acc))
