"""Interval (A)SAM, ``every=k`` (Composer's ``interval``): the perturbation and second pass on every k-th step only;
the other steps are plain base-optimizer steps on the one pass's gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FAST_CASES,
    assert_trajectories_close,
    assert_trajectories_equal,
    awkward_params,
    sharpness_loop,
    soup_loss,
    three_groups,
)

import fastasam

CASES = [("reference", "cpu"), *FAST_CASES]


def run(backend: str, device: str, every: int | None, steps: int = 7, reload_at: int | None = None,
        by_hand: bool = False, dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    """``steps`` steps of the documented loop. ``by_hand``: the independent transcription instead: an every=1
    optimizer whose k-th steps are the usual two passes and whose other steps call the base optimizer itself."""
    params = awkward_params(device, dtype, chunk_sized=False)
    groups = three_groups(params)
    kw = {} if every is None or by_hand else {"every": every}

    def make():
        return fastasam.ASAM([dict(g) for g in groups], torch.optim.SGD, backend=backend, momentum=0.9,
                             weight_decay=5e-4, **kw)

    if not by_hand:
        opt = make()
        assert [opt.second_pass_needed] == [True]
        return sharpness_loop(opt, params, steps, reload_at, make)
    opt, history = make(), []
    for i in range(steps):
        soup_loss(params).backward()
        if i % every == 0:
            opt.first_step(zero_grad=True)
            soup_loss(params).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.base_optimizer.step()
            opt.zero_grad()
        history.append([p.detach().clone() for p in params])
    return history


@pytest.mark.parametrize("backend,device", CASES, ids=[f"{b}-{d}" for b, d in CASES])
def test_every_k_equals_the_transcription_and_resumes_bit_exactly(backend, device):
    want = run("reference", device, 3, by_hand=True)
    got = run(backend, device, 3)
    assert_trajectories_close(got, want, atol=1e-6, rtol=1e-5)
    assert_trajectories_equal(run(backend, device, 3, reload_at=4), got)  # the step counter is in the state_dict
    assert not torch.equal(got[-1][1], got[0][1])


def test_every_1_is_todays_asam_bit_for_bit():
    assert_trajectories_equal(run("foreach", "cpu", 1), run("foreach", "cpu", None))
    p = torch.nn.Parameter(torch.ones(2))
    sgd = {"base_optimizer": "torch.optim.sgd.SGD"}  # checkpoints: no step counter unless every > 1
    assert fastasam.ASAM([p], torch.optim.SGD, lr=0.1).state_dict()["fastasam"] == sgd
    assert fastasam.ASAM([p], torch.optim.SGD, lr=0.1, every=2).state_dict()["fastasam"] == {**sgd, "steps_done": 0}


def test_step_with_a_closure_runs_one_or_two_passes():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = fastasam.SAM([p], torch.optim.SGD, lr=0.1, rho=0.05, every=2)
    calls = []

    def closure():
        calls.append(p.detach().clone())
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    for _ in range(4):
        opt.zero_grad()
        opt.step(closure)
    assert len(calls) == 2 + 1 + 2 + 1


def test_the_loop_gets_clear_errors_for_the_wrong_pass():
    p = torch.nn.Parameter(torch.ones(3))
    opt = fastasam.ASAM([p], torch.optim.SGD, lr=0.1, every=2)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="without a first_step"):
        opt.second_step()  # step 0 perturbs
    opt.first_step()
    opt.second_step()
    assert not opt.second_pass_needed
    with pytest.raises(RuntimeError, match=r"does not perturb \(every=2, step 1\).*second_pass_needed is False"):
        opt.first_step()
    opt.second_step()  # the plain step
    assert opt.second_pass_needed
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            fastasam.ASAM([p], torch.optim.SGD, lr=0.1, every=bad)


def test_gradscaler_steps_every_k_on_cpu():
    """Under torch.amp.GradScaler the plain steps skip the restore and unscale as usual: equal to the fp32 loop."""
    out = []
    for scaled in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
        opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.05, every=2, backend="foreach")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if scaled else None
        out.append(sharpness_loop(opt, params, 5, scaler=scaler)[-1])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
