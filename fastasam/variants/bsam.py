"""bSAM (Möllenhoff & Khan, ICLR 2023, "SAM as an Optimal Relaxation of Bayes", Algorithm 1): SAM as a
variational method over a Gaussian posterior ``N(w, 1 / (N * s))``, with an Adam-like update of the mean ``w`` and
the precision ``s``. Its own optimizer (no base optimizer); ``N`` is ``num_data``, the training set's size.

A step, per tensor (elementwise; ``delta`` = ``weight_decay``, ``gamma`` = ``damping``, ``alpha`` = ``lr``):

    first pass at w + eps,   eps ~ N(0, 1 / (N * s))          (the noise drawn by the step before)   -> g
    e   = rho * g / s            (adaptive=True: rho * w^2 * g / s)
    second pass at w + e      (w, not w + eps)                                                        -> g_eps
    m   = beta1 * m + (1 - beta1) * (g_eps + delta * w)
    s   = beta2 * s + (1 - beta2) * (sqrt(s) * |g| + delta + gamma)
    w   = w - alpha * m / s
    the weights go to w + eps' for the next step's first pass, eps' ~ N(0, 1 / (N * s))

in that order (``s`` updated before the ``w`` update uses it), with ``m = 0`` and ``s = 1`` to start, as the paper's
algorithm writes it. The authors' JAX code (team-approx-bayes/bayesian-sam) updates ``w`` with the old ``s`` and
``s`` last; pytorch_optimizer's ``BSAM`` differs more (see :class:`BSAM`).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from .. import _amp, backends
from ..optim import ASAM
from .friendly import (
    UNKNOWN,
    by_device,
    check_finite_nonnegative,
    check_fraction,
    first_pass_scale,
    inverse,
    stepping_scale,
    user_unscaled,
)

__all__ = ["BSAM"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class BSAM(torch.optim.Optimizer):
    """bSAM: Bayesian sharpness-aware minimisation (see the module docstring for the algorithm).

    Args:
        params: parameters or param groups; groups may set ``lr``, ``betas``, ``weight_decay``, ``rho``,
            ``adaptive`` and ``damping``.
        num_data: the number of training examples ``N`` (an int >= 1): the noise's variance is ``1 / (N * s)``.
        lr: the step size ``alpha`` (a finite number >= 0; pytorch_optimizer's default 0.5, the paper's CIFAR runs').
        betas: ``(beta1, beta2)``, the decays of ``m`` and ``s``, each in [0, 1) (default (0.9, 0.999)).
        weight_decay: ``delta``, the prior's precision, in ``m``'s and in ``s``'s update (>= 0; default 1e-4).
        rho: the perturbation's size (>= 0; default 0.05).
        adaptive: scale the perturbation by ``w^2`` (``e = rho * w^2 * g / s``).
        damping: ``gamma``, added to ``s``'s update (>= 0; default 0.1).
        backend: ``"auto"`` or a name of ``fastasam.available_backends()``. bSAM has no kernels of its own: every
            backend but ``reference`` runs it as ``torch._foreach_*`` ops over each fp32/fp64 (param group, device)
            bucket, the other dtypes tensor by tensor in fp32 (the ``reference`` backend's way, the oracle).
        seed: the noise's seed (default ``torch.initial_seed()``: ``torch.manual_seed`` makes runs repeatable, and
            every rank of a data-parallel run draws the same noise when all are seeded alike, as they must be).

    The loop is fastasam's: ``backward(); opt.first_step(zero_grad=True); backward(); opt.second_step(zero_grad=True)``
    (or ``opt.step(closure)``, which runs the closure for both passes). The noise of a step is drawn at the end of
    the step before, so between steps the parameters hold ``w + eps``: evaluate and save the weights themselves
    inside ``with opt.unperturbed():``. The optimizer does not move the weights at construction (loading a checkpoint
    into the model after building the optimizer stays safe): the first step's first pass is at ``w`` itself. The
    mean ``w`` lives in the optimizer's state (``state[p]["mean"]``) from the first step on, so weights written into
    the parameters between steps (outside ``unperturbed()``) are overwritten by the next step; load them with
    ``load_state_dict``. A tensor steps when it has a gradient in both passes; one with a gradient in the first pass
    only goes back to its mean (and gets new noise).

    The noise: per device, in parameter order, one ``torch.randn`` (fp32) the size of the tensors with state, from a
    ``torch.Generator`` seeded with ``seed`` whose state ``state_dict()`` saves: a resume continues bit for bit.

    Under ``torch.amp.GradScaler`` (``scaler.step(opt)``) both passes' gradients are unscaled before use (the
    scaler is learnt at each ``scaler.step``; before the first, it is the one live enabled GradScaler that has scaled
    a loss); a step whose passes hold an inf/NaN is skipped: ``w``, ``m`` and ``s`` stay, the weights get new noise
    (one host read of the flag, as GradScaler's own for an optimizer without fused scaling).

    Differences from pytorch_optimizer's ``BSAM`` (its ``first_step`` draws the noise, ``second_step`` perturbs and
    ``third_step`` updates, with a backward before each of the last two), where this class follows the paper: it
    never takes the noise or ``e`` back out of the weights (its ascent starts from ``w + eps``, its update from
    ``w + eps + e``); it draws the noise with standard deviation ``1 / (N * s)``, the paper's variance; its ``m``
    takes ``weight_decay * g_eps`` instead of ``g_eps + weight_decay * w``; its ``s`` takes
    ``(sqrt(s) * |g_eps| + delta + gamma)^2`` (the second pass's gradient, squared) instead of
    ``sqrt(s) * |g| + delta + gamma`` (the noisy first pass's); it accepts ``num_data=0``.

    Refused with a ``ValueError``: ``num_data`` not an int >= 1, ``lr``, ``weight_decay``, ``rho`` or ``damping`` not
    a finite number >= 0, a beta outside [0, 1). ``first_step`` and ``second_step`` mutate the parameters and the
    state; ``first_step`` also unscales ``.grad`` under a GradScaler.
    """

    _step_supports_amp_scaling = True  # GradScaler hands grad_scale / found_inf to step()
    _stepping: Any = UNKNOWN
    _first_unscaled = False
    _scalers: Any = ASAM._scalers

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        num_data: int,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        rho: float = 0.05,
        adaptive: bool = False,
        damping: float = 0.1,
        backend: str = "auto",
        *,
        seed: int | None = None,
    ) -> None:
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"fastasam: BSAM's num_data must be an int >= 1 (the number of training examples), got "
                             f"{num_data!r}.")
        backends.check_name(backend)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, rho=rho, adaptive=bool(adaptive),
                        damping=damping)
        _check_options(defaults, "")
        self.num_data, self._backend = num_data, backend
        self._seed = int(torch.initial_seed() if seed is None else seed)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._g: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> the first pass's gradient (unscaled)
        self._perturbed: list[torch.Tensor] | None = None  # the tensors with state, between the two steps
        self._first_skip: torch.Tensor | None = None
        self._first_guess: tuple | None = None
        self._inside = False
        super().__init__(params, defaults)
        if backend != "auto":
            for device in dict.fromkeys(p.device for g in self.param_groups for p in g["params"]):
                if device.type != "meta":
                    backends.resolve(backend, device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_options(group, f" in param_groups[{len(self.param_groups) - 1}]")

    @property
    def requested_backend(self) -> str:
        return self._backend

    @property
    def backend(self) -> str:
        """``"reference"`` (tensor by tensor) or ``"foreach"`` (torch._foreach ops): what a step runs as."""
        return "reference" if self._backend == "reference" else "foreach"

    @property
    def second_pass_needed(self) -> bool:
        """Always True: every step takes both passes (the loop of :attr:`fastasam.ASAM.second_pass_needed`)."""
        return True

    @property
    def perturbed(self) -> bool:
        """True between ``first_step`` and ``second_step``: the weights hold ``w + e``."""
        return self._perturbed is not None

    def __getstate__(self) -> dict[str, Any]:
        self._check_between("copy.deepcopy() or pickle")
        out = dict(self.__dict__)
        for key in ("_stepping", "_scalers"):
            out.pop(key, None)
        return out

    # --- the two steps --------------------------------------------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _check_between(self, what: str) -> None:
        if self._perturbed is not None:
            raise RuntimeError(f"fastasam: {what} called between BSAM's first_step() and second_step(); the weights "
                               "hold w + e. Call second_step() first.")
        if self._inside:
            raise RuntimeError(f"fastasam: {what} called inside BSAM.unperturbed(), where the parameters hold the "
                               "mean w. Leave the with block first.")

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """The ascent: from the gradient at ``w + eps`` (the first backward), ``e = rho * g / s``; the weights go to
        ``w + e``. Keeps ``g`` for ``second_step``. Mutates the parameters, the state and (under a GradScaler)
        ``.grad``."""
        self._check_between("first_step()")
        with_grad = [p for p in self._params() if p.grad is not None]
        if not with_grad:
            raise RuntimeError(
                "fastasam: BSAM.first_step() found no gradient. fastasam's loop is: loss.backward(); "
                "opt.first_step(zero_grad=True); loss.backward(); opt.second_step(zero_grad=True) (the noise is "
                "already in the weights for the first backward). pytorch_optimizer's BSAM.first_step(), which draws "
                "the noise before any backward, has no counterpart here."
            )
        for p in with_grad:
            if p.grad.is_sparse:
                raise RuntimeError("fastasam: BSAM does not support sparse gradients.")
            state = self.state[p]
            if "mean" not in state:  # the first step of this tensor: the weights hold w (no noise yet)
                state["mean"] = p.detach().clone(memory_format=torch.preserve_format)
                state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["s"] = torch.ones_like(p, memory_format=torch.preserve_format)
        self._first_unscaled = user_unscaled(self)
        scale, guessed = (None, False) if self._first_unscaled else first_pass_scale(self)
        if self._first_unscaled:  # as ASAM's first step: scaler.step then unscales the second pass itself
            _amp.before_first_step(self._scalers, self)
        self._first_guess = (scale, guessed)
        self._first_skip = None
        grads = [p.grad for p in with_grad]
        if scale is not None:  # unscale in place and look for inf/NaN, as GradScaler.unscale_ does
            flags = []
            for idx in by_device(grads, dtype=True).values():
                ts = [grads[i] for i in idx]
                found = torch.zeros(1, dtype=torch.float32, device=ts[0].device)
                torch._amp_foreach_non_finite_check_and_unscale_(ts, found, inverse(scale, ts[0].device).reshape(1))
                flags.append(found)
            self._first_skip = sum(f.to(flags[0].device) for f in flags)
        for p, g in zip(with_grad, grads, strict=True):
            buf = self._g.get(p)
            if buf is None or buf.shape != g.shape or buf.dtype != g.dtype or buf.device != g.device:
                buf = self._g[p] = torch.empty_like(g, memory_format=torch.preserve_format)
            buf.copy_(g)
        for p in [p for p in self._g if p.grad is None]:  # a gradient only now and then: 0 where none this step
            self._g.pop(p)
        perturbed = [p for p in self._params() if "mean" in self.state[p]]
        for group, ps in self._by_group(perturbed):
            for idx in by_device(ps).values():
                sub = [ps[i] for i in idx]
                self._ascent(group, sub)
        self._perturbed = perturbed
        if zero_grad:
            self.zero_grad()

    def _ascent(self, group: Mapping[str, Any], ps: list[torch.Tensor]) -> None:
        """``p <- w + e`` (``e = 0`` for a tensor without a gradient this step)."""
        rho, adaptive = float(group["rho"]), bool(group["adaptive"])
        means = [self.state[p]["mean"] for p in ps]
        with_g = [i for i, p in enumerate(ps) if p in self._g]
        if self._foreach(ps):
            torch._foreach_copy_(ps, means)
            if with_g:
                g, s, w = ([lst[i] for i in with_g] for lst in ([self._g[p] for p in ps],
                                                                [self.state[p]["s"] for p in ps], means))
                e = torch._foreach_div(g, s)
                torch._foreach_mul_(e, rho)
                if adaptive:
                    torch._foreach_mul_(e, w)
                    torch._foreach_mul_(e, w)
                torch._foreach_add_([ps[i] for i in with_g], e)
            return
        for p, w in zip(ps, means, strict=True):
            g = self._g.get(p)
            if g is None:
                p.copy_(w)
                continue
            acc = _acc(p.dtype)
            w32 = w.to(acc)
            e = rho * g.to(acc) / self.state[p]["s"].to(acc)
            if adaptive:
                e = e * w32 * w32
            p.copy_(w32 + e)

    def second_step(self, zero_grad: bool = False) -> None:
        """The update from the second pass's gradient (at ``w + e``), then the next step's noise: the weights go to
        ``w + eps'``. Mutates the parameters and the state."""
        self._stepping = None
        self._finish(skip=self._guess_was_wrong(scaled=False))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def _finish(self, skip: bool) -> None:
        if self._inside:
            raise RuntimeError("fastasam: BSAM.second_step() inside unperturbed(); leave the with block first.")
        perturbed = self._perturbed
        if perturbed is None:
            raise RuntimeError("fastasam: BSAM.second_step() called without a first_step() before it. Call "
                               "first_step() after the first backward pass.")
        self._perturbed = None
        stepping = [] if skip else [p for p in perturbed if p.grad is not None and p in self._g]
        for group, ps in self._by_group(stepping):
            for idx in by_device(ps).values():
                self._update(group, [ps[i] for i in idx])
        self._draw_noise(perturbed)
        self._opt_called = True  # what LR schedulers check to confirm the optimizer stepped before them

    def _update(self, group: Mapping[str, Any], ps: list[torch.Tensor]) -> None:
        """m, s and w as the module docstring writes them (w stays in ``state["mean"]``)."""
        lr, (beta1, beta2) = group["lr"], group["betas"]
        delta, gamma = float(group["weight_decay"]), float(group["damping"])
        st = [self.state[p] for p in ps]
        if self._foreach(ps):
            w, m, s = [x["mean"] for x in st], [x["momentum"] for x in st], [x["s"] for x in st]
            g_eps, g = [p.grad for p in ps], [self._g[p] for p in ps]
            t = torch._foreach_add(g_eps, w, alpha=delta)
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, t, alpha=1.0 - beta1)
            h = torch._foreach_sqrt(s)
            torch._foreach_mul_(h, torch._foreach_abs(g))
            torch._foreach_add_(h, delta + gamma)
            torch._foreach_mul_(s, beta2)
            torch._foreach_add_(s, h, alpha=1.0 - beta2)
            step = torch._foreach_div(m, s)
            if isinstance(lr, torch.Tensor):
                torch._foreach_mul_(step, lr.to(w[0].device))
                torch._foreach_sub_(w, step)
            else:
                torch._foreach_add_(w, step, alpha=-lr)
            return
        for p, x in zip(ps, st, strict=True):
            acc = _acc(p.dtype)
            w, m, s = x["mean"].to(acc), x["momentum"].to(acc), x["s"].to(acc)
            g_eps, g = p.grad.to(acc), self._g[p].to(acc)
            m = beta1 * m + (1.0 - beta1) * (g_eps + delta * w)
            s = beta2 * s + (1.0 - beta2) * (s.sqrt() * g.abs() + (delta + gamma))
            x["momentum"].copy_(m)
            x["s"].copy_(s)
            x["mean"].copy_(w - lr * (m / s))

    def _draw_noise(self, ps: list[torch.Tensor]) -> None:
        """``p <- w + z / sqrt(N * s)``, ``z ~ N(0, 1)``: per device, one draw in parameter order."""
        for idx in by_device(ps).values():
            sub = [ps[i] for i in idx]
            device = sub[0].device
            gen = self._generator(device)
            sizes = [p.numel() for p in sub]
            z = torch.randn(sum(sizes), generator=gen, device=device, dtype=torch.float32)
            views = [v.view(p.shape) for v, p in zip(z.split(sizes), sub, strict=True)]
            where = {id(p): i for i, p in enumerate(sub)}
            for _, gs in self._by_group(sub):
                self._noise(gs, [views[where[id(p)]] for p in gs])

    def _noise(self, ps: list[torch.Tensor], z: list[torch.Tensor]) -> None:
        n = float(self.num_data)
        w, s = [self.state[p]["mean"] for p in ps], [self.state[p]["s"] for p in ps]
        if self._foreach(ps):
            r = torch._foreach_mul(s, n)
            torch._foreach_rsqrt_(r)
            if ps[0].dtype == torch.float64:
                z = [t.double() for t in z]
            torch._foreach_mul_(r, z)
            torch._foreach_add_(r, w)
            torch._foreach_copy_(ps, r)
            return
        for p, wi, si, zi in zip(ps, w, s, z, strict=True):
            acc = _acc(p.dtype)
            p.copy_(wi.to(acc) + zi.to(acc) * (si.to(acc) * n).rsqrt())

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(self._seed)
        return gen

    def _foreach(self, ps: list[torch.Tensor]) -> bool:
        """The foreach path serves these tensors (one device; one fp32/fp64 dtype; not the reference backend)."""
        return self._backend != "reference" and bool(ps) and ps[0].dtype in (torch.float32, torch.float64) and all(
            p.dtype == ps[0].dtype for p in ps)

    def _by_group(self, ps: list[torch.Tensor]) -> list[tuple[Mapping[str, Any], list[torch.Tensor]]]:
        """``ps`` split by param group (in the groups' order) and, within one, by dtype."""
        wanted = {id(p) for p in ps}
        out = []
        for group in self.param_groups:
            mine = [p for p in group["params"] if id(p) in wanted]
            for dtype in dict.fromkeys(p.dtype for p in mine):
                out.append((group, [p for p in mine if p.dtype == dtype]))
        return out

    # --- GradScaler -----------------------------------------------------------------------------------------------

    def _know_scaler(self, scaler) -> None:
        known = [] if self._scalers is ASAM._scalers else list(self._scalers)
        if not any(ref() is scaler for ref in known):
            self._scalers = [*known, weakref.ref(scaler)]
        self._stepping = weakref.ref(scaler)

    def _guess_was_wrong(self, scaled: bool) -> bool:
        """The first step guessed the first pass's loss scale (no GradScaler had stepped this optimizer): True when
        the guess was wrong, so the ascent used a gradient in the wrong scale: the step is skipped (with a
        warning)."""
        guess, self._first_guess = self._first_guess, None
        if guess is None or not guess[1]:
            return False
        truth = stepping_scale(self, scaled)
        if (truth is None) == (guess[0] is None) and (truth is None or truth is guess[0]):
            return False
        warnings.warn(
            "fastasam: BSAM's first step after its construction or a load_state_dict() could not tell which "
            "torch.amp.GradScaler (if any) scaled the first pass, and guessed wrong; that step is skipped (the "
            "weights get new noise). From now on the scaler that calls scaler.step(opt) is used. Keep a single live "
            "GradScaler per training loop to avoid it.", RuntimeWarning, stacklevel=4)
        return True

    @torch.no_grad()
    def _scaled_second_step(self) -> None:
        """``second_step`` under ``scaler.step(opt)``: the second pass's gradients unscaled (unless ``unscale_`` did);
        the update skipped when either pass held an inf/NaN."""
        grad_scale: torch.Tensor | None = self.__dict__["grad_scale"]
        found_inf: torch.Tensor = self.__dict__["found_inf"]
        scaler = _amp.calling_scaler()
        if scaler is not None:
            self._know_scaler(scaler)
            if grad_scale is None and _amp.unscaled_nothing(scaler, self):  # unscale_ ran between the passes
                found_inf = _amp.unscale_now(scaler, self)
        if grad_scale is not None:
            _amp.unscale_gradients(self.param_groups, grad_scale)
        skip = found_inf.float().clamp(max=1.0).bool()
        if self._first_skip is not None:
            skip = skip | self._first_skip.to(skip.device).bool().reshape(skip.shape)
        wrong = self._guess_was_wrong(scaled=True)
        self._finish(skip=wrong or bool(skip.item()))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Both passes with ``closure`` (forward and backward, returning the loss), which runs twice: at ``w + eps``,
        then at ``w + e``; returns the first pass's loss. Gradients present before are set to ``None`` first. Without
        a closure after ``first_step()``, ``step()`` is ``second_step()``; under ``scaler.step(opt)`` it is the
        scaled second step. If the closure raises in the second pass, the weights go back to ``w`` (with new noise)
        and the exception is re-raised, the state untouched."""
        if closure is None and "found_inf" in self.__dict__:
            self._scaled_second_step()
            return None
        if closure is None and self._perturbed is not None:
            self.second_step()
            return None
        if closure is None:
            raise RuntimeError(
                "fastasam: BSAM.step() needs a closure that runs forward and backward and returns the loss; or call "
                "first_step() and second_step() around the second backward."
            )
        for p in self._params():
            p.grad = None
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                closure()
        except BaseException:
            self._first_guess = None
            self._finish(skip=True)
            raise
        self.second_step()
        return loss

    # --- evaluation and checkpoints -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Inside, the parameters hold the mean ``w`` (the posterior's mean, the trained weights): evaluate or save
        them there. On exit they hold ``w + eps`` again, bit for bit (anything written into them inside is
        discarded). A step or ``state_dict()`` inside is refused."""
        self._check_between("unperturbed()")
        ps = [p for p in self._params() if "mean" in self.state[p]]
        saved = [p.detach().clone(memory_format=torch.preserve_format) for p in ps]
        self._inside = True
        try:
            with torch.no_grad():
                for p in ps:
                    p.copy_(self.state[p]["mean"])
            yield
        finally:
            with torch.no_grad():
                for p, x in zip(ps, saved, strict=True):
                    p.copy_(x)
            self._inside = False

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict()`` (per tensor ``mean``, ``momentum``, ``s``; the param groups) plus ``"fastasam"``:
        the seed and the noise generators' states, per device. Save the model's weights as they are between steps
        (``w + eps``) beside it: then a resume continues bit for bit."""
        self._check_between("state_dict()")
        state = super().state_dict()
        state["fastasam"] = {"seed": self._seed,
                             "generators": {str(d): g.get_state() for d, g in self._generators.items()}}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_between("load_state_dict()")
        state_dict = dict(state_dict)
        own = state_dict.pop("fastasam", None) or {}
        super().load_state_dict(state_dict)
        self._seed = int(own.get("seed", self._seed))
        self._generators = {}
        for name, gen_state in own.get("generators", {}).items():
            self._generator(torch.device(name)).set_state(gen_state)
        self._g, self._first_skip, self._first_guess = {}, None, None
        self._stepping = UNKNOWN


def _check_options(group: Mapping[str, Any], where: str) -> None:
    for key in ("lr", "weight_decay", "rho", "damping"):
        value = group[key]
        if key == "lr" and isinstance(value, torch.Tensor):
            value = float(value)
        check_finite_nonnegative("BSAM", key, value, where)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"fastasam: BSAM's betas must be a pair (beta1, beta2), each in [0, 1){where}, got {betas!r}.")
    for name, beta in zip(("betas[0]", "betas[1]"), betas):
        check_fraction("BSAM", name, beta, where)
    if float(betas[1]) == 0.0 and float(group["weight_decay"]) + float(group["damping"]) == 0.0:
        raise ValueError(f"fastasam: BSAM with betas[1]=0 and weight_decay + damping = 0 can make s 0 (a division by "
                         f"zero){where}; give damping > 0 (e.g. damping=0.1).")

