"""FriendlySAM (Li et al., CVPR 2024, "Friendly Sharpness-Aware Minimization"): the ascent along the first pass's
gradient minus its exponential moving average, ``d = g - sigma * m``, which removes the full-batch component from the
perturbation and keeps the batch-specific one.

Per tensor with a first-pass gradient ``g`` (the names and defaults of pytorch_optimizer's ``FriendlySAM``):

    first step of a tensor:   m = g,                                      d = g
    every later step:         d = g - sigma * m,   m = lmbda * m + (1 - lmbda) * g
    ascent:                   (A)SAM's from d: e = rho * T^2 d / (||T d|| + eps), T = |w| (adaptive) or 1

``d`` is written into ``.grad`` before the ascent (its norm is the norm of ``d``); the descent is the base optimizer's
step on the second pass's gradient, as for (A)SAM. ``m`` is one parameter-sized buffer, saved in ``state_dict()``.

Here also the helpers the other variants of this package share: which torch-op formulas serve a list of tensors
(:func:`torch_ops`), and the loss scale a first pass carries under ``torch.amp.GradScaler`` (:func:`first_pass_scale`).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import torch
from torch.amp import grad_scaler as _gs

from .. import _amp
from ..backends import foreach, reference
from ..optim import ASAM
from ._decomposed import _Decomposed, _loaded, _saved

__all__ = ["FriendlySAM"]

UNKNOWN = "unknown"  # which GradScaler steps an optimizer, before its first second step


# --- shared by FriendlySAM, WSAM and BSAM ---------------------------------------------------------------------------


def torch_ops(backend: str, *lists: list[torch.Tensor]) -> ModuleType:
    """The backend whose torch-op formulas (``axpby_``) serve these lists: ``foreach`` for one fp32/fp64 device
    bucket on any backend but ``reference``; ``reference`` (tensor by tensor, in fp32 for fp16/bf16: the oracle)
    otherwise."""
    if backend != "reference" and lists and lists[0]:
        first = lists[0][0]
        if first.dtype in (torch.float32, torch.float64) and all(
                t.dtype == first.dtype and t.device == first.device for ts in lists for t in ts):
            return foreach
    return reference


def by_device(tensors: Iterable[torch.Tensor], dtype: bool = False) -> dict[Any, list[int]]:
    """Indices of ``tensors`` per device (``dtype=True``: per (device, dtype)), in order."""
    out: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype) if dtype else t.device, []).append(i)
    return out


def check_fraction(cls: str, name: str, value: object, where: str = "") -> float:
    """``value`` as a float in [0, 1), or a ``ValueError`` naming the option and the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"fastasam: {cls}'s {name} must be a number in [0, 1){where} (e.g. 0.9), got {value!r}.")
    return float(value)


