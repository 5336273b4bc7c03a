"""The ``cpu`` backend: the multi-tensor kernels for CPU tensors, native C++ (``csrc/cpu_kernels.cpp``, built into
``fastasam._cpu`` by setup.py wherever ``fastasam._host`` builds).

Same tables, foreach fallback and fused restore + ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` update as the ``triton``
and ``cuda`` backends (``_multi_tensor``), and the same per-element formulas (``csrc/elementwise.h``, shared with the
CUDA kernels): one pass over memory per phase, fp32 math for fp32, bf16 and fp16 storage rounded once on store. fp64
tensors go to ``foreach``, and so do fp16 ones unless the AVX-512 build runs: fp16's conversions are integer
arithmetic that the 16-wide loops carry faster than ``foreach``, the 8-wide AVX2 and the baseline loops slower
(measured: ``benchmarks/results/``). The kernels are compiled for the build's
baseline instruction set and, on x86-64, for AVX2 + F16C and for AVX-512 too (``fastasam._cpu.isa`` says which one
runs: the widest the CPU supports; ``fastasam._cpu.isas`` lists the builds it runs). A launch
spreads its chunks over PyTorch's intra-op threads (``torch.set_num_threads``); the squared norm and the dots are the
same to the bit whatever the thread count (per-chunk partial sums added in a fixed order). Each launch is bound once
to the C++ function and the tables' addresses (``functools.partial``), so a warm step pays one Python call per phase.

Without the extension (a build that failed or was skipped, ``FASTASAM_BUILD_HOST=0``) the backend is unavailable and
``auto`` picks ``foreach`` for CPU tensors.
"""

from __future__ import annotations

from functools import partial

import torch

from . import _layout
from ._multi_tensor import MultiTensorBackend
from ._signatures import SIGNATURES, arguments

name = "cpu"
traceable = False
# elements per chunk: the unit of work a thread takes (ResNet-50's 25.6M elements make ~1,700 chunks); the tests
# make it smaller (``_BACKEND.launcher.chunk``) so small tensors cross chunk boundaries
CHUNK = 1 << 14
_DTYPE_CODE = {getattr(torch, name): code for name, code in _layout.DTYPE_CODE_NAMES.items()}  # multi_tensor.h

try:
    from .. import _cpu as EXTENSION
except ImportError as exc:
    EXTENSION = None
    EXTENSION_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    EXTENSION_ERROR = None


# the storage dtypes the kernels take here (fp16: with the AVX-512 build only; see the module's docstring)
KERNEL_DTYPES = frozenset(_DTYPE_CODE) - (set() if getattr(EXTENSION, "isa", None) == "avx512" else {torch.float16})


def device_supported(device: torch.device) -> str | None:
    if EXTENSION is None:
        return (f"the CPU extension fastasam._cpu is not built ({EXTENSION_ERROR}); reinstall fastasam with a C++ "
                "compiler (pip install --no-build-isolation -e .)")
    if device.type != "cpu":
        return f"its kernels run on CPU tensors, not on {device.type}"
    return None


class _Launcher:
    """Binds ``fastasam._cpu`` launches (``_multi_tensor.Launcher``): each C++ function with the addresses of the
    launch's tensors (which the step plan owns, so they never move while it lives), the chunk count, the chunk size
    and the storage dtype's code; then the restore mode (all but the norm and the dots) and the mode (``combine``;
    the fused updates' direction)."""

    dtypes = fused_dtypes = KERNEL_DTYPES

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk

    def bind(self, kernel: str, count: int, tensors: tuple, dtype: torch.dtype, aligned: bool, copy: bool,
             mode: int = 0) -> partial:
        if EXTENSION is None:
            raise RuntimeError(f"fastasam: {device_supported(torch.device('cpu'))}")
        # the C++ function's arguments (_signatures: the C order, addresses, without the GPU reductions' scratch)
        ptrs = tuple(t.data_ptr() for t in tensors)
        launch = partial(getattr(EXTENSION, kernel), *arguments(SIGNATURES["cpu"][kernel], kernel, ptrs,
                                                                 dtype=_DTYPE_CODE[dtype], count=count,
                                                                 chunk_size=self.chunk, copy=copy, mode=mode))
        launch.tensors = tensors  # the addresses stay valid while the launch lives
        return launch


_BACKEND = MultiTensorBackend(name, _Launcher(CHUNK))
prepare = _BACKEND.prepare
