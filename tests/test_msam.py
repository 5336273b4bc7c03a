"""Momentum-SAM (``fastasam.MSAM``): the oracle (``backends/reference.py``) against an independent transcription of the
authors' algorithm, every backend against the oracle step after step with a ``state_dict`` reload in the middle (every
dtype the backend's kernels take, awkward sizes), ``unperturbed()``, checkpoints, GradScaler and the refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import DTYPE_TOLERANCES, FAST_CASES, kernels_take

import fastasam

CASES = [("reference", "cpu"), *FAST_CASES]
IDS = [f"{b}-{d}" for b, d in CASES]
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3), 0.3),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=1e-2), 0.5),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=0.01, weight_decay=1e-2, amsgrad=True), 0.5),
}
STEPS, RELOAD_AT = 8, 4


def _params(dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[torch.nn.Parameter]:
    """Awkward shapes: one element, empty, a tail past a multiple of the vector width, channels_last, transposed,
    and a run of tiny tensors."""
    gen = torch.Generator().manual_seed(11)

    def make(shape, layout=lambda t: t):
        return torch.nn.Parameter(layout((torch.randn(shape, generator=gen) * 0.5).to(device, dtype)))

    return [make((1,)), make((9, 41)), make((0,)), make((4097,)), make((8, 3, 5, 5),
            lambda t: t.contiguous(memory_format=torch.channels_last)), make((41, 9), lambda t: t.t()),
            *(make((n,)) for n in range(1, 12))]


def _loss(params) -> torch.Tensor:
    return sum(((p.float() - 0.1) ** 2).sum() * 0.5 + torch.sin(3 * p.float()).sum() * 0.1 for p in params)


def _make(params, base: str, backend: str, adaptive: bool = False):
    cls, kw, rho = BASES[base]
    groups = [{"params": params[:6], "adaptive": adaptive}, {"params": params[6:], "rho": rho / 2}]
    return fastasam.MSAM(groups, cls, rho=rho, backend=backend, **kw)


def _trajectory(params, make, steps: int = STEPS, reload_at: int | None = RELOAD_AT):
    """The plain loop; at ``reload_at`` the optimizer is replaced by a new one loaded from the old one's state."""
    opt, history = make(params), []
    for step in range(steps):
        if step == reload_at:
            saved = copy.deepcopy(opt.state_dict())
            opt = make(params)
            opt.load_state_dict(saved)
        opt.zero_grad()
        _loss(params).backward()
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt


# --- the oracle against the authors' algorithm ------------------------------------------------------------------------


def _authors_sgd(params, steps, lr, momentum, weight_decay, rho):
    """The authors' SGD Momentum-SAM step, op for op as their code orders it (written here from the paper's
    algorithm), on one param group."""
    bufs = [torch.zeros_like(p) for p in params]
    inv = 0.0
    for _ in range(steps):
        grads = _grads(params)
        for p, g, b in zip(params, grads, bufs, strict=True):
            d = g + weight_decay * p
            p.add_(b, alpha=rho * inv)
            b.mul_(momentum).add_(d)
            p.add_(b, alpha=-lr)
        inv = 1 / (torch.norm(torch.stack([b.norm() for b in bufs])) + 1e-12)
        for p, b in zip(params, bufs, strict=True):
            p.sub_(b, alpha=float(rho * inv))


