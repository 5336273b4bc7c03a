"""What a user may change between or around the two steps, and what the optimizer does about it.

A step plan caches what it found (the base optimizer's state tensors, the gradients' and the parameters' storage,
their aliasing); every change listed in ``CHANGES`` is either honoured (every backend's trajectory equals the
``reference`` backend's after the same change, step after step) or refused with a ``fastasam:`` error before anything
is written. ``docs/guides/changes.md`` has one row per change, named as here (``test_the_docs_table_lists_every_change``
keeps the two together). The optimizer object itself (``copy.deepcopy``, ``pickle``, ``opt.state`` assignment, two
optimizers over one tensor) and ``GradScaler`` in every order of ``unscale_`` follow.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import FAST_CASES, soup_loss

import fastasam

ROOT = Path(__file__).resolve().parents[1]
CASES = [("reference", "cpu"), *FAST_CASES]
IDS = [f"{b}-{d}" for b, d in CASES]
ALL = pytest.mark.parametrize("backend,device", CASES, ids=IDS)
STEPS, AT = 5, 2  # the change is made during step AT


@dataclass(frozen=True)
class Change:
    """One thing a user may do: ``when`` (``"between steps"``: after ``second_step``, before the next backward;
    ``"before first_step"``: after the first backward; ``"before second_step"``: after the second backward), on
    which ``base`` optimizer, what it does (``apply(opt, params)``) and the ``outcome``: ``"honoured"`` (the
    trajectory equals the reference backend's) or ``"refused"`` (a ``fastasam:`` error, nothing written)."""

    name: str
    when: str
    base: str
    apply: Callable
    outcome: str


def _momentum_replaced(opt, ps):
    opt.state[ps[0]]["momentum_buffer"] = torch.zeros_like(ps[0])


def _state_entry_emptied(opt, ps):
    opt.state[ps[1]] = {}


def _state_reassigned(opt, ps):
    fresh = defaultdict(dict)
    opt.state = fresh
    assert opt.base_optimizer.state is fresh and opt.state is fresh, "opt.state = ... did not reach the base optimizer"


def _moment_replaced(opt, ps):
    opt.state[ps[2]]["exp_avg"] = torch.full_like(ps[2], 0.01)


def _state_storage_swapped(opt, ps):
    opt.state[ps[0]]["momentum_buffer"].data = torch.zeros_like(ps[0])


def _step_count_replaced(opt, ps):
    opt.state[ps[0]]["step"] = torch.tensor(1.0)


def _base_state_reloaded(opt, ps):
    opt.base_optimizer.load_state_dict(opt._saved_at_build)


def _grad_dtype_changed(opt, ps):
    ps[0].grad.data = ps[0].grad.data.to(torch.bfloat16)


def _grad_made_non_contiguous(opt, ps):
    ps[0].grad = ps[0].grad.t().contiguous().t()


def _grad_storage_shrunk(opt, ps):
    with torch.no_grad():
        ps[0].grad.set_(torch.ones(3, device=ps[0].device, dtype=ps[0].dtype))


def _grad_replaced_by_a_new_tensor(opt, ps):
    ps[1].grad = ps[1].grad.clone()


def _param_storage_replaced(opt, ps):
    ps[1].data = ps[1].data.clone()


def _group_added_through_base(opt, ps):
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 6, device=ps[0].device, dtype=ps[0].dtype))
    ps.append(extra)
    opt.base_optimizer.add_param_group({"params": [extra]})


def _options_changed(opt, ps):
    for g in opt.param_groups:
        g["lr"] *= 0.5
        g["rho"] *= 2


CHANGES = [
    Change("a state tensor replaced", "between steps", "sgd", _momentum_replaced, "honoured"),
    Change("a parameter's state emptied", "between steps", "sgd", _state_entry_emptied, "honoured"),
    Change("opt.state reassigned", "between steps", "sgd", _state_reassigned, "honoured"),
    Change("an Adam moment replaced", "between steps", "adamw", _moment_replaced, "honoured"),
    Change("a state tensor's storage swapped", "between steps", "sgd", _state_storage_swapped, "honoured"),
    Change("an Adam step count replaced", "between steps", "adamw", _step_count_replaced, "honoured"),
    Change("the base optimizer's state reloaded", "between steps", "adamw", _base_state_reloaded, "honoured"),
    Change("a gradient's dtype changed", "before second_step", "sgd", _grad_dtype_changed, "honoured"),
    Change("a gradient made non-contiguous", "before second_step", "sgd", _grad_made_non_contiguous, "honoured"),
    Change("a gradient replaced by a new tensor", "before second_step", "sgd", _grad_replaced_by_a_new_tensor,
           "honoured"),
    Change("a gradient's storage shrunk", "before first_step", "sgd", _grad_storage_shrunk, "refused"),
    Change("a gradient's dtype changed before the ascent", "before first_step", "sgd", _grad_dtype_changed,
           "refused"),
    Change("a parameter's storage replaced", "between steps", "sgd", _param_storage_replaced, "honoured"),
    Change("a param group added through the base optimizer", "between steps", "sgd", _group_added_through_base,
           "honoured"),
    Change("hyper-parameters changed", "between steps", "adamw", _options_changed, "honoured"),
]
CHANGE_IDS = [c.name.replace(" ", "-").replace("'", "") for c in CHANGES]


