"""The step plan: what a sharpness-aware step works on, built once and reused while nothing changes.

:class:`StepPlan` (first step): the buckets, their restore buffers, one backend runner per bucket (device tables and
bound launches for the multi-tensor backends; the per-tensor backends through :class:`ModuleRunner`) and the
:func:`~fastasam._watch.watch` a warm step checks. :class:`UpdatePlan` (second step): per bucket, which perturbed
tensors a fused restore + update takes, and the param groups the base optimizer steps for all the others.

Each plan owns its protocol. The second step is one call, :meth:`StepPlan.second_step`: it asks the update plan to
run (:meth:`UpdatePlan.run`, which decides in one place, :meth:`UpdatePlan.holds`, whether it still holds, and
refreshes what only moved), plans again when it does not, and returns an :class:`Outcome`; then
:meth:`StepPlan.finish` has the base optimizer step what the restore left to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, is_, itemgetter
from types import ModuleType

import torch

from . import _watch, backends
from ._plan import (
    Bucket,
    build_buckets,
    check_no_shared_memory,
    check_not_capturing,
    local_gradient,
    param_name,
    sum_over,
)
from .backends import _layout as L
from .backends._multi_tensor import PerturbRunner, UpdateRunner, gradient_mismatch
from .backends._updates import fused_update_for

_params_of = itemgetter("params")
_grad_of = attrgetter("grad")


def check_nonnegative(name: str, value: object, where: str = "") -> None:
    """Raise a ``ValueError`` naming the option unless ``value`` is a finite real number >= 0 (inf and NaN are
    refused: an infinite rho or eps, or an infinite eta, would make every weight inf/NaN or skip every
    perturbation)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):  # NaN fails
        raise ValueError(f"fastasam: invalid {name}={value!r}{where}; it must be a finite number >= 0.")


@dataclass(frozen=True)
class Outcome:
    """How a second step restored: ``fused`` (the update plan's fused restore + update; the base optimizer's own
    step then takes only the tensors it left), or not (everything restored; the base optimizer's step takes all);
    ``describe``: the words the report shows; ``replan``: the step plan is dropped (a parameter's storage changed
    between the two steps), so the next first step plans from the parameters as they are."""

    fused: bool
    describe: str
    replan: bool = False


FUSED = Outcome(True, "fused")
ADAM_CAPTURED = Outcome(False, "restore, then the base optimizer's step: Adam during CUDA-graph capture")
MOVED = Outcome(False, "restore tensor by tensor, then the base optimizer's step: a parameter's storage changed "
                       "between first_step and second_step", replan=True)


def _options(groups: Iterable[Mapping]) -> list[tuple]:
    return [(g["rho"], g["eta"], g["adaptive"]) for g in groups]


def _check_options(options: list[tuple]) -> None:
    for i, (rho, eta, _) in enumerate(options):
        check_nonnegative("rho", rho, f" in param_groups[{i}]")
        check_nonnegative("eta", eta, f" in param_groups[{i}]")


class ModuleRunner:
    """A per-tensor backend (``reference``, ``foreach``) behind the runner interface: its functions run on the bucket
    each step; nothing is bound and no address is kept."""

    kernel_index: tuple = ()
    self_check = False
    needs_scales = True

    def __init__(self, module: ModuleType, bucket: Bucket, restore: str) -> None:
        self.name, self.module, self.bucket, self.restore_mode = module.name, module, bucket, restore
        self.head = bucket.head(bucket.n_perturbed)
        self.grad_target = bucket
        self.reasons: list[str | None] = [None] * len(bucket.params)

    def bind(self, share_is_total: bool) -> None:
        pass

    def set_options(self) -> None:
        self.bucket.layout = None
        self.head = self.bucket.head(self.bucket.n_perturbed)

    def sqnorm(self) -> torch.Tensor:
        return self.module.grad_sqnorm(self.bucket)

    def perturb(self, total: torch.Tensor, scales: list[torch.Tensor], finite: torch.Tensor) -> None:
        head = self.head
        if not head.params:
            return
        head.grads = self.bucket.grads[: head.n_perturbed]
        head.scales = list(map(scales.__getitem__, head.group))
        head.finite = finite
        self.module.perturb_(head, self.restore_mode)
        head.grads, head.scales = [], []

    def restore(self) -> None:
        if self.head.params:
            self.module.restore_(self.head, self.restore_mode)

    def release(self) -> None:
        self.bucket.grads = []


def make_runner(module: ModuleType, bucket: Bucket, restore: str, eps: float) -> PerturbRunner | ModuleRunner:
    prepare = getattr(module, "prepare", None)
    return prepare(bucket, restore, eps) if prepare is not None else ModuleRunner(module, bucket, restore)


def _local_grads(target: Bucket, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [local_gradient(k, g) for k, g in zip(target.keys, grads, strict=True)]


class StepPlan:
    """The first step's plan for one structure of param groups (see the module docstring). ``traced``: built inside
    ``torch.compile`` for one call, without a watch."""

    def __init__(self, engine, groups: list[Mapping], traced: bool = False) -> None:
        self.engine, self.traced = engine, traced
        if not traced:
            check_not_capturing({p.device for g in groups for p in g["params"]}, "the step plan")
        for g in groups:  # a group added through the base optimizer has none of these until now
            for key, value in engine.group_defaults.items():
                g.setdefault(key, value)
        self.groups, self.options = groups, _options(groups)
        _check_options(self.options)
        self.group_ids = list(map(id, groups))
        self.sizes = [len(g["params"]) for g in groups]
        self.params = list(chain.from_iterable(map(_params_of, groups)))
        buckets, self.absent = build_buckets(groups)
        if not traced:
            check_no_shared_memory(buckets, groups)
        for b in buckets:
            n = b.n_perturbed
            b.buffers = [engine.buffer(k, p) for k, p in zip(b.keys[:n], b.params[:n])]
        self.buckets = buckets
        # where every parameter was (DTensors: their local shards): a parameter that moved means a new plan
        self.param_ptrs = [[(p.data_ptr(), p.shape, p.stride()) for p in b.params] for b in buckets]
        self.runners = [make_runner(backends.resolve(engine.backend, b.device), b, engine.restore_mode, engine.eps)
                        for b in buckets]
        # one bucket on the kernels, whole on this rank: the norm kernel's output is the global norm
        self.single = (len(self.runners) == 1 and isinstance(self.runners[0], PerturbRunner)
                       and self.runners[0].rest is None and not buckets[0].reduce_over)
        for r in self.runners:
            r.bind(self.single)
        self.needs_scales = any(r.needs_scales for r in self.runners)
        self.update: UpdatePlan | None = None
        self.watch, self.targets = (None, []) if traced else self._watch()
        # LookSAM / GSAM (keep): every tensor with a gradient in the kernels, on one device
        self.takes_variants = (bool(self.runners) and len({b.device for b in buckets}) == 1 and all(
            isinstance(r, PerturbRunner) and r.rest is None and not r.self_check for r in self.runners))
        self.keep_version: int | None = None

    @classmethod
    def run_first_step(cls, engine, groups: list[Mapping], plan: StepPlan | None, keep=None
                       ) -> tuple[StepPlan, torch.Tensor | None]:
        """The first step for ``groups``: on ``plan`` while it holds (the same structure, checked in one pass;
        changed rho / eta / adaptive re-uploaded; the gradients where its watch expects them), else on ``plan`` with
        its gradients' addresses rewritten, or on a new plan. ``keep``: LookSAM's / GSAM's copy of the gradients
        (:meth:`keep`). Returns the plan that ran and the global squared norm (:meth:`first_step`)."""
        if plan is None or not plan.same_structure(groups):
            plan = None
        elif not plan.same_options(groups):
            plan = plan.with_options(groups)  # uploads new options, or None when the structure must change
        grads = plan.watch.check() if plan is not None else None
        if grads is None:
            plan = cls.rebuild(engine, groups, plan)
            grads = plan.grads_at_build()
        if keep is not None:
            plan.keep(keep)
        return plan, plan.first_step(grads)

    @classmethod
    def rebuild(cls, engine, groups: list[Mapping], old: StepPlan | None) -> StepPlan:
        """The plan for ``groups`` now: ``old`` with its tables' addresses rewritten when only gradients moved, else
        a new plan."""
        if old is not None and old.only_gradients_moved():
            for r in old.runners:
                if isinstance(r, PerturbRunner) and not r.self_check:
                    r.refresh_addresses()
                    r.bind(r.sq_in is r.share)
            old.watch, old.targets = old._watch()
            old.keep_version = None  # the runners bind the variants' copy again
            return old
        return cls(engine, groups)

    # --- what a warm step checks ---------------------------------------------------------------------------------

    def _watch(self) -> tuple[object, list]:
        """The first step's watch, and where its gradients go each step: ``(bucket, start, end, local)`` per bucket
        whose gradients per-tensor code reads (``local``: DTensor gradients, handed over as their local shards)."""
        contiguous, strided, others, dtensors, plain_targets, dtensor_targets = [], [], [], [], [], []
        for r in self.runners:
            if not r.self_check:
                for i in r.kernel_index:
                    p = r.bucket.params[i]
                    (contiguous if p.is_contiguous() else strided).append(p)
            t = r.grad_target
            if t is not None and t.keys:
                (dtensor_targets if t.dtensor_shards else plain_targets).append(t)
        targets = []
        start = 0  # the watch returns the gradients of the tensors after the kernel ones
        for ts, local, into in ((plain_targets, False, others), (dtensor_targets, True, dtensors)):
            for t in ts:
                into.extend(t.keys)
                targets.append((t, start, start + len(t.keys), local))
                start += len(t.keys)
        return _watch.watch(contiguous, strided, others, dtensors, self.absent, check_params=True), targets

    def same_structure(self, groups: list[Mapping]) -> bool:
        """O(groups) checks plus one identity pass over the parameters (no Python call per tensor)."""
        if groups is not self.groups or list(map(id, groups)) != self.group_ids:
            return False
        if [len(g["params"]) for g in groups] != self.sizes:
            return False
        return _watch.same_params(groups, self.params)

    def same_options(self, groups: list[Mapping]) -> bool:
        return _options(groups) == self.options

    def with_options(self, groups: list[Mapping]) -> StepPlan | None:
        """rho, eta or adaptive changed: validate, then re-upload the options, or None when a rho moved to or from
        0 (the set of perturbed tensors changes: a new plan)."""
        new = _options(groups)
        _check_options(new)
        if [o[0] > 0 for o in new] != [o[0] > 0 for o in self.options]:
            return None
        self.options = new
        for b in self.buckets:
            b.rho = [new[g][0] for g in b.group]
            b.eta = [float(new[g][1]) for g in b.group]
            b.adaptive = [bool(new[g][2]) for g in b.group]
        for r in self.runners:
            r.set_options()
        return self

    def only_gradients_moved(self) -> bool:
        """After a failed watch: the same tensors have gradients, the parameters are where and as they were, and the
        kernel tensors' new gradients are laid out like their parameters; only addresses of gradients changed."""
        if any(p.grad is not None for p in self.absent):
            return False
        for b, r, where in zip(self.buckets, self.runners, self.param_ptrs, strict=True):
            if b.dtensor_shards or [(p.data_ptr(), p.shape, p.stride()) for p in b.params] != where:
                return False
            # a gradient of another shape, dtype or device: a new plan, whose build refuses it as the first one did;
            # one the kernels cannot read as they did: a new plan, which hands it to foreach
            if any(g is None or g.layout != torch.strided or g.shape != p.shape or g.dtype != p.dtype
                   or g.device != p.device for g, p in zip(map(_grad_of, b.keys), b.params, strict=True)):
                return False
            if isinstance(r, PerturbRunner) and any(gradient_mismatch(b.keys[i].grad, b.params[i])
                                                    for i in r.kernel_index):
                return False
        for b in self.buckets:
            b.grads = [k.grad for k in b.keys]
        return True

    def grads_at_build(self) -> list:
        """The watch's gradient list as the plan was built (the build read them)."""
        if self.watch is None:
            return []
        return self.watch.check() or []

    # --- run ------------------------------------------------------------------------------------------------------

    def sqnorm(self, grads: list) -> torch.Tensor:
        """The global squared norm of the scaled gradients ``grads`` (the watch's list), on the device. Leaves the
        gradients with the per-tensor code that reads them; ``first_step`` releases them."""
        for target, a, b, local in self.targets:
            target.grads = grads[a:b] if not local else _local_grads(target, grads[a:b])
        shares = [r.sqnorm() for r in self.runners]
        return shares[0] if self.single else _combine(self.buckets, shares)

    def first_step(self, grads: list) -> torch.Tensor | None:
        """Norm and perturbation; returns the global squared norm (None when no parameter has a gradient)."""
        if not self.runners:
            return None
        try:
            total = self.sqnorm(grads)
            scales = finite = None
            if self.needs_scales:
                scales, finite = _scales(total, self.options, self.engine.eps, {b.device for b in self.buckets})
            for r, b in zip(self.runners, self.buckets, strict=True):
                r.perturb(total, scales and scales[b.device], finite and finite[b.device])
        finally:
            for r in self.runners:
                r.release()
        return total

    def restore(self) -> None:
        for r in self.runners:
            r.restore()

    def keep(self, keep) -> None:
        """LookSAM's / GSAM's copy of the first pass's gradients into their kept buffers (``keep``: a
        ``fastasam._decompose.Direction`` of mode ``COMBINE_KEEP``) over this plan's tables, which the watch has just
        confirmed: bound once per set of buffers where the kernels take every tensor with a gradient; else
        ``keep.apply()`` (the variant's own tables, or torch ops)."""
        if keep.version != self.keep_version and not self._bind_keep(keep):
            keep.apply()
            return
        for r in self.runners:
            r.keep()

    def _bind_keep(self, keep) -> bool:
        kept = keep.kept
        if not self.takes_variants or len(kept) != sum(len(r.kernel_index) for r in self.runners):
            return False
        self.keep_version = None
        if not all(r.bind_keep(kept) for r in self.runners):
            return False
        self.keep_version = keep.version
        return True

    # --- the second step ------------------------------------------------------------------------------------------

    def second_step(self, base: torch.optim.Optimizer, direction=None) -> Outcome:
        """Undo the perturbation, fused with ``base``'s update where the update plan can (planned again here when it
        no longer holds), and say how (:class:`Outcome`). ``direction``: LookSAM's / GSAM's decomposition, not yet
        run (``fastasam._decompose.Direction``): over the fused update's tables when that takes every tensor (GSAM's
        direction inside the update itself), else applied to the gradients first. The base optimizer's step on what
        is left is :meth:`finish`'s, called once the caller has marked the perturbation undone."""
        update = self.update
        if update is not None:
            outcome = update.run(base, direction)
            if outcome is not None:
                return outcome
        if not self.params_intact():  # the tables point at memory the parameters no longer hold
            self.restore_tensor_by_tensor()
            if direction is not None:
                direction.apply()
            return MOVED
        self.update = UpdatePlan(self, base)
        return self.update.run_planned(base, direction)

    def finish(self, base: torch.optim.Optimizer, outcome: Outcome) -> None:
        """The base optimizer's step after :meth:`second_step`: on the tensors the fused update left, or on all."""
        if outcome.fused:
            self.update.step_rest()
        else:
            base.step()

    def restore_all(self, outcome: Outcome, direction=None) -> Outcome:
        """Undo the perturbation of every tensor (``direction`` applied to the gradients first), for the base
        optimizer's step on all of them as ``outcome`` (not fused) says; returns it."""
        if direction is not None:
            direction.apply()
        self.restore()
        return outcome

    def second_pass_missing(self) -> bool:
        """The first step perturbed tensors with a gradient, and none of them has one now: the second backward pass
        did not run (one pass over the perturbed parameters; asked only of a step the fused update did not take)."""
        keys = [k for b in self.buckets for k in b.keys[: b.n_perturbed]]
        return bool(keys) and all(map(is_, map(_grad_of, keys), repeat(None)))

    # --- between the two steps ------------------------------------------------------------------------------------

    def params_intact(self) -> bool:
        """Whether every parameter is still where, and as large as, the plan's tables recorded (one pass, no Python
        call per tensor). False when a parameter's storage was changed between the two steps (``p.data = ...``,
        ``torch.utils.swap_tensors``, ``set_``, a dtype or device change): the kernels must not run."""
        return self.watch is None or self.watch.params_intact()

    def restore_tensor_by_tensor(self) -> None:
        """Undo the perturbation through the parameters' current tensors, one by one (the oracle's restore), after
        a parameter's storage changed: ``w`` is written into whatever storage each parameter holds now. Every
        perturbed parameter is checked first; a shape or device that no longer matches its restore buffer raises,
        and nothing is written."""
        from .backends import reference

        problems = []
        for b in self.buckets:
            for i in range(b.n_perturbed):
                p, buf = b.params[i], b.buffers[i]
                if p.shape != buf.shape or p.device != buf.device:
                    problems.append(f"{self._name(b.keys[i])} is now {tuple(p.shape)} on {p.device}, was "
                                    f"{tuple(buf.shape)} on {buf.device}")
        if problems:
            raise RuntimeError(
                "fastasam: a parameter changed between first_step() and second_step() in a way the perturbation "
                f"cannot be undone in ({'; '.join(problems)}); nothing was written, and the other parameters still "
                "hold w + e. Change parameters' shapes or devices only after second_step() (or before first_step())."
            )
        for b in self.buckets:
            head = b.head(b.n_perturbed)
            if head.params:
                reference.restore_(head, self.engine.restore_mode)

    def _name(self, key: torch.Tensor) -> str:
        for gi, g in enumerate(self.groups):
            for j, p in enumerate(g["params"]):
                if p is key:
                    return param_name(g, gi, j)
        return "a parameter"


def _combine(buckets: list[Bucket], shares: list[torch.Tensor]) -> torch.Tensor:
    """The global squared norm from the buckets' shares, on the first bucket's device; the shares of sharded buckets
    summed over their process groups first (one all-reduce per set of groups, on the device)."""
    acc = torch.float64 if any(s.dtype == torch.float64 for s in shares) else torch.float32
    main = buckets[0].device
    whole: list[torch.Tensor] = []
    sharded: dict[tuple, list[torch.Tensor]] = {}
    for b, share in zip(buckets, shares, strict=True):
        if b.reduce_over:
            sharded.setdefault((b.reduce_over, b.device), []).append(share.to(acc))
        else:
            whole.append(share)
    for (over, _), parts in sharded.items():
        whole.append(sum_over(torch.stack(parts).sum(), over))
    if len(whole) == 1:
        return whole[0].to(acc)
    return torch.stack([s.to(main, acc) for s in whole]).sum()


def _scales(total: torch.Tensor, options: list[tuple], eps: float, devices: set) -> tuple[dict, dict]:
    """Per device: each param group's ``rho / (norm + eps)`` (0 unless the norm is finite and > 0) and whether the
    norm is finite, for the tensors served tensor by tensor."""
    norm = total.sqrt()
    finite = torch.isfinite(norm)
    ok = finite & (norm > 0)
    scales, finites = {}, {}
    for dev in devices:
        norm_d, ok_d = norm.to(dev), ok.to(dev)
        of_rho: dict[float, torch.Tensor] = {}
        for rho, _, _ in options:
            if rho not in of_rho:
                of_rho[rho] = torch.where(ok_d, rho / (norm_d + eps), 0.0)
        scales[dev] = [of_rho[rho] for rho, _, _ in options]
        finites[dev] = finite.to(dev)
    return scales, finites


class UpdatePlan:
    """The second step's plan against one base optimizer: fused restore + update where it qualifies, restore and the
    base optimizer's own step for the rest. ``mode`` describes it for the report."""

    def __init__(self, plan: StepPlan, base: torch.optim.Optimizer) -> None:
        check_not_capturing({b.device for b in plan.buckets}, "the second step's plan (the fused update's tables)")
        self.plan, self.base = plan, base
        self.state = base.state
        self.base_groups, self.base_group_ids = base.param_groups, list(map(id, base.param_groups))
        self.base_sizes = [len(g["params"]) for g in base.param_groups]
        self.base_params = list(chain.from_iterable(map(_params_of, base.param_groups)))
        self.update = fused_update_for(base)
        self.options = self._options()
        self.changed = False
        self.uploaded = False  # the runners' hyper-parameter tables
        self.counts_steps = False  # a runner counts Adam steps
        self.runners: dict[int, UpdateRunner] = {}  # bucket index -> its fused update
        self.outcomes: list[dict[int, str]] = [{} for _ in plan.buckets]
        self.subset: list[tuple[dict, list]] | None = None
        self.watch = None
        self.absent: list[torch.Tensor] = []
        self.structure = None
        self.covers_all = False  # every perturbed tensor is fused: this plan's watch also confirms the parameters
        # LookSAM / GSAM (run_direction): every tensor with a gradient fused, on one device
        self.takes_variants = False
        self.variant_key: tuple | None = None
        self.variant_outs: torch.Tensor | None = None
        self.variant_sums: torch.Tensor | None = None
        base_name = type(base).__name__
        if self.update is None:
            self._unfused(f"{base_name} has no fused update")
            return
        if not isinstance(base.state, dict):
            self.update = None
            self._unfused(f"{base_name}'s state is a {type(base.state).__name__}, not a dict")
            return
        owner = {id(p): gi for gi, g in enumerate(base.param_groups) for p in g["params"]}
        self.structure = self._structure()
        for bi, (b, r) in enumerate(zip(plan.buckets, plan.runners, strict=True)):
            out = self.outcomes[bi]
            restore_only, base_step = {}, {}
            shards = b.dtensor_shards
            for i in range(len(b.params)):
                if i >= b.n_perturbed:
                    base_step[i] = "rho = 0: not perturbed"
                elif id(b.keys[i]) not in owner:
                    restore_only[i] = "not in the base optimizer's param groups"
                elif b.keys[i].grad is None:
                    restore_only[i] = "no gradient in the second pass"
                elif not isinstance(r, PerturbRunner):
                    base_step[i] = f"backend {r.name} has no fused update"
                elif shards:
                    base_step[i] = "a DTensor shard: the base optimizer keeps DTensor state"
                elif r.reasons[i] is not None:
                    base_step[i] = r.reasons[i]
            if isinstance(r, PerturbRunner) and not shards and any(
                    i not in restore_only and i not in base_step for i in r.kernel_index):
                self.runners[bi] = UpdateRunner(r, base, self.update, owner, restore_only, base_step)
                out.update({i: "fused" for i in self.runners[bi].fused})
            out.update({i: "restore only: " + why for i, why in restore_only.items()})
            out.update({i: why for i, why in base_step.items()})
        self.counts_steps = any(u.counts_steps for u in self.runners.values())
        fused = {id(k) for u in self.runners.values() for k in u.fused_keys}
        if not fused:
            self._unfused("no tensor qualifies for the fused update")
            return
        self.mode, self.outcome = "fused", FUSED
        self.subset, absent = [], []
        for g in base.param_groups:
            rest = [p for p in g["params"] if id(p) not in fused]
            absent.extend(p for p in rest if p.grad is None)
            rest = [p for p in rest if p.grad is not None]
            if rest:
                self.subset.append((g, rest))
        self.absent = absent
        self.covers_all = all(id(k) in fused for b in plan.buckets for k in b.keys[: b.n_perturbed])
        # every tensor with a gradient fused: no base-optimizer step (it would need the direction in its gradients),
        # every parameter in the base optimizer's groups (this plan watches those that have no gradient)
        self.takes_variants = (self.covers_all and not self.subset and all(id(p) in owner for p in plan.params)
                               and len({b.device for b in plan.buckets}) == 1)
        self.watch = self._watch()

    def _unfused(self, why: str) -> None:
        self.mode = "restore, then the base optimizer's step: " + why
        self.outcome = Outcome(False, self.mode)
        for bi, b in enumerate(self.plan.buckets):
            for i in range(len(b.params)):
                self.outcomes[bi].setdefault(i, "rho = 0: not perturbed" if i >= b.n_perturbed else why)

    def _options(self) -> list[tuple] | None:
        """The base optimizer's options its fused update reads, per group (C-level reads, compared each step)."""
        if self.update is None:
            return None
        keys = self.update.options
        return [tuple(map(g.get, keys)) for g in self.base.param_groups]

    def _structure(self) -> list:
        """What of those options decides the plan itself (which tensors fuse, which state they have)."""
        return [(self.update.group_reason(g), self.update.structure(g)) for g in self.base.param_groups]

    # --- run -------------------------------------------------------------------------------------------------------

    def run(self, base: torch.optim.Optimizer, direction=None) -> Outcome | None:
        """The second step on this plan (:meth:`run_planned`) when it still holds for ``base`` and the tensors as they
        are (:meth:`holds`); None, having done nothing, when it does not."""
        return self.run_planned(base, direction) if self.holds(base) else None

    def run_planned(self, base: torch.optim.Optimizer, direction=None) -> Outcome:
        """Restore: fused with the update where planned, else everything restored for the base optimizer's step."""
        plan = self.plan
        if self.outcome is not FUSED:
            return plan.restore_all(self.outcome, direction)
        update = self
        if self.capturing_adam():  # torch.optim.Adam's host step count cannot be captured; its own path decides
            return plan.restore_all(ADAM_CAPTURED, direction)
        if not self.sync():  # the Adam step counts were changed from outside: plan again from the state as it is
            update = plan.update = UpdatePlan(plan, base)
            if update.outcome is not FUSED or not update.sync():
                return plan.restore_all(update.outcome, direction)
        fuse = False
        if direction is not None:
            if update.run_direction(direction):
                fuse = direction.mode == L.COMBINE_GSAM
            else:
                direction.apply()
        update.restore_fused(fuse)
        return FUSED

    # --- whether the plan still holds: decided here alone ---------------------------------------------------------

    def holds(self, base: torch.optim.Optimizer) -> bool:
        """The plan still holds: the same optimizer, state and param groups with the same structural options
        (:meth:`valid`; changed hyper-parameters are uploaded by :meth:`sync`), the fused tensors and their
        gradients where the tables expect them (:meth:`check`, which rewrites the tables when only the gradients'
        addresses changed), and, when the fused update does not take every perturbed tensor, every parameter where
        the first step's tables recorded it."""
        return self.valid(base) and self.check() and (self.covers_all or self.plan.params_intact())

    def valid(self, base: torch.optim.Optimizer) -> bool:
        """Nothing the plan relies on changed: the same optimizer, state, param groups (and their structural
        options)."""
        if base is not self.base or base.state is not self.state:  # the state's entries: check()'s watch
            return False
        groups = base.param_groups
        if groups is not self.base_groups or list(map(id, groups)) != self.base_group_ids:
            return False
        if [len(g["params"]) for g in groups] != self.base_sizes:
            return False
        if groups is not self.plan.groups and not _watch.same_params(groups, self.base_params):
            return False
        if self.update is None:
            return True
        options = self._options()
        if options == self.options:
            return True
        self.options = options  # hyper-parameters changed: the runners upload them; a structural change rebuilds
        self.changed = True
        return self._structure() == self.structure

    def check(self) -> bool:
        """The fused tensors and their second-pass gradients are where the fused tables expect them (one pass); if
        only the gradients' addresses changed, the tables are rewritten in place. False: rebuild (or a parameter
        moved, which the step plan then finds)."""
        if self.watch is None or self.watch.check() is not None:
            return True
        if not (self.watch.params_intact() and self.watch.state_intact()) or any(
                p.grad is not None for p in self.absent):
            return False
        if not all(u.refresh_addresses() for u in self.runners.values()):
            return False
        self.watch = self._watch()
        self.variant_key = None  # the runners bind the variants' launches again
        return True

    def _watch(self):
        """The fused update's watch: the fused tensors and their gradients (parameters checked too), the tensors left
        without a gradient, and the base optimizer's state the fused tables point into."""
        rows = [(k, st) for u in self.runners.values() for k, st in zip(u.fused_keys, u.fused_state, strict=True)]
        contiguous = [r for r in rows if r[0].is_contiguous()]
        strided = [r for r in rows if not r[0].is_contiguous()]
        return _watch.watch([k for k, _ in contiguous], [k for k, _ in strided], [], [], self.absent,
                            check_params=True, state=self.state,
                            state_tensors=[st for _, st in contiguous + strided])

    def sync(self) -> bool:
        """Upload changed hyper-parameters (the first time, and Adam's every step); False (and nothing changed) when
        the plan must be rebuilt first. Nothing to do, and no call, on a warm SGD step with the same options."""
        counts = self.counts_steps
        if counts and not all(u.steps_intact() for u in self.runners.values()):
            return False
        if counts or self.changed or not self.uploaded:
            for u in self.runners.values():
                u.upload(self.changed)
            self.uploaded = True
        self.changed = False
        return True

    def capturing_adam(self) -> bool:
        return self.counts_steps and any(
            b.device.type == "cuda" for b in self.plan.buckets) and torch.cuda.is_current_stream_capturing()

    def run_direction(self, direction) -> bool:
        """LookSAM's / GSAM's second-step decomposition (``fastasam._decompose.Direction``) over this plan's fused
        tables, confirmed by this plan's watch: the sums (``dots``), then LookSAM's ``combine`` (GSAM's direction is
        the fused update's to form, :meth:`restore_fused` with ``direction``). Only where the fused update takes
        every tensor with a gradient, one device, the kept buffers laid out like the parameters (bound once per set
        of buffers); False, having done nothing, elsewhere."""
        if not self.takes_variants:
            return False
        key = (direction.version, direction.mode)
        if key != self.variant_key and not self._bind_variant(direction, key):
            return False
        direction.alpha_on(self.plan.buckets[0].device)
        runners = self.runners.values()
        for u in runners:
            u.dots()
        if self.variant_outs is not None:
            torch.sum(self.variant_outs, 0, out=self.variant_sums)
        if direction.mode != L.COMBINE_GSAM:
            for u in runners:
                u.combine()
        direction.served_by(self.plan.runners[0].name)
        return True

    def _bind_variant(self, direction, key: tuple) -> bool:
        kept = direction.kept
        if len(kept) != sum(len(u.fused) for u in self.runners.values()):  # a tensor with a gradient is not fused
            return False
        device = self.plan.buckets[0].device
        n = len(self.runners)
        outs = torch.zeros((n, 3), dtype=torch.float64, device=device)
        sums = outs[0] if n == 1 else torch.zeros(3, dtype=torch.float64, device=device)
        alpha = direction.alpha_on(device)
        self.variant_key = None
        if not all(u.bind_variant(kept, outs[i], sums, alpha, direction.mode)
                   for i, u in enumerate(self.runners.values())):
            return False
        self.variant_outs, self.variant_sums = (outs if n > 1 else None), sums
        self.variant_key = key
        return True

    def restore_fused(self, direction: bool = False) -> None:
        """The fused restore + update (``direction``: along the bound direction), and the restore of every other
        perturbed tensor."""
        for bi, r in enumerate(self.plan.runners):
            u = self.runners.get(bi)
            if u is not None:
                u.run(direction)
            else:
                r.restore()

    def step_rest(self) -> None:
        """The base optimizer's own step on every tensor the fused update did not take."""
        if self.subset:
            step_subset(self.base, self.subset)


def step_subset(base: torch.optim.Optimizer, subset: list[tuple[dict, list]]) -> None:
    """``base.step()`` on the parameters ``subset`` lists per group (their groups' current options), by handing the
    optimizer these param groups for the call. Its state is keyed by parameter, so nothing else changes."""
    saved = base.param_groups
    base.param_groups = [{**group, "params": params} for group, params in subset]
    try:
        base.step()
    finally:
        base.param_groups = saved