def _authors_adamw(params, steps, lr, betas, eps, weight_decay, rho):
    """The authors' AdamW Momentum-SAM step (decoupled decay after the update)."""
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    factor = 0.0
    b1, b2 = betas
    for t in range(1, steps + 1):
        grads = _grads(params)
        for p, g, mi, vi in zip(params, grads, m, v, strict=True):
            p.add_(mi, alpha=factor)
            mi.mul_(b1).add_(g, alpha=1 - b1)
            vi.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (vi.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
            p.addcdiv_(mi, denom, value=-lr / (1 - b1**t))
            p.mul_(1 - lr * weight_decay)
        factor = float(rho / (torch.norm(torch.stack([x.norm() for x in m])) + 1e-12))
        for p, mi in zip(params, m, strict=True):
            p.sub_(mi, alpha=factor)


def _grads(params) -> list[torch.Tensor]:
    leaves = [p.detach().clone().requires_grad_() for p in params]
    with torch.enable_grad():
        _loss(leaves).backward()
    return [x.grad for x in leaves]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_the_oracle_is_the_authors_algorithm(base):
    """fastasam's reference MSAM (one param group) follows the authors' algorithm, op for op in fp32 up to the
    rounding of reordered products (their ``m * beta1 + (1 - beta1) * g`` is torch's ``lerp``), for 10 steps."""
    params = _params()
    want = [p.detach().clone() for p in params]
    with torch.no_grad():
        if base == "sgd":
            _authors_sgd(want, 10, 0.05, 0.9, 1e-3, 0.3)
            opt = fastasam.MSAM(params, torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9, weight_decay=1e-3,
                                backend="reference")
        else:
            _authors_adamw(want, 10, 0.01, (0.9, 0.999), 1e-8, 1e-2, 0.5)
            opt = fastasam.MSAM(params, torch.optim.AdamW, rho=0.5, lr=0.01, weight_decay=1e-2, backend="reference")
    for _ in range(10):
        opt.zero_grad()
        _loss(params).backward()
        opt.step()
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.detach(), w, atol=2e-6, rtol=1e-5)


# --- every backend against the oracle ---------------------------------------------------------------------------------


def _dtype_cases():
    out, ids = [], []
    for backend, device in CASES:
        for dtype, atol, rtol in DTYPE_TOLERANCES:
            if backend in ("cpu", "triton", "cuda", "cuda_shim") and not kernels_take(backend, device, (dtype,),
                                                                                       fused=True):
                continue
            out.append((backend, device, dtype, atol, rtol))
            ids.append(f"{backend}-{device}-{str(dtype).replace('torch.', '')}")
    return pytest.mark.parametrize("backend,device,dtype,atol,rtol", out, ids=ids)


@_dtype_cases()
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("adaptive", [False, True], ids=["msam", "adaptive"])
def test_every_backend_equals_the_oracle_and_resumes_bit_exactly(backend, device, dtype, atol, rtol, base, adaptive):
    """8 steps with a reload in the middle: equal to the oracle within the dtype's tolerance, and equal to the bit to
    the same backend's run without the reload."""
    def make(ps, b=backend):
        return _make(ps, base, b, adaptive)

    got, opt = _trajectory(_params(dtype, device), make)
    plain, _ = _trajectory(_params(dtype, device), make, reload_at=None)
    want, _ = _trajectory(_params(dtype, "cpu"), lambda ps: make(ps, "reference"))
    for step, (g_step, p_step, w_step) in enumerate(zip(got, plain, want, strict=True)):
        for i, (g, p, w) in enumerate(zip(g_step, p_step, w_step, strict=True)):
            assert torch.equal(g, p), f"step {step}, tensor {i}: the reload changed the trajectory"
            torch.testing.assert_close(g.float().cpu(), w.float(), atol=atol, rtol=rtol,
                                       msg=f"step {step}, tensor {i} differs from the oracle")
    if backend in ("cpu", "triton", "cuda", "cuda_shim"):
        assert opt.backend == backend  # the kernels took every tensor


