"""``fastasam.RhoFollowsLR``: GSAM's rho schedule (rho proportional to the learning rate)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import KERNELS, soup_loss

import fastasam


def _model(device: str = "cpu") -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(2)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(device)) for n in (5, 300, 7)]


def test_rho_follows_a_cosine_schedule_in_every_group():
    params = _model()
    opt = fastasam.GSAM([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], torch.optim.SGD, rho=0.04,
                        lr=0.1, momentum=0.9)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)
    rho_sched = fastasam.RhoFollowsLR(opt, rho_max=0.04, rho_min=0.01, lr_min=0.01)
    assert [g["rho"] for g in opt.param_groups] == [0.04, 0.04]  # at the peak lr of each group
    for t in range(1, 11):
        soup_loss(params).backward()
        opt.first_step(zero_grad=True)
        soup_loss(params).backward()
        opt.second_step(zero_grad=True)
        lr_sched.step()
        rho_sched.step()
        for g, peak in zip(opt.param_groups, (0.1, 0.05)):
            lr = 0.01 + (peak - 0.01) * (1 + math.cos(math.pi * t / 10)) / 2
            assert g["lr"] == pytest.approx(lr)
            assert g["rho"] == pytest.approx(0.01 + 0.03 * (lr - 0.01) / (peak - 0.01))
    assert opt.param_groups[0]["rho"] == pytest.approx(0.01)  # the end of the schedule: rho_min


def test_lr_max_for_a_warmup_and_clamping():
    params = _model()
    opt = fastasam.ASAM(params, torch.optim.SGD, rho=0.5, lr=0.001)
    rho_sched = fastasam.RhoFollowsLR(opt, rho_max=0.5, rho_min=0.1, lr_max=0.1, lr_min=0.0)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.1 + 0.4 * 0.01)
    opt.param_groups[0]["lr"] = 0.2  # above lr_max: held at rho_max
    rho_sched.step()
    assert opt.param_groups[0]["rho"] == 0.5


def test_the_schedule_saves_and_resumes():
    params = _model()
    opt = fastasam.GSAM(params, torch.optim.SGD, rho=0.04, lr=0.1)
    rho_sched = fastasam.RhoFollowsLR(opt, rho_max=0.04, rho_min=0.02)
    opt.param_groups[0]["lr"] = 0.05
    rho_sched.step()
    saved = rho_sched.state_dict()
    opt2 = fastasam.GSAM(_model(), torch.optim.SGD, rho=0.04, lr=0.05)  # resumed mid-schedule, at lr 0.05
    again = fastasam.RhoFollowsLR(opt2, rho_max=1.0, rho_min=0.0)
    again.load_state_dict(saved)
    assert again.lr_max == [0.1] and opt2.param_groups[0]["rho"] == pytest.approx(0.03)


@pytest.mark.parametrize("kw,match", [
    ({"rho_max": 0.1, "rho_min": 0.2}, "0 <= rho_min <= rho_max"),
    ({"rho_max": float("nan")}, "rho_max must be a finite number"),
    ({"rho_max": 0.1, "lr_max": 0.0}, "lr_max .* must be greater than lr_min"),
])
def test_bad_input_is_refused(kw, match):
    opt = fastasam.GSAM(_model(), torch.optim.SGD, rho=0.04, lr=0.1)
    with pytest.raises(ValueError, match=match):
        fastasam.RhoFollowsLR(opt, **kw)


def test_a_plain_optimizer_is_refused():
    with pytest.raises(TypeError, match="needs a fastasam optimizer"):
        fastasam.RhoFollowsLR(torch.optim.SGD(_model(), lr=0.1), rho_max=0.1)




@KERNELS
def test_the_kernels_take_the_new_rho_each_step(backend, device):
    """The scheduled rho reaches the kernels' tables: the trajectory equals the oracle's, and differs from a run at
    constant rho."""
    def run(name, schedule=True):
        params = _model(device)
        opt = fastasam.GSAM(params, torch.optim.SGD, rho=0.5, alpha=0.2, lr=0.1, momentum=0.9, backend=name)
        lr_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)
        rho_sched = fastasam.RhoFollowsLR(opt, rho_max=0.5, rho_min=0.05)
        for _ in range(6):
            soup_loss(params).backward()
            opt.first_step(zero_grad=True)
            soup_loss(params).backward()
            opt.second_step(zero_grad=True)
            lr_sched.step()
            if schedule:
                rho_sched.step()
        return [p.detach().clone() for p in params]

    got = run(backend)
    for a, b in zip(got, run("reference")):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(got, run(backend, schedule=False)))
