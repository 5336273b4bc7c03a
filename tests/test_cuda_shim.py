"""The ``cuda`` backend's kernels on the CPU (``csrc/cpu_shim``): the shim itself, direct launches the optimizer never
makes (offsets past 2^31, determinism under any block order), and bugs planted in ``csrc/multi_tensor.cu`` that the
shim must catch. The optimizer suite and the oracle tests run over the shim as the ``cuda_shim`` backend
(conftest adds it to ``FAST_CASES``)."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from conftest import SHIM_ERROR, SHIM_WANTED, soup_loss

import fastasam
from fastasam.backends import _layout as L
from fastasam.testing import cuda_shim

pytestmark = pytest.mark.skipif(not SHIM_WANTED, reason="FASTASAM_CUDA_SHIM=0: the CUDA kernels' CPU shim is off")


def test_the_shim_is_built_and_serves_the_cuda_kernels_on_the_cpu():
    """A build failure must fail here, not silently drop the shim from FAST_CASES."""
    assert SHIM_ERROR is None, SHIM_ERROR
    assert "cuda_shim" in fastasam.available_backends("cpu")
    assert "cuda_shim" not in fastasam.available_backends("meta")
    assert fastasam.backends.resolve("auto", torch.device("cpu")).name != "cuda_shim"  # a test backend only


# --- storage conversions ------------------------------------------------------------------------------------------


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _bits_f32(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u))[0]


def test_half_and_bfloat16_conversions_round_like_torch():
    """All 65,536 halves to float; every midpoint between neighbouring halves (ties to even) and random floats back;
    bfloat16 the same way, each against PyTorch's conversion."""
    lib = cuda_shim.enable().lib
    halves = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    want = halves.float()
    got = torch.tensor([lib.fa_shim_half_to_float(int(h) & 0xFFFF) for h in halves.view(torch.int16)])
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])

    finite = want[want.isfinite()].double().unique()
    mids = ((finite[1:] + finite[:-1]) / 2).float()  # exact in fp32
    gen = torch.Generator().manual_seed(3)
    rand = torch.randint(0, 1 << 32, (20000,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.98e-8, 6.0e-8, 6.1e-5, math.inf, -math.inf])
    for x in (mids, rand, edges):
        x = x[~x.isnan()]
        got = torch.tensor([lib.fa_shim_float_to_half(float(v)) for v in x], dtype=torch.int32)
        want = x.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
        assert torch.equal(got, want)
        ties = torch.tensor([_bits_f32((_f32_bits(float(v)) & 0xFFFF0000) | 0x8000) for v in x[:5000]])
        for y in (x, ties):
            y = y[~y.isnan()]
            got = torch.tensor([lib.fa_shim_float_to_bf16(float(v)) for v in y], dtype=torch.int32)
            assert torch.equal(got, y.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF)
    nan = lib.fa_shim_float_to_half(math.nan)
    assert nan & 0x7C00 == 0x7C00 and nan & 0x3FF
    assert math.isnan(lib.fa_shim_half_to_float(lib.fa_shim_float_to_bf16(math.nan) | 0x7C00))


# --- direct launches ------------------------------------------------------------------------------------------------


def _tables(rows: list[list[int]], chunks: list[tuple[int, int]], opts=(0.01, 0.5, 1.0, 1e-12)):
    rows_t = torch.tensor(rows, dtype=torch.int64).reshape(-1, L.NCOL)
    return rows_t, torch.tensor(chunks, dtype=torch.int32).reshape(-1, 2), torch.tensor([opts], dtype=torch.float32)


def _row(w=0, g=0, b=0, numel=0, flags=0) -> list[int]:
    row = [0] * L.NCOL
    row[L.COL_W], row[L.COL_G], row[L.COL_B], row[L.COL_NUMEL], row[L.COL_FLAGS] = w, g, b, numel, flags
    return row


def _sqnorm(shim, rows, chunks, opts, count=None) -> torch.Tensor:
    count = chunks.shape[0] if count is None else count
    partials, counter, out = torch.zeros(count), torch.zeros(1, dtype=torch.int32), torch.zeros(1)
    shim.launch("sqnorm", 0, rows.data_ptr(), chunks.data_ptr(), opts.data_ptr(), count, cuda_shim.CHUNK,
                partials.data_ptr(), counter.data_ptr(), out.data_ptr(), None)
    assert counter.item() == 0  # reset for the next launch
    return out


