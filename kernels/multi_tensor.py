"""Triton multi-tensor kernels: every phase of a sharpness-aware step over all tensors of one (device, dtype) bucket in
one launch.

The host (``fastasam/backends/_multi_tensor.py``, shared with the CUDA C++ kernels in ``csrc/``) describes the
bucket with two small device tables, a tensor table (addresses, element count, flags per tensor) and a chunk table
((tensor row, chunk number) per program); see that module for the layout.

Inside a chunk, full blocks of ``BLOCK`` elements are loaded without a mask (so 16-byte aligned tensors get vector
loads) and one masked block finishes the tail. Math runs in ``ACC`` (fp32, or fp64 for fp64 storage); every store
rounds once to the storage dtype. Offsets are int64, so tensors over 2^31 elements are addressed correctly.

The squared norm is reduced deterministically without float atomics: each program writes its partial sum to its own
slot; an integer counter tells the program that finishes last, which then sums the partials in a fixed order and
resets the counter (so the same launch can be replayed, e.g. in a CUDA graph).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from fastasam.backends import _multi_tensor as layout

# the tables' layout, defined by the host (plain ints), here as constexprs
COL_W, COL_G, COL_B, COL_S1, COL_S2, COL_S3 = (layout.COL_W, layout.COL_G, layout.COL_B, layout.COL_S1,
                                               layout.COL_S2, layout.COL_S3)
COL_NUMEL, COL_FLAGS, NCOL = layout.COL_NUMEL, layout.COL_FLAGS, layout.NCOL
FLAG_ADAPTIVE, FLAG_FRESH_STATE, SCALE_SHIFT = layout.FLAG_ADAPTIVE, layout.FLAG_FRESH_STATE, layout.SCALE_SHIFT
_W, _G, _B, _S1, _S2, _S3 = (tl.constexpr(c) for c in (COL_W, COL_G, COL_B, COL_S1, COL_S2, COL_S3))
_NUMEL, _FLAGS, _NCOL = tl.constexpr(COL_NUMEL), tl.constexpr(COL_FLAGS), tl.constexpr(NCOL)
_ADAPTIVE, _FRESH, _SHIFT = tl.constexpr(FLAG_ADAPTIVE), tl.constexpr(FLAG_FRESH_STATE), tl.constexpr(SCALE_SHIFT)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Triton's CPU interpreter truncates fp32 -> bf16 where GPUs round to nearest even; under the interpreter the kernels
# round explicitly so that CI checks the numbers a GPU produces.
_ROUND_BF16_BY_HAND: tl.constexpr = tl.constexpr(INTERPRET)


@triton.jit
def _to(x, DT: tl.constexpr):
    """``x`` rounded to nearest even in dtype ``DT``."""
    if DT == tl.bfloat16 and _ROUND_BF16_BY_HAND:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def _ptr(tab, row, col: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    p = tl.load(tab + row * _NCOL + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _chunk(tab, chunks, pid, CHUNK: tl.constexpr):
    """(row, first element, element count) of program ``pid``'s chunk."""
    row = tl.load(chunks + pid * 2).to(tl.int64)
    start = tl.load(chunks + pid * 2 + 1).to(tl.int64) * CHUNK
    numel = tl.load(tab + row * _NCOL + _NUMEL)
    return row, start, tl.minimum(numel - start, CHUNK)


# --- phase 1: the squared norm ---------------------------------------------------------------------------------------


@triton.jit
def _sq_block(w, g, idx, n, eta, ADAPTIVE: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr):
    m = idx < n if MASKED else None
    o = 0.0 if MASKED else None
    x = tl.load(g + idx, mask=m, other=o).to(ACC)
    if ADAPTIVE:
        x = (tl.abs(tl.load(w + idx, mask=m, other=o).to(ACC)) + eta) * x
    return x * x


