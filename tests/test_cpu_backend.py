"""The ``cpu`` backend (``fastasam._cpu``, ``csrc/cpu_kernels.cpp``) and ``foreach``'s CPU path.

The optimizer suite runs ``cpu`` against the ``reference`` oracle as one of the multi-tensor backends (conftest's
``MULTI_TENSOR``; torch's own SGD/Adam/AdamW in ``test_multi_tensor.py``). Here: that it is built and ``auto`` picks
it; results that do not depend on the thread count; its kernels and the CUDA kernels (run by the CPU shim) agreeing to
the bit on every elementwise result from the same inputs; bugs planted in the per-element formulas both compile
(``csrc/elementwise.h``), caught by the tests of each; and ``foreach``'s CPU path (no guard pass for a finite norm,
its chunking).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from conftest import (
    SHIM_ERROR,
    assert_trajectories_close,
    assert_trajectories_equal,
    awkward_params,
    soup_loss,
    three_groups,
    trajectory,
)

import fastasam
from fastasam import backends
from fastasam.backends import _layout as L
from fastasam.backends import cpu as cpu_backend
from fastasam.backends import foreach
from fastasam.backends._multi_tensor import _chunk_list, _rows_table
from fastasam.testing import cuda_shim

ROOT = Path(__file__).resolve().parents[1]
BUILT = cpu_backend.EXTENSION is not None
needs_kernels = pytest.mark.skipif(not BUILT, reason=f"fastasam._cpu is not built ({cpu_backend.EXTENSION_ERROR})")
needs_shim = pytest.mark.skipif(SHIM_ERROR is not None, reason=f"the CUDA CPU shim is not loaded ({SHIM_ERROR})")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the kernels' storage dtypes
DTYPE_IDS = ["float32", "float16", "bfloat16"]
# those the backend runs them on here (fp16: with the AVX-512 build only)
FUSED = [dt for dt in DTYPES if dt in cpu_backend.KERNEL_DTYPES]
FUSED_IDS = [name for dt, name in zip(DTYPES, DTYPE_IDS) if dt in cpu_backend.KERNEL_DTYPES]


def test_the_cpu_kernels_are_built_and_auto_picks_them():
    """Wherever fastasam._host builds, so does fastasam._cpu: a build failure must fail here, not silently leave CPU
    tensors to foreach (``FASTASAM_BUILD_HOST=0`` skips both on purpose)."""
    if os.environ.get("FASTASAM_BUILD_HOST", "").strip() == "0":
        pytest.skip("FASTASAM_BUILD_HOST=0: the CPU extensions are skipped on purpose")
    assert BUILT, cpu_backend.EXTENSION_ERROR
    assert "cpu" in fastasam.available_backends("cpu")
    assert "cpu" not in fastasam.available_backends("meta")
    assert backends.resolve("auto", torch.device("cpu")).name == "cpu"
    assert "run on CPU tensors" in backends.unavailable_reason("cpu", "meta")
    if os.uname().sysname == "Linux":  # spread over PyTorch's intra-op threads
        assert cpu_backend.EXTENSION.openmp


def test_without_the_extension_auto_falls_back_to_foreach(monkeypatch):
    monkeypatch.setattr(cpu_backend, "EXTENSION", None)
    monkeypatch.setattr(cpu_backend, "EXTENSION_ERROR", "ImportError: planted")
    assert "fastasam._cpu is not built (ImportError: planted)" in backends.unavailable_reason("cpu", "cpu")
    assert backends.resolve("auto", torch.device("cpu")).name == "foreach"
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run on cpu: .*Fix: reinstall fastasam"):
        backends.resolve("cpu", torch.device("cpu"))


# --- builds of the CPU kernels from edited sources (planted bugs) -------------------------------------------------


def _setup_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    spec = importlib.util.spec_from_file_location("fastasam_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # defines the helpers; setup() runs only as __main__
    return setup.CPU_CXX_FLAGS, setup.CPU_LINK_FLAGS


def build_cpu_kernels(replace: dict[str, tuple[str, str]], all_isas: bool = False):
    """``fastasam._cpu`` compiled from ``csrc/`` with ``replace`` (``{file: (old, new)}``, ``old`` must occur) and
    setup.py's flags, loaded as a module of its own; cached by the sources' hash in ``build/cpu_kernels/``. Only the
    baseline instruction set's kernels unless ``all_isas`` (a third of the compile time; the wider builds are the
    same source, and the product's builds are compared to the bit below)."""
    from torch.utils import cpp_extension

    cxx, link = _setup_flags()
    cxx = cxx if all_isas else (*cxx, "-DFA_CPU_BASELINE_ONLY")
    files = ("cpu_kernels.cpp", "cpu_loops.h", "elementwise.h", "multi_tensor.h")
    texts = {f: (ROOT / "csrc" / f).read_text() for f in files}
    for f, (old, new) in replace.items():
        assert old in texts[f], f"{old!r} does not occur in csrc/{f}"
        texts[f] = texts[f].replace(old, new)
    key = hashlib.sha256(repr((sorted(texts.items()), cxx, link)).encode()).hexdigest()[:16]
    out = ROOT / "build" / "cpu_kernels" / key
    out.mkdir(parents=True, exist_ok=True)
    for f, text in texts.items():
        if not (out / f).is_file() or (out / f).read_text() != text:
            (out / f).write_text(text)
    return cpp_extension.load(name=f"fastasam_cpu_{key}", sources=[str(out / "cpu_kernels.cpp")],
                              extra_cflags=list(cxx), extra_ldflags=list(link), build_directory=str(out),
                              verbose=False)


