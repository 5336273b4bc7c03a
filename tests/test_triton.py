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
from conftest import assert_trajectories_equal, sharpness_loop
from test_multi_tensor import ADAM_OPTIONS, SGD_OPTIONS, all_fused, fused_run, misaligned_run

from fastasam import backends
from fastasam.backends._signatures import KERNELS

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


def tb():
    from fastasam.backends import triton as triton_backend

    return triton_backend


def test_triton_backend_is_available_where_triton_is_installed():
    """An import error in the backend must fail a test, not silently drop it from FAST_CASES."""
    assert backends.unavailable_reason("triton", DEVICE) is None
    assert "triton" in backends.available_backends(DEVICE)
    if DEVICE == "cuda":
        assert backends.resolve("auto", torch.device("cuda")).name == "triton"
    else:
        assert backends.resolve("auto", torch.device("cpu")).name in ("cpu", "foreach")  # the interpreter: tests only


def _compiler_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_kernels_compile_for_sm80_and_sm90_with_vector_loads_and_no_contraction():
    """Lower every kernel to PTX and cubin for A100/H100 targets (no GPU needed), with both paths (``vector``: rows
    marked aligned take 16-byte loads, the others the element path; ``element``: the element path alone): 16-byte
    loads in every ``vector`` variant, and no fused or fusible multiply-add anywhere."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastasam.kernels.compile_check", "--arch", "80", "90", "--dtype", "fp32", "bf16"],
        capture_output=True, text=True, env=_compiler_env(), timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_")]
    variants = sum(max(1, len(k.modes)) for k in KERNELS.values())  # a kernel per mode (combine, the directions)
    assert variants == 15
    assert len(lines) == 2 * 2 * variants * 2 and all(line.endswith("ok") for line in lines), proc.stdout
    assert sum(" vector " in line for line in lines) == sum(" element " in line for line in lines) == 2 * 2 * variants
    assert all(" fma/unrounded   0 " in line for line in lines), proc.stdout


def test_the_ptx_check_finds_multiply_adds_when_fusion_is_on():
    """The contraction check is not vacuous: compiled with Triton's default (``enable_fp_fusion=True``), GSAM's
    combination ``x * G + y * K`` becomes fused multiply-adds, and the check says so."""
    code = (
        "from fastasam.kernels import compile_check as c\n"
        "for fusion in (True, False):\n"
        "    (r,) = c.compile_all([90], ['fp32'], kernels=['combine_kernel/gsam'], variants=['vector'],\n"
        "                         options={'enable_fp_fusion': fusion})\n"
        "    print(fusion, r['contractible'], c.verdict(r))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_compiler_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fused, plain = proc.stdout.splitlines()
    assert fused.startswith("True ") and int(fused.split()[1]) > 0 and "CONTRACTIBLE" in fused, proc.stdout
    assert plain == "False 0 ok", proc.stdout


def test_every_launch_compiles_without_floating_point_contraction(monkeypatch):
    """Each Triton launch the backend makes (norm, perturbation, fused updates, restore, LookSAM/GSAM's sums and
    combinations) passes ``enable_fp_fusion=False``: Triton would otherwise fuse ``a * b + c`` into one rounding,
    and the kernels would differ from the ``cuda`` backend, the interpreter and the oracle in the last bit."""
    import fastasam

    triton_backend = tb()
    seen: list[tuple[str, dict]] = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                seen.append((self.name, kwargs))
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(triton_backend, "_KERNELS", {k: Spy(k, v) for k, v in triton_backend._KERNELS.items()})
    for base, kwargs in ((torch.optim.SGD, SGD_OPTIONS["momentum"]), ADAM_OPTIONS["adamw"]):
        _, _, reports = fused_run("triton", DEVICE, torch.float32, base, kwargs, "subtract", steps=2)
        assert all_fused(reports)
    for variant, kw in ((fastasam.GSAM, {"alpha": 0.3}), (fastasam.LookSAM, {"k": 2, "alpha": 0.7})):
        params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (3, 700)]
        opt = variant(params, torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend="triton", **kw)
        sharpness_loop(opt, params, 3)
    kernels = {name for name, _ in seen}
    assert {"sqnorm", "perturb", "restore_sgd", "restore_adam", "dots", "combine"} <= kernels, kernels
    assert all(kw.get("enable_fp_fusion") is False for _, kw in seen), [kw for _, kw in seen]


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's check of the marks")
def test_the_interpreter_refuses_a_vector_path_on_a_misaligned_row(monkeypatch):
    """Were the host to mark a misaligned row aligned, a GPU would fault on its 16-byte accesses; under the
    interpreter the kernels check each vector row's addresses, so the tests of the marks' consequences can fail on a
    CPU too."""
    from fastasam.backends import _layout as L
    from fastasam.backends import _multi_tensor

    every = L.aligned_mask(*L.POINTER_COLS)

    def mark_all(tab):
        tab[:, L.COL_FLAGS] |= every
        return tab

    monkeypatch.setattr(_multi_tensor, "_mark_aligned", mark_all)
    with pytest.raises(Exception, match="Assume failed"):  # the interpreter wraps it (InterpreterError)
        misaligned_run("triton", DEVICE, torch.float32, torch.optim.SGD, dict(momentum=0.9), steps=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a GPU")
def test_direct_launches_of_the_compiled_kernels_equal_launches_through_the_jit(monkeypatch):
    """A warm step launches each kernel through its CompiledKernel's launcher with the arguments Triton specialised
    it for; the numbers must be those of ``kernel[grid](...)`` every time, to the bit."""
    from fastasam.backends import triton as triton_backend

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
