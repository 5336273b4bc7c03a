"""``fastasam.MSAM``: Momentum-SAM (Becker et al. 2024), sharpness-aware minimisation at a plain optimizer's cost.

One forward/backward a step: the gradient is taken at a point moved against the momentum, ``w~ = w - a * m``
(``a = rho / (||m|| + eps)``), so no second pass is needed, and no memory beyond the base optimizer's own. The loop
is the plain one, ``loss.backward(); opt.step(); opt.zero_grad()``. Between steps the weights sit at ``w~``;
``with opt.unperturbed():`` gives ``w`` for evaluation and checkpoints of the weights themselves.

The formulas (the authors' order) are ``fastasam.backends.reference``'s (``msam_update_``, ``msam_perturb_``), the
oracle; on the ``cpu``, ``triton`` and ``cuda`` backends a step is two launches per (device, dtype) bucket: one pass
that moves back, applies the base optimizer's update and sums the new norm's partials, one that perturbs.
``adaptive=True`` scales the perturbation as ASAM does (``T^2 * m / ||T * m||``, ``T = |w| + eta``), an extension of
the paper's method; moving back from it needs the weights themselves, so it keeps one parameter-sized copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any

import torch

from .. import _amp, _watch, backends
from .._plan import accumulate_dtype, check_gradient, check_no_shared_memory, is_dtensor, param_name
from .._step_plan import check_nonnegative
from ..backends import _layout as L
from ..backends import reference
from ..backends._multi_tensor import (
    MultiTensorBackend,
    _aligned,
    _chunk_list,
    _rows_table,
    _upload,
    gradient_mismatch,
)
from ..backends._updates import flat_like, fused_update_for
from ..optim import _check_base_optimizer, _class_name, _options_on_load, check_no_duplicates

__all__ = ["MSAM"]

_OWN_GROUP_KEYS = ("rho", "eta", "adaptive")
_params_of = itemgetter("params")
_BASES = (torch.optim.SGD, torch.optim.AdamW, torch.optim.Adam)  # the authors' SGD and AdamW, and Adam


@dataclass
class MomentumJob:
    """One (device, dtype) bucket of an MSAM step: the tensors with a gradient, their state (``s1``: SGD's momentum
    buffer or Adam's ``exp_avg``; ``s2``, ``s3``: ``exp_avg_sq``, ``max_exp_avg_sq``), the copies of ``w`` kept for
    the move back (``buffers``, adaptive tensors: ``copy``), per tensor its param group (``group``), ``adaptive`` and
    ``eta``; per param group ``rho`` and the fused update's ``hyper`` row; ``factors`` (a device tensor, one per
    group, in the accumulate dtype): the factor ``a`` of the perturbation in place."""

    device: torch.device
    dtype: torch.dtype
    kind: str
    copy: bool
    eps: float
    factors: torch.Tensor
    keys: list[torch.Tensor] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    s1: list[torch.Tensor] = field(default_factory=list)
    s2: list[torch.Tensor | None] = field(default_factory=list)
    s3: list[torch.Tensor | None] = field(default_factory=list)
    buffers: list[torch.Tensor | None] = field(default_factory=list)
    group: list[int] = field(default_factory=list)
    adaptive: list[bool] = field(default_factory=list)
    eta: list[float] = field(default_factory=list)
    rho: list[float] = field(default_factory=list)
    hyper: list[list[float]] = field(default_factory=list)


class _TorchOps:
    """A job run tensor by tensor with torch ops (``reference``'s formulas): every backend without MSAM kernels, and
    what the kernels cannot take."""

    kernels = 0

    def __init__(self, job: MomentumJob, name: str) -> None:
        self.job, self.name = job, name

    def upload(self, hyper_changed: bool, options: bool = False) -> None:
        pass

    def update(self) -> torch.Tensor:
        return reference.msam_update_(self.job)

    def refresh_gradients(self, grads: list[torch.Tensor]) -> bool:
        """The per-tensor path takes the gradients as they are each step (their shape, dtype and device checked)."""
        if any(g.layout != torch.strided or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device
               for g, p in zip(grads, self.job.params, strict=True)):
            return False
        self.job.grads = grads
        return True

    def perturb(self, total: torch.Tensor) -> None:
        reference.msam_perturb_(self.job, total)


class _Kernels:
    """A job on a backend's multi-tensor kernels: ``msam_sgd`` / ``msam_adam`` (move back, update, the new norm's
    partial sums) and ``msam_perturb``, bound once over tables the job's tensors fill."""

    def __init__(self, job: MomentumJob, backend: MultiTensorBackend) -> None:
        launcher, dev = backend.launcher, job.device
        self.job, self.name = job, backend.name
        acc = accumulate_dtype(job.dtype)
        rows = [i for i, p in enumerate(job.params) if p.numel() > 0]
        self.kernels, self._rows, self.launcher = len(job.params), rows, launcher
        numels = [job.params[i].numel() for i in rows]
        tab = self._table()
        self.rows_d = tab.to(dev)
        chunks = _chunk_list(numels, range(len(rows)), launcher.chunk)
        self.count = len(chunks)
        self.chunks_d = torch.tensor(chunks, dtype=torch.int32).reshape(-1, 2).to(dev)
        n_groups = len(job.rho)
        self.opts_d = torch.zeros((n_groups, L.NOPT), dtype=acc, device=dev)
        self.hyper_d = torch.zeros((n_groups, L.NHYPER), dtype=torch.float32, device=dev)
        self.partials = torch.empty(max(1, self.count), dtype=acc, device=dev)
        self.counter = torch.zeros(1, dtype=torch.int32, device=dev)
        self.share = torch.zeros((), dtype=acc, device=dev)
        self.sq_in = self.share
        self._bind(tab)
        self.upload(True, options=True)

    def _table(self) -> torch.Tensor:
        """The host rows table: W, G, B (the kept copies, with copy), S1..S3."""
        job, rows = self.job, self._rows
        cols = [[job.params[i] for i in rows], [job.grads[i] for i in rows],
                [job.buffers[i] for i in rows] if job.copy else [None] * len(rows), [job.s1[i] for i in rows],
                [job.s2[i] for i in rows], [job.s3[i] for i in rows]]
        flags = [(job.group[i] << L.OPT_SHIFT) | (job.group[i] << L.HYPER_SHIFT) for i in rows]
        return _rows_table(cols, [job.params[i].numel() for i in rows], flags)

    def _bind(self, tab: torch.Tensor) -> None:
        job, launcher = self.job, self.launcher
        self._update = self._perturb = None
        if not self.count:
            return
        kernel = "msam_sgd" if job.kind == "sgd" else "msam_adam"
        copy_col = (L.COL_B,) if job.copy else ()
        read = (L.COL_W, L.COL_G, L.COL_S1, *copy_col) + ((L.COL_S2,) if job.kind == "adam" else ())
        self._update = launcher.bind(kernel, self.count, (self.rows_d, self.chunks_d, self.hyper_d, self.opts_d,
                                                          job.factors, self.partials, self.counter, self.share),
                                     job.dtype, _aligned(tab, read), job.copy)
        self._perturb = launcher.bind("msam_perturb", self.count, (self.rows_d, self.chunks_d, self.opts_d,
                                                                   self.sq_in, job.factors), job.dtype,
                                      _aligned(tab, (L.COL_W, L.COL_S1, *copy_col)), job.copy)

    def refresh_gradients(self, grads: list[torch.Tensor]) -> bool:
        """The gradients moved (``zero_grad(set_to_none=True)``, then a backward pass): rewrite their column and bind
        again, if each is still a dense gradient of its parameter laid out like it (else False: a new plan)."""
        job = self.job
        if any(gradient_mismatch(g, p) for g, p in zip(grads, job.params, strict=True)):
            return False
        job.grads = grads
        tab = self._table()
        _upload(self.rows_d, tab, "gradient addresses")
        self._bind(tab)
        return True

    def upload(self, hyper_changed: bool, options: bool = False) -> None:
        """The hyper table from the job's rows (each step for Adam: its bias corrections move); with ``options`` the
        opts table too (eta, rho, adaptive, eps per group)."""
        job = self.job
        if hyper_changed:
            host = torch.tensor(job.hyper, dtype=torch.float32).reshape(-1, L.NHYPER)
            _upload(self.hyper_d, host, "hyper-parameters", False)
        if options:
            opts = [[0.0] * L.NOPT for _ in job.rho]
            for i in self._rows:
                o = opts[job.group[i]]
                o[L.OPT_ETA], o[L.OPT_ADAPTIVE] = job.eta[i], float(job.adaptive[i])
            for gi, rho in enumerate(job.rho):
                opts[gi][L.OPT_RHO], opts[gi][L.OPT_EPS] = rho, job.eps
            _upload(self.opts_d, torch.tensor(opts, dtype=self.opts_d.dtype).reshape(-1, L.NOPT),
                    "rho, eta or adaptive option")

    def update(self) -> torch.Tensor:
        if self._update is not None:
            self._update()
        else:
            self.share.zero_()
        return self.share

    def perturb(self, total: torch.Tensor) -> None:
        if self._perturb is None:
            return
        if total is not self.sq_in:
            self.sq_in.copy_(total)
        self._perturb()


class MSAM(torch.optim.Optimizer):
    """Momentum-SAM: sharpness-aware steps along the momentum, one forward/backward a step.

    Args:
        params: parameters or param groups; groups may set ``rho``, ``eta`` and ``adaptive``.
        base_optimizer: ``torch.optim.SGD`` (with ``momentum > 0``, no dampening, not nesterov: the authors'
            update), ``torch.optim.AdamW`` (the authors' AdamW: its decoupled weight decay after the update) or
            ``torch.optim.Adam`` (its L2 weight decay taken at the gradient's point, as SGD's).
        rho: the perturbation's radius (>= 0; the paper's ImageNet runs use 3 with SGD, 1 with AdamW).
        adaptive: scale the perturbation by ``T^2`` and normalise by ``||T * m||``, ``T = |w| + eta`` (ASAM's
            scaling applied to MSAM, an extension); keeps one copy of the weights for the move back.
        eta: added to ``|w|`` in adaptive tensors (>= 0).
        norm_eps: added to the momentum's norm (the authors': 1e-12).
        backend: ``"auto"`` or a name of ``fastasam.available_backends()``.
        base_optimizer_kwargs: options for the base optimizer whose names clash with this class's.
        **base_kwargs: the base optimizer's options (``lr``, ``momentum``, ``weight_decay``, ``betas``, ...).

    ``step()`` mutates the parameters (from ``w~`` to the next ``w~``) and the base optimizer's state. ``param_groups``
    and ``state`` are the base optimizer's; ``state_dict()`` adds the perturbation's factor per group (and, adaptive,
    the kept copies), so that a reload continues the same trajectory bit for bit with the weights saved as they are
    between steps (``w~``). Refused at construction with the fix: ``rho``/``eta``/``norm_eps`` not a finite number
    >= 0, SGD without momentum or with dampening or nesterov, another base optimizer, a parameter listed twice.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float = 0.3,
        adaptive: bool = False,
        eta: float = 0.01,
        norm_eps: float = 1e-12,
        backend: str = "auto",
        base_optimizer_kwargs: Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        _check_base_optimizer(base_optimizer)
        if base_optimizer not in _BASES:
            raise TypeError(
                f"fastasam: MSAM steps with torch.optim.SGD (momentum > 0), torch.optim.AdamW or torch.optim.Adam, "
                f"got {base_optimizer.__name__}. Use one of them; for other base optimizers use fastasam.ASAM or "
                "fastasam.SAM."
            )
        check_nonnegative("rho", rho)
        check_nonnegative("eta", eta)
        check_nonnegative("norm_eps", norm_eps)
        backends.check_name(backend)
        self._backend, self.norm_eps = backend, float(norm_eps)
        super().__init__(params, dict(rho=rho, eta=eta, adaptive=bool(adaptive)))
        base = base_optimizer(self.param_groups, **{**base_kwargs, **(base_optimizer_kwargs or {})})
        clash = set(_OWN_GROUP_KEYS) & set(base.defaults)
        if clash:
            raise ValueError(f"fastasam: {base_optimizer.__name__} has its own option(s) {sorted(clash)}.")
        self.base_optimizer = base
        self.param_groups = base.param_groups
        self.__dict__.pop("_state_before_base", None)
        self.defaults.update(base.defaults)
        self._kind = "sgd" if base_optimizer is torch.optim.SGD else "adam"
        self._update_rule = fused_update_for(base)  # its hyper rows: what the fused update of this base reads
        for i, group in enumerate(self.param_groups):
            self._check_group(group, i)
        self._plan: _Plan | None = None
        self._factors: dict[int, float] = {}  # param group -> the factor in place (from a checkpoint, until planned)
        self._buffers: dict[torch.Tensor, torch.Tensor] = {}  # adaptive: the kept copies of w, by parameter
        self.grad_norm: torch.Tensor | None = None  # the momentum's (scaled) norm of the last step, on the device
        self.perturbation_skipped: torch.Tensor | None = None  # that norm was not finite: nothing perturbed

    # --- validation ---------------------------------------------------------------------------------------------

    def _check_group(self, group: dict, index: int) -> None:
        where = f" in param_groups[{index}]"
        check_nonnegative("rho", group["rho"], where)
        check_nonnegative("eta", group["eta"], where)
        if self._kind == "sgd":
            if not group["momentum"] > 0:
                raise ValueError(
                    f"fastasam: MSAM perturbs along SGD's momentum buffer, but param_groups[{index}] has momentum="
                    f"{group['momentum']!r}. Pass momentum > 0 (e.g. momentum=0.9), or use fastasam.SAM for SGD "
                    "without momentum."
                )
            if group["dampening"] != 0 or group["nesterov"]:
                raise ValueError(
                    f"fastasam: MSAM's SGD step is the authors' (momentum, no dampening, not nesterov); param_groups"
                    f"[{index}] has dampening={group['dampening']!r}, nesterov={group['nesterov']!r}. Pass dampening=0 "
                    "and nesterov=False."
                )
        for key in ("differentiable",):
            if group.get(key):
                raise ValueError(f"fastasam: MSAM does not support {key}=True{where}; leave it False.")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group["params"] = params
        check_no_duplicates(params, f"param_groups[{len(self.param_groups)}]")
        base = self.__dict__.get("base_optimizer")
        if base is None:
            super().add_param_group(param_group)
            return
        for key in _OWN_GROUP_KEYS:
            param_group.setdefault(key, self.defaults[key])
        base.add_param_group(param_group)
        self._check_group(self.param_groups[-1], len(self.param_groups) - 1)

    @property
    def state(self) -> Any:
        """The base optimizer's ``state`` (assignable, as :attr:`fastasam.ASAM.state`)."""
        base = self.__dict__.get("base_optimizer")
        return self.__dict__["_state_before_base"] if base is None else base.state

    @state.setter
    def state(self, value: Any) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:
            self.__dict__["_state_before_base"] = value
        else:
            base.state = value

    @property
    def backend(self) -> str:
        """The backend(s) that ran the last step (``"cpu"``, ``"triton"``, ...; several joined by ``"+"``)."""
        if self._plan is None:
            devices = dict.fromkeys(p.device for g in self.param_groups for p in g["params"])
            return "+".join(dict.fromkeys(backends.resolve(self._backend, d).name for d in devices)) or self._backend
        return "+".join(dict.fromkeys(r.name for r in self._plan.runners))

    @property
    def requested_backend(self) -> str:
        return self._backend

    # --- the step -------------------------------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One MSAM step with the gradients of the last backward pass (taken at ``w~``): move back to ``w``, the base
        optimizer's update, the new perturbation. ``closure`` (optional) runs forward and backward first and its
        loss is returned. Under ``torch.amp.GradScaler`` (``scaler.step(opt)``) the gradients are unscaled first and
        a step whose gradients hold an inf/NaN is skipped whole (the weights stay at ``w~``). Mutates the
        parameters and the base optimizer's state; the gradients are not modified."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if "found_inf" in self.__dict__ and not self._unscale_for_scaler():
            return loss
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            plan = self._plan
            if plan is None or not plan.holds(self):
                plan = self._plan = _Plan(self)
            plan.run(self)
        finally:
            torch._C._set_grad_enabled(enabled)
        return loss

    def _unscale_for_scaler(self) -> bool:
        """``scaler.step(opt)``: unscale the gradients (unless ``unscale_`` did) and tell whether the step runs (one
        host read of the overflow flag, as GradScaler itself makes for optimizers without fused scaling)."""
        grad_scale, found_inf = self.__dict__["grad_scale"], self.__dict__["found_inf"]
        if bool(torch.as_tensor(found_inf).item()):
            return False
        if grad_scale is not None:
            _amp.unscale_gradients(self.param_groups, grad_scale)
        return True

    _step_supports_amp_scaling = True  # GradScaler hands grad_scale / found_inf to step() (see _unscale_for_scaler)

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Inside, the parameters hold ``w`` (the weights of the last step, before its perturbation): evaluate or save
        the weights themselves there. On exit they hold ``w~`` again, bit for bit. A step inside is refused."""
        plan = self._plan
        if plan is None or self._inside:
            yield
            return
        saved = [p.detach().clone() for job in plan.jobs for p in job.params]
        self._inside = True
        try:
            with torch.no_grad():
                for job in plan.jobs:
                    reference.msam_move_back_(job)
            yield
        finally:
            with torch.no_grad():
                for p, s in zip((p for job in plan.jobs for p in job.params), saved, strict=True):
                    p.copy_(s)
            self._inside = False

    _inside = False

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict()`` plus ``"fastasam"``: the base optimizer's class, the perturbation's
        factor per param group and (adaptive) the kept copies of the weights, by parameter index. Save the model's
        weights as they are between steps (``w~``, outside :meth:`unperturbed`) beside it for a bit-exact resume."""
        if self._inside:
            raise RuntimeError(
                "fastasam: MSAM.state_dict() inside unperturbed(): the parameters hold w there, and a resume needs "
                "the weights as they are between steps (w~). Save the optimizer's and the model's state outside it."
            )
        state = self.base_optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(chain.from_iterable(map(_params_of, self.param_groups)))}
        own: dict[str, Any] = {"base_optimizer": _class_name(type(self.base_optimizer)),
                               "factors": self._current_factors()}
        if self._buffers:
            own["kept"] = {index[id(p)]: b.clone() for p, b in self._buffers.items() if id(p) in index}
        state["fastasam"] = own
        return state

    def _current_factors(self) -> list[float]:
        plan = self._plan
        if plan is None or not plan.jobs:
            return [float(self._factors.get(i, 0.0)) for i in range(len(self.param_groups))]
        return [float(x) for x in plan.jobs[0].factors.double().cpu().tolist()]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state of this class (or of the plain base optimizer: no perturbation in place then). Refuses the
        state of another base optimizer class."""
        state_dict = dict(state_dict)
        own = state_dict.pop("fastasam", None) or {}
        recorded, mine = own.get("base_optimizer"), _class_name(type(self.base_optimizer))
        same = recorded is None or recorded == mine or recorded.endswith("." + type(self.base_optimizer).__qualname__)
        if not same:
            raise ValueError(
                f"fastasam: this state was saved by a fastasam optimizer around {recorded}, but this MSAM steps with "
                f"{mine}. Build the optimizer with the base optimizer the state was saved with, or do not load it."
            )
        if recorded is None:
            for i, group in enumerate(state_dict.get("param_groups", ())):
                missing = sorted(set(self.base_optimizer.defaults) - set(_options_on_load(type(self.base_optimizer),
                                                                                          group)))
                if missing:
                    raise ValueError(f"fastasam: param_groups[{i}] of this state has no option(s) {missing}: it is "
                                     f"not a state of {type(self.base_optimizer).__name__}.")
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for key in _OWN_GROUP_KEYS:
                group.setdefault(key, self.defaults[key])
        params = list(chain.from_iterable(map(_params_of, self.param_groups)))
        self._factors = dict(enumerate(float(x) for x in own.get("factors", ())))
        self._buffers = {params[int(i)]: b.to(params[int(i)].device).clone() for i, b in own.get("kept", {}).items()}
        self._plan = None

    def __getstate__(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        if self._plan is not None:
            out["_factors"] = dict(enumerate(self._current_factors()))
        out["_plan"] = None
        return out


class _Plan:
    """The jobs of one structure of param groups, their runners and the watch a warm step checks (see
    :class:`MomentumJob`); built when the structure, the options or the tensors' places change."""

    def __init__(self, opt: MSAM) -> None:
        groups, base = opt.param_groups, opt.base_optimizer
        self.groups, self.group_ids = groups, list(map(id, groups))
        self.sizes = [len(g["params"]) for g in groups]
        self.params = list(chain.from_iterable(map(_params_of, groups)))
        self.state = base.state
        self.options, self.structure = self._options(opt), self._structure(opt)
        rule, kind = opt._update_rule, opt._kind
        old = opt.__dict__.get("_plan")
        factors_now = opt._current_factors() if old is None else [float(x) for x in old.jobs[0].factors.double()
                                                                 .cpu().tolist()] if old.jobs else []
        if len(factors_now) != len(groups):
            factors_now = [float(opt._factors.get(i, 0.0)) for i in range(len(groups))]
        jobs: dict[tuple, MomentumJob] = {}
        self.absent: list[torch.Tensor] = []
        for gi, group in enumerate(groups):
            reason = rule.group_reason(group)
            if reason is not None:
                raise ValueError(f"fastasam: MSAM cannot step param_groups[{gi}]: {reason}.")
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    self.absent.append(p)
                    continue
                if is_dtensor(p):
                    raise TypeError(f"fastasam: {param_name(group, gi, pi)} is a DTensor; MSAM does not step DTensor "
                                    "parameters (FSDP2). Use fastasam.ASAM or fastasam.SAM there.")
                check_gradient(p, p.grad, param_name(group, gi, pi))
                key = (p.device, p.dtype)
                job = jobs.get(key)
                if job is None:
                    acc = accumulate_dtype(p.dtype)
                    job = jobs[key] = MomentumJob(
                        device=p.device, dtype=p.dtype, kind=kind, copy=False, eps=opt.norm_eps,
                        factors=torch.tensor(factors_now, dtype=acc, device=p.device).reshape(len(groups)))
                state = base.state[p]
                s1, s2, s3 = self._state_of(p, state, group, kind)
                adaptive = bool(group["adaptive"])
                job.keys.append(p)
                job.params.append(p)
                job.grads.append(p.grad)
                job.s1.append(s1)
                job.s2.append(s2)
                job.s3.append(s3)
                job.group.append(gi)
                job.adaptive.append(adaptive)
                job.eta.append(float(group["eta"]))
                if adaptive:
                    buf = opt._buffers.get(p)
                    if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                        buf = opt._buffers[p] = p.detach().clone(memory_format=torch.preserve_format)
                    job.buffers.append(buf)
                else:
                    job.buffers.append(None)
        self.jobs = list(jobs.values())
        for job in self.jobs:
            job.copy = any(job.adaptive)
            if job.copy:  # every tensor of a job with copies moves back from one (adaptive or not)
                for i, p in enumerate(job.params):
                    if job.buffers[i] is None:
                        job.buffers[i] = opt._buffers.setdefault(
                            p, p.detach().clone(memory_format=torch.preserve_format))
            job.rho = [float(g["rho"]) for g in groups]
        check_no_shared_memory(self.jobs, groups)  # type: ignore[arg-type]
        self.steps: dict[int, torch.Tensor] = {}
        if kind == "adam":  # one step count per param group (views of one CPU tensor, as the fused Adam update)
            by_group: dict[int, list[dict]] = {}
            for job in self.jobs:
                for k, gi in zip(job.keys, job.group, strict=True):
                    by_group.setdefault(gi, []).append(base.state[k])
            for gi, states in by_group.items():
                counts = {float(st["step"]) for st in states}
                if len(counts) > 1:
                    raise ValueError(f"fastasam: the parameters of param_groups[{gi}] have different Adam step counts "
                                     f"{sorted(counts)}; MSAM steps a group with one count. Reset their state.")
                self.steps[gi] = rule.steps_for(states)
        self._hyper_rows(opt, ahead=1)
        self.runners = [self._runner(job, opt._backend) for job in self.jobs]
        self.watch = self._watch(base.state)
        self.others = [r for r in self.runners if not isinstance(r, _Kernels)]
        self.single = len(self.runners) == 1

    @staticmethod
    def _state_of(p: torch.Tensor, state: dict, group: dict, kind: str) -> tuple:
        """The state tensors MSAM steps with, made as the authors' code makes them (zeros) where missing."""
        if kind == "sgd":
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return state["momentum_buffer"], None, None
        if len(state) == 0:
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=dtype)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq") if group["amsgrad"] else None

    def _runner(self, job: MomentumJob, requested: str):
        module = backends.resolve(requested, job.device)
        host = getattr(module, "_BACKEND", None)
        launcher = getattr(host, "launcher", None)
        if (isinstance(host, MultiTensorBackend) and job.dtype in launcher.fused_dtypes
                and all(flat_like(p, p) and gradient_mismatch(g, p) is None and all(
                    t is None or (t.dtype == p.dtype and flat_like(t, p))
                    for t in (job.s1[i], job.s2[i], job.s3[i], job.buffers[i]))
                        for i, (p, g) in enumerate(zip(job.params, job.grads, strict=True)))):
            return _Kernels(job, host)
        return _TorchOps(job, module.name if module.name == "reference" else f"{module.name} (torch ops)")

    def _options(self, opt: MSAM) -> list[tuple]:
        """Every option a step reads, per group (compared each step: a change is uploaded, or re-plans when it
        changes the plan's structure, :meth:`_structure`)."""
        keys = opt._update_rule.options
        return [(g["rho"], g["eta"], g["adaptive"], *map(g.get, keys)) for g in opt.param_groups]

    def _structure(self, opt: MSAM) -> list[tuple]:
        rule = opt._update_rule
        return [(bool(g["adaptive"]), rule.group_reason(g), rule.structure(g)) for g in opt.param_groups]

    def _refresh_options(self, opt: MSAM) -> bool:
        """The options changed: check them, upload rho, eta and the hyper rows; False when the structure changed
        (adaptive, amsgrad, ...: a new plan)."""
        if self._structure(opt) != self.structure:
            return False
        for i, group in enumerate(opt.param_groups):
            opt._check_group(group, i)
        self.options = self._options(opt)
        self._hyper_rows(opt, ahead=1)
        for job in self.jobs:
            job.rho = [float(g["rho"]) for g in opt.param_groups]
            job.eta = [float(opt.param_groups[gi]["eta"]) for gi in job.group]
        for r in self.runners:
            r.upload(True, options=True)
        return True

    def _hyper_rows(self, opt: MSAM, ahead: int = 0) -> None:
        """Each group's hyper row, for Adam at its step count plus ``ahead`` (the count the coming step will have,
        where it is not counted yet)."""
        rule = opt._update_rule
        rows = []
        for gi, group in enumerate(opt.param_groups):
            counter = self.steps.get(gi)
            step = float(counter[0]) + ahead if counter is not None and len(counter) else 1.0
            rows.append(rule.hyper_row(group, step))
        for job in self.jobs:
            job.hyper = rows

    # --- each step ----------------------------------------------------------------------------------------------

    def holds(self, opt: MSAM) -> bool:
        """Nothing this plan relies on changed: the same param groups and options, the base optimizer's state dict,
        and the tensors where the watch expects them (one pass). rho, eta and the base optimizer's hyper-parameters
        changing re-plan too (a step's structure stays cheap: these change rarely)."""
        groups = opt.param_groups
        if groups is not self.groups or list(map(id, groups)) != self.group_ids:
            return False
        if [len(g["params"]) for g in groups] != self.sizes or not _watch.same_params(groups, self.params):
            return False
        if opt.base_optimizer.state is not self.state:
            return False
        if self._options(opt) != self.options and not self._refresh_options(opt):
            return False
        grads = self.watch.check()
        if grads is None:
            if not self._refresh_gradients(opt):
                return False
            grads = self.watch.check()
            if grads is None:
                return False
        if self.others:
            it = iter(grads)
            for r in self.others:
                r.job.grads = [next(it) for _ in r.job.keys]
                r.job.s1, r.job.s2, r.job.s3 = map(list, zip(*(
                    _Plan._state_of(p, opt.base_optimizer.state[p], opt.param_groups[gi], opt._kind)
                    for p, gi in zip(r.job.keys, r.job.group, strict=True)))) if r.job.keys else ([], [], [])
        return True

    def _refresh_gradients(self, opt: MSAM) -> bool:
        """After a failed watch: the parameters and the state are as they were and the same tensors have gradients;
        only where the gradients are changed. Rewrites the runners' tables and the watch; False: plan again."""
        watch = self.watch
        if not (watch.params_intact() and watch.state_intact()) or any(p.grad is not None for p in self.absent):
            return False
        for r in self.runners:
            grads = [k.grad for k in r.job.keys]
            if any(g is None for g in grads) or not r.refresh_gradients(grads):
                return False
        self.watch = self._watch(opt.base_optimizer.state)
        return True

    def _watch(self, state: dict):
        """The watch over the kernel jobs' tensors (their parameters, gradients and state), the torch-op jobs'
        (that they have a gradient) and the tensors without a gradient."""
        kernels = [r for r in self.runners if isinstance(r, _Kernels)]
        keys = [k for r in kernels for k in r.job.keys]
        rows = [[t for t in (j.s1[i], j.s2[i], j.s3[i]) if t is not None] for j in (r.job for r in kernels)
                for i in range(len(j.keys))]
        others = [k for r in self.runners if not isinstance(r, _Kernels) for k in r.job.keys]
        contiguous = [i for i, k in enumerate(keys) if k.is_contiguous()]
        strided = [i for i, k in enumerate(keys) if not k.is_contiguous()]
        return _watch.watch([keys[i] for i in contiguous], [keys[i] for i in strided], others, [], self.absent,
                            check_params=True, state=state if keys else None,
                            state_tensors=[rows[i] for i in contiguous + strided] if keys else None)

    def run(self, opt: MSAM) -> None:
        if self.steps:  # Adam: count the step, new bias corrections
            for counter in self.steps.values():
                counter.add_(1)
            self._hyper_rows(opt)
            for r in self.runners:
                r.upload(True)
        shares = [r.update() for r in self.runners]
        if self.single:
            total = shares[0]
        else:
            acc = torch.float64 if any(s.dtype == torch.float64 for s in shares) else torch.float32
            main = self.jobs[0].device
            total = torch.stack([s.to(main, acc) for s in shares]).sum()
        for r in self.runners:
            r.perturb(total if total.device == r.job.device else total.to(r.job.device))
        opt.grad_norm = total.sqrt()
        opt.perturbation_skipped = ~torch.isfinite(opt.grad_norm)

