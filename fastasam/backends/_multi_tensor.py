"""The host side of the multi-tensor backends (``triton``, ``cuda``): describing a bucket to the kernels, caching that
description, splitting off what the kernels cannot take, and the fused restore + base-optimizer update.

Both backends' kernels read the same two device tables:

* the tensor table, ``int64[N, NCOL]``, one row per tensor: the addresses of the parameter, its gradient, the restore
  buffer and up to three optimizer-state tensors, the element count and a flags word (bit 0: adaptive; bit 1: the
  optimizer state is new this step; bits 8..: index of the tensor's scale);
* the chunk table, ``int32[C, 2]``: (tensor row, chunk number). Program/block ``pid`` handles elements
  ``[chunk * CHUNK, min((chunk + 1) * CHUNK, numel))`` of its tensor, so a 2-element bias and a 2M-element
  convolution weight are scheduled alike and one launch covers the whole model.

Tables are built on the host once and cached under the addresses they hold: while parameters, gradients, buffers and
optimizer state stay where they are (the caching allocator usually hands ``zero_grad(set_to_none=True)``'s new
gradients the same addresses), a step launches kernels and builds nothing; when an address changes the table is
rebuilt. Tensors the kernels cannot treat as one flat run of memory (a non-contiguous leaf, or a gradient whose
strides differ from its parameter's) and storage dtypes a backend's kernels lack go to ``foreach`` inside the same
step, so every bucket is served.

A backend supplies a :class:`Kernels` object (how to launch each phase) and gets a :class:`MultiTensorBackend` whose
methods are the backend interface. ``torch.compile`` does not trace them (they read addresses, which it cannot, and
the kernels are already one launch per phase): a compiled training step runs them as they are, between its graphs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .._plan import Bucket, accumulate_dtype, subset
from . import foreach

# the tables' layout; the Triton kernels import these, csrc/multi_tensor.h repeats them (a test compares)
COL_W, COL_G, COL_B, COL_S1, COL_S2, COL_S3, COL_NUMEL, COL_FLAGS = range(8)
NCOL = 8
FLAG_ADAPTIVE = 1
FLAG_FRESH_STATE = 2
SCALE_SHIFT = 8
_CACHE_SIZE = 32


@dataclass
class Plan:
    """One bucket as the kernels see it (the tables on the bucket's device). ``rest`` marks the bucket's tensors
    left to foreach (None: none are)."""

    tab: torch.Tensor
    etas: torch.Tensor
    chunks: torch.Tensor
    n_chunks: int
    aligned: bool
    rest: list[bool] | None
    group_chunks: list[tuple[int, int, int]]  # (group index, first chunk, end chunk), in table order; never empty
    partials: torch.Tensor | None = None
    counter: torch.Tensor | None = None


def _flat(t: torch.Tensor, like: torch.Tensor) -> bool:
    """True when ``t`` covers its memory densely, laid out exactly like ``like`` (element i of one is element i of
    the other)."""
    if t.is_contiguous() and like.is_contiguous():
        return True
    return t.shape == like.shape and t.stride() == like.stride() and _dense(t)


def _dense(t: torch.Tensor) -> bool:
    """The elements of ``t`` fill ``numel`` consecutive memory slots, each once (any dimension order)."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


class Kernels(Protocol):
    """How a backend launches each phase on a :class:`Plan` (``plan.n_chunks > 0``). ``copy``: restore mode."""

    def sqnorm(self, bucket: Bucket, plan: Plan, out: torch.Tensor) -> None: ...

    def perturb(self, bucket: Bucket, plan: Plan, scales: torch.Tensor, copy: bool) -> None: ...

    def restore(self, bucket: Bucket, plan: Plan, copy: bool) -> None: ...

    def sgd(self, bucket: Bucket, plan: Plan, first: int, count: int, group: dict, copy: bool) -> None: ...

    def adam(self, bucket: Bucket, plan: Plan, first: int, count: int, group: dict, step: float, decoupled: bool,
             copy: bool) -> None: ...


class MultiTensorBackend:
    """The backend interface (``grad_sqnorm``, ``perturb_``, ``restore_``, ``prepare_fused_step``) over ``kernels``,
    for storage ``dtypes``, with chunks of ``chunk`` elements."""

    def __init__(self, name: str, kernels: Kernels, dtypes: Sequence[torch.dtype], chunk: int) -> None:
        self.name, self.kernels, self.dtypes, self.chunk = name, kernels, frozenset(dtypes), chunk
        self._cache: OrderedDict[tuple, Plan] = OrderedDict()

    # --- tables --------------------------------------------------------------------------------------------------

    def plan(self, kind: str, bucket: Bucket, columns: Sequence[Sequence[torch.Tensor | None]],
             flags: Sequence[int]) -> Plan:
        """The cached plan for these tensors: ``columns[c][i]`` is the tensor for table column ``c`` of bucket row
        ``i`` (column 0 the parameter; ``None`` = unused)."""
        key_rows = []
        for i, p in enumerate(columns[0]):
            key_rows.append((*(t.data_ptr() if t is not None else 0 for t in (c[i] for c in columns)), p.numel(),
                             flags[i], bucket.eta[i] if bucket.adaptive[i] else 0.0, bucket.group[i]))
        key = (kind, bucket.device, bucket.dtype, tuple(key_rows))
        plan = self._cache.get(key)
        if plan is not None:
            self._cache.move_to_end(key)
            return plan
        plan = self._cache[key] = self._build(bucket, columns, flags)
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return plan

    def _build(self, bucket: Bucket, columns: Sequence[Sequence[torch.Tensor | None]], flags: Sequence[int]) -> Plan:
        params = columns[0]
        rows, rest = [], [False] * len(params)
        for i, p in enumerate(params):
            if p.dtype not in self.dtypes or not all(c[i] is None or _flat(c[i], p) for c in columns):
                rest[i] = True
            elif p.numel() > 0:
                rows.append(i)
        tab = torch.zeros((len(rows), NCOL), dtype=torch.int64)
        chunks: list[tuple[int, int]] = []
        group_chunks: list[tuple[int, int, int]] = []
        aligned = True
        for r, i in enumerate(rows):
            for c, col in enumerate(columns):
                t = col[i]
                if t is not None:
                    tab[r, c] = t.data_ptr()
                    aligned &= t.data_ptr() % 16 == 0
            n = params[i].numel()
            tab[r, COL_NUMEL] = n
            tab[r, COL_FLAGS] = flags[i]
            first = len(chunks)
            chunks.extend((r, k) for k in range(math.ceil(n / self.chunk)))
            g = bucket.group[i]
            if group_chunks and group_chunks[-1][0] == g:
                group_chunks[-1] = (g, group_chunks[-1][1], len(chunks))
            else:
                group_chunks.append((g, first, len(chunks)))
        etas = torch.tensor([bucket.eta[i] for i in rows], dtype=accumulate_dtype(bucket.dtype))
        chunk_tab = torch.tensor(chunks, dtype=torch.int32).reshape(-1, 2)
        dev = bucket.device
        return Plan(
            tab=tab.to(dev), etas=etas.to(dev), chunks=chunk_tab.to(dev), n_chunks=len(chunks), aligned=aligned,
            rest=rest if any(rest) else None, group_chunks=group_chunks,
        )

    # --- the backend interface -----------------------------------------------------------------------------------

    @torch.compiler.disable
    def grad_sqnorm(self, bucket: Bucket) -> torch.Tensor:
        plan = self.plan("norm", bucket, (bucket.params, bucket.grads), _adaptive_flags(bucket))
        acc = accumulate_dtype(bucket.dtype)
        if plan.n_chunks == 0:
            total = torch.zeros((), dtype=acc, device=bucket.device)
        else:
            if plan.counter is None:
                plan.partials = torch.empty(plan.n_chunks, dtype=acc, device=bucket.device)
                plan.counter = torch.zeros(1, dtype=torch.int32, device=bucket.device)
            total = torch.empty((), dtype=acc, device=bucket.device)
            self.kernels.sqnorm(bucket, plan, total)
        if plan.rest:
            total = total + foreach.grad_sqnorm(subset(bucket, plan.rest))
        return total

    @torch.compiler.disable
    def perturb_(self, bucket: Bucket, restore: str) -> None:
        scales, index = _scales(bucket)
        flags = [a | (k << SCALE_SHIFT) for a, k in zip(_adaptive_flags(bucket), index, strict=True)]
        plan = self.plan("perturb", bucket, (bucket.params, bucket.grads, bucket.buffers), flags)
        bucket.plan = plan
        if plan.n_chunks:
            self.kernels.perturb(bucket, plan, scales.to(accumulate_dtype(bucket.dtype)), restore == "copy")
        if plan.rest:
            foreach.perturb_(subset(bucket, plan.rest), restore)

    @torch.compiler.disable
    def restore_(self, bucket: Bucket, restore: str) -> None:
        plan: Plan = bucket.plan  # type: ignore[assignment]
        if plan.n_chunks:
            self.kernels.restore(bucket, plan, restore == "copy")
        if plan.rest:
            foreach.restore_(subset(bucket, plan.rest), restore)

    @torch.compiler.disable
    def prepare_fused_step(self, bucket: Bucket, groups: list[int], base: torch.optim.Optimizer,
                           restore: str) -> Callable[[], None] | None:
        """A function that restores the bucket and applies ``base``'s update to it in one pass, or None when this
        bucket or optimizer needs the unfused path. ``groups[i]`` is the index of the ``base.param_groups`` entry
        holding tensor ``i``. Nothing is changed until the returned function runs."""
        kind = _fused_kind(base)
        if kind is None or bucket.dtype not in self.dtypes or bucket.dtype == torch.float64:
            return None
        if kind == "adam" and bucket.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # the bias corrections are host numbers a graph would freeze; torch's capturable Adam does it
        bucket = replace(bucket, group=groups)
        grads = []
        for p, buf in zip(bucket.params, bucket.buffers, strict=True):
            g = p.grad
            if g is None or g.layout != torch.strided or not _state_ok(g, p) or not _flat(buf, p):
                return None
            grads.append(g)
        state = base.state
        names = ("momentum_buffer",) if kind == "sgd" else ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        for p in bucket.params:
            st = state.get(p, {})
            if not all(_state_ok(st.get(n), p) for n in names):
                return None
        if kind == "adam":  # the bias corrections are computed once per group: one step count per group
            for rows in _rows_by_group(bucket).values():
                steps = [state.get(bucket.params[i], {}).get("step") for i in rows]
                if all(s is None for s in steps):
                    continue
                if any(not isinstance(s, torch.Tensor) or s.device.type != "cpu" or s.numel() != 1 for s in steps):
                    return None
                if len(steps) > 1 and not bool(torch.stack(steps).eq(steps[0]).all()):
                    return None
        step = self._sgd_step if kind == "sgd" else self._adam_step
        return lambda: step(bucket, base, grads, restore == "copy")

    @torch.compiler.disable
    def _sgd_step(self, bucket: Bucket, base: torch.optim.Optimizer, grads: list[torch.Tensor], copy: bool) -> None:
        n = len(bucket.params)
        moms: list[torch.Tensor | None] = [None] * n
        flags = [0] * n
        for gi, rows in _rows_by_group(bucket).items():
            if base.param_groups[gi]["momentum"] == 0:
                continue
            for i in rows:
                st = base.state[bucket.params[i]]
                if st.get("momentum_buffer") is None:  # torch.optim.SGD's first step: the buffer starts as d_p
                    st["momentum_buffer"] = torch.empty_like(bucket.params[i])
                    flags[i] = FLAG_FRESH_STATE
                moms[i] = st["momentum_buffer"]
        plan = self.plan("sgd", bucket, (bucket.params, grads, bucket.buffers, moms), flags)
        for gi, first, end in plan.group_chunks:
            if end > first:
                self.kernels.sgd(bucket, plan, first, end - first, base.param_groups[gi], copy)

    @torch.compiler.disable
    def _adam_step(self, bucket: Bucket, base: torch.optim.Optimizer, grads: list[torch.Tensor], copy: bool) -> None:
        n = len(bucket.params)
        cols: list[list[torch.Tensor | None]] = [[None] * n for _ in range(3)]
        step_of = {}
        for gi, rows in _rows_by_group(bucket).items():
            amsgrad = bool(base.param_groups[gi]["amsgrad"])
            steps = []
            for i in rows:
                p = bucket.params[i]
                st = base.state[p]
                if len(st) == 0:  # what torch.optim.Adam's first step creates
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad and "max_exp_avg_sq" not in st:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                cols[0][i], cols[1][i] = st["exp_avg"], st["exp_avg_sq"]
                cols[2][i] = st.get("max_exp_avg_sq") if amsgrad else None
                steps.append(st["step"])
            torch._foreach_add_(steps, 1.0)
            step_of[gi] = float(steps[0])  # a CPU tensor: no device sync
        plan = self.plan("adam", bucket, (bucket.params, grads, bucket.buffers, *cols), [0] * n)
        for gi, first, end in plan.group_chunks:
            if end > first:
                group = base.param_groups[gi]
                decoupled = bool(group.get("decoupled_weight_decay", type(base) is torch.optim.AdamW))
                self.kernels.adam(bucket, plan, first, end - first, group, step_of[gi], decoupled, copy)


def adam_bias_terms(group: dict, step: float) -> tuple[float, float]:
    """(lr / (1 - beta1^step), sqrt(1 - beta2^step)): Adam's bias corrections, as torch.optim.Adam computes them."""
    beta1, beta2 = group["betas"]
    return group["lr"] / (1 - beta1**step), math.sqrt(1 - beta2**step)


def _adaptive_flags(bucket: Bucket) -> list[int]:
    return [FLAG_ADAPTIVE if a else 0 for a in bucket.adaptive]


def _scales(bucket: Bucket) -> tuple[torch.Tensor, list[int]]:
    """One tensor holding the bucket's distinct scales and each tensor's index into it."""
    distinct: dict[int, int] = {}
    order: list[torch.Tensor] = []
    index = []
    for s in bucket.scales:
        if id(s) not in distinct:
            distinct[id(s)] = len(order)
            order.append(s)
        index.append(distinct[id(s)])
    return (order[0].reshape(1) if len(order) == 1 else torch.stack(order)), index


def _fused_kind(base: torch.optim.Optimizer) -> str | None:
    """``"sgd"`` / ``"adam"`` when every group of ``base`` uses options the fused kernels implement, else None."""
    kind = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}.get(type(base))
    if kind is None:
        return None
    for group in base.param_groups:
        if group.get("differentiable") or group.get("capturable"):
            return None
        hyper = [group["lr"], group.get("momentum", 0.0), group.get("dampening", 0.0), group["weight_decay"],
                 *group.get("betas", ()), group.get("eps", 0.0)]
        if any(isinstance(x, torch.Tensor) for x in hyper):
            return None
    return kind


def _state_ok(t: torch.Tensor | None, p: torch.Tensor) -> bool:
    return t is None or (t.dtype == p.dtype and t.device == p.device and t.shape == p.shape and _flat(t, p))


def _rows_by_group(bucket: Bucket) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = {}
    for i, g in enumerate(bucket.group):
        rows.setdefault(g, []).append(i)
    return rows