@pytest.fixture
def cpu_planted(monkeypatch):
    """``load(replace)``: the cpu backend runs a build of its kernels with these source edits (None: the real one)
    until the test ends."""
    def load(replace: dict[str, tuple[str, str]] | None) -> None:
        monkeypatch.setattr(cpu_backend, "EXTENSION", cpu_backend.EXTENSION if replace is None
                            else build_cpu_kernels(replace))

    return load


@pytest.fixture
def shim_planted():
    """``load(replace)``: the cuda_shim backend runs a shim built with these source edits; the real one comes back
    afterwards."""
    good = cuda_shim.enable().path

    def load(replace: dict[str, tuple[str, str]] | None) -> None:
        cuda_shim.enable(good if replace is None else cuda_shim.build(replace))

    yield load
    cuda_shim.enable(good)


# --- the thread count changes nothing -----------------------------------------------------------------------------

THREADS = (1, 2, 3)


def _run_with_threads(threads: int, kind: str, dtype: torch.dtype) -> tuple[list, list]:
    """Four steps on the awkward soup (131K elements: enough for a launch to split over threads) with ``threads``
    intra-op threads; the weights and the squared norms after each step."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params = awkward_params("cpu", dtype)
        if kind == "gsam":  # the dots and combine launches, and the fused update along GSAM's direction
            opt = fastasam.GSAM(params, torch.optim.SGD, backend="cpu", rho=0.1, alpha=0.3, lr=0.05, momentum=0.9)
        elif kind == "adamw":
            opt = fastasam.ASAM(three_groups(params), torch.optim.AdamW, backend="cpu", amsgrad=True,
                                weight_decay=0.01)
        else:
            opt = fastasam.ASAM(three_groups(params), torch.optim.SGD, backend="cpu", momentum=0.9,
                                weight_decay=5e-4)
        history, norms = [], []
        for _ in range(4):
            soup_loss(params).backward()
            opt.first_step(zero_grad=True)
            norms.append(opt.grad_norm.clone())
            soup_loss(params).backward()
            opt.second_step(zero_grad=True)
            history.append([p.detach().clone() for p in params])
        assert opt.report().kernel == len(params)
        return history, norms
    finally:
        torch.set_num_threads(before)


def _assert_same_for_every_thread_count(kind: str, dtype: torch.dtype) -> None:
    runs = [_run_with_threads(n, kind, dtype) for n in THREADS]
    for n, (history, norms) in zip(THREADS[1:], runs[1:]):
        assert all(torch.equal(a, b) for a, b in zip(norms, runs[0][1])), f"the norm differs under {n} threads"
        assert_trajectories_equal(history, runs[0][0])


@needs_kernels
@pytest.mark.parametrize("chunk", [cpu_backend.CHUNK, 1000], ids=["chunk-default", "chunk-1000"])
@pytest.mark.parametrize("dtype", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("kind", ["sgd", "adamw", "gsam"])
def test_results_are_bit_identical_under_1_2_and_3_threads(kind, dtype, chunk, monkeypatch):
    """Each chunk is one thread's work and the partial sums are added in chunk order, so the weights, the norms and
    the states are the same to the bit whatever ``torch.set_num_threads`` says."""
    monkeypatch.setattr(cpu_backend._BACKEND.launcher, "chunk", chunk)
    _assert_same_for_every_thread_count(kind, dtype)


THREAD_BUGS = {
    # a thread starts at the chunk before its share when its share begins inside a chunk: that chunk runs twice
    "straddling-chunk-twice": ("    int64_t c = std::lower_bound(first.begin(), first.end() - 1, lo) - first.begin();",
                               "    int64_t c = std::upper_bound(first.begin(), first.end() - 1, lo) - first.begin()"
                               " - 1;"),
}


@needs_kernels
@pytest.mark.parametrize("bug", list(THREAD_BUGS))
def test_a_planted_thread_split_bug_is_caught(bug, cpu_planted, monkeypatch):
    """The thread-count test above fails on kernels whose split of the chunks over threads is wrong (with one thread
    the bug cannot show)."""
    monkeypatch.setattr(cpu_backend._BACKEND.launcher, "chunk", 1000)
    cpu_planted({"cpu_loops.h": THREAD_BUGS[bug]})
    with pytest.raises(AssertionError):
        _assert_same_for_every_thread_count("sgd", torch.float32)


# --- the CPU kernels and the CUDA kernels: the same numbers from the same inputs ----------------------------------

SIZES = (3 * 700 + 5, 37, 1, 8)  # several chunks with a tail, small, one element, a vector width


def _tensors(dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(9)

    def rand(n: int, scale: float = 0.5, positive: bool = False) -> torch.Tensor:
        t = torch.randn(n, generator=gen) * scale
        return (t.abs() if positive else t).to(dtype)

    return {"w": [rand(n) for n in SIZES], "g": [rand(n) for n in SIZES], "b": [rand(n, 0.01) for n in SIZES],
            "s1": [rand(n, 0.1) for n in SIZES], "s2": [rand(n, 0.01, True) for n in SIZES],
            "s3": [rand(n, 0.01, True) for n in SIZES], "k": [rand(n) for n in SIZES]}


class _Impl:
    """Direct launches of one implementation's kernels (``cpu``: fastasam._cpu, the widest instruction set's build;
    ``cpu-<isa>``: its build for that instruction set, e.g. ``cpu-baseline``; ``shim``: the CUDA kernels on the CPU)
    over tables of its own chunk size."""

    def __init__(self, which: str, dtype: torch.dtype) -> None:
        self.which, self.code = which, {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
        self.chunk = cuda_shim.CHUNK if which == "shim" else 700
        self.elsize = torch.empty((), dtype=dtype).element_size()

    def tables(self, columns, flags) -> tuple[torch.Tensor, torch.Tensor]:
        columns = [[None] * len(SIZES) if c is None else c for c in columns]
        rows = _rows_table(columns, list(SIZES), flags)
        chunks = torch.tensor(_chunk_list(list(SIZES), range(len(SIZES)), self.chunk), dtype=torch.int32)
        return rows, chunks

    def __call__(self, kernel: str, rows: torch.Tensor, chunks: torch.Tensor, *args) -> None:
        """``args``: the kernel's arguments after the tables (tensors: passed as addresses) and before the sizes,
        then its trailing options (restore mode, mode)."""
        ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        tensors = [p for p, a in zip(ptrs, args) if isinstance(a, torch.Tensor)]
        options = [p for p, a in zip(ptrs, args) if not isinstance(a, torch.Tensor)]
        count = chunks.shape[0]
        if self.which != "shim":
            isa = self.which.partition("-")[2]
            module = getattr(cpu_backend.EXTENSION, isa) if isa else cpu_backend.EXTENSION
            getattr(module, kernel)(self.code, rows.data_ptr(), chunks.data_ptr(), *tensors, count,
                                                   self.chunk, *options)
            return
        shim = cuda_shim.enable()
        shim.lib.fa_shim_ranges_from_rows(rows.data_ptr(), rows.shape[0], self.elsize)
        shim.launch(kernel, self.code, rows.data_ptr(), chunks.data_ptr(), *tensors, count, self.chunk,
                    *(int(o) for o in options), None)


def _elementwise_results(which: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every elementwise kernel, every mode, on the same inputs: the tensors after each launch."""
    impl, out = _Impl(which, dtype), []
    t = _tensors(dtype)
    n = len(SIZES)
    # perturb: two groups (adaptive; plain), both restore modes, a finite and a non-finite norm
    opts = torch.tensor([[0.01, 0.5, 1.0, 1e-12], [0.0, 0.05, 0.0, 1e-12]], dtype=torch.float32)
    flags = [(r % 2) << L.OPT_SHIFT for r in range(n)]
    for copy in (True, False):
        for sq in (2.5, float("inf")):
            w, b = [x.clone() for x in t["w"]], [x.clone() for x in t["b"]]
            rows, chunks = impl.tables((w, t["g"], b), flags)
            impl("perturb", rows, chunks, opts, torch.tensor([sq]), copy)
            out += [*w, *b]
            impl("restore", rows, chunks, copy)
            out += w
    # the fused updates: SGD (fresh buffers on odd rows; row r takes hyper row r: neither nesterov nor maximize,
    # both, nesterov alone, maximize alone; all with decay), Adam (amsgrad, L2) and AdamW, each without and along
    # GSAM's direction
    sums, alpha = torch.tensor([2.0, -0.7, 1.5], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    sgd = torch.tensor([[0.1, 0.9, 0.8, 1e-3, 1.0, nesterov, maximize, 0, 0, 0]
                        for nesterov, maximize in ((0, 0), (1, 1), (1, 0), (0, 1))], dtype=torch.float32)
    adam = torch.tensor([[0.1, 0.99, 0.01, 1e-3, 0.01, 1.0, 0.05, 0.3, 1.0, 0.0],
                         [0.1, 0.99, 0.01, 1e-3, 0.0, 0.999, 0.05, 0.3, 0.0, 1.0]], dtype=torch.float32)
    for copy in (True, False):
        for mode in (0, L.COMBINE_GSAM):
            w, m = [x.clone() for x in t["w"]], [x.clone() for x in t["s1"]]
            fresh = [(L.FLAG_FRESH_STATE if r % 2 else 0) | (r % len(sgd)) << L.HYPER_SHIFT for r in range(n)]
            rows, chunks = impl.tables((w, t["g"], t["b"], m, None, None, None, None, t["k"]), fresh)
            impl("restore_sgd", rows, chunks, sgd, sums, alpha, copy, mode)
            out += [*w, *m]
            w, m1, m2, vm = ([x.clone() for x in t[c]] for c in ("w", "s1", "s2", "s3"))
            rows, chunks = impl.tables((w, t["g"], t["b"], m1, m2, vm, None, None, t["k"]),
                                       [(r % 2) << L.HYPER_SHIFT for r in range(n)])
            impl("restore_adam", rows, chunks, adam, sums, alpha, copy, mode)
            out += [*w, *m1, *m2, *vm]
    # combine, every mode
    for mode in (L.COMBINE_KEEP, L.COMBINE_LOOK_FULL, L.COMBINE_LOOK_ONE, L.COMBINE_GSAM):
        g, b = [x.clone() for x in t["g"]], [x.clone() for x in t["b"]]
        rows, chunks = impl.tables((t["w"], g, t["b"], None, None, None, None, None, b), [0] * n)  # K: the buffer
        impl("combine", rows, chunks, sums, alpha, mode)
        out += [*g, *b]
    return out


def _assert_cpu_equals_shim(dtype: torch.dtype) -> None:
    got, want = _elementwise_results("cpu", dtype), _elementwise_results("shim", dtype)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a[~a.isnan()], b[~b.isnan()]), (
            f"result {i} differs: {(a.double() - b.double()).abs().max().item()}")