def _ranges(shim, *tensors) -> None:
    pairs = torch.tensor([[t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()] for t in tensors])
    shim.lib.fa_shim_set_ranges(pairs.data_ptr(), len(tensors))


@pytest.mark.parametrize("bug", [None, "32-bit-offsets"])
def test_offsets_past_2_to_the_31_elements_address_the_right_memory(planted, bug):
    """A row of 2^31 + 3,000 elements of which only the last chunks are launched: the table's address is shifted so
    that exactly those elements land in a real buffer, and the shim allows that buffer only. 32-bit offset arithmetic
    (planted) touches other memory: an out-of-bounds report."""
    planted(bug)
    if bug is not None:
        with pytest.raises(RuntimeError, match="out-of-bounds"):
            _offsets_past_2_to_the_31()
    else:
        _offsets_past_2_to_the_31()


def _offsets_past_2_to_the_31() -> None:
    shim = cuda_shim.enable()
    numel, chunk = (1 << 31) + 3000, cuda_shim.CHUNK
    first = (1 << 31) // chunk  # the chunk that starts at element 2^31
    start, tail = first * chunk, numel - first * chunk
    w, g, buf = torch.randn(tail), torch.randn(tail), torch.empty(tail)
    shift = start * 4
    rows, chunks, opts = _tables([_row(w.data_ptr() - shift, g.data_ptr() - shift, buf.data_ptr() - shift, numel)],
                                 [(0, first), (0, first + 1)], opts=(0.01, 0.5, 1.0, 1e-12))
    _ranges(shim, w, g, buf)
    sq = _sqnorm(shim, rows, chunks, opts)
    want = ((w.abs() + 0.01) * g).double().square().sum()
    torch.testing.assert_close(sq.double().squeeze(), want, rtol=1e-5, atol=0)
    w0 = w.clone()
    shim.launch("perturb", 0, rows.data_ptr(), chunks.data_ptr(), opts.data_ptr(), sq.data_ptr(), 2, chunk, 1, None)
    assert torch.equal(buf, w0)  # copy mode: the buffer holds the original weights
    e = (w0.abs() + 0.01) ** 2 * g * (0.5 / (sq.sqrt() + 1e-12))
    torch.testing.assert_close(w, w0 + e, atol=1e-6, rtol=1e-5)
    shim.launch("restore", 0, rows.data_ptr(), chunks.data_ptr(), 2, chunk, 1, None)
    assert torch.equal(w, w0)


def test_the_norm_is_the_same_to_the_bit_for_any_block_order_and_concurrency():
    shim = cuda_shim.enable()
    gen = torch.Generator().manual_seed(5)
    ts = [torch.randn(n, generator=gen) for n in (1, 2047, 2048, 2049, 10000, 7)]
    gs = [torch.randn(t.shape, generator=gen) for t in ts]
    rows, chunks, opts = _tables(
        [_row(t.data_ptr(), g.data_ptr(), 0, t.numel()) for t, g in zip(ts, gs)],
        [(r, k) for r, t in enumerate(ts) for k in range(math.ceil(t.numel() / cuda_shim.CHUNK))],
    )
    shim.lib.fa_shim_ranges_from_rows(rows.data_ptr(), rows.shape[0], 4)
    try:
        results = set()
        for seed, workers in ((0, 1), (1, 2), (2, 3), (3, 4), (4, 8)):
            shim.configure(seed=seed, workers=workers)
            results.add(_sqnorm(shim, rows, chunks, opts).item())
    finally:
        shim.configure()
    assert len(results) == 1
    want = sum(((t.double().abs() + 0.01) * g.double()).square().sum() for t, g in zip(ts, gs))
    assert abs(results.pop() - want.item()) <= 1e-5 * want.item()


def test_a_launch_outside_the_tables_memory_is_refused_with_the_place():
    shim = cuda_shim.enable()
    w, g = torch.randn(100), torch.randn(100)
    rows, chunks, opts = _tables([_row(w.data_ptr(), g.data_ptr(), 0, 100)], [(0, 0)])
    _ranges(shim, w, g[:50])  # half of the gradient is not the launch's
    with pytest.raises(RuntimeError, match=r"sqnorm kernel \(CPU shim\) failed: out-of-bounds \d+-byte load at 0x"):
        _sqnorm(shim, rows, chunks, opts)
    with pytest.raises(RuntimeError, match="restore kernel .* failed: invalid argument"):  # no chunk to launch
        shim.launch("restore", 0, rows.data_ptr(), chunks.data_ptr(), 0, cuda_shim.CHUNK, 1, None)


