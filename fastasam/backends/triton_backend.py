"""The ``triton`` backend: each phase of the step is one Triton launch per (device, dtype) bucket.

The kernels live in ``fastasam.kernels.multi_tensor``. This module describes a bucket to them with a device-resident
tensor table and chunk table (see the kernels' docstring), built on the host once and cached under the addresses it
holds: while parameters, gradients, buffers and optimizer state stay where they are (the caching allocator usually
hands ``zero_grad(set_to_none=True)``'s new gradients the same addresses), a step launches kernels and builds
nothing; when an address changes the table is rebuilt.

Tensors the kernels cannot treat as one flat run of memory (a non-contiguous leaf, or a gradient whose strides differ
from its parameter's) and storage dtypes without a Triton type are handed to the ``foreach`` backend, so every
bucket is served. ``restore_and_step_`` fuses the restore with ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` updates.

With ``TRITON_INTERPRET=1`` in the environment before Triton is imported, the kernels run on CPU tensors through
Triton's interpreter (slowly): this is how CI tests them without a GPU.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import triton.language as tl  # optional dependency: if missing, the registry reports the ImportError

from .._plan import Bucket, accumulate_dtype, subset
from ..kernels import multi_tensor as K
from . import foreach

name = "triton"

INTERPRET = K.INTERPRET
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}
# elements per program and per block; the interpreter gets small ones so CI's small tensors cross chunk boundaries
CHUNK = 1 << 12 if INTERPRET else 1 << 14
BLOCK = 1 << 9 if INTERPRET else 1 << 10
NUM_WARPS = 4
_CACHE_SIZE = 32


def device_supported(device: torch.device) -> str | None:
    if INTERPRET:
        if device.type != "cpu":
            return "TRITON_INTERPRET=1 is set, so Triton runs kernels on CPU tensors only; unset it for the GPU"
        return None
    if device.type != "cuda":
        return (f"Triton kernels run on CUDA/ROCm GPUs, not on {device.type} (set TRITON_INTERPRET=1 before importing "
                "triton to run them slowly on the CPU, for tests)")
    if not torch.cuda.is_available():
        return "this PyTorch build has no usable CUDA device"
    if torch.version.hip is None and torch.cuda.get_device_capability(device) < (7, 0):
        return "Triton needs a GPU of compute capability 7.0 or newer"
    return None


# --- tables --------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """One bucket as the kernels see it. ``rest`` marks the bucket's tensors left to foreach (None: none are)."""

    tab: torch.Tensor
    etas: torch.Tensor
    chunks: torch.Tensor
    n_chunks: int
    aligned: bool
    rest: list[bool] | None
    group_chunks: list[tuple[int, int, int]]  # (group index, first chunk, end chunk), in table order; never empty
    partials: torch.Tensor | None = None
    counter: torch.Tensor | None = None


_CACHE: OrderedDict[tuple, _Plan] = OrderedDict()


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


def _plan(kind: str, bucket: Bucket, columns: Sequence[Sequence[torch.Tensor | None]], flags: Sequence[int]) -> _Plan:
    """The cached plan for these tensors: ``columns[c][i]`` is the tensor for table column ``c`` of bucket row ``i``
    (column 0 the parameter; ``None`` = unused)."""
    params = columns[0]
    key_rows = []
    for i, p in enumerate(params):
        key_rows.append((*(t.data_ptr() if t is not None else 0 for t in (c[i] for c in columns)), p.numel(),
                         flags[i], bucket.eta[i] if bucket.adaptive[i] else 0.0, bucket.group[i]))
    key = (kind, bucket.device, bucket.dtype, tuple(key_rows))
    plan = _CACHE.get(key)
    if plan is not None:
        _CACHE.move_to_end(key)
        return plan
    plan = _build(bucket, columns, flags)
    _CACHE[key] = plan
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return plan


def _build(bucket: Bucket, columns: Sequence[Sequence[torch.Tensor | None]], flags: Sequence[int]) -> _Plan:
    params = columns[0]
    rows, rest = [], [False] * len(params)
    for i, p in enumerate(params):
        if p.dtype not in _TL_DTYPE or not all(c[i] is None or _flat(c[i], p) for c in columns):
            rest[i] = True
        elif p.numel() > 0:
            rows.append(i)
    tab = torch.zeros((len(rows), K.NCOL), dtype=torch.int64)
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
        tab[r, K.COL_NUMEL] = n
        tab[r, K.COL_FLAGS] = flags[i]
        first = len(chunks)
        chunks.extend((r, k) for k in range(math.ceil(n / CHUNK)))
        g = bucket.group[i]
        if group_chunks and group_chunks[-1][0] == g:
            group_chunks[-1] = (g, group_chunks[-1][1], len(chunks))
        else:
            group_chunks.append((g, first, len(chunks)))
    acc = accumulate_dtype(bucket.dtype)
    etas = torch.tensor([bucket.eta[i] for i in rows], dtype=acc)
    chunk_tab = torch.tensor(chunks, dtype=torch.int32).reshape(-1, 2)
    dev = bucket.device
    return _Plan(
        tab=tab.to(dev), etas=etas.to(dev), chunks=chunk_tab.to(dev), n_chunks=len(chunks), aligned=aligned,
        rest=rest if any(rest) else None, group_chunks=group_chunks,
    )


def _meta(bucket: Bucket, plan: _Plan) -> dict:
    return dict(
        DTYPE=_TL_DTYPE[bucket.dtype], ACC=_TL_DTYPE[accumulate_dtype(bucket.dtype)], CHUNK=CHUNK, BLOCK=BLOCK,
        ALIGNED=plan.aligned, num_warps=NUM_WARPS,
    )


