"""What LookSAM and GSAM share: the decomposition of the second pass's gradient against the first.

Notation (all over every parameter of the optimizer that has a gradient): ``g`` the first pass's gradient at w,
``e`` the usual (A)SAM perturbation from g (ASAM's ``|w|`` scaling with ``adaptive=True``), ``g_s`` the second
pass's gradient at w + e, ``<.,.>`` and ``||.||`` global. The decompositions use the plain gradients. The base
optimizer receives the descent direction as the gradient (momentum, weight decay, Adam moments as usual).

* :class:`LookSAM` (Liu et al., CVPR 2022, Alg. 1): every k-th step (step 0 included) is a full two-pass step that
  descends along ``g_s`` and keeps ``g_v = g_s - (<g, g_s> / ||g||^2) g``; the other steps take one pass and descend
  along ``g + alpha * (||g|| / ||g_v||) * g_v``. One extra parameter-sized buffer (``g_v``, which holds ``g`` during
  a full step), saved in ``state_dict()``.
* :class:`GSAM` (Zhuang et al., ICLR 2022): every step is a two-pass step that descends along
  ``g_s - alpha * g_perp`` with ``g_perp = g - (<g, g_s> / ||g_s||^2) g_s``. One extra buffer (``g``) while a step is
  in flight.

A ratio whose denominator is 0 is taken as 0 (``g = 0``: ``g_v = g_s``; ``g_v = 0`` or ``g_s = 0``: no correction).
The loop is the same as for ``fastasam.ASAM(..., every=k)``: ``if opt.second_pass_needed: first_step, second
backward``; then ``second_step``. Products are in fp32 (fp64 for fp64 storage), sums in fp64, as device tensors:
no host sync.

On the multi-tensor backends (``cpu``, ``triton``, ``cuda``) each decomposition is two launches per (device, dtype)
bucket, ``dots`` and ``combine``: the three global sums, then the direction (or ``g_v``) computed from them on the
device; keeping ``g`` is one copy launch. A two-pass step asks the step plan to run them over its own tables (the
first step's, the fused update's; ``fastasam._decompose.Direction``), confirmed by the step's one pass over the
gradients; elsewhere they run over tables of their own (``fastasam._decompose``), confirmed by a pass of their own.
The ``foreach`` backend (and any step the kernels cannot serve, e.g. a gradient in one pass only; ``opt.report()``
says which ran and why) runs them as ``torch._foreach_*`` ops over each fp32/fp64 device bucket, and the
``reference`` backend per tensor: the oracle the others are tested against. Those torch-op formulas (``dot``,
``axpby_``) live in the two backends, beside their perturbation; this module decides, per paper, which direction a
step takes and when.
GSAM's direction is not written into the gradients when the fused restore + update takes every tensor: that kernel
reads ``g_s`` and ``g`` and forms the direction itself; otherwise (a base-optimizer step on some tensors, GradScaler,
a non-fused engine path) ``combine`` writes it first. LookSAM's one-pass direction is a separate launch (its
one-pass steps use the base optimizer's own step).
DTensor parameters (FSDP2 ``fully_shard``) work on their local shards: the sums of each shard group's parameters are
all-reduced over it (on the device), and LookSAM's ``g_v`` is saved as DTensors of the parameters' placements.
"""


from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import torch

from .. import _decompose
from .._decompose import Decomposer, Direction, PhaseTables
from .._plan import indices_by_key, is_dtensor, local_gradient, shard_groups, sum_over
from ..backends import foreach, reference
from ..optim import ASAM
from ..report import StepReport


def _check_alpha(cls: str, alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"fastasam: {cls}'s alpha must be a finite number >= 0, got {alpha!r}.")
    return float(alpha)


