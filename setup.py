"""Installs fastasam; never pulls a torch wheel (install torch first, then ``pip install --no-build-isolation .``).
``kernels/`` installs as ``fastasam.kernels``.

The CUDA extension ``fastasam._C`` (csrc/) is built when a CUDA build of PyTorch and a CUDA toolkit are present,
and skipped with one line otherwise: installing never fails for lack of CUDA. Environment:

* ``FASTASAM_BUILD_CUDA=1`` builds it or fails saying why; ``=0`` skips it; unset: build when possible.
* ``MAX_JOBS``: parallel compile jobs (default: the CPU count, at most 4; nvcc jobs take GBs of memory each).
* ``TORCH_CUDA_ARCH_LIST``: target GPUs (default: the visible GPUs; "8.0;9.0" (A100, H100/H200) when none is).
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "8.0;9.0"


def _version() -> str:
    for line in (ROOT / "fastasam" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("fastasam/__init__.py has no __version__")


def cuda_build_decision(env: dict[str, str]) -> tuple[bool, str]:
    """(build?, why): whether to build ``fastasam._C`` under environment ``env``. Raises SystemExit when
    FASTASAM_BUILD_CUDA=1 asks for a build that cannot happen."""
    flag = env.get("FASTASAM_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False, "FASTASAM_BUILD_CUDA=0"
    forced = flag in ("1", "true", "yes", "on")
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        reason = "PyTorch is not importable (install torch first, then pip install --no-build-isolation .)"
    else:
        if torch.version.cuda is None:
            reason = f"this PyTorch ({torch.__version__}) is not a CUDA build"
        elif CUDA_HOME is None:
            reason = "no CUDA toolkit found (install one, or set CUDA_HOME)"
    if reason is None:
        return True, "CUDA toolkit and CUDA PyTorch found"
    if forced:
        raise SystemExit(f"fastasam: FASTASAM_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}.")
    return False, reason


def build_environment(env: dict[str, str], cpus: int | None, gpu_visible: bool) -> dict[str, str]:
    """The MAX_JOBS / TORCH_CUDA_ARCH_LIST defaults to add to ``env`` (values the user set are kept)."""
    out = {}
    if not env.get("MAX_JOBS"):
        out["MAX_JOBS"] = str(max(1, min(cpus or 1, 4)))
    if not env.get("TORCH_CUDA_ARCH_LIST") and not gpu_visible:
        out["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    return out


def _extensions() -> tuple[list, dict]:
    build, why = cuda_build_decision(dict(os.environ))
    if not build:
        print(f"fastasam: skipping the CUDA extension fastasam._C ({why}); the triton/foreach/reference backends "
              "work without it")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.update(build_environment(dict(os.environ), os.cpu_count(), torch.cuda.is_available()))
    print(f"fastasam: building the CUDA extension fastasam._C (MAX_JOBS={os.environ['MAX_JOBS']}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPUs')})")
    ext = CUDAExtension(
        "fastasam._C", ["csrc/binding.cpp", "csrc/multi_tensor.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(
        name="fastasam",
        version=_version(),
        description="Fast, faithful ASAM and SAM optimizers for PyTorch (fused multi-tensor backends)",
        long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
        long_description_content_type="text/markdown",
        license="Apache-2.0",
        python_requires=">=3.10",
        packages=["fastasam", "fastasam.backends", "fastasam.kernels"],
        package_dir={"fastasam.kernels": "kernels"},
        package_data={"fastasam": ["py.typed"]},
        install_requires=["torch>=2.4"],
        extras_require={
            "test": ["pytest>=7", "pytest-benchmark", "ruff", "triton; platform_system == 'Linux'"],
            "bench": ["matplotlib"],
            "triton": ["triton"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )
