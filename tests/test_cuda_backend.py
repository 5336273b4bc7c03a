"""The ``cuda`` backend's packaging and fallbacks. The kernels themselves run in the optimizer suite wherever the
extension is built on a GPU (``cuda`` is then among the fast backends); ``csrc/check.sh`` compiles them in CI."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastasam
from fastasam.backends import _layout
from fastasam.backends import cuda as cuda_backend

ROOT = Path(__file__).resolve().parents[1]
BUILT = cuda_backend.EXTENSION_ERROR is None


def _setup_module():
    spec = importlib.util.spec_from_file_location("fastasam_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the helpers; setup() runs only as __main__
    return mod


def test_the_cuda_header_and_the_host_agree_on_the_table_layout():
    """Every table constant of ``_layout`` is #defined in the header with the same value, and the header defines
    nothing else but the dtype codes (a fused update's hyper columns are its struct's fields: test_signatures)."""
    header = (ROOT / "csrc" / "multi_tensor.h").read_text()
    defines = {k: int(v) for k, v in re.findall(r"#define FA_(\w+) (\d+)", header)}
    host = {k: v for k, v in vars(_layout).items() if k.isupper() and isinstance(v, int)}
    assert len(host) >= 25
    for name, value in host.items():
        assert defines.get(name) == value, name
    codes = {"FLOAT32": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}
    assert set(defines) == set(host) | set(codes)
    for name, dtype in codes.items():
        assert defines[name] == cuda_backend._DTYPE_CODE[dtype]


@pytest.mark.skipif(BUILT, reason="the extension is built here; the fallback applies where it is not")
def test_without_the_extension_auto_falls_back_and_a_named_cuda_backend_says_how_to_build_it(monkeypatch):
    reason = fastasam.backends.unavailable_reason("cuda", "cuda")
    assert "fastasam._C is not built" in reason
    assert "cuda" not in fastasam.available_backends("cpu")
    assert fastasam.backends.resolve("auto", torch.device("cuda")).name != "cuda"
    assert fastasam.backends.resolve("auto", torch.device("cpu")).name in ("cpu", "foreach")
    monkeypatch.setattr(cuda_backend, "on_demand", lambda device: None)  # no just-in-time build in a test
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run on cuda: .*FASTASAM_BUILD_CUDA=1 pip install"):
        fastasam.backends.resolve("cuda", torch.device("cuda"))
    p = torch.nn.Parameter(torch.ones(3))  # CPU tensors: refused when the optimizer is built, with the CPU's fix
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run on cpu: .*Fix: use backend=\"auto\""):
        fastasam.ASAM([p], torch.optim.SGD, lr=0.1, backend="cuda")
    assert torch.equal(p, torch.ones(3))


@pytest.mark.skipif(not (BUILT and torch.cuda.is_available()), reason="needs the built extension and a GPU")
def test_the_built_extension_steps_like_the_oracle_on_the_gpu():
    assert "cuda" in fastasam.available_backends("cuda")
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in [(3000,), (17, 5), (1,), (8193,)]]
    grads = [torch.randn(t.shape, generator=gen) for t in start]
    out = {}
    for backend in ("reference", "cuda"):
        params = [torch.nn.Parameter(t.cuda()) for t in start]
        opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.cuda()
            opt.first_step()
            opt.second_step()
        out[backend] = params
    for a, b in zip(out["cuda"], out["reference"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_setup_skips_the_extension_without_cuda_and_honours_the_flags():
    setup = _setup_module()
    assert setup.cuda_build_decision({"FASTASAM_BUILD_CUDA": "0"}) == (False, "FASTASAM_BUILD_CUDA=0")
    if torch.version.cuda is None:
        build, why = setup.cuda_build_decision({})
        assert not build and "not a CUDA build" in why
        with pytest.raises(SystemExit, match="FASTASAM_BUILD_CUDA=1 but the CUDA extension cannot be built"):
            setup.cuda_build_decision({"FASTASAM_BUILD_CUDA": "1"})
    assert setup.build_environment({}, cpus=64, gpu_visible=False) == {"MAX_JOBS": "4",
                                                                      "TORCH_CUDA_ARCH_LIST": "8.0;9.0"}
    assert setup.build_environment({}, cpus=2, gpu_visible=True) == {"MAX_JOBS": "2"}
    assert setup.build_environment({"MAX_JOBS": "8", "TORCH_CUDA_ARCH_LIST": "9.0"}, 2, False) == {}


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA PyTorch would try to build the extension")
def test_setup_py_prints_one_line_and_goes_on_without_cuda():
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line for line in lines if "skipping the CUDA extension" in line] == lines[:1]
    assert lines[-1] == fastasam.__version__


# --- the just-in-time build (fastasam.backends.cuda_backend.build) -------------------------------------------------


@pytest.fixture
def no_extension(monkeypatch):
    """The backend as on a machine whose install has no fastasam._C (its module state restored afterwards)."""
    monkeypatch.setattr(cuda_backend, "EXTENSION", None)
    monkeypatch.setattr(cuda_backend, "EXTENSION_ERROR", "ImportError: no fastasam._C")
    monkeypatch.setattr(cuda_backend, "JIT_ERROR", None)
    return monkeypatch


def test_the_just_in_time_build_says_what_it_needs(no_extension, tmp_path):
    env = {"CUDA_HOME": str(tmp_path), "PATH": ""}
    assert "FASTASAM_JIT=0" in cuda_backend.jit_unavailable_reason({**env, "FASTASAM_JIT": "0"})
    no_extension.setattr(torch.version, "cuda", None)
    assert "not a CUDA build" in cuda_backend.jit_unavailable_reason(env)
    no_extension.setattr(torch.version, "cuda", "13.0")
    from fastasam import _toolchain

    no_extension.setattr(_toolchain, "find_cuda_home", lambda env: None)
    assert "no CUDA toolkit" in cuda_backend.jit_unavailable_reason(env)
    no_extension.setattr(_toolchain, "find_cuda_home", lambda env: env["CUDA_HOME"])
    import torch.utils.cpp_extension as cpp_extension

    no_extension.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert "pip install ninja" in cuda_backend.jit_unavailable_reason(env)
    no_extension.setattr(cpp_extension, "is_ninja_available", lambda: True)
    assert cuda_backend.jit_unavailable_reason(env) is None
    no_extension.setattr(_toolchain, "sources_dir", lambda: None)
    assert "sources are not installed" in cuda_backend.jit_unavailable_reason(env)


def test_naming_the_backend_builds_once_and_a_failure_gives_the_reason_and_the_fallback(no_extension, capsys):
    """``auto`` never builds; ``backend="cuda"`` tries once per process; the compiler's error reaches the user with
    the fix, and the prebuilt extension is never replaced."""
    import torch.utils.cpp_extension as cpp_extension

    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("nvcc exploded")

    no_extension.setattr(cuda_backend, "jit_unavailable_reason", lambda env=None: None)
    no_extension.setattr(cpp_extension, "load", failing_load)
    assert fastasam.backends.resolve("auto", torch.device("cuda")).name != "cuda"
    assert not calls  # auto never starts a build
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run .*just in time: the just-in-time build "
                                               r"failed \(RuntimeError: nvcc exploded\).*python -m fastasam --build"):
            fastasam.backends.resolve("cuda", torch.device("cuda"))
    assert len(calls) == 1  # once per process, not on every step
    assert calls[0]["name"] == cuda_backend.JIT_NAME
    assert [Path(s).name for s in calls[0]["sources"]] == ["binding.cpp", "multi_tensor.cu"]
    assert "falls back" in capsys.readouterr().err

    built = type(sys)("fastasam_cuda_jit")
    built.__file__ = "/cache/fastasam_cuda_jit.so"
    no_extension.setattr(cuda_backend, "JIT_ERROR", None)
    no_extension.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs) or built)
    no_extension.setattr(cuda_backend, "_registered", lambda m: setattr(cuda_backend, "EXTENSION", m))
    assert cuda_backend.build(verbose=False) is None and cuda_backend.EXTENSION is built
    assert cuda_backend.build(verbose=False) is None and len(calls) == 2  # loaded: nothing more to do


def test_python_m_fastasam_build_reports_why_it_cannot_build_here():
    proc = subprocess.run([sys.executable, "-m", "fastasam", "--build"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FASTASAM_JIT": "0", "FASTASAM_PREBUILT": "0"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FASTASAM_JIT=0 turns the just-in-time build off" in proc.stderr
    assert "build: FAILED" in proc.stdout and "falls back" in proc.stdout


@pytest.mark.skipif(torch.version.cuda is None or cuda_backend.jit_unavailable_reason() is not None,
                    reason="needs a CUDA build of PyTorch, a CUDA toolkit and ninja (make gpu-stack has them)")
def test_the_just_in_time_build_compiles_and_registers_the_ops(tmp_path):
    """The real compile (minutes), in a fresh process that ignores the prebuilt extension, into an empty cache; a GPU
    is not needed to build and load it."""
    env = {**os.environ, "FASTASAM_PREBUILT": "0", "TORCH_EXTENSIONS_DIR": str(tmp_path),
           "TORCH_CUDA_ARCH_LIST": "8.0;9.0"}
    code = ("import torch, fastasam; from fastasam.backends import cuda as c; assert c.build() is None; "
            "print('ops', all(hasattr(torch.ops.fastasam, n) for n in c.OPS), c.EXTENSION.archs)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ops True 8.0,9.0" in proc.stdout
    assert "building the cuda backend's kernels just in time" in proc.stderr
