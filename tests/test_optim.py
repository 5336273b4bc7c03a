"""Behaviour users rely on, for the oracle and every fast backend."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import FAST_CASES, awkward_params, soup_loss

import fastasam
from fastasam import backends
from fastasam.backends import foreach

ALL_CASES = [("reference", "cpu"), *FAST_CASES]
ALL_IDS = [f"{b}-{d}" for b, d in ALL_CASES]


def two_pass(opt, params, loss=soup_loss):
    loss(params).backward()
    opt.first_step(zero_grad=True)
    loss(params).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend,device", ALL_CASES, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rho_zero_is_the_base_optimizer_exactly(backend, device, dtype):
    ours = awkward_params(device, dtype)
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fastasam.ASAM(ours, torch.optim.SGD, rho=0.0, backend=backend, lr=0.1, momentum=0.9, weight_decay=1e-4)
    sgd = torch.optim.SGD(plain, lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(4):
        two_pass(opt, ours)
        soup_loss(plain).backward()
        sgd.step()
        sgd.zero_grad()
    for a, b in zip(ours, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", ALL_CASES, ids=ALL_IDS)
@pytest.mark.parametrize("eps", [1e-12, 0.0])
def test_zero_gradient_gives_no_perturbation_and_no_nan(backend, device, eps):
    params = awkward_params(device, torch.float32)
    before = [p.detach().clone() for p in params]
    opt = fastasam.ASAM(params, torch.optim.SGD, eps=eps, backend=backend, lr=0.1)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.first_step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert opt.grad_norm.item() == 0 and not opt.perturbation_skipped.item()
    opt.second_step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("backend,device", ALL_CASES, ids=ALL_IDS)
@pytest.mark.parametrize("restore", ["copy", "subtract"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_first_pass_leaves_weights_untouched(backend, device, restore, bad, dtype):
    params = awkward_params(device, dtype)
    soup_loss(params).backward()
    params[2].grad[17] = bad  # one poisoned element, as an fp16 overflow would leave
    before = [p.detach().clone() for p in params]
    opt = fastasam.ASAM(params, torch.optim.SGD, backend=backend, restore=restore, lr=0.1)
    opt.first_step(zero_grad=True)
    assert opt.perturbation_skipped.item()
    for p, b in zip(params, before):
        assert torch.equal(p, b), "a non-finite norm must not perturb any weight"
    soup_loss(params).backward()
    opt.second_step()
    for p in params:  # restore left no NaN behind; the base step then ran on finite gradients
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("backend,device", ALL_CASES, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_copy_restore_is_bit_exact(backend, device, dtype):
    params = awkward_params(device, dtype)
    soup_loss(params).backward()
    before = [p.detach().clone() for p in params]
    opt = fastasam.ASAM(params, torch.optim.SGD, rho=2.0, backend=backend, lr=0.0)
    opt.first_step(zero_grad=True)
    assert sum(not torch.equal(p, b) for p, b in zip(params, before)) > len(params) // 2
    opt.second_step()  # lr = 0: the base step changes nothing
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def _free_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


# the oracle's per-tensor fp32 temporaries would need 16 GB more and the Triton interpreter hours; on a GPU every
# fast backend runs it. On the CPU it takes 16 GB of host memory: the bigmem tier (make test-bigmem), not make test.
_HUGE_CASES = [pytest.param("foreach", "cpu", marks=pytest.mark.bigmem, id="foreach-cpu")] + [
    pytest.param(b, d, id=f"{b}-{d}") for b, d in FAST_CASES if d == "cuda"]


@pytest.mark.parametrize("backend,device", _HUGE_CASES)
def test_a_tensor_of_more_than_2_31_elements(backend, device):
    """A bf16 tensor of 2^31 + 7 elements (4 GiB, 12 GiB with its gradient and restore buffer): elements on both
    sides of 2^31 are perturbed and stepped exactly as computed by hand."""
    n = 2**31 + 7
    need = 16 << 30  # three 4 GiB tensors and a 2 GiB comparison
    if _free_bytes(device) < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free on {device}, has {_free_bytes(device) / 2**30:.0f}")
    probes = {0: (2.0, -3.0), 2**31 - 1: (-0.5, 4.0), 2**31: (3.0, 0.25), 2**31 + 1: (-1.5, -2.0), n - 1: (0.75, 8.0)}
    w = torch.nn.Parameter(torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1.0))
    g = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1.0)
    at = torch.tensor(list(probes), device=device)
    w.data[at] = torch.tensor([v for v, _ in probes.values()], dtype=torch.bfloat16, device=device)
    g[at] = torch.tensor([v for _, v in probes.values()], dtype=torch.bfloat16, device=device)
    w.grad = g
    norm = ((n - len(probes)) + sum((v * d) ** 2 for v, d in probes.values())) ** 0.5
    # ASAM with eta = 0: e = rho * w^2 * g / norm; rho = norm / 4 makes every e exact in bf16
    opt = fastasam.ASAM([w], torch.optim.SGD, rho=norm / 4, eta=0.0, lr=0.5, backend=backend)
    opt.first_step()
    assert opt.grad_norm.item() == pytest.approx(norm, rel=1e-6)
    got = w.detach()[at].float().tolist()
    assert got == [v + v * v * d / 4 for v, d in probes.values()]
    assert bool((w.detach()[2**31 + 2 : n - 1] == 1.25).all()) and bool((w.detach()[1 : 2**31 - 1] == 1.25).all())
    opt.second_step()  # restore, then w <- w - 0.5 g
    assert w.detach()[at].float().tolist() == [v - 0.5 * d for v, d in probes.values()]
    assert bool((w.detach()[2**31 + 2 : n - 1] == 0.5).all()) and bool((w.detach()[1 : 2**31 - 1] == 0.5).all())


def _transient_peak(fn, device: str) -> int:
    """The most bytes held at once by tensors that ``fn`` allocates (whether it frees them or not)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


