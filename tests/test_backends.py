"""Every fast backend against the reference oracle, step after step, for every dtype, on awkward sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPE_TOLERANCES,
    FAST_CASES,
    FAST_IDS,
    assert_trajectories_close,
    assert_trajectories_equal,
    awkward_params,
    soup_loss,
    three_groups,
    trajectory,
)

import fastasam
from fastasam import backends, reference
from fastasam._plan import build_buckets

pytestmark = pytest.mark.skipif(not FAST_CASES, reason="no fast backend on this machine")  # reference is always


@pytest.mark.parametrize("backend,device", FAST_CASES, ids=FAST_IDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("restore", ["copy", "subtract"])
def test_sgd_trajectory_matches_reference(backend, device, dtype, atol, rtol, restore):
    got = trajectory(backend, device, dtype, restore=restore)
    want = trajectory("reference", device, dtype, restore=restore)
    assert_trajectories_close(got, want, atol, rtol)
    # and the trajectory moved: a test of a no-op backend must fail
    assert not torch.equal(got[-1][1], awkward_params(device, dtype)[1])


@pytest.mark.parametrize("backend,device", FAST_CASES, ids=FAST_IDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES, ids=lambda v: str(v).replace("torch.", ""))
def test_adamw_trajectory_matches_reference(backend, device, dtype, atol, rtol):
    kwargs = {"betas": (0.9, 0.99), "weight_decay": 0.01}
    adam_eps = {"eps": 1e-3}  # fp16 storage flushes Adam's default 1e-8 (and grad**2) to 0; clashes with ASAM's eps
    got = trajectory(backend, device, dtype, base=torch.optim.AdamW, base_kwargs=kwargs, base_optimizer_kwargs=adam_eps)
    want = trajectory(
        "reference", device, dtype, base=torch.optim.AdamW, base_kwargs=kwargs, base_optimizer_kwargs=adam_eps
    )
    assert all(torch.isfinite(p).all() for p in want[-1])
    assert_trajectories_close(got, want, atol, rtol)


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), *FAST_CASES], ids=["reference-cpu", *FAST_IDS])
def test_deterministic(backend, device):
    first = trajectory(backend, device, torch.float32, steps=3)
    second = trajectory(backend, device, torch.float32, steps=3)
    assert_trajectories_equal(first, second)


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), *FAST_CASES], ids=["reference-cpu", *FAST_IDS])
def test_state_dict_reload_is_bit_exact(backend, device):
    """Resuming from a state_dict midway gives the same trajectory as an uninterrupted run."""
    with_reload = trajectory(backend, device, torch.float32, steps=7, reload_at=3)
    without = trajectory(backend, device, torch.float32, steps=7, reload_at=None)
    assert_trajectories_equal(with_reload, without)


@pytest.mark.parametrize("backend,device", FAST_CASES, ids=FAST_IDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES, ids=lambda v: str(v).replace("torch.", ""))
@torch.no_grad()
def test_phases_match_reference(backend, device, dtype, atol, rtol):
    """Norm, perturbation and restore, phase by phase, on the awkward soup."""
    impl = backends.resolve(backend, torch.device(device))
    params = awkward_params(device, dtype)
    with torch.enable_grad():
        soup_loss(params).backward()
    groups = [{**g, "eta": g.get("eta", 0.01), "adaptive": g.get("adaptive", True)} for g in three_groups(params)]
    (fast,) = build_buckets(groups)
    (ref,) = build_buckets(groups)
    sq_fast, sq_ref = impl.grad_sqnorm(fast), reference.grad_sqnorm(ref)
    torch.testing.assert_close(sq_fast, sq_ref, atol=0, rtol=1e-5)
    originals = [p.detach().clone() for p in params]
    perturbed = {}
    for name, impl_, b in (("fast", impl, fast), ("ref", reference, ref)):
        for p, w in zip(params, originals):
            p.data.copy_(w)
        b.finite = torch.isfinite(sq_ref.sqrt())
        b.scales = [torch.tensor(r / (sq_ref.sqrt().item() + 1e-12), device=device) for r in b.rho]
        b.buffers = [torch.empty_like(p) for p in b.params]
        impl_.perturb_(b, "copy")
        perturbed[name] = [p.detach().clone() for p in params]
        impl_.restore_(b, "copy")
        for p, w in zip(params, originals):
            assert torch.equal(p, w), "copy restore must be bit-exact"
    for got, want in zip(perturbed["fast"], perturbed["ref"]):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    moved = sum(int(not torch.equal(p, w)) for p, w in zip(perturbed["fast"], originals))
    assert moved > len(params) // 2


def test_auto_never_raises_and_picks_a_working_backend():
    for device in ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else []):
        impl = backends.resolve("auto", torch.device(device))
        assert impl.device_supported(torch.device(device)) is None


def test_auto_picks_foreach_on_cpu():
    """Measured (benchmarks/results/): chunked foreach beats the per-tensor loop on the CPU."""
    assert backends.resolve("auto", torch.device("cpu")).name == "foreach"


def test_sam_equals_asam_without_adaptivity():
    params_a = awkward_params("cpu", torch.float32)
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    sam = fastasam.SAM(params_a, torch.optim.SGD, rho=0.05, lr=0.1)
    asam = fastasam.ASAM(params_b, torch.optim.SGD, rho=0.05, eta=0.3, adaptive=False, lr=0.1)
    for _ in range(3):
        for opt, ps in ((sam, params_a), (asam, params_b)):
            soup_loss(ps).backward()
            opt.first_step(zero_grad=True)
            soup_loss(ps).backward()
            opt.second_step(zero_grad=True)
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)