def _params(device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(5)
    shapes = [(4, 6), (7,), (2, 3, 2), (1,)]
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(device)) for s in shapes]


def _optimizer(backend: str, base: str, params):
    if base == "sgd":
        return fastasam.ASAM(params, torch.optim.SGD, rho=0.5, lr=0.05, momentum=0.9, weight_decay=1e-3,
                             backend=backend)
    return fastasam.ASAM(params, torch.optim.AdamW, rho=0.5, lr=0.01, weight_decay=1e-2, backend=backend)


def _trajectory(change: Change, backend: str, device: str):
    """STEPS steps with ``change`` made during step AT: the parameters after each step, or, for a refused change,
    ``(exception, parameters before the refused call, parameters after it)``."""
    params = _params(device)
    opt = _optimizer(backend, change.base, params)
    history = []
    for step in range(STEPS):
        if step == 1:
            opt._saved_at_build = copy.deepcopy(opt.base_optimizer.state_dict())
        now = step == AT
        if now and change.when == "between steps":
            change.apply(opt, params)
        soup_loss(params).backward()
        if now and change.when == "before first_step":
            change.apply(opt, params)
            before = [p.detach().clone() for p in params]
            try:
                opt.first_step(zero_grad=True)
            except Exception as exc:  # a refusal: the test checks that nothing was written
                return exc, before, [p.detach().clone() for p in params]
        else:
            opt.first_step(zero_grad=True)
        soup_loss(params).backward()
        if now and change.when == "before second_step":
            change.apply(opt, params)
        opt.second_step(zero_grad=True)
        history.append([p.detach().clone() for p in params])
    return history


@ALL
@pytest.mark.parametrize("change", CHANGES, ids=CHANGE_IDS)
def test_a_change_is_honoured_as_the_reference_does_or_refused_before_anything_is_written(backend, device, change):
    got = _trajectory(change, backend, device)
    if change.outcome == "refused":
        assert isinstance(got, tuple), f"{change.name}: not refused"
        exc, before, after = got
        assert str(exc).startswith("fastasam:"), exc
        for b, a in zip(before, after, strict=True):
            assert torch.equal(b, a), "a refused step wrote into the weights"
        return
    assert isinstance(got, list), f"{change.name}: raised {got[0]!r}"
    want = _trajectory(change, "reference", "cpu")
    for step, (g_step, w_step) in enumerate(zip(got, want, strict=True)):
        for i, (g, w) in enumerate(zip(g_step, w_step, strict=True)):
            torch.testing.assert_close(g.cpu(), w, atol=1e-6, rtol=1e-5,
                                       msg=f"{change.name}: step {step}, tensor {i} differs from the reference's")


def test_the_docs_table_lists_every_change():
    """docs/guides/changes.md has a row per change of CHANGES (its name, when, outcome), and no other."""
    text = (ROOT / "docs" / "guides" / "changes.md").read_text()
    rows = re.findall(r"^\| ([^|]+?) \| ([^|]+?) \| (honoured|refused)[^|]*\|", text, re.MULTILINE)
    listed = [(name.strip("` "), when.strip(), outcome) for name, when, outcome in rows]
    assert listed == [(c.name, c.when, c.outcome) for c in CHANGES] + OBJECT_ROWS


# --- the optimizer object ---------------------------------------------------------------------------------------------

OBJECT_ROWS = [
    ("copy.deepcopy or pickle of the optimizer", "between steps", "honoured"),
    ("the same, between the two steps", "before second_step", "refused"),
    ("two parameters that share memory", "before first_step", "refused"),
    ("one parameter in two optimizers perturbing at once", "before first_step", "refused"),
    ("GradScaler.unscale_ before first_step, between the passes or before scaler.step", "any", "honoured"),
    ("an expanded gradient under GSAM or LookSAM", "before second_step", "honoured"),
]


def _step(opt, params):
    soup_loss(params).backward()
    if opt.second_pass_needed:
        opt.first_step(zero_grad=True)
        soup_loss(params).backward()
    opt.second_step(zero_grad=True)


