"""GSAM (Zhuang et al., ICLR 2022): descend along the second pass's gradient minus ``alpha`` times the first's
component orthogonal to it (the notation and the kernels: ``fastasam.variants._decomposed``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .. import _decompose
from ..optim import _NORM_EPS
from ._decomposed import _Decomposed


class GSAM(_Decomposed):
    """GSAM: (A)SAM's two passes every step, descending along ``g_s - alpha * g_perp`` (see the module docstring).
    ``alpha=0`` is (A)SAM.

    Options and refusals as :class:`fastasam.ASAM`'s (``eps``/``norm_eps``: with a base optimizer that has an ``eps``
    of its own, such as Adam, pass ``norm_eps=`` for the norm's epsilon and ``base_optimizer_kwargs={"eps": ...}``
    for Adam's); ``alpha`` must be a finite number >= 0 (also when set later)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float,
        alpha: float = 0.1,
        adaptive: bool = False,
        eta: float = 0.01,
        eps: float = _NORM_EPS,
        norm_eps: float = _NORM_EPS,
        restore: str = "copy",
        backend: str = "auto",
        base_optimizer_kwargs: Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.alpha = alpha
        self._kept: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> g (kept between steps: the kernels' tables)
        super().__init__(params, base_optimizer, rho=rho, eta=eta, adaptive=adaptive, eps=eps, norm_eps=norm_eps,
                         restore=restore, backend=backend, base_optimizer_kwargs=base_optimizer_kwargs, **base_kwargs)

    # (1 + alpha * c) * g_s - alpha * g, c = <g, g_s> / ||g_s||^2: in the fused restore + update when that takes
    # every tensor, else written into the gradients first
    _two_pass_mode = _decompose.GSAM

    def _two_pass_torch_ops(self) -> None:
        with_grad = [p for p in self._params() if p.grad is not None]
        self._writable_grads(with_grad)
        g_s = [self._grad(p) for p in with_grad]
        both = [p for p in with_grad if p in self._kept]
        c = self._ratio(self._dot([self._kept[p] for p in both], [self._grad(p) for p in both], self._overs(both)),
                        self._dot(g_s, g_s, self._overs(with_grad)))
        alone = [self._grad(p) for p in with_grad if p not in self._kept]  # no first-pass gradient: g = 0 there
        self._axpby_([self._grad(p) for p in both], [self._kept[p] for p in both], 1 + self.alpha * c, -self.alpha)
        self._axpby_(alone, alone, 1 + self.alpha * c, 0.0)