@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_unperturbed_holds_w_inside_and_gives_w_tilde_back_bit_for_bit(backend, device):
    params = _params(torch.float32, device)
    opt = _make(params, "sgd", backend)
    for _ in range(3):
        opt.zero_grad()
        _loss(params).backward()
        opt.step()
    perturbed = [p.detach().clone() for p in params]
    with opt.unperturbed():
        inside = [p.detach().clone() for p in params]
        with pytest.raises(RuntimeError, match="inside unperturbed"):
            opt.state_dict()
    assert all(torch.equal(p, q) for p, q in zip(params, perturbed, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(inside, perturbed, strict=True))
    # inside: the weights one step of the plain loop gives before its perturbation (the oracle's move back)
    factor = float(opt.state_dict()["fastasam"]["factors"][0])
    mom = opt.state[params[1]]["momentum_buffer"]
    torch.testing.assert_close(inside[1], (perturbed[1] + factor * mom).detach(), atol=1e-6, rtol=1e-5)


def test_between_steps_the_weights_sit_at_the_perturbed_point():
    """One step: w~ = w - a * m with a = rho / ||m||, m = the momentum buffer (SGD's first step: m = d)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = fastasam.MSAM([p], torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, backend="reference")
    p.grad = torch.tensor([0.5, 0.25, -1.0])
    opt.step()
    m = torch.tensor([0.5, 0.25, -1.0])
    w = torch.tensor([1.0, -2.0, 0.5]) - 0.1 * m
    torch.testing.assert_close(p.detach(), w - 0.3 / m.norm() * m)
    assert torch.equal(opt.state[p]["momentum_buffer"], m)


@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_a_non_finite_gradient_under_gradscaler_skips_the_step_and_training_goes_on(backend, device):
    params = _params(torch.float32, device)
    opt = _make(params, "sgd", backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)

    def step(poison: bool = False):
        opt.zero_grad()
        scaler.scale(_loss(params)).backward()
        if poison:
            params[1].grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    step()
    before = [p.detach().clone() for p in params]
    mom = [opt.state[p]["momentum_buffer"].clone() for p in params]
    step(poison=True)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(params, mom, strict=True))
    assert scaler.get_scale() == 2.0**9
    step()
    assert not torch.equal(params[1], before[1])


@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_gradscaler_gives_the_unscaled_steps(backend, device):
    a, b = _params(torch.float32, device), _params(torch.float32, device)
    opt_a, opt_b = _make(a, "adamw", backend), _make(b, "adamw", backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8, growth_interval=1000)
    for _ in range(4):
        opt_a.zero_grad()
        _loss(a).backward()
        opt_a.step()
        opt_b.zero_grad()
        scaler.scale(_loss(b)).backward()
        scaler.step(opt_b)
        scaler.update()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)


def test_a_non_finite_momentum_norm_perturbs_nothing():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = fastasam.MSAM([p], torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, backend="reference")
    p.grad = torch.tensor([float("nan"), 1.0])
    opt.step()
    assert bool(opt.perturbation_skipped) and opt.state_dict()["fastasam"]["factors"] == [0.0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=-0.1), "rho=-0.1"), (dict(rho=float("nan")), "rho=nan"), (dict(eta=-1.0), "eta=-1.0"),
    (dict(momentum=0.0), "momentum=0.0"), (dict(momentum=0.9, nesterov=True), "nesterov=True"),
    (dict(momentum=0.9, dampening=0.1), "dampening=0.1"),
])
def test_bad_options_are_refused_at_construction_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastasam.MSAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, **kwargs)


def test_another_base_optimizer_is_refused_naming_the_ones_that_work():
    with pytest.raises(TypeError, match="SGD .*AdamW.*Adam"):
        fastasam.MSAM([torch.nn.Parameter(torch.ones(2))], torch.optim.RMSprop, lr=0.1)


def test_a_state_of_another_base_optimizer_is_refused():
    p = torch.nn.Parameter(torch.ones(3))
    sgd = fastasam.MSAM([p], torch.optim.SGD, lr=0.1, momentum=0.9)
    adam = fastasam.MSAM([p], torch.optim.AdamW, lr=0.1)
    with pytest.raises(ValueError, match="AdamW"):
        adam.load_state_dict(sgd.state_dict())


@pytest.mark.parametrize("backend,device", [c for c in CASES if c[0] != "reference"],
                         ids=[i for i in IDS if not i.startswith("reference")])
def test_a_warm_step_keeps_its_plan_and_a_learning_rate_schedule_reaches_it(backend, device):
    params = _params(torch.float32, device)
    opt = _make(params, "adamw", backend)
    ref_params = _params(torch.float32, device)
    ref = _make(ref_params, "adamw", "reference")
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref)]
    plans = set()
    for _ in range(5):
        for o, ps in ((opt, params), (ref, ref_params)):
            o.zero_grad()
            _loss(ps).backward()
            o.step()
        plans.add(id(opt._plan))
        for s in scheds:
            s.step()
    assert len(plans) == 1
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.cpu(), q.cpu(), atol=1e-6, rtol=1e-5)


def test_no_memory_beyond_the_base_optimizers_own_state():
    """Non-adaptive MSAM keeps nothing parameter-sized of its own (the momentum buffer is SGD's)."""
    params = _params()
    opt = _make(params, "sgd", "auto")
    opt.zero_grad()
    _loss(params).backward()
    opt.step()
    assert not opt._buffers
    assert all(set(opt.state[p]) == {"momentum_buffer"} for p in params)
