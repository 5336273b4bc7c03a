"""FriendlySAM, WSAM, BSAM and ASAM/SAM's ``use_gc`` (the methods pytorch_optimizer also has): each optimizer against
an independent per-tensor transcription of its algorithm, every backend against the ``reference`` backend with a
bit-exact resume midway, pytorch_optimizer's own FriendlySAM and WSAM where it is installed, GradScaler (the
unscaled run, and a skipped step), and bad hyper-parameters."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from conftest import (
    DTYPE_TOLERANCES,
    FAST_CASES,
    assert_trajectories_close,
    assert_trajectories_equal,
    awkward_params,
    kernels_take,
    sharpness_loop,
    soup_loss,
)

import fastasam

CASES = [("reference", "cpu"), *FAST_CASES]
LR, MOMENTUM, RHO = 0.05, 0.9, 0.3
NUM_DATA, SEED = 200, 7
# bf16 runs of two backends round their products in other orders: an element one bf16 ulp (2^-8 relative) apart
# after a step stays about that far apart; conftest's one-step bf16 tolerance, widened to two ulps
BF16_TOL = next((max(atol, 1e-2), max(rtol, 2.0 ** -6)) for d, atol, rtol in DTYPE_TOLERANCES if d == torch.bfloat16)


def small_params(device="cpu", dtype=torch.float32):
    return awkward_params(device, dtype, chunk_sized=False)


def tiny_params(device="cpu", dtype=torch.float32):
    """For the interpreted triton backend (slow): a few tensors of the awkward shapes."""
    return [p for i, p in enumerate(small_params(device, dtype)) if i in (0, 1, 3, 4, 5, 6, 7, 20)]


def grads_at(params) -> list[torch.Tensor]:
    for p in params:
        p.grad = None
    soup_loss(params).backward()
    return [p.grad.detach().clone() for p in params]


def ascent(params, g, *, rho=RHO, adaptive=False, eps=1e-12) -> list[torch.Tensor]:
    """(A)SAM's perturbation from ``g`` with eta = 0 (pytorch_optimizer's ``w^2`` scaling): T = |w| or 1."""
    t = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
    norm = math.sqrt(sum((ti.double() * gi.double()).pow(2).sum().item() for ti, gi in zip(t, g)))
    return [ti * ti * gi * (rho / (norm + eps)) for ti, gi in zip(t, g)]


def second_pass(params, e) -> list[torch.Tensor]:
    with torch.no_grad():
        for p, ei in zip(params, e):
            p.add_(ei)
    g_s = grads_at(params)
    with torch.no_grad():
        for p, ei in zip(params, e):
            p.sub_(ei)
    return g_s


# --- the transcriptions (plain tensors, torch.optim.SGD; no fastasam) ---------------------------------------------


def friendly_transcription(params, steps, *, sigma, lmbda, adaptive, use_gc=False):
    """Li et al. (CVPR 2024): d = g - sigma * m, then m = lmbda * m + (1 - lmbda) * g; m = g and d = g at first."""
    base, m, history = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM), None, []
    for _ in range(steps):
        g = grads_at(params)
        if m is None:
            m, d = [gi.clone() for gi in g], [gi.clone() for gi in g]
        else:
            d = [gi - sigma * mi for gi, mi in zip(g, m)]
            m = [lmbda * mi + (1 - lmbda) * gi for gi, mi in zip(g, m)]
        g_s = second_pass(params, ascent(params, d, adaptive=adaptive))
        for p, gs in zip(params, g_s):
            p.grad = gs
        base.step()
        history.append([p.detach().clone() for p in params])
    return history


def wsam_transcription(params, steps, *, gamma, decouple, max_norm, adaptive):
    """Yue et al. (KDD 2023) in pytorch_optimizer's order: restore, clip g_s, then decoupled or mixed."""
    alpha = gamma / (1 - gamma)
    base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    history = []
    for _ in range(steps):
        g = grads_at(params)
        g_s = second_pass(params, ascent(params, g, adaptive=adaptive))
        if max_norm is not None:
            total = math.sqrt(sum(gs.double().pow(2).sum().item() for gs in g_s))
            g_s = [gs * min(1.0, max_norm / (total + 1e-6)) for gs in g_s]
        for p, gi, gs in zip(params, g, g_s):
            p.grad = gi.clone() if decouple else alpha * gs + (1 - alpha) * gi
        base.step()
        if decouple:
            with torch.no_grad():
                for p, gi, gs in zip(params, g, g_s):
                    p.sub_(LR * alpha * (gs - gi))
        history.append([p.detach().clone() for p in params])
    return history