@needs_kernels
@needs_shim
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_the_cpu_kernels_and_the_cuda_kernels_agree_to_the_bit(dtype):
    """Perturbation (both restore modes, a finite and a non-finite norm), restore, the fused SGD/Adam/AdamW updates
    (fresh state, nesterov, maximize, amsgrad, with and without GSAM's direction) and every combination: the same
    formulas (elementwise.h), the same rounding, whatever each walks memory in."""
    _assert_cpu_equals_shim(dtype)


CPU_ONLY_BUGS = {
    # the fused SGD update on a restored weight that was not rounded to the storage dtype (subtract mode)
    "unrounded-restore": ("    const float p = fa::restored<T>(COPY ? 0.f : ld(w, i), ld(b, i), COPY);\n"
                          "    float m = MOMENTUM",
                          "    const float p = COPY ? ld(b, i) : ld(w, i) - ld(b, i);\n    float m = MOMENTUM"),
    # the loop without nesterov and maximize taken when only maximize is off
    "plain-despite-nesterov": ("with_bool(h.nesterov == 0.f && h.maximize == 0.f,", "with_bool(h.maximize == 0.f,"),
    # ... when only nesterov is off
    "plain-despite-maximize": ("with_bool(h.nesterov == 0.f && h.maximize == 0.f,", "with_bool(h.nesterov == 0.f,"),
    # the new weight, which needs rounding, stored as if it were a bf16 value already (its low bits dropped)
    "unrounded-store": ("    st(w, i, fa::sgd_update<T>(", "    st_exact(w, i, fa::sgd_update<T>("),
}