# --- planted bugs ---------------------------------------------------------------------------------------------------

KERNEL = "multi_tensor.cu"
PLANTED = {
    # the warp sums are read before every warp wrote its own
    "missing-barrier": ("  if (lane == 0) warp_sums[warp] = x;\n  __syncthreads();\n",
                        "  if (lane == 0) warp_sums[warp] = x;\n"),
    # a barrier only lane 0 of each warp reaches: a hang on a GPU
    "divergent-barrier": ("  if (lane == 0) warp_sums[warp] = x;\n  __syncthreads();\n",
                          "  if (lane == 0) {\n    warp_sums[warp] = x;\n    __syncthreads();\n  }\n"),
    # the element tail runs one past the chunk
    "tail-overrun": ("i < c.length; i += blockDim.x)", "i <= c.length; i += blockDim.x)"),
    # vector accesses on rows that are not 16-byte aligned
    "misaligned-vectors": ("return (bits & 15) == 0;", "return bits >= 0;"),
    # two threads take the same vectors
    "overlapping-threads": ("k < nvec; k += blockDim.x)", "k < nvec; k += blockDim.x / 2)"),
    # the chunk's first element computed in 32 bits
    "32-bit-offsets": ("const int64_t start = static_cast<int64_t>(chunks[2 * b + 1]) * size;",
                       "const int64_t start = static_cast<int32_t>(chunks[2 * b + 1] * static_cast<int32_t>(size));"),
    # the norm's counter is not reset: the next launch never finds its last block
    "counter-not-reset": ("    *counter = 0;", "    (void)counter;"),
}


@pytest.fixture
def planted():
    """Load a mutated shim; the real one comes back afterwards."""
    good = cuda_shim.enable().path

    def load(bug: str | None) -> None:
        path = good if bug is None else cuda_shim.build({KERNEL: PLANTED[bug]})
        cuda_shim.enable(path).configure(racecheck=True)

    yield load
    cuda_shim.enable(good).configure()


def _params() -> list[torch.nn.Parameter]:
    """A misaligned view (offset by one element), several chunks with a vector tail, tiny and odd sizes."""
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(3 * cuda_shim.CHUNK + 20, generator=gen)
    return [torch.nn.Parameter(base[1:].clone()[: 3 * cuda_shim.CHUNK + 5]), torch.nn.Parameter(base[1:-2]),
            *(torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (1, 7, 33, 2 * cuda_shim.CHUNK))]


def _run(backend: str) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(p.detach().clone()) if backend == "reference" else p for p in _params()]
    opt = fastasam.ASAM(params, torch.optim.SGD, rho=0.5, lr=0.05, momentum=0.9, backend=backend)
    for _ in range(3):
        soup_loss(params).backward()
        opt.first_step(zero_grad=True)
        soup_loss(params).backward()
        opt.second_step(zero_grad=True)
    if backend != "reference":
        assert opt.report().fused == len(params)  # the kernels ran on every tensor
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("bug,caught", [
    (None, None),
    ("missing-barrier", "differs"),
    ("divergent-barrier", r"diverged: \d+ threads wait at __syncthreads\(\)"),
    ("tail-overrun", "out-of-bounds"),
    ("misaligned-vectors", "misaligned 16-byte load"),
    ("overlapping-threads", "race at 0x"),
    ("counter-not-reset", "differs"),
])
def test_planted_kernel_bugs_are_caught(planted, bug, caught):
    """The unmutated kernels (bug None) pass the same run; each planted bug is reported by the shim or makes the
    trajectory differ from the oracle's. On a CPU without the shim most of them would pass silently: x86 tolerates
    misaligned vectors and small overruns, and runs no two threads of a block at once."""
    assert _params()[1].data_ptr() % 16 != 0  # the misaligned view really is one
    want = _run("reference")
    planted(bug)
    if caught is None:
        for a, b in zip(_run("cuda_shim"), want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    elif caught == "differs":  # beyond the tolerance the unmutated kernels meet
        got = _run("cuda_shim")
        assert any(not torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(got, want))
    else:
        with pytest.raises(RuntimeError, match=caught):
            _run("cuda_shim")
