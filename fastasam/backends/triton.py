"""The ``triton`` backend: each phase of the step is one Triton launch per (device, dtype) bucket.

The kernels live in ``fastasam.kernels.multi_tensor``; the tables that describe a bucket to them, the ``foreach``
fallback for what they cannot take and the fused restore + ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` update are shared
with the ``cuda`` backend (``_multi_tensor``). This module only launches.

Launch cost. ``kernel[grid](*args)`` binds the arguments to the signature, computes their specialisation (alignment,
divisibility, ``== 1``) and looks the compiled kernel up, every call: tens of microseconds of Python. A step plan
launches the same kernel with the same argument objects every step, so each bound launch goes through
``kernel[grid]`` once (Triton specialises, compiles and caches as usual and returns its ``CompiledKernel``) and from
then on calls that compiled kernel's launcher directly, ``compiled[grid](*args, stream=...)``, Triton's own API for
launching a compiled kernel, with exactly the arguments it was specialised for. ``FASTASAM_TRITON_FAST_LAUNCH=0``
goes through ``kernel[grid]`` every time. Every launch compiles with ``multi_tensor.COMPILE_OPTIONS`` (no
floating-point contraction: the numbers of the ``cuda`` backend and of the interpreter, bit for bit).

With ``TRITON_INTERPRET=1`` in the environment before Triton is imported, the kernels run on CPU tensors through
Triton's interpreter (slowly): this is how CI tests them without a GPU.

``import triton`` here is the top-level package: imports are absolute, so this module's name does not shadow it.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton.language as tl  # optional dependency: if missing, the registry reports the ImportError

from .._plan import accumulate_dtype
from ..kernels import multi_tensor as K
from ._multi_tensor import MultiTensorBackend
from ._signatures import KERNELS, SIGNATURES, arguments

name = "triton"
traceable = False

INTERPRET = K.INTERPRET
FAST_LAUNCH = os.environ.get("FASTASAM_TRITON_FAST_LAUNCH", "1") not in ("0", "")
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}
# elements per program and per block; the interpreter gets small ones so CI's small tensors cross chunk boundaries
CHUNK = 1 << 12 if INTERPRET else 1 << 14
BLOCK = 1 << 9 if INTERPRET else 1 << 10
NUM_WARPS = 4
_KERNELS = {name: getattr(K, f"{name}_kernel") for name in KERNELS}
_SIGNATURES = SIGNATURES["triton"]  # each kernel's parameters, compile-time options included (_signatures)


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


class TritonLaunch:
    """One launch of ``kernel`` over ``grid`` programs with fixed arguments (all of the kernel's parameters, in
    order, compile-time options included)."""

    __slots__ = ("kernel", "grid", "args", "device", "runner")

    def __init__(self, kernel, grid: int, args: tuple, device: torch.device) -> None:
        self.kernel, self.grid, self.args = kernel, grid, args
        self.device = device.index if device.type == "cuda" else None
        self.runner = None

    def __call__(self) -> None:
        runner = self.runner
        if runner is None:
            self._launch_and_keep()
            return
        dev = self.device
        if torch._C._cuda_getDevice() == dev:
            runner(*self.args, stream=torch._C._cuda_getCurrentRawStream(dev))
        else:
            with torch.cuda.device(dev):
                runner(*self.args, stream=torch._C._cuda_getCurrentRawStream(dev))

    def _launch_and_keep(self) -> None:
        guard = torch.cuda.device(self.device) if self.device is not None else contextlib.nullcontext()
        with guard:
            compiled = self.kernel[(self.grid,)](*self.args, num_warps=NUM_WARPS, **K.COMPILE_OPTIONS)
        if FAST_LAUNCH and not INTERPRET and self.device is not None and hasattr(compiled, "launch_metadata"):
            self.runner = compiled[(self.grid, 1, 1)]


class _Launcher:
    """Binds Triton launches (``_multi_tensor.Launcher``)."""

    dtypes = frozenset(_TL_DTYPE)
    fused_dtypes = frozenset((torch.float32, torch.float16, torch.bfloat16))
    chunk = CHUNK

    def bind(self, kernel: str, count: int, tensors: tuple, dtype: torch.dtype, aligned: bool,
             copy: bool, mode: int = 0) -> TritonLaunch:
        args = arguments(_SIGNATURES[kernel], kernel, tensors, count=count, dtype=_TL_DTYPE[dtype],
                         acc=_TL_DTYPE[accumulate_dtype(dtype)], chunk_size=CHUNK, block=BLOCK, aligned=aligned,
                         copy=copy, mode=mode)
        return TritonLaunch(_KERNELS[kernel], count, args, tensors[0].device)


_BACKEND = MultiTensorBackend(name, _Launcher())
prepare = _BACKEND.prepare
