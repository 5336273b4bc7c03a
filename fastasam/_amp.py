"""How a sharpness-aware step meets ``torch.amp.GradScaler``, in whatever order the user calls ``scaler.unscale_``.

A two-pass step has two sets of scaled gradients; ``scaler.step(opt)`` must unscale (and check for inf/NaN) the
second one, which the descent uses. ``GradScaler`` keeps one record per optimizer and iteration: a
``scaler.unscale_(opt)`` call marks the optimizer unscaled, and ``scaler.step(opt)`` then trusts that the gradients
present are unscaled and already checked. That holds when ``unscale_`` ran after the second backward (to clip the
gradients the descent uses: the documented order). Two other orders would leave the second pass's gradients scaled
and unchecked:

* ``unscale_`` before ``first_step`` (to clip the first pass's gradients, which the perturbation does not need: it
  is scale-invariant). ``first_step`` finds the record marked unscaled and returns it to its initial state, so
  ``scaler.step`` unscales and checks the second pass's gradients as usual. An inf/NaN in the first pass is still
  caught: the perturbation is then skipped and so is the step (``opt.perturbation_skipped``).
* ``unscale_`` between ``first_step(zero_grad=True)`` and the second backward: it found no gradient, unscaled
  nothing and checked nothing. ``scaler.step`` recognises that record (no device checked) and runs
  ``scaler.unscale_(opt)`` itself on the second pass's gradients.

To see the first order the optimizer must know the scaler before ``first_step``: it looks for live
``GradScaler`` objects when it builds its first step plan, and learns the one that calls it at every
``scaler.step(opt)``. The records are ``GradScaler``'s own (``_per_optimizer_states``), read and reset as its
``update()`` does.
"""

from __future__ import annotations

import gc
import sys
import weakref

import torch
from torch.amp import grad_scaler as _gs


def find_scalers() -> list[weakref.ref]:
    """Weak references to every live ``GradScaler`` (a scan of the objects the garbage collector tracks; run when an
    optimizer builds its first step plan)."""
    return [weakref.ref(o) for o in gc.get_objects() if issubclass(type(o), _gs.GradScaler)]


def calling_scaler(depth: int = 2) -> _gs.GradScaler | None:
    """The ``GradScaler`` whose ``step`` is on the call stack above the caller (``scaler.step(opt)`` calls
    ``opt.step()``), or None."""
    frame = sys._getframe(depth)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, _gs.GradScaler) and frame.f_code.co_name == "step":
            return owner
        frame = frame.f_back
    return None


def _record(scaler: _gs.GradScaler, opt) -> dict | None:
    """The scaler's record for ``opt`` in this iteration, without creating one."""
    states = getattr(scaler, "_per_optimizer_states", None)
    return states.get(id(opt)) if states is not None else None


def before_first_step(scalers: list[weakref.ref], opt) -> bool:
    """``unscale_`` was called before ``first_step`` (the first pass's gradients): return the record to its initial
    state, so that ``scaler.step`` unscales and checks the second pass's gradients. True when it was (the first
    pass's gradients are unscaled)."""
    found = False
    for ref in scalers:
        scaler = ref()
        if scaler is None or not scaler.is_enabled():
            continue
        record = _record(scaler, opt)
        if record is not None and record["stage"] is _gs.OptState.UNSCALED:
            _reset(record)
            found = True
    return found


def _reset(record: dict) -> None:
    """The record as ``GradScaler`` makes it for a new iteration (in place: ``scaler.step`` holds it)."""
    record.clear()
    record.update(_gs._refresh_per_optimizer_state())


def unscaled_nothing(scaler: _gs.GradScaler, opt) -> bool:
    """``unscale_`` ran when no gradient was present (between ``first_step(zero_grad=True)`` and the second
    backward): the record is marked unscaled but holds no device's check."""
    record = _record(scaler, opt)
    return record is not None and record["stage"] is _gs.OptState.UNSCALED and not record["found_inf_per_device"]


def unscale_now(scaler: _gs.GradScaler, opt):
    """Unscale and check the gradients present now through the scaler itself (its record returned to its initial
    state first); returns the found-inf flag on the scale's device, as ``scaler.step`` would have passed it."""
    record = _record(scaler, opt)
    _reset(record)
    scaler.unscale_(opt)
    scale = scaler._scale
    return sum(t.to(scale.device, non_blocking=True) for t in record["found_inf_per_device"].values())


def unscale_gradients(param_groups, grad_scale) -> None:
    """Divide the gradients present in ``param_groups`` by ``grad_scale`` (GradScaler's scale tensor), as
    ``GradScaler.unscale_`` does (its inverse computed in fp64, then fp32), one foreach op per device."""
    per_device: dict = {}
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None:
                per_device.setdefault(p.grad.device, []).append(p.grad)
    inv = grad_scale.double().reciprocal().float()
    for device, grads in per_device.items():
        torch._foreach_mul_(grads, inv.to(device))
