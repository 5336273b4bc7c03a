"""LookSAM and GSAM (``fastasam.variants``): the optimizers against an independent transcription of each paper's
algorithm, every backend against the ``reference`` backend with a resume midway, the limits that reduce to (A)SAM,
and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FAST_CASES,
    MULTI_TENSOR,
    assert_trajectories_close,
    assert_trajectories_equal,
    awkward_params,
    sharpness_loop,
    soup_loss,
)

import fastasam

CASES = [("reference", "cpu"), *FAST_CASES]
LR, MOMENTUM, RHO, ETA = 0.05, 0.9, 0.3, 0.01


def transcription(kind: str, params, steps: int, *, k: int = 1, alpha: float, adaptive: bool):
    """The papers' algorithms written out with plain tensors and torch.optim.SGD (no fastasam), one global vector."""
    base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    g_v, history = None, []

    def grads():
        for p in params:
            p.grad = None
        soup_loss(params).backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    def dot(a, b):
        return sum((x.double() * y.double()).sum() for x, y in zip(a, b))

    for i in range(steps):
        g = grads()
        full = kind == "gsam" or i % k == 0
        if full:
            t = [(p.detach().abs() + ETA) if adaptive else torch.ones_like(p) for p in params]
            norm = dot([ti * gi for ti, gi in zip(t, g)], [ti * gi for ti, gi in zip(t, g)]).sqrt()
            e = [ti * ti * gi * (RHO / (norm + 1e-12)) for ti, gi in zip(t, g)]
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.add_(ei.to(p.dtype))
            g_s = grads()
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.sub_(ei.to(p.dtype))
            if kind == "looksam":
                c = dot(g, g_s) / dot(g, g)
                g_v = [gs - c * gi for gs, gi in zip(g_s, g)]
                d = g_s
            else:
                c = dot(g, g_s) / dot(g_s, g_s)
                d = [gs - alpha * (gi - c * gs) for gs, gi in zip(g_s, g)]
        else:
            coef = alpha * dot(g, g).sqrt() / dot(g_v, g_v).sqrt()
            d = [gi + coef * vi for gi, vi in zip(g, g_v)]
        for p, di in zip(params, d):
            p.grad = di.to(p.dtype)
        base.step()
        history.append([p.detach().clone() for p in params])
    return history


def small_params(device="cpu", dtype=torch.float32):
    return awkward_params(device, dtype, chunk_sized=False)


def make(kind: str, params, backend: str = "reference", **kw):
    cls = fastasam.LookSAM if kind == "looksam" else fastasam.GSAM
    return cls(params, torch.optim.SGD, rho=RHO, eta=ETA, lr=LR, momentum=MOMENTUM, backend=backend, **kw)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("kind,kw", [("looksam", {"k": 3, "alpha": 0.7}), ("gsam", {"alpha": 0.3})],
                         ids=["looksam", "gsam"])
def test_the_optimizer_equals_the_papers_algorithm(kind, kw, adaptive):
    want = transcription(kind, small_params(), 8, adaptive=adaptive, **kw)
    params = small_params()
    got = sharpness_loop(make(kind, params, adaptive=adaptive, **kw), params, 8)
    # the transcription rounds differently (fp64 vector ops); LookSAM's g_v is the difference of nearly parallel
    # vectors and the steps between use its direction with weight ||g||, so rounding grows to ~1e-5 in 8 steps here
    # (measured: 9.7e-6 for the reference and foreach backends; 2.7e-5 with sums in fp32). A wrong formula: ~1e-2.
    tol = {"atol": 2e-5, "rtol": 1e-4} if kind == "looksam" else {"atol": 2e-6, "rtol": 2e-5}
    assert_trajectories_close(got, want, **tol)
    assert not torch.equal(got[-1][1], small_params()[1])


@pytest.mark.parametrize("backend,device", CASES, ids=[f"{b}-{d}" for b, d in CASES])
@pytest.mark.parametrize("kind,kw", [("looksam", {"k": 3, "alpha": 0.7}), ("gsam", {"alpha": 0.3})],
                         ids=["looksam", "gsam"])
def test_every_backend_equals_the_reference_and_resumes_bit_exactly(backend, device, kind, kw):
    def run(name, reload_at=None):
        params = small_params(device)
        groups = [{"params": params[:20], "adaptive": True}, {"params": params[20:], "adaptive": False, "lr": 0.02}]
        return sharpness_loop(make(kind, [dict(g) for g in groups], name, **kw), params, 10, reload_at,
                    lambda: make(kind, [dict(g) for g in groups], name, **kw))

    got = run(backend, reload_at=4)
    if backend in MULTI_TENSOR:  # the decompositions ran in the kernels (fastasam._decompose)
        params = small_params(device)
        opt = make(kind, params, backend, **kw)
        sharpness_loop(opt, params, 2)
        assert opt.report().direction.startswith(f"{backend} kernels")
    # the kernels' norms sum in other orders: ulps in e, which LookSAM's g_v amplifies (measured 1.7e-6 after 10 steps)
    tol = {"atol": 5e-6, "rtol": 1e-4} if kind == "looksam" else {"atol": 1e-6, "rtol": 1e-5}
    assert_trajectories_close(got, run("reference"), **tol)
    assert_trajectories_equal(got, run(backend))  # the resume (g_v, the step counter) is exact