@ALL
@pytest.mark.parametrize("cls", [fastasam.ASAM, fastasam.LookSAM, fastasam.GSAM])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_the_optimizer_continues_as_the_original(backend, device, cls, how):
    """A copy taken between steps (with its parameters, as a training state is copied) steps exactly as the
    original from there on; a copy between the two steps is refused."""
    params = _params(device)
    kw = {} if cls is fastasam.ASAM else {"rho": 0.1}
    opt = cls(params, torch.optim.SGD, lr=0.05, momentum=0.9, backend=backend, **kw)
    for _ in range(3):
        _step(opt, params)
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        buffer = io.BytesIO()
        torch.save((params, opt), buffer, pickle_module=pickle)
        buffer.seek(0)
        params2, opt2 = torch.load(buffer, weights_only=False)
    for _ in range(3):
        _step(opt, params)
        _step(opt2, params2)
    for p, q in zip(params, params2, strict=True):
        assert torch.equal(p, q)
    soup_loss(params).backward()
    if opt.second_pass_needed:
        opt.first_step(zero_grad=True)
        with pytest.raises(RuntimeError, match=r"^fastasam: copy.deepcopy\(\) or pickle called between first_step"):
            copy.deepcopy(opt)


@ALL
@pytest.mark.parametrize("views", ["overlapping", "interleaved", "the same storage twice"])
def test_parameters_that_share_memory_are_refused_before_anything_is_written(backend, device, views):
    storage = torch.randn(40, device=device)
    if views == "overlapping":
        a, b = storage[0:20], storage[10:30]
    elif views == "interleaved":
        a, b = storage[0::2], storage[1::2]
    else:
        a, b = storage[0:10], storage[0:10]
    params = [torch.nn.Parameter(a), torch.nn.Parameter(b), torch.nn.Parameter(torch.randn(3, device=device))]
    opt = fastasam.ASAM(params, torch.optim.SGD, lr=0.1, backend=backend)
    soup_loss(params).backward()
    before = storage.clone()
    with pytest.raises(ValueError, match=r"^fastasam: parameters param_groups\[0\]\['params'\]\[0\] and "
                                         r"param_groups\[0\]\['params'\]\[1\] share memory"):
        opt.first_step()
    assert torch.equal(storage, before) and not opt.perturbed


@ALL
def test_one_parameter_in_two_optimizers_perturbing_at_once_is_refused(backend, device):
    params = _params(device)
    first = fastasam.ASAM(params[:3], torch.optim.SGD, lr=0.1, backend=backend)
    second = fastasam.SAM(params[2:], torch.optim.SGD, lr=0.1, backend=backend)
    soup_loss(params).backward()
    first.first_step()
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"^fastasam: param_groups\[0\]\['params'\]\[0\] is perturbed by another"):
        second.first_step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True)) and not second.perturbed
    first.second_step()
    second.first_step()  # one after the other: fine
    second.second_step()


@ALL
@pytest.mark.parametrize("order", ["none", "before first_step", "between the passes", "before scaler.step"])
def test_gradscaler_in_every_order_of_unscale_and_clipping_gives_the_unscaled_step(backend, device, order):
    """Scaled losses under ``torch.amp.GradScaler`` with ``scaler.unscale_(opt)`` and gradient clipping at each
    point give the steps of the same loop without a scaler (the clipping at the same point)."""

    def run(scaled: bool):
        params = _params(device)
        opt = fastasam.ASAM(params, torch.optim.SGD, rho=0.5, lr=0.05, momentum=0.9, backend=backend)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=1000, enabled=scaled)

        def clip():
            torch.nn.utils.clip_grad_norm_(params, 0.5)

        history = []
        for _ in range(4):
            scaler.scale(soup_loss(params)).backward()
            if order == "before first_step":
                scaler.unscale_(opt)
                clip()
            opt.first_step(zero_grad=True)
            if order == "between the passes":
                scaler.unscale_(opt)
            scaler.scale(soup_loss(params)).backward()
            if order == "before scaler.step":
                scaler.unscale_(opt)
                clip()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            history.append([p.detach().clone() for p in params])
        return history, scaler.get_scale()

    (got, scale), (want, _) = run(True), run(False)
    assert scale == 2.0**12  # no step overflowed
    for step, (g_step, w_step) in enumerate(zip(got, want, strict=True)):
        for g, w in zip(g_step, w_step, strict=True):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5, msg=f"step {step}")


@ALL
@pytest.mark.parametrize("cls", [fastasam.GSAM, fastasam.LookSAM])
def test_an_expanded_gradient_is_honoured_by_the_variants_that_write_their_direction_into_it(backend, device, cls):
    """A gradient made with ``expand`` (stride 0) cannot be written in place; the variants writing their direction
    into ``.grad`` give that parameter a dense copy first, on every backend."""

    def run(b: str):
        params = _params(device)
        opt = cls(params, torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend=b,
                  **({"k": 2} if cls is fastasam.LookSAM else {}))
        history = []
        for _ in range(4):
            soup_loss(params).backward()
            if opt.second_pass_needed:
                opt.first_step(zero_grad=True)
                soup_loss(params).backward()
            params[1].grad = params[1].grad[:1].expand(7)
            opt.second_step(zero_grad=True)
            assert not opt.perturbed
            history.append([p.detach().clone() for p in params])
        return history

    got, want = run(backend), run("reference")
    for g_step, w_step in zip(got, want, strict=True):
        for g, w in zip(g_step, w_step, strict=True):
            torch.testing.assert_close(g.cpu(), w.cpu(), atol=1e-6, rtol=1e-5)