def bsam_transcription(params, steps, *, lr=LR, betas=(0.9, 0.999), wd=1e-3, rho=RHO, adaptive=False, damping=0.1):
    """Möllenhoff & Khan (ICLR 2023), Algorithm 1: noise, g at w + eps, e = rho g / s, g_eps at w + e; m, s, w; the
    next noise (one draw in parameter order from a generator seeded with SEED; none before the first step)."""
    gen = torch.Generator().manual_seed(SEED)
    w = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    s = [torch.ones_like(p) for p in params]
    history = []
    for _ in range(steps):
        g = grads_at(params)  # at w + eps
        with torch.no_grad():
            for p, wi, gi, si in zip(params, w, g, s):
                p.copy_(wi + rho * gi / si * (wi * wi if adaptive else 1.0))
        g_eps = grads_at(params)
        for i in range(len(params)):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * (g_eps[i] + wd * w[i])
            s[i] = betas[1] * s[i] + (1 - betas[1]) * (s[i].sqrt() * g[i].abs() + wd + damping)
            w[i] = w[i] - lr * m[i] / s[i]
        z = torch.randn(sum(p.numel() for p in params), generator=gen)
        with torch.no_grad():
            for p, zi, wi, si in zip(params, z.split([p.numel() for p in params]), w, s):
                p.copy_(wi + zi.view(p.shape) / (NUM_DATA * si).sqrt())
        history.append([p.detach().clone() for p in params])
    return history


def gc_transcription(params, steps, *, rho, adaptive, eta):
    """Gradient centralization of the ascent: g - mean over dims 1.. for gradients of 2+ dims, then (A)SAM."""
    base, history = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM), []
    for _ in range(steps):
        g = [gi - gi.mean(dim=tuple(range(1, gi.dim())), keepdim=True) if gi.dim() > 1 and gi.numel() else gi
             for gi in grads_at(params)]
        t = [(p.detach().abs() + eta) if adaptive else torch.ones_like(p) for p in params]
        norm = math.sqrt(sum((ti.double() * gi.double()).pow(2).sum().item() for ti, gi in zip(t, g)))
        g_s = second_pass(params, [ti * ti * gi * (rho / (norm + 1e-12)) for ti, gi in zip(t, g)])
        for p, gs in zip(params, g_s):
            p.grad = gs
        base.step()
        history.append([p.detach().clone() for p in params])
    return history


# --- the optimizers ---------------------------------------------------------------------------------------------


def make(kind: str, params, backend: str = "reference", **kw):
    if kind == "friendly":
        return fastasam.FriendlySAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, backend=backend, **kw)
    if kind == "wsam":
        return fastasam.WSAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, backend=backend, **kw)
    if kind == "bsam":
        return fastasam.BSAM(params, NUM_DATA, lr=LR, weight_decay=1e-3, rho=RHO, backend=backend, seed=SEED, **kw)
    assert kind == "gc"
    return fastasam.ASAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, backend=backend, use_gc=True,
                         **kw)


VARIANTS = [
    ("friendly", {"sigma": 1.0, "lmbda": 0.9, "adaptive": False}),
    ("friendly", {"sigma": 0.6, "lmbda": 0.8, "adaptive": True}),
    ("wsam", {"gamma": 0.8, "decouple": True, "max_norm": None, "adaptive": False}),
    ("wsam", {"gamma": 0.7, "decouple": False, "max_norm": 0.5, "adaptive": True}),
    ("wsam", {"gamma": 0.6, "decouple": True, "max_norm": 0.5, "adaptive": False}),
    ("bsam", {"adaptive": False}),
    ("bsam", {"adaptive": True}),
    ("gc", {"adaptive": True, "eta": 0.01}),
    ("gc", {"adaptive": False, "eta": 0.0}),
]
VARIANT_IDS = ["friendly", "friendly-asam", "wsam-decoupled", "wsam-mixed-clipped-asam", "wsam-decoupled-clipped",
               "bsam", "bsam-adaptive", "gc-asam", "gc-sam"]


