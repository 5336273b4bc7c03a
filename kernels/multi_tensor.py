"""Triton multi-tensor kernels: every phase of a sharpness-aware step over all tensors of one (device, dtype) bucket in
one launch.

The host (``fastasam/backends/_multi_tensor.py``, shared with the CUDA C++ kernels in ``csrc/``) describes a bucket
with small device tables, built once and reused while nothing moves:

* ``rows``   int64[N, NCOL]: per tensor the addresses of the parameter, its gradient, the restore buffer and up to
  three optimizer-state tensors, the element count and a flags word (bit 1: the state is new this step; bits 8..31:
  the tensor's row in ``opts``; bits 32..55: its row in ``hyper``; bits 56..62: which address columns are 16-byte
  aligned, written by the host with the addresses);
* ``chunks`` int32[C, 2]: (tensor row, chunk number); program ``pid`` handles elements
  ``[chunk * CHUNK, min((chunk + 1) * CHUNK, numel))`` of its tensor, so a 2-element bias and a 2M-element weight are
  scheduled alike and one launch covers the whole model;
* ``opts``   ACC[G, NOPT]: per parameter group eta, rho, adaptive (0/1) and the norm's eps;
* ``hyper``  fp32[H, NHYPER]: per base-optimizer group the update's hyper-parameters (see ``_sgd_block`` /
  ``_adam_block`` below), each computed on the host in double precision as torch.optim computes it, then rounded
  once.

Inside a chunk, full blocks of ``BLOCK`` elements are loaded without a mask and one masked block finishes the tail.
Vector loads are decided per tensor: a row whose flags mark every column the kernel reads 16-byte aligned takes the
vector path (the pointers carry ``tl.multiple_of(., 16)``, so full blocks become 16-byte accesses), any other row
the element path, in the same launch; one misaligned tensor (a view at an odd offset) costs only itself. The
``ALIGNED`` option says whether a table has aligned rows at all (without, the vector path is not compiled). Math runs
in ``ACC`` (fp32, or fp64 for fp64 storage); every store rounds once to the storage dtype. Offsets are int64, so
tensors over 2^31 elements are addressed correctly.

Floating-point contraction: none. Every product and every sum in these kernels rounds once, in ``ACC``, in the
order written; nothing is fused into a multiply-add (``COMPILE_OPTIONS``: ``enable_fp_fusion=False``, which every
launch passes and ``compile_check`` verifies in the PTX). The CUDA kernels (``csrc/multi_tensor.cu``) follow the same
policy (nvcc ``-fmad=false``, checked by ``csrc/check.sh``), the CPU shim that runs them in tests is compiled with
``-ffp-contract=off``, and Triton's interpreter never fuses. Hence:

* bit for bit, across ``triton``, ``cuda``, the shim and the interpreter: every elementwise result from the same
  inputs, i.e. the perturbation from a given squared norm, the restore, the fused SGD / Adam / AdamW updates,
  ``combine`` and GSAM's direction ``x * G + y * K``; and against torch evaluating the same expression op by op
  (``combine``, GSAM's direction: two rounded products, then the rounded sum);
* within a bound only: the reductions (the squared norm, ``dots``): each backend sums per-chunk partials in its own
  fixed order (Triton's and CUDA's chunks and block sums differ, and differ from torch's order), so they are
  deterministic run to run but agree with each other and with the oracle only to rounding, and what derives from
  them (the perturbation's scale, LookSAM's and GSAM's coefficients) inherits that; and comparisons with torch's own
  optimizers where torch computes otherwise (its foreach / per-tensor paths round fp16 / bf16 after every op, its
  CPU kernels may fuse; its CUDA fused AdamW computes its bias corrections in fp32 on the device and uses fma).
  torch's fused AdamW on the CPU in bf16 computes as the fused update does: equal bits there.

The kernels are bound by memory bandwidth, so the multiply-adds this forgoes cost nothing measurable.

The squared norm is reduced deterministically without float atomics: each program writes its partial sum to its own
slot; an integer counter tells the program that finishes last, which sums the partials in a fixed order and resets the
counter (so the same launch can be replayed, e.g. in a CUDA graph). The perturbation reads that sum from device memory
and derives the scale ``rho / (sqrt(sum) + eps)`` itself, so the host computes nothing between the two launches.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from fastasam.backends import _layout as L
from fastasam.backends._updates import AdamUpdate, SGDUpdate

_W, _G, _B = tl.constexpr(L.COL_W), tl.constexpr(L.COL_G), tl.constexpr(L.COL_B)
_S1, _S2, _S3 = tl.constexpr(L.COL_S1), tl.constexpr(L.COL_S2), tl.constexpr(L.COL_S3)
_NUMEL, _FLAGS, _NCOL = tl.constexpr(L.COL_NUMEL), tl.constexpr(L.COL_FLAGS), tl.constexpr(L.NCOL)
_K = tl.constexpr(L.COL_K)
# per kernel, the flags bits that send a row down its vector path: every address column it reads is 16-byte aligned
_V_SQNORM = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_G))
_V_PERTURB = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_G, L.COL_B))
_V_RESTORE = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_B))
_V_SGD = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_G, L.COL_B, L.COL_S1))
_V_SGD_K = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_G, L.COL_B, L.COL_S1, L.COL_K))
_V_ADAM = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_G, L.COL_B, L.COL_S1, L.COL_S2, L.COL_S3))
_V_ADAM_K = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_G, L.COL_B, L.COL_S1, L.COL_S2, L.COL_S3, L.COL_K))
_V_PAIR = tl.constexpr(L.aligned_mask(L.COL_G, L.COL_K))
_FRESH, _OPT_SHIFT, _HYPER_SHIFT, _SLOT_MASK = (tl.constexpr(L.FLAG_FRESH_STATE), tl.constexpr(L.OPT_SHIFT),
                                                tl.constexpr(L.HYPER_SHIFT), tl.constexpr(L.SLOT_MASK))
_ETA, _RHO, _ADAPTIVE, _EPS, _NOPT = (tl.constexpr(L.OPT_ETA), tl.constexpr(L.OPT_RHO), tl.constexpr(L.OPT_ADAPTIVE),
                                      tl.constexpr(L.OPT_EPS), tl.constexpr(L.NOPT))
_NHYPER = tl.constexpr(L.NHYPER)
# hyper: each fused update's columns, as its class names them (fastasam/backends/_updates.py)
_SGD_LR, _SGD_MOMENTUM, _SGD_OMD, _SGD_WD, _SGD_HAS_MOMENTUM, _SGD_NESTEROV, _SGD_MAXIMIZE = (
    tl.constexpr(SGDUpdate.columns.index(c)) for c in ("lr", "momentum", "one_minus_dampening", "weight_decay",
                                                       "has_momentum", "nesterov", "maximize"))
_ADAM_OMB1, _ADAM_BETA2, _ADAM_OMB2, _ADAM_EPS, _ADAM_WD, _ADAM_DECAY, _ADAM_STEP_SIZE, _ADAM_BC2, _ADAM_AMSGRAD, \
    _ADAM_MAXIMIZE = (tl.constexpr(AdamUpdate.columns.index(c)) for c in (
        "lerp_weight", "beta2", "one_minus_beta2", "eps", "weight_decay", "decay_factor", "step_size", "bc2_sqrt",
        "amsgrad", "maximize"))
_INF: tl.constexpr = tl.constexpr(float("inf"))
_KEEP, _LOOK_FULL, _LOOK_ONE, _GSAM = (tl.constexpr(L.COMBINE_KEEP), tl.constexpr(L.COMBINE_LOOK_FULL),
                                       tl.constexpr(L.COMBINE_LOOK_ONE), tl.constexpr(L.COMBINE_GSAM))

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Triton compile options of every launch of these kernels (and of compile_check): no floating-point contraction (see
# above). Triton 3.6 fuses a * b + c into one multiply-add by default; 3.9 warns that its default will change.
COMPILE_OPTIONS = {"enable_fp_fusion": False}
# Triton's CPU interpreter truncates fp32 -> bf16 where GPUs round to nearest even; under the interpreter the kernels
# round explicitly so that CI checks the numbers a GPU produces.
_ROUND_BF16_BY_HAND: tl.constexpr = tl.constexpr(INTERPRET)
# Under the interpreter every address a vector path uses is checked against its row's mark (a GPU would fault on a
# misaligned 16-byte access; the interpreter would not notice).
_CHECK_VECTOR_ROWS: tl.constexpr = tl.constexpr(INTERPRET)


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
def _div(x, y, ACC: tl.constexpr):
    """IEEE division (``/`` is approximate for fp32 on GPUs)."""
    if ACC == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """IEEE square root (``tl.sqrt`` is approximate for fp32 on GPUs)."""
    if ACC == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _vector(flags, MASK: tl.constexpr, ALIGNED: tl.constexpr):
    """Whether a row takes the vector path: its flags mark every column in ``MASK`` 16-byte aligned. ``ALIGNED``:
    some row of the table may (else the launch compiles the element path alone)."""
    if ALIGNED:
        return (flags & MASK) == MASK
    else:
        return tl.full([], 0, tl.int1)


@triton.jit
def _ptr(rows, row, col: tl.constexpr, DTYPE: tl.constexpr, VEC: tl.constexpr):
    """Column ``col`` of a row as a ``DTYPE`` pointer; ``VEC``: the row's flags mark it 16-byte aligned, which the
    compiler is told (so full blocks become 16-byte vector accesses)."""
    a = tl.load(rows + row * _NCOL + col)
    if VEC:
        if _CHECK_VECTOR_ROWS:
            tl.assume(a % 16 == 0)  # the interpreter raises where the row's mark is wrong
        return tl.multiple_of(a.to(tl.pointer_type(DTYPE)), 16)
    else:
        return a.to(tl.pointer_type(DTYPE))


@triton.jit
def _wgb(rows, row, DTYPE: tl.constexpr, VEC: tl.constexpr):
    """The parameter, gradient and restore-buffer pointers of a row."""
    return _ptr(rows, row, _W, DTYPE, VEC), _ptr(rows, row, _G, DTYPE, VEC), _ptr(rows, row, _B, DTYPE, VEC)


@triton.jit
def _chunk(rows, chunks, pid, CHUNK: tl.constexpr):
    """(row, first element, element count, flags) of program ``pid``'s chunk."""
    row = tl.load(chunks + pid * 2).to(tl.int64)
    start = tl.load(chunks + pid * 2 + 1).to(tl.int64) * CHUNK
    numel = tl.load(rows + row * _NCOL + _NUMEL)
    flags = tl.load(rows + row * _NCOL + _FLAGS)
    return row, start, tl.minimum(numel - start, CHUNK), flags