def check_finite_nonnegative(cls: str, name: str, value: object, where: str = "") -> float:
    """``value`` as a float, finite and >= 0, or a ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"fastasam: {cls}'s {name} must be a finite number >= 0{where}, got {value!r}.")
    return float(value)


def live_scalers(opt: Any) -> list[_gs.GradScaler]:
    """The enabled GradScalers the optimizer knows (looked for once, as ASAM's first step does)."""
    if opt._scalers is ASAM._scalers:
        opt._scalers = _amp.find_scalers()
    return [s for s in (ref() for ref in opt._scalers) if s is not None and s.is_enabled()]


def user_unscaled(opt: Any) -> bool:
    """``scaler.unscale_(opt)`` ran on the gradients present (a known GradScaler's record for ``opt`` is unscaled)."""
    for scaler in live_scalers(opt):
        record = _amp._record(scaler, opt)
        if record is not None and record["stage"] is _gs.OptState.UNSCALED:
            return True
    return False


def first_pass_scale(opt: Any) -> tuple[torch.Tensor | None, bool]:
    """``(scale, guessed)``: the loss scale the first pass's gradients carry (None: unscaled) and whether it is a
    guess. The scale of the GradScaler that stepped ``opt`` (``opt._stepping``, learnt at each ``scaler.step(opt)``);
    none when its last second step was a plain one or ``scaler.unscale_(opt)`` ran before ``first_step``. Before the
    first second step it is guessed: the scale of the one live enabled GradScaler that has scaled a loss, if there
    is exactly one (the second step then checks the guess)."""
    if user_unscaled(opt):
        return None, False
    stepping = opt._stepping
    if stepping is UNKNOWN:
        used = [s for s in live_scalers(opt) if getattr(s, "_scale", None) is not None]
        return (used[0]._scale if len(used) == 1 else None), True
    scaler = stepping() if stepping is not None else None
    if scaler is None or not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
        return None, False
    return scaler._scale, False


def stepping_scale(opt: Any, scaled: bool) -> torch.Tensor | None:
    """At the second step: the scale the first pass truly carried (``scaled``: the step runs under
    ``scaler.step(opt)``, whose scaler ``opt._stepping`` names), given whether ``unscale_`` ran before it."""
    if not scaled or opt._first_unscaled:
        return None
    scaler = opt._stepping() if opt._stepping not in (None, UNKNOWN) else None
    return None if scaler is None else scaler._scale


def inverse(scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``1 / scale`` as GradScaler computes it (in fp64, then fp32), on ``device``."""
    return scale.double().reciprocal().float().to(device)


# --- FriendlySAM ----------------------------------------------------------------------------------------------------


class FriendlySAM(ASAM):
    """FriendlySAM: (A)SAM whose ascent follows ``d = g - sigma * m``, ``m`` the exponential moving average of the
    first pass's gradients (see the module docstring). ``sigma=0`` is (A)SAM.

    ``params``, ``base_optimizer``, ``backend`` and the base optimizer's options are as for :class:`fastasam.ASAM`
    (``restore``, ``use_gc``, ``base_optimizer_kwargs`` too; an ``eps`` among the base options is the base
    optimizer's, e.g. Adam's).

    Args:
        rho: the neighbourhood radius (>= 0; pytorch_optimizer's default 0.05).
        sigma: the weight of the moving average subtracted from the gradient (a finite number >= 0; default 1).
        lmbda: the moving average's decay, in [0, 1) (default 0.9).
        adaptive: ASAM's scaling of the ascent with ``eta=0`` (``T = |w|``: ``e = rho * w^2 d / ||w d||``, as
            pytorch_optimizer's ``w^2`` scaling).
        perturb_eps: added to the ascent's norm (fastasam's ``norm_eps``; default 1e-12).

    ``first_step`` mutates ``.grad`` (it holds ``d`` afterwards), ``m`` and the parameters. ``m`` is kept unscaled
    under ``torch.amp.GradScaler`` (the first pass's gradient divided by the scaler's scale; an element whose
    gradient is inf/NaN leaves ``m`` as it was there), so a change of the loss scale does not bias it; the scaler is
    learnt at each ``scaler.step(opt)`` and, before the first, is the one live enabled GradScaler that has scaled a
    loss. ``state_dict()`` adds ``m`` under ``"fastasam"``. Refused with a ``ValueError``: ``sigma`` not a finite
    number >= 0, ``lmbda`` outside [0, 1), ``every`` other than 1, and :class:`fastasam.ASAM`'s refusals.
    """

    _transforms_first_gradient = True
    _stepping: Any = UNKNOWN  # a weak reference to the GradScaler that stepped this optimizer; None: a plain step
    _first_unscaled = False
    _fresh: list | None = None  # tensors whose m was created by this step's first_step (from the raw gradient)
    _first_guess: tuple | None = None  # (scale, guessed) of this step's first_step

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
        perturb_eps: float = 1e-12,
        backend: str = "auto",
        base_optimizer_kwargs: Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.sigma, self.lmbda = sigma, lmbda
        check_finite_nonnegative("FriendlySAM", "perturb_eps", perturb_eps)
        if base_kwargs.pop("every", 1) != 1:
            raise ValueError("fastasam: FriendlySAM perturbs on every step; leave every at 1 (or use fastasam.ASAM "
                             "with every=k for interval SAM).")
        base_kw = dict(base_optimizer_kwargs or {})
        if "eps" in base_kwargs:  # pytorch_optimizer hands eps to the base optimizer; perturb_eps is the norm's
            base_kw.setdefault("eps", base_kwargs.pop("eps"))
        self._m: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> m (unscaled)
        super().__init__(params, base_optimizer, rho=rho, eta=0.0, adaptive=adaptive, norm_eps=perturb_eps,
                         backend=backend, base_optimizer_kwargs=base_kw, **base_kwargs)

    @property
    def sigma(self) -> float:
        """The weight of ``m`` in ``d = g - sigma * m``: a finite number >= 0, checked when set."""
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        self._sigma = check_finite_nonnegative("FriendlySAM", "sigma", value)

    @property
    def lmbda(self) -> float:
        """The decay of ``m``: a number in [0, 1), checked when set."""
        return self._lmbda

    @lmbda.setter
    def lmbda(self, value: float) -> None:
        self._lmbda = check_fraction("FriendlySAM", "lmbda", value)

    def __getstate__(self) -> dict[str, Any]:
        out = super().__getstate__()
        out.pop("_stepping", None)  # a weak reference: learnt again at the copy's first scaler.step
        return out

    # --- first_step: d into .grad, m updated ------------------------------------------------------------------------

    def _transform_first_gradient(self) -> None:
        super()._transform_first_gradient()  # use_gc first: pytorch_optimizer's SAM centralizes the gradient itself
        self._friendly_direction()

    @torch.no_grad()
    def _friendly_direction(self) -> None:
        self._drop_unresolved()
        self._first_unscaled = user_unscaled(self)
        scale, guessed = first_pass_scale(self)
        self._first_guess = (scale, guessed)
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        _Decomposed._writable_grads(params)
        fresh = [p for p in params if p not in self._m]
        old = [p for p in params if p in self._m]
        backend = self.requested_backend
        for p in fresh:  # the tensor's first step: m = g, d = g
            g = _Decomposed._grad(p)
            if scale is None:
                self._m[p] = g.clone(memory_format=torch.preserve_format)
            else:  # unscaled; 0 where the gradient is inf/NaN (a step the scaler skips)
                m = g * inverse(scale, g.device)
                self._m[p] = torch.where(torch.isfinite(m), m, 0.0)
        self._fresh = fresh if guessed else None
        sigma, lmbda = self.sigma, self.lmbda
        c1, c2 = lmbda + (1.0 - lmbda) * sigma, 1.0 - lmbda  # m' = lmbda m + (1 - lmbda) g = c1 m + c2 d
        for idx in by_device(old).values():
            ps = [old[i] for i in idx]
            grads, ms = [_Decomposed._grad(p) for p in ps], [self._m[p] for p in ps]
            ops = torch_ops(backend, grads, ms)
            if scale is None:
                ops.axpby_(grads, ms, 1.0, -sigma)  # d = g - sigma * m
                ops.axpby_(ms, grads, c1, c2)
                continue
            inv = inverse(scale, grads[0].device)
            ops.axpby_(grads, ms, 1.0, -sigma * scale.to(grads[0].device, torch.float32))  # d in the gradient's scale
            for m, d in zip(ms, grads, strict=True):  # m' = c1 m + c2 d / scale, where it is finite
                acc = torch.float64 if m.dtype == torch.float64 else torch.float32
                new = c1 * m.to(acc) + (c2 * inv) * d.to(acc)
                m.copy_(torch.where(torch.isfinite(new), new, m.to(acc)))

    def _drop_unresolved(self) -> None:
        """A step abandoned between the passes left m of its new tensors in the raw gradient's scale: forget them."""
        if self._fresh:
            for p in self._fresh:
                self._m.pop(p, None)
        self._fresh = None

    # --- second_step: the scaler that stepped this optimizer is known -------------------------------------------------

    def second_step(self, zero_grad: bool = False) -> None:
        self._stepping = None
        self._check_guess(scaled=False)
        super().second_step(zero_grad)

    def _know_scaler(self, scaler) -> None:
        super()._know_scaler(scaler)
        self._stepping = weakref.ref(scaler)

    def _scaled_second_step(self) -> None:
        super()._scaled_second_step()
        self._check_guess(scaled=True)

    @torch.no_grad()
    def _check_guess(self, scaled: bool) -> None:
        """The first step guessed the first pass's scale (no scaler had stepped this optimizer yet): now that it is
        known, put the new tensors' m in the right scale; warn where m of older tensors took a wrong one."""
        guess, fresh = self._first_guess, self._fresh
        self._first_guess, self._fresh = None, None
        if guess is None or not guess[1]:
            return
        truth = stepping_scale(self, scaled)
        if (truth is None) == (guess[0] is None) and (truth is None or truth is guess[0]):
            return
        for p in fresh or ():
            m = self._m[p]
            if guess[0] is not None:
                m.mul_(guess[0].to(m.device, torch.float32))
            if truth is not None:
                m.mul_(inverse(truth, m.device))
        if len(fresh or ()) < len(self._m):
            warnings.warn(
                "fastasam: FriendlySAM's first step after its construction or a load_state_dict() could not tell "
                "which torch.amp.GradScaler (if any) scaled the first pass, and guessed wrong, so that step's moving "
                "average took a gradient in the wrong scale. From now on the scaler that calls scaler.step(opt) is "
                "used. Keep a single live GradScaler per training loop to avoid it.", RuntimeWarning, stacklevel=3)

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def _own_state(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        return {**super()._own_state(), "momentum": {index[p]: _saved(p, m) for p, m in self._m.items() if p in index}}

    def _load_own_state(self, own: Mapping[str, Any]) -> None:
        super()._load_own_state(own)
        params = [p for group in self.param_groups for p in group["params"]]
        self._m = {params[int(i)]: _loaded(params[int(i)], v) for i, v in own.get("momentum", {}).items()}
        self._fresh = self._first_guess = None
        self._stepping = UNKNOWN
