"""The two halves of a sharpness-aware step, shared by ``fastasam.ASAM``/``SAM`` and the ``compat`` classes.

A step works from a plan (``_step_plan``) built when first needed and reused while nothing changes:

* built once (per plan): the buckets, the restore buffers, each bucket's backend runner with its device tables and
  bound launches, the watch (what a warm step checks), and for the second step the fused-update plan;
* checked each step: the param groups' identity and sizes and their rho / eta / adaptive options (per group), and one
  pass over the parameters' ``.grad`` (``_watch``); the base optimizer's identity, state and options (per group);
* run each step: the launches (or, for the per-tensor backends, their tensor ops).

A change rebuilds only what it affects: options re-upload a small table, a moved gradient rewrites one table, a
different set of parameters or gradients rebuilds the plan. Nothing here reads a tensor's value on the host, so a
step does not synchronise with the device.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Iterable, Mapping

import torch

from . import backends
from ._plan import RESTORE_MODES, param_name
from ._step_plan import MOVED, Outcome, StepPlan, check_nonnegative
from .report import StepReport, build_report

__all__ = ["SharpnessEngine", "check_nonnegative"]

TRACED = Outcome(False, "restore, then the base optimizer's step (torch.compile)")

# the frames a warning passes over to point at the user's line: fastasam's and torch.optim's (its step wrappers)
_NOT_USER_CODE = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                  os.path.dirname(os.path.abspath(torch.optim.__file__)) + os.sep)
NO_GRADIENT_FIRST = (
    "fastasam: first_step() found no gradient on any parameter, so nothing was perturbed and this step is not "
    "sharpness-aware. Call loss.backward() before first_step(); with step(closure), the closure must call "
    "loss.backward() (and return the loss). This warning is shown once per optimizer."
)
NO_GRADIENT_SECOND = (
    "fastasam: second_step() found no gradient on any perturbed parameter: the second backward pass (at w + e) did "
    "not run, so the weights were restored to w and not updated. Call loss.backward() on the second forward pass, "
    "between first_step() and second_step(); with step(closure), the closure must call loss.backward(). This warning "
    "is shown once per optimizer."
)


# a weak reference to each engine between its first_step and its second_step (in this process)
_PERTURBING: set[weakref.ref] = set()


def _check_not_shared(engine: SharpnessEngine, groups: list[Mapping]) -> None:
    """Raise a ``RuntimeError`` when a parameter of ``groups`` is perturbed by another optimizer right now: two
    perturbations of one tensor in flight at once would each restore the other's ``w + e``."""
    mine = {id(p): (gi, pi) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])}
    for ref in list(_PERTURBING):
        other = ref()
        if other is None or other._pending is None:
            _PERTURBING.discard(ref)
            continue
        if other is engine:
            continue
        shared = next((mine[id(p)] for p in other._pending.params if id(p) in mine), None)
        if shared is not None:
            gi, pi = shared
            raise RuntimeError(
                f"fastasam: {param_name(groups[gi], gi, pi)} is perturbed by another fastasam optimizer right now "
                "(between its first_step() and second_step()); a parameter can take part in one perturbation at a "
                "time, or each optimizer's restore would undo the other's. Finish the other optimizer's step "
                "(second_step()) before this first_step(), or give the two optimizers disjoint parameters."
            )


