"""The multi-tensor kernels' fused restore + update and norm, for every backend with kernels on this machine:
``triton`` (under ``TRITON_INTERPRET=1`` on a CPU), ``cuda_shim`` (the ``cuda`` backend's kernels compiled for the CPU,
``csrc/cpu_shim``) and, on a GPU, ``cuda``. Each is compared with the ``reference`` oracle (or torch's own optimizers)
step by step, and its report must show that the fused path really ran."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPE_TOLERANCES,
    KERNELS,
    assert_trajectories_close,
    assert_trajectories_equal,
    soup_loss,
)

import fastasam


def small_params(device: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Chunk boundaries (CHUNK is 4096 under the interpreter, 2048 in the shim), a block tail, channels_last, size 0
    and 1, tiny ones."""
    gen = torch.Generator().manual_seed(7)

    def make(shape, fmt=torch.contiguous_format):
        t = (torch.randn(shape, generator=gen) * 0.5).to(device, dtype).contiguous(memory_format=fmt)
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


def fused_run(backend, device, dtype, base, kwargs, restore, steps=4, base_optimizer_kwargs=None):
    """Steps on ``small_params``; returns the weights after each step, the final optimizer state and the report of
    each step (which proves what ran)."""
    params = small_params(device, dtype)
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
    n = len(small_params("cpu", torch.float32))
    return all(r.second_step == "fused" and r.fused == n for r in reports)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("restore", ["copy", "subtract"])
@pytest.mark.parametrize("options", list(SGD_OPTIONS), ids=list(SGD_OPTIONS))
@KERNELS
def test_fused_restore_sgd_matches_reference(backend, device, options, restore, dtype, atol, rtol):
    kwargs = SGD_OPTIONS[options]
    got, got_state, reports = fused_run(backend, device, dtype, torch.optim.SGD, kwargs, restore)
    assert all_fused(reports), reports[-1]  # every tensor, every step: the path under test really ran
    want, want_state, _ = fused_run("reference", device, dtype, torch.optim.SGD, kwargs, restore)
    # fused math rounds once per element; torch.optim.SGD rounds fp16/bf16 after every op
    assert_trajectories_close(got, want, atol * 4, rtol * 4)
    for g, w in zip(got_state, want_state):
        assert g.keys() == w.keys()
        for k in g:
            torch.testing.assert_close(g[k], w[k], atol=atol * 4, rtol=rtol * 4)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("options", list(ADAM_OPTIONS), ids=list(ADAM_OPTIONS))
@KERNELS
def test_fused_restore_adam_matches_reference(backend, device, options, dtype, atol, rtol):
    base, kwargs = ADAM_OPTIONS[options]
    adam_eps = {"eps": 1e-3}  # fp16 storage flushes Adam's default 1e-8 to 0
    got, got_state, reports = fused_run(backend, device, dtype, base, kwargs, "copy", base_optimizer_kwargs=adam_eps)
    assert all_fused(reports), reports[-1]
    # torch's fused Adam computes in fp32 and rounds once, as the fused kernel does; its per-op (foreach) Adam rounds
    # the moments to fp16/bf16 before using them, which on the first step differs by far more than rounding
    fused = {"fused": True} if dtype != torch.float32 else {}
    want, want_state, _ = fused_run("reference", device, dtype, base, {**kwargs, **fused}, "copy",
                                    base_optimizer_kwargs=adam_eps)
    assert_trajectories_close(got, want, atol * 4, rtol * 4)
    for g, w in zip(got_state, want_state):
        assert g.keys() == w.keys()
        assert torch.equal(g["step"], w["step"])
        for k in g:
            torch.testing.assert_close(g[k], w[k], atol=atol * 4, rtol=rtol * 4)


@KERNELS
def test_fused_adamw_in_bf16_is_bit_exact_against_torchs_fused_adamw(backend, device):
    """torch's own fused AdamW also computes in fp32 and rounds once: in bf16 the same numbers, to the last bit (the
    kernel reads fp32 hyper-parameters that the host computed in double, as torch does)."""
    kwargs = dict(betas=(0.9, 0.99), weight_decay=0.05)
    got, got_state, reports = fused_run(backend, device, torch.bfloat16, torch.optim.AdamW, kwargs, "copy")
    want, want_state, _ = fused_run("reference", device, torch.bfloat16, torch.optim.AdamW, {**kwargs, "fused": True},
                                    "copy")
    assert all_fused(reports)
    assert_trajectories_equal(got, want)
    for g, w in zip(got_state, want_state):
        assert all(torch.equal(g[k], w[k]) for k in g)


@KERNELS
def test_fused_adamw_in_fp32_matches_torchs_per_tensor_adamw(backend, device):
    """In fp32 the kernel does torch's per-tensor AdamW's operations in its order (decay as p * (1 - lr * wd), lerp,
    IEEE sqrt and division): equal up to the last bit or two."""
    kwargs = dict(betas=(0.9, 0.99), weight_decay=0.05)
    got, _, reports = fused_run(backend, device, torch.float32, torch.optim.AdamW, kwargs, "copy")
    want, _, _ = fused_run("reference", device, torch.float32, torch.optim.AdamW, {**kwargs, "foreach": False}, "copy")
    assert all_fused(reports)
    assert_trajectories_close(got, want, atol=2e-7, rtol=2e-6)


@KERNELS
def test_unsupported_base_optimizer_falls_back_unfused(backend, device):
    params = small_params(device, torch.float32)
    opt = fastasam.ASAM(params, torch.optim.RMSprop, backend=backend, lr=0.01)
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


@KERNELS
def test_norm_is_deterministic_and_matches_the_oracle(backend, device):
    from fastasam._engine import SharpnessEngine

    params = small_params(device, torch.float32)
    soup_loss(params).backward()
    groups = [{"params": params, "rho": 0.5, "eta": 0.01, "adaptive": True}]
    norms = []
    for name in (backend, backend, "reference"):
        engine = SharpnessEngine(backend=name)
        with torch.no_grad():
            engine.first_step(groups)
            norms.append(engine.grad_norm.clone())
            engine.restore()
    assert torch.equal(norms[0], norms[1])
    torch.testing.assert_close(norms[0], norms[2], atol=0, rtol=1e-6)
