"""``python -m fastasam``: what this machine has for fastasam, on one screen; ``--check`` also runs a few steps of every
backend that works here against the ``reference`` oracle (exit status 1 when one disagrees).

    python -m fastasam            # versions, devices, backends (and why not), what ``auto`` picks, the extensions
    python -m fastasam --check    # + 3 ASAM, GSAM, LookSAM, MSAM steps per backend and device against the oracle
    python -m fastasam --build    # build the cuda backend's extension just in time where fastasam._C is missing
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import platform
import sys

import torch

import fastasam
from fastasam import _watch, backends

TRITON_SUPPORTED = ">=3.6,<4 (tested: 3.6, the GPU machines', and 3.9)"


def _devices() -> list[torch.device]:
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return out


def _triton() -> str:
    try:
        import triton
    except ImportError as exc:
        return f"not installed ({exc}); pip install 'triton{TRITON_SUPPORTED.split()[0]}' for the triton backend"
    interp = ", TRITON_INTERPRET=1 (kernels run on CPU tensors, slowly)" if os.environ.get("TRITON_INTERPRET") == "1" \
        else ""
    return f"{triton.__version__}{interp}; supported {TRITON_SUPPORTED}"


def _extension(name: str, missing: str, describe) -> str:
    """``fastasam.<name>``: ``describe(module)`` when it imports, else why not and ``missing`` (what to do)."""
    try:
        ext = importlib.import_module(f"fastasam.{name}")
    except ImportError as exc:
        return f"not built ({type(exc).__name__}: {exc}); {missing}"
    return f"built ({ext.__file__}); {describe(ext)}"


def _c_build(ext) -> str:
    archs = getattr(ext, "archs", "unknown (built before fastasam recorded it)")
    cuda = getattr(ext, "cuda_runtime_version", None)
    cuda = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) and cuda > 0 else "unknown"
    return f"architectures {archs}; CUDA runtime {cuda}"


def _extension_c() -> str:
    from fastasam.backends import cuda as cuda_backend

    jit = cuda_backend.EXTENSION
    if jit is not None and jit.__name__ == cuda_backend.JIT_NAME:
        return f"not prebuilt; built just in time ({jit.__file__}); {_c_build(jit)}"
    why_not_jit = cuda_backend.JIT_ERROR or cuda_backend.jit_unavailable_reason()
    jit_fix = "python -m fastasam --build builds it just in time" if why_not_jit is None else (
        f"no just-in-time build: {why_not_jit}")
    return _extension("_C", "build it with a CUDA toolkit and a CUDA PyTorch: FASTASAM_BUILD_CUDA=1 pip install "
                            f"--no-build-isolation -e . ({jit_fix})", _c_build)


def _extension_host() -> str:
    return _extension("_host", "the warm step's pass over the tensors runs in Python (slower); pip install "
                               "--no-build-isolation -e . with a C++ compiler builds it",
                      lambda ext: f"in use: {_watch.IMPLEMENTATION}")


def report() -> str:
    lines = [f"fastasam {fastasam.__version__} ({os.path.dirname(fastasam.__file__)})",
             f"python   {platform.python_version()} ({platform.platform()})",
             f"torch    {torch.__version__}; CUDA {torch.version.cuda or 'none (a CPU build)'}"
             + (f"; HIP {torch.version.hip}" if torch.version.hip else ""),
             f"triton   {_triton()}",
             f"fastasam._C    {_extension_c()}",
             f"fastasam._host {_extension_host()}", "", "devices and backends:"]
    for dev in _devices():
        name = "CPU" if dev.type == "cpu" else (f"{torch.cuda.get_device_name(dev)}, compute capability "
                                                 f"{'.'.join(map(str, torch.cuda.get_device_capability(dev)))}")
        auto = backends.resolve("auto", dev).__name__.rsplit(".", 1)[-1].replace("_backend", "")
        lines.append(f"  {dev} ({name}): auto -> {auto}")
        for b in backends.names():
            if b == "auto":
                continue
            why = backends.unavailable_reason(b, dev)
            lines.append(f"    {b:10s} {'available' if why is None else 'no: ' + why}")
    return "\n".join(lines)


KINDS = {"ASAM": (fastasam.ASAM, {}), "GSAM": (fastasam.GSAM, {"alpha": 0.2}),
         "LookSAM": (fastasam.LookSAM, {"k": 2, "alpha": 0.5}), "MSAM": (fastasam.MSAM, {"adaptive": True})}


def phases(opt: torch.optim.Optimizer) -> tuple:
    """The calls of one step of ``opt``, each after a backward: MSAM's ``step``; a two-pass optimizer's
    ``first_step`` and ``second_step`` (``second_step`` alone on a step without a second pass)."""
    if isinstance(opt, fastasam.MSAM):
        return (opt.step,)
    return (opt.first_step, opt.second_step) if opt.second_pass_needed else (opt.second_step,)


def _steps(backend: str, device: torch.device, dtype: torch.dtype, kind: str = "ASAM") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (1,), (300,), (3, 3, 2, 2), (8193,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
    groups = [{"params": params[:3]}, {"params": params[3:], "adaptive": False, "rho": 0.1}]
    cls, kw = KINDS[kind]
    opt = cls(groups, torch.optim.SGD, backend=backend, rho=0.5, eta=0.01, lr=0.05, momentum=0.9, weight_decay=1e-3,
              **kw)
    for _ in range(3):
        for phase in phases(opt):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
            phase()
    return [p.detach().double().cpu() for p in params]


def check() -> bool:
    """Three ASAM, GSAM, LookSAM and MSAM (+ SGD) steps per backend, device and dtype against the oracle; a line
    each."""
    ok = True
    for dev in _devices():
        # fused updates round once where torch.optim rounds after each op: a few bf16 ulps apart after 3 steps
        for (dtype, atol, rtol), kind in itertools.product(((torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-2, 3e-2)),
                                                           KINDS):
            want = _steps("reference", dev, dtype, kind)
            for b in backends.available_backends(dev):
                if b == "reference":
                    continue
                try:
                    got = _steps(b, dev, dtype, kind)
                    err = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
                    worst = max(float(((g - w).abs() / (atol + rtol * w.abs())).max())
                                for g, w in zip(got, want, strict=True))
                    good, what = worst <= 1, f"max |diff| {err:.1e} (atol {atol:.0e} + rtol {rtol:.0e} x |w|)"
                except Exception as exc:  # noqa: BLE001 - a check reports every failure and goes on
                    good, what = False, f"{type(exc).__name__}: {exc}"
                ok &= good
                print(f"  {'pass' if good else 'FAIL'}  {b:8s} {str(dev):8s} {str(dtype):15s} {kind:8s} {what}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastasam", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="run a few steps of every backend against the oracle")
    parser.add_argument("--build", action="store_true",
                        help="where fastasam._C is missing, build the cuda backend's kernels just in time (ninja)")
    args = parser.parse_args(argv)
    built = True
    if args.build:
        from fastasam.backends import cuda as cuda_backend

        built = cuda_backend.build() is None
    print(report())
    if not built:
        print("\nbuild: FAILED (the reason is above); backend=\"auto\" falls back to what works")
        return 1
    if args.check:
        print("\ncheck: 3 ASAM, GSAM, LookSAM and MSAM (+ SGD) steps per backend against the reference oracle")
        ok = check()
        print("check: all passed" if ok else "check: FAILED")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