@needs_kernels
@needs_shim
@pytest.mark.parametrize("bug", list(CPU_ONLY_BUGS))
def test_a_bug_in_the_cpu_walk_alone_is_caught_against_the_cuda_kernels(bug, cpu_planted):
    """A slip in how the CPU kernels apply the shared formulas (the restored weight's rounding to bf16 skipped before
    the fused update; the loop specialised for plain SGD taken with nesterov or maximize on; a value that needs
    rounding stored by truncation) makes the two disagree."""
    cpu_planted({"cpu_loops.h": CPU_ONLY_BUGS[bug]})
    with pytest.raises(AssertionError, match="differs"):
        _assert_cpu_equals_shim(torch.bfloat16)


# --- the baseline build and the wider builds (AVX2, AVX-512): the same numbers --------------------------------------


def _reductions(module, dtype: torch.dtype) -> list[torch.Tensor]:
    """The squared norm (adaptive and plain rows) and the dots of one build of the CPU kernels on the same inputs."""
    impl, t = _Impl("cpu", dtype), _tensors(dtype)
    rows, chunks = impl.tables((t["w"], t["g"], t["b"], None, None, None, None, None, t["k"]),
                               [(r % 2) << L.OPT_SHIFT for r in range(len(SIZES))])
    opts = torch.tensor([[0.01, 0.5, 1.0, 1e-12], [0.0, 0.05, 0.0, 1e-12]], dtype=torch.float32)
    sq, dots = torch.zeros(1), torch.zeros(3, dtype=torch.float64)
    count = chunks.shape[0]
    module.sqnorm(impl.code, rows.data_ptr(), chunks.data_ptr(), opts.data_ptr(), count, impl.chunk, sq.data_ptr())
    module.dots(impl.code, rows.data_ptr(), chunks.data_ptr(), count, impl.chunk, dots.data_ptr())
    return [sq, dots]


