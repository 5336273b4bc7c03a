"""The two published variants reproduced: fastasam against independent transcriptions of their algorithms.

The transcriptions below follow the published algorithms step for step, tensor by tensor, written for these tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAST_CASES
from torch import nn

import fastasam
from fastasam import compat

BACKENDS = ["reference", *sorted({b for b, d in FAST_CASES if d == "cpu"})]


class OfficialASAM:
    """The official asam.py algorithm: 'weight' in the name is adaptive, norm + 1e-16, restore by subtraction."""

    adaptive = True

    def __init__(self, optimizer, model, rho=0.5, eta=0.01):
        self.optimizer, self.model, self.rho, self.eta = optimizer, model, rho, eta
        self.e = {}

    @torch.no_grad()
    def ascent_step(self):
        scaled = {}
        for n, p in self.model.named_parameters():
            if p.grad is None:
                continue
            t = p.abs() + self.eta if (self.adaptive and "weight" in n) else None
            scaled[n] = (p.grad * t, t) if t is not None else (p.grad.clone(), None)
        norm = torch.norm(torch.stack([torch.norm(tg, p=2) for tg, _ in scaled.values()]), p=2) + 1e-16
        for n, p in self.model.named_parameters():
            if n not in scaled:
                continue
            tg, t = scaled[n]
            e = (tg * t if t is not None else tg) * (self.rho / norm)
            p.add_(e)
            self.e[p] = e
        self.optimizer.zero_grad()

    @torch.no_grad()
    def descent_step(self):
        for p in self.model.parameters():
            if p.grad is not None:
                p.sub_(self.e[p])
        self.optimizer.step()
        self.optimizer.zero_grad()


class OfficialSAM(OfficialASAM):
    adaptive = False


class CommunitySAM(torch.optim.Optimizer):
    """The popular sam.py algorithm: every tensor adaptive when adaptive=True, eta = 0, norm + 1e-12, copy restore."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        norm = torch.norm(torch.stack([
            ((torch.abs(p) if g["adaptive"] else 1.0) * p.grad).norm(p=2)
            for g in self.param_groups for p in g["params"] if p.grad is not None
        ]), p=2)
        for g in self.param_groups:
            scale = g["rho"] / (norm + 1e-12)
            for p in g["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_((torch.pow(p, 2) if g["adaptive"] else 1.0) * p.grad * scale)
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        self.zero_grad()


def small_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def batches(n=6):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(n)]


def train(model, first, second, data):
    loss_fn = nn.CrossEntropyLoss()
    for x, y in data:
        loss_fn(model(x), y).backward()
        first()
        loss_fn(model(x), y).backward()
        second()
    return [p.detach().clone() for p in model.parameters()]


def assert_close_lists(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ours,theirs", [(compat.ASAM, OfficialASAM), (compat.SAM, OfficialSAM)])
def test_compat_reproduces_the_official_code(backend, ours, theirs):
    data = batches()
    a, b = small_net(), small_net()
    opt_a = ours(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), a, rho=0.5, eta=0.01,
                 backend=backend)
    opt_b = theirs(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), b, rho=0.5, eta=0.01)
    got = train(a, opt_a.ascent_step, opt_a.descent_step, data)
    want = train(b, opt_b.ascent_step, opt_b.descent_step, data)
    assert_close_lists(got, want)
    assert not torch.equal(want[0], small_net()[0].weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [True, False])
def test_asam_reproduces_community_sam_py(backend, adaptive):
    data = batches()
    a, b = small_net(), small_net()
    if adaptive:  # sam.py's adaptive=True: every tensor adaptive, eta = 0, eps 1e-12, exact restore
        opt_a = fastasam.ASAM(a.parameters(), torch.optim.SGD, rho=2.0, eta=0.0, eps=1e-12, backend=backend,
                              lr=0.1, momentum=0.9)
    else:
        opt_a = fastasam.SAM(a.parameters(), torch.optim.SGD, rho=2.0, backend=backend, lr=0.1, momentum=0.9)
    opt_b = CommunitySAM(b.parameters(), torch.optim.SGD, rho=2.0, adaptive=adaptive, lr=0.1, momentum=0.9)
    got = train(a, lambda: opt_a.first_step(zero_grad=True), lambda: opt_a.second_step(zero_grad=True), data)
    want = train(b, opt_b.first_step, opt_b.second_step, data)
    assert_close_lists(got, want)


def test_adaptive_param_groups_is_the_official_split():
    model = small_net()
    groups = fastasam.adaptive_param_groups(model, rho=1.0, lr=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["adaptive"] for g in groups] == [True, False]
    assert all("weight" in names[id(p)] for p in groups[0]["params"])
    assert all("weight" not in names[id(p)] for p in groups[1]["params"])
    assert len(groups[0]["params"]) == 5 and all(g["rho"] == 1.0 for g in groups)  # 2 conv, 2 BN, 1 linear
    # fastasam.ASAM over these groups with eps=1e-16 and subtract restore is the official algorithm
    data = batches(3)
    a, b = small_net(), small_net()
    opt_a = fastasam.ASAM(fastasam.adaptive_param_groups(a), torch.optim.SGD, rho=0.5, eta=0.01, eps=1e-16,
                          restore="subtract", lr=0.1)
    opt_b = OfficialASAM(torch.optim.SGD(b.parameters(), lr=0.1), b, rho=0.5, eta=0.01)
    got = train(a, lambda: opt_a.first_step(zero_grad=True), lambda: opt_a.second_step(zero_grad=True), data)
    want = train(b, opt_b.ascent_step, opt_b.descent_step, data)
    assert_close_lists(got, want)


def test_compat_restores_parameters_without_a_second_pass_gradient():
    """Deliberate fix over the official code: a parameter perturbed in the ascent is restored even when the second
    pass gives it no gradient."""
    model = nn.Linear(3, 2)
    before = copy.deepcopy(model.state_dict())
    minimizer = compat.ASAM(torch.optim.SGD(model.parameters(), lr=0.0), model, rho=1.0)
    model(torch.ones(4, 3)).sum().backward()
    minimizer.ascent_step()
    assert not torch.equal(model.weight, before["weight"])
    minimizer.descent_step()  # no backward in between: no gradients now
    torch.testing.assert_close(model.weight, before["weight"], atol=1e-7, rtol=0)


def test_compat_bad_input():
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer instance"):
        compat.ASAM(torch.optim.SGD, model)
    with pytest.raises(ValueError, match="rho=-1"):
        compat.ASAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=-1)
    with pytest.raises(RuntimeError, match="without a first_step"):
        compat.ASAM(torch.optim.SGD(model.parameters(), lr=0.1), model).descent_step()