@triton.jit
def _opt(opts, flags, col: tl.constexpr):
    return tl.load(opts + ((flags >> _OPT_SHIFT) & _SLOT_MASK) * _NOPT + col)


@triton.jit
def _hyper(hyper, flags, col: tl.constexpr):
    return tl.load(hyper + ((flags >> _HYPER_SHIFT) & _SLOT_MASK) * _NHYPER + col)


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
def _sq_row(rows, row, opts, flags, start, length, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
            VEC: tl.constexpr):
    g = _ptr(rows, row, _G, DTYPE, VEC)
    if _opt(opts, flags, _ADAPTIVE) != 0:
        w = _ptr(rows, row, _W, DTYPE, VEC)
        part = _sq_chunk(w, g, start, length, _opt(opts, flags, _ETA).to(ACC), True, ACC, BLOCK)
    else:
        part = _sq_chunk(g, g, start, length, 0.0, False, ACC, BLOCK)
    return part


@triton.jit
def sqnorm_kernel(
    rows, chunks, opts, partials, counter, out, n_programs,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """``out = sum over all chunks of sum((T_w * g)^2)``; ``T_w = |w| + eta`` for adaptive groups, else 1."""
    pid = tl.program_id(0)
    row, start, length, flags = _chunk(rows, chunks, pid, CHUNK)
    if _vector(flags, _V_SQNORM, ALIGNED):
        part = _sq_row(rows, row, opts, flags, start, length, DTYPE, ACC, BLOCK, True)
    else:
        part = _sq_row(rows, row, opts, flags, start, length, DTYPE, ACC, BLOCK, False)
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
        tl.store(b + idx, e, mask=m)
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
def _perturb_row(
    rows, row, opts, flags, start, length, scale, finite,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, COPY: tl.constexpr, VEC: tl.constexpr,
):
    w, g, b = _wgb(rows, row, DTYPE, VEC)
    if _opt(opts, flags, _ADAPTIVE) != 0:
        _perturb_chunk(w, g, b, start, length, _opt(opts, flags, _ETA).to(ACC), scale, finite, True, COPY, ACC,
                       BLOCK)
    else:
        _perturb_chunk(w, g, b, start, length, 0.0, scale, finite, False, COPY, ACC, BLOCK)


@triton.jit
def perturb_kernel(
    rows, chunks, opts, sqnorm,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    COPY: tl.constexpr,
):
    """``w <- w + e``, ``e = T_w^2 * g * scale``; the buffer gets ``w`` (``COPY``) or ``e``.

    ``scale = rho * (1 / (norm + eps))`` with ``norm = sqrt(*sqnorm)`` (the order of torch's ``rho / (norm + eps)``),
    0 when the norm is 0 or not finite; ``e`` is exactly 0 when the norm is not finite."""
    pid = tl.program_id(0)
    row, start, length, flags = _chunk(rows, chunks, pid, CHUNK)
    norm = _sqrt(tl.load(sqnorm).to(ACC), ACC)
    finite = norm < _INF  # NaN compares false
    ok = finite & (norm > 0)
    inv = _div(tl.full([], 1.0, ACC), tl.where(ok, norm + _opt(opts, flags, _EPS).to(ACC), 1.0), ACC)
    scale = tl.where(ok, inv * _opt(opts, flags, _RHO).to(ACC), 0.0)
    if _vector(flags, _V_PERTURB, ALIGNED):
        _perturb_row(rows, row, opts, flags, start, length, scale, finite, DTYPE, ACC, BLOCK, COPY, True)
    else:
        _perturb_row(rows, row, opts, flags, start, length, scale, finite, DTYPE, ACC, BLOCK, COPY, False)


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
def _restore_row(rows, row, start, length, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                 COPY: tl.constexpr, VEC: tl.constexpr):
    w = _ptr(rows, row, _W, DTYPE, VEC)
    b = _ptr(rows, row, _B, DTYPE, VEC)
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK
    for j in range(0, full):
        _restore_block(w, b, start + j * BLOCK + lanes, start + length, COPY, False, ACC)
    if full * BLOCK < length:
        _restore_block(w, b, start + full * BLOCK + lanes, start + length, COPY, True, ACC)


@triton.jit
def restore_kernel(
    rows, chunks,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    COPY: tl.constexpr,
):
    """``w <- saved w`` (``COPY``) or ``w <- w - e``."""
    pid = tl.program_id(0)
    row, start, length, flags = _chunk(rows, chunks, pid, CHUNK)
    if _vector(flags, _V_RESTORE, ALIGNED):
        _restore_row(rows, row, start, length, DTYPE, ACC, BLOCK, COPY, True)
    else:
        _restore_row(rows, row, start, length, DTYPE, ACC, BLOCK, COPY, False)


@triton.jit
def _ratio(num, den):
    """``num / den`` in fp64, 0 where ``den`` is 0."""
    ok = den > 0
    return tl.where(ok, num / tl.where(ok, den, 1.0), 0.0)


@triton.jit
def _gradient(g, k, idx, m, o, xa, ya, DIRECTION: tl.constexpr, ACC: tl.constexpr):
    """The update's gradient: G, or GSAM's direction ``xa * G + ya * K`` (each product rounded, then the sum)."""
    d = tl.load(g + idx, mask=m, other=o).to(ACC)
    if DIRECTION == _GSAM:
        d = xa * d + ya * tl.load(k + idx, mask=m, other=o).to(ACC)
    return d


@triton.jit
def _direction_coefs(sums, alpha, DIRECTION: tl.constexpr, ACC: tl.constexpr):
    """(x, y) of the update's gradient ``x * G + y * K`` in ``ACC`` (1, 0 without a direction)."""
    if DIRECTION == _GSAM:
        a = tl.load(alpha)
        x = 1.0 + a * _ratio(tl.load(sums + 1), tl.load(sums))
        return x.to(ACC), (-a).to(ACC)
    else:
        return tl.full([], 1.0, ACC), tl.full([], 0.0, ACC)


@triton.jit
def _sgd_block(
    w, g, b, mom, k, idx, n, fresh, lr, momentum, one_minus_dampening, weight_decay, has_momentum, nesterov, maximize,
    xa, ya, COPY: tl.constexpr, DIRECTION: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr,
):
    m = idx < n if MASKED else None
    o = 0.0 if MASKED else None
    p = _restored(w, b, idx, n, COPY, MASKED, ACC)
    d = _gradient(g, k, idx, m, o, xa, ya, DIRECTION, ACC)
    if maximize:
        d = -d
    if weight_decay != 0:
        d = d + weight_decay * p
    if has_momentum:
        if fresh:  # torch.optim.SGD's first step: the buffer starts as d
            buf = d
        else:
            buf = tl.load(mom + idx, mask=m, other=o).to(ACC) * momentum + one_minus_dampening * d
        buf = _to(buf, mom.dtype.element_ty)
        tl.store(mom + idx, buf, mask=m)
        if nesterov:
            d = d + momentum * buf.to(ACC)
        else:
            d = buf.to(ACC)
    tl.store(w + idx, _to(p - lr * d, w.dtype.element_ty), mask=m)


@triton.jit
def _k_ptr(rows, row, DTYPE: tl.constexpr, DIRECTION: tl.constexpr, VEC: tl.constexpr):
    """The K column (read only along GSAM's direction, so only then part of the row's vector mark)."""
    if DIRECTION == _GSAM:
        return _ptr(rows, row, _K, DTYPE, VEC)
    else:
        return _ptr(rows, row, _K, DTYPE, False)


@triton.jit
def _sgd_row(
    rows, row, start, length, fresh, lr, momentum, one_minus_dampening, weight_decay, has_momentum, nesterov, maximize,
    xa, ya, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, COPY: tl.constexpr, DIRECTION: tl.constexpr,
    VEC: tl.constexpr,
):
    w, g, b = _wgb(rows, row, DTYPE, VEC)
    mom = _ptr(rows, row, _S1, DTYPE, VEC)
    k = _k_ptr(rows, row, DTYPE, DIRECTION, VEC)
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK
    end = start + length
    for j in range(0, full):
        _sgd_block(w, g, b, mom, k, start + j * BLOCK + lanes, end, fresh, lr, momentum, one_minus_dampening,
                   weight_decay, has_momentum, nesterov, maximize, xa, ya, COPY, DIRECTION, False, ACC)
    if full * BLOCK < length:
        _sgd_block(w, g, b, mom, k, start + full * BLOCK + lanes, end, fresh, lr, momentum, one_minus_dampening,
                   weight_decay, has_momentum, nesterov, maximize, xa, ya, COPY, DIRECTION, True, ACC)


@triton.jit
def restore_sgd_kernel(
    rows, chunks, hyper, sums, alpha,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    COPY: tl.constexpr, DIRECTION: tl.constexpr,
):
    """Restore, then ``torch.optim.SGD``'s update with the second-pass gradient, in one pass over memory.

    Rows: W parameter, G gradient, B restore buffer, S1 momentum buffer (flag FRESH: the buffer is new), K (with
    ``DIRECTION`` = ``COMBINE_GSAM``: GSAM's kept first gradient; the update then steps along GSAM's direction from
    G, K, ``sums`` and ``alpha``, as ``combine_kernel`` computes it). ``hyper`` row: lr, momentum, 1 - dampening,
    weight_decay, has_momentum, nesterov, maximize."""
    pid = tl.program_id(0)
    row, start, length, flags = _chunk(rows, chunks, pid, CHUNK)
    fresh = (flags & _FRESH) != 0
    lr = _hyper(hyper, flags, _SGD_LR)
    momentum = _hyper(hyper, flags, _SGD_MOMENTUM)
    one_minus_dampening = _hyper(hyper, flags, _SGD_OMD)
    weight_decay = _hyper(hyper, flags, _SGD_WD)
    has_momentum = _hyper(hyper, flags, _SGD_HAS_MOMENTUM) != 0
    nesterov = _hyper(hyper, flags, _SGD_NESTEROV) != 0
    maximize = _hyper(hyper, flags, _SGD_MAXIMIZE) != 0
    xa, ya = _direction_coefs(sums, alpha, DIRECTION, ACC)
    if _vector(flags, _V_SGD_K if DIRECTION == _GSAM else _V_SGD, ALIGNED):
        _sgd_row(rows, row, start, length, fresh, lr, momentum, one_minus_dampening, weight_decay, has_momentum,
                 nesterov, maximize, xa, ya, DTYPE, ACC, BLOCK, COPY, DIRECTION, True)
    else:
        _sgd_row(rows, row, start, length, fresh, lr, momentum, one_minus_dampening, weight_decay, has_momentum,
                 nesterov, maximize, xa, ya, DTYPE, ACC, BLOCK, COPY, DIRECTION, False)


@triton.jit
def _adam_block(
    w, g, b, m1, m2, vmax, k, idx, n, lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size,
    bc2_sqrt, amsgrad, maximize, xa, ya,
    COPY: tl.constexpr, DIRECTION: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr,
):
    m = idx < n if MASKED else None
    o = 0.0 if MASKED else None
    p = _restored(w, b, idx, n, COPY, MASKED, ACC)
    d = _gradient(g, k, idx, m, o, xa, ya, DIRECTION, ACC)
    if maximize:
        d = -d
    if decay_factor != 1:  # AdamW: p *= 1 - lr * weight_decay
        p = p * decay_factor
    if weight_decay != 0:  # Adam: L2 penalty in the gradient
        d = d + weight_decay * p
    mv = tl.load(m1 + idx, mask=m, other=o).to(ACC)
    if lerp_weight < 0.5:  # torch's lerp(m, d, 1 - beta1), both branches as torch computes them
        mv = mv + lerp_weight * (d - mv)
    else:
        mv = d - (d - mv) * (1.0 - lerp_weight)
    vv = tl.load(m2 + idx, mask=m, other=o).to(ACC) * beta2 + one_minus_beta2 * d * d
    # stored rounded; the update uses the fp32 values, as torch's fused Adam does
    tl.store(m1 + idx, _to(mv, m1.dtype.element_ty), mask=m)
    tl.store(m2 + idx, _to(vv, m2.dtype.element_ty), mask=m)
    if amsgrad:
        vv = tl.maximum(tl.load(vmax + idx, mask=m, other=o).to(ACC), vv)
        tl.store(vmax + idx, _to(vv, vmax.dtype.element_ty), mask=m)
    denom = _div(_sqrt(vv, ACC), bc2_sqrt, ACC) + eps
    tl.store(w + idx, _to(p - step_size * _div(mv, denom, ACC), w.dtype.element_ty), mask=m)


@triton.jit
def _adam_row(
    rows, row, start, length, lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size,
    bc2_sqrt, amsgrad, maximize, xa, ya,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, COPY: tl.constexpr, DIRECTION: tl.constexpr,
    VEC: tl.constexpr,
):
    w, g, b = _wgb(rows, row, DTYPE, VEC)
    m1 = _ptr(rows, row, _S1, DTYPE, VEC)
    m2 = _ptr(rows, row, _S2, DTYPE, VEC)
    vmax = _ptr(rows, row, _S3, DTYPE, VEC)
    k = _k_ptr(rows, row, DTYPE, DIRECTION, VEC)
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK
    end = start + length
    for j in range(0, full):
        _adam_block(w, g, b, m1, m2, vmax, k, start + j * BLOCK + lanes, end, lerp_weight, beta2, one_minus_beta2,
                    eps, weight_decay, decay_factor, step_size, bc2_sqrt, amsgrad, maximize, xa, ya, COPY, DIRECTION,
                    False, ACC)
    if full * BLOCK < length:
        _adam_block(w, g, b, m1, m2, vmax, k, start + full * BLOCK + lanes, end, lerp_weight, beta2, one_minus_beta2,
                    eps, weight_decay, decay_factor, step_size, bc2_sqrt, amsgrad, maximize, xa, ya, COPY, DIRECTION,
                    True, ACC)


@triton.jit
def restore_adam_kernel(
    rows, chunks, hyper, sums, alpha,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    COPY: tl.constexpr, DIRECTION: tl.constexpr,
):
    """Restore, then ``torch.optim.Adam`` / ``AdamW``'s update. Rows: W, G, B, S1 exp_avg, S2 exp_avg_sq,
    S3 max_exp_avg_sq (amsgrad), K (``DIRECTION``: as ``restore_sgd_kernel``). ``hyper`` row: 1 - beta1, beta2,
    1 - beta2, eps, weight_decay (L2; 0 for AdamW), 1 - lr * weight_decay (AdamW; else 1), lr / (1 - beta1^step),
    sqrt(1 - beta2^step), amsgrad, maximize."""
    pid = tl.program_id(0)
    row, start, length, flags = _chunk(rows, chunks, pid, CHUNK)
    lerp_weight = _hyper(hyper, flags, _ADAM_OMB1)
    beta2 = _hyper(hyper, flags, _ADAM_BETA2)
    one_minus_beta2 = _hyper(hyper, flags, _ADAM_OMB2)
    eps = _hyper(hyper, flags, _ADAM_EPS)
    weight_decay = _hyper(hyper, flags, _ADAM_WD)
    decay_factor = _hyper(hyper, flags, _ADAM_DECAY)
    step_size = _hyper(hyper, flags, _ADAM_STEP_SIZE)
    bc2_sqrt = _hyper(hyper, flags, _ADAM_BC2)
    amsgrad = _hyper(hyper, flags, _ADAM_AMSGRAD) != 0
    maximize = _hyper(hyper, flags, _ADAM_MAXIMIZE) != 0
    xa, ya = _direction_coefs(sums, alpha, DIRECTION, ACC)
    if _vector(flags, _V_ADAM_K if DIRECTION == _GSAM else _V_ADAM, ALIGNED):
        _adam_row(rows, row, start, length, lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
                  step_size, bc2_sqrt, amsgrad, maximize, xa, ya, DTYPE, ACC, BLOCK, COPY, DIRECTION, True)
    else:
        _adam_row(rows, row, start, length, lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
                  step_size, bc2_sqrt, amsgrad, maximize, xa, ya, DTYPE, ACC, BLOCK, COPY, DIRECTION, False)


# --- LookSAM / GSAM (fastasam/_decompose.py): rows hold a gradient in G and the kept buffer in K --------------------


@triton.jit
def _dots_block(g, k, idx, n, MASKED: tl.constexpr, ACC: tl.constexpr):
    m = idx < n if MASKED else None
    o = 0.0 if MASKED else None
    a = tl.load(g + idx, mask=m, other=o).to(ACC)
    b = tl.load(k + idx, mask=m, other=o).to(ACC)
    # products rounded in ACC, summed in fp64 (LookSAM's g_v is the difference of nearly parallel vectors)
    return (a * a).to(tl.float64), (a * b).to(tl.float64), (b * b).to(tl.float64)


@triton.jit
def _dots_row(rows, row, start, length, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
              VEC: tl.constexpr):
    """The chunk's three sums (G*G, G*K, K*K) in fp64."""
    g = _ptr(rows, row, _G, DTYPE, VEC)
    k = _ptr(rows, row, _K, DTYPE, VEC)
    lanes = tl.arange(0, BLOCK)
    gg = tl.zeros([BLOCK], tl.float64)
    gk = tl.zeros([BLOCK], tl.float64)
    kk = tl.zeros([BLOCK], tl.float64)
    full = length // BLOCK
    for j in range(0, full):
        x, y, z = _dots_block(g, k, start + j * BLOCK + lanes, start + length, False, ACC)
        gg += x
        gk += y
        kk += z
    if full * BLOCK < length:
        x, y, z = _dots_block(g, k, start + full * BLOCK + lanes, start + length, True, ACC)
        gg += x
        gk += y
        kk += z
    return tl.sum(gg, axis=0), tl.sum(gk, axis=0), tl.sum(kk, axis=0)


@triton.jit
def dots_kernel(
    rows, chunks, partials, counter, out, n_programs,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """``out[0..2] = sums over all chunks of (G*G, G*K, K*K)`` in fp64; deterministic like ``sqnorm_kernel``
    (``partials``: fp64[3 * n_programs])."""
    pid = tl.program_id(0)
    row, start, length, flags = _chunk(rows, chunks, pid, CHUNK)
    if _vector(flags, _V_PAIR, ALIGNED):
        gg, gk, kk = _dots_row(rows, row, start, length, DTYPE, ACC, BLOCK, True)
    else:
        gg, gk, kk = _dots_row(rows, row, start, length, DTYPE, ACC, BLOCK, False)
    tl.store(partials + pid * 3, gg)
    tl.store(partials + pid * 3 + 1, gk)
    tl.store(partials + pid * 3 + 2, kk)
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
    if ticket == n_programs - 1:  # the last program: fixed-order sums of the partials
        tl.debug_barrier()
        lanes = tl.arange(0, BLOCK)
        t0 = tl.zeros([BLOCK], tl.float64)
        t1 = tl.zeros([BLOCK], tl.float64)
        t2 = tl.zeros([BLOCK], tl.float64)
        for base in range(0, n_programs, BLOCK):
            idx = base + lanes
            m = idx < n_programs
            t0 += tl.load(partials + idx * 3, mask=m, other=0.0, volatile=True)
            t1 += tl.load(partials + idx * 3 + 1, mask=m, other=0.0, volatile=True)
            t2 += tl.load(partials + idx * 3 + 2, mask=m, other=0.0, volatile=True)
        tl.store(out, tl.sum(t0, axis=0))
        tl.store(out + 1, tl.sum(t1, axis=0))
        tl.store(out + 2, tl.sum(t2, axis=0))
        tl.atomic_xchg(counter, 0)


@triton.jit
def _combine_block(t, o, idx, n, x, y, MODE: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr):
    m = idx < n if MASKED else None
    z = 0.0 if MASKED else None
    ov = tl.load(o + idx, mask=m, other=z)
    if MODE == _KEEP:
        tl.store(t + idx, ov, mask=m)
    else:
        tv = tl.load(t + idx, mask=m, other=z).to(ACC)
        tl.store(t + idx, _to(x * tv + y * ov.to(ACC), t.dtype.element_ty), mask=m)


@triton.jit
def _combine_row(rows, row, start, length, xa, ya, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                 MODE: tl.constexpr, VEC: tl.constexpr):
    g = _ptr(rows, row, _G, DTYPE, VEC)
    k = _ptr(rows, row, _K, DTYPE, VEC)
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK
    if MODE == _LOOK_ONE or MODE == _GSAM:
        t, o = g, k
    else:
        t, o = k, g
    for j in range(0, full):
        _combine_block(t, o, start + j * BLOCK + lanes, start + length, xa, ya, MODE, False, ACC)
    if full * BLOCK < length:
        _combine_block(t, o, start + full * BLOCK + lanes, start + length, xa, ya, MODE, True, ACC)


@triton.jit
def combine_kernel(
    rows, chunks, sums, alpha,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    MODE: tl.constexpr,
):
    """``target <- x * target + y * other`` (``MODE``: ``_layout.COMBINE_*``); ``x``, ``y`` from ``sums`` =
    (gg, gb, bb) and ``alpha`` (fp64 device scalars) in fp64, rounded once to ``ACC``."""
    pid = tl.program_id(0)
    row, start, length, flags = _chunk(rows, chunks, pid, CHUNK)
    x = tl.full([], 1.0, tl.float64)
    y = tl.full([], 1.0, tl.float64)
    if MODE == _LOOK_FULL:  # K <- G - (gk / kk) K
        x = -_ratio(tl.load(sums + 1), tl.load(sums + 2))
    elif MODE == _LOOK_ONE:  # G <- G + alpha (sqrt(gg) / sqrt(kk)) K
        y = tl.load(alpha) * _ratio(tl.sqrt(tl.load(sums)), tl.sqrt(tl.load(sums + 2)))
    xa = x.to(ACC)
    ya = y.to(ACC)
    if MODE == _GSAM:  # G <- (1 + alpha gk / gg) G - alpha K
        xa, ya = _direction_coefs(sums, alpha, MODE, ACC)
    if _vector(flags, _V_PAIR, ALIGNED):
        _combine_row(rows, row, start, length, xa, ya, DTYPE, ACC, BLOCK, MODE, True)
    else:
        _combine_row(rows, row, start, length, xa, ya, DTYPE, ACC, BLOCK, MODE, False)


# --- Momentum-SAM (fastasam.MSAM): W at w~, G, B (the kept copy of w, COPY), S1 momentum / exp_avg, S2 exp_avg_sq,
# S3 max_exp_avg_sq; ``factors``: each param group's factor ``a`` of the perturbation in place ----------------------

_V_MSAM_SGD = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_G, L.COL_S1))
_V_MSAM_SGD_COPY = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_G, L.COL_S1, L.COL_B))
_V_MSAM_ADAM = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_G, L.COL_S1, L.COL_S2, L.COL_S3))
_V_MSAM_ADAM_COPY = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_G, L.COL_S1, L.COL_S2, L.COL_S3, L.COL_B))
_V_MSAM_PERTURB = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_S1))
_V_MSAM_PERTURB_COPY = tl.constexpr(L.aligned_mask(L.COL_W, L.COL_S1, L.COL_B))