def _adaptive_flags(bucket: Bucket) -> list[int]:
    return [K.FLAG_ADAPTIVE if a else 0 for a in bucket.adaptive]


# --- the backend interface -----------------------------------------------------------------------------------------


def grad_sqnorm(bucket: Bucket) -> torch.Tensor:
    plan = _plan("norm", bucket, (bucket.params, bucket.grads), _adaptive_flags(bucket))
    acc = accumulate_dtype(bucket.dtype)
    if plan.n_chunks == 0:
        total = torch.zeros((), dtype=acc, device=bucket.device)
    else:
        if plan.counter is None:
            plan.partials = torch.empty(plan.n_chunks, dtype=acc, device=bucket.device)
            plan.counter = torch.zeros(1, dtype=torch.int32, device=bucket.device)
        total = torch.empty((), dtype=acc, device=bucket.device)
        K.sqnorm_kernel[(plan.n_chunks,)](
            plan.tab, plan.etas, plan.chunks, plan.partials, plan.counter, total, plan.n_chunks,
            **_meta(bucket, plan),
        )
    if plan.rest:
        total = total + foreach.grad_sqnorm(subset(bucket, plan.rest))
    return total


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


def perturb_(bucket: Bucket, restore: str) -> None:
    scales, index = _scales(bucket)
    flags = [a | (k << K.SCALE_SHIFT) for a, k in zip(_adaptive_flags(bucket), index, strict=True)]
    plan = _plan("perturb", bucket, (bucket.params, bucket.grads, bucket.buffers), flags)
    bucket.plan = plan
    if plan.n_chunks:
        K.perturb_kernel[(plan.n_chunks,)](
            plan.tab, plan.etas, plan.chunks, scales, bucket.finite, COPY=restore == "copy", **_meta(bucket, plan),
        )
    if plan.rest:
        foreach.perturb_(subset(bucket, plan.rest), restore)


def restore_(bucket: Bucket, restore: str) -> None:
    plan: _Plan = bucket.plan  # type: ignore[assignment]
    if plan.n_chunks:
        K.restore_kernel[(plan.n_chunks,)](plan.tab, plan.chunks, COPY=restore == "copy", **_meta(bucket, plan))
    if plan.rest:
        foreach.restore_(subset(bucket, plan.rest), restore)


# --- restore fused with the base optimizer's update ------------------------------------------------------------------


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


def prepare_fused_step(bucket: Bucket, groups: list[int], base: torch.optim.Optimizer, restore: str):
    """A function that restores the bucket and applies ``base``'s update to it in one pass, or None when this bucket
    or optimizer needs the unfused path. ``groups[i]`` is the index of the ``base.param_groups`` entry holding tensor
    ``i``. Nothing is changed until the returned function runs."""
    kind = _fused_kind(base)
    if kind is None or bucket.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    if kind == "adam" and bucket.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None  # the bias corrections are host numbers a graph would freeze; torch's capturable Adam handles it
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
    return lambda: (_sgd_step if kind == "sgd" else _adam_step)(bucket, base, grads, restore)


def _rows_by_group(bucket: Bucket) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = {}
    for i, g in enumerate(bucket.group):
        rows.setdefault(g, []).append(i)
    return rows


def _sgd_step(bucket: Bucket, base: torch.optim.Optimizer, grads: list[torch.Tensor], restore: str) -> None:
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
                flags[i] = K.FLAG_FRESH_STATE
            moms[i] = st["momentum_buffer"]
    plan = _plan("sgd", bucket, (bucket.params, grads, bucket.buffers, moms), flags)
    meta = _meta(bucket, plan)
    for gi, first, end in plan.group_chunks:
        group = base.param_groups[gi]
        K.restore_sgd_kernel[(end - first,)](
            plan.tab, plan.chunks, first, group["lr"], group["momentum"], group["dampening"],
            group["weight_decay"], COPY=restore == "copy", MOMENTUM=group["momentum"] != 0,
            NESTEROV=bool(group["nesterov"]), MAXIMIZE=bool(group["maximize"]), **meta,
        )


def _adam_step(bucket: Bucket, base: torch.optim.Optimizer, grads: list[torch.Tensor], restore: str) -> None:
    n = len(bucket.params)
    cols: list[list[torch.Tensor | None]] = [[None] * n for _ in range(3)]
    hyper = {}
    for gi, rows in _rows_by_group(bucket).items():
        group = base.param_groups[gi]
        amsgrad = bool(group["amsgrad"])
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
        step = float(steps[0])  # a CPU tensor: no device sync
        hyper[gi] = step
    plan = _plan("adam", bucket, (bucket.params, grads, bucket.buffers, *cols), [0] * n)
    meta = _meta(bucket, plan)
    for gi, first, end in plan.group_chunks:
        group, step = base.param_groups[gi], hyper[gi]
        beta1, beta2 = group["betas"]
        decoupled = group.get("decoupled_weight_decay", type(base) is torch.optim.AdamW)
        K.restore_adam_kernel[(end - first,)](
            plan.tab, plan.chunks, first, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
            group["lr"] / (1 - beta1**step), math.sqrt(1 - beta2**step),
            COPY=restore == "copy", DECOUPLED=bool(decoupled), AMSGRAD=bool(group["amsgrad"]),
            MAXIMIZE=bool(group["maximize"]), **meta,
        )