@triton.jit
def _sq_chunk(w, g, start, length, eta, ADAPTIVE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], ACC)
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK
    for j in range(0, full):
        acc += _sq_block(w, g, start + j * BLOCK + lanes, start + length, eta, ADAPTIVE, False, ACC)
    if full * BLOCK < length:
        acc += _sq_block(w, g, start + full * BLOCK + lanes, start + length, eta, ADAPTIVE, True, ACC)
    return tl.sum(acc, axis=0)


@triton.jit
def sqnorm_kernel(
    tab, etas, chunks, partials, counter, out, n_programs,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """``out = sum over all chunks of sum((T_w * g)^2)``; ``T_w = |w| + eta`` for adaptive rows, else 1."""
    pid = tl.program_id(0)
    row, start, length = _chunk(tab, chunks, pid, CHUNK)
    flags = tl.load(tab + row * _NCOL + _FLAGS)
    g = _ptr(tab, row, _G, DTYPE, ALIGNED)
    if (flags & _ADAPTIVE) != 0:
        w = _ptr(tab, row, _W, DTYPE, ALIGNED)
        part = _sq_chunk(w, g, start, length, tl.load(etas + row), True, ACC, BLOCK)
    else:
        part = _sq_chunk(g, g, start, length, 0.0, False, ACC, BLOCK)
    tl.store(partials + pid, part)
    tl.debug_barrier()  # every thread's share of the store is issued before the counter moves
    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
    if ticket == n_programs - 1:  # the last program to finish: fixed-order sum of the partials
        tl.debug_barrier()
        lanes = tl.arange(0, BLOCK)
        total = tl.zeros([BLOCK], ACC)
        for base in range(0, n_programs, BLOCK):
            idx = base + lanes
            total += tl.load(partials + idx, mask=idx < n_programs, other=0.0, volatile=True)
        tl.store(out, tl.sum(total, axis=0))
        tl.atomic_xchg(counter, 0)  # ready for the next launch (CUDA-graph replay included)


# --- phase 2: the perturbation ---------------------------------------------------------------------------------------


@triton.jit
def _perturb_block(
    w, g, b, idx, n, eta, scale, finite,
    ADAPTIVE: tl.constexpr, COPY: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr,
):
    m = idx < n if MASKED else None
    o = 0.0 if MASKED else None
    wv = tl.load(w + idx, mask=m, other=o).to(ACC)
    gv = tl.load(g + idx, mask=m, other=o).to(ACC)
    if ADAPTIVE:
        t = tl.abs(wv) + eta
        e = t * (t * gv) * scale
    else:
        e = gv * scale
    e = tl.where(finite, e, 0.0)  # a non-finite norm means inf/NaN in g: e is exactly 0, never NaN
    if COPY:
        tl.store(b + idx, _to(wv, b.dtype.element_ty), mask=m)
    else:
        e = _to(e, b.dtype.element_ty)  # the stored e is rounded once; that rounded value is added
        tl.store(b + idx, _to(e, b.dtype.element_ty), mask=m)
        e = e.to(ACC)
    tl.store(w + idx, _to(wv + e, w.dtype.element_ty), mask=m)


@triton.jit
def _perturb_chunk(
    w, g, b, start, length, eta, scale, finite,
    ADAPTIVE: tl.constexpr, COPY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK
    for j in range(0, full):
        _perturb_block(w, g, b, start + j * BLOCK + lanes, start + length, eta, scale, finite,
                       ADAPTIVE, COPY, False, ACC)
    if full * BLOCK < length:
        _perturb_block(w, g, b, start + full * BLOCK + lanes, start + length, eta, scale, finite,
                       ADAPTIVE, COPY, True, ACC)


@triton.jit
def perturb_kernel(
    tab, etas, chunks, scales, finite_ptr,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    COPY: tl.constexpr,
):
    """``w <- w + e`` with ``e = T_w^2 * g * scale`` (masked to 0 unless ``finite``); the buffer gets ``w``
    (``COPY``) or ``e``."""
    pid = tl.program_id(0)
    row, start, length = _chunk(tab, chunks, pid, CHUNK)
    flags = tl.load(tab + row * _NCOL + _FLAGS)
    scale = tl.load(scales + (flags >> _SHIFT)).to(ACC)
    finite = tl.load(finite_ptr) != 0
    w = _ptr(tab, row, _W, DTYPE, ALIGNED)
    g = _ptr(tab, row, _G, DTYPE, ALIGNED)
    b = _ptr(tab, row, _B, DTYPE, ALIGNED)
    if (flags & _ADAPTIVE) != 0:
        _perturb_chunk(w, g, b, start, length, tl.load(etas + row), scale, finite, True, COPY, ACC, BLOCK)
    else:
        _perturb_chunk(w, g, b, start, length, 0.0, scale, finite, False, COPY, ACC, BLOCK)


# --- phase 3: restore, alone or fused with the base optimizer's update -----------------------------------------------


@triton.jit
def _restored(w, b, idx, n, COPY: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr):
    """The original weight, as the storage dtype holds it, in ``ACC``."""
    m = idx < n if MASKED else None
    o = 0.0 if MASKED else None
    if COPY:
        return tl.load(b + idx, mask=m, other=o).to(ACC)
    else:
        x = tl.load(w + idx, mask=m, other=o).to(ACC) - tl.load(b + idx, mask=m, other=o).to(ACC)
        return _to(x, w.dtype.element_ty).to(ACC)


@triton.jit
def _restore_block(w, b, idx, n, COPY: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr):
    m = idx < n if MASKED else None
    tl.store(w + idx, _to(_restored(w, b, idx, n, COPY, MASKED, ACC), w.dtype.element_ty), mask=m)


@triton.jit
def _restore_chunk(w, b, start, length, COPY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK
    for j in range(0, full):
        _restore_block(w, b, start + j * BLOCK + lanes, start + length, COPY, False, ACC)
    if full * BLOCK < length:
        _restore_block(w, b, start + full * BLOCK + lanes, start + length, COPY, True, ACC)


@triton.jit
def restore_kernel(
    tab, chunks,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    COPY: tl.constexpr,
):
    """``w <- saved w`` (``COPY``) or ``w <- w - e``."""
    pid = tl.program_id(0)
    row, start, length = _chunk(tab, chunks, pid, CHUNK)
    _restore_chunk(_ptr(tab, row, _W, DTYPE, ALIGNED), _ptr(tab, row, _B, DTYPE, ALIGNED), start, length, COPY, ACC,
                   BLOCK)


@triton.jit
def _sgd_block(
    w, g, b, mom, idx, n, fresh, lr, momentum, dampening, weight_decay,
    COPY: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    MASKED: tl.constexpr, ACC: tl.constexpr,
):
    m = idx < n if MASKED else None
    o = 0.0 if MASKED else None
    p = _restored(w, b, idx, n, COPY, MASKED, ACC)
    d = tl.load(g + idx, mask=m, other=o).to(ACC)
    if MAXIMIZE:
        d = -d
    d = d + weight_decay * p
    if MOMENTUM:
        buf = tl.load(mom + idx, mask=m, other=o).to(ACC)
        buf = tl.where(fresh, d, buf * momentum + (1.0 - dampening) * d)  # torch.optim.SGD: first buffer = d
        buf = _to(buf, mom.dtype.element_ty).to(ACC)
        tl.store(mom + idx, _to(buf, mom.dtype.element_ty), mask=m)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    tl.store(w + idx, _to(p - lr * d, w.dtype.element_ty), mask=m)


@triton.jit
def restore_sgd_kernel(
    tab, chunks, first_chunk, lr, momentum, dampening, weight_decay,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    COPY: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
):
    """Restore, then ``torch.optim.SGD``'s update with the second-pass gradient, in one pass over memory.

    Rows: W parameter, G gradient, B restore buffer, S1 momentum buffer (flag bit 1: the buffer is new)."""
    pid = tl.program_id(0) + first_chunk
    row, start, length = _chunk(tab, chunks, pid, CHUNK)
    fresh = (tl.load(tab + row * _NCOL + _FLAGS) & _FRESH) != 0
    w = _ptr(tab, row, _W, DTYPE, ALIGNED)
    g = _ptr(tab, row, _G, DTYPE, ALIGNED)
    b = _ptr(tab, row, _B, DTYPE, ALIGNED)
    mom = _ptr(tab, row, _S1, DTYPE, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK
    end = start + length
    for j in range(0, full):
        _sgd_block(w, g, b, mom, start + j * BLOCK + lanes, end, fresh, lr, momentum, dampening, weight_decay,
                   COPY, MOMENTUM, NESTEROV, MAXIMIZE, False, ACC)
    if full * BLOCK < length:
        _sgd_block(w, g, b, mom, start + full * BLOCK + lanes, end, fresh, lr, momentum, dampening, weight_decay,
                   COPY, MOMENTUM, NESTEROV, MAXIMIZE, True, ACC)


@triton.jit
def _adam_block(
    w, g, b, m1, m2, vmax, idx, n, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt,
    COPY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    MASKED: tl.constexpr, ACC: tl.constexpr,
):
    m = idx < n if MASKED else None
    o = 0.0 if MASKED else None
    p = _restored(w, b, idx, n, COPY, MASKED, ACC)
    d = tl.load(g + idx, mask=m, other=o).to(ACC)
    if MAXIMIZE:
        d = -d
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    else:
        d = d + weight_decay * p
    mv = tl.load(m1 + idx, mask=m, other=o).to(ACC)
    mv = mv + (1.0 - beta1) * (d - mv)
    vv = tl.load(m2 + idx, mask=m, other=o).to(ACC)
    vv = vv * beta2 + (1.0 - beta2) * d * d
    tl.store(m1 + idx, _to(mv, m1.dtype.element_ty), mask=m)
    tl.store(m2 + idx, _to(vv, m2.dtype.element_ty), mask=m)
    if AMSGRAD:
        vv = tl.maximum(tl.load(vmax + idx, mask=m, other=o).to(ACC), vv)
        tl.store(vmax + idx, _to(vv, vmax.dtype.element_ty), mask=m)
    denom = tl.sqrt(vv) / bc2_sqrt + eps
    tl.store(w + idx, _to(p - step_size * (mv / denom), w.dtype.element_ty), mask=m)


@triton.jit
def restore_adam_kernel(
    tab, chunks, first_chunk, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    COPY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
):
    """Restore, then ``torch.optim.Adam`` / ``AdamW``'s update (bias corrections computed on the host from the
    group's step count). Rows: W, G, B, S1 exp_avg, S2 exp_avg_sq, S3 max_exp_avg_sq (amsgrad)."""
    pid = tl.program_id(0) + first_chunk
    row, start, length = _chunk(tab, chunks, pid, CHUNK)
    w = _ptr(tab, row, _W, DTYPE, ALIGNED)
    g = _ptr(tab, row, _G, DTYPE, ALIGNED)
    b = _ptr(tab, row, _B, DTYPE, ALIGNED)
    m1 = _ptr(tab, row, _S1, DTYPE, ALIGNED)
    m2 = _ptr(tab, row, _S2, DTYPE, ALIGNED)
    vmax = _ptr(tab, row, _S3, DTYPE, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK
    end = start + length
    for j in range(0, full):
        _adam_block(w, g, b, m1, m2, vmax, start + j * BLOCK + lanes, end, lr, beta1, beta2, eps, weight_decay,
                    step_size, bc2_sqrt, COPY, DECOUPLED, AMSGRAD, MAXIMIZE, False, ACC)
    if full * BLOCK < length:
        _adam_block(w, g, b, m1, m2, vmax, start + full * BLOCK + lanes, end, lr, beta1, beta2, eps, weight_decay,
                    step_size, bc2_sqrt, COPY, DECOUPLED, AMSGRAD, MAXIMIZE, True, ACC)
