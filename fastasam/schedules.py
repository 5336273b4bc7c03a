"""Schedules of rho: ``RhoFollowsLR``, rho proportional to the learning rate (GSAM's schedule)."""

from __future__ import annotations

import math
from typing import Any

from .utils import unwrap_optimizer


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"fastasam.RhoFollowsLR: {name} must be a finite number, got {value!r}.")
    return float(value)


class RhoFollowsLR:
    """rho proportional to the learning rate, as GSAM schedules it (Zhuang et al., ICLR 2022):
    ``rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)`` for each param group, from the
    group's ``lr`` as the LR scheduler left it, kept within ``[rho_min, rho_max]``. For any fastasam optimizer
    (ASAM, SAM, LookSAM, GSAM): the step reads the group's ``rho`` each step, so the new value takes effect on the
    next ``first_step()``.

        opt = fastasam.GSAM(model.parameters(), torch.optim.SGD, rho=0.04, alpha=0.1, lr=0.1, momentum=0.9)
        lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
        rho_sched = fastasam.RhoFollowsLR(opt, rho_max=0.04, rho_min=0.02)
        for x, y in loader:
            ...                         # both passes, opt.second_step()
            lr_sched.step()
            rho_sched.step()

    ``lr_max`` defaults to each group's ``lr`` when the schedule is made (the peak of a decaying schedule); pass it
    when a warmup starts below the peak. ``state_dict()`` / ``load_state_dict()`` save and restore the schedule.
    """

    def __init__(self, optimizer: Any, *, rho_max: float, rho_min: float = 0.0, lr_max: float | None = None,
                 lr_min: float = 0.0) -> None:
        opt = unwrap_optimizer(optimizer)
        groups = getattr(opt, "param_groups", None)
        if not groups or any("rho" not in g or "lr" not in g for g in groups):
            raise TypeError(f"fastasam.RhoFollowsLR needs a fastasam optimizer (ASAM, SAM, LookSAM, GSAM) whose param "
                            f"groups have 'rho' and 'lr', got {type(optimizer).__name__}.")
        self.optimizer = opt
        self.rho_max, self.rho_min = _number("rho_max", rho_max), _number("rho_min", rho_min)
        if not 0 <= self.rho_min <= self.rho_max:
            raise ValueError(f"fastasam.RhoFollowsLR: need 0 <= rho_min <= rho_max, got rho_min={rho_min!r}, "
                             f"rho_max={rho_max!r}.")
        self.lr_min = _number("lr_min", lr_min)
        self.lr_max: list[float] = []
        self._fixed_lr_max = None if lr_max is None else _number("lr_max", lr_max)
        self._extend()
        self.step()

    def _extend(self) -> None:
        """lr_max for groups not seen yet (``add_param_group``): the fixed one, else the group's lr now."""
        for g in self.optimizer.param_groups[len(self.lr_max):]:
            top = self._fixed_lr_max if self._fixed_lr_max is not None else float(g["lr"])
            if not top > self.lr_min:
                raise ValueError(f"fastasam.RhoFollowsLR: lr_max ({top!r}) must be greater than lr_min "
                                 f"({self.lr_min!r}); pass lr_max= when the schedule starts at its lowest lr.")
            self.lr_max.append(top)

    def rho_at(self, lr: float, lr_max: float) -> float:
        frac = (float(lr) - self.lr_min) / (lr_max - self.lr_min)
        return min(self.rho_max, max(self.rho_min, self.rho_min + (self.rho_max - self.rho_min) * frac))

    def step(self) -> None:
        """Set each group's rho from its lr (call after the LR scheduler's ``step()``)."""
        self._extend()
        for g, top in zip(self.optimizer.param_groups, self.lr_max, strict=True):
            g["rho"] = self.rho_at(g["lr"], top)

    def state_dict(self) -> dict[str, Any]:
        return {"rho_max": self.rho_max, "rho_min": self.rho_min, "lr_min": self.lr_min, "lr_max": list(self.lr_max),
                "fixed_lr_max": self._fixed_lr_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rho_max, self.rho_min, self.lr_min = state["rho_max"], state["rho_min"], state["lr_min"]
        self.lr_max, self._fixed_lr_max = list(state["lr_max"]), state["fixed_lr_max"]
        self.step()
