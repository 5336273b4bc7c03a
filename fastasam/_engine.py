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

from collections.abc import Iterable, Mapping

import torch

from . import backends
from ._plan import RESTORE_MODES
from ._step_plan import StepPlan, UpdatePlan, check_nonnegative
from .report import StepReport, build_report

__all__ = ["SharpnessEngine", "check_nonnegative"]


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
        self._buffers: dict[torch.Tensor, torch.Tensor] = {}
        self._sqnorm: torch.Tensor | None = None
        self._last: tuple[StepPlan, str] | None = None  # the last step's plan and how its second step ran

    # --- results of the last first_step ---------------------------------------------------------------------------

    @property
    def perturbed(self) -> bool:
        return self._pending is not None

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

    def first_step(self, groups: list[Mapping]) -> None:
        if self._pending is not None:
            raise RuntimeError(
                "fastasam: first_step() called twice in a row; the weights already hold w + e. "
                "Call second_step() before the next first_step()."
            )
        if not torch.compiler.is_compiling():
            self._first_step_planned(groups)
        elif self._traceable(groups):
            with torch.no_grad():  # dynamo traces the tensor ops; its guards replace the watch
                plan = StepPlan(self, groups, traced=True)
                self._sqnorm = plan.first_step(plan.grads_at_build())
            self._pending = plan
        else:  # dynamo runs the planned step as it is, between its graphs (it reads addresses)
            torch.compiler.disable(self._first_step_planned)(groups)

    def _first_step_planned(self, groups: list[Mapping]) -> None:
        enabled = torch.is_grad_enabled()  # no_grad, without building a context manager every step
        torch._C._set_grad_enabled(False)
        try:
            self._first_step_in(groups)
        finally:
            torch._C._set_grad_enabled(enabled)

    def _first_step_in(self, groups: list[Mapping]) -> None:
        plan = self._plan
        if plan is None or not plan.same_structure(groups):
            plan = None
        elif not plan.same_options(groups):
            plan = plan.with_options(groups)  # uploads new options, or None when the structure must change
        grads = plan.watch.check() if plan is not None else None
        if grads is None:
            plan = StepPlan.rebuild(self, groups, plan)
            grads = plan.grads_at_build()
        self._plan = plan
        self._sqnorm = plan.first_step(grads)
        self._pending = plan

    def _traceable(self, groups: list[Mapping]) -> bool:
        devices = {p.device for g in groups for p in g["params"]}
        return all(getattr(backends.resolve(self.backend, d), "traceable", False) for d in devices)

    def restore_and_step(self, base: torch.optim.Optimizer, direction=None) -> None:
        """Restore, then ``base.step()``; for the tensors a fused update can take, restore and update in one pass.
        ``direction``: a descent direction not yet in the gradients (``fastasam._decompose.Deferred``, GSAM's): the
        fused update steps along it when it takes every tensor, else it is applied to the gradients first."""
        plan = self._pending_plan()
        if plan.traced:
            with torch.no_grad():
                self._restore_then_step(plan, base, "restore, then the base optimizer's step (torch.compile)",
                                        direction)
        elif torch.compiler.is_compiling():
            torch.compiler.disable(self._restore_and_step_planned)(plan, base, direction)
        else:
            self._restore_and_step_planned(plan, base, direction)

    def _restore_and_step_planned(self, plan: StepPlan, base: torch.optim.Optimizer, direction=None) -> None:
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._restore_and_step_in(plan, base, direction)
        finally:
            torch._C._set_grad_enabled(enabled)

    def _restore_and_step_in(self, plan: StepPlan, base: torch.optim.Optimizer, direction=None) -> None:
        update = plan.update
        warm = update is not None and update.valid(base) and update.check()  # check() confirms the fused tensors
        if not (warm and update.covers_all) and not plan.params_intact():
            self._restore_moved(plan, direction)  # the tables point at memory the parameters no longer hold
            base.step()
            return
        if not warm:
            update = plan.update = UpdatePlan(plan, base)
        if update.mode != "fused":
            self._restore_then_step(plan, base, update.mode, direction)
            return
        if update.capturing_adam():  # torch.optim.Adam's host step count cannot be captured; its own path decides
            self._restore_then_step(plan, base, "restore, then the base optimizer's step: Adam during CUDA-graph "
                                                "capture", direction)
            return
        if not update.sync():  # the Adam step counts were changed from outside: plan again from the state as it is
            update = plan.update = UpdatePlan(plan, base)
            if update.mode != "fused" or not update.sync():
                self._restore_then_step(plan, base, update.mode, direction)
                return
        fuse = False
        if direction is not None:
            fuse = update.bind_direction(direction)
            if fuse:
                direction.fused_into_update()
            else:
                direction.apply()
        update.restore_fused(fuse)
        self._pending = None
        self._last = (plan, update.mode)
        update.step_rest()

    def _restore_then_step(self, plan: StepPlan, base: torch.optim.Optimizer, why: str, direction=None) -> None:
        if direction is not None:
            direction.apply()
        plan.restore()
        self._pending = None
        self._last = (plan, why)
        base.step()

    @torch.no_grad()
    def restore(self, why: str = "restore, then the base optimizer's step") -> None:
        """Undo the perturbation (the caller steps the base optimizer itself)."""
        plan = self._pending_plan()
        if not plan.traced and not plan.params_intact():
            self._restore_moved(plan)
            return
        plan.restore()
        self._pending = None
        self._last = (plan, why)

    def _restore_moved(self, plan: StepPlan, direction=None) -> None:
        """A parameter's storage changed between the two steps: restore tensor by tensor into the storage each
        parameter holds now (as the oracle does), or raise having written nothing; the plan is dropped, so the next
        step plans from the parameters as they are. The caller then has the base optimizer step."""
        plan.restore_tensor_by_tensor()
        if direction is not None:
            direction.apply()
        self._pending = None
        self._plan = None
        self._last = (plan, "restore tensor by tensor, then the base optimizer's step: a parameter's storage changed "
                            "between first_step and second_step")

    def _pending_plan(self) -> StepPlan:
        if self._pending is None:
            raise RuntimeError(
                "fastasam: second_step() called without a first_step() before it; there is no perturbation to undo. "
                "Call first_step() after the first backward pass."
            )
        return self._pending
