"""``fastasam.ASAM`` and ``fastasam.SAM``: sharpness-aware minimisation around any ``torch.optim`` optimizer."""

from __future__ import annotations

import inspect
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from itertools import chain, repeat
from operator import attrgetter, is_, is_not, itemgetter
from typing import Any

import torch
from torch import nn

from . import _amp
from ._engine import SharpnessEngine, check_nonnegative
from ._plan import accumulate_dtype
from .report import StepReport

_OWN_GROUP_KEYS = ("rho", "eta", "adaptive")
_params_of = itemgetter("params")
_grad_of = attrgetter("grad")
_not_none = partial(is_not, None)
_deref = weakref.ref.__call__


class _Default(float):
    """A default argument value that an explicit argument of the same value can be told from (by identity)."""

    __slots__ = ()


_NORM_EPS = _Default(1e-12)  # the default of ``eps`` and ``norm_eps``: the epsilon added to the global norm


class _Gone:
    pass


_DEAD = weakref.ref(_Gone())  # a dead reference: what a gradient the last step(closure) did not leave is compared to


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _takes_eps(base_optimizer: type[torch.optim.Optimizer]) -> bool:
    """Whether the base optimizer's constructor has an ``eps`` option (Adam, AdamW, RMSprop, Adagrad, ...)."""
    try:
        return "eps" in inspect.signature(base_optimizer.__init__).parameters
    except (TypeError, ValueError):
        return False


def _norm_eps(eps: float, norm_eps: float, base_optimizer: type[torch.optim.Optimizer]) -> float:
    """The epsilon added to the global norm, from ``eps`` (the community sam.py's name) or ``norm_eps``: ``eps`` only
    where it cannot be read as the base optimizer's own ``eps``."""
    if eps is _NORM_EPS:
        check_nonnegative("norm_eps", norm_eps)
        return float(norm_eps)
    if norm_eps is not _NORM_EPS:
        raise ValueError(
            f"fastasam: both eps={eps!r} and norm_eps={norm_eps!r} given; both name the epsilon added to the global "
            "gradient norm. Pass norm_eps= only."
        )
    if _takes_eps(base_optimizer):
        name = base_optimizer.__name__
        raise ValueError(
            f"fastasam: eps={eps!r} is ambiguous: {name} has an eps option of its own (its denominator's epsilon), "
            f"and fastasam's eps is the epsilon added to the global gradient norm. For {name}'s, pass "
            f"base_optimizer_kwargs={{'eps': {eps!r}}}; for the norm's, pass norm_eps={eps!r}."
        )
    check_nonnegative("eps", eps)
    return float(eps)


def check_no_duplicates(params: list, where: str) -> None:
    """Raise a ``ValueError`` when a parameter appears more than once in ``params`` (tensors, or ``(name, tensor)``
    pairs as ``named_parameters()`` yields them): it would count twice in the norm and be perturbed twice."""
    tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
    if len(set(map(id, tensors))) == len(tensors):
        return
    positions: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        positions.setdefault(id(t), []).append(i)
    repeats = [at for at in positions.values() if len(at) > 1]
    listed = "; ".join(" and ".join(map(str, at)) for at in repeats)
    raise ValueError(
        f"fastasam: {where} lists the same parameter more than once (at positions {listed} of its 'params'); it "
        "would count twice in the gradient norm and be perturbed twice. List each parameter once, e.g. "
        "list(dict.fromkeys(params)), or pass model.parameters(), which yields a shared parameter once."
    )


def _tensor_of(p: Any) -> Any:
    """The tensor of a ``params`` entry: a tensor, or a ``(name, tensor)`` pair as ``named_parameters()`` yields."""
    return p[1] if isinstance(p, tuple) and len(p) == 2 else p


