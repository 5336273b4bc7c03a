"""LookSAM's and GSAM's decompositions on the multi-tensor kernels (used by ``fastasam.variants``).

Each step of these variants needs global sums over two parameter-sized vectors, a gradient ``G`` and the variant's
kept buffer ``K`` (the first pass's ``g``, or LookSAM's ``g_v``), and one elementwise combination of the two. On the
multi-tensor backends (``cpu``, ``triton``, ``cuda``) that is two launches per (device, dtype) bucket:

* ``dots``: the three sums ``(G*G, G*K, K*K)``, products in fp32 (fp64 for fp64 storage), sums in fp64, reduced
  deterministically (per-chunk partials, summed in a fixed order) and left on the device;
* ``combine``: derives its two coefficients from those sums (and ``alpha``) on the device, in fp64, and rewrites
  ``G`` (LookSAM's one-pass direction, GSAM's direction) or ``K`` (LookSAM's ``g_v``; keeping ``g`` is a copy).

Nothing is read on the host, so no step synchronises with the device. A two-pass step asks the step plan to run them
(:class:`Direction`: the copy of ``g`` with the first step, the second step's decomposition with the fused update):
the plan runs them over its own tables, which its one pass over the gradients confirms, when its kernels take every
tensor with a gradient. Everywhere else (a one-pass LookSAM step; the base optimizer stepping some tensors;
GradScaler; DTensors) :class:`Decomposer` builds tables of its own per phase of the step (``"first"``: the first
pass's gradients; ``"second"``: the second pass's; ``"one"``: a one-pass step's), confirmed each step by a watch of
their own (``_watch``: one pass over the parameters in C++) and the param groups' identity; a moved gradient or a
changed set of parameters rebuilds that phase's tables, a replaced buffer (``invalidate``) all of them.

DTensor parameters (FSDP2) are served as their local shards, bucketed by the process groups of their Shard mesh dims;
each such bucket's sums are all-reduced over those groups (on the device) before the combination.

When the kernels cannot serve a step, :meth:`Decomposer.build` returns the reason instead (a backend without
multi-tensor kernels, a dtype its kernels lack, parameters on several devices, a gradient in one pass only, a
gradient laid out unlike its buffer) and the variant runs its own ``foreach`` / per-tensor path, which computes the
same formulas (the ``reference`` backend's per-tensor path is the oracle the kernels are tested against).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import chain

import torch

from . import _watch, backends
from ._plan import check_not_capturing, indices_by_key, is_dtensor, local_gradient, shard_groups, sum_over
from .backends import _layout as L
from .backends._multi_tensor import MultiTensorBackend, _aligned, _chunk_list, _rows_table
from .backends._updates import flat_like

KEEP, LOOK_FULL, LOOK_ONE, GSAM = L.COMBINE_KEEP, L.COMBINE_LOOK_FULL, L.COMBINE_LOOK_ONE, L.COMBINE_GSAM


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Element i of ``a``'s memory is element i of ``b``'s, both dense."""
    return a.shape == b.shape and flat_like(a, b) and flat_like(b, a)


class _Bucket:
    """One (device, dtype) bucket of one phase: its rows table (G = the gradients, K = the buffers), chunks and the
    bound launches."""

    def __init__(self, launcher, dtype: torch.dtype, grads: list[torch.Tensor], bufs: list[torch.Tensor],
                 out: torch.Tensor, sums: torch.Tensor, alpha: torch.Tensor, over: tuple) -> None:
        self.launcher, self.dtype, self.over = launcher, dtype, over
        keep = [i for i, g in enumerate(grads) if g.numel() > 0]
        grads, bufs = [grads[i] for i in keep], [bufs[i] for i in keep]
        numels = [g.numel() for g in grads]
        columns: list[list] = [[None] * len(grads) for _ in range(L.NCOL)]
        columns[L.COL_G], columns[L.COL_K] = grads, bufs
        tab = _rows_table(columns, numels, [0] * len(grads))
        dev = out.device
        self.rows_d = tab.to(dev)
        chunks = _chunk_list(numels, range(len(grads)), launcher.chunk)
        self.n_chunks = len(chunks)
        self.chunks_d = torch.tensor(chunks, dtype=torch.int32).reshape(-1, 2).to(dev)
        self.aligned = _aligned(tab, (L.COL_G, L.COL_K))
        self.partials = torch.empty(3 * max(1, self.n_chunks), dtype=torch.float64, device=dev)
        self.counter = torch.zeros(1, dtype=torch.int32, device=dev)
        self.out, self.sums, self.alpha = out, sums, alpha
        self._combine: dict[int, object] = {}
        self._dots = None
        if self.n_chunks:
            self._dots = launcher.bind("dots", self.n_chunks, (self.rows_d, self.chunks_d, self.partials,
                                                               self.counter, out), dtype, self.aligned, False)
        else:
            out.zero_()

    def dots(self) -> None:
        if self._dots is not None:
            self._dots()
        sum_over(self.out, self.over)  # local shards of DTensors: their sums add up over the shard groups

    def combine(self, mode: int) -> None:
        if not self.n_chunks:
            return
        launch = self._combine.get(mode)
        if launch is None:
            launch = self._combine[mode] = self.launcher.bind(
                "combine", self.n_chunks, (self.rows_d, self.chunks_d, self.sums, self.alpha), self.dtype,
                self.aligned, False, mode=mode)
        launch()


