"""Installs fastasam; never pulls a torch wheel (install torch first, then ``pip install --no-build-isolation .``).
``kernels/`` installs as ``fastasam.kernels``.

Optional C++ extensions; installing never fails for lack of any (unset flags: build when possible, and a
build that fails prints why and the install goes on without it):

* ``fastasam._host`` (csrc/host.cpp, CPU C++ only): the warm step's one pass over the tensors (fastasam/_watch.py
  has the same in Python, used when it is missing). With it, ``fastasam._cpu``
  (csrc/cpu_kernels.cpp): the ``cpu`` backend's kernels (``foreach`` serves CPU tensors without it).
  ``FASTASAM_BUILD_HOST=1`` builds both or fails; ``=0`` skips both.
* ``fastasam._C`` (csrc/*.cu): the ``cuda`` backend's kernels, built when a CUDA build of PyTorch and a CUDA toolkit
  are present. ``FASTASAM_BUILD_CUDA=1`` builds it or fails saying why; ``=0`` skips it.

Environment for both:

* ``MAX_JOBS``: parallel compile jobs (default: the CPU count, at most 4; nvcc jobs take GBs of memory each).
* ``TORCH_CUDA_ARCH_LIST``: target GPUs (default: the visible GPUs; "8.0;9.0" (A100, H100/H200) when none is).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _load_toolchain():
    """fastasam/_toolchain.py (standard library only), loaded by path: fastasam itself is not importable yet."""
    spec = importlib.util.spec_from_file_location("fastasam_toolchain", ROOT / "fastasam" / "_toolchain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_toolchain = _load_toolchain()
DEFAULT_ARCHS = _toolchain.DEFAULT_ARCHS
find_cuda_home = _toolchain.find_cuda_home  # the toolkit search, shared with the cuda backend's just-in-time build
build_environment = _toolchain.build_environment


# fastasam._cpu (csrc/cpu_kernels.cpp, the cpu backend's kernels): no floating-point contraction (the kernels' policy,
# elementwise.h); no floating-point traps or errno (they change no result, and let the compiler vectorise loops with
# selects, divisions and square roots); OpenMP where GCC provides it, so at::parallel_for spreads chunks over
# PyTorch's own OpenMP threads (the extension links libgomp.so.1, which resolves to the copy torch already loaded);
# elsewhere one thread.
CPU_CXX_FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno",
                 *(("-fopenmp",) if sys.platform.startswith("linux") else ()))
CPU_LINK_FLAGS = ("-fopenmp",) if sys.platform.startswith("linux") else ()


def _version() -> str:
    for line in (ROOT / "fastasam" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("fastasam/__init__.py has no __version__")


def _flag(env: dict[str, str], name: str) -> str:
    """"on", "off" or "auto" for the environment variable ``name``."""
    value = env.get(name, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    return "on" if value in ("1", "true", "yes", "on") else "auto"


def _decision(env: dict[str, str], var: str, what: str, reason, built: str) -> tuple[bool, str]:
    """(build?, why) for the extension ``what`` under flag ``var``: ``reason()`` says why it cannot be built (None: it
    can, because ``built``). An unset flag skips what cannot be built; ``var=1`` turns that into SystemExit."""
    flag = _flag(env, var)
    if flag == "off":
        return False, f"{var}=0"
    why = reason()
    if why is None:
        return True, built
    if flag == "on":
        raise SystemExit(f"fastasam: {var}=1 but {what} cannot be built: {why}.")
    return False, why


def _torch_missing() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not importable (install torch first, then pip install --no-build-isolation .)"
    return None


def host_build_decision(env: dict[str, str]) -> tuple[bool, str]:
    """(build?, why) for ``fastasam._host``; raises SystemExit when FASTASAM_BUILD_HOST=1 cannot be honoured."""
    return _decision(env, "FASTASAM_BUILD_HOST", "fastasam._host", _torch_missing, "PyTorch found")


def cuda_build_decision(env: dict[str, str]) -> tuple[bool, str]:
    """(build?, why): whether to build ``fastasam._C`` under environment ``env``. Raises SystemExit when
    FASTASAM_BUILD_CUDA=1 asks for a build that cannot happen."""

    def reason() -> str | None:
        missing = _torch_missing()
        if missing is not None:
            return missing
        import torch

        return _toolchain.cuda_missing(env, torch)

    return _decision(env, "FASTASAM_BUILD_CUDA", "the CUDA extension", reason,
                     f"CUDA toolkit ({find_cuda_home(env)}) and CUDA PyTorch found")


def _extensions() -> tuple[list, dict]:
    env = dict(os.environ)
    host, host_why = host_build_decision(env)
    cuda, cuda_why = cuda_build_decision(env)
    if not host:
        print(f"fastasam: skipping fastasam._host ({host_why}); a warm step's pass over the tensors runs in Python")
    if not cuda:
        print(f"fastasam: skipping the CUDA extension fastasam._C ({cuda_why}); the triton/foreach/reference "
              "backends work without it")
    if not (host or cuda):
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    exts = []
    if host:
        ext = CppExtension("fastasam._host", ["csrc/host.cpp"], extra_compile_args={"cxx": ["-O3"]})
        ext.flag = "FASTASAM_BUILD_HOST"
        exts.append(ext)
        ext = CppExtension("fastasam._cpu", ["csrc/cpu_kernels.cpp"], extra_compile_args={"cxx": list(CPU_CXX_FLAGS)},
                           extra_link_args=list(CPU_LINK_FLAGS))
        ext.flag = "FASTASAM_BUILD_HOST"
        exts.append(ext)
    if cuda:
        import torch.utils.cpp_extension as cpp_extension

        _, archs = _toolchain.configure_cuda_build(torch, cpp_extension)
        print(f"fastasam: building the CUDA extension fastasam._C (CUDA_HOME={os.environ['CUDA_HOME']}, "
              f"MAX_JOBS={os.environ['MAX_JOBS']}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPUs')})")
        ext = CUDAExtension(
            "fastasam._C", ["csrc/binding.cpp", "csrc/multi_tensor.cu"],
            # the binding records the target list in fastasam._C.archs (host compiler only: nvcc would split the
            # value at its commas)
            extra_compile_args={"cxx": ["-O3", f"-DFASTASAM_CUDA_ARCHS={archs}"], "nvcc": list(_toolchain.NVCC_FLAGS)},
        )
        ext.flag = "FASTASAM_BUILD_CUDA"
        exts.append(ext)
    for ext in exts:  # built automatically (flag unset): a failure is reported, and setuptools skips copying it
        ext.optional = _flag(env, ext.flag) == "auto"

    class Build(BuildExtension.with_options(use_ninja=True)):
        """Builds each extension; one built automatically (its flag unset) that fails is reported and left out."""

        def build_extension(self, ext) -> None:
            t0 = time.perf_counter()
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler or toolchain failure
                if not ext.optional:
                    raise
                print(f"fastasam: building {ext.name} failed ({type(exc).__name__}: {exc}); installing without it. "
                      f"Set {ext.flag}=1 to make this an error, {ext.flag}=0 to skip it.")
                return
            print(f"fastasam: built {ext.name} in {time.perf_counter() - t0:.0f} s")

    return exts, {"build_ext": Build}


# The optional extras (``pip install "fastasam[test]"``); scripts/setup_env.py (``make setup``, ``make docs``) reads
# this literal too, to install an extra's requirements alone.
EXTRAS = {
    # lightning, transformers, accelerate: no torch of their own over an installed one (~10 s and ~40 s here)
    "test": ["pytest>=7", "pytest-xdist", "pytest-benchmark", "ruff", "triton>=3.6,<4; platform_system == 'Linux'",
             "lightning>=2.2", "transformers>=4.46", "accelerate>=1.0"],
    "bench": ["matplotlib", "pytorch_optimizer"],  # pytorch_optimizer: its SAM, a published peer
    "docs": ["mkdocs-material", "mkdocstrings[python]"],  # make docs: the documentation site (mkdocs.yml)
    "tensorboard": ["tensorboard"],  # the ImageNet trainer's TensorBoard scalars (optional)
    "triton": ["triton>=3.6,<4"],  # tested: 3.6 (the GPU machines'), 3.9
    "lightning": ["lightning>=2.2"],  # fastasam.lightning; tested: 2.6.6
    "hf": ["transformers>=4.46", "accelerate>=1.0"],  # fastasam.hf; tested: transformers 5.23, accelerate 1.15
    "dali": ["nvidia-dali-cuda130"],  # the ImageNet trainer's --loader dali (~750 MB); tested: 2.4.0
}


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
        # the C++/CUDA sources ship as fastasam/csrc: the cuda backend builds them just in time where the wheel has
        # no fastasam._C (fastasam/_toolchain.py finds them), and the test backend cuda_shim compiles them for the CPU.
        # fastasam.testing (that backend; test helpers, not API) ships too, so the test suite runs against a wheel.
        packages=["fastasam", "fastasam.backends", "fastasam.variants", "fastasam.testing", "fastasam.kernels",
                  "fastasam.csrc", "fastasam.csrc.cpu_shim"],
        package_dir={"fastasam.kernels": "kernels", "fastasam.csrc": "csrc", "fastasam.csrc.cpu_shim": "csrc/cpu_shim"},
        package_data={"fastasam": ["py.typed"], "fastasam.csrc": ["*.cu", "*.h", "*.cpp", "*.sh"],
                      "fastasam.csrc.cpu_shim": ["*.h", "*.cpp"]},
        install_requires=["torch>=2.4"],
        extras_require=EXTRAS,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )
