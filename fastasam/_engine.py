"""The two halves of a sharpness-aware step, shared by ``fastasam.ASAM``/``SAM`` and the ``compat`` classes.

``first_step`` buckets the parameters, asks each bucket's backend for its share of the squared norm, combines the
shares into the one global norm on the device (never on the host), and perturbs. ``restore`` undoes it. Nothing here
reads a tensor's value on the host, so the step does not synchronise with the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import ModuleType

import torch

from . import backends
from ._plan import RESTORE_MODES, Bucket, build_buckets, subset


def check_nonnegative(name: str, value: object, where: str = "") -> None:
    """Raise a ``ValueError`` naming the option unless ``value`` is a real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # also rejects NaN
        raise ValueError(f"fastasam: invalid {name}={value!r}{where}; it must be a number >= 0.")


def check_group_options(groups: Iterable[Mapping]) -> None:
    for i, group in enumerate(groups):
        check_nonnegative("rho", group["rho"], f" in param_groups[{i}]")
        check_nonnegative("eta", group["eta"], f" in param_groups[{i}]")


def _all_reduce_shards(buckets: list[Bucket], shares: list[torch.Tensor], acc: torch.dtype) -> list[torch.Tensor]:
    """The shares with those of sharded buckets summed over their process groups (one all-reduce per set of groups, on
    the device, asynchronous to the host), so that their sum is the squared norm of the whole, unsharded gradient."""
    whole: list[torch.Tensor] = []
    sharded: dict[tuple, list[torch.Tensor]] = {}
    for b, share in zip(buckets, shares, strict=True):
        if b.reduce_over:
            sharded.setdefault((b.reduce_over, b.device), []).append(share.to(acc))
        else:
            whole.append(share)
    if not sharded:
        return shares
    import torch.distributed as dist

    for (over, _), parts in sharded.items():
        part = torch.stack(parts).sum()
        for pg in over:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=pg)
        whole.append(part)
    return whole


class SharpnessEngine:
    """Holds the backend choice, ``eps``, the restore mode and, between the two steps, what to restore.

    Attributes readable after ``first_step`` (device tensors; reading them on the host synchronises):
    ``grad_norm`` (0-d, the global norm) and ``perturbation_skipped`` (0-d bool: the norm was not finite, so nothing
    was perturbed).
    """

    def __init__(self, backend: str = "auto", eps: float = 1e-12, restore: str = "copy") -> None:
        backends.check_name(backend)
        check_nonnegative("eps", eps)
        if restore not in RESTORE_MODES:
            raise ValueError(f"fastasam: invalid restore={restore!r}; choose one of {RESTORE_MODES}.")
        self.backend = backend
        self.eps = float(eps)
        self.restore_mode = restore
        self.grad_norm: torch.Tensor | None = None
        self.perturbation_skipped: torch.Tensor | None = None
        # perturbed buckets awaiting restore, with the backend that perturbed them; None = not perturbed
        self._pending: list[tuple[ModuleType, Bucket]] | None = None
        self._buffers: dict[torch.Tensor, torch.Tensor] = {}

    @property
    def perturbed(self) -> bool:
        return self._pending is not None

    def _buffer(self, key: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The restore buffer for ``p`` (a parameter, or the local shard of the DTensor parameter ``key``)."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._buffers[key] = torch.empty_like(p)
        return buf

    @torch.no_grad()
    def first_step(self, groups: list[Mapping]) -> None:
        if self._pending is not None:
            raise RuntimeError(
                "fastasam: first_step() called twice in a row; the weights already hold w + e. "
                "Call second_step() before the next first_step()."
            )
        check_group_options(groups)
        buckets = build_buckets(groups)
        if not buckets:  # no gradients at all: nothing to perturb, second_step still steps the base optimizer
            self.grad_norm = self.perturbation_skipped = None
            self._pending = []
            return
        impl = {b.device: backends.resolve(self.backend, b.device) for b in buckets}

        shares = [impl[b.device].grad_sqnorm(b) for b in buckets]
        main = buckets[0].device
        acc = torch.float64 if any(s.dtype == torch.float64 for s in shares) else torch.float32
        shares = _all_reduce_shards(buckets, shares, acc)
        total = shares[0].to(acc) if len(shares) == 1 else torch.stack([s.to(main, acc) for s in shares]).sum()
        norm = total.sqrt()
        finite = torch.isfinite(norm)
        ok = finite & (norm > 0)
        self.grad_norm, self.perturbation_skipped = norm, ~finite

        pending = []
        per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for b in buckets:
            if b.device not in per_device:
                per_device[b.device] = (norm.to(b.device), ok.to(b.device), finite.to(b.device))
            norm_d, ok_d, finite_d = per_device[b.device]
            scale_of: dict[float, torch.Tensor] = {}
            for rho in b.rho:
                if rho not in scale_of:
                    scale_of[rho] = torch.where(ok_d, rho / (norm_d + self.eps), 0.0)
            keep = [rho > 0 for rho in b.rho]  # rho = 0: counted in the norm, never touched
            if not any(keep):
                continue
            b.scales = [scale_of[rho] for rho in b.rho]
            b.finite = finite_d
            b.buffers = [self._buffer(k, p) for k, p in zip(b.keys, b.params)]
            if not all(keep):
                b = subset(b, keep)
            impl[b.device].perturb_(b, self.restore_mode)
            b.grads = []  # the first pass's gradients must not outlive zero_grad()
            b.scales = []
            pending.append((impl[b.device], b))
        self._pending = pending

    @torch.no_grad()
    def restore_and_step(self, base: torch.optim.Optimizer) -> None:
        """Restore, then ``base.step()``; fused into one pass over memory where every perturbed bucket's backend
        can apply ``base``'s update itself and the perturbed tensors are exactly those the base optimizer steps."""
        fused = self._fused_steps(base)
        if fused is None:
            self.restore()
            base.step()
            return
        for run in fused:
            run()
        self._pending = None

    def _fused_steps(self, base: torch.optim.Optimizer) -> list | None:
        pending = self._pending
        if not pending or any(getattr(impl, "prepare_fused_step", None) is None for impl, _ in pending):
            return None
        if any(b.dtensor_shards for _, b in pending):
            return None  # the base optimizer keeps DTensor state; let it step the DTensors itself
        owner = {p: gi for gi, group in enumerate(base.param_groups) for p in group["params"] if p.grad is not None}
        if len(owner) != sum(len(b.params) for _, b in pending):
            return None  # rho = 0 groups, or a gradient present in only one of the two passes
        runs = []
        for impl, b in pending:
            groups = [owner.get(p, -1) for p in b.params]
            if -1 in groups:
                return None
            runs.append(impl.prepare_fused_step(b, groups, base, self.restore_mode))
        return None if any(r is None for r in runs) else runs

    @torch.no_grad()
    def restore(self) -> None:
        if self._pending is None:
            raise RuntimeError(
                "fastasam: second_step() called without a first_step() before it; there is no perturbation to undo. "
                "Call first_step() after the first backward pass."
            )
        for impl, b in self._pending:
            impl.restore_(b, self.restore_mode)
        self._pending = None
