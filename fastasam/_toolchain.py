"""Where the CUDA toolkit and fastasam's C++/CUDA sources are, and the build defaults: shared by setup.py (which loads
this file by path, before fastasam is importable) and the ``cuda`` backend's just-in-time build. Standard library
only."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ARCHS = "8.0;9.0"  # A100, H100/H200: the targets when no GPU is visible
# nvcc flags of csrc/multi_tensor.cu wherever it is built (setup.py, the just-in-time build; csrc/check.sh repeats
# them): -fmad=false, no floating-point contraction (nvcc fuses a * b + c by default), so that the cuda backend
# computes the numbers of the Triton kernels, the CPU shim and the oracle (csrc/multi_tensor.cu's header)
NVCC_FLAGS = ("-O3", "-fmad=false")


def find_cuda_home(env: dict[str, str]) -> str | None:
    """The CUDA toolkit: ``CUDA_HOME`` (or ``CUDA_PATH``) when set, else the first of nvcc's ``..`` (following links)
    and the usual folders whose ``include/cuda_runtime.h`` exists. (PyTorch's own guess takes nvcc's ``..`` as is,
    which is wrong where nvcc on PATH is a wrapper script, as in ``/usr/local/bin``.)"""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return env[var]
    candidates = []
    for folder in env.get("PATH", "").split(os.pathsep):
        nvcc = Path(folder or ".") / "nvcc"
        if nvcc.is_file():
            candidates.append(nvcc.resolve().parent.parent)
    candidates += [Path("/usr/local/cuda"), Path("/opt/cuda"), Path("/usr")]
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").is_file():
            return str(home)
    return None


def build_environment(env: dict[str, str], cpus: int | None, gpu_visible: bool) -> dict[str, str]:
    """The MAX_JOBS / TORCH_CUDA_ARCH_LIST defaults to add to ``env`` (values the user set are kept)."""
    out = {}
    if not env.get("MAX_JOBS"):
        out["MAX_JOBS"] = str(max(1, min(cpus or 1, 4)))
    if not env.get("TORCH_CUDA_ARCH_LIST") and not gpu_visible:
        out["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    return out


def arch_list(env: dict[str, str], capabilities: list[tuple[int, int]]) -> str:
    """The architectures fastasam._C is built for, comma-separated (no characters a shell or ninja would read):
    ``TORCH_CUDA_ARCH_LIST``, else the visible GPUs' ``capabilities``."""
    archs = env.get("TORCH_CUDA_ARCH_LIST") or ";".join("{}.{}".format(*c) for c in capabilities)
    return ",".join(a for a in archs.replace(" ", ";").split(";") if a) or "unknown"


def cuda_missing(env: dict[str, str], torch) -> str | None:
    """Why ``fastasam._C`` cannot be built with this PyTorch (the ``torch`` module) under ``env``; None: it can."""
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is not a CUDA build (install one from pytorch.org)"
    if find_cuda_home(env) is None:
        return "no CUDA toolkit found (install one, or set CUDA_HOME to it)"
    return None


def configure_cuda_build(torch, cpp_extension) -> tuple[str, str]:
    """Point PyTorch's extension builder (``cpp_extension``) at the toolkit and add the build defaults to
    ``os.environ``; returns (the toolkit folder, the architectures, comma-separated). For setup.py and the
    just-in-time build alike."""
    env = dict(os.environ)
    home = find_cuda_home(env)
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = home
    os.environ.update(build_environment(env, os.cpu_count(), torch.cuda.is_available()))
    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return home, arch_list(dict(os.environ), caps)


def sources_dir() -> Path | None:
    """The folder holding ``multi_tensor.cu``: ``fastasam/csrc`` in an installed wheel, ``csrc`` in a source checkout
    (an editable install); None when neither has it."""
    here = Path(__file__).resolve().parent
    for folder in (here / "csrc", here.parent / "csrc"):
        if (folder / "multi_tensor.cu").is_file():
            return folder
    return None