def transcription(kind, params, steps, kw):
    if kind == "friendly":
        return friendly_transcription(params, steps, **kw)
    if kind == "wsam":
        return wsam_transcription(params, steps, **kw)
    if kind == "bsam":
        return bsam_transcription(params, steps, **kw)
    return gc_transcription(params, steps, rho=RHO, **kw)


def opt_kwargs(kind, kw):
    return kw if kind != "gc" else {"adaptive": kw["adaptive"], "eta": kw["eta"]}


@pytest.mark.parametrize("kind,kw", VARIANTS, ids=VARIANT_IDS)
def test_the_optimizer_equals_the_papers_algorithm(kind, kw):
    """8 steps on the reference backend against the transcription, with a state_dict reload after step 3."""
    want = transcription(kind, small_params(), 8, kw)
    params = small_params()
    got = sharpness_loop(make(kind, params, **opt_kwargs(kind, kw)), params, 8, reload_at=3,
                         make=lambda: make(kind, params, **opt_kwargs(kind, kw)))
    # rounding only (the transcriptions' norms are fp64 sums; WSAM's alpha > 1 amplifies it a little)
    assert_trajectories_close(got, want, atol=3e-6, rtol=3e-5)
    assert not torch.equal(got[-1][1], small_params()[1])


def _groups(kind, params):
    """Two param groups of different options, as each class takes them."""
    if kind == "bsam":
        return [{"params": params[:20], "adaptive": True}, {"params": params[20:], "lr": 0.02}]
    return [{"params": params[:20], "adaptive": True}, {"params": params[20:], "adaptive": False, "lr": 0.02}]


BACKEND_KINDS = [("friendly", {"sigma": 0.6, "lmbda": 0.8}), ("wsam", {"gamma": 0.8, "max_norm": 0.5}),
                 ("wsam", {"gamma": 0.7, "decouple": False}), ("bsam", {}), ("gc", {"eta": 0.01})]
BACKEND_IDS = ["friendly", "wsam-decoupled", "wsam-mixed", "bsam", "gc"]
DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, *BF16_TOL)]
BACKEND_CASES = [pytest.param(b, d, dt, tol, id=f"{b}-{d}-{str(dt)[6:]}")  # triton on the CPU: slow (conftest)
                 for b, d in CASES for dt, *tol in DTYPES
                 if dt == torch.float32 or b in ("reference", "foreach") or kernels_take(b, d, (dt,))]


@pytest.mark.parametrize("backend,device,dtype,tol", BACKEND_CASES)
@pytest.mark.parametrize("kind,kw", BACKEND_KINDS, ids=BACKEND_IDS)
def test_every_backend_equals_the_reference_and_resumes_bit_exactly(backend, device, dtype, tol, kind, kw):
    """Two param groups, 7 steps; a state_dict reload after step 3 continues bit for bit."""
    if backend == "triton" and (kind == "bsam" or kw.get("decouple", True) is False):
        pytest.skip("BSAM runs torch ops on every backend but reference; one WSAM case on the interpreted triton "
                    "backend is enough")
    pick = tiny_params if backend == "triton" else small_params

    def run(name, reload_at=None):
        params = pick(device, dtype)

        def new():
            return make(kind, [dict(g) for g in _groups(kind, params)], name, **kw)
        return sharpness_loop(new(), params, 7, reload_at, new)

    got = run(backend, reload_at=3)
    if kind == "wsam" and dtype == torch.bfloat16:  # g_s - g cancels: the ulps by which the backends' g_s differ
        tol = [4 * t for t in tol]  # become relative errors of the sharpness, times alpha (measured: 3 ulps)
    assert_trajectories_close(got, run("reference"), atol=tol[0], rtol=tol[1])
    assert_trajectories_equal(got, run(backend))


# --- pytorch_optimizer's classes ---------------------------------------------------------------------------------


