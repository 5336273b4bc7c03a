"""CUDA-graph capture: a warm step builds nothing; a cold step under capture raises a clear error before it
allocates or writes anything."""

from __future__ import annotations

import pytest
import torch

import fastasam
from fastasam import _decompose, _plan, _step_plan
from tests.conftest import FAST_CASES, FAST_IDS, soup_loss

CASES = [("reference", "cpu"), *FAST_CASES]
IDS = ["reference-cpu", *FAST_IDS]


def test_the_check_asks_cuda_only_for_cuda_devices(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: asked.append(1) or True)
    _plan.check_not_capturing({torch.device("cpu")}, "the step plan")
    assert not asked
    with pytest.raises(RuntimeError, match=r"the step plan would be built during CUDA-graph capture.*Warm up first"):
        _plan.check_not_capturing({torch.device("cpu"), torch.device("cuda", 0)}, "the step plan")


def test_the_capture_error_says_to_zero_the_gradients_in_place(monkeypatch):
    """A captured step needs its gradients where the warm-up left them: the error names the fix that works,
    ``zero_grad(set_to_none=False)``, and says why ``set_to_none=True`` cannot (capture faked: the check asks torch
    whether the current stream is capturing, and only for CUDA devices)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError) as raised:
        _plan.check_not_capturing({torch.device("cuda", 0)}, "the step plan")
    message = str(raised.value)
    assert "zero_grad(set_to_none=False)" in message
    assert "must keep their addresses across a captured step" in message
    assert "set_to_none=True frees them" in message


@pytest.fixture
def capture(monkeypatch):
    """``capture.on = True`` makes every plan build behave as under capture on a CUDA device."""

    class State:
        on = False

    def check(devices, what):
        if State.on:
            raise RuntimeError(f"fastasam: {what} would be built during CUDA-graph capture (simulated)")

    monkeypatch.setattr(_step_plan, "check_not_capturing", check)
    monkeypatch.setattr(_decompose, "check_not_capturing", check)
    return State


@pytest.mark.parametrize("kind", ["ASAM", "GSAM"])
@pytest.mark.parametrize("backend,device", CASES, ids=IDS)
def test_a_cold_step_under_capture_raises_and_a_warm_one_builds_nothing(backend, device, kind, capture):
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in (300, 7)]
    if kind == "GSAM":
        opt = fastasam.GSAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, alpha=0.1, backend=backend)
    else:
        opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)

    def step() -> None:  # gradients zeroed in place: they stay where they are, as a captured graph needs
        soup_loss(params).backward()
        opt.first_step()
        opt.zero_grad(set_to_none=False)
        soup_loss(params).backward()
        opt.second_step()
        opt.zero_grad(set_to_none=False)

    capture.on = True
    before = [p.detach().clone() for p in params]
    soup_loss(params).backward()
    with pytest.raises(RuntimeError, match="would be built during CUDA-graph capture"):
        opt.first_step(zero_grad=True)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))
    assert not opt.perturbed
    opt.zero_grad(set_to_none=False)
    capture.on = False
    for _ in range(2):  # warm-up
        step()
    capture.on = True
    step()  # warm: the plans are reused, nothing is built


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_capturing_a_cold_step_on_the_gpu_raises_the_clear_error(backend):
    if backend not in fastasam.available_backends("cuda"):
        pytest.skip(f"{backend} is not available here")
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (300, 7)]
    opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), pytest.raises(RuntimeError, match="would be built during CUDA-graph capture"):
        with torch.cuda.graph(graph, stream=stream):
            opt.first_step()
    assert not opt.perturbed