def _assert_isas_agree(dtype: torch.dtype, isa: str, extension=None) -> None:
    """The build for ``isa`` of ``extension`` (default: the product's) gives the baseline build's results."""
    ext = extension or cpu_backend.EXTENSION
    saved = cpu_backend.EXTENSION
    cpu_backend.EXTENSION = ext
    try:
        got = _elementwise_results(f"cpu-{isa}", dtype) + _reductions(getattr(ext, isa), dtype)
        want = _elementwise_results("cpu-baseline", dtype) + _reductions(ext.baseline, dtype)
    finally:
        cpu_backend.EXTENSION = saved
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a[~a.isnan()], b[~b.isnan()]), (
            f"result {i} differs between {isa} and baseline: {(a.double() - b.double()).abs().max().item()}")


WIDE_ISAS = ["avx2", "avx512"]  # the wider builds, on x86-64 with GCC


def _needs_isa(isa: str):
    return pytest.mark.skipif(not BUILT or isa not in cpu_backend.EXTENSION.isas,
                              reason=f"this machine does not run the {isa} build of the CPU kernels")


@needs_kernels
def test_the_widest_build_this_cpu_runs_is_the_one_used():
    """``isas`` lists the builds this CPU runs, the baseline first; the module's own kernels are the last one's."""
    ext = cpu_backend.EXTENSION
    assert ext.isas[0] == "baseline" and set(ext.isas) <= {"baseline", *WIDE_ISAS}
    assert ext.isa == ext.isas[-1] and ext.sqnorm.__doc__ == getattr(ext, ext.isa).sqnorm.__doc__