def _as_param_list(param_group: dict[str, Any]) -> list:
    """``param_group["params"]`` as a list, as ``torch.optim.Optimizer.add_param_group`` makes it (a set is left to
    torch, which refuses it)."""
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
        params = param_group["params"] = [params]
    elif not isinstance(params, (list, set)):
        params = param_group["params"] = list(params)
    return params if isinstance(params, list) else []


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
        eps: the community sam.py's name for ``norm_eps``, accepted when the base optimizer has no ``eps`` option of
            its own (``torch.optim.SGD``). With a base optimizer that has one (``torch.optim.Adam``, ``AdamW``,
            ``RMSprop``, ...) an explicit ``eps`` would be ambiguous and is refused: pass ``norm_eps`` for the norm's,
            ``base_optimizer_kwargs={"eps": ...}`` for the base optimizer's. Giving both ``eps`` and ``norm_eps`` is
            an error.
        norm_eps: added to the global norm (a finite number >= 0; default 1e-12).
        restore: ``"copy"`` saves ``w`` and copies it back (bit-exact, like the community sam.py) or
            ``"subtract"`` saves ``e`` and subtracts it (like the official asam.py). Either keeps one buffer
            per parameter.
        backend: ``"auto"`` or a name from ``fastasam.available_backends()``. A named backend that cannot run on
            a device the parameters are on raises a ``RuntimeError`` here (and in ``add_param_group``), naming the
            backend, the device and the fix. ``opt.backend`` then says which backend ran (see there);
            ``opt.requested_backend`` is this argument.
        every: perturb on every ``every``-th step only (Composer's interval SAM); the other steps are plain base
            optimizer steps on the one pass's gradient. ``opt.second_pass_needed`` says which (default 1: always).
        use_gc: gradient centralization of the ascent (pytorch_optimizer's ``use_gc``): before ``first_step``'s norm,
            each gradient of more than one dimension has its mean over all dimensions but the first subtracted, in
            place (``g <- g - mean(g, dims 1..)``); 0- and 1-dimensional gradients (biases) are left as they are.
            Only the perturbation sees it: the base optimizer steps with the second pass's gradient as it is. With
            the default ``False`` a step does nothing for it.
        base_optimizer_kwargs: options for the base optimizer whose names clash with this class's (``eps`` of Adam).
        **base_kwargs: the base optimizer's options (``lr``, ``momentum``, ``weight_decay``, ...).

    ``param_groups`` and ``state`` are the base optimizer's own, so LR schedulers, ``state_dict`` and per-group
    options work as with the base optimizer alone. After ``first_step``, ``grad_norm`` holds the global norm and
    ``perturbation_skipped`` whether it was inf/NaN (then nothing was perturbed); both are device tensors.

    Refused with a ``ValueError`` (they would change the algorithm without a sign): a parameter listed twice in a
    param group (here and in ``add_param_group``), a ``rho``, ``eta`` or ``norm_eps`` that is not a finite number
    >= 0 (also a group's ``rho``/``eta`` changed later: the next ``first_step`` raises before writing anything),
    an ambiguous ``eps`` (above), and in ``load_state_dict`` the state of another base optimizer class.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float = 0.5,
        eta: float = 0.01,
        adaptive: bool = True,
        eps: float = _NORM_EPS,
        norm_eps: float = _NORM_EPS,
        restore: str = "copy",
        backend: str = "auto",
        every: int = 1,
        use_gc: bool = False,
        base_optimizer_kwargs: Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        _check_base_optimizer(base_optimizer)
        check_nonnegative("rho", rho)
        check_nonnegative("eta", eta)
        norm_eps = _norm_eps(eps, norm_eps, base_optimizer)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"fastasam: every must be an int >= 1 (perturb on every k-th step), got {every!r}.")
        self.every = every
        self.use_gc = bool(use_gc)
        if self.use_gc:  # the hook before the norm; without it a step pays nothing for the option
            self._transforms_first_gradient = True
        self._steps_done = 0  # completed steps (second_step calls): which step perturbs; in state_dict when every > 1
        self._engine = SharpnessEngine(backend=backend, eps=norm_eps, restore=restore)
        super().__init__(params, dict(rho=rho, eta=eta, adaptive=bool(adaptive)))
        base = base_optimizer(self.param_groups, **{**base_kwargs, **(base_optimizer_kwargs or {})})
        clash = set(_OWN_GROUP_KEYS) & set(base.defaults)
        if clash:
            raise ValueError(
                f"fastasam: {base_optimizer.__name__} has its own option(s) {sorted(clash)}, which would share a "
                "param-group key with ASAM's; this base optimizer is not supported."
            )
        if eps is not _NORM_EPS and "eps" in base.defaults:  # an eps taken through **kwargs: ambiguous as well
            raise ValueError(
                f"fastasam: eps={eps!r} is ambiguous: {base_optimizer.__name__} has an eps option of its own. For "
                f"its, pass base_optimizer_kwargs={{'eps': {eps!r}}}; for the global norm's, pass norm_eps={eps!r}."
            )
        self.base_optimizer = base
        self.param_groups = base.param_groups
        self.__dict__.pop("_state_before_base", None)  # from here on ``state`` is the base optimizer's
        self.defaults.update(base.defaults)
        # a param group added through the base optimizer (base.add_param_group) takes these when the next step plans
        self._engine.group_defaults = {k: self.defaults[k] for k in _OWN_GROUP_KEYS}

    @property
    def state(self) -> Any:
        """The base optimizer's ``state`` (a ``defaultdict`` keyed by parameter). Assigning to it replaces the base
        optimizer's (``opt.state = defaultdict(dict)`` resets every tensor's state, as for a torch optimizer); the
        next step plans again from the state as it is."""
        base = self.__dict__.get("base_optimizer")
        return self.__dict__["_state_before_base"] if base is None else base.state

    @state.setter
    def state(self, value: Any) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:  # torch.optim.Optimizer.__init__, before the base optimizer exists
            self.__dict__["_state_before_base"] = value
        else:
            base.state = value

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` keep: the configuration, the base optimizer (its state included) and
        the step counter; not the step plan (addresses and device tables), which the copy builds on its first step.
        Refused between ``first_step`` and ``second_step`` (the weights then hold ``w + e``)."""
        self._check_not_perturbed("copy.deepcopy() or pickle")
        out = dict(self.__dict__)
        for transient in self._TRANSIENT:
            out.pop(transient, None)
        return out

    _TRANSIENT = ("_left_grads", "_deferred", "_dec", "_scalers")  # rebuilt when needed (weak references, tables)

    # --- the public API -----------------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend that ran the last step (``"cpu"``, ``"triton"``, ...; after ``first_step``, the step in
        progress), not the requested name: with ``backend="auto"`` on CPU tensors, ``"cpu"`` (or ``"foreach"``
        where the CPU extension is not built). Buckets on several devices that ran on different backends give their
        names joined by ``"+"`` in bucket order (``"triton+cpu"``); ``opt.report()`` has the detail per bucket.
        Before the first step: what the requested backend resolves to for the parameters' devices."""
        return self._engine.backend_ran(self.param_groups)

    @property
    def requested_backend(self) -> str:
        """The ``backend`` argument as given (``"auto"`` or a backend's name)."""
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
        if self._transforms_first_gradient:  # use_gc, FriendlySAM's direction, WSAM's record: before the norm
            self._transform_first_gradient()
        if self._scalers:  # not looked for yet, or a GradScaler is known: see fastasam._amp
            self._amp_before_first_step()
        keep = self._first_gradient_keep() if self._keeps_first_gradient else None
        self._engine.first_step(self.param_groups, keep)
        if zero_grad:
            self.zero_grad()

    def second_step(self, zero_grad: bool = False) -> None:
        """Descent: restore ``w``, then the base optimizer steps with the current gradients (second pass). On a step
        that does not perturb (``second_pass_needed`` False): the base optimizer's step on the one pass's gradient."""
        if self._descent_direction():
            deferred = self._deferred  # LookSAM's / GSAM's decomposition, run by the step plan
            if deferred is not None:
                self._deferred = None
            self._engine.restore_and_step(self.base_optimizer, deferred)  # no first_step when one was needed: raises
        else:
            self.base_optimizer.step()
        if torch.compiler.is_compiling():  # dynamo (2.11) cannot trace an attribute set on an optimizer
            _count_step(self)
        else:
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
        scaler = _amp.calling_scaler()
        if scaler is not None:
            self._know_scaler(scaler)
            if grad_scale is None and _amp.unscaled_nothing(scaler, self):  # unscale_ ran before the second backward
                found_inf = _amp.unscale_now(scaler, self)
        first = None
        if self._descent_direction():
            deferred, self._deferred = self._deferred, None
            if deferred is not None:  # the base optimizer steps on the gradients: the direction goes into them
                if self._first_pass_unscaled != (grad_scale is None):  # unscale_ ran on one pass only
                    self._rescale_first_gradient(grad_scale, scaler)
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
                _amp.unscale_gradients(self.param_groups, grad_scale)
            if not skip.item():
                base.step()
        self._steps_done += 1
        self._opt_called = True

    ascent_step = first_step
    descent_step = second_step

    _first_pass_unscaled = False  # scaler.unscale_(opt) ran on this step's first pass (before first_step)

    def _rescale_first_gradient(self, grad_scale: torch.Tensor | None, scaler: Any) -> None:
        """``scaler.unscale_(opt)`` ran on one of the two passes only: bring what the variant kept of the first
        pass's gradient (LookSAM's, GSAM's buffer) into the scale of the second's before the direction combines
        them. Only for variants that keep it (``_keeps_first_gradient``)."""

    _scalers: Any = [None]  # the GradScalers this optimizer knows (weak references); this truthy value: not looked yet

    @torch.compiler.disable  # it scans the garbage collector's objects and reads GradScaler's records
    def _amp_before_first_step(self) -> None:
        if self._scalers is ASAM._scalers:
            self._scalers = _amp.find_scalers()
        if self._scalers:
            self._first_pass_unscaled = _amp.before_first_step(self._scalers, self)

    def _know_scaler(self, scaler) -> None:
        known = [] if self._scalers is ASAM._scalers else list(self._scalers)
        if not any(ref() is scaler for ref in known):
            self._scalers = [*known, weakref.ref(scaler)]

    _deferred = None  # the variants' second-step decomposition for the step plan (fastasam._decompose.Direction)

    # True where first_step must change the first pass's gradient before the norm: ``use_gc=True`` (set on the
    # instance), FriendlySAM's direction, WSAM's record of the gradients' scale. False: no call, no work.
    _transforms_first_gradient = False

    def _transform_first_gradient(self) -> None:
        """Before the ascent's norm (and before a GradScaler's record is read): turn the first pass's ``.grad`` into
        the gradient the ascent uses. Here: gradient centralization when ``use_gc``. Mutates ``.grad``."""
        if self.use_gc:
            centralize_gradients(self.param_groups)

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

    _keeps_first_gradient = False  # the descent needs the first pass's gradient (LookSAM, GSAM)

    def _first_gradient_keep(self):
        """What the descent will need of the first pass's gradient, asked of the step plan with the ascent
        (``fastasam._decompose.Direction``); only when ``_keeps_first_gradient``."""
        raise NotImplementedError

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
        """Both passes with ``closure``, which runs forward and backward and returns the loss. Two loops work:

        * torch.optim's: no backward before ``step(closure)``; the closure runs twice (the first pass, then the second
          at ``w + e``); returns the first pass's loss;
        * the community sam.py's (and pytorch_optimizer's): ``loss.backward(); opt.step(closure)``: the gradients
          present are the first pass's, and the closure runs once, for the second pass; returns its loss.

        Which one is told from tensor identities on the host (no value is read): a gradient that the previous
        ``step(closure)`` left in ``.grad`` (its second pass's, zeroed in place or not, as under
        ``zero_grad(set_to_none=False)`` or a Lightning loop) is not a first pass: those are set to ``None`` and the
        closure runs both passes. Any other gradient present is the first pass's. Refused with a ``RuntimeError``,
        nothing run: some parameters holding a new gradient and others one left by the last step (a first pass that
        would be part stale). On a step that does not perturb (``every > 1``) the one pass is the present gradients'
        or the closure's.

        Without a closure after ``first_step()``, ``step()`` is ``second_step()`` (for training loops that call
        ``optimizer.step()`` once, such as Hugging Face's Trainer; see ``fastasam.hf``). If the closure raises in the
        second pass (at ``w + e``), the weights are restored to ``w`` and the exception is re-raised: the optimizer's
        state is as before the step, and the next ``step(closure)`` runs normally.

        Mutates the parameters, their ``.grad`` and the base optimizer's state.
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
        first_pass_given = self._take_present_gradients()
        if first_pass_given and _from_lightning(closure):
            raise RuntimeError(
                "fastasam: Lightning's automatic optimization called step(closure) with gradients already in .grad: "
                "gradient accumulation (accumulate_grad_batches > 1), where the ascent would use the accumulated "
                "gradient but the second pass rerun only the last micro-batch at w + e. Use accumulate_grad_batches=1, "
                "or manual optimization (fastasam.lightning's manual_step, which accumulates over both passes)."
            )
        try:
            loss = None
            if not first_pass_given:
                with torch.enable_grad():
                    loss = closure()
            if not self.second_pass_needed:  # every > 1: a plain base step on this step
                self.second_step()
                return loss
            self.first_step(zero_grad=True)
            try:
                with torch.enable_grad():
                    second = closure()
            except BaseException:
                self._abandon_step()
                raise
            self.second_step()
            return second if first_pass_given else loss
        finally:  # also after an error: the next step(closure) drops what this one left in .grad
            self._remember_left_gradients()

    _left_grads: dict[int, weakref.ref] = {}  # id -> reference of each gradient the last step(closure) left

    def _all_params(self) -> list[torch.Tensor]:
        return list(chain.from_iterable(map(_params_of, self.param_groups)))

    def _remember_left_gradients(self) -> None:
        """Weak references to the gradients this step(closure) leaves (they keep no memory alive)."""
        grads = list(filter(_not_none, map(_grad_of, self._all_params())))
        self._left_grads = dict(zip(map(id, grads), map(weakref.ref, grads)))

    def _take_present_gradients(self) -> bool:
        """Before step(closure): True when the gradients present are a first pass (sam.py's loop: none of them left
        by the last step(closure)); the left ones are set to None (the closure then runs both passes). C-level
        passes over the parameters, no Python call per tensor."""
        params = self._all_params()
        present = list(filter(_not_none, map(_grad_of, params)))
        if not present:
            return False
        left = self._left_grads
        is_left = list(map(is_, present, map(_deref, map(left.get, map(id, present), repeat(_DEAD)))))
        if not any(is_left):
            return True
        if not all(is_left):
            fresh = len(is_left) - sum(is_left)
            raise RuntimeError(
                f"fastasam: step(closure) found new gradients in .grad on {fresh} parameter(s) and the gradients the "
                f"last step(closure) left on {sum(is_left)}: as the first pass of the community sam.py's loop "
                "(backward, then opt.step(closure)) they would be part stale. Call opt.zero_grad() before that "
                "backward (or after each step), or remove the backward before opt.step(closure) to let the closure "
                "run both passes."
            )
        deque(map(setattr, params, repeat("grad"), repeat(None)), maxlen=0)
        return False

    def _abandon_step(self) -> None:
        """The second pass raised: back to ``w`` (restore), with no descent direction left pending."""
        self._deferred = None
        if self._engine.perturbed:
            self._engine.restore("restore only: the second pass raised in step(closure)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where = f"param_groups[{len(self.param_groups)}]"
        params = _as_param_list(param_group)
        check_no_duplicates(params, where)
        self._engine.check_devices(t.device for t in map(_tensor_of, params) if isinstance(t, torch.Tensor))
        for key in ("rho", "eta"):
            if key in param_group:
                check_nonnegative(key, param_group[key], f" in {where}")
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
        """The base optimizer's ``state_dict()`` plus ``"fastasam"``: the base optimizer's class (``"module.Name"``)
        and, where they matter, which step perturbs next (``every > 1``) and LookSAM's ``g_v``. The base optimizer's
        own ``load_state_dict`` ignores that key, so the plain base optimizer can load this state."""
        self._check_not_perturbed("state_dict()")
        state = self.base_optimizer.state_dict()
        state["fastasam"] = {"base_optimizer": _class_name(type(self.base_optimizer)), **self._own_state()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state of this class, or of the plain base optimizer (then ``rho``, ``eta`` and ``adaptive`` take
        this optimizer's defaults). A state of another base optimizer class is refused with a ``ValueError`` before
        anything is loaded: by the class recorded in ``state_dict()["fastasam"]``, or, for a state without it (a
        plain torch optimizer's), by the param groups' options, which must include every option of this base
        optimizer."""
        self._check_not_perturbed("load_state_dict()")
        state_dict = dict(state_dict)
        own = state_dict.pop("fastasam", None) or {}
        self._check_base_optimizer_state(state_dict, own.get("base_optimizer"))
        self._load_own_state(own)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:  # a checkpoint of the plain base optimizer has no ASAM options
            for key in _OWN_GROUP_KEYS:
                group.setdefault(key, self.defaults[key])

    def _check_base_optimizer_state(self, state_dict: Mapping[str, Any], recorded: str | None) -> None:
        base = self.base_optimizer
        mine = _class_name(type(base))
        if recorded is not None:  # the same class; or one of that name from another module (__main__ at saving)
            if recorded != mine and not recorded.endswith("." + type(base).__qualname__):
                raise ValueError(
                    f"fastasam: this state was saved by a fastasam optimizer around {recorded}, but this "
                    f"{type(self).__name__} steps with {mine}; the base optimizer's state and options would not fit "
                    f"it. Build the optimizer with the base optimizer the state was saved with ({recorded}), or do "
                    "not load the state."
                )
            return
        for i, group in enumerate(state_dict.get("param_groups", ())):
            missing = sorted(set(base.defaults) - set(_options_on_load(type(base), group)))
            if missing:
                raise ValueError(
                    f"fastasam: param_groups[{i}] of this state has no option(s) {missing}, which "
                    f"{type(base).__name__} (this {type(self).__name__}'s base optimizer, {mine}) needs: it is not "
                    f"a state of {type(base).__name__}. Load a state saved by {type(base).__name__} or by a fastasam "
                    "optimizer around it, or build this optimizer with the base optimizer the state was saved with."
                )


def _from_lightning(closure: Any) -> bool:
    """Whether ``closure`` is Lightning's (its automatic optimization hands step() a partial of its precision
    plugin's closure wrapper): Lightning calls step(closure) with gradients present only when accumulating."""
    for obj in (closure, getattr(closure, "func", None), getattr(getattr(closure, "func", None), "__self__", None)):
        module = getattr(type(obj), "__module__", "") if obj is not None else ""
        if module.startswith(("lightning.", "pytorch_lightning.")):
            return True
    return False


def _options_on_load(cls: type[torch.optim.Optimizer], group: Mapping[str, Any]) -> dict[str, Any]:
    """The options a saved param group has once ``cls.load_state_dict`` took it: the group's own, plus those that
    ``cls.__setstate__`` fills in for states saved before an option existed (SGD's ``fused``, Adam's
    ``decoupled_weight_decay``, ...). Run on an empty probe, nothing of the optimizer is touched."""
    probe_group = {**{k: v for k, v in group.items() if k != "params"}, "params": []}
    try:
        probe = cls.__new__(cls)
        cls.__setstate__(probe, {"state": {}, "param_groups": [probe_group], "defaults": {}})
    except Exception:  # an optimizer whose __setstate__ needs more: its group's own options only
        pass
    return probe_group


@torch.compiler.disable
def _count_step(opt: ASAM) -> None:
    """``second_step``'s bookkeeping, run outside a compiled graph: count the step, and tell LR schedulers that the
    optimizer stepped."""
    opt._steps_done += 1
    opt._opt_called = True


class SAM(ASAM):
    """Sharpness-Aware Minimization (Foret et al.): :class:`ASAM` with nothing adaptive. ``eps``/``norm_eps``,
    ``base_optimizer_kwargs`` and the refusals are :class:`ASAM`'s: with a base optimizer that has an ``eps`` of its
    own (Adam), pass ``norm_eps=`` for the norm's epsilon and ``base_optimizer_kwargs={"eps": ...}`` for Adam's."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float = 0.05,
        eps: float = _NORM_EPS,
        norm_eps: float = _NORM_EPS,
        restore: str = "copy",
        backend: str = "auto",
        every: int = 1,
        use_gc: bool = False,
        base_optimizer_kwargs: Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params, base_optimizer, rho=rho, eta=0.0, adaptive=False, eps=eps, norm_eps=norm_eps, restore=restore,
            backend=backend, every=every, use_gc=use_gc, base_optimizer_kwargs=base_optimizer_kwargs, **base_kwargs,
        )


@torch.no_grad()
def centralize_gradients(groups: Iterable[Mapping[str, Any]]) -> None:
    """Gradient centralization (Yong et al., ECCV 2020; pytorch_optimizer's ``centralize_gradient`` with
    ``gc_conv_only=False``): every gradient of more than one dimension gets ``g <- g - mean(g, dims 1..)``, computed in
    fp32 (fp64 for fp64) and rounded once. Mutates ``.grad`` in place (an expanded gradient, which cannot be written
    element by element, is replaced by a dense copy first)."""
    for group in groups:
        for p in group["params"]:
            g = p.grad
            if g is None or g.dim() < 2 or g.numel() == 0:
                continue
            if any(st == 0 and n > 1 for n, st in zip(g.shape, g.stride())):
                g = p.grad = g.clone(memory_format=torch.contiguous_format)
            acc = accumulate_dtype(g.dtype)
            g32 = g.to(acc)
            g.copy_(g32 - g32.mean(dim=tuple(range(1, g.dim())), keepdim=True))


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
