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
from .optim import check_no_duplicates

OFFICIAL_EPS = 1e-16


class ASAM:
    """``ASAM(optimizer, model, rho=0.5, eta=0.01)``: wraps an existing optimizer instance, as the official code.

    Refused with a ``ValueError``: ``rho`` or ``eta`` not a finite number >= 0 (also when changed later: the next
    ``ascent_step`` raises before writing anything), and an ``optimizer`` whose param group lists a parameter twice
    (torch only warns; its step would update that parameter twice).
    """

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
        for i, group in enumerate(optimizer.param_groups):
            check_no_duplicates(group["params"], f"the optimizer's param_groups[{i}]")
        self.optimizer = optimizer
        self.model = model
        self.rho = rho
        self.eta = eta
        self._engine = SharpnessEngine(backend=backend, eps=OFFICIAL_EPS, restore="subtract")
        self._engine.check_devices(p.device for g in optimizer.param_groups for p in g["params"])
        self._cached_groups: list[dict[str, Any]] | None = None

    def report(self):
        """What served the last step (see ``fastasam.ASAM.report``)."""
        return self._engine.report()

    def _groups(self) -> list[dict[str, Any]]:
        """The official split of the model's parameters, read from the model once (the first ``ascent_step``) and
        kept, so a step does not walk the modules; ``rho`` and ``eta`` are re-read every step."""
        groups = self._cached_groups
        if groups is None:
            groups = self._cached_groups = self._split()
        if groups[0]["rho"] != self.rho or groups[0]["eta"] != self.eta:
            for g in groups:
                g["rho"], g["eta"] = self.rho, self.eta
        return groups

    def _split(self) -> list[dict[str, Any]]:
        named = list(self.model.named_parameters())
        common = {"rho": self.rho, "eta": self.eta}
        if self.adaptive:  # the official rule: a name containing "weight" is adaptive
            splits = [(True, [(n, p) for n, p in named if "weight" in n]),
                      (False, [(n, p) for n, p in named if "weight" not in n])]
        else:
            splits = [(False, named)]
        return [
            {"params": [p for _, p in part], "param_names": [n for n, _ in part], "adaptive": adaptive, **common}
            for adaptive, part in splits
        ]

    def ascent_step(self) -> None:
        self._engine.first_step(self._groups())
        self.optimizer.zero_grad()

    def descent_step(self) -> None:
        self._engine.restore_and_step(self.optimizer)
        self.optimizer.zero_grad()


class SAM(ASAM):
    """``SAM(optimizer, model, rho=0.5, eta=0.01)`` of the official code: nothing adaptive, ``eta`` unused."""

    adaptive = False
