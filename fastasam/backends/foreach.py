"""The ``foreach`` backend: the same math as ``fastasam.backends.reference`` with ``torch._foreach_*`` ops.

Tensors arrive bucketed by (device, dtype); within a bucket they are split into runs of equal options
(adaptive, eta, scale) and each run into chunks of at most ``chunk_numel(device)`` elements, a larger tensor into
flat ranges of that size. Every phase finishes a chunk before it starts the next, so temporaries stay chunk-sized
(the memory contract allows one parameter-sized buffer, not a second copy of the model). On a CPU a ``foreach`` op is
a loop of per-tensor kernels, so chunks there are large enough that few tensors are cut (each cut piece is one more
kernel per op) and small enough that a chunk's temporaries stay in the last-level cache.
fp16/bf16 chunks are upcast to fp32 for the math and rounded once when written back.

The perturbation's guard (``e = 0`` where the norm is not finite) costs a pass over every ``e``; on a CPU the flag
is read on the host (no device to wait for) and the pass runs only when the norm is not finite. Elsewhere the
flag stays on the device and the guard is a masked fill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._plan import Bucket, accumulate_dtype

name = "foreach"
traceable = True  # torch.compile traces its tensor ops

_CHUNK_NUMEL = {"cpu": 1 << 18}
# devices whose finite-norm flag the perturbation reads on the host (no device to wait for) to skip the guard's pass
HOST_FLAG_DEVICES = frozenset({"cpu"})
# elsewhere (GPUs): large enough that launches stay few, small enough that temporaries stay far below the model
_DEFAULT_CHUNK_NUMEL = 1 << 22


def device_supported(device: torch.device) -> str | None:
    """foreach ops exist for every device PyTorch has (a per-tensor fallback inside PyTorch where not fused)."""
    return None


def chunk_numel(device: torch.device) -> int:
    return _CHUNK_NUMEL.get(device.type, _DEFAULT_CHUNK_NUMEL)


Piece = tuple[int, slice | None]  # (tensor index, range of its flattened elements; None = the whole tensor)


@dataclass
class Run:
    """Tensors of equal options (one foreach call per chunk): ``index`` is the first tensor's (its scale is the run's
    scale), ``chunks`` the run cut into chunks of at most ``chunk_numel`` elements."""

    adaptive: bool
    eta: float
    index: int
    chunks: list[list[Piece]]


def _splittable(bucket: Bucket, i: int) -> bool:
    """Tensor ``i`` may be cut into flat ranges: its parameter and buffer are contiguous, and so must its gradient be
    each step (checked where the gradients are taken), so element k is element k of each."""
    return bucket.params[i].is_contiguous() and (i >= len(bucket.buffers) or bucket.buffers[i].is_contiguous())


def _chunks(bucket: Bucket, indices: list[int]) -> list[list[Piece]]:
    """The tensors ``indices`` in chunks of at most ``chunk_numel`` elements; a larger contiguous tensor is cut into
    ranges (so temporaries stay chunk-sized however large one tensor is); a larger non-contiguous one is a chunk of
    its own."""
    limit = chunk_numel(bucket.device)
    out: list[list[Piece]] = []
    chunk: list[Piece] = []
    size = 0
    for i in indices:
        n = bucket.params[i].numel()
        whole = n <= limit or not _splittable(bucket, i)
        for part in [None] if whole else [slice(a, min(a + limit, n)) for a in range(0, n, limit)]:
            m = n if part is None else part.stop - part.start
            if chunk and size + m > limit:
                out.append(chunk)
                chunk, size = [], 0
            chunk.append((i, part))
            size += m
    if chunk:
        out.append(chunk)
    return out


def _runs(bucket: Bucket) -> list[Run]:
    """The bucket's tensors grouped by (adaptive, eta, rho) in first-seen order and chunked; computed once per bucket
    (kept in ``bucket.layout``)."""
    if isinstance(bucket.layout, list):
        return bucket.layout
    order: dict[tuple, list[int]] = {}
    for i, (a, eta, rho) in enumerate(zip(bucket.adaptive, bucket.eta, bucket.rho, strict=True)):
        order.setdefault((a, eta if a else 0.0, rho), []).append(i)
    bucket.layout = [Run(a, eta, idx[0], _chunks(bucket, idx)) for (a, eta, _), idx in order.items()]
    return bucket.layout


def _take(tensors: list[torch.Tensor], chunk: list[Piece]) -> list[torch.Tensor]:
    """The chunk's tensors, or flat views of their ranges (a non-contiguous gradient is made contiguous first)."""
    return [tensors[i] if part is None else tensors[i].reshape(-1)[part] for i, part in chunk]


def _upcast(tensors: list[torch.Tensor], acc: torch.dtype) -> list[torch.Tensor]:
    return tensors if not tensors or tensors[0].dtype == acc else [t.to(acc) for t in tensors]