@needs_kernels
@pytest.mark.parametrize("isa,dtype", [pytest.param(isa, dt, id=f"{isa}-{name}", marks=_needs_isa(isa))
                                       for isa in WIDE_ISAS for dt, name in zip(DTYPES, DTYPE_IDS)])
def test_the_wider_builds_and_the_baseline_build_agree_to_the_bit(isa, dtype):
    """The kernels that run on an AVX2 CPU (compiled under ``#pragma GCC target("avx2,f16c")``) or an AVX-512 one
    (512-bit vectors) and the baseline build: every elementwise result, the squared norm and the dots are the same to
    the bit."""
    _assert_isas_agree(dtype, isa)


@needs_kernels
@pytest.mark.skipif(not BUILT or len(cpu_backend.EXTENSION.isas) < 2, reason="only the baseline build runs here")
def test_a_bug_in_the_wider_builds_alone_is_caught(cpu_planted):
    """The comparison above fails for each wider build on a build whose AVX2 and AVX-512 loops alone drop the weight
    decay (``FA_CPU_AVX2_LOOPS`` / ``FA_CPU_AVX512_LOOPS`` is defined only there); each is compared on its own."""
    planted = ("  h.has_momentum = MOMENTUM;\n#if defined(FA_CPU_AVX2_LOOPS) || defined(FA_CPU_AVX512_LOOPS)\n"
               "  h.weight_decay = 0.f;\n#endif\n")
    ext = build_cpu_kernels({"cpu_loops.h": ("  h.has_momentum = MOMENTUM;\n", planted)}, all_isas=True)
    assert ext.isas == cpu_backend.EXTENSION.isas
    _assert_isas_agree(torch.float32, "baseline", ext)  # the baseline build is not touched
    for isa in ext.isas[1:]:
        with pytest.raises(AssertionError, match=f"differs between {isa} and baseline"):
            _assert_isas_agree(torch.float32, isa, ext)


