"""A parameter's storage changed between ``first_step`` and ``second_step``.

The kernel backends' tables hold the addresses the parameters had when the plan was built. ``second_step`` confirms
them before any kernel runs; when one moved, it restores tensor by tensor into the storage each parameter holds now
(as the ``reference`` oracle does) and plans again on the next step, or, when that cannot be done (a shape or device
that no longer matches), raises having written nothing.
"""

from __future__ import annotations

import pytest
import torch

import fastasam
from fastasam import _step_plan, _watch
from fastasam.testing import cuda_shim
from tests.conftest import FAST_CASES, FAST_IDS, KERNEL_CASES, soup_loss

CASES = [("reference", "cpu"), *FAST_CASES]
IDS = ["reference-cpu", *FAST_IDS]
SIZES = (5000, 300, 7, 1)


def _data(p: torch.nn.Parameter) -> None:
    p.data = p.data.clone()


def _swap(p: torch.nn.Parameter) -> None:
    other = torch.nn.Parameter(p.detach().clone())
    other.grad = p.grad.clone()
    torch.utils.swap_tensors(p, other)
    del other  # the old tensor, and with it the storage the tables recorded, is freed


def _set(p: torch.nn.Parameter) -> None:
    with torch.no_grad():
        p.set_(p.detach().clone())


def _to_double(p: torch.nn.Parameter) -> None:
    p.data = p.data.double()
    p.grad = p.grad.double()


ACTIONS = {"data": _data, "swap_tensors": _swap, "set_": _set, "dtype": _to_double}


def _params(device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter((torch.randn(n, generator=gen) * 0.5).to(device)) for n in SIZES]


def _run(backend: str, device: str, action, restore: str, base=torch.optim.SGD, steps: int = 4, **kw):
    """``steps`` ASAM steps; on step 1 ``action`` changes parameter 0 between the two passes. Returns the
    parameters after each step and the report of step 1."""
    params = _params(device)
    opt = fastasam.ASAM(params, base, lr=0.05, backend=backend, restore=restore, **kw)
    history, moved_report = [], None
    for step in range(steps):
        soup_loss(params).backward()
        opt.first_step(zero_grad=True)
        soup_loss(params).backward()
        if step == 1 and action is not None:
            action(params[0])
        opt.second_step(zero_grad=True)
        if step == 1:
            moved_report = opt.report().second_step
        history.append([p.detach().clone() for p in params])
    return history, moved_report


@pytest.mark.parametrize("restore", ["copy", "subtract"])
@pytest.mark.parametrize("how", list(ACTIONS))
@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_storage_changed_between_the_passes_is_restored_into_the_new_storage(backend, device, how, restore):
    """Every backend ends where the oracle ends after the same change, step after step (the plan is rebuilt)."""
    kw = {"momentum": 0.9, "weight_decay": 5e-4}
    got, report = _run(backend, device, ACTIONS[how], restore, **kw)
    want, _ = _run("reference", device, ACTIONS[how], restore, **kw)
    if backend != "reference":
        assert "storage changed" in report
    for step, (g_step, w_step) in enumerate(zip(got, want, strict=True)):
        for i, (g, w) in enumerate(zip(g_step, w_step, strict=True)):
            assert g.dtype == w.dtype, f"step {step}, tensor {i}"
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5, msg=lambda m, s=step, i=i: f"step {s} t{i}: {m}")


@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_adam_after_a_moved_parameter_matches_the_oracle(backend, device):
    got, _ = _run(backend, device, _data, "copy", base=torch.optim.AdamW, weight_decay=0.01)
    want, _ = _run("reference", device, _data, "copy", base=torch.optim.AdamW, weight_decay=0.01)
    for g_step, w_step in zip(got, want, strict=True):
        for g, w in zip(g_step, w_step, strict=True):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def _double(model: torch.nn.Module) -> None:
    model.double()  # replaces each parameter's data and gradient


def _assign(model: torch.nn.Module) -> None:
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # new parameters


