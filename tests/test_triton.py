"""The ``triton`` backend's own machinery: the fused restore + update, the cached tables, and that the kernels compile
for real GPUs. (The backend also runs every test parametrised over ``FAST_CASES``.) On a CPU machine the kernels run
under ``TRITON_INTERPRET=1`` (set in conftest), so sizes are small; ``CHUNK`` there is 4096 elements."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import DTYPE_TOLERANCES, assert_trajectories_close, assert_trajectories_equal, soup_loss

import fastasam
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


def small_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Chunk boundaries (CHUNK = 4096 under the interpreter), a block tail, channels_last, size 0 and 1, tiny ones."""
    gen = torch.Generator().manual_seed(7)

    def make(shape, fmt=torch.contiguous_format):
        t = (torch.randn(shape, generator=gen) * 0.5).to(DEVICE, dtype).contiguous(memory_format=fmt)
        return torch.nn.Parameter(t)

    return [make((1,)), make((9, 41)), make((4097,)), make((2 * 4096 + 5,)), make((0,)),
            make((6, 3, 5, 5), torch.channels_last), *[make((n,)) for n in (2, 3, 17, 64)]]


SGD_OPTIONS = {
    "momentum": dict(momentum=0.9, weight_decay=5e-4),
    "nesterov-dampening0": dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    "dampening-maximize": dict(momentum=0.8, dampening=0.3, maximize=True),
    "plain": dict(),
}
ADAM_OPTIONS = {
    "adamw": (torch.optim.AdamW, dict(betas=(0.9, 0.99), weight_decay=0.05)),
    "adam-l2-amsgrad": (torch.optim.Adam, dict(weight_decay=0.01, amsgrad=True)),
}