@triton.jit
def _moved_back(w, b, mv, idx, m, o, a, COPY: tl.constexpr, ACC: tl.constexpr):
    """``(w~, w)``: the weight as loaded and moved back, ``w~ + a * m`` rounded to the storage dtype, or the kept
    copy (``COPY``)."""
    wt = tl.load(w + idx, mask=m, other=o).to(ACC)
    if COPY:
        p = tl.load(b + idx, mask=m, other=o).to(ACC)
    else:
        p = _to(wt + a * mv, w.dtype.element_ty).to(ACC)
    return wt, p


@triton.jit
def _msam_sgd_block(
    w, g, b, mom, idx, n, a, eta, lr, momentum, one_minus_dampening, weight_decay, maximize,
    ADAPTIVE: tl.constexpr, COPY: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr,
):
    m = idx < n if MASKED else None
    o = 0.0 if MASKED else None
    mv = tl.load(mom + idx, mask=m, other=o).to(ACC)
    wt, p = _moved_back(w, b, mv, idx, m, o, a, COPY, ACC)
    d = tl.load(g + idx, mask=m, other=o).to(ACC)
    if maximize:
        d = -d
    if weight_decay != 0:
        d = d + weight_decay * wt
    mv = _to(mv * momentum + one_minus_dampening * d, mom.dtype.element_ty)
    tl.store(mom + idx, mv, mask=m)
    wn = _to(p - lr * mv.to(ACC), w.dtype.element_ty)
    tl.store(w + idx, wn, mask=m)
    x = mv.to(ACC)
    if ADAPTIVE:
        x = (tl.abs(wn.to(ACC)) + eta) * x
    x = x * x
    if MASKED:
        x = tl.where(m, x, 0.0)
    return x