@pytest.mark.parametrize("change", [_double, _assign], ids=["double", "load_state_dict-assign"])
@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_module_changed_between_the_passes(backend, device, change):
    """A module-level change between the passes ends where the oracle ends."""

    def run(name: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(device)
        opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=name)
        x = torch.randn(8, 6, device=device)
        for step in range(3):
            dtype = next(model.parameters()).dtype
            model(x.to(dtype)).square().mean().backward()
            opt.first_step(zero_grad=True)
            model(x.to(dtype)).square().mean().backward()
            if step == 1:
                change(model)
            opt.second_step(zero_grad=True)
        return [p.detach().clone() for p in model.parameters()]

    for g, w in zip(run(backend), run("reference"), strict=True):
        assert g.dtype == (torch.float64 if change is _double else torch.float32)
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_a_shape_change_between_the_passes_raises_and_writes_nothing(backend, device):
    params = _params(device)
    opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.05, momentum=0.9, backend=backend)
    soup_loss(params).backward()
    opt.first_step(zero_grad=True)
    soup_loss(params).backward()
    params[1].data = torch.zeros(3, device=device)
    params[1].grad = torch.ones(3, device=device)
    perturbed = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\] is now \(3,\).*nothing was written"):
        opt.second_step()
    for p, before in zip(params, perturbed, strict=True):
        assert torch.equal(p.detach(), before)
    assert opt.perturbed  # still pending: the caller can put the parameter back and call second_step again


@pytest.mark.skipif(not any(b == "cuda_shim" for b, _ in KERNEL_CASES), reason="the CUDA shim is not loaded")
def test_the_shim_reports_the_stale_write_when_the_check_is_skipped(monkeypatch):
    """What the check prevents: with it bypassed, the fused restore writes through the freed storage's address,
    which the shim (told which memory is alive) reports instead of writing."""
    params = _params("cpu")
    opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.05, momentum=0.9, backend="cuda_shim")

    def alive() -> list[torch.Tensor]:
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        grads = [p.grad for p in params if p.grad is not None]
        return [*params, *grads, *opt._engine._buffers.values(), *state]

    with cuda_shim.live_memory(alive):
        for step in range(2):
            soup_loss(params).backward()
            opt.first_step(zero_grad=True)
            soup_loss(params).backward()
            if step == 1:
                monkeypatch.setattr(_step_plan.StepPlan, "params_intact", lambda self: True)
                monkeypatch.setattr(_step_plan.UpdatePlan, "check", lambda self: True)
                _data(params[0])
                with pytest.raises(RuntimeError, match="CPU shim"):
                    opt.second_step(zero_grad=True)
            else:
                opt.second_step(zero_grad=True)


@pytest.mark.parametrize("implementation", ["c++", "python"])
def test_the_watch_sees_a_parameter_moved_shrunk_or_converted(implementation):
    if implementation == "c++" and not _watch.cpp_in_use():
        pytest.skip(f"fastasam._host is not in use here ({_watch.IMPLEMENTATION})")
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (6, 4, 3)]
    for p in ps:
        p.grad = torch.zeros_like(p)
    with _watch.using(implementation):
        def watch() -> object:
            return _watch.watch(ps[:2], [], ps[2:], [], [], check_params=True)

        w = watch()
        assert w.params_intact()
        ps[0].data = ps[0].data.clone()
        assert not w.params_intact()  # moved
        w = watch()
        ps[1].data = ps[1].data[:2]  # same storage, same offset, fewer elements
        assert not w.params_intact()
        w = watch()
        ps[2].data = ps[2].data.double()
        assert not w.params_intact()  # a plain (non-kernel) tensor converted
        assert _watch.watch(ps[:2], [], [], [], [], check_params=False).params_intact()


@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_a_moved_parameter_under_grad_scaler(backend, device):
    """``scaler.step(opt)`` restores through the engine's plain restore: the same check applies there."""

    def run(name: str) -> list[torch.Tensor]:
        params = _params(device)
        opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.05, momentum=0.9, backend=name)
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 8)
        for step in range(3):
            scaler.scale(soup_loss(params)).backward()
            opt.first_step(zero_grad=True)
            scaler.scale(soup_loss(params)).backward()
            if step == 1:
                _swap(params[0])
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return [p.detach().clone() for p in params]

    for g, w in zip(run(backend), run("reference"), strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
