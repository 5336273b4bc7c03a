"""The ``cuda`` backend: the CUDA C++ multi-tensor kernels of ``csrc/`` (built into ``fastasam._C`` by setup.py
where a CUDA toolkit and a CUDA build of PyTorch are present), called as ``torch.ops.fastasam.*``.

Same tables, foreach fallback and fused restore + SGD/Adam/AdamW as the ``triton`` backend (``_multi_tensor``);
fp32, fp16 and bf16 storage (fp64 goes to foreach). Each launch is bound once to the op's resolved overload and its
arguments, so a warm step pays one dispatcher call per phase.

The prebuilt extension (``fastasam._C``, built by setup.py) comes first. Without it (a wheel built on a CPU box, an
install with build isolation) naming the backend, ``backend="cuda"``, or ``python -m fastasam --build`` compiles the
same sources (installed as ``fastasam/csrc``) just in time with ninja into PyTorch's extensions cache
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), once: a few minutes, printed as it goes; a later
process loads the cached build in about a second. ``auto`` never starts a build: it uses the extension when it is
loaded and otherwise falls back. When the build cannot happen or fails, the reason is printed and raised with the fix
(``backend="auto"`` falls back to ``triton``/``foreach``). ``FASTASAM_JIT=0`` turns the just-in-time build off;
``FASTASAM_PREBUILT=0`` ignores ``fastasam._C`` (to use a just-in-time build instead, e.g. for other GPUs).
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial

import torch

from .. import _toolchain
from . import _layout
from ._multi_tensor import MultiTensorBackend
from ._signatures import KERNELS, SIGNATURES, UPDATE_KERNELS, arguments

name = "cuda"
traceable = False
CHUNK = 1 << 13  # 8192 elements per block: ResNet-50's 25.6M elements make ~3,200 blocks (~24 per H100 SM)
_DTYPE_CODE = {getattr(torch, name): code for name, code in _layout.DTYPE_CODE_NAMES.items()}  # multi_tensor.h
OPS = tuple(KERNELS)  # torch.ops.fastasam.<op>: one per kernel, schema SIGNATURES["schema"][op]

JIT_NAME = "fastasam_cuda_jit"  # the module name in PyTorch's extensions cache
EXTENSION = None  # the loaded extension module: fastasam._C, or the just-in-time build
JIT_ERROR: str | None = None  # why the last just-in-time build failed in this process


# --- the ops' fake (FakeTensor / meta) versions -----------------------------------------------------------------
# The C++ library (csrc/binding.cpp) names this module with `m.set_python_module`: torch requires that a C++ op's
# Python fake be registered by the module so named. Every op returns nothing (schema `-> ()`) and writes only through
# the addresses in `rows` and into the tensors its schema marks `Tensor(x!)`, in place: a fake allocates nothing,
# changes no tensor's metadata and returns None. It checks what the CUDA version checks that a fake can see (devices,
# dtypes, shapes, the integer arguments), so a wrong call fails while tracing as it would when run.


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, rows: torch.Tensor, width: int | None = None) -> None:
    torch._check(t.device.type in ("cuda", "meta"), lambda: f"fastasam: {name} must be a CUDA tensor, got {t.device}")
    torch._check(t.device == rows.device, lambda: f"fastasam: {name} is on {t.device} but the table on {rows.device}")
    torch._check(t.dtype == dtype, lambda: f"fastasam: {name} must be {dtype}, got {t.dtype}")
    torch._check(t.is_contiguous(), lambda: f"fastasam: {name} must be contiguous")
    if width is not None:
        torch._check(t.dim() == 2 and t.shape[1] == width, lambda: f"fastasam: {name} must be [*, {width}]")


def _check_tables(rows, chunks, count: int, chunk_size: int, dtype: int) -> None:
    _check(rows, "rows", torch.int64, rows, _layout.NCOL)
    _check(chunks, "chunks", torch.int32, rows, 2)
    torch._check(0 < count <= min(chunks.shape[0], 2**31 - 1),
                 lambda: f"fastasam: count={count} is outside the {chunks.shape[0]} chunks")
    torch._check(chunk_size > 0 and chunk_size % 8 == 0,
                 lambda: f"fastasam: chunk_size={chunk_size} must be a positive multiple of 8")
    torch._check(dtype in _DTYPE_CODE.values(), lambda: f"fastasam: unsupported storage dtype code {dtype}")


def _check_update(rows, hyper, sums, alpha, mode: int) -> None:
    _check(hyper, "hyper", torch.float32, rows, _layout.NHYPER)
    _check(sums, "sums", torch.float64, rows)
    _check(alpha, "alpha", torch.float64, rows)
    torch._check(sums.numel() == 3 and alpha.numel() == 1,
                 lambda: "fastasam: sums must hold three values and alpha one")
    torch._check(mode in (0, _layout.COMBINE_GSAM), lambda: f"fastasam: unknown direction mode {mode}")


def _fake_sqnorm(rows, chunks, opts, partials, counter, out, count, chunk_size, dtype) -> None:
    _check_tables(rows, chunks, count, chunk_size, dtype)
    _check(opts, "opts", torch.float32, rows, _layout.NOPT)
    for t, name, dt in ((partials, "partials", torch.float32), (counter, "counter", torch.int32),
                        (out, "out", torch.float32)):
        _check(t, name, dt, rows)
    torch._check(partials.numel() >= count, lambda: f"fastasam: partials has {partials.numel()} slots for {count}")


def _fake_perturb(rows, chunks, opts, sqnorm, count, chunk_size, dtype, copy) -> None:
    _check_tables(rows, chunks, count, chunk_size, dtype)
    _check(opts, "opts", torch.float32, rows, _layout.NOPT)
    _check(sqnorm, "sqnorm", torch.float32, rows)
    torch._check(sqnorm.numel() == 1, lambda: "fastasam: sqnorm must hold one value")


def _fake_restore(rows, chunks, count, chunk_size, dtype, copy) -> None:
    _check_tables(rows, chunks, count, chunk_size, dtype)


def _fake_restore_update(rows, chunks, hyper, sums, alpha, count, chunk_size, dtype, copy, mode) -> None:
    _check_tables(rows, chunks, count, chunk_size, dtype)
    _check_update(rows, hyper, sums, alpha, mode)


def _fake_dots(rows, chunks, partials, counter, out, count, chunk_size, dtype) -> None:
    _check_tables(rows, chunks, count, chunk_size, dtype)
    for t, name, dt in ((partials, "partials", torch.float64), (counter, "counter", torch.int32),
                        (out, "out", torch.float64)):
        _check(t, name, dt, rows)
    torch._check(partials.numel() >= 3 * count, lambda: f"fastasam: partials has {partials.numel()} slots for "
                                                        f"{count} chunks (3 each)")
    torch._check(out.numel() == 3, lambda: "fastasam: out must hold three values")


def _fake_combine(rows, chunks, sums, alpha, count, chunk_size, dtype, mode) -> None:
    _check_tables(rows, chunks, count, chunk_size, dtype)
    _check(sums, "sums", torch.float64, rows)
    _check(alpha, "alpha", torch.float64, rows)
    torch._check(sums.numel() == 3 and alpha.numel() == 1,
                 lambda: "fastasam: sums must hold three values and alpha one")
    torch._check(_layout.COMBINE_KEEP <= mode <= _layout.COMBINE_GSAM,
                 lambda: f"fastasam: unknown combine mode {mode}")


def _fake_msam_update(rows, chunks, hyper, opts, factors, partials, counter, out, count, chunk_size, dtype,
                      copy) -> None:
    _check_tables(rows, chunks, count, chunk_size, dtype)
    _check(hyper, "hyper", torch.float32, rows, _layout.NHYPER)
    _check(opts, "opts", torch.float32, rows, _layout.NOPT)
    for t, name, dt in ((factors, "factors", torch.float32), (partials, "partials", torch.float32),
                        (counter, "counter", torch.int32), (out, "out", torch.float32)):
        _check(t, name, dt, rows)
    torch._check(factors.numel() >= opts.shape[0], lambda: "fastasam: factors needs one value per row of opts")
    torch._check(partials.numel() >= count, lambda: f"fastasam: partials has {partials.numel()} slots for {count}")


def _fake_msam_perturb(rows, chunks, opts, sqnorm, factors, count, chunk_size, dtype, copy) -> None:
    _check_tables(rows, chunks, count, chunk_size, dtype)
    _check(opts, "opts", torch.float32, rows, _layout.NOPT)
    _check(sqnorm, "sqnorm", torch.float32, rows)
    _check(factors, "factors", torch.float32, rows)
    torch._check(sqnorm.numel() == 1, lambda: "fastasam: sqnorm must hold one value")
    torch._check(factors.numel() >= opts.shape[0], lambda: "fastasam: factors needs one value per row of opts")


FAKES = {"sqnorm": _fake_sqnorm, "perturb": _fake_perturb, "restore": _fake_restore, "dots": _fake_dots,
         "combine": _fake_combine, **dict.fromkeys(UPDATE_KERNELS, _fake_restore_update),
         "msam_sgd": _fake_msam_update, "msam_adam": _fake_msam_update, "msam_perturb": _fake_msam_perturb}
_FAKES_REGISTERED = False


def _registered(module) -> None:
    """``module`` (``fastasam._C`` or the just-in-time build) is loaded: its ops are ``torch.ops.fastasam.*``; their
    fakes are registered here, once per process (this module is the one the C++ library names)."""
    global EXTENSION, EXTENSION_ERROR, _FAKES_REGISTERED
    EXTENSION, EXTENSION_ERROR = module, None
    if not _FAKES_REGISTERED:
        for op in OPS:
            torch.library.register_fake(f"fastasam::{op}", FAKES[op])
        _FAKES_REGISTERED = True


EXTENSION_ERROR: str | None = None
if os.environ.get("FASTASAM_PREBUILT", "1").strip() == "0":  # use (or build) the just-in-time extension instead
    EXTENSION_ERROR = "FASTASAM_PREBUILT=0 leaves it out"
else:
    try:
        from .. import _C  # registers torch.ops.fastasam.*
    except ImportError as exc:
        EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
    else:
        _registered(_C)


def jit_unavailable_reason(env: dict[str, str] | None = None) -> str | None:
    """None when the extension can be built just in time here, else why not (with the fix)."""
    env = dict(os.environ) if env is None else env
    if env.get("FASTASAM_JIT", "1").strip().lower() in ("0", "false", "no", "off"):
        return "FASTASAM_JIT=0 turns the just-in-time build off"
    if _toolchain.sources_dir() is None:
        return "fastasam's CUDA sources are not installed (reinstall fastasam)"
    missing = _toolchain.cuda_missing(env, torch)
    if missing is not None:
        return missing
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def build(verbose: bool = True) -> str | None:
    """Make the extension available: ``fastasam._C`` when built, else a just-in-time build (or its cached result).
    Returns None on success, else why it failed (also printed when ``verbose``)."""
    global JIT_ERROR
    if EXTENSION is not None:
        return None

    def say(msg: str) -> None:
        if verbose:
            print(f"fastasam: {msg}", file=sys.stderr, flush=True)

    reason = jit_unavailable_reason()
    if reason is None:
        from torch.utils import cpp_extension

        home, archs = _toolchain.configure_cuda_build(torch, cpp_extension)
        src = _toolchain.sources_dir()
        say(f"fastasam._C is not built; building the cuda backend's kernels just in time for {archs} "
            f"(CUDA_HOME={home}; once, a few minutes; cached in PyTorch's extensions folder)...")
        t0 = time.perf_counter()
        try:
            module = cpp_extension.load(
                name=JIT_NAME, sources=[str(src / "binding.cpp"), str(src / "multi_tensor.cu")],
                extra_cflags=["-O3", f"-DFASTASAM_CUDA_ARCHS={archs}"],
                extra_cuda_cflags=list(_toolchain.NVCC_FLAGS), verbose=False)
        except Exception as exc:  # noqa: BLE001 - any compiler or toolchain failure
            reason = f"the just-in-time build failed ({type(exc).__name__}: {str(exc).strip()[-2000:]})"
        else:
            _registered(module)
            JIT_ERROR = None
            say(f"built (or loaded from the cache) in {time.perf_counter() - t0:.0f} s: {module.__file__}")
            return None
    JIT_ERROR = reason
    say(f"the cuda backend is unavailable: {reason}; backend=\"auto\" falls back to triton or foreach")
    return reason


def on_demand(device: torch.device) -> None:
    """Called when the backend is named for ``device``: the just-in-time build, once per process."""
    if EXTENSION is None and JIT_ERROR is None and device.type == "cuda":
        build()


def device_supported(device: torch.device) -> str | None:
    if EXTENSION is None:
        why = f"; just in time: {JIT_ERROR}" if JIT_ERROR else ""
        return f"the CUDA extension fastasam._C is not built ({EXTENSION_ERROR}){why}"
    if device.type != "cuda":
        return f"its kernels run on CUDA tensors, not on {device.type}"
    if not torch.cuda.is_available():
        return "this PyTorch build has no usable CUDA device"
    return None


class _Launcher:
    """Binds ``torch.ops.fastasam`` launches (``_multi_tensor.Launcher``): each op's resolved overload with its
    arguments in the order of its schema (``_signatures``: the tensors, the number of chunks to launch, the chunk size
    and the storage dtype's code; then the restore mode and the mode where the op takes them)."""

    dtypes = fused_dtypes = frozenset(_DTYPE_CODE)
    chunk = CHUNK

    def bind(self, kernel: str, count: int, tensors: tuple, dtype: torch.dtype, aligned: bool,
             copy: bool, mode: int = 0) -> partial:
        op = getattr(torch.ops.fastasam, kernel).default  # resolved once, not per call
        return partial(op, *arguments(SIGNATURES["schema"][kernel], kernel, tensors, count=count, chunk_size=CHUNK,
                                      dtype=_DTYPE_CODE[dtype], copy=copy, mode=mode))


_BACKEND = MultiTensorBackend(name, _Launcher())
prepare = _BACKEND.prepare