# the Triton interpreter copies every tensor a kernel touches to the host, so only a GPU measures the fused backends
_MEMORY_CASES = [("foreach", "cpu")] + [(b, d) for b, d in FAST_CASES if d == "cuda"]


@pytest.mark.parametrize("backend,device", _MEMORY_CASES, ids=[f"{b}-{d}" for b, d in _MEMORY_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_is_one_parameter_sized_buffer_beyond_the_base_optimizer(backend, device, dtype):
    """The step keeps one parameter-sized restore buffer; everything else it allocates is a few chunks,
    short-lived, however large the model or one of its tensors (here one tensor is 128 chunks long)."""
    chunk = foreach.chunk_numel(torch.device(device))
    shapes = [(128 * chunk,), (3 * chunk + 5,), (chunk // 3, 3), (7,), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    size = sum(p.numel() * p.element_size() for p in params)
    opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.01, momentum=0.9, backend=backend)

    def step():
        opt.first_step()
        opt.second_step()

    temporaries = 8 * chunk * 4  # eight fp32 chunks
    assert temporaries < size / 4  # so a parameter-sized temporary could not pass for one
    first = _transient_peak(step, device)  # makes the restore buffer, and the base optimizer its momentum
    assert first <= 2 * size + temporaries, f"the first step held {first / size:.2f} x the parameters' bytes"
    kept = sum(b.numel() * b.element_size() for b in opt._engine._buffers.values())
    assert kept == size, "the restore buffer is one parameter-sized buffer"
    base = _transient_peak(opt.base_optimizer.step, device)
    steady = _transient_peak(step, device)
    assert steady <= base + temporaries, (
        f"a step held {steady / size:.2f} x the parameters' bytes, the base optimizer alone {base / size:.2f}")


def test_step_closure_equals_first_and_second_step():
    a = awkward_params("cpu", torch.float32)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = fastasam.ASAM(a, torch.optim.SGD, lr=0.1, momentum=0.9)
    opt_b = fastasam.ASAM(b, torch.optim.SGD, lr=0.1, momentum=0.9)

    def closure():
        loss = soup_loss(a)
        loss.backward()
        return loss

    for _ in range(3):
        with torch.no_grad():  # step() turns grad on for the closure itself
            loss = opt_a.step(closure)
        opt_a.zero_grad()
        expected = soup_loss(b)
        expected.backward()
        opt_b.first_step(zero_grad=True)
        soup_loss(b).backward()
        opt_b.second_step(zero_grad=True)
        assert torch.equal(loss.detach(), expected.detach())
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_aliases():
    assert fastasam.ASAM.ascent_step is fastasam.ASAM.first_step
    assert fastasam.ASAM.descent_step is fastasam.ASAM.second_step


def test_param_groups_and_state_are_shared_with_the_base_optimizer():
    model = torch.nn.Linear(4, 3)
    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    assert opt.param_groups[0]["rho"] == 0.5 and opt.param_groups[0]["momentum"] == 0.9
    extra = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "rho": 0.1, "lr": 0.5})
    assert opt.base_optimizer.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["eta"] == 0.01


def test_lr_scheduler_drives_the_base_optimizer_without_warnings():
    model = torch.nn.Linear(4, 3)
    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            two_pass(opt, None, loss=lambda _: model(x).square().mean())
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_per_group_rho_is_read_every_step():
    """A rho schedule written into param_groups takes effect at the next first_step."""
    params = awkward_params("cpu", torch.float32)[:3]
    opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.0, rho=0.5)
    soup_loss(params).backward()
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["rho"] = 0.0
    opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    opt.second_step()


