"""The ``triton`` backend: each phase of the step is one Triton launch per (device, dtype) bucket.

The kernels live in ``fastasam.kernels.multi_tensor``; the tables that describe a bucket to them, their cache, the
``foreach`` fallback for what they cannot take and the fused restore + ``torch.optim.SGD`` / ``Adam`` / ``AdamW``
update are shared with the ``cuda`` backend (``_multi_tensor``). This module only launches.

With ``TRITON_INTERPRET=1`` in the environment before Triton is imported, the kernels run on CPU tensors through
Triton's interpreter (slowly): this is how CI tests them without a GPU.
"""

from __future__ import annotations

import torch
import triton.language as tl  # optional dependency: if missing, the registry reports the ImportError

from .._plan import Bucket, accumulate_dtype
from ..kernels import multi_tensor as K
from ._multi_tensor import MultiTensorBackend, Plan, adam_bias_terms

name = "triton"

INTERPRET = K.INTERPRET
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}
# elements per program and per block; the interpreter gets small ones so CI's small tensors cross chunk boundaries
CHUNK = 1 << 12 if INTERPRET else 1 << 14
BLOCK = 1 << 9 if INTERPRET else 1 << 10
NUM_WARPS = 4


def device_supported(device: torch.device) -> str | None:
    if INTERPRET:
        if device.type != "cpu":
            return "TRITON_INTERPRET=1 is set, so Triton runs kernels on CPU tensors only; unset it for the GPU"
        return None
    if device.type != "cuda":
        return (f"Triton kernels run on CUDA/ROCm GPUs, not on {device.type} (set TRITON_INTERPRET=1 before importing "
                "triton to run them slowly on the CPU, for tests)")
    if not torch.cuda.is_available():
        return "this PyTorch build has no usable CUDA device"
    if torch.version.hip is None and torch.cuda.get_device_capability(device) < (7, 0):
        return "Triton needs a GPU of compute capability 7.0 or newer"
    return None


def _meta(bucket: Bucket, plan: Plan) -> dict:
    return dict(
        DTYPE=_TL_DTYPE[bucket.dtype], ACC=_TL_DTYPE[accumulate_dtype(bucket.dtype)], CHUNK=CHUNK, BLOCK=BLOCK,
        ALIGNED=plan.aligned, num_warps=NUM_WARPS,
    )


class _Launch:
    """The Triton launches of each phase (``_multi_tensor.Kernels``)."""

    def sqnorm(self, bucket: Bucket, plan: Plan, out: torch.Tensor) -> None:
        K.sqnorm_kernel[(plan.n_chunks,)](
            plan.tab, plan.etas, plan.chunks, plan.partials, plan.counter, out, plan.n_chunks, **_meta(bucket, plan),
        )

    def perturb(self, bucket: Bucket, plan: Plan, scales: torch.Tensor, copy: bool) -> None:
        K.perturb_kernel[(plan.n_chunks,)](
            plan.tab, plan.etas, plan.chunks, scales, bucket.finite, COPY=copy, **_meta(bucket, plan),
        )

    def restore(self, bucket: Bucket, plan: Plan, copy: bool) -> None:
        K.restore_kernel[(plan.n_chunks,)](plan.tab, plan.chunks, COPY=copy, **_meta(bucket, plan))

    def sgd(self, bucket: Bucket, plan: Plan, first: int, count: int, group: dict, copy: bool) -> None:
        K.restore_sgd_kernel[(count,)](
            plan.tab, plan.chunks, first, group["lr"], group["momentum"], group["dampening"], group["weight_decay"],
            COPY=copy, MOMENTUM=group["momentum"] != 0, NESTEROV=bool(group["nesterov"]),
            MAXIMIZE=bool(group["maximize"]), **_meta(bucket, plan),
        )

    def adam(self, bucket: Bucket, plan: Plan, first: int, count: int, group: dict, step: float, decoupled: bool,
             copy: bool) -> None:
        beta1, beta2 = group["betas"]
        step_size, bc2_sqrt = adam_bias_terms(group, step)
        K.restore_adam_kernel[(count,)](
            plan.tab, plan.chunks, first, group["lr"], beta1, beta2, group["eps"], group["weight_decay"], step_size,
            bc2_sqrt, COPY=copy, DECOUPLED=decoupled, AMSGRAD=bool(group["amsgrad"]),
            MAXIMIZE=bool(group["maximize"]), **_meta(bucket, plan),
        )


_BACKEND = MultiTensorBackend(name, _Launch(), _TL_DTYPE, CHUNK)
grad_sqnorm = _BACKEND.grad_sqnorm
perturb_ = _BACKEND.perturb_
restore_ = _BACKEND.restore_
prepare_fused_step = _BACKEND.prepare_fused_step