@triton.jit
def _msam_sgd_row(
    rows, row, start, length, a, eta, lr, momentum, one_minus_dampening, weight_decay, maximize,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ADAPTIVE: tl.constexpr, COPY: tl.constexpr,
    VEC: tl.constexpr,
):
    w, g, b = _wgb(rows, row, DTYPE, VEC)
    mom = _ptr(rows, row, _S1, DTYPE, VEC)
    acc = tl.zeros([BLOCK], ACC)
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK
    end = start + length
    for j in range(0, full):
        acc += _msam_sgd_block(w, g, b, mom, start + j * BLOCK + lanes, end, a, eta, lr, momentum,
                               one_minus_dampening, weight_decay, maximize, ADAPTIVE, COPY, False, ACC)
    if full * BLOCK < length:
        acc += _msam_sgd_block(w, g, b, mom, start + full * BLOCK + lanes, end, a, eta, lr, momentum,
                               one_minus_dampening, weight_decay, maximize, ADAPTIVE, COPY, True, ACC)
    return tl.sum(acc, axis=0)


@triton.jit
def _sum_partials(partials, counter, out, pid, part, n_programs, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Each program's partial into its slot; the last program to finish adds them in a fixed order into ``out`` and
    resets the counter (as ``sqnorm_kernel``)."""
    tl.store(partials + pid, part)
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
    if ticket == n_programs - 1:
        tl.debug_barrier()
        lanes = tl.arange(0, BLOCK)
        total = tl.zeros([BLOCK], ACC)
        for base in range(0, n_programs, BLOCK):
            idx = base + lanes
            total += tl.load(partials + idx, mask=idx < n_programs, other=0.0, volatile=True)
        tl.store(out, tl.sum(total, axis=0))
        tl.atomic_xchg(counter, 0)


@triton.jit
def msam_sgd_kernel(
    rows, chunks, hyper, opts, factors, partials, counter, out, n_programs,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    COPY: tl.constexpr,
):
    """Move back (``w = w~ + a * m``, or the kept copy), then the authors' SGD step with the gradient taken at ``w~``
    (``d = g + weight_decay * w~``, ``m = momentum * m + d``, ``w = w - lr * m``); ``out = sum((T * m)^2)`` over all
    chunks, deterministic as ``sqnorm_kernel``. ``hyper`` row: ``restore_sgd_kernel``'s."""
    pid = tl.program_id(0)
    row, start, length, flags = _chunk(rows, chunks, pid, CHUNK)
    a = tl.load(factors + ((flags >> _OPT_SHIFT) & _SLOT_MASK)).to(ACC)
    lr = _hyper(hyper, flags, _SGD_LR)
    momentum = _hyper(hyper, flags, _SGD_MOMENTUM)
    one_minus_dampening = _hyper(hyper, flags, _SGD_OMD)
    weight_decay = _hyper(hyper, flags, _SGD_WD)
    maximize = _hyper(hyper, flags, _SGD_MAXIMIZE) != 0
    adaptive = _opt(opts, flags, _ADAPTIVE) != 0
    eta = _opt(opts, flags, _ETA).to(ACC)
    vec = _vector(flags, _V_MSAM_SGD_COPY if COPY else _V_MSAM_SGD, ALIGNED)
    if adaptive:
        if vec:
            part = _msam_sgd_row(rows, row, start, length, a, eta, lr, momentum, one_minus_dampening, weight_decay,
                                 maximize, DTYPE, ACC, BLOCK, True, COPY, True)
        else:
            part = _msam_sgd_row(rows, row, start, length, a, eta, lr, momentum, one_minus_dampening, weight_decay,
                                 maximize, DTYPE, ACC, BLOCK, True, COPY, False)
    else:
        if vec:
            part = _msam_sgd_row(rows, row, start, length, a, eta, lr, momentum, one_minus_dampening, weight_decay,
                                 maximize, DTYPE, ACC, BLOCK, False, COPY, True)
        else:
            part = _msam_sgd_row(rows, row, start, length, a, eta, lr, momentum, one_minus_dampening, weight_decay,
                                 maximize, DTYPE, ACC, BLOCK, False, COPY, False)
    _sum_partials(partials, counter, out, pid, part, n_programs, ACC, BLOCK)


@triton.jit
def _msam_adam_block(
    w, g, b, m1, m2, vmax, idx, n, a, eta, lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
    step_size, bc2_sqrt, amsgrad, maximize,
    ADAPTIVE: tl.constexpr, COPY: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr,
):
    m = idx < n if MASKED else None
    o = 0.0 if MASKED else None
    mv = tl.load(m1 + idx, mask=m, other=o).to(ACC)
    wt, p = _moved_back(w, b, mv, idx, m, o, a, COPY, ACC)
    d = tl.load(g + idx, mask=m, other=o).to(ACC)
    if maximize:
        d = -d
    if weight_decay != 0:  # Adam: the L2 term at w~
        d = d + weight_decay * wt
    if lerp_weight < 0.5:
        mv = mv + lerp_weight * (d - mv)
    else:
        mv = d - (d - mv) * (1.0 - lerp_weight)
    vv = tl.load(m2 + idx, mask=m, other=o).to(ACC) * beta2 + one_minus_beta2 * d * d
    ms = _to(mv, m1.dtype.element_ty)
    tl.store(m1 + idx, ms, mask=m)
    tl.store(m2 + idx, _to(vv, m2.dtype.element_ty), mask=m)
    if amsgrad:
        vv = tl.maximum(tl.load(vmax + idx, mask=m, other=o).to(ACC), vv)
        tl.store(vmax + idx, _to(vv, vmax.dtype.element_ty), mask=m)
    denom = _div(_sqrt(vv, ACC), bc2_sqrt, ACC) + eps
    wn = p - step_size * _div(mv, denom, ACC)
    if decay_factor != 1:  # AdamW: the decoupled decay after the update
        wn = wn * decay_factor
    wn = _to(wn, w.dtype.element_ty)
    tl.store(w + idx, wn, mask=m)
    x = ms.to(ACC)
    if ADAPTIVE:
        x = (tl.abs(wn.to(ACC)) + eta) * x
    x = x * x
    if MASKED:
        x = tl.where(m, x, 0.0)
    return x


@triton.jit
def _msam_adam_row(
    rows, row, start, length, a, eta, lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
    step_size, bc2_sqrt, amsgrad, maximize,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ADAPTIVE: tl.constexpr, COPY: tl.constexpr,
    VEC: tl.constexpr,
):
    w, g, b = _wgb(rows, row, DTYPE, VEC)
    m1 = _ptr(rows, row, _S1, DTYPE, VEC)
    m2 = _ptr(rows, row, _S2, DTYPE, VEC)
    vmax = _ptr(rows, row, _S3, DTYPE, VEC)
    acc = tl.zeros([BLOCK], ACC)
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK
    end = start + length
    for j in range(0, full):
        acc += _msam_adam_block(w, g, b, m1, m2, vmax, start + j * BLOCK + lanes, end, a, eta, lerp_weight, beta2,
                                one_minus_beta2, eps, weight_decay, decay_factor, step_size, bc2_sqrt, amsgrad,
                                maximize, ADAPTIVE, COPY, False, ACC)
    if full * BLOCK < length:
        acc += _msam_adam_block(w, g, b, m1, m2, vmax, start + full * BLOCK + lanes, end, a, eta, lerp_weight, beta2,
                                one_minus_beta2, eps, weight_decay, decay_factor, step_size, bc2_sqrt, amsgrad,
                                maximize, ADAPTIVE, COPY, True, ACC)
    return tl.sum(acc, axis=0)


@triton.jit
def msam_adam_kernel(
    rows, chunks, hyper, opts, factors, partials, counter, out, n_programs,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    COPY: tl.constexpr,
):
    """Move back, then the authors' AdamW step (its decoupled decay after the update; Adam's L2 term at ``w~``);
    ``out = sum((T * m)^2)`` of the new ``exp_avg`` as stored. ``hyper`` row: ``restore_adam_kernel``'s."""
    pid = tl.program_id(0)
    row, start, length, flags = _chunk(rows, chunks, pid, CHUNK)
    a = tl.load(factors + ((flags >> _OPT_SHIFT) & _SLOT_MASK)).to(ACC)
    lerp_weight = _hyper(hyper, flags, _ADAM_OMB1)
    beta2 = _hyper(hyper, flags, _ADAM_BETA2)
    one_minus_beta2 = _hyper(hyper, flags, _ADAM_OMB2)
    eps = _hyper(hyper, flags, _ADAM_EPS)
    weight_decay = _hyper(hyper, flags, _ADAM_WD)
    decay_factor = _hyper(hyper, flags, _ADAM_DECAY)
    step_size = _hyper(hyper, flags, _ADAM_STEP_SIZE)
    bc2_sqrt = _hyper(hyper, flags, _ADAM_BC2)
    amsgrad = _hyper(hyper, flags, _ADAM_AMSGRAD) != 0
    maximize = _hyper(hyper, flags, _ADAM_MAXIMIZE) != 0
    adaptive = _opt(opts, flags, _ADAPTIVE) != 0
    eta = _opt(opts, flags, _ETA).to(ACC)
    vec = _vector(flags, _V_MSAM_ADAM_COPY if COPY else _V_MSAM_ADAM, ALIGNED)
    if adaptive:
        if vec:
            part = _msam_adam_row(rows, row, start, length, a, eta, lerp_weight, beta2, one_minus_beta2, eps,
                                  weight_decay, decay_factor, step_size, bc2_sqrt, amsgrad, maximize, DTYPE, ACC,
                                  BLOCK, True, COPY, True)
        else:
            part = _msam_adam_row(rows, row, start, length, a, eta, lerp_weight, beta2, one_minus_beta2, eps,
                                  weight_decay, decay_factor, step_size, bc2_sqrt, amsgrad, maximize, DTYPE, ACC,
                                  BLOCK, True, COPY, False)
    else:
        if vec:
            part = _msam_adam_row(rows, row, start, length, a, eta, lerp_weight, beta2, one_minus_beta2, eps,
                                  weight_decay, decay_factor, step_size, bc2_sqrt, amsgrad, maximize, DTYPE, ACC,
                                  BLOCK, False, COPY, True)
        else:
            part = _msam_adam_row(rows, row, start, length, a, eta, lerp_weight, beta2, one_minus_beta2, eps,
                                  weight_decay, decay_factor, step_size, bc2_sqrt, amsgrad, maximize, DTYPE, ACC,
                                  BLOCK, False, COPY, False)
    _sum_partials(partials, counter, out, pid, part, n_programs, ACC, BLOCK)


@triton.jit
def _msam_perturb_block(w, mom, b, idx, n, eta, a, ADAPTIVE: tl.constexpr, COPY: tl.constexpr,
                        MASKED: tl.constexpr, ACC: tl.constexpr):
    m = idx < n if MASKED else None
    o = 0.0 if MASKED else None
    wv = tl.load(w + idx, mask=m, other=o)
    if COPY:
        tl.store(b + idx, wv, mask=m)
    wa = wv.to(ACC)
    mv = tl.load(mom + idx, mask=m, other=o).to(ACC)
    if ADAPTIVE:
        t = tl.abs(wa) + eta
        e = t * (t * mv) * a
    else:
        e = mv * a
    tl.store(w + idx, _to(wa - e, w.dtype.element_ty), mask=m)


@triton.jit
def _msam_perturb_row(rows, row, start, length, eta, a, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                      ADAPTIVE: tl.constexpr, COPY: tl.constexpr, VEC: tl.constexpr):
    w = _ptr(rows, row, _W, DTYPE, VEC)
    mom = _ptr(rows, row, _S1, DTYPE, VEC)
    b = _ptr(rows, row, _B, DTYPE, VEC)
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK
    for j in range(0, full):
        _msam_perturb_block(w, mom, b, start + j * BLOCK + lanes, start + length, eta, a, ADAPTIVE, COPY, False, ACC)
    if full * BLOCK < length:
        _msam_perturb_block(w, mom, b, start + full * BLOCK + lanes, start + length, eta, a, ADAPTIVE, COPY, True, ACC)


@triton.jit
def msam_perturb_kernel(
    rows, chunks, opts, sqnorm, factors,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    COPY: tl.constexpr,
):
    """``w~ = w - a * T^2 * m``, ``a = rho * (1 / (sqrt(*sqnorm) + eps))`` (0 when that norm is 0 or not finite, as
    ``perturb_kernel``'s scale), written into ``factors[group]`` for the next step (every program of a group writes
    the same value); with ``COPY`` the kept copy gets ``w`` first."""
    pid = tl.program_id(0)
    row, start, length, flags = _chunk(rows, chunks, pid, CHUNK)
    norm = _sqrt(tl.load(sqnorm).to(ACC), ACC)
    ok = (norm < _INF) & (norm > 0)
    inv = _div(tl.full([], 1.0, ACC), tl.where(ok, norm + _opt(opts, flags, _EPS).to(ACC), 1.0), ACC)
    a = tl.where(ok, inv * _opt(opts, flags, _RHO).to(ACC), 0.0)
    tl.store(factors + ((flags >> _OPT_SHIFT) & _SLOT_MASK), a)
    eta = _opt(opts, flags, _ETA).to(ACC)
    vec = _vector(flags, _V_MSAM_PERTURB_COPY if COPY else _V_MSAM_PERTURB, ALIGNED)
    if _opt(opts, flags, _ADAPTIVE) != 0:
        if vec:
            _msam_perturb_row(rows, row, start, length, eta, a, DTYPE, ACC, BLOCK, True, COPY, True)
        else:
            _msam_perturb_row(rows, row, start, length, eta, a, DTYPE, ACC, BLOCK, True, COPY, False)
    else:
        if vec:
            _msam_perturb_row(rows, row, start, length, eta, a, DTYPE, ACC, BLOCK, False, COPY, True)
        else:
            _msam_perturb_row(rows, row, start, length, eta, a, DTYPE, ACC, BLOCK, False, COPY, False)