def test_state_dict_round_trip_keeps_base_state_and_options():
    model = torch.nn.Linear(4, 3)
    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.3)
    two_pass(opt, None, loss=lambda _: model(torch.ones(2, 4)).sum())
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["rho"] == 0.3 and saved["state"][0]["momentum_buffer"].shape == (3, 4)
    fresh = fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.5, momentum=0.9, rho=0.9)
    fresh.load_state_dict(saved)
    assert fresh.param_groups is fresh.base_optimizer.param_groups and fresh.state is fresh.base_optimizer.state
    assert fresh.param_groups[0]["rho"] == 0.3 and fresh.param_groups[0]["lr"] == 0.1
    assert torch.equal(fresh.state[model.weight]["momentum_buffer"], opt.state[model.weight]["momentum_buffer"])


def test_loading_a_plain_base_optimizer_checkpoint_fills_asam_options():
    model = torch.nn.Linear(4, 3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.3)
    opt.load_state_dict(sgd.state_dict())
    assert opt.param_groups[0]["rho"] == 0.3 and opt.param_groups[0]["adaptive"] is True


def test_grad_none_and_frozen_params_are_skipped():
    used = torch.nn.Parameter(torch.randn(5))
    unused = torch.nn.Parameter(torch.randn(5))
    before = unused.detach().clone()
    opt = fastasam.ASAM([used, unused], torch.optim.SGD, lr=0.1)
    two_pass(opt, [used])
    assert torch.equal(unused, before) and unused.grad is None


@pytest.mark.parametrize("backend,device", ALL_CASES, ids=ALL_IDS)
def test_gradients_are_not_kept_alive(backend, device):
    """Neither pass's gradients may outlive zero_grad(): a plan that kept them would hold a parameter-sized set of
    gradients through the next forward pass."""
    import weakref

    params = [torch.nn.Parameter(torch.randn(100, device=device)), torch.nn.Parameter(torch.randn(7, 3, device=device))]
    opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    for _ in range(2):
        soup_loss(params).backward()
        first = [weakref.ref(p.grad) for p in params]
        opt.first_step(zero_grad=True)
        assert all(r() is None for r in first), "a first-pass gradient outlived zero_grad()"
        soup_loss(params).backward()
        second = [weakref.ref(p.grad) for p in params]
        opt.second_step(zero_grad=True)
        assert all(r() is None for r in second), "a second-pass gradient outlived zero_grad()"


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_no_host_synchronisation(backend):
    """On the meta device every read of a value on the host (item(), bool(), .cpu() of data) raises, so a step that
    completes there never synchronises."""
    params = [torch.nn.Parameter(torch.empty(shape, device="meta", dtype=dt))
              for shape, dt in (((5, 3), torch.float32), ((7,), torch.bfloat16), ((0,), torch.float16))]
    for p in params:
        p.grad = torch.empty_like(p)
    groups = [{"params": params[:1]}, {"params": params[1:], "adaptive": False, "rho": 0.1}]
    for restore in ("copy", "subtract"):
        opt = fastasam.ASAM(groups, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, restore=restore)
        for _ in range(2):
            opt.first_step()
            opt.second_step()
        assert opt.grad_norm.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):
        opt.grad_norm.item()  # the probe itself works


