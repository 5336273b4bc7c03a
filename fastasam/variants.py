"""Cheaper and better sharpness-aware steps around (A)SAM: LookSAM and GSAM.

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
backward``; then ``second_step``. Sums are in fp32 (fp64 for fp64 storage), as a device tensor: no host sync.

Not yet: the decompositions run per tensor in Python with torch ops on every backend (the backends' own norm,
perturbation and fused restore + update run as for ASAM); they are not fused into the multi-tensor kernels, and
DTensor (FSDP2) parameters are refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._plan import accumulate_dtype
from .optim import ASAM


def _check_alpha(cls: str, alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"fastasam: {cls}'s alpha must be a finite number >= 0, got {alpha!r}.")
    return float(alpha)


class _Decomposed(ASAM):
    """What LookSAM and GSAM share: the parameters with gradients, global sums, the checks."""

    def _params(self) -> list[torch.nn.Parameter]:
        params = [p for group in self.param_groups for p in group["params"]]
        if any(type(p).__name__ == "DTensor" for p in params):
            raise NotImplementedError(f"fastasam: {type(self).__name__} does not support DTensor (FSDP2) parameters "
                                      "yet; use ASAM/SAM there.")
        return params

    @staticmethod
    def _sum(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """sum over the pairs of <a, b>, in the accumulate dtype, on the first pair's device (None: no pairs)."""
        total = None
        for a, b in pairs:
            acc = accumulate_dtype(a.dtype)
            part = (a.to(acc) * b.to(acc)).sum()
            total = part if total is None else total + part.to(total.device, total.dtype)
        return total

    @staticmethod
    def _ratio(num: torch.Tensor | None, den: torch.Tensor | None) -> torch.Tensor | float:
        if num is None or den is None:
            return 0.0
        return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0)


class LookSAM(_Decomposed):
    """LookSAM: (A)SAM's two passes on every k-th step only; the steps between reuse the component ``g_v`` of the
    last second-pass gradient that is orthogonal to the first (see the module docstring). ``k=1`` is (A)SAM."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float,
        k: int = 5,
        alpha: float = 0.7,
        adaptive: bool = False,
        eta: float = 0.01,
        eps: float = 1e-12,
        restore: str = "copy",
        backend: str = "auto",
        base_optimizer_kwargs: Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"fastasam: LookSAM's k must be an int >= 1 (a full step every k steps), got {k!r}.")
        self.k, self.alpha = k, _check_alpha("LookSAM", alpha)
        self._g_v: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> g during a full step, g_v after it
        super().__init__(params, base_optimizer, rho=rho, eta=eta, adaptive=adaptive, eps=eps, restore=restore,
                         backend=backend, every=k, base_optimizer_kwargs=base_optimizer_kwargs, **base_kwargs)

    def _keep_first_gradient(self) -> None:
        kept = {}
        for p in self._params():
            if p.grad is not None:
                buf = self._g_v.get(p)
                if buf is None or buf.shape != p.grad.shape or buf.dtype != p.grad.dtype:
                    buf = torch.empty_like(p.grad)
                kept[p] = buf.copy_(p.grad)
        self._g_v = kept

    @torch.no_grad()
    def _two_pass_direction(self) -> None:  # full step: descend along g_s; keep g_v
        params = self._params()
        both = [(self._g_v[p], p.grad) for p in params if p in self._g_v and p.grad is not None]
        c = self._ratio(self._sum(both), self._sum((g, g) for g in self._g_v.values()))
        g_v = {}
        for p in params:
            g, g_s = self._g_v.get(p), p.grad
            if g is None and g_s is None:
                continue
            ref = g if g is not None else g_s
            acc = accumulate_dtype(ref.dtype)
            v = (g_s.to(acc) if g_s is not None else 0) - c * (g.to(acc) if g is not None else 0)
            g_v[p] = (g if g is not None else torch.empty_like(g_s)).copy_(v)
        self._g_v = g_v

    @torch.no_grad()
    def _one_pass_direction(self) -> None:  # g + alpha * (||g|| / ||g_v||) * g_v
        params = [p for p in self._params() if p.grad is not None]
        if not self._g_v:  # no full step yet (a checkpoint of the plain base optimizer): a plain step
            return
        gn = self._sum((p.grad, p.grad) for p in params)
        vn = self._sum((v, v) for v in self._g_v.values())
        coef = self.alpha * self._ratio(gn.sqrt() if gn is not None else None, vn.sqrt() if vn is not None else None)
        for p in params:
            v = self._g_v.get(p)
            if v is not None:
                acc = accumulate_dtype(p.grad.dtype)
                p.grad.copy_(p.grad.to(acc) + coef * v.to(acc))

    def _own_state(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        return {"steps_done": self._steps_done, "g_v": {index[p]: v.clone() for p, v in self._g_v.items()}}

    def _load_own_state(self, own: Mapping[str, Any]) -> None:
        super()._load_own_state(own)
        params = [p for group in self.param_groups for p in group["params"]]
        self._g_v = {params[int(i)]: v.to(params[int(i)].device).clone() for i, v in own.get("g_v", {}).items()}


class GSAM(_Decomposed):
    """GSAM: (A)SAM's two passes every step, descending along ``g_s - alpha * g_perp`` (see the module docstring).
    ``alpha=0`` is (A)SAM."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float,
        alpha: float = 0.1,
        adaptive: bool = False,
        eta: float = 0.01,
        eps: float = 1e-12,
        restore: str = "copy",
        backend: str = "auto",
        base_optimizer_kwargs: Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.alpha = _check_alpha("GSAM", alpha)
        self._g: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> g, while a step is in flight
        super().__init__(params, base_optimizer, rho=rho, eta=eta, adaptive=adaptive, eps=eps, restore=restore,
                         backend=backend, base_optimizer_kwargs=base_optimizer_kwargs, **base_kwargs)

    def _keep_first_gradient(self) -> None:
        self._g = {p: p.grad.clone() for p in self._params() if p.grad is not None}

    @torch.no_grad()
    def _two_pass_direction(self) -> None:  # (1 + alpha * c) * g_s - alpha * g, c = <g, g_s> / ||g_s||^2
        params = [p for p in self._params() if p.grad is not None]
        c = self._ratio(self._sum((self._g[p], p.grad) for p in params if p in self._g),
                        self._sum((p.grad, p.grad) for p in params))
        for p in params:
            g = self._g.get(p)
            acc = accumulate_dtype(p.grad.dtype)
            d = p.grad.to(acc) - self.alpha * (-c * p.grad.to(acc) + (g.to(acc) if g is not None else 0))
            p.grad.copy_(d)
        self._g = {}
