"""``fastasam.ASAM`` and ``fastasam.SAM``: sharpness-aware minimisation around any ``torch.optim`` optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._engine import SharpnessEngine, check_nonnegative
from .report import StepReport

_OWN_GROUP_KEYS = ("rho", "eta", "adaptive")


def _check_base_optimizer(base_optimizer: Any) -> None:
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
        return
    if isinstance(base_optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"fastasam: base_optimizer must be a torch.optim.Optimizer class, got an instance of "
            f"{type(base_optimizer).__name__}. Pass the class and its options, e.g. "
            "ASAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9); to wrap an existing optimizer "
            "use fastasam.compat.ASAM(optimizer, model)."
        )
    raise TypeError(
        f"fastasam: base_optimizer must be a torch.optim.Optimizer class such as torch.optim.SGD, "
        f"got {base_optimizer!r}."
    )


class ASAM(torch.optim.Optimizer):
    """Adaptive Sharpness-Aware Minimization around a base optimizer.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer. Groups may set ``rho``, ``eta``
            and ``adaptive`` as well as the base optimizer's options.
        base_optimizer: a ``torch.optim.Optimizer`` class (``torch.optim.SGD``, ``torch.optim.AdamW``, ...).
        rho: neighbourhood radius (>= 0). ``rho=0`` reproduces the base optimizer exactly.
        eta: added to ``|w|`` in adaptive tensors (>= 0).
        adaptive: scale the perturbation by ``(|w| + eta)^2`` (ASAM); ``False`` gives SAM.
        eps: added to the global norm (>= 0).
        restore: ``"copy"`` saves ``w`` and copies it back (bit-exact, like the community sam.py) or
            ``"subtract"`` saves ``e`` and subtracts it (like the official asam.py). Either keeps one buffer
            per parameter.
        backend: ``"auto"`` or a name from ``fastasam.available_backends()``.
        every: perturb on every ``every``-th step only (Composer's interval SAM); the other steps are plain base
            optimizer steps on the one pass's gradient. ``opt.second_pass_needed`` says which (default 1: always).
        base_optimizer_kwargs: options for the base optimizer whose names clash with this class's (``eps`` of Adam).
        **base_kwargs: the base optimizer's options (``lr``, ``momentum``, ``weight_decay``, ...).

    ``param_groups`` and ``state`` are the base optimizer's own, so LR schedulers, ``state_dict`` and per-group
    options work as with the base optimizer alone. After ``first_step``, ``grad_norm`` holds the global norm and
    ``perturbation_skipped`` whether it was inf/NaN (then nothing was perturbed); both are device tensors.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float = 0.5,
        eta: float = 0.01,
        adaptive: bool = True,
        eps: float = 1e-12,
        restore: str = "copy",
        backend: str = "auto",
        every: int = 1,
        base_optimizer_kwargs: Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        _check_base_optimizer(base_optimizer)
        check_nonnegative("rho", rho)
        check_nonnegative("eta", eta)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"fastasam: every must be an int >= 1 (perturb on every k-th step), got {every!r}.")
        self.every = every
        self._steps_done = 0  # completed steps (second_step calls): which step perturbs; in state_dict when every > 1
        self._engine = SharpnessEngine(backend=backend, eps=eps, restore=restore)
        super().__init__(params, dict(rho=rho, eta=eta, adaptive=bool(adaptive)))
        base = base_optimizer(self.param_groups, **{**base_kwargs, **(base_optimizer_kwargs or {})})
        clash = set(_OWN_GROUP_KEYS) & set(base.defaults)
        if clash:
            raise ValueError(
                f"fastasam: {base_optimizer.__name__} has its own option(s) {sorted(clash)}, which would share a "
                "param-group key with ASAM's; this base optimizer is not supported."
            )
        self.base_optimizer = base
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults.update(base.defaults)

    # --- the API of SPEC §2 -------------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._engine.backend

    @property
    def grad_norm(self) -> torch.Tensor | None:
        return self._engine.grad_norm

    @property
    def perturbation_skipped(self) -> torch.Tensor | None:
        return self._engine.perturbation_skipped

    @property
    def perturbed(self) -> bool:
        """True between ``first_step`` and ``second_step``: the weights hold ``w + e``."""
        return self._engine.perturbed

    @property
    def second_pass_needed(self) -> bool:
        """Whether the coming step perturbs (a host bool, no device sync): then the loop runs ``first_step``, the
        second forward/backward and ``second_step``; else ``second_step`` right after the one backward pass."""
        return self._steps_done % self.every == 0

    def report(self) -> StepReport:
        """What served the last step: per (device, dtype) bucket, the backend, how many tensors ran in its
        multi-tensor kernels or fell back to foreach, how many the fused restore + update took and why the others
        were left to the base optimizer. ``print(opt.report())`` for a table."""
        return self._engine.report()

    def first_step(self, zero_grad: bool = False) -> None:
        """Ascent: ``w <- w + e`` from the current gradients (first backward pass). Mutates the parameters."""
        if self._steps_done % self.every and not self._engine.perturbed:  # second_pass_needed, inline: hot path
            raise RuntimeError(
                f"fastasam: first_step() on a step that does not perturb (every={self.every}, step "
                f"{self._steps_done}): opt.second_pass_needed is False. Call second_step() alone after the one "
                "backward pass (loop: if opt.second_pass_needed: first_step, second backward; then second_step)."
            )
        self._keep_first_gradient()
        self._engine.first_step(self.param_groups)
        if zero_grad:
            self.zero_grad()

    def second_step(self, zero_grad: bool = False) -> None:
        """Descent: restore ``w``, then the base optimizer steps with the current gradients (second pass). On a step
        that does not perturb (``second_pass_needed`` False): the base optimizer's step on the one pass's gradient."""
        if self._descent_direction():
            deferred, self._deferred = self._deferred, None  # a direction left to the fused update (GSAM)
            self._engine.restore_and_step(self.base_optimizer, deferred)  # no first_step when one was needed: raises
        else:
            self.base_optimizer.step()
        self._steps_done += 1
        self._opt_called = True  # what LR schedulers check to confirm optimizer.step() came first
        if zero_grad:
            self.zero_grad()

    # GradScaler (fp16): scaler.step(opt) sets ``grad_scale`` and ``found_inf`` on an optimizer that declares this
    # and calls opt.step() whatever it found, so the restore can never be skipped.
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def _scaled_second_step(self) -> None:
        """``second_step`` under ``scaler.step(opt)``: restore always; the base step sees unscaled gradients and is
        skipped when either pass overflowed (weights and base state untouched)."""
        grad_scale: torch.Tensor | None = self.__dict__["grad_scale"]  # None: the user already called unscale_
        found_inf: torch.Tensor = self.__dict__["found_inf"]
        first = None
        if self._descent_direction():
            deferred, self._deferred = self._deferred, None
            if deferred is not None:  # the base optimizer steps on the gradients: the direction goes into them
                deferred.apply()
            self._engine.restore("restore, then the base optimizer's step: GradScaler (scaler.step)")
            first = self._engine.perturbation_skipped
        skip = found_inf.float().clamp(max=1.0)  # fused kernels test found_inf == 1
        if first is not None:
            skip = torch.maximum(skip, first.to(skip.device, torch.float32))
        base = self.base_optimizer
        if getattr(base, "_step_supports_amp_scaling", False):  # fused=True SGD/Adam/AdamW: no host sync
            base.grad_scale, base.found_inf = grad_scale, skip  # type: ignore[attr-defined]
            try:
                base.step()
            finally:
                del base.grad_scale, base.found_inf  # type: ignore[attr-defined]
        else:  # what GradScaler itself does for such optimizers: unscale, then one host read of the flag
            if grad_scale is not None:
                inv = grad_scale.double().reciprocal().float()
                by_device: dict[torch.device, list[torch.Tensor]] = {}
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            by_device.setdefault(p.grad.device, []).append(p.grad)
                for device, grads in by_device.items():
                    torch._foreach_mul_(grads, inv.to(device))
            if not skip.item():
                base.step()
        self._steps_done += 1
        self._opt_called = True

    ascent_step = first_step
    descent_step = second_step

    _deferred = None  # the variants' direction when the fused update may apply it (fastasam._decompose.Deferred)

    def _descent_direction(self) -> bool:
        """Turn ``.grad`` into the descent direction before the base step; True when the step restores first (it
        perturbed, or should have: the restore then raises for the missing first_step), False for a one-pass step."""
        if self._engine.perturbed:
            self._two_pass_direction()
            return True
        if self._steps_done % self.every == 0:  # second_pass_needed
            return True
        self._one_pass_direction()
        return False

    # --- what the variants (fastasam.variants: LookSAM, GSAM) change: the gradient the base optimizer steps with ---

    def _keep_first_gradient(self) -> None:
        """Before the ascent: keep what the descent will need of the first pass's gradient (nothing for (A)SAM)."""

    def _two_pass_direction(self) -> None:
        """After the second backward, before the restore: turn ``.grad`` (the gradient at w + e) into the descent
        direction (itself for (A)SAM)."""

    def _one_pass_direction(self) -> None:
        """On a step without a second pass, before the base step: the descent direction from the one gradient."""

    def _own_state(self) -> dict[str, Any]:
        """What this optimizer adds to ``state_dict()["fastasam"]``: the step counter where it matters."""
        return {"steps_done": self._steps_done} if self.every > 1 else {}

    def _load_own_state(self, own: Mapping[str, Any]) -> None:
        self._steps_done = int(own.get("steps_done", 0))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Both passes: ``closure`` runs forward and backward and returns the loss; returns the first pass's loss.
        Without a closure after ``first_step()``, ``step()`` is ``second_step()`` (for training loops that call
        ``optimizer.step()`` once, such as Hugging Face's Trainer; see ``fastasam.hf``).

        Unlike the community sam.py, ``step`` runs the first backward pass itself, so do not call ``backward``
        before it.
        """
        if closure is None and "found_inf" in self.__dict__:  # called by torch.amp.GradScaler.step(opt)
            self._scaled_second_step()
            return None
        if closure is None and self._engine.perturbed:  # after first_step(): a loop that steps once (HF Trainer)
            self.second_step()
            return None
        if closure is None:
            raise RuntimeError(
                "fastasam: step() needs a closure that runs forward and backward and returns the loss, e.g. "
                "opt.step(lambda: loss_fn(model(x), y).backward() or ...); or call first_step() and second_step() "
                "(step() after first_step() is second_step()), or scaler.step(opt) after the second backward under a "
                "torch.amp.GradScaler."
            )
        with torch.enable_grad():
            loss = closure()
        if not self.second_pass_needed:  # every > 1: a plain base step on this step
            self.second_step()
            return loss
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("rho", "eta"):
            if key in param_group:
                check_nonnegative(key, param_group[key], f" in param_groups[{len(self.param_groups)}]")
        base = self.__dict__.get("base_optimizer")
        if base is None:  # during __init__
            super().add_param_group(param_group)
            return
        for key in _OWN_GROUP_KEYS:
            param_group.setdefault(key, self.defaults[key])
        base.add_param_group(param_group)

    def _check_not_perturbed(self, what: str) -> None:
        if self._engine.perturbed:
            raise RuntimeError(
                f"fastasam: {what} called between first_step() and second_step(); the weights hold w + e and the "
                "saved state would not match them. Call second_step() first, or save before first_step()."
            )

    def state_dict(self) -> dict[str, Any]:
        self._check_not_perturbed("state_dict()")
        state = self.base_optimizer.state_dict()
        own = self._own_state()
        if own:  # which step perturbs next (every > 1), LookSAM's g_v; the base optimizer's load_state_dict ignores it
            state["fastasam"] = own
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_not_perturbed("load_state_dict()")
        state_dict = dict(state_dict)
        self._load_own_state(state_dict.pop("fastasam", None) or {})
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:  # a checkpoint of the plain base optimizer has no ASAM options
            for key in _OWN_GROUP_KEYS:
                group.setdefault(key, self.defaults[key])


class SAM(ASAM):
    """Sharpness-Aware Minimization (Foret et al.): :class:`ASAM` with nothing adaptive."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float = 0.05,
        eps: float = 1e-12,
        restore: str = "copy",
        backend: str = "auto",
        every: int = 1,
        base_optimizer_kwargs: Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params, base_optimizer, rho=rho, eta=0.0, adaptive=False, eps=eps, restore=restore, backend=backend,
            every=every, base_optimizer_kwargs=base_optimizer_kwargs, **base_kwargs,
        )


def adaptive_param_groups(model: nn.Module, **group_kwargs: Any) -> list[dict[str, Any]]:
    """The official ASAM code's split: parameters whose name contains ``weight`` are adaptive (BatchNorm weights
    included), the others (biases) are not. ``group_kwargs`` (``lr``, ``rho``, ...) go into both groups; empty groups
    are left out."""
    adaptive, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (adaptive if "weight" in name else plain).append(p)
    groups = [{"params": adaptive, "adaptive": True}, {"params": plain, "adaptive": False}]
    return [{**g, **group_kwargs} for g in groups if g["params"]]