class _Decomposed(ASAM):
    """What LookSAM and GSAM share: the parameters with gradients, global sums, the kernels' tables, the checks."""

    _alpha: float

    @property
    def alpha(self) -> float:
        """The weight of the decomposition's correction: a finite number >= 0, checked when set (a schedule may set
        it between steps)."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = _check_alpha(type(self).__name__, value)

    def _decomposer(self) -> Decomposer:
        dec = self.__dict__.get("_dec")
        if dec is None:
            dec = self._dec = Decomposer(self.requested_backend)
        return dec

    # --- the hooks of ASAM's step: asked of the step plan, which runs them over its own tables (its one pass over the
    # gradients confirms them); else on tables of their own (one more pass) or as torch ops --------------------------

    _keeps_first_gradient = True

    def _first_gradient_keep(self) -> Direction:
        return Direction(self._decomposer(), _decompose.KEEP, self._kept, self.alpha, self._keep_first_gradient)

    def _keep_first_gradient(self) -> None:
        """The copy of the first pass's gradients, when the step plan does not run it."""
        t = self._decomposer().ready("first", self.param_groups, self.alpha)
        if t is None:
            t = self._keep_cold()
        if t is not None:
            t.combine(_decompose.KEEP)

    @torch.no_grad()
    def _keep_cold(self) -> PhaseTables | None:
        """Buffers for the gradients there are, and the tables (or, without them, the copy per tensor)."""
        self._set_kept(self._buffers_for_grads())
        t = self._build("first")
        if t is None:
            for p, buf in self._kept.items():
                buf.copy_(self._grad(p))
        return t

    @torch.no_grad()
    def _rescale_first_gradient(self, grad_scale: torch.Tensor | None, scaler: Any) -> None:
        # the first pass unscaled and the second not: times the scale; the other way round: divided by it
        if grad_scale is not None:
            factor = grad_scale.double()
        elif scaler is not None and getattr(scaler, "_scale", None) is not None:
            factor = scaler._scale.double().reciprocal()
        else:
            raise RuntimeError(
                f"fastasam: {type(self).__name__} could not tell which torch.amp.GradScaler scaled the first pass, "
                "and scaler.unscale_(opt) ran on one pass only. Call scaler.step(opt) for the second step, or "
                "unscale_ after the second backward only.")
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for buf in self._kept.values():
            buf = buf.to_local() if is_dtensor(buf) else buf
            by_device.setdefault(buf.device, []).append(buf)
        for device, bufs in by_device.items():
            torch._foreach_mul_(bufs, factor.float().to(device))

    def _direction(self, phase: str, mode: int, torch_ops: Callable[[], None]) -> None:
        """The sums, then the combination ``mode``, on this optimizer's own tables (``fastasam._decompose``); or
        ``torch_ops`` (the same formulas)."""
        t = self._decomposer().ready(phase, self.param_groups, self.alpha) or self._build(phase)
        if t is None:
            with torch.no_grad():
                torch_ops()
            return
        t.dots()
        t.combine(mode)

    _two_pass_mode: int  # the second step's combination (GSAM's direction, LookSAM's g_v)

    def _two_pass_direction(self) -> None:
        # asked of the step plan, which runs it over its own tables when its fused update takes every tensor
        self._deferred = Direction(self._decomposer(), self._two_pass_mode, self._kept, self.alpha,
                                   self._apply_two_pass)

    def _apply_two_pass(self) -> None:
        """The second step's combination before the restore, when the step plan does not run it."""
        self._direction("second", self._two_pass_mode, self._two_pass_torch_ops)

    def _two_pass_torch_ops(self) -> None:
        raise NotImplementedError

    def _build(self, phase: str) -> PhaseTables | None:
        """The kernels' tables for this phase, or None: run the torch-op path (``_dot`` / ``_axpby_``: the foreach
        backend's formulas over fp32/fp64 buckets, else the reference backend's, tensor by tensor)."""
        t = self._decomposer().build(phase, self.param_groups, self._kept, self.alpha)
        return None if isinstance(t, str) else t

    def _buffers_for_grads(self) -> dict[torch.Tensor, torch.Tensor]:
        """One buffer per parameter with a gradient, laid out like the gradient (the kept ones reused)."""
        out = {}
        for p in self._params():
            g = self._grad(p)
            if g is not None:
                buf = self._kept.get(p)
                if buf is None or not _decompose._same_layout(g, buf) or buf.dtype != g.dtype or \
                        buf.device != g.device:
                    buf = torch.empty_like(g)
                out[p] = buf
        return out

    def _set_kept(self, kept: dict[torch.Tensor, torch.Tensor]) -> None:
        """Keep these buffers; the kernels' tables are rebuilt when one of them changed."""
        if kept.keys() != self._kept.keys() or any(kept[p] is not self._kept[p] for p in kept):
            self._decomposer().invalidate()
        self._kept = kept

    def report(self) -> StepReport:
        """``ASAM.report()`` plus how the last decomposition ran (``direction``)."""
        return dataclasses.replace(super().report(), direction=self._decomposer().last)

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    @staticmethod
    def _writable_grads(params: list[torch.Tensor]) -> None:
        """Give each of ``params`` whose gradient is expanded (a stride of 0 over more than one element, as
        ``tensor.expand`` makes) a dense copy of it in ``.grad``: the direction is written into the gradients, and
        an expanded tensor cannot be written element by element. Run by the torch-op paths only (the kernels never
        take such a gradient)."""
        for p in params:
            g = p.grad
            if g is not None and any(st == 0 and n > 1 for n, st in zip(g.shape, g.stride())):
                p.grad = g.clone(memory_format=torch.contiguous_format)

    @staticmethod
    def _grad(p: torch.Tensor) -> torch.Tensor | None:
        """The gradient as the decompositions see it: a DTensor's (FSDP2) local shard, which shares its memory."""
        g = p.grad
        return local_gradient(p, g) if g is not None and is_dtensor(p) else g

    @staticmethod
    def _overs(params: Iterable[torch.Tensor]) -> list[tuple]:
        """Per parameter, the process groups its local sums are summed over (a DTensor's Shard mesh dims)."""
        return [shard_groups(p) for p in params]

    def _torch_ops(self, *lists: list[torch.Tensor]) -> ModuleType:
        """The backend whose torch-op formulas serve these lists: ``foreach`` for one fp32/fp64 device bucket on the
        fast backends; ``reference`` (tensor by tensor, the oracle) on the reference backend and for anything else."""
        if self.requested_backend != "reference" and lists[0]:
            first = lists[0][0]
            if first.dtype in (torch.float32, torch.float64) and all(
                    t.dtype == first.dtype and t.device == first.device for ts in lists for t in ts):
                return foreach
        return reference

    def _dot(self, a: list[torch.Tensor], b: list[torch.Tensor], over: list[tuple] | None = None
             ) -> torch.Tensor | None:
        """sum_i <a_i, b_i>: products in the accumulate dtype, summed in fp64 (LookSAM's ``g_v`` is the difference of
        nearly parallel vectors, which amplifies the sums' rounding), on the first tensor's device (None: empty).
        ``over[i]``: the process groups over which the sum of pair i's local shards is summed (DTensors)."""
        if not a:
            return None
        if over is not None and any(over):  # the pairs of each set of groups: local sums, all-reduced, then added
            total = None
            for groups, idx in indices_by_key(over).items():
                part = sum_over(self._dot([a[i] for i in idx], [b[i] for i in idx]), groups)
                total = part if total is None else total + part.to(total.device)
            return total
        return self._torch_ops(a, b).dot(a, b)

    def _axpby_(self, y: list[torch.Tensor], x: list[torch.Tensor], a: torch.Tensor | float,
                b: torch.Tensor | float) -> None:
        """y_i <- a * y_i + b * x_i (each product rounded, then the sum, in the accumulate dtype)."""
        if y:
            self._torch_ops(y, x).axpby_(y, x, a, b)

    @staticmethod
    def _ratio(num: torch.Tensor | None, den: torch.Tensor | None) -> torch.Tensor | float:
        if num is None or den is None:
            return 0.0
        return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0)


def _saved(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A kept buffer for ``state_dict()``: a copy; for a DTensor parameter, a DTensor of its placements (the buffer
    is the local shard), so that distributed checkpointing saves it as it saves the parameter."""
    if is_dtensor(p):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(v.clone(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return v.clone()


def _loaded(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if is_dtensor(v):
        v = v.to_local()
    return v.to(p.to_local().device if is_dtensor(p) else p.device).clone()