class PhaseTables:
    """The kernels' view of one phase: a bucket per (device, dtype), the global sums, the watch."""

    def __init__(self, backend: str, params: list[torch.Tensor], watch, buckets: list[_Bucket],
                 outs: torch.Tensor, sums: torch.Tensor, dtensors: list[torch.Tensor]) -> None:
        self.backend, self.params, self.watch = backend, params, watch
        self.buckets, self.outs, self.sums = buckets, outs, sums
        self.served = f"{backend} kernels"
        # DTensor parameters: the watch sees that they have a gradient; their local shards' places are checked here
        self.dtensors = dtensors
        self.local_places = self._local_places()

    def _local_places(self) -> list[tuple]:
        out = []
        for p in self.dtensors:
            g = local_gradient(p, p.grad)
            out.append((g.data_ptr(), g.stride()))
        return out

    def valid(self, groups: list[Mapping]) -> bool:
        if not (_watch.same_params(groups, self.params) and self.watch.check() is not None):
            return False
        return not self.dtensors or self._local_places() == self.local_places

    def dots(self) -> None:
        """The global sums ``(G*G, G*B, B*B)`` into ``sums`` (on the device)."""
        for b in self.buckets:
            b.dots()
        if len(self.buckets) > 1:  # several dtypes: each bucket's sums, then one fixed-order sum
            torch.sum(self.outs, 0, out=self.sums)

    def combine(self, mode: int) -> None:
        for b in self.buckets:
            b.combine(mode)


class Direction:
    """A decomposition the second step asks of the step plan: ``mode`` (``GSAM``: the fused restore + update steps
    along GSAM's direction; ``LOOK_FULL``: LookSAM's ``g_v`` into the kept buffers, then the plain update) over the
    gradients and the ``kept`` buffers. The update plan runs it over its own tables when its fused update takes every
    tensor with a gradient (``UpdatePlan.run_direction``: its one pass over the gradients confirms them); else
    ``apply`` (the variant's method) runs it before the restore, on this module's tables or as torch ops."""

    __slots__ = ("mode", "kept", "version", "dec", "alpha", "apply")

    def __init__(self, dec: Decomposer, mode: int, kept: Mapping, alpha: float, apply: Callable[[], None]) -> None:
        self.dec, self.mode, self.kept, self.alpha, self.apply = dec, mode, kept, alpha, apply
        self.version = dec.version

    def alpha_on(self, device: torch.device) -> torch.Tensor:
        """``alpha`` as the fp64 device scalar the launches read (one per device, set in place)."""
        return self.dec.alpha_on(device, self.alpha)

    def served_by(self, backend: str) -> None:
        """The step plan's kernels ran it (for ``report().direction``)."""
        self.dec.last = f"{backend} kernels" + (", fused into the restore + update" if self.mode == GSAM else "")


class Decomposer:
    """The tables of one optimizer, per phase, built when first needed and reused while nothing moves."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.version = 0  # bumped when the buffers are replaced (the fused update's K column follows it)
        self._phases: dict[str, PhaseTables] = {}
        self._alpha: dict[torch.device, torch.Tensor] = {}  # fp64 device scalars the combine launches read
        self._alpha_value: dict[torch.device, float] = {}
        self.last = "no step has run yet"  # what served the last decomposition (``report``)

    def invalidate(self) -> None:
        """The buffers were replaced: every phase's tables point at the old ones."""
        self._phases.clear()
        self.version += 1

    def ready(self, phase: str, groups: list[Mapping], alpha: float) -> PhaseTables | None:
        """This phase's tables when they are still valid (warm step), else None."""
        t = self._phases.get(phase)
        if t is None or not t.valid(groups):
            return None
        self.alpha_on(t.sums.device, alpha)
        self.last = t.served
        return t

    def alpha_on(self, device: torch.device, alpha: float) -> torch.Tensor:
        """The fp64 scalar on ``device`` the launches read, holding ``alpha`` (written only when it changed)."""
        t = self._alpha.get(device)
        if t is None:
            t = self._alpha[device] = torch.zeros(1, dtype=torch.float64, device=device)
            self._alpha_value.pop(device, None)
        if self._alpha_value.get(device) != alpha:
            t.fill_(alpha)
            self._alpha_value[device] = alpha
        return t

    def build(self, phase: str, groups: list[Mapping], buffers: Mapping[torch.Tensor, torch.Tensor],
              alpha: float) -> PhaseTables | str:
        """Build this phase's tables over the parameters with a gradient and their ``buffers``; or why the kernels
        cannot serve it (the variant then runs its per-tensor path; ``last`` says so)."""
        self._phases.pop(phase, None)
        params = list(chain.from_iterable(g["params"] for g in groups))
        with_grad = [p for p in params if p.grad is not None]
        absent = [p for p in params if p.grad is None]
        local = {p: local_gradient(p, p.grad) if is_dtensor(p) else p.grad for p in with_grad}
        module, reason = self._served_by(with_grad, local, buffers)
        if reason is not None:
            self.last = f"torch ops: {reason}"
            return reason
        check_not_capturing({p.device for p in with_grad}, f"the tables of the {phase} phase")
        device = with_grad[0].device
        launcher = module._BACKEND.launcher
        alpha_d = self.alpha_on(device, alpha)
        # one bucket per (dtype, shard groups): the same on every rank, so the all-reduces pair up
        by_key = indices_by_key([(p.dtype, shard_groups(p)) for p in with_grad])
        outs = torch.zeros((len(by_key), 3), dtype=torch.float64, device=device)
        sums = outs[0] if len(by_key) == 1 else torch.zeros(3, dtype=torch.float64, device=device)
        buckets = [_Bucket(launcher, dtype, [local[with_grad[j]] for j in idx], [buffers[with_grad[j]] for j in idx],
                           outs[i], sums, alpha_d, over) for i, ((dtype, over), idx) in enumerate(by_key.items())]
        plain = [p for p in with_grad if not is_dtensor(p)]
        dtensors = [p for p in with_grad if is_dtensor(p)]
        contiguous = [p for p in plain if p.grad.is_contiguous()]
        strided = [p for p in plain if not p.grad.is_contiguous()]
        w = _watch.watch(contiguous, strided, [], dtensors, absent, True)
        t = self._phases[phase] = PhaseTables(module.name, params, w, buckets, outs, sums, dtensors)
        self.last = t.served
        return t

    def _served_by(self, with_grad: list[torch.Tensor], local: Mapping[torch.Tensor, torch.Tensor],
                   buffers: Mapping[torch.Tensor, torch.Tensor]) -> tuple[object, str | None]:
        """(the backend module whose kernels serve these tensors, None), or (None, why none can)."""
        if not with_grad:
            return None, "no parameter has a gradient"
        if len(buffers) != len(with_grad) or any(p not in buffers for p in with_grad):
            return None, "the parameters with a gradient differ between the two passes"
        devices = {p.device for p in with_grad}
        if len(devices) > 1:
            return None, "the parameters are on several devices"
        module = backends.resolve(self.backend, next(iter(devices)))
        backend = getattr(module, "_BACKEND", None)
        if not isinstance(backend, MultiTensorBackend):
            return None, f"the {module.name} backend has no multi-tensor kernels"
        dtypes = backend.launcher.dtypes
        for p in with_grad:
            g, b = local[p], buffers[p]
            if p.dtype not in dtypes:
                return None, f"no {module.name} kernel for {str(p.dtype).replace('torch.', '')}"
            if g.dtype != p.dtype or b.dtype != g.dtype or b.device != g.device:
                return None, "a gradient or buffer of another dtype or device than its parameter"
            if not _same_layout(g, b):
                return None, "a gradient laid out unlike its kept buffer"
        return module, None
