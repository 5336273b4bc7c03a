"""Every fast backend against the reference oracle, step after step, for every dtype, on awkward sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPE_TOLERANCES,
    FAST_CASES,
    FAST_IDS,
    MULTI_TENSOR,
    assert_trajectories_close,
    assert_trajectories_equal,
    awkward_params,
    max_error,
    soup_loss,
    three_groups,
    trajectory,
)

import fastasam
from fastasam import backends
from fastasam._engine import SharpnessEngine

pytestmark = pytest.mark.skipif(not FAST_CASES, reason="no fast backend on this machine")  # reference is always
FUSING = MULTI_TENSOR  # backends whose second step is the fused restore + update


# Fused backends round once per element where torch.optim rounds fp16/bf16 after every op; over several steps those
# ulp-sized differences compound, so in half precision they are held to an accuracy bound instead (below).
_SAME_ROUNDING = [(b, d, dt, at, rt) for b, d in FAST_CASES for dt, at, rt in DTYPE_TOLERANCES
                  if dt == torch.float32 or b not in FUSING]


@pytest.mark.parametrize("backend,device,dtype,atol,rtol", _SAME_ROUNDING,
                         ids=[f"{b}-{d}-{str(dt)[6:]}" for b, d, dt, _, _ in _SAME_ROUNDING])
@pytest.mark.parametrize("restore", ["copy", "subtract"])
def test_sgd_trajectory_matches_reference(backend, device, dtype, atol, rtol, restore):
    got = trajectory(backend, device, dtype, restore=restore)
    want = trajectory("reference", device, dtype, restore=restore)
    assert_trajectories_close(got, want, atol, rtol)
    # and the trajectory moved: a test of a no-op backend must fail
    assert not torch.equal(got[-1][1], awkward_params(device, dtype)[1])


@pytest.mark.parametrize("backend,device,dtype,atol,rtol", _SAME_ROUNDING,
                         ids=[f"{b}-{d}-{str(dt)[6:]}" for b, d, dt, _, _ in _SAME_ROUNDING])
def test_adamw_trajectory_matches_reference(backend, device, dtype, atol, rtol):
    kwargs = {"betas": (0.9, 0.99), "weight_decay": 0.01}
    adam_eps = {"eps": 1e-3}  # fp16 storage flushes Adam's default 1e-8 (and grad**2) to 0; clashes with ASAM's eps
    got = trajectory(backend, device, dtype, base=torch.optim.AdamW, base_kwargs=kwargs, base_optimizer_kwargs=adam_eps)
    want = trajectory(
        "reference", device, dtype, base=torch.optim.AdamW, base_kwargs=kwargs, base_optimizer_kwargs=adam_eps
    )
    assert all(torch.isfinite(p).all() for p in want[-1])
    assert_trajectories_close(got, want, atol, rtol)


_HALF = [(b, d, dt) for b, d in FAST_CASES if b in FUSING for dt in (torch.float16, torch.bfloat16)]
_BASES = {
    "sgd-copy": (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 5e-4}, "copy", {}),
    "sgd-subtract-nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}, "subtract", {}),
    "adamw": (torch.optim.AdamW, {"betas": (0.9, 0.99), "weight_decay": 0.01}, "copy", {"eps": 1e-3}),
}


@pytest.mark.parametrize("base", list(_BASES))
@pytest.mark.parametrize("backend,device,dtype", _HALF, ids=[f"{b}-{d}-{str(dt)[6:]}" for b, d, dt in _HALF])
def test_half_precision_error_is_at_most_twice_torchs(backend, device, dtype, base):
    """flash-attention's accuracy rule: against the same steps in float64 from the same starting values, the fused
    backend's error in fp16/bf16 is at most twice that of torch.optim's own update in that precision (and the
    trajectory moved)."""
    cls, kwargs, restore, base_optimizer_kwargs = _BASES[base]
    run = dict(base=cls, base_kwargs=kwargs, restore=restore, base_optimizer_kwargs=base_optimizer_kwargs, start=dtype,
               chunk_sized=False, steps=6, reload_at=3)
    truth = trajectory("reference", device, torch.float64, **run)
    torch_err = max_error(trajectory("reference", device, dtype, **run), truth)
    ours = trajectory(backend, device, dtype, **run)
    assert 0 < max_error(ours, truth) <= 2 * torch_err
    assert not torch.equal(ours[-1][1], awkward_params(device, dtype, chunk_sized=False)[1])


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
    """Norm, perturbation and restore, phase by phase, on the awkward soup (three groups, one with rho = 0)."""
    params = awkward_params(device, dtype)
    with torch.enable_grad():
        soup_loss(params).backward()
    groups = [{**g, "eta": g.get("eta", 0.01), "adaptive": g.get("adaptive", True)} for g in three_groups(params)]
    originals = [p.detach().clone() for p in params]
    sqnorm, perturbed = {}, {}
    for name in (backend, "reference"):
        for p, w in zip(params, originals):
            p.copy_(w)
        engine = SharpnessEngine(backend=name, eps=1e-12, restore="copy")
        engine.first_step(groups)
        sqnorm[name] = engine.grad_norm.double() ** 2
        perturbed[name] = [p.detach().clone() for p in params]
        engine.restore()
        for p, w in zip(params, originals):
            assert torch.equal(p, w), "copy restore must be bit-exact"
    torch.testing.assert_close(sqnorm[backend], sqnorm["reference"], atol=0, rtol=1e-5)
    for got, want in zip(perturbed[backend], perturbed["reference"]):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    moved = sum(int(not torch.equal(p, w)) for p, w in zip(perturbed[backend], originals))
    assert moved > len(params) // 2
    n = len(params)  # three_groups: the last three tensors have rho = 0: counted in the norm, never written
    assert all(torch.equal(p, w) for p, w in zip(perturbed[backend][n - 3:], originals[n - 3:]))


def test_auto_never_raises_and_picks_a_working_backend():
    for device in ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else []):
        impl = backends.resolve("auto", torch.device(device))
        assert impl.device_supported(torch.device(device)) is None


def test_auto_picks_the_cpu_kernels_on_cpu_else_foreach():
    """Measured (benchmarks/results/): the cpu backend's fused kernels beat foreach, and chunked foreach beats the
    per-tensor loop on the CPU; foreach serves CPU tensors where fastasam._cpu is not built."""
    want = "cpu" if backends.unavailable_reason("cpu", "cpu") is None else "foreach"
    assert backends.resolve("auto", torch.device("cpu")).name == want


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


_UNRUNNABLE_ON_CPU = [n for n in ("cuda", "triton") if backends.unavailable_reason(n, "cpu") is not None]


@pytest.mark.parametrize("name", _UNRUNNABLE_ON_CPU)
def test_a_named_backend_that_cannot_run_on_the_parameters_device_fails_at_construction(name):
    """Not at the first step: the error names the backend, the device and the fix, in the constructor and in
    add_param_group."""
    p = torch.nn.Parameter(torch.ones(3))
    want = rf"fastasam: backend '{name}' cannot run on cpu: .*Fix: use backend=\"auto\" .*'foreach'"
    with pytest.raises(RuntimeError, match=want):
        fastasam.ASAM([p], torch.optim.SGD, lr=0.1, backend=name)
    opt = fastasam.ASAM([{"params": []}], torch.optim.SGD, lr=0.1, backend=name)
    with pytest.raises(RuntimeError, match=want):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1
    model = torch.nn.Linear(2, 2)  # the official asam.py class too
    with pytest.raises(RuntimeError, match=want):
        fastasam.compat.ASAM(torch.optim.SGD(model.parameters(), lr=0.1), model, backend=name)


def test_the_construction_check_resolves_each_device_once(monkeypatch):
    calls = []
    real = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda name, device: calls.append((name, device)) or real(name, device))
    params = [torch.nn.Parameter(torch.ones(n)) for n in range(1, 51)]
    opt = fastasam.ASAM([{"params": params[:20]}, {"params": params[20:]}], torch.optim.SGD, lr=0.1,
                        backend="foreach")
    assert calls == [("foreach", torch.device("cpu"))] * 2  # once per param group, not per tensor
    calls.clear()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, device="meta"))]})  # placeholders: unchecked
    assert calls == []


def test_backend_says_what_ran_and_requested_backend_what_was_asked():
    params = awkward_params("cpu", torch.float32)
    opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.1)
    ran = backends.resolve("auto", torch.device("cpu")).name  # "cpu", or "foreach" without fastasam._cpu
    assert opt.requested_backend == "auto" and opt.backend == ran  # before a step: what auto resolves to
    soup_loss(params).backward()
    opt.first_step(zero_grad=True)
    soup_loss(params).backward()
    opt.second_step(zero_grad=True)
    assert opt.backend == ran == opt.report().buckets[0].backend
    named = fastasam.SAM(params, torch.optim.SGD, lr=0.1, backend="reference")
    assert named.backend == named.requested_backend == "reference"


def test_backend_of_a_step_whose_buckets_ran_on_several_backends(monkeypatch):
    """Backends are chosen per device; a plan whose buckets ran on two (here forced per dtype, as two devices
    would) reports both, in bucket order."""
    from fastasam import _step_plan

    real = _step_plan.make_runner

    def by_dtype(module, bucket, restore, eps):
        if bucket.dtype == torch.float64:
            module = backends.resolve("reference", bucket.device)
        return real(module, bucket, restore, eps)

    monkeypatch.setattr(_step_plan, "make_runner", by_dtype)
    params = [torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(4, dtype=torch.float64))]
    opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.1, backend="foreach")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.first_step()
    assert opt.backend == "foreach+reference"
    opt.second_step()
    assert opt.backend == "foreach+reference" and opt.requested_backend == "foreach"
