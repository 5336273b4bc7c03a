"""The ``cuda`` backend's packaging and fallbacks. The kernels themselves run in the optimizer suite wherever the
extension is built on a GPU (``cuda`` is then among the fast backends); ``csrc/check.sh`` compiles them in CI."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastasam
from fastasam.backends import _layout, cuda_backend

ROOT = Path(__file__).resolve().parents[1]
BUILT = cuda_backend.EXTENSION_ERROR is None


def _setup_module():
    spec = importlib.util.spec_from_file_location("fastasam_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the helpers; setup() runs only as __main__
    return mod


def test_the_cuda_header_and_the_host_agree_on_the_table_layout():
    """Every table constant of ``_layout`` is #defined in the header with the same value, and the header defines
    nothing else but the dtype codes."""
    header = (ROOT / "csrc" / "multi_tensor.h").read_text()
    defines = {k: int(v) for k, v in re.findall(r"#define FA_(\w+) (\d+)", header)}
    host = {k: v for k, v in vars(_layout).items() if k.isupper() and isinstance(v, int)}
    assert len(host) >= 30
    for name, value in host.items():
        assert defines.get(name) == value, name
    codes = {"FLOAT32": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}
    assert set(defines) == set(host) | set(codes)
    for name, dtype in codes.items():
        assert defines[name] == cuda_backend._DTYPE_CODE[dtype]


@pytest.mark.skipif(BUILT, reason="the extension is built here; the fallback applies where it is not")
def test_without_the_extension_auto_falls_back_and_a_named_cuda_backend_says_how_to_build_it():
    reason = fastasam.backends.unavailable_reason("cuda", "cuda")
    assert "fastasam._C is not built" in reason
    assert "cuda" not in fastasam.available_backends("cpu")
    assert fastasam.backends.resolve("auto", torch.device("cuda")).name != "cuda"
    assert fastasam.backends.resolve("auto", torch.device("cpu")).name == "foreach"
    p = torch.nn.Parameter(torch.ones(3))
    opt = fastasam.ASAM([p], torch.optim.SGD, lr=0.1, backend="cuda")
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run .*FASTASAM_BUILD_CUDA=1 pip install"):
        opt.first_step()
    assert not opt.perturbed and torch.equal(p, torch.ones(3))


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