def fused_run(backend, dtype, base, kwargs, restore, steps=4, base_optimizer_kwargs=None):
    """Steps on ``small_params``; returns the weights after each step, the final optimizer state and the report of
    each step (which proves what ran)."""
    params = small_params(dtype)
    n = len(params)
    groups = [
        {"params": params[: n // 2], "rho": 0.5, "eta": 0.01, "adaptive": True, "lr": 0.05},
        {"params": params[n // 2 :], "rho": 0.05, "adaptive": False, "lr": 0.02},
    ]
    opt = fastasam.ASAM(groups, base, backend=backend, restore=restore, base_optimizer_kwargs=base_optimizer_kwargs,
                        **kwargs)
    history, reports = [], []
    for _ in range(steps):
        soup_loss(params).backward()
        opt.first_step(zero_grad=True)
        soup_loss(params).backward()
        opt.second_step(zero_grad=True)
        history.append([p.detach().clone() for p in params])
        reports.append(opt.report())
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    return history, state, reports


def all_fused(reports) -> bool:
    n = len(small_params(torch.float32))
    return all(r.second_step == "fused" and r.fused == n for r in reports)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("restore", ["copy", "subtract"])
@pytest.mark.parametrize("options", list(SGD_OPTIONS), ids=list(SGD_OPTIONS))
def test_fused_restore_sgd_matches_reference(options, restore, dtype, atol, rtol):
    kwargs = SGD_OPTIONS[options]
    got, got_state, reports = fused_run("triton", dtype, torch.optim.SGD, kwargs, restore)
    assert all_fused(reports), reports[-1]  # every tensor, every step: the path under test really ran
    want, want_state, _ = fused_run("reference", dtype, torch.optim.SGD, kwargs, restore)
    # fused math rounds once per element; torch.optim.SGD rounds fp16/bf16 after every op
    assert_trajectories_close(got, want, atol * 4, rtol * 4)
    for g, w in zip(got_state, want_state):
        assert g.keys() == w.keys()
        for k in g:
            torch.testing.assert_close(g[k], w[k], atol=atol * 4, rtol=rtol * 4)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("options", list(ADAM_OPTIONS), ids=list(ADAM_OPTIONS))
def test_fused_restore_adam_matches_reference(options, dtype, atol, rtol):
    base, kwargs = ADAM_OPTIONS[options]
    adam_eps = {"eps": 1e-3}  # fp16 storage flushes Adam's default 1e-8 to 0
    got, got_state, reports = fused_run("triton", dtype, base, kwargs, "copy", base_optimizer_kwargs=adam_eps)
    assert all_fused(reports), reports[-1]
    # torch's fused Adam computes in fp32 and rounds once, as the fused kernel does; its per-op (foreach) Adam rounds
    # the moments to fp16/bf16 before using them, which on the first step differs by far more than rounding
    fused = {"fused": True} if dtype != torch.float32 else {}
    want, want_state, _ = fused_run("reference", dtype, base, {**kwargs, **fused}, "copy",
                                    base_optimizer_kwargs=adam_eps)
    assert_trajectories_close(got, want, atol * 4, rtol * 4)
    for g, w in zip(got_state, want_state):
        assert g.keys() == w.keys()
        assert torch.equal(g["step"], w["step"])
        for k in g:
            torch.testing.assert_close(g[k], w[k], atol=atol * 4, rtol=rtol * 4)


def test_fused_adamw_in_bf16_is_bit_exact_against_torchs_fused_adamw():
    """torch's own fused AdamW also computes in fp32 and rounds once: in bf16 the same numbers, to the last bit (the
    kernel reads fp32 hyper-parameters that the host computed in double, as torch does)."""
    kwargs = dict(betas=(0.9, 0.99), weight_decay=0.05)
    got, got_state, reports = fused_run("triton", torch.bfloat16, torch.optim.AdamW, kwargs, "copy")
    want, want_state, _ = fused_run("reference", torch.bfloat16, torch.optim.AdamW, {**kwargs, "fused": True}, "copy")
    assert all_fused(reports)
    assert_trajectories_equal(got, want)
    for g, w in zip(got_state, want_state):
        assert all(torch.equal(g[k], w[k]) for k in g)


def test_fused_adamw_in_fp32_matches_torchs_per_tensor_adamw():
    """In fp32 the kernel does torch's per-tensor AdamW's operations in its order (decay as p * (1 - lr * wd), lerp,
    IEEE sqrt and division): equal up to the last bit or two."""
    kwargs = dict(betas=(0.9, 0.99), weight_decay=0.05)
    got, _, reports = fused_run("triton", torch.float32, torch.optim.AdamW, kwargs, "copy")
    want, _, _ = fused_run("reference", torch.float32, torch.optim.AdamW, {**kwargs, "foreach": False}, "copy")
    assert all_fused(reports)
    assert_trajectories_close(got, want, atol=2e-7, rtol=2e-6)


def test_unsupported_base_optimizer_falls_back_unfused():
    params = small_params(torch.float32)
    opt = fastasam.ASAM(params, torch.optim.RMSprop, backend="triton", lr=0.01)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = fastasam.ASAM(ref_params, torch.optim.RMSprop, backend="reference", lr=0.01)
    for o, ps in ((opt, params), (ref, ref_params)):
        for _ in range(2):
            soup_loss(ps).backward()
            o.first_step(zero_grad=True)
            soup_loss(ps).backward()
            o.second_step(zero_grad=True)
    report = opt.report()
    assert report.fused == 0 and report.kernel == len(params)
    assert "RMSprop has no fused update" in report.second_step
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_norm_is_deterministic_and_matches_the_oracle():
    from fastasam._engine import SharpnessEngine

    params = small_params(torch.float32)
    soup_loss(params).backward()
    groups = [{"params": params, "rho": 0.5, "eta": 0.01, "adaptive": True}]
    norms = []
    for backend in ("triton", "triton", "reference"):
        engine = SharpnessEngine(backend=backend)
        with torch.no_grad():
            engine.first_step(groups)
            norms.append(engine.grad_norm.clone())
            engine.restore()
    assert torch.equal(norms[0], norms[1])
    torch.testing.assert_close(norms[0], norms[2], atol=0, rtol=1e-6)


def test_kernels_compile_for_sm80_and_sm90_with_vector_loads():
    """Lower every kernel to PTX and cubin for A100/H100 targets (no GPU needed) and require 16-byte loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastasam.kernels.compile_check", "--arch", "80", "90", "--dtype", "fp32", "bf16"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_")]
    assert len(lines) == 2 * 2 * 5 and all(line.endswith("ok") for line in lines), proc.stdout


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
            got, state, reports = fused_run("triton", torch.float32, base, kwargs, "copy", steps=5)
            assert all_fused(reports)
            runs[fast, kind] = got
        assert all((launch.runner is not None) == fast for launch in first_launches)
        assert len(first_launches) >= 6  # norm, perturbation and fused update of both optimizers
    for kind in ("sgd", "adamw"):
        assert_trajectories_equal(runs[False, kind], runs[True, kind])
