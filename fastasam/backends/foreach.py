"""The ``foreach`` backend: the same math as ``fastasam.reference`` with ``torch._foreach_*`` ops.

Tensors arrive bucketed by (device, dtype); within a bucket they are split into runs of equal options
(adaptive, eta, scale) and each run into chunks of at most ``chunk_numel(device)`` elements, a larger tensor into
flat ranges of that size. Every phase finishes a
chunk before it starts the next, so temporaries stay chunk-sized (the memory contract allows one parameter-sized
buffer, not a second copy of the model) and, on a CPU, the chunk stays in cache between the ops of a phase.
fp16/bf16 chunks are upcast to fp32 for the math and rounded once when written back.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .._plan import Bucket, accumulate_dtype

name = "foreach"

_CHUNK_NUMEL = {"cpu": 1 << 16}
# elsewhere (GPUs): large enough that launches stay few, small enough that temporaries stay far below the model
_DEFAULT_CHUNK_NUMEL = 1 << 22


def device_supported(device: torch.device) -> str | None:
    """foreach ops exist for every device PyTorch has (a per-tensor fallback inside PyTorch where not fused)."""
    return None


def chunk_numel(device: torch.device) -> int:
    return _CHUNK_NUMEL.get(device.type, _DEFAULT_CHUNK_NUMEL)


Piece = tuple[int, slice | None]  # (tensor index, range of its flattened elements; None = the whole tensor)


def _splittable(bucket: Bucket, i: int) -> bool:
    """Tensor ``i`` may be cut into flat ranges: all of its row's tensors are contiguous, so element k is element k
    of each."""
    return all(not col or col[i].is_contiguous() for col in (bucket.params, bucket.grads, bucket.buffers))


def _chunks(bucket: Bucket, indices: list[int]) -> Iterator[list[Piece]]:
    """The tensors ``indices`` in chunks of at most ``chunk_numel`` elements; a larger contiguous tensor is cut into
    ranges (so temporaries stay chunk-sized however large one tensor is); a larger non-contiguous one is a chunk of
    its own."""
    limit = chunk_numel(bucket.device)
    chunk: list[Piece] = []
    size = 0
    for i in indices:
        n = bucket.params[i].numel()
        whole = n <= limit or not _splittable(bucket, i)
        for part in [None] if whole else [slice(a, min(a + limit, n)) for a in range(0, n, limit)]:
            m = n if part is None else part.stop - part.start
            if chunk and size + m > limit:
                yield chunk
                chunk, size = [], 0
            chunk.append((i, part))
            size += m
    if chunk:
        yield chunk


def _take(tensors: list[torch.Tensor], chunk: list[Piece]) -> list[torch.Tensor]:
    """The chunk's tensors, or flat views of their ranges."""
    return [tensors[i] if part is None else tensors[i].view(-1)[part] for i, part in chunk]


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
    for adaptive, eta, _, indices in bucket.option_runs():
        for chunk in _chunks(bucket, indices):
            grads = _take(bucket.grads, chunk)
            if not adaptive:  # no temporaries: the sum of squares upcasts on the fly
                total = total + _sqsum(grads, acc)
                continue
            w32 = _upcast(_take(bucket.params, chunk), acc)
            total = total + _sqsum(_scaled(w32, _upcast(grads, acc), adaptive, eta), acc)
    return total


def perturb_(bucket: Bucket, restore: str) -> None:
    acc = accumulate_dtype(bucket.dtype)
    not_finite = ~bucket.finite
    for adaptive, eta, scale, indices in bucket.option_runs():
        for chunk in _chunks(bucket, indices):
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
            for x in e:  # a non-finite norm means inf/NaN in g: e must be exactly 0, not NaN
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
    for chunk in _chunks(bucket, list(range(len(bucket.params)))):
        params, bufs = _take(bucket.params, chunk), _take(bucket.buffers, chunk)
        if restore == "copy":
            torch._foreach_copy_(params, bufs)
        elif params[0].dtype == acc:
            torch._foreach_sub_(params, bufs)
        else:
            torch._foreach_copy_(params, torch._foreach_sub(_upcast(params, acc), _upcast(bufs, acc)))
