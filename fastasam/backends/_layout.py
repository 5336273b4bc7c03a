"""The layout of the device tables the multi-tensor kernels read (Triton: ``kernels/multi_tensor.py``; CUDA:
``csrc/multi_tensor.h`` repeats these numbers and ``tests/test_cuda_backend.py`` checks that they agree).

``rows``   int64[N, NCOL]  one row per tensor: addresses (0 = unused) and the element count and flags;
``chunks`` int32[C, 2]     (row, chunk number) per program / block;
``opts``   ACC[G, NOPT]    per parameter group of the sharpness-aware step;
``hyper``  fp32[H, NHYPER] per base-optimizer group, for the fused restore + update.

LookSAM / GSAM read two columns of a ``rows`` table: G = a parameter's gradient and K = the variant's kept buffer
(``g`` or LookSAM's ``g_v``); ``dots`` sums ``(G*G, G*K, K*K)`` into fp64[3] and ``combine`` (mode ``COMBINE_*``)
rewrites one of the two columns from the other and those sums. They run over the step plan's own tables (the fused
update's, the first step's: ``_multi_tensor``) or over tables of their own (``fastasam/_decompose.py``).

Which of these tables each kernel takes, and in what order every implementation takes them: ``_signatures``.
"""

# rows: columns
COL_W, COL_G, COL_B, COL_S1, COL_S2, COL_S3, COL_NUMEL, COL_FLAGS = range(8)
COL_K = 8  # the variants' kept buffer (g, LookSAM's g_v; the fused update's direction COMBINE_GSAM reads g); 0: unused
NCOL = 9
# rows: the flags word
FLAG_FRESH_STATE = 2  # the optimizer state of this row is new this step (torch.optim.SGD: momentum = d_p)
OPT_SHIFT = 8  # bits 8..31: the row's index into ``opts``
HYPER_SHIFT = 32  # bits 32..55: the row's index into ``hyper``
SLOT_MASK = (1 << 24) - 1
# bits 56..62: which address columns hold a 16-byte aligned address (bit ALIGN_SHIFT + i for POINTER_COLS[i]; an
# unused column's 0 is aligned). The host sets them from the addresses wherever it writes a table
# (``_multi_tensor._mark_aligned``); a Triton kernel takes its vector path for a row whose bits cover every column it
# reads (``aligned_mask``), else its element path. The CUDA kernels look at the addresses themselves.
ALIGN_SHIFT = 56
POINTER_COLS = (COL_W, COL_G, COL_B, COL_S1, COL_S2, COL_S3, COL_K)


def aligned_mask(*cols: int) -> int:
    """The flags bits that mark the address columns ``cols`` (of ``POINTER_COLS``) 16-byte aligned."""
    return sum(1 << (ALIGN_SHIFT + POINTER_COLS.index(c)) for c in set(cols))


# opts: columns
OPT_ETA, OPT_RHO, OPT_ADAPTIVE, OPT_EPS = range(4)
NOPT = 4

NHYPER = 10  # hyper: columns per row, room for the widest update's (each update's own: ``_updates``)

# combine: modes (target <- x * target + y * other; x, y from the sums (gg, gb, bb) and alpha, in fp64)
COMBINE_KEEP = 0  # K <- G (the first pass's gradient, kept)
COMBINE_LOOK_FULL = 1  # K <- G - (gk / kk) * K: LookSAM's g_v from g_s (in G) and g (in K)
COMBINE_LOOK_ONE = 2  # G <- G + alpha * (sqrt(gg) / sqrt(kk)) * K: LookSAM's one-pass direction
COMBINE_GSAM = 3  # G <- (1 + alpha * gk / gg) * G - alpha * K: GSAM's direction from g_s (in G) and g (in K)

# the storage dtypes' codes the C kernels take (multi_tensor.h: FA_FLOAT32, FA_FLOAT16, FA_BFLOAT16)
DTYPE_CODE_NAMES = {"float32": 0, "float16": 1, "bfloat16": 2}
