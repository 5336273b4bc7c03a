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
from conftest import DTYPE_TOLERANCES, assert_trajectories_close, soup_loss

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
    params = small_params(dtype)
    n = len(params)
    groups = [
        {"params": params[: n // 2], "rho": 0.5, "eta": 0.01, "adaptive": True, "lr": 0.05},
        {"params": params[n // 2 :], "rho": 0.05, "adaptive": False, "lr": 0.02},
    ]
    opt = fastasam.ASAM(groups, base, backend=backend, restore=restore, base_optimizer_kwargs=base_optimizer_kwargs,
                        **kwargs)
    history = []
    for _ in range(steps):
        soup_loss(params).backward()
        opt.first_step(zero_grad=True)
        soup_loss(params).backward()
        opt.second_step(zero_grad=True)
        history.append([p.detach().clone() for p in params])
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    return history, state


@pytest.fixture
def count_fused(monkeypatch):
    """Counts the fused restore + update launches, to prove the fused path ran."""
    mod = tb()._BACKEND
    calls = {"sgd": 0, "adam": 0}
    for kind in calls:
        real = getattr(mod, f"_{kind}_step")

        def counting(*args, real=real, kind=kind):
            calls[kind] += 1
            return real(*args)

        monkeypatch.setattr(mod, f"_{kind}_step", counting)
    return calls


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("restore", ["copy", "subtract"])
@pytest.mark.parametrize("options", list(SGD_OPTIONS), ids=list(SGD_OPTIONS))
def test_fused_restore_sgd_matches_reference(options, restore, dtype, atol, rtol, count_fused):
    kwargs = SGD_OPTIONS[options]
    got, got_state = fused_run("triton", dtype, torch.optim.SGD, kwargs, restore)
    assert count_fused["sgd"] == len(got)  # one fused call per step: the path under test really ran
    want, want_state = fused_run("reference", dtype, torch.optim.SGD, kwargs, restore)
    # fused math rounds once per element; torch.optim.SGD rounds fp16/bf16 after every op
    assert_trajectories_close(got, want, atol * 4, rtol * 4)
    for g, w in zip(got_state, want_state):
        assert g.keys() == w.keys()
        for k in g:
            torch.testing.assert_close(g[k], w[k], atol=atol * 4, rtol=rtol * 4)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("options", list(ADAM_OPTIONS), ids=list(ADAM_OPTIONS))
def test_fused_restore_adam_matches_reference(options, dtype, atol, rtol, count_fused):
    base, kwargs = ADAM_OPTIONS[options]
    adam_eps = {"eps": 1e-3}  # fp16 storage flushes Adam's default 1e-8 to 0
    got, got_state = fused_run("triton", dtype, base, kwargs, "copy", base_optimizer_kwargs=adam_eps)
    assert count_fused["adam"] == len(got)
    # torch's fused Adam computes in fp32 and rounds once, as the fused kernel does; its per-op (foreach) Adam rounds
    # the moments to fp16/bf16 before using them, which on the first step differs by far more than rounding
    fused = {"fused": True} if dtype != torch.float32 else {}
    want, want_state = fused_run("reference", dtype, base, {**kwargs, **fused}, "copy", base_optimizer_kwargs=adam_eps)
    assert_trajectories_close(got, want, atol * 4, rtol * 4)
    for g, w in zip(got_state, want_state):
        assert g.keys() == w.keys()
        assert torch.equal(g["step"], w["step"])
        for k in g:
            torch.testing.assert_close(g[k], w[k], atol=atol * 4, rtol=rtol * 4)


def test_fused_path_is_bit_exact_against_torch_fused_adamw_in_fp32(count_fused):
    """torch's own fused AdamW also computes in fp32 and rounds once: the same numbers."""
    kwargs = dict(betas=(0.9, 0.99), weight_decay=0.05)
    got, _ = fused_run("triton", torch.float32, torch.optim.AdamW, kwargs, "copy")
    want, _ = fused_run("reference", torch.float32, torch.optim.AdamW, {**kwargs, "foreach": False}, "copy")
    assert count_fused["adam"] == len(got)
    assert_trajectories_close(got, want, atol=2e-7, rtol=2e-6)


def test_unsupported_base_optimizer_falls_back_unfused(count_fused):
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
    assert count_fused == {"sgd": 0, "adam": 0}
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_tables_are_cached_and_rebuilt_when_a_gradient_moves(monkeypatch):
    mod = tb()._BACKEND
    builds = []
    real_build = mod._build
    monkeypatch.setattr(mod, "_build", lambda *a: builds.append(1) or real_build(*a))
    params = small_params(torch.float32)
    opt = fastasam.ASAM(params, torch.optim.SGD, backend="triton", lr=0.1, momentum=0.9)

    def step():
        soup_loss(params).backward()
        opt.first_step()
        opt.zero_grad(set_to_none=False)  # gradients stay where they are
        soup_loss(params).backward()
        opt.second_step()
        opt.zero_grad(set_to_none=False)

    step()
    step()  # the momentum buffers appear in step 1, so step 2 may build the fused table once more
    warm = len(builds)
    step()
    step()
    assert len(builds) == warm, "a step with nothing moved must reuse the cached tables"
    moved = params[2]
    keep_old = moved.grad
    moved.grad = torch.zeros_like(moved)  # a new gradient tensor, at a new address
    assert moved.grad.data_ptr() != keep_old.data_ptr()
    ref = [p.detach().clone() for p in params]
    soup_loss(params).backward()
    opt.first_step()
    assert len(builds) > warm, "a gradient at a new address must rebuild the table"
    # and the rebuilt table read the new gradient: the weights moved as the reference says
    norm = opt.grad_norm
    opt.second_step()
    assert torch.isfinite(norm) and not torch.equal(params[2], ref[2])


def test_norm_is_deterministic_and_matches_the_oracle():
    from fastasam import reference
    from fastasam._plan import build_buckets

    params = small_params(torch.float32)
    soup_loss(params).backward()
    groups = [{"params": params, "rho": 0.5, "eta": 0.01, "adaptive": True}]
    (bucket,) = build_buckets(groups)
    first = tb().grad_sqnorm(bucket)
    again = tb().grad_sqnorm(bucket)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, reference.grad_sqnorm(bucket), atol=0, rtol=1e-5)


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
