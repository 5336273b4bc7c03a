"""What served the last step: ``opt.report()``.

Each (device, dtype) bucket of parameters with a first-pass gradient is served by one backend. Within it, the
multi-tensor backends (``triton``, ``cuda``) run every tensor they can in one launch per phase and hand the others to
``foreach``; in the second step a fused kernel restores and updates, in one pass, every perturbed tensor whose
optimizer, options, dtype, layout and state it supports, and the base optimizer's own ``step()`` updates the rest.
The report counts each of these and says why a tensor left the fast path, so a slow step is explained, not guessed::

    >>> print(opt.report())
    second step: fused
    bucket         backend  tensors  kernel  foreach  perturbed  fused  base step  restore only
    cuda:0 float32 triton       161     161        0        161    161          0             0
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BucketReport:
    """One (device, dtype) bucket of the last step.

    ``tensors``: parameters with a first-pass gradient; ``kernel``: norm, perturbation and restore in the backend's
    multi-tensor kernels; ``foreach``: reason -> count of tensors the multi-tensor backend handed to foreach;
    ``perturbed``: tensors with ``rho > 0``; ``fused``: restored and updated in one pass by the fused kernel;
    ``base_step``: reason -> count of tensors restored, then updated by the base optimizer's ``step()``;
    ``restore_only``: reason -> count of tensors restored and not updated."""

    device: str
    dtype: str
    backend: str
    tensors: int
    kernel: int
    perturbed: int
    fused: int
    foreach: dict[str, int] = field(default_factory=dict)
    base_step: dict[str, int] = field(default_factory=dict)
    restore_only: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StepReport:
    """The last step: its buckets, and how the second step ran (``"fused"``, or why it restored and called the base
    optimizer's ``step()`` for everything). ``base_only``: parameters with a gradient only in the second pass (the
    base optimizer steps them; nothing to perturb or restore). ``direction`` (LookSAM, GSAM): what computed the last
    decomposition, ``"<backend> kernels"`` or ``"torch ops: <why not the kernels>"``."""

    buckets: tuple[BucketReport, ...]
    second_step: str
    base_only: int = 0
    direction: str = ""

    @property
    def fused(self) -> int:
        return sum(b.fused for b in self.buckets)

    @property
    def kernel(self) -> int:
        return sum(b.kernel for b in self.buckets)

    def __str__(self) -> str:
        head = ("bucket", "backend", "tensors", "kernel", "foreach", "perturbed", "fused", "base step", "restore only")
        rows = [head]
        for b in self.buckets:
            rows.append((f"{b.device} {b.dtype}", b.backend, b.tensors, b.kernel, sum(b.foreach.values()),
                         b.perturbed, b.fused, sum(b.base_step.values()), sum(b.restore_only.values())))
        widths = [max(len(str(r[c])) for r in rows) for c in range(len(head))]
        lines = [f"second step: {self.second_step}"]
        if self.direction:
            lines.append(f"direction (LookSAM/GSAM): {self.direction}")
        for r in rows:
            lines.append("  ".join(str(x).ljust(w) if c < 2 else str(x).rjust(w)
                                   for c, (x, w) in enumerate(zip(r, widths))))
        for b in self.buckets:
            for what, reasons in (("foreach", b.foreach), ("base step", b.base_step),
                                  ("restore only", b.restore_only)):
                for why, n in reasons.items():
                    lines.append(f"  {b.device} {b.dtype}: {n} x {what}: {why}")
        if self.base_only:
            lines.append(f"  {self.base_only} x base step only: a gradient in the second pass alone")
        return "\n".join(lines)


def build_report(plan, outcome) -> StepReport:
    """The report of a step that ran ``plan`` (``_step_plan.StepPlan``) and whose second step ran as ``outcome``
    (``_step_plan.Outcome``) says."""
    second_step = outcome.describe
    update = plan.update if outcome is getattr(plan.update, "outcome", None) else None
    buckets = []
    for bi, (b, r) in enumerate(zip(plan.buckets, plan.runners, strict=True)):
        outcomes = update.outcomes[bi] if update is not None else {}
        fused = sum(1 for o in outcomes.values() if o == "fused")
        base_step: Counter = Counter()
        restore_only: Counter = Counter()
        for i in range(len(b.params)):
            o = outcomes.get(i)
            if o == "fused":
                continue
            if o is None:
                o = "rho = 0: not perturbed" if i >= b.n_perturbed else second_step
            if o.startswith("restore only: "):
                restore_only[o[len("restore only: "):]] += 1
            else:
                base_step[o] += 1
        buckets.append(BucketReport(
            device=str(b.device), dtype=str(b.dtype).replace("torch.", ""), backend=r.name, tensors=len(b.params),
            kernel=len(r.kernel_index), perturbed=b.n_perturbed, fused=fused,
            foreach=dict(Counter(x for x in r.reasons if x is not None)), base_step=dict(base_step),
            restore_only=dict(restore_only),
        ))
    base_only = 0
    if update is not None and update.subset is not None:
        known = {id(k) for b in plan.buckets for k in b.keys}
        base_only = sum(1 for _, ps in update.subset for p in ps if id(p) not in known)
    return StepReport(buckets=tuple(buckets), second_step=second_step, base_only=base_only)
