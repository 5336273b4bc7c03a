"""The ``triton`` backend's own machinery: availability, that the kernels compile for real GPUs, and the launches
that skip Triton's binding. (The backend also runs every test parametrised over ``FAST_CASES`` and the fused-update
tests of ``test_multi_tensor.py``.) On a CPU machine the kernels run under ``TRITON_INTERPRET=1`` (set in conftest)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_trajectories_equal
from test_multi_tensor import ADAM_OPTIONS, SGD_OPTIONS, all_fused, fused_run

from fastasam import backends

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


def tb():
    from fastasam.backends import triton_backend

    return triton_backend


def test_triton_backend_is_available_where_triton_is_installed():
    """An import error in the backend must fail a test, not silently drop it from FAST_CASES."""
    assert backends.unavailable_reason("triton", DEVICE) is None
    assert "triton" in backends.available_backends(DEVICE)
    if DEVICE == "cuda":
        assert backends.resolve("auto", torch.device("cuda")).name == "triton"
    else:
        assert backends.resolve("auto", torch.device("cpu")).name == "foreach"  # the interpreter is for tests only


def test_kernels_compile_for_sm80_and_sm90_with_vector_loads():
    """Lower every kernel to PTX and cubin for A100/H100 targets (no GPU needed) and require 16-byte loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastasam.kernels.compile_check", "--arch", "80", "90", "--dtype", "fp32", "bf16"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_")]
    assert len(lines) == 2 * 2 * 12 and all(line.endswith("ok") for line in lines), proc.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a GPU")
def test_direct_launches_of_the_compiled_kernels_equal_launches_through_the_jit(monkeypatch):
    """A warm step launches each kernel through its CompiledKernel's launcher with the arguments Triton specialised
    it for; the numbers must be those of ``kernel[grid](...)`` every time, to the bit."""
    from fastasam.backends import triton_backend

    first_launches = []
    real = triton_backend.TritonLaunch._launch_and_keep

    def kept(self):
        real(self)
        first_launches.append(self)

    monkeypatch.setattr(triton_backend.TritonLaunch, "_launch_and_keep", kept)
    runs = {}
    for fast in (False, True):
        monkeypatch.setattr(triton_backend, "FAST_LAUNCH", fast)
        first_launches.clear()
        for kind, base, kwargs in (("sgd", torch.optim.SGD, SGD_OPTIONS["momentum"]),
                                   ("adamw", *ADAM_OPTIONS["adamw"])):
            got, state, reports = fused_run("triton", DEVICE, torch.float32, base, kwargs, "copy", steps=5)
            assert all_fused(reports)
            runs[fast, kind] = got
        assert all((launch.runner is not None) == fast for launch in first_launches)
        assert len(first_launches) >= 6  # norm, perturbation and fused update of both optimizers
    for kind in ("sgd", "adamw"):
        assert_trajectories_equal(runs[False, kind], runs[True, kind])