@pytest.mark.parametrize("adaptive", [False, True])
def test_looksam_k1_and_gsam_alpha0_are_asam(adaptive):
    def asam():
        params = small_params()
        opt = fastasam.ASAM(params, torch.optim.SGD, rho=RHO, eta=ETA, adaptive=adaptive, lr=LR, momentum=MOMENTUM,
                            backend="foreach")
        return sharpness_loop(opt, params, 5)

    want = asam()
    for kind, kw in (("looksam", {"k": 1}), ("gsam", {"alpha": 0.0})):
        params = small_params()
        opt = make(kind, params, "foreach", adaptive=adaptive, **kw)
        assert_trajectories_equal(sharpness_loop(opt, params, 5), want)


def test_looksam_passes_and_state():
    params = small_params()
    opt = make("looksam", params, k=2)
    assert [opt.second_pass_needed] == [True]
    sharpness_loop(opt, params, 3)
    assert not opt.second_pass_needed  # steps 0 and 2 were full; step 3 is not
    state = opt.state_dict()["fastasam"]
    assert state["steps_done"] == 3 and len(state["g_v"]) == sum(p.numel() > -1 for p in params)
    with pytest.raises(RuntimeError, match="does not perturb"):
        opt.first_step()


@pytest.mark.parametrize("cls,kw,match", [
    (fastasam.LookSAM, {"k": 0}, "k must be an int >= 1"),
    (fastasam.LookSAM, {"k": 2.0}, "k must be an int >= 1"),
    (fastasam.LookSAM, {"alpha": -0.1}, "alpha must be a finite number >= 0"),
    (fastasam.GSAM, {"alpha": float("nan")}, "alpha must be a finite number >= 0"),
    (fastasam.GSAM, {"alpha": -1}, "alpha must be a finite number >= 0"),
])
def test_bad_input_is_refused(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, rho=0.1, lr=0.1, **kw)


def test_gsam_second_step_without_first_step_is_an_error():
    p = torch.nn.Parameter(torch.ones(3))
    opt = fastasam.GSAM([p], torch.optim.SGD, rho=0.1, lr=0.1)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="without a first_step"):
        opt.second_step()


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_the_global_sums_and_the_update_are_exact_to_rounding(backend):
    """The decompositions' building blocks on vectors of mixed signs (the optimizer tests' gradients are nearly
    parallel, so they barely exercise negative products): sum_i <a_i, b_i> to fp64 accuracy, and y <- a y + b x."""
    gen = torch.Generator().manual_seed(4)
    a = [torch.randn(n, generator=gen) for n in (1, 7, 4097, 300)]
    b = [torch.randn(n, generator=gen) for n in (1, 7, 4097, 300)]
    opt = fastasam.GSAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, rho=0.1, lr=0.1, backend=backend)
    want = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    got = opt._dot(a, b)
    assert got.dtype == torch.float64 and abs(got.item() - want.item()) <= 1e-6 * sum(
        (x.double() * y.double()).abs().sum() for x, y in zip(a, b)).item()
    y = [t.clone() for t in a]
    coef = torch.tensor(-0.75)
    opt._axpby_(y, b, coef, 0.5)
    for yi, ai, bi in zip(y, a, b):
        torch.testing.assert_close(yi, -0.75 * ai + 0.5 * bi, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind,kw", [("looksam", {"k": 2, "alpha": 0.7}), ("gsam", {"alpha": 0.3})],
                         ids=["looksam", "gsam"])
def test_gradscaler_gives_the_unscaled_steps(kind, kw):
    """Under torch.amp.GradScaler both passes' gradients carry the loss scale: the perturbation, the decompositions'
    ratios and LookSAM's use of g_v's direction do not depend on it, and the descent is unscaled before the base
    step, so the run equals the unscaled one."""
    out = []
    for scaled in (False, True):
        params = small_params()
        opt = make(kind, params, "foreach", adaptive=True, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaled else None
        out.append(sharpness_loop(opt, params, 5, scaler=scaler)[-1])
    assert_trajectories_close([out[1]], [out[0]], atol=1e-6, rtol=1e-5)
    assert not torch.equal(out[1][1], small_params()[1])


@pytest.mark.parametrize("backend", ["foreach", "cpu"])
@pytest.mark.parametrize("unscale_at", ["first", "between", "last"])
@pytest.mark.parametrize("kind,kw", [("looksam", {"k": 2, "alpha": 0.7}), ("gsam", {"alpha": 0.3})],
                         ids=["looksam", "gsam"])
def test_gradscaler_unscale_anywhere_gives_the_unscaled_steps(kind, kw, unscale_at, backend):
    """``scaler.unscale_(opt)`` on one pass only (before first_step, to clip the first pass; or after the second
    backward, to clip the descent): the kept first-pass gradient and the second pass's are then in different scales,
    and GSAM's direction, linear in the first, must bring them together; the run equals the unscaled one."""
    out = []
    for scaled in (False, True):
        params = small_params()
        opt = make(kind, params, backend, adaptive=True, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaled else None
        out.append(sharpness_loop(opt, params, 5, scaler=scaler, unscale_at=unscale_at if scaled else None)[-1])
    assert_trajectories_close([out[1]], [out[0]], atol=1e-6, rtol=1e-5)
