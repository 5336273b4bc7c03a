"""The ``cuda`` backend: the CUDA C++ multi-tensor kernels of ``csrc/`` (built into ``fastasam._C`` by setup.py
where a CUDA toolkit and a CUDA build of PyTorch are present), called as ``torch.ops.fastasam.*``.

Same tables, cache, foreach fallback and fused restore + SGD/Adam/AdamW as the ``triton`` backend
(``_multi_tensor``); fp32, fp16 and bf16 storage (fp64 goes to foreach). Without the extension the backend reports
itself unavailable with the fix, ``auto`` falls back, and naming it raises.
"""

from __future__ import annotations

import torch

from .._plan import Bucket
from ._multi_tensor import MultiTensorBackend, Plan, adam_bias_terms

name = "cuda"
CHUNK = 1 << 13  # 8192 elements per block: ResNet-50's 25.6M elements make ~3,200 blocks (~24 per H100 SM)
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # FA_FLOAT32, FA_FLOAT16, FA_BFLOAT16

try:
    from .. import _C  # noqa: F401  registers torch.ops.fastasam.*
except ImportError as exc:
    EXTENSION_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    EXTENSION_ERROR = None
    for _op in ("sqnorm", "perturb", "restore", "restore_sgd", "restore_adam"):
        # every op returns nothing and writes through addresses: its fake (meta) version does nothing
        torch.library.register_fake(f"fastasam::{_op}")(lambda *args, **kwargs: None)


def device_supported(device: torch.device) -> str | None:
    if EXTENSION_ERROR is not None:
        return f"the CUDA extension fastasam._C is not built ({EXTENSION_ERROR})"
    if device.type != "cuda":
        return f"its kernels run on CUDA tensors, not on {device.type}"
    if not torch.cuda.is_available():
        return "this PyTorch build has no usable CUDA device"
    return None


class _Launch:
    """The CUDA launches of each phase (``_multi_tensor.Kernels``)."""

    def sqnorm(self, bucket: Bucket, plan: Plan, out: torch.Tensor) -> None:
        torch.ops.fastasam.sqnorm(plan.tab, plan.etas, plan.chunks, plan.partials, plan.counter, out, CHUNK,
                                  _DTYPE_CODE[bucket.dtype])

    def perturb(self, bucket: Bucket, plan: Plan, scales: torch.Tensor, copy: bool) -> None:
        torch.ops.fastasam.perturb(plan.tab, plan.etas, plan.chunks, scales, bucket.finite, CHUNK,
                                   _DTYPE_CODE[bucket.dtype], copy)

    def restore(self, bucket: Bucket, plan: Plan, copy: bool) -> None:
        torch.ops.fastasam.restore(plan.tab, plan.chunks, CHUNK, _DTYPE_CODE[bucket.dtype], copy)

    def sgd(self, bucket: Bucket, plan: Plan, first: int, count: int, group: dict, copy: bool) -> None:
        torch.ops.fastasam.restore_sgd(
            plan.tab, plan.chunks, first, count, CHUNK, _DTYPE_CODE[bucket.dtype], group["lr"], group["momentum"],
            group["dampening"], group["weight_decay"], copy, bool(group["nesterov"]), bool(group["maximize"]),
        )

    def adam(self, bucket: Bucket, plan: Plan, first: int, count: int, group: dict, step: float, decoupled: bool,
             copy: bool) -> None:
        beta1, beta2 = group["betas"]
        step_size, bc2_sqrt = adam_bias_terms(group, step)
        torch.ops.fastasam.restore_adam(
            plan.tab, plan.chunks, first, count, CHUNK, _DTYPE_CODE[bucket.dtype], group["lr"], beta1, beta2,
            group["eps"], group["weight_decay"], step_size, bc2_sqrt, copy, decoupled, bool(group["amsgrad"]),
            bool(group["maximize"]),
        )


_BACKEND = MultiTensorBackend(name, _Launch(), tuple(_DTYPE_CODE), CHUNK)
grad_sqnorm = _BACKEND.grad_sqnorm
perturb_ = _BACKEND.perturb_
restore_ = _BACKEND.restore_
prepare_fused_step = _BACKEND.prepare_fused_step