def _sqsum(tensors: list[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    # _foreach_powsum (newer PyTorch) sums the squares directly; older versions, and torch.compile, which cannot
    # trace it yet (it would break the graph here with a warning), square the norms instead
    powsum = getattr(torch, "_foreach_powsum", None)
    if powsum is not None and not torch.compiler.is_compiling():
        parts = powsum(tensors, 2, dtype=acc)
    else:
        parts = torch._foreach_pow(torch._foreach_norm(tensors, 2, dtype=acc), 2)
    return torch.stack(parts).sum()


def _scaled(w32: list[torch.Tensor], g32: list[torch.Tensor], adaptive: bool, eta: float) -> list[torch.Tensor]:
    """New list ``T_w * g`` (adaptive) or a copy-free alias of ``g`` (not adaptive)."""
    if not adaptive:
        return g32
    t = torch._foreach_abs(w32)
    torch._foreach_add_(t, eta)
    torch._foreach_mul_(t, g32)
    return t


def grad_sqnorm(bucket: Bucket) -> torch.Tensor:
    acc = accumulate_dtype(bucket.dtype)
    total = torch.zeros((), dtype=acc, device=bucket.device)
    for run in _runs(bucket):
        adaptive, eta = run.adaptive, run.eta
        for chunk in run.chunks:
            grads = _take(bucket.grads, chunk)
            if not adaptive:  # no temporaries: the sum of squares upcasts on the fly
                total = total + _sqsum(grads, acc)
                continue
            w32 = _upcast(_take(bucket.params, chunk), acc)
            total = total + _sqsum(_scaled(w32, _upcast(grads, acc), adaptive, eta), acc)
    return total


def perturb_(bucket: Bucket, restore: str) -> None:
    acc = accumulate_dtype(bucket.dtype)
    # the guard's pass only when it can matter: on a CPU read the flag (no sync); elsewhere (and while tracing) mask
    host = bucket.finite.device.type in HOST_FLAG_DEVICES and not torch.compiler.is_compiling()
    not_finite = None if host and bool(bucket.finite) else ~bucket.finite
    for run in _runs(bucket):
        adaptive, eta, scale = run.adaptive, run.eta, bucket.scales[run.index]
        for chunk in run.chunks:
            params, bufs = _take(bucket.params, chunk), _take(bucket.buffers, chunk)
            w32 = _upcast(params, acc)
            g32 = _upcast(_take(bucket.grads, chunk), acc)
            if adaptive:  # e = T * (T * g) * scale, T = |w| + eta
                t = torch._foreach_abs(w32)
                torch._foreach_add_(t, eta)
                e = torch._foreach_mul(t, g32)
                torch._foreach_mul_(e, t)
                torch._foreach_mul_(e, scale)
            else:
                e = torch._foreach_mul(g32, scale)
            if not_finite is not None:  # a non-finite norm means inf/NaN in g: e must be exactly 0, not NaN
                for x in e:
                    x.masked_fill_(not_finite, 0.0)
            if restore == "copy":
                torch._foreach_copy_(bufs, params)
            else:
                torch._foreach_copy_(bufs, e)  # rounded to the storage dtype once ...
                e = _upcast(bufs, acc)  # ... and that rounded value is what is added
            if w32 is params:
                torch._foreach_add_(params, e)
            else:
                torch._foreach_copy_(params, torch._foreach_add(w32, e))


def restore_(bucket: Bucket, restore: str) -> None:
    acc = accumulate_dtype(bucket.dtype)
    for chunk in (c for run in _runs(bucket) for c in run.chunks):
        params, bufs = _take(bucket.params, chunk), _take(bucket.buffers, chunk)
        if restore == "copy":
            torch._foreach_copy_(params, bufs)
        elif params[0].dtype == acc:
            torch._foreach_sub_(params, bufs)
        else:
            torch._foreach_copy_(params, torch._foreach_sub(_upcast(params, acc), _upcast(bufs, acc)))


# --- LookSAM / GSAM: the decompositions' sums and combinations (fastasam.variants) ----------------------------------


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor | None:
    """sum_i <a_i, b_i> over one fp32/fp64 device bucket, in fp64: no foreach sum exists, so the 1-norms of the
    products' positive and negative parts (None: no tensors)."""
    if not a:
        return None
    f64 = torch.float64
    prods = torch._foreach_mul(a, b)
    pos = torch._foreach_norm(torch._foreach_clamp_min(prods, 0.0), 1, dtype=f64)
    neg = torch._foreach_norm(torch._foreach_clamp_max(prods, 0.0), 1, dtype=f64)
    return torch.stack(pos).sum() - torch.stack(neg).sum()


def axpby_(y: list[torch.Tensor], x: list[torch.Tensor], a: torch.Tensor | float, b: torch.Tensor | float) -> None:
    """y_i <- a * y_i + b * x_i over one fp32/fp64 device bucket (each product rounded, then the sum)."""
    if not y:
        return
    if not (isinstance(a, float) and a == 1.0):
        torch._foreach_mul_(y, a)
    if isinstance(b, float):
        torch._foreach_add_(y, x, alpha=b)
    else:
        torch._foreach_add_(y, torch._foreach_mul(x, b))
