"""The step plan (the host path): a warm step rebuilds nothing; each change rebuilds exactly what it affects and
the numbers stay those of the oracle; fusion is decided per tensor; ``opt.report()`` says what ran."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import FAST_CASES, MULTI_TENSOR, soup_loss

import fastasam
from fastasam import _step_plan, _watch
from fastasam.backends import _multi_tensor

MULTI = [(b, d) for b, d in FAST_CASES if b in MULTI_TENSOR]
MULTI_IDS = [f"{b}-{d}" for b, d in MULTI]


@pytest.fixture(autouse=True, params=["c++", "python"] if _watch.cpp_in_use() else ["python"])
def watch_impl(request):
    """Every test here runs with the C++ pass over the tensors (fastasam._host) and with the Python one."""
    with _watch.using(request.param):
        yield request.param


@pytest.fixture
def builds(monkeypatch) -> Counter:
    """Counts every build and upload the step plan can do, by name."""
    seen: Counter = Counter()
    spied = {
        "plan": (_step_plan.StepPlan, "__init__"),
        "update plan": (_step_plan.UpdatePlan, "__init__"),
        "tables": (_multi_tensor.PerturbRunner, "__init__"),
        "addresses": (_multi_tensor.PerturbRunner, "refresh_addresses"),
        "fused tables": (_multi_tensor.UpdateRunner, "__init__"),
        "fused addresses": (_multi_tensor.UpdateRunner, "refresh_addresses"),
        "options": (_multi_tensor.PerturbRunner, "set_options"),
    }
    for what, (owner, name) in spied.items():
        real = getattr(owner, name)

        def counted(*args, real=real, what=what, **kwargs):
            seen[what] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    real_upload = _multi_tensor._upload

    def upload(dst, host, what, pinned=False):
        seen[f"upload {what}"] += 1
        return real_upload(dst, host, what, pinned)

    monkeypatch.setattr(_multi_tensor, "_upload", upload)
    return seen


def small(device: str, dtype=torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (3,), (300,), (2, 3, 4, 4), (5,), (1,)]
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(device, dtype)) for s in shapes]


def make(params, backend, **kw) -> fastasam.ASAM:
    groups = [{"params": params[:3], "rho": 0.5, "eta": 0.01}, {"params": params[3:], "rho": 0.1, "adaptive": False}]
    return fastasam.ASAM(groups, kw.pop("base", torch.optim.SGD), backend=backend,
                         **{"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, **kw})


def step(opt, params, keep_grads: bool = True) -> None:
    """One two-pass step from fresh gradients. ``keep_grads``: each new gradient is a new tensor object at the old
    gradient's address (what the caching allocator usually gives after zero_grad(set_to_none=True)); else wherever
    autograd puts it."""
    for phase in (opt.first_step, opt.second_step):
        old = [p.grad for p in params]
        for p in params:
            p.grad = None
        soup_loss(params).backward()
        if keep_grads:
            for p, g in zip(params, old):
                if g is not None and p.grad is not None and (g.dtype, g.shape) == (p.grad.dtype, p.grad.shape):
                    g.copy_(p.grad)
                    p.grad = g.detach()
        phase()


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), *FAST_CASES],
                         ids=["reference-cpu", *(f"{b}-{d}" for b, d in FAST_CASES)])
def test_a_warm_step_builds_and_uploads_nothing(backend, device, builds):
    params = small(device)
    opt = make(params, backend)
    for _ in range(3):  # the momentum buffers appear in step 1; step 2 clears their "new" flag
        step(opt, params)
    before = Counter(builds)
    for _ in range(2):
        step(opt, params)
    assert builds == before, f"a warm step did {builds - before}"
    assert before["plan"] == 1


_KEPT: list = []  # gradients kept alive so that the allocator cannot hand their memory back


def _move_a_gradient(opt, ps) -> None:
    _KEPT.append(ps[2].grad)
    ps[2].grad = torch.zeros_like(ps[2])  # the next gradient of ps[2] lands elsewhere


def _add_group(opt, ps) -> None:
    p = torch.nn.Parameter(torch.full((4,), 0.3, device=ps[0].device))
    ps.append(p)
    opt.add_param_group({"params": [p], "lr": 0.01})


REBUILD = {"plan", "tables", "options", "upload rho, eta or adaptive option", "update plan", "fused tables",
           "upload hyper-parameters", "upload optimizer state"}
# each change: what it does to the optimizer, and the builds it may cause (anything else is a defect)
CHANGES = {
    "lr (a scheduler)": (lambda opt, ps: opt.param_groups[0].__setitem__("lr", 0.02), {"upload hyper-parameters"}),
    "rho": (lambda opt, ps: opt.param_groups[1].__setitem__("rho", 0.3),
            {"options", "upload rho, eta or adaptive option"}),
    "eta": (lambda opt, ps: opt.param_groups[0].__setitem__("eta", 0.1),
            {"options", "upload rho, eta or adaptive option"}),
    "adaptive": (lambda opt, ps: opt.param_groups[1].__setitem__("adaptive", True),
                 {"options", "upload rho, eta or adaptive option"}),
    "a gradient moves": (_move_a_gradient, {"addresses", "fused addresses", "upload gradient addresses"}),
    "momentum set to 0": (lambda opt, ps: opt.param_groups[0].__setitem__("momentum", 0.0),
                          {"update plan", "fused tables", "upload hyper-parameters"}),
    "rho set to 0": (lambda opt, ps: opt.param_groups[1].__setitem__("rho", 0.0), REBUILD),
    "a parameter moves": (lambda opt, ps: setattr(ps[1], "data", ps[1].data.clone()), REBUILD),
    "add_param_group": (_add_group, REBUILD),
    "load_state_dict": (lambda opt, ps: opt.load_state_dict(copy.deepcopy(opt.state_dict())), REBUILD),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("backend,device", MULTI, ids=MULTI_IDS)
def test_each_change_rebuilds_only_what_it_affects_and_matches_the_oracle(backend, device, change, builds):
    do, allowed = CHANGES[change]
    ours, ref = small(device), small(device)
    opt, ref_opt = make(ours, backend), make(ref, "reference")
    for _ in range(3):
        step(opt, ours)
        step(ref_opt, ref)
    before = Counter(builds)
    do(opt, ours)
    do(ref_opt, ref)
    step(opt, ours)
    step(ref_opt, ref)
    done = set((builds - before).keys())
    assert done, f"{change} took effect without any rebuild or upload"
    assert done <= allowed, f"{change} caused {done - allowed}"
    step(opt, ours)  # new optimizer state (momentum buffers of new tensors) settles here
    step(ref_opt, ref)
    settled = Counter(builds)
    step(opt, ours)
    step(ref_opt, ref)
    assert builds == settled, f"still rebuilding two steps after {change}: {builds - settled}"
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert opt.report().fused > 0


def test_lr_scheduler_changes_reach_the_fused_update():
    params, ref = small("cpu"), small("cpu")
    backend = "triton" if any(b == "triton" for b, _ in FAST_CASES) else "foreach"
    opt, ref_opt = make(params, backend), make(ref, "reference")
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4) for o in (opt, ref_opt)]
    for _ in range(4):
        step(opt, params)
        step(ref_opt, ref)
        for sched in scheds:
            sched.step()
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --- fusion per tensor -------------------------------------------------------------------------------------------


def mixed_params(device: str) -> tuple[list[torch.nn.Parameter], torch.nn.Parameter, torch.nn.Parameter]:
    """Two groups' worth of tensors with one of each kind the fused kernels cannot take or need not touch: a
    channels_last weight that will get a contiguous gradient, a zero-size tensor and a tensor with no gradient."""
    gen = torch.Generator().manual_seed(5)
    make_ = lambda *s: torch.nn.Parameter((torch.randn(*s, generator=gen) * 0.5).to(device))  # noqa: E731
    cl = torch.nn.Parameter((torch.randn(4, 3, 3, 3, generator=gen) * 0.5).to(device)
                            .contiguous(memory_format=torch.channels_last))
    unused = make_(6)
    params = [make_(9, 4), cl, make_(0), make_(300), make_(5), unused]
    return params, cl, unused


def mixed_run(backend, device, base, kwargs, steps=4):
    params, cl, unused = mixed_params(device)
    used = [p for p in params if p is not unused]
    groups = [{"params": params[:3], "rho": 0.5, "lr": 0.05}, {"params": params[3:], "rho": 0.1, "adaptive": False}]
    opt = fastasam.ASAM(groups, base, backend=backend, **kwargs)
    history, reports = [], []
    for _ in range(steps):
        for _pass in range(2):
            soup_loss(used).backward()
            cl.grad = cl.grad.contiguous()  # a gradient laid out unlike its channels_last parameter
            if _pass == 0:
                opt.first_step(zero_grad=True)
            else:
                opt.second_step(zero_grad=True)
        history.append([p.detach().clone() for p in params])
        reports.append(opt.report())
    return history, reports


MIXED_BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "adam": (torch.optim.Adam, {"lr": 0.01, "weight_decay": 1e-3, "amsgrad": True}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
}


@pytest.mark.parametrize("base", list(MIXED_BASES))
@pytest.mark.parametrize("backend,device", MULTI, ids=MULTI_IDS)
def test_mixed_fused_and_unfused_tensors_in_one_step_match_the_oracle(backend, device, base):
    cls, kwargs = MIXED_BASES[base]
    got, reports = mixed_run(backend, device, cls, kwargs)
    want, _ = mixed_run("reference", device, cls, kwargs)
    for step_got, step_want in zip(got, want):
        for a, b in zip(step_got, step_want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for r in reports:  # every step: 3 fused (incl. the zero-size one), the channels_last one on foreach + base step
        (b,) = r.buckets
        assert r.second_step == "fused"
        assert (b.tensors, b.kernel, b.perturbed, b.fused) == (5, 4, 5, 4)
        assert b.foreach == {"its gradient is laid out unlike the parameter": 1}
        assert b.base_step == {"its gradient is laid out unlike the parameter": 1}
        assert b.restore_only == {}


def test_the_report_explains_each_path():
    params = small("cpu")
    opt = make(params, "foreach")
    assert "no step has run yet" in str(opt.report())
    step(opt, params)
    report = opt.report()
    (b,) = report.buckets
    assert b.backend == "foreach" and b.kernel == 0 and b.fused == 0 and b.tensors == len(params)
    assert b.base_step == {"backend foreach has no fused update": len(params)}
    text = str(report)
    assert "foreach" in text and "base step" in text

    rms = fastasam.ASAM(params, torch.optim.RMSprop, backend="reference", lr=0.01)
    step(rms, params)
    assert "RMSprop has no fused update" in rms.report().second_step

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = make(params, "reference")
    soup_loss(params).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(soup_loss(params)).backward()
    scaler.step(opt)
    scaler.update()
    assert "GradScaler" in opt.report().second_step


@pytest.mark.parametrize("backend,device", MULTI, ids=MULTI_IDS)
def test_the_report_counts_rho_zero_and_missing_second_gradients(backend, device):
    params = small(device)
    opt = make(params, backend)
    opt.param_groups[1]["rho"] = 0.0  # params[3:]: in the norm, not perturbed, stepped by the base optimizer
    soup_loss(params).backward()
    opt.first_step(zero_grad=True)
    soup_loss(params[1:]).backward()  # params[0]: no gradient in the second pass
    opt.second_step(zero_grad=True)
    (b,) = opt.report().buckets
    assert (b.tensors, b.perturbed, b.fused) == (6, 3, 2)
    assert b.restore_only == {"no gradient in the second pass": 1}
    assert b.base_step == {"rho = 0: not perturbed": 3}


@pytest.mark.parametrize("backend,device", MULTI, ids=MULTI_IDS)
def test_a_gradient_laid_out_differently_at_the_same_address_is_noticed(backend, device):
    """The watch compares layouts too: a gradient transposed in place of the old one (same address, other strides)
    must not be read element for element as if it were laid out like its parameter."""
    ours, ref = small(device), small(device)
    opt, ref_opt = make(ours, backend), make(ref, "reference")
    for _ in range(2):
        step(opt, ours)
        step(ref_opt, ref)
    w = ours[0]  # (7, 5), contiguous
    for phase, ref_phase in ((opt.first_step, ref_opt.first_step), (opt.second_step, ref_opt.second_step)):
        grads = [torch.randn(p.shape, device=device) * 0.1 for p in ours]
        for p, q, g in zip(ours, ref, grads):
            q.grad = g.clone()
            p.grad.copy_(g)
            p.grad = p.grad.detach()
        old = w.grad
        w.grad = old.new_empty(0).set_(old.untyped_storage(), 0, (7, 5), (1, 7))  # same address, transposed
        w.grad.copy_(grads[0])
        assert w.grad.data_ptr() == old.data_ptr() and not w.grad.is_contiguous()
        phase()
        ref_phase()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert opt.report().buckets[0].foreach == {"its gradient is laid out unlike the parameter": 1}


@pytest.mark.parametrize("backend,device", MULTI, ids=MULTI_IDS)
def test_a_fused_adam_checkpoint_resumes_in_plain_torch_adamw(backend, device, tmp_path):
    """The fused Adam keeps each tensor's step count as its own element of one CPU tensor per group; saved and
    loaded into torch.optim.AdamW, every tensor still counts its own steps (a shared counter would be counted once per
    tensor)."""
    ours, ref = small(device), small(device)
    kw = {"lr": 0.01, "weight_decay": 0.01}
    opt = fastasam.ASAM(ours, torch.optim.AdamW, backend=backend, **kw)
    ref_opt = fastasam.ASAM(ref, torch.optim.AdamW, backend="reference", **kw)
    for _ in range(3):
        step(opt, ours)
        step(ref_opt, ref)
    assert opt.report().fused == len(ours)
    torch.save(opt.state_dict(), tmp_path / "ckpt.pt")
    plain = torch.optim.AdamW(ours, **kw)
    plain.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    for o, ps in ((plain, ours), (ref_opt.base_optimizer, ref)):
        soup_loss(ps).backward()
        o.step()
        o.zero_grad()
    assert [float(plain.state[p]["step"]) for p in ours] == [4.0] * len(ours)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend,device", [("foreach", "cpu"), *MULTI], ids=["foreach-cpu", *MULTI_IDS])
def test_a_dtype_change_mid_training_rebuilds_and_matches_the_oracle(backend, device):
    """model.double() after a few steps: the plan is rebuilt for the new dtype (new restore buffers); the fp32
    momentum buffers no longer match, so those tensors are left to torch's SGD; the numbers are the oracle's."""
    ours, ref = small(device), small(device)
    opt, ref_opt = make(ours, backend), make(ref, "reference")
    for _ in range(2):
        step(opt, ours)
        step(ref_opt, ref)
    for p in [*ours, *ref]:
        p.data = p.data.double()
    for _ in range(2):
        step(opt, ours)
        step(ref_opt, ref)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    (b,) = opt.report().buckets
    assert b.dtype == "float64" and b.fused == 0


# --- the second step's protocol: a warm second_step crosses few module boundaries --------------------------------


def _fastasam_crossings(fn) -> list[tuple[str, str, str]]:
    """``(caller module, callee module, function)`` for every call from one fastasam module into another (Python
    functions, and C functions whose ``__module__`` is a fastasam extension) while ``fn()`` runs."""
    seen = []

    def profile(frame, event, arg):
        if event == "call":
            callee, back = frame.f_globals.get("__name__", ""), frame.f_back
            caller = back.f_globals.get("__name__", "") if back is not None else ""
            name = frame.f_code.co_name
        elif event == "c_call":
            callee, caller, name = getattr(arg, "__module__", None) or "", frame.f_globals.get("__name__", ""), \
                getattr(arg, "__name__", "")
        else:
            return
        if callee != caller and callee.startswith("fastasam") and caller.startswith("fastasam"):
            seen.append((caller, callee, name))

    import sys

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def _warm_second_step_crossings(backend: str) -> list[tuple[str, str, str]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, backend=backend, rho=0.5, lr=0.1, momentum=0.9)
    x = torch.randn(4, 8)
    for _ in range(3):  # gradients accumulated in place: the same tensors every step, so the plans stay warm
        model(x).sum().backward()
        opt.first_step()
        model(x).sum().backward()
        opt.second_step()
    model(x).sum().backward()
    opt.first_step()
    model(x).sum().backward()
    crossings = _fastasam_crossings(opt.second_step)
    assert opt.report().second_step == "fused" and opt.backend == backend
    return crossings


needs_cpu_kernels = pytest.mark.skipif("cpu" not in fastasam.available_backends("cpu"),
                                       reason="fastasam._cpu is not built")


@needs_cpu_kernels
def test_a_warm_second_step_crosses_at_most_five_module_boundaries():
    """The update plan owns its protocol: the engine makes one call for the restore (fused with the update) and one
    for the base optimizer's step on the rest; the plan checks its watch and runs its fused update, one call each."""
    crossings = _warm_second_step_crossings("cpu")
    assert len(crossings) <= 5, crossings
    assert [c[:2] for c in crossings if c[0] == "fastasam._engine"] == [("fastasam._engine", "fastasam._step_plan")] * 2


@needs_cpu_kernels
def test_the_crossing_count_sees_a_call_through_another_module(monkeypatch):
    """The count is not blind: the same step with the plan's ``finish`` replaced by a function that lives in another
    fastasam module (``fastasam.report``) and calls the real one counts one crossing more."""
    import fastasam.report as report_module

    before = len(_warm_second_step_crossings("cpu"))
    finish = _step_plan.StepPlan.finish

    def via_report(self, base, outcome):
        return finish(self, base, outcome)

    planted = type(via_report)(via_report.__code__, report_module.__dict__, "finish", None, via_report.__closure__)
    monkeypatch.setattr(_step_plan.StepPlan, "finish", planted)
    after = _warm_second_step_crossings("cpu")
    assert len(after) == before + 1 and len(after) > 5, after  # the limit above would catch it
