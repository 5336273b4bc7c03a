"""Drop-in replacements for the classes of the official ASAM code (``asam.py`` of the paper's repository).

    from asam import ASAM            ->    from fastasam.compat import ASAM

Same constructor ``ASAM(optimizer, model, rho=0.5, eta=0.01)``, same ``ascent_step()`` / ``descent_step()``, same
semantics: parameters whose name contains ``weight`` are adaptive (``T_w = |w| + eta``), the others are not; the norm
gets ``1e-16``; ``descent_step`` subtracts the stored perturbation; each step ends with ``optimizer.zero_grad()``.
The loops run on fastasam's backends. One deliberate difference: ``descent_step`` restores every parameter the
ascent perturbed, also one that has no gradient in the second pass (the official code leaves it perturbed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._engine import SharpnessEngine, check_nonnegative

OFFICIAL_EPS = 1e-16


class ASAM:
    """``ASAM(optimizer, model, rho=0.5, eta=0.01)``: wraps an existing optimizer instance, as the official code."""

    adaptive = True

    def __init__(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, rho: float = 0.5, eta: float = 0.01,
        *, backend: str = "auto",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"fastasam.compat: optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}."
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastasam.compat: model must be a torch.nn.Module, got {type(model).__name__}.")
        check_nonnegative("rho", rho)
        check_nonnegative("eta", eta)
        self.optimizer = optimizer
        self.model = model
        self.rho = rho
        self.eta = eta
        self._engine = SharpnessEngine(backend=backend, eps=OFFICIAL_EPS, restore="subtract")

    def _groups(self) -> tuple[list[dict[str, Any]], dict[int, str]]:
        named = list(self.model.named_parameters())
        names = {id(p): n for n, p in named}
        common = {"rho": self.rho, "eta": self.eta}
        if not self.adaptive:
            return [{"params": [p for _, p in named], "adaptive": False, **common}], names
        weights = [p for n, p in named if "weight" in n]
        others = [p for n, p in named if "weight" not in n]
        return [{"params": weights, "adaptive": True, **common}, {"params": others, "adaptive": False, **common}], names

    @torch.no_grad()
    def ascent_step(self) -> None:
        groups, names = self._groups()
        self._engine.first_step(groups, names)
        self.optimizer.zero_grad()

    @torch.no_grad()
    def descent_step(self) -> None:
        self._engine.restore()
        self.optimizer.step()
        self.optimizer.zero_grad()


class SAM(ASAM):
    """``SAM(optimizer, model, rho=0.5, eta=0.01)`` of the official code: nothing adaptive, ``eta`` unused."""

    adaptive = False