# --- bad input: a clear error that names the problem ------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"rho": -0.1}, "rho=-0.1"), ({"eta": -1.0}, "eta=-1.0"), ({"eps": -1e-12}, "eps"),
    ({"rho": float("nan")}, "rho=nan"), ({"backend": "cuda-magic"}, "unknown backend 'cuda-magic'"),
    ({"restore": "swap"}, "restore='swap'"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastasam.ASAM(torch.nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_group_option_raises():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"rho=-1 in param_groups\[0\]"):
        fastasam.ASAM([{"params": model.parameters(), "rho": -1}], torch.optim.SGD, lr=0.1)
    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="eta=-2"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "eta": -2})
    opt.param_groups[0]["rho"] = -0.5  # e.g. a broken rho schedule
    model(torch.ones(1, 2)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"rho=-0.5 in param_groups\[0\]"):
        opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not opt.perturbed


@pytest.mark.parametrize("base,match", [
    (torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), "got an instance of SGD"),
    ("sgd", "must be a torch.optim.Optimizer class"),
    (torch.nn.Linear, "must be a torch.optim.Optimizer class"),
])
def test_base_optimizer_must_be_an_optimizer_class(base, match):
    with pytest.raises(TypeError, match=match):
        fastasam.ASAM(torch.nn.Linear(2, 2).parameters(), base, lr=0.1)


def test_base_optimizer_option_clash_is_refused():
    with pytest.raises(ValueError, match="Adadelta has its own option"):
        fastasam.ASAM(torch.nn.Linear(2, 2).parameters(), torch.optim.Adadelta)


def test_adam_eps_goes_through_base_optimizer_kwargs():
    opt = fastasam.ASAM(torch.nn.Linear(2, 2).parameters(), torch.optim.Adam, norm_eps=1e-10,
                        base_optimizer_kwargs={"eps": 1e-6}, lr=1e-3)
    assert opt.param_groups[0]["eps"] == 1e-6 and opt._engine.eps == 1e-10


def test_sparse_gradient_is_refused_with_the_parameter_named():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = fastasam.ASAM(emb.named_parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="weight has a sparse gradient"):
        opt.first_step()


def test_second_step_before_first_step():
    opt = fastasam.ASAM(torch.nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match=r"second_step\(\) called without a first_step\(\)"):
        opt.second_step()


def perturbed_optimizer() -> fastasam.ASAM:
    """An optimizer between its first_step and its second_step."""
    model = torch.nn.Linear(2, 2)
    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.first_step()
    return opt


def test_first_step_twice_is_refused():
    opt = perturbed_optimizer()
    with pytest.raises(RuntimeError, match="first_step.. called twice"):
        opt.first_step()


def test_state_dict_between_the_two_steps_is_refused():
    opt = perturbed_optimizer()
    with pytest.raises(RuntimeError, match="between first_step.. and second_step"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="between first_step.. and second_step"):
        opt.load_state_dict({})
    opt.second_step()
    opt.state_dict()


def test_step_without_closure_explains():
    opt = fastasam.ASAM(torch.nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


# --- backend registry: unavailable backends and the fallback -----------------------------------------------------


def test_unavailable_backend_raises_with_reason_and_fix_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, "broken", backends.BackendSpec(
        "broken", "fastasam._no_such_module", auto_priority={"cpu": 1000}, fix="pip install fastasam[broken]"))
    backends._LOADED.pop("broken", None)
    try:
        assert "broken" not in fastasam.available_backends("cpu")
        assert backends.resolve("auto", torch.device("cpu")).name in ("cpu", "foreach")  # the best that works
        model = torch.nn.Linear(2, 2)
        with pytest.raises(RuntimeError, match=r"backend 'broken' cannot run on cpu: it could not be imported.*"
                                               r"Fix: pip install fastasam\[broken\]"):
            fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="broken")  # when built, not stepped
    finally:
        backends._LOADED.pop("broken", None)


def test_available_backends_lists_the_oracle():
    assert {"reference", "foreach"} <= set(fastasam.available_backends())
    assert fastasam.available_backends("meta")[0] == "reference"
