"""The ``cuda`` backend: the CUDA C++ multi-tensor kernels of ``csrc/`` (built into ``fastasam._C`` by setup.py
where a CUDA toolkit and a CUDA build of PyTorch are present), called as ``torch.ops.fastasam.*``.

Same tables, foreach fallback and fused restore + SGD/Adam/AdamW as the ``triton`` backend (``_multi_tensor``);
fp32, fp16 and bf16 storage (fp64 goes to foreach). Each launch is bound once to the op's resolved overload and its
arguments, so a warm step pays one dispatcher call per phase. Without the extension the backend reports itself
unavailable with the fix, ``auto`` falls back, and naming it raises.
"""

from __future__ import annotations

from functools import partial

import torch

from ._multi_tensor import MultiTensorBackend

name = "cuda"
traceable = False
CHUNK = 1 << 13  # 8192 elements per block: ResNet-50's 25.6M elements make ~3,200 blocks (~24 per H100 SM)
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # FA_FLOAT32, FA_FLOAT16, FA_BFLOAT16
OPS = ("sqnorm", "perturb", "restore", "restore_sgd", "restore_adam")

try:
    from .. import _C  # noqa: F401  registers torch.ops.fastasam.*
except ImportError as exc:
    EXTENSION_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    EXTENSION_ERROR = None
    for _op in OPS:
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


class _Launcher:
    """Binds ``torch.ops.fastasam`` launches (``_multi_tensor.Launcher``). Every op takes its tensors, the number of
    chunks to launch, the chunk size and the storage dtype's code; all but the norm also the restore mode."""

    dtypes = fused_dtypes = frozenset(_DTYPE_CODE)
    chunk = CHUNK

    def bind(self, kernel: str, count: int, tensors: tuple, dtype: torch.dtype, aligned: bool,
             copy: bool) -> partial:
        op = getattr(torch.ops.fastasam, kernel).default  # resolved once, not per call
        if kernel == "sqnorm":
            return partial(op, *tensors, count, CHUNK, _DTYPE_CODE[dtype])
        return partial(op, *tensors, count, CHUNK, _DTYPE_CODE[dtype], copy)


_BACKEND = MultiTensorBackend(name, _Launcher())
prepare = _BACKEND.prepare
