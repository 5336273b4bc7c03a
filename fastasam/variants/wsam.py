"""WSAM (Yue et al., KDD 2023, "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a Regularization
Term"): the loss plus ``gamma / (1 - gamma)`` times the sharpness ``L(w + e) - L(w)``, whose gradient is
``g + alpha * (g_s - g)``, ``alpha = gamma / (1 - gamma)``.

Per step, with ``g`` the first pass's gradient at ``w``, ``e`` (A)SAM's perturbation from it and ``g_s`` the second
pass's gradient at ``w + e`` (pytorch_optimizer's ``WSAM``, in its order):

    restore w
    max_norm:        g_s <- g_s * min(1, max_norm / (||g_s|| + 1e-6))      (torch.nn.utils.clip_grad_norm_'s rule)
    decouple=True:   the base optimizer steps with g; then w <- w - lr * alpha * (g_s - g)   (each group's lr)
    decouple=False:  the base optimizer steps with alpha * g_s + (1 - alpha) * g

One buffer per parameter keeps ``g`` from ``first_step`` to ``second_step`` (with ``decouple=True`` it holds
``g_s - g`` during the base step); nothing is kept between steps, so ``state_dict()`` adds nothing.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .._plan import is_dtensor
from ..optim import _NORM_EPS
from ._decomposed import _Decomposed
from .friendly import UNKNOWN, by_device, check_finite_nonnegative, check_fraction, torch_ops, user_unscaled

__all__ = ["WSAM"]

_SWAP_CHUNK = 1 << 24  # elements per foreach swap: bounds the temporary of decouple=True's (g_s, g) -> (g, g_s - g)


class WSAM(_Decomposed):
    """WSAM: sharpness as a weighted regularizer (see the module docstring). ``gamma=0`` (``alpha=0``) with
    ``decouple=False`` is the base optimizer on the first pass's gradient; ``gamma=0.5`` (``alpha=1``) is (A)SAM.

    ``params``, ``base_optimizer``, ``backend`` and the base optimizer's options are as for :class:`fastasam.ASAM`
    (``restore``, ``use_gc`` too).

    Args:
        rho: the neighbourhood radius (>= 0; default 0.05).
        gamma: the sharpness' weight, in [0, 1): ``alpha = gamma / (1 - gamma)`` (default 0.9, ``alpha = 9``).
        adaptive: ASAM's scaling of the ascent with ``eta=0`` (``T = |w|``, pytorch_optimizer's ``w^2`` scaling).
        decouple: the sharpness term as a separate step after the base optimizer's (default True), or mixed into
            the gradient the base optimizer steps with.
        max_norm: clip the second pass's gradients (of this optimizer's parameters) to this global norm before
            they are mixed (``None``: no clipping); a finite number > 0. Under ``torch.amp.GradScaler`` the norm is
            the unscaled gradients'.
        eps: added to the ascent's norm (fastasam's ``norm_eps``; default 1e-12). The base optimizer's own ``eps``
            (Adam's) goes in ``base_optimizer_kwargs={"eps": ...}``.

    Unlike pytorch_optimizer's ``WSAM`` there is no ``model`` argument: pytorch_optimizer takes it to freeze the
    BatchNorm running statistics in the second pass (use ``fastasam.frozen_batchnorm_stats(model)`` around the
    second forward) and to clip ``model.parameters()``' gradients (here ``max_norm`` clips the gradients of this
    optimizer's own parameters).

    ``second_step`` mutates ``.grad`` (it holds the gradient the base optimizer stepped with), the parameters and the
    base optimizer's state. Under ``torch.amp.GradScaler`` a step whose passes hold an inf/NaN is skipped whole,
    the decoupled term included (one host read of the flag with ``decouple=True``). Refused with a ``ValueError``:
    ``gamma`` outside [0, 1), ``max_norm`` not a finite number > 0, ``every`` other than 1, and
    :class:`fastasam.ASAM`'s refusals.
    """

    _transforms_first_gradient = True  # to record whether the first pass was unscaled (GradScaler) before the norm
    _stepping: Any = UNKNOWN
    _first_unscaled = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float = 0.05,
        gamma: float = 0.9,
        adaptive: bool = False,
        decouple: bool = True,
        max_norm: float | None = None,
        eps: float = _NORM_EPS,
        backend: str = "auto",
        base_optimizer_kwargs: Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.gamma = gamma
        if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))
                                     or not 0 < max_norm < math.inf):
            raise ValueError(f"fastasam: WSAM's max_norm must be None (no clipping) or a finite number > 0, got "
                             f"{max_norm!r}.")
        check_finite_nonnegative("WSAM", "eps", eps)
        if base_kwargs.pop("every", 1) != 1:
            raise ValueError("fastasam: WSAM takes two passes on every step; leave every at 1.")
        self.decouple, self.max_norm = bool(decouple), None if max_norm is None else float(max_norm)
        self._kept: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> g (g_s - g during a decoupled base step)
        self._sharp: list[torch.Tensor] = []  # the tensors whose decoupled term is pending
        self._skip: torch.Tensor | None = None
        self._gs_scale: torch.Tensor | None = None
        super().__init__(params, base_optimizer, rho=rho, eta=0.0, adaptive=adaptive, norm_eps=float(eps),
                         backend=backend, base_optimizer_kwargs=base_optimizer_kwargs, **base_kwargs)

    @property
    def gamma(self) -> float:
        """The sharpness' weight in [0, 1) (``alpha = gamma / (1 - gamma)``), checked when set."""
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gamma = check_fraction("WSAM", "gamma", value)
        self.alpha = self._gamma / (1.0 - self._gamma)

    def __getstate__(self) -> dict[str, Any]:
        out = super().__getstate__()
        out.pop("_stepping", None)
        return out

    def _transform_first_gradient(self) -> None:
        super()._transform_first_gradient()  # use_gc
        self._first_unscaled = user_unscaled(self)

    def _know_scaler(self, scaler) -> None:
        super()._know_scaler(scaler)
        self._stepping = weakref.ref(scaler)

    # --- second_step: before the restore, the gradient the base optimizer steps with --------------------------------

    @torch.no_grad()
    def _two_pass_direction(self) -> None:
        scaled = "found_inf" in self.__dict__  # under scaler.step(opt)
        gs_scale = self.__dict__.get("grad_scale") if scaled else None  # g_s carries it (None: unscaled)
        scaler = self._stepping() if scaled and self._stepping not in (None, UNKNOWN) else None
        g_scale = None if scaler is None or self._first_unscaled else scaler._scale  # what g carries
        params = [p for p in self._params() if p.grad is not None]
        self._writable_grads(params)
        grads = [self._grad(p) for p in params]
        backend = self.requested_backend
        if scaled and self.decouple:  # the step is skipped when either pass holds an inf/NaN: so is the term
            self._skip = _not_finite(grads, self._engine.perturbation_skipped)
        if self.max_norm is not None and grads:
            sq = self._dot(grads, grads, self._overs(params))
            norm = sq.sqrt() if gs_scale is None else sq.sqrt() / gs_scale.to(sq.device, torch.float64)
            coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
            for idx in by_device(grads).values():
                ts = [grads[i] for i in idx]
                torch._foreach_mul_(ts, coef.to(ts[0].device, torch.float32))
        alpha = self.alpha
        both = [p for p in params if p in self._kept]
        alone = [p for p in params if p not in self._kept]  # no first-pass gradient: g = 0 there
        for idx in by_device(both).values():
            ps = [both[i] for i in idx]
            g_s, g = [self._grad(p) for p in ps], [self._kept[p] for p in ps]
            f = _ratio(gs_scale, g_scale, g_s[0].device)  # g in g_s's scale: f * g
            if not self.decouple:
                torch_ops(backend, g_s, g).axpby_(g_s, g, alpha, (1.0 - alpha) * f)
            else:
                _swap_to_difference(backend, g_s, g, f)
        if alone:
            gs_alone = [self._grad(p) for p in alone]
            if not self.decouple:
                torch_ops(backend, gs_alone).axpby_(gs_alone, gs_alone, alpha, 0.0)
            else:  # the sharpness is g_s itself; the base optimizer steps with g = 0
                kept = dict(self._kept)
                for p, gs in zip(alone, gs_alone, strict=True):
                    kept[p] = gs.clone(memory_format=torch.preserve_format)
                    gs.zero_()
                self._set_kept(kept)
        if self.decouple:
            self._sharp, self._gs_scale = params, gs_scale

    # --- after the base optimizer's step: the decoupled term ------------------------------------------------------

    def second_step(self, zero_grad: bool = False) -> None:
        self._stepping = None
        super().second_step(zero_grad=False)
        self._decoupled_term(scaled=False)
        if zero_grad:
            self.zero_grad()

    def _scaled_second_step(self) -> None:
        super()._scaled_second_step()
        self._decoupled_term(scaled=True)

    @torch.no_grad()
    def _decoupled_term(self, scaled: bool) -> None:
        """``w <- w - lr * alpha * (g_s - g)`` per param group, after the base optimizer's step (not on a step the
        GradScaler skips)."""
        sharp, skip, gs_scale = self._sharp, self._skip, self._gs_scale
        self._sharp, self._skip, self._gs_scale = [], None, None
        if not sharp or (scaled and skip is not None and bool(skip)):
            return
        wanted = set(map(id, sharp))
        for group in self.param_groups:
            ps = [p for p in group["params"] if id(p) in wanted and p in self._kept]
            for idx in by_device(ps).values():
                sub = [ps[i] for i in idx]
                ws, ss = [_local(p) for p in sub], [self._kept[p] for p in sub]
                coef = -group["lr"] * self.alpha
                if gs_scale is not None:
                    coef = coef * gs_scale.to(ws[0].device, torch.float32).reciprocal()
                torch_ops(self.requested_backend, ws, ss).axpby_(ws, ss, 1.0, coef)


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor the kept buffers are laid out like: a DTensor parameter's local shard (sharing its memory)."""
    return p.to_local() if is_dtensor(p) else p.detach()


def _not_finite(grads: list[torch.Tensor], first: torch.Tensor | None) -> torch.Tensor:
    """A 0-d bool device tensor: some gradient holds an inf/NaN, or ``first`` (the first pass's flag) is set."""
    flag = first
    nonempty = [g for g in grads if g.numel()]
    for idx in by_device(nonempty).values():
        peak = torch.stack(torch._foreach_max(torch._foreach_abs([nonempty[i] for i in idx]))).max()
        here = ~torch.isfinite(peak)
        flag = here if flag is None else flag | here.to(flag.device)
    return flag if flag is not None else torch.zeros((), dtype=torch.bool)


def _ratio(num: torch.Tensor | None, den: torch.Tensor | None, device: torch.device) -> torch.Tensor | float:
    """``num / den`` (None: 1) as a float32 device scalar, or 1.0."""
    if num is None and den is None:
        return 1.0
    out = torch.ones((), dtype=torch.float64, device=device)
    if num is not None:
        out = out * num.to(device, torch.float64)
    if den is not None:
        out = out / den.to(device, torch.float64)
    return out.float()


def _swap_to_difference(backend: str, g_s: list[torch.Tensor], g: list[torch.Tensor], f: torch.Tensor | float) -> None:
    """``(g_s, g) <- (f * g, g_s - f * g)`` in place, exactly as written (no rounding of g beyond ``f *``): the
    gradients get the first pass's gradient, the buffers the sharpness. A temporary of at most ``_SWAP_CHUNK``
    elements per foreach chunk (one tensor at a time on the per-tensor path)."""
    if torch_ops(backend, g_s, g).name == "foreach":
        start = 0
        while start < len(g_s):
            end, size = start, 0
            while end < len(g_s) and (end == start or size + g_s[end].numel() <= _SWAP_CHUNK):
                size += g_s[end].numel()
                end += 1
            a, b = g_s[start:end], g[start:end]
            fg = b if isinstance(f, float) and f == 1.0 else torch._foreach_mul(b, f)
            diff = torch._foreach_sub(a, fg)
            torch._foreach_copy_(a, fg)
            torch._foreach_copy_(b, diff)
            start = end
        return
    for a, b in zip(g_s, g, strict=True):
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        fg = f * b.to(acc)
        diff = a.to(acc) - fg
        a.copy_(fg)
        b.copy_(diff)
