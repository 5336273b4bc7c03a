"""The ``cuda_shim`` backend: the ``cuda`` backend's kernels (``csrc/multi_tensor.cu``, the same source) compiled by
the host C++ compiler against ``csrc/cpu_shim`` and run on CPU tensors, for tests.

The shim gives the kernels CUDA's execution model on the CPU (``csrc/cpu_shim/fa_cuda_shim.h``): each block's 256
threads are real contexts that meet at ``__syncthreads()`` and warp shuffles (divergence is an error), blocks race
on several worker threads in a shuffled order, ``__shared__`` is per block, and every global load and store is
checked against the tensors of the launch (bounds, alignment; optionally races between threads). This is how CI
runs the optimizer suite and the oracle tests over ``cuda``'s kernels without a GPU, as it does Triton's with the
interpreter. It needs the sources (``csrc/``, installed as ``fastasam/csrc``) and a C++17 compiler (``CXX``, else
``c++``); the library is built once (a few seconds) into ``build/cuda_shim/`` of the checkout (else
``~/.cache/fastasam/cuda_shim``) and loaded with ``ctypes``.

It is not one of the product's backends: nothing registers or loads it by itself. ``register()`` adds it to the
backend registry (``fastasam.backends.register(REGISTRATION)``; the test suite's ``tests/conftest.py`` does),
``enable()`` builds and loads it (and registers it, so a spawned process needs only ``enable()``), after which
``cuda_shim`` is an available backend on the CPU. It is never picked by ``auto``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import backends
from .._toolchain import sources_dir
from ..backends._multi_tensor import MultiTensorBackend
from ..backends._signatures import SIGNATURES, arguments
from ..backends.cuda import _DTYPE_CODE  # the kernels' storage dtype codes (multi_tensor.h)

name = "cuda_shim"
traceable = False
# its registry entry: CPU tensors only, never picked by ``auto``
REGISTRATION = backends.BackendSpec(
    name, __name__, device_types=("cpu",),
    fix="it is a test backend: call fastasam.testing.cuda_shim.enable() (source checkout and a C++ compiler) and use "
        "CPU tensors",
)
CHUNK = 1 << 11  # 2048 elements per block (the GPU's 8192 would leave the tests' tensors in one block each)
CSRC = sources_dir()
# the library's cache: build/cuda_shim/ in a source checkout, else the user's cache folder
if CSRC is not None and (CSRC.parent / "setup.py").is_file():
    CACHE = CSRC.parent / "build" / "cuda_shim"
else:
    CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastasam" / "cuda_shim"
SHIM_SOURCES = ("cpu_shim/fa_cuda_shim.cpp", "cpu_shim/kernels.cpp")
HEADERS = ("multi_tensor.cu", "multi_tensor.h", "elementwise.h", "cpu_shim/fa_cuda_shim.h", "cpu_shim/cuda_runtime.h",
           "cpu_shim/cuda_fp16.h", "cpu_shim/cuda_bf16.h")
# -Bsymbolic: the library's own definitions win over same-named ones already loaded in the process (fastasam._C)
FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-Wl,-Bsymbolic", "-pthread", "-ffp-contract=off",
         "-fno-strict-aliasing", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas")

_LIB: ShimLibrary | None = None
LOAD_ERROR: str | None = None
# live_memory(): what the tests declare alive; None: each launch may touch the tensors its rows table names
_LIVE: Callable[[], Iterable[torch.Tensor]] | None = None


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def build(replace: dict[str, tuple[str, str]] | None = None, out_dir: Path | None = None) -> Path:
    """Compile the shim library; returns its path (cached by the sources' hash, so unchanged sources build once).

    ``replace``: ``{file: (old, new)}`` edits to the sources first (``file`` relative to ``csrc/``; ``old`` must
    occur): how the tests plant bugs in the kernels. Raises ``RuntimeError`` with the compiler's output on failure."""
    if CSRC is None:
        raise RuntimeError("the CUDA sources (csrc/) are neither installed with fastasam nor in a source checkout")
    cxx = shutil.which(compiler())
    if cxx is None:
        raise RuntimeError(f"no C++ compiler {compiler()!r} on PATH (set CXX)")
    texts = {f: (CSRC / f).read_text() for f in (*SHIM_SOURCES, *HEADERS)}
    for f, (old, new) in (replace or {}).items():
        if old not in texts[f]:
            raise ValueError(f"{old!r} does not occur in csrc/{f}")
        texts[f] = texts[f].replace(old, new)
    key = hashlib.sha256(repr((sorted(texts.items()), FLAGS, cxx)).encode()).hexdigest()[:16]
    out_dir = out_dir or CACHE
    lib = out_dir / f"libfastasam_cuda_shim-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src = Path(tmp)
        for f, text in texts.items():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_text(text)
        tmp_lib = src / lib.name
        cmd = [cxx, *FLAGS, f"-I{src / 'cpu_shim'}", f"-I{src}", *(str(src / f) for f in SHIM_SOURCES),
               "-o", str(tmp_lib)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building the CUDA CPU shim failed:\n{' '.join(cmd)}\n{res.stdout}{res.stderr}")
        os.replace(tmp_lib, lib)
    return lib


class ShimLibrary:
    """The compiled shim: the kernels' C interface (``multi_tensor.h``) plus the shim's controls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = self.lib = ctypes.CDLL(str(path))
        p, i, i64, u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64
        ctype = {"int": i, "int64_t": i64, "cudaStream_t": p}  # and every pointer: p
        sigs = {f"fa_{k}": [p if a.type.endswith("*") else ctype[a.type] for a in params]
                for k, params in SIGNATURES["c"].items()}
        sigs.update({
            "fa_shim_configure": [u64, i, i],
            "fa_shim_set_ranges": [p, i64],
            "fa_shim_ranges_from_rows": [p, i64, i64],
            "fa_shim_message": [],
            "fa_shim_clear": [],
            "fa_shim_cuda_get_error_string": [i],
            "fa_shim_launches": [],
            "fa_shim_float_to_half": [ctypes.c_float],
            "fa_shim_half_to_float": [ctypes.c_uint16],
            "fa_shim_float_to_bf16": [ctypes.c_float],
        })
        for fn, args in sigs.items():
            getattr(lib, fn).argtypes = args
        for k in SIGNATURES["c"]:
            getattr(lib, f"fa_{k}").restype = i
        lib.fa_shim_configure.restype = lib.fa_shim_set_ranges.restype = None
        lib.fa_shim_ranges_from_rows.restype = None
        lib.fa_shim_message.restype = lib.fa_shim_cuda_get_error_string.restype = ctypes.c_char_p
        lib.fa_shim_clear.restype = None
        lib.fa_shim_launches.restype = u64
        lib.fa_shim_float_to_half.restype = ctypes.c_uint16
        lib.fa_shim_half_to_float.restype = ctypes.c_float
        lib.fa_shim_float_to_bf16.restype = ctypes.c_uint16
        self.configure()

    def configure(self, seed: int = 0, workers: int = 3, racecheck: bool = False) -> None:
        """``seed``: the order of blocks and of threads between barriers; ``workers``: blocks that run at once;
        ``racecheck``: report two threads touching the same bytes in one launch where one writes (slower)."""
        self.lib.fa_shim_configure(seed, workers, int(racecheck))

    @property
    def launches(self) -> int:
        return self.lib.fa_shim_launches()

    def launch(self, kernel: str, *args) -> None:
        """Call ``fa_<kernel>`` with the C arguments (multi_tensor.h); a launch error raises with the shim's
        report."""
        self.lib.fa_shim_clear()
        err = getattr(self.lib, "fa_" + kernel)(*args)
        if err != 0:
            msg = (self.lib.fa_shim_message() or self.lib.fa_shim_cuda_get_error_string(err)).decode()
            raise RuntimeError(f"fastasam: launching the CUDA {kernel} kernel (CPU shim) failed: {msg}")


def register() -> None:
    """Add ``cuda_shim`` to the backend registry (``fastasam.backends``), unless it is there already. Mutates the
    registry only."""
    if "cuda_shim" not in backends.names():
        backends.register(REGISTRATION)


def enable(path: Path | None = None) -> ShimLibrary:
    """Build (unless ``path`` is given) and load the shim, and register ``cuda_shim``; it is then available on the
    CPU. Raises (and records ``LOAD_ERROR``) when the build or the load fails; the backend stays registered."""
    global _LIB, LOAD_ERROR
    register()
    if _LIB is None or path is not None:
        try:
            _LIB = ShimLibrary(path or build())
        except Exception as exc:
            LOAD_ERROR = f"{type(exc).__name__}: {exc}"
            raise
        LOAD_ERROR = None
    return _LIB


@contextmanager
def live_memory(tensors: Callable[[], Iterable[torch.Tensor]]) -> Iterator[None]:
    """Inside, each launch may touch only the storage of the tensors ``tensors()`` returns when it runs (plus the
    launch's own tables), instead of whatever its rows table names: a table entry that points at memory no tensor
    holds any more (a parameter whose storage was replaced, then freed) is reported as a violation and not written.
    For tests; the tensors' whole storages are allowed."""
    global _LIVE
    before, _LIVE = _LIVE, tensors
    try:
        yield
    finally:
        _LIVE = before


def _set_live_ranges(lib: ctypes.CDLL, launch_tensors: tuple) -> None:
    pairs = []
    for t in (*_LIVE(), *launch_tensors):
        s = t.untyped_storage()
        if s.nbytes():
            pairs += [s.data_ptr(), s.data_ptr() + s.nbytes()]
    arr = (ctypes.c_int64 * len(pairs))(*pairs)
    lib.fa_shim_set_ranges(arr, len(pairs) // 2)


def device_supported(device: torch.device) -> str | None:
    if _LIB is None:
        why = f" (loading failed: {LOAD_ERROR})" if LOAD_ERROR else ""
        return ("the CPU shim of the CUDA kernels is not loaded: it is a test backend, loaded by "
                f"fastasam.testing.cuda_shim.enable(){why}")
    if device.type != "cpu":
        return f"it runs the CUDA kernels on CPU tensors, not on {device.type}"
    return None


class _Launcher:
    """Binds shim launches (``_multi_tensor.Launcher``): the C functions with the tables' addresses. Before each
    launch the shim is told which memory the launch may touch: the tensors the rows table names."""

    dtypes = fused_dtypes = frozenset(_DTYPE_CODE)
    chunk = CHUNK

    def bind(self, kernel: str, count: int, tensors: tuple, dtype: torch.dtype, aligned: bool, copy: bool,
             mode: int = 0):
        shim = _LIB
        if shim is None:
            raise RuntimeError(device_supported(torch.device("cpu")))
        ptrs = tuple(t.data_ptr() for t in tensors)
        args = arguments(SIGNATURES["c"][kernel], kernel, ptrs, dtype=_DTYPE_CODE[dtype], count=count,
                         chunk_size=CHUNK, copy=int(copy), mode=mode, stream=None)  # multi_tensor.h's order
        rows, n_rows, elsize = ptrs[0], tensors[0].shape[0], dtype.itemsize
        ranges, launch = shim.lib.fa_shim_ranges_from_rows, shim.launch

        def run() -> None:
            if _LIVE is None:
                ranges(rows, n_rows, elsize)  # the rows' addresses change when gradients move: read them each launch
            else:
                _set_live_ranges(shim.lib, tensors)
            launch(kernel, *args)

        return run


_BACKEND = MultiTensorBackend(name, _Launcher())
prepare = _BACKEND.prepare
