"""Op-level benchmarks with pytest-benchmark: each phase of one ASAM step, per backend.

    python -m pytest benchmarks/bench_ops.py                         # resnet50 parameter set, the device present
    FASTASAM_BENCH_SET=vit_b16 python -m pytest benchmarks/bench_ops.py --benchmark-columns=median,iqr,rounds

Phases: ``norm`` (every bucket's share of the squared gradient norm), ``first_step`` (norm + perturbation) and
``second_step`` (restore + SGD update; fused where the backend can). Each round is synchronised with the device.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastasam
from benchmarks.param_sets import PARAM_SETS, make_params
from benchmarks.step_time import HPARAMS
from fastasam._step_plan import StepPlan

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PARAM_SET = os.environ.get("FASTASAM_BENCH_SET", "resnet50")
BACKENDS = fastasam.available_backends(DEVICE)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def named():
    return make_params(PARAM_SETS[PARAM_SET](), device=DEVICE)


def _optimizer(named, backend: str) -> fastasam.ASAM:
    groups = [{"params": [p for n, p in named if "weight" in n], "adaptive": True},
              {"params": [p for n, p in named if "weight" not in n], "adaptive": False}]
    return fastasam.ASAM(groups, torch.optim.SGD, backend=backend, **HPARAMS)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_norm(benchmark, named, backend):
    opt = _optimizer(named, backend)
    plan = StepPlan(opt._engine, opt.param_groups)  # what first_step builds once
    grads = plan.watch.check()

    def norm() -> torch.Tensor:
        out = plan.sqnorm(grads)
        _sync()
        return out

    assert torch.isfinite(benchmark(norm))


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step(benchmark, named, backend):
    opt = _optimizer(named, backend)

    def undo() -> None:  # not timed: put the weights back so every round perturbs the same w
        if opt.perturbed:
            with torch.no_grad():
                opt._engine.restore()
        _sync()

    def first() -> None:
        opt.first_step()
        _sync()

    benchmark.pedantic(first, setup=undo, rounds=20 if DEVICE.type == "cuda" else 3, warmup_rounds=1)
    assert opt.perturbed
    undo()


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_step(benchmark, named, backend):
    opt = _optimizer(named, backend)

    def perturb() -> None:  # not timed
        opt.first_step()
        _sync()

    def second() -> None:
        opt.second_step()
        _sync()

    benchmark.pedantic(second, setup=perturb, rounds=20 if DEVICE.type == "cuda" else 3, warmup_rounds=1)
    assert not opt.perturbed