def test_fp16_tensors_go_to_the_kernels_only_with_the_avx512_build():
    """fp16 storage is served by the kernels where their AVX-512 build runs, else by ``foreach`` (the narrower
    builds' fp16 loops are slower than foreach); fp32 and bf16 by the kernels."""
    params = [torch.nn.Parameter(torch.randn(40, dtype=dt)) for dt in (torch.float32, torch.float16, torch.bfloat16)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fastasam.ASAM(params, torch.optim.SGD, backend="cpu" if BUILT else "auto", lr=0.1, momentum=0.9)
    opt.first_step()
    opt.second_step()
    by_dtype = {b.dtype: b for b in opt.report().buckets}
    fp16 = BUILT and cpu_backend.EXTENSION.isa == "avx512"
    assert (torch.float16 in cpu_backend.KERNEL_DTYPES) == fp16
    assert {d: b.kernel for d, b in by_dtype.items()} == {
        "float32": int(BUILT), "float16": int(fp16), "bfloat16": int(BUILT)}, opt.report()
    if BUILT and not fp16:
        assert by_dtype["float16"].foreach == {"no cpu kernel for float16": 1}, opt.report()


# --- bugs planted in the shared formulas: caught by the tests of both the CPU and the CUDA kernels -----------------

HEADER_BUGS = {
    # ASAM's perturbation with one factor T_w instead of two
    "one-T-factor": ("  float e = adaptive ? t * (t * g) * scale : g * scale;",
                     "  float e = adaptive ? t * g * scale : g * scale;"),
    # SGD steps along d instead of the momentum buffer
    "momentum-ignored": ("    d = h.nesterov != 0.f ? d + h.momentum * m : m;",
                         "    d = h.nesterov != 0.f ? d + h.momentum * m : d;"),
    # Adam's second bias correction left out
    "no-bias-correction-2": ("div_rn(sqrt_rn(h.amsgrad ? vmax : v), h.bc2_sqrt)", "sqrt_rn(h.amsgrad ? vmax : v)"),
}


def _oracle_check(backend: str) -> None:
    """Three steps with SGD (momentum) and with AdamW on the awkward soup against the reference oracle."""
    for base, kwargs, extra in ((torch.optim.SGD, {"momentum": 0.9, "weight_decay": 5e-4}, None),
                                (torch.optim.AdamW, {"weight_decay": 0.01}, {"eps": 1e-3})):
        run = dict(base=base, base_kwargs=kwargs, base_optimizer_kwargs=extra, steps=3, reload_at=None,
                   chunk_sized=False)
        got = trajectory(backend, "cpu", torch.float32, **run)
        want = trajectory("reference", "cpu", torch.float32, **run)
        assert_trajectories_close(got, want, 1e-6, 1e-5)


@pytest.mark.parametrize("bug", [None, *HEADER_BUGS])
@pytest.mark.parametrize("impl", [pytest.param("cpu", marks=needs_kernels),
                                  pytest.param("cuda_shim", marks=needs_shim)])
def test_a_bug_planted_in_the_shared_formulas_is_caught(impl, bug, cpu_planted, shim_planted):
    """elementwise.h is compiled into both the CPU kernels and the CUDA kernels (the shim compiles the latter for the
    CPU): the unmutated header passes the oracle check on each, and each planted bug fails it on each."""
    replace = None if bug is None else {"elementwise.h": HEADER_BUGS[bug]}
    (cpu_planted if impl == "cpu" else shim_planted)(replace)
    if bug is None:
        _oracle_check(impl)
    else:
        with pytest.raises(AssertionError):
            _oracle_check(impl)


# --- foreach on the CPU --------------------------------------------------------------------------------------------


def _count_guards(monkeypatch) -> list[int]:
    calls = [0]
    real = torch.Tensor.masked_fill_

    def spy(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "masked_fill_", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_foreach_on_the_cpu_guards_only_a_non_finite_norm(dtype, monkeypatch):
    """A finite norm: no guard pass at all (the flag is read on the host, no device to wait for). A non-finite one
    (inf in a gradient): the guard runs and the weights stay exactly as they were."""
    calls = _count_guards(monkeypatch)
    params = awkward_params("cpu", dtype)
    opt = fastasam.ASAM(three_groups(params), torch.optim.SGD, backend="foreach", momentum=0.9)
    soup_loss(params).backward()
    opt.first_step()
    assert calls[0] == 0, f"{calls[0]} guard passes for a finite norm"
    assert not opt.perturbation_skipped
    opt.second_step(zero_grad=True)
    before = [p.detach().clone() for p in params]
    soup_loss(params).backward()
    params[1].grad[0, 0] = float("inf")
    opt.first_step()
    assert calls[0] > 0 and opt.perturbation_skipped
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-3, 1e-2)],
                         ids=["float32", "bfloat16"])
def test_foreach_in_small_chunks_matches_the_reference(dtype, atol, rtol, monkeypatch):
    """The CPU chunk is large; with a small one every tensor of the soup is cut into ranges and chunks mix tensors."""
    monkeypatch.setitem(foreach._CHUNK_NUMEL, "cpu", 1000)
    for restore in ("copy", "subtract"):
        got = trajectory("foreach", "cpu", dtype, restore=restore, steps=4, reload_at=2)
        want = trajectory("reference", "cpu", dtype, restore=restore, steps=4, reload_at=2)
        assert_trajectories_close(got, want, atol, rtol)
    assert not torch.equal(got[-1][1], awkward_params("cpu", dtype)[1])



def test_foreach_elsewhere_keeps_the_flag_on_the_device(monkeypatch):
    """Devices other than the CPU (here: the CPU told to behave like one) never read the flag on the host: the guard
    is a masked fill every step, with the same results."""
    params = awkward_params("cpu", torch.float32)
    host = trajectory("foreach", "cpu", torch.float32, steps=2, reload_at=None)
    monkeypatch.setattr(foreach, "HOST_FLAG_DEVICES", frozenset())
    calls = _count_guards(monkeypatch)
    device = trajectory("foreach", "cpu", torch.float32, steps=2, reload_at=None)
    assert calls[0] > 0
    assert_trajectories_equal(device, host)
    assert not torch.equal(host[-1][1], params[1])
