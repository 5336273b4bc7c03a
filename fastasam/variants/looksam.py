"""LookSAM (Liu et al., CVPR 2022): (A)SAM's two passes every k-th step, a corrected one-pass step between
(the notation and the kernels: ``fastasam.variants._decomposed``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .. import _decompose
from ..optim import _NORM_EPS
from ._decomposed import _Decomposed, _loaded, _saved


class LookSAM(_Decomposed):
    """LookSAM: (A)SAM's two passes on every k-th step only; the steps between reuse the component ``g_v`` of the
    last second-pass gradient that is orthogonal to the first (see the module docstring). ``k=1`` is (A)SAM.

    Options and refusals as :class:`fastasam.ASAM`'s (``eps``/``norm_eps``: with a base optimizer that has an ``eps``
    of its own, such as Adam, pass ``norm_eps=`` for the norm's epsilon and ``base_optimizer_kwargs={"eps": ...}``
    for Adam's); ``k`` must be an int >= 1 and ``alpha`` a finite number >= 0 (also when set later)."""

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
        eps: float = _NORM_EPS,
        norm_eps: float = _NORM_EPS,
        restore: str = "copy",
        backend: str = "auto",
        base_optimizer_kwargs: Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"fastasam: LookSAM's k must be an int >= 1 (a full step every k steps), got {k!r}.")
        self.k, self.alpha = k, alpha
        self._kept: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> g during a full step, g_v after it
        super().__init__(params, base_optimizer, rho=rho, eta=eta, adaptive=adaptive, eps=eps, norm_eps=norm_eps,
                         restore=restore, backend=backend, every=k, base_optimizer_kwargs=base_optimizer_kwargs,
                         **base_kwargs)

    _two_pass_mode = _decompose.LOOK_FULL  # full step: descend along g_s; keep g_v = g_s - c g (in place)

    def _two_pass_torch_ops(self) -> None:
        params = self._params()
        both = [p for p in params if p in self._kept and p.grad is not None]
        g, g_s = [self._kept[p] for p in both], [self._grad(p) for p in both]
        kept = list(self._kept.values())
        c = self._ratio(self._dot(g, g_s, self._overs(both)), self._dot(kept, kept, self._overs(self._kept)))
        self._axpby_(g, g_s, -c, 1.0)  # in place: the buffers become g_v
        g_v = dict(zip(both, g))
        for p in params:  # a gradient in one pass only: the other is 0 there
            if p in self._kept and p not in g_v:
                g_v[p] = self._kept[p].mul_(-c)
            elif p not in g_v and p.grad is not None:
                g_v[p] = self._grad(p).clone()
        self._set_kept(g_v)

    def _one_pass_direction(self) -> None:  # g + alpha * (||g|| / ||g_v||) * g_v
        if self._kept:  # else no full step yet (a checkpoint of the plain base optimizer): a plain step
            self._direction("one", _decompose.LOOK_ONE, self._one_pass_torch_ops)

    def _one_pass_torch_ops(self) -> None:
        with_grad = [p for p in self._params() if p.grad is not None]
        self._writable_grads(with_grad)
        grads = [self._grad(p) for p in with_grad]
        kept = list(self._kept.values())
        gn, vn = self._dot(grads, grads, self._overs(with_grad)), self._dot(kept, kept, self._overs(self._kept))
        coef = self.alpha * self._ratio(gn.sqrt() if gn is not None else None, vn.sqrt() if vn is not None else None)
        both = [p for p in with_grad if p in self._kept]
        self._axpby_([self._grad(p) for p in both], [self._kept[p] for p in both], 1.0, coef)

    def _own_state(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(self._params())}
        return {"steps_done": self._steps_done, "g_v": {index[p]: _saved(p, v) for p, v in self._kept.items()}}

    def _load_own_state(self, own: Mapping[str, Any]) -> None:
        super()._load_own_state(own)
        params = self._params()
        self._kept = {params[int(i)]: _loaded(params[int(i)], v) for i, v in own.get("g_v", {}).items()}
        self._decomposer().invalidate()