class SharpnessEngine:
    """Holds the backend choice, ``eps``, the restore mode, the step plan and, between the two steps, what to
    restore.

    Readable after ``first_step`` (device tensors, computed when read; reading their value on the host synchronises):
    ``grad_norm`` (0-d, the global norm) and ``perturbation_skipped`` (0-d bool: the norm was not finite, so nothing
    was perturbed).
    """

    def __init__(self, backend: str = "auto", eps: float = 1e-12, restore: str = "copy") -> None:
        backends.check_name(backend)
        check_nonnegative("eps", eps)
        if restore not in RESTORE_MODES:
            raise ValueError(f"fastasam: invalid restore={restore!r}; choose one of {RESTORE_MODES}.")
        self.backend = backend
        self.eps = float(eps)
        self.restore_mode = restore
        self._plan: StepPlan | None = None
        self._pending: StepPlan | None = None  # perturbed, awaiting the restore
        # ``_pending is not None``, kept as a plain attribute: read on every step from outside (no call)
        self.perturbed = False
        self._buffers: dict[torch.Tensor, torch.Tensor] = {}
        self._sqnorm: torch.Tensor | None = None
        self._last: tuple[StepPlan, Outcome] | None = None  # the last step's plan and how its second step ran
        self._warned: set[str] = set()  # the once-per-optimizer warnings already shown
        self._ref = weakref.ref(self)  # what _PERTURBING holds while this engine's perturbation is in flight
        # rho, eta and adaptive for a param group that lacks them (one added through the base optimizer)
        self.group_defaults: dict[str, object] = {}

    def __getstate__(self) -> dict:
        """The configuration only: plans, buffers and the last step's results are rebuilt by the copy."""
        return {"backend": self.backend, "eps": self.eps, "restore": self.restore_mode,
                "group_defaults": self.group_defaults}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["backend"], state["eps"], state["restore"])
        self.group_defaults = state["group_defaults"]

    # --- results of the last first_step ---------------------------------------------------------------------------

    @property
    def grad_norm(self) -> torch.Tensor | None:
        return None if self._sqnorm is None else self._sqnorm.sqrt()

    @property
    def perturbation_skipped(self) -> torch.Tensor | None:
        return None if self._sqnorm is None else ~torch.isfinite(self._sqnorm)

    def check_devices(self, devices: Iterable[torch.device]) -> None:
        """Raise the ``RuntimeError`` of :func:`fastasam.backends.resolve` now (at construction, not at the first
        step) when the named backend cannot run on one of ``devices``; each distinct device is checked once. ``auto``
        runs everywhere, and ``meta`` tensors (placeholders, materialised on a real device later) are not checked."""
        if self.backend == "auto":
            return
        for device in dict.fromkeys(devices):
            if device.type != "meta":
                backends.resolve(self.backend, device)

    def backend_ran(self, groups: list[Mapping]) -> str:
        """The name of the backend that ran the last step (the one in progress after ``first_step``): one name, or
        several joined by ``"+"`` in bucket order when buckets on several devices ran on different backends. Before
        any step: what the requested backend resolves to for the devices of ``groups`` (the requested name itself
        when every parameter is on ``meta``). Not part of a step."""
        plan = self._pending if self._pending is not None else (self._last[0] if self._last is not None else None)
        names = [r.name for r in plan.runners] if plan is not None else []
        if not names:
            devices = dict.fromkeys(p.device for g in groups for p in g["params"])
            names = [backends.resolve(self.backend, d).name for d in devices if d.type != "meta"]
        return "+".join(dict.fromkeys(names)) or self.backend

    def report(self) -> StepReport:
        """What served the last step (see :class:`fastasam.report.StepReport`)."""
        if self._last is None:
            return StepReport(buckets=(), second_step="no step has run yet", base_only=0)
        return build_report(*self._last)

    # --- the steps --------------------------------------------------------------------------------------------------

    def buffer(self, key: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The restore buffer for ``p`` (a parameter, or the local shard of the DTensor parameter ``key``)."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device or \
                buf.stride() != p.stride():
            buf = self._buffers[key] = torch.empty_like(p, memory_format=torch.preserve_format)
        return buf

    def first_step(self, groups: list[Mapping], keep=None) -> None:
        """The ascent. ``keep``: LookSAM's / GSAM's copy of the first pass's gradients
        (``fastasam._decompose.Direction``), run over the step plan's tables or applied before the ascent."""
        if self._pending is not None:
            raise RuntimeError(
                "fastasam: first_step() called twice in a row; the weights already hold w + e. "
                "Call second_step() before the next first_step()."
            )
        if not torch.compiler.is_compiling():
            self._first_step_planned(groups, keep)
        elif self._traceable(groups):
            with torch.no_grad():  # dynamo traces the tensor ops; its guards replace the watch
                if keep is not None:
                    keep.apply()
                plan = StepPlan(self, groups, traced=True)
                self._sqnorm = plan.first_step(plan.grads_at_build())
            self._pending, self.perturbed = plan, True
        else:  # dynamo runs the planned step as it is, between its graphs (it reads addresses)
            torch.compiler.disable(self._first_step_planned)(groups, keep)

    def _first_step_planned(self, groups: list[Mapping], keep=None) -> None:
        enabled = torch.is_grad_enabled()  # no_grad, without building a context manager every step
        torch._C._set_grad_enabled(False)
        try:
            self._first_step_in(groups, keep)
        finally:
            torch._C._set_grad_enabled(enabled)

    def _first_step_in(self, groups: list[Mapping], keep=None) -> None:
        if _PERTURBING:  # another optimizer's perturbation is in flight: it must share no parameter with this one
            _check_not_shared(self, groups)
        plan, self._sqnorm = StepPlan.run_first_step(self, groups, self._plan, keep)
        self._plan = self._pending = plan
        self.perturbed = True
        _PERTURBING.add(self._ref)
        if self._sqnorm is None:  # no parameter has a gradient
            self._warn_once(NO_GRADIENT_FIRST)

    def _warn_once(self, message: str) -> None:
        """``message`` as a ``RuntimeWarning`` pointing at the user's code, the first time it is asked for."""
        if message in self._warned:
            return
        self._warned.add(message)
        frame, level = sys._getframe(1), 2
        while frame is not None and frame.f_code.co_filename.startswith(_NOT_USER_CODE):
            frame, level = frame.f_back, level + 1
        warnings.warn(message, RuntimeWarning, stacklevel=level)

    def _traceable(self, groups: list[Mapping]) -> bool:
        devices = {p.device for g in groups for p in g["params"]}
        return all(getattr(backends.resolve(self.backend, d), "traceable", False) for d in devices)

    def restore_and_step(self, base: torch.optim.Optimizer, direction=None) -> None:
        """Restore, then ``base.step()``; for the tensors a fused update can take, restore and update in one pass.
        ``direction``: LookSAM's / GSAM's decomposition, not yet run (``fastasam._decompose.Direction``): over the
        fused update's tables when that takes every tensor, else applied to the gradients first."""
        plan = self._pending_plan()
        if plan.traced:
            with torch.no_grad():
                self._done(plan, plan.restore_all(TRACED, direction))
                base.step()
        elif torch.compiler.is_compiling():
            torch.compiler.disable(self._restore_and_step_planned)(plan, base, direction)
        else:
            self._restore_and_step_planned(plan, base, direction)

    def _restore_and_step_planned(self, plan: StepPlan, base: torch.optim.Optimizer, direction=None) -> None:
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            outcome = plan.second_step(base, direction)
            self._done(plan, outcome)  # restored: whatever the base optimizer's step does next
            if not outcome.fused and plan.second_pass_missing():  # a fused step found every gradient
                self._warn_once(NO_GRADIENT_SECOND)
            plan.finish(base, outcome)
        finally:
            torch._C._set_grad_enabled(enabled)

    def _done(self, plan: StepPlan, outcome: Outcome) -> None:
        """The perturbation is undone: nothing is pending; the report describes ``outcome``."""
        self._pending, self.perturbed = None, False
        _PERTURBING.discard(self._ref)
        self._last = (plan, outcome)
        if outcome.replan:
            self._plan = None

    @torch.no_grad()
    def restore(self, why: str = "restore, then the base optimizer's step") -> None:
        """Undo the perturbation (the caller steps the base optimizer itself)."""
        plan = self._pending_plan()
        if not plan.traced and not plan.params_intact():
            plan.restore_tensor_by_tensor()
            self._done(plan, MOVED)
            return
        self._done(plan, plan.restore_all(Outcome(False, why)))

    def _pending_plan(self) -> StepPlan:
        if self._pending is None:
            raise RuntimeError(
                "fastasam: second_step() called without a first_step() before it; there is no perturbation to undo. "
                "Call first_step() after the first backward pass."
            )
        return self._pending