def _published_loop(opt, params, steps):
    """pytorch_optimizer's documented loop: closure() for the first pass, then opt.step(closure)."""
    history = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = soup_loss(params)
            loss.backward()
            return loss
        closure()
        opt.step(closure)
        history.append([p.detach().clone() for p in params])
    return history


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("sigma,lmbda", [(1.0, 0.9), (0.5, 0.3)])
def test_friendlysam_equals_pytorch_optimizers(adaptive, sigma, lmbda):
    sam = pytest.importorskip("pytorch_optimizer.optimizer.sam")
    ref_params = small_params()
    published = sam.FriendlySAM(ref_params, torch.optim.SGD, rho=RHO, sigma=sigma, lmbda=lmbda, adaptive=adaptive,
                                lr=LR, momentum=MOMENTUM)
    want = _published_loop(published, ref_params, 8)
    params = small_params()
    opt = fastasam.FriendlySAM(params, torch.optim.SGD, rho=RHO, sigma=sigma, lmbda=lmbda, adaptive=adaptive, lr=LR,
                               momentum=MOMENTUM)
    assert_trajectories_close(_published_loop(opt, params, 8), want, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("decouple,max_norm", [(True, None), (False, None), (True, 0.5), (False, 0.5)])
def test_wsam_equals_pytorch_optimizers(adaptive, decouple, max_norm):
    sam = pytest.importorskip("pytorch_optimizer.optimizer.sam")
    ref_params = small_params()
    model = torch.nn.Module()  # pytorch_optimizer's WSAM clips model.parameters(): exactly these
    for i, p in enumerate(ref_params):
        model.register_parameter(f"p{i}", p)
    published = sam.WSAM(model, ref_params, torch.optim.SGD, rho=RHO, gamma=0.8, adaptive=adaptive,
                         decouple=decouple, max_norm=max_norm, lr=LR, momentum=MOMENTUM)
    want = _published_loop(published, ref_params, 8)
    params = small_params()
    opt = fastasam.WSAM(params, torch.optim.SGD, rho=RHO, gamma=0.8, adaptive=adaptive, decouple=decouple,
                        max_norm=max_norm, lr=LR, momentum=MOMENTUM)
    assert_trajectories_close(_published_loop(opt, params, 8), want, atol=5e-6, rtol=5e-5)


# --- GradScaler ----------------------------------------------------------------------------------------------------


SCALED = [("friendly", {"sigma": 0.6, "lmbda": 0.8}), ("wsam", {"gamma": 0.8, "max_norm": 0.5}),
          ("wsam", {"gamma": 0.7, "decouple": False}), ("bsam", {})]
SCALED_IDS = ["friendly", "wsam-decoupled-clipped", "wsam-mixed", "bsam"]


@pytest.mark.parametrize("backend", ["foreach", "reference"])
@pytest.mark.parametrize("kind,kw", SCALED, ids=SCALED_IDS)
def test_gradscaler_gives_the_unscaled_steps(kind, kw, backend):
    """The loss scale (which doubles every 2 steps here) changes nothing: FriendlySAM's m and WSAM's decoupled term
    are unscaled, BSAM unscales both passes; a state_dict reload midway included."""
    out = []
    for scaled in (False, True):
        params = small_params()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2) if scaled else None
        out.append(sharpness_loop(make(kind, params, backend, **kw), params, 7, 3,
                                  lambda params=params: make(kind, params, backend, **kw), scaler=scaler))
    assert_trajectories_close(out[1], out[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("order", ["before_first_step", "between_the_passes", "after_the_second"])
@pytest.mark.parametrize("kind,kw", SCALED, ids=SCALED_IDS)
def test_gradscaler_unscale_in_any_order_gives_the_unscaled_steps(kind, kw, order):
    """scaler.unscale_(opt) called before first_step, between the passes or after the second backward (to clip):
    the steps are still the unscaled run's (the first pass's and the second's gradients each in their own scale)."""
    def run(scaled):
        params = small_params()
        opt = make(kind, params, "foreach", **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2, enabled=scaled)
        for _ in range(5):
            for when in ("before_first_step", "between_the_passes", "after_the_second"):
                if when == "between_the_passes":
                    opt.first_step(zero_grad=True)
                if when != "after_the_second":
                    scaler.scale(soup_loss(params)).backward()
                if scaled and when == order:
                    scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return [[p.detach().clone() for p in params]]

    assert_trajectories_close(run(True), run(False), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("first", [False, True], ids=["second-pass", "first-pass"])
@pytest.mark.parametrize("kind,kw", SCALED, ids=SCALED_IDS)
def test_gradscaler_skips_a_step_with_an_inf(kind, kw, first):
    """An inf in one pass under GradScaler: the weights (BSAM: the mean) and the state stay as they were, as
    fastasam.ASAM skips the step; FriendlySAM's m stays finite; the next steps run."""
    params = small_params()
    opt = make(kind, params, "foreach", **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    sharpness_loop(opt, params, 2, scaler=scaler)

    def snapshot():
        if kind == "bsam":
            return [opt.state[p][k].clone() for p in params for k in ("mean", "momentum", "s")]
        return [p.detach().clone() for p in params] + [
            t.clone() for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]

    before, weights = snapshot(), [p.detach().clone() for p in params]
    for second in (False, True):
        if second:
            opt.first_step(zero_grad=True)
        loss = soup_loss(params) * (float("inf") if second != first else 1.0)
        scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert_trajectories_equal([snapshot()], [before])
    if kind == "friendly":
        assert all(torch.isfinite(m).all() for m in opt._m.values())
    history = sharpness_loop(opt, params, 2, scaler=scaler)
    assert all(torch.isfinite(t).all() for t in history[-1]) and not torch.equal(history[-1][1], weights[1])


# --- BSAM's loop -----------------------------------------------------------------------------------------------------


def test_bsam_unperturbed_gives_the_mean_and_restores_the_noise():
    params = small_params()
    opt = make("bsam", params)
    assert opt.second_pass_needed
    sharpness_loop(opt, params, 3)
    noisy = [p.detach().clone() for p in params]
    with opt.unperturbed():
        assert all(torch.equal(p, opt.state[p]["mean"]) for p in params)
        with pytest.raises(RuntimeError, match="unperturbed"):
            opt.state_dict()
        with pytest.raises(RuntimeError, match="unperturbed"):
            opt.first_step()
    assert_trajectories_equal([[p.detach() for p in params]], [noisy])
    assert not torch.equal(noisy[1], opt.state[params[1]]["mean"])  # the noise is in the weights between steps


def test_bsam_step_closure_equals_the_two_step_loop():
    def run(closure_loop):
        params = small_params()
        opt = make("bsam", params)
        for _ in range(3):
            if closure_loop:
                opt.step(lambda: soup_loss(params).backward())
            else:
                sharpness_loop(opt, params, 1)
        return [p.detach().clone() for p in params]

    assert_trajectories_equal([run(True)], [run(False)])


def test_bsam_refuses_a_first_step_without_gradients_and_a_second_without_a_first():
    params = small_params()
    opt = make("bsam", params)
    with pytest.raises(RuntimeError, match="found no gradient"):
        opt.first_step()
    soup_loss(params).backward()
    with pytest.raises(RuntimeError, match="without a first_step"):
        opt.second_step()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="between"):
        opt.state_dict()


# --- bad input ------------------------------------------------------------------------------------------------------


def _build(cls, **kw):
    p = torch.nn.Parameter(torch.ones(2))
    if cls is fastasam.BSAM:
        return cls([p], **{"num_data": 10, **kw})
    return cls([p], torch.optim.SGD, lr=0.1, **kw)


@pytest.mark.parametrize("cls,kw,match", [
    (fastasam.FriendlySAM, {"rho": -0.1}, "rho"),
    (fastasam.FriendlySAM, {"sigma": -1.0}, "sigma must be a finite number >= 0"),
    (fastasam.FriendlySAM, {"sigma": float("inf")}, "sigma must be a finite number >= 0"),
    (fastasam.FriendlySAM, {"lmbda": 1.0}, r"lmbda must be a number in \[0, 1\)"),
    (fastasam.FriendlySAM, {"lmbda": -0.1}, r"lmbda must be a number in \[0, 1\)"),
    (fastasam.FriendlySAM, {"perturb_eps": -1e-12}, "perturb_eps must be a finite number >= 0"),
    (fastasam.WSAM, {"rho": -0.1}, "rho"),
    (fastasam.WSAM, {"gamma": 1.0}, r"gamma must be a number in \[0, 1\)"),
    (fastasam.WSAM, {"gamma": -0.5}, r"gamma must be a number in \[0, 1\)"),
    (fastasam.WSAM, {"max_norm": 0.0}, "max_norm must be None .* or a finite number > 0"),
    (fastasam.WSAM, {"eps": float("nan")}, "eps must be a finite number >= 0"),
    (fastasam.BSAM, {"num_data": 0}, "num_data must be an int >= 1"),
    (fastasam.BSAM, {"num_data": 10.5}, "num_data must be an int >= 1"),
    (fastasam.BSAM, {"damping": -0.1}, "damping must be a finite number >= 0"),
    (fastasam.BSAM, {"rho": -1.0}, "rho must be a finite number >= 0"),
    (fastasam.BSAM, {"betas": (0.9, 1.0)}, r"betas\[1\] must be a number in \[0, 1\)"),
    (fastasam.BSAM, {"lr": float("nan")}, "lr must be a finite number >= 0"),
    (fastasam.BSAM, {"betas": (0.9, 0.0), "weight_decay": 0.0, "damping": 0.0}, "damping > 0"),
])
def test_bad_input_is_refused(cls, kw, match):
    with pytest.raises(ValueError, match=f"fastasam: .*{match}"):
        _build(cls, **kw)


def test_a_later_bad_value_is_refused_and_every_is_one():
    opt = _build(fastasam.FriendlySAM)
    with pytest.raises(ValueError, match="lmbda"):
        opt.lmbda = 1.5
    wsam = _build(fastasam.WSAM)
    with pytest.raises(ValueError, match="gamma"):
        wsam.gamma = 1.0
    wsam.gamma = 0.75
    assert wsam.alpha == 3.0
    for cls in (fastasam.FriendlySAM, fastasam.WSAM):
        with pytest.raises(ValueError, match="every"):
            _build(cls, every=2)
    bsam = _build(fastasam.BSAM)
    with pytest.raises(ValueError, match=r"damping must be a finite number >= 0 in param_groups\[1\]"):
        bsam.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "damping": -1.0})


# --- use_gc ---------------------------------------------------------------------------------------------------------


def test_sam_takes_use_gc_and_the_default_leaves_the_gradient_alone():
    params = small_params()
    want = gc_transcription(small_params(), 3, rho=0.05, adaptive=False, eta=0.0)
    got = sharpness_loop(fastasam.SAM(params, torch.optim.SGD, lr=LR, momentum=MOMENTUM, use_gc=True), params, 3)
    assert_trajectories_close(got, want, atol=2e-6, rtol=2e-5)
    assert not fastasam.SAM(small_params(), torch.optim.SGD, lr=LR)._transforms_first_gradient


def test_a_warm_step_without_use_gc_makes_no_python_call_per_tensor():
    """benchmarks/host_overhead.py's claim for the multi-tensor backends: a warm ASAM step makes as many Python calls
    for 200 tensors as for 20 (use_gc=False adds none); use_gc=True calls per tensor, by design."""
    def calls(n, use_gc):
        params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(n)]
        opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.1, backend="cpu", use_gc=use_gc)
        grads = [torch.randn(3, 2) for _ in params]

        def step():
            for phase in (opt.first_step, opt.second_step):
                for p, g in zip(params, grads):
                    p.grad = g.detach()  # a new gradient object at the same address, as after zero_grad + backward
                phase()
        for _ in range(3):
            step()
        count = [0]

        def profiler(frame, event, arg):
            if event in ("call", "c_call"):
                count[0] += 1
        for p, g in zip(params, grads):
            p.grad = g.detach()
        sys.setprofile(profiler)
        try:
            opt.first_step()
        finally:
            sys.setprofile(None)
        return count[0]

    if "cpu" not in fastasam.available_backends("cpu"):
        pytest.skip("the cpu backend's extension is not built")
    assert calls(20, False) == calls(200, False)
    assert calls(200, True) > calls(20, True) + 100


def test_use_gc_leaves_one_dimensional_gradients_and_centralizes_the_others():
    p2, p1 = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    opt = fastasam.ASAM([p2, p1], torch.optim.SGD, lr=0.1, use_gc=True)
    g2, g1 = torch.randn(4, 3), torch.randn(5)
    p2.grad, p1.grad = g2.clone(), g1.clone()
    opt.first_step()
    torch.testing.assert_close(p2.grad, g2 - g2.mean(dim=1, keepdim=True))
    assert torch.equal(p1.grad, g1)
    opt.second_step()
    state = copy.deepcopy(opt.state_dict())
    assert "fastasam" in state
