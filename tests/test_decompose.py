"""LookSAM's and GSAM's decompositions on the multi-tensor kernels (``fastasam._decompose``): the ``dots`` and
``combine`` launches against the formulas written with torch ops, every dtype and awkward sizes, determinism, bugs
planted in the CUDA kernels, and the optimizers on the kernels against the ``reference`` oracle (dtypes, mixed
buckets, warm steps that rebuild nothing, the fallback when the kernels cannot serve a step)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    KERNEL_CASES,
    KERNELS,
    assert_trajectories_close,
    awkward_params,
    kernels_with,
    sharpness_loop,
    soup_loss,
)

import fastasam
from fastasam import _decompose
from fastasam._decompose import Decomposer, PhaseTables
from fastasam._plan import accumulate_dtype
from fastasam.backends._multi_tensor import PerturbRunner, UpdateRunner
from fastasam.testing import cuda_shim

ALPHA = 0.3
MODES = {"keep": _decompose.KEEP, "look_full": _decompose.LOOK_FULL, "look_one": _decompose.LOOK_ONE,
         "gsam": _decompose.GSAM}


def _chunk(backend: str) -> int:
    return fastasam.backends.resolve(backend, torch.device("cpu"))._BACKEND.launcher.chunk


def _vectors(backend: str, device: str, dtypes: tuple[torch.dtype, ...]):
    """Parameters with mixed-sign gradients and kept buffers: chunk boundaries, a tail, empty, channels_last, a
    transposed leaf, in every dtype asked for (one bucket each)."""
    gen = torch.Generator().manual_seed(5)
    n = _chunk(backend)
    params, buffers = [], {}
    for dt in dtypes:
        shapes = [(1,), (7,), (0,), (n - 1,), (n + 3,), (2 * n + 5,), (3, 4, 5, 6), (9, 41)]
        for k, shape in enumerate(shapes):
            p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device, dt))
            g = torch.randn(shape, generator=gen).to(device, dt)
            b = torch.randn(shape, generator=gen).to(device, dt)
            if k == 6:  # channels_last, gradient and buffer alike
                p.data, g, b = (t.contiguous(memory_format=torch.channels_last) for t in (p.data, g, b))
            if k == 7:  # a transposed leaf: its gradient and buffer are laid out like it
                p = torch.nn.Parameter(p.detach().t())
                g, b = g.t(), b.t()
            p.grad = g
            buffers[p] = b
            params.append(p)
    return params, buffers


def _expected_sums(params, buffers) -> torch.Tensor:
    """(G*G, G*K, K*K): products in the accumulate dtype, then summed in fp64 (exactly, to fp64 rounding)."""
    total = torch.zeros(3, dtype=torch.float64)
    for p in params:
        acc = accumulate_dtype(p.dtype)
        a, b = p.grad.to(acc), buffers[p].to(acc)
        total += torch.stack([(a * a).double().sum(), (a * b).double().sum(), (b * b).double().sum()]).cpu()
    return total


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _check_kernels(backend: str, device: str, dtypes: tuple[torch.dtype, ...]) -> None:
    params, buffers = _vectors(backend, device, dtypes)
    t = Decomposer(backend).build("test", [{"params": params}], buffers, ALPHA)
    assert isinstance(t, PhaseTables), t
    t.dots()
    sums = t.sums.cpu()
    torch.testing.assert_close(sums, _expected_sums(params, buffers), rtol=1e-12, atol=0)
    gg, gb, bb = sums.tolist()
    coefs = {  # (target is G, x, y): target <- x * target + y * other, x and y from the kernel's own sums
        "look_full": (False, -_ratio(gb, bb), 1.0),
        "look_one": (True, 1.0, ALPHA * _ratio(gg ** 0.5, bb ** 0.5)),
        "gsam": (True, 1.0 + ALPHA * _ratio(gb, gg), -ALPHA),
    }
    grads0 = {p: p.grad.clone() for p in params}
    bufs0 = {p: b.clone() for p, b in buffers.items()}
    for name, mode in MODES.items():
        for p in params:
            p.grad.copy_(grads0[p])
            buffers[p].copy_(bufs0[p])
        t.combine(mode)
        for p in params:
            g, b = grads0[p], bufs0[p]
            if name == "keep":
                assert torch.equal(buffers[p], g) and torch.equal(p.grad, g), name
                continue
            into_g, x, y = coefs[name]
            acc = accumulate_dtype(p.dtype)
            tgt, other = (g, b) if into_g else (b, g)
            # the coefficients rounded once to the accumulate dtype, each product rounded, then the sum
            x_, y_ = torch.tensor(x, dtype=torch.float64).to(acc), torch.tensor(y, dtype=torch.float64).to(acc)
            want = (x_ * tgt.to(acc) + y_ * other.to(acc)).to(p.dtype)
            got, untouched = (p.grad, buffers[p]) if into_g else (buffers[p], p.grad)
            assert torch.equal(got, want), (name, p.dtype, tuple(p.shape), (got - want).abs().max())
            assert torch.equal(untouched, other), name
    t.dots()  # again, on the data the last combination left: the same launch must sum afresh (CUDA-graph replays)
    torch.testing.assert_close(t.sums.cpu(), _expected_sums(params, buffers), rtol=1e-12, atol=0)


@kernels_with("dtypes", [(torch.float32,), (torch.float16,), (torch.bfloat16,), (torch.float32, torch.bfloat16),
                        (torch.float32, torch.bfloat16, torch.float16)],
              ["fp32", "fp16", "bf16", "two-buckets", "three-buckets"])
def test_the_sums_and_every_combination_equal_the_formulas(backend, device, dtypes):
    _check_kernels(backend, device, dtypes)


@pytest.mark.skipif(("triton", "cpu") not in KERNEL_CASES, reason="fp64 kernels are Triton's (cuda: foreach)")
def test_fp64_storage_on_the_triton_kernels():
    _check_kernels("triton", "cpu", (torch.float64,))


@pytest.mark.skipif(("cuda_shim", "cpu") not in KERNEL_CASES, reason="the CUDA CPU shim is not loaded")
def test_the_sums_are_the_same_to_the_bit_for_any_block_order_and_concurrency():
    params, buffers = _vectors("cuda_shim", "cpu", (torch.float32,))
    t = Decomposer("cuda_shim").build("test", [{"params": params}], buffers, ALPHA)
    shim = cuda_shim.enable()
    seen = []
    try:
        for seed, workers in ((0, 1), (1, 3), (2, 3), (3, 2), (4, 4)):
            shim.configure(seed=seed, workers=workers, racecheck=True)
            t.dots()
            seen.append(t.sums.clone())
    finally:
        shim.configure()
    assert all(torch.equal(s, seen[0]) for s in seen)


# --- planted bugs in the CUDA kernels (csrc/multi_tensor.cu and the formulas of csrc/elementwise.h), run by the CPU
# shim: {name: (file under csrc/, old text, new text)} --------------------------------------------------------------

PLANTED = {
    # the cross term multiplies the wrong column
    "cross-term": ("multi_tensor.cu", "s[1] += static_cast<double>(fa::mul_rn(gv[j], kv[j]));",
                   "s[1] += static_cast<double>(fa::mul_rn(gv[j], gv[j]));"),
    # the block tree starts at a quarter: half of the threads' sums are lost
    "short-tree": ("multi_tensor.cu", "for (int half = kThreads / 2; half > 0; half >>= 1)",
                   "for (int half = kThreads / 4; half > 0; half >>= 1)"),
    # GSAM's coefficient over ||B||^2 instead of ||G||^2
    "gsam-denominator": ("elementwise.h", "d.x = static_cast<float>(1.0 + *alpha * ratio(sums[1], sums[0]));",
                         "d.x = static_cast<float>(1.0 + *alpha * ratio(sums[1], sums[2]));"),
    # the last chunk's counter is not reset: the next launch's sums are never written
    "counter-not-reset": ("multi_tensor.cu", "    for (int j = 0; j < 3; ++j) out[j] = t[j];\n    *counter = 0;",
                          "    for (int j = 0; j < 3; ++j) out[j] = t[j];\n    (void)counter;"),
}


@pytest.mark.skipif(("cuda_shim", "cpu") not in KERNEL_CASES, reason="the CUDA CPU shim is not loaded")
@pytest.mark.parametrize("bug", [None, "cross-term", "short-tree", "gsam-denominator", "counter-not-reset"])
def test_planted_bugs_in_the_cuda_kernels_are_caught(bug):
    good = cuda_shim.enable().path
    try:
        if bug is not None:
            file, old, new = PLANTED[bug]
            cuda_shim.enable(cuda_shim.build({file: (old, new)}))
        cuda_shim.enable().configure(racecheck=True)

        def check() -> None:
            _check_kernels("cuda_shim", "cpu", (torch.float32,))

        if bug is None:
            check()
        else:
            with pytest.raises(AssertionError):
                check()
    finally:
        cuda_shim.enable(good).configure()


# --- the optimizers on the kernels ----------------------------------------------------------------------------------

LR, MOMENTUM, RHO, ETA = 0.05, 0.9, 0.3, 0.01
KINDS = pytest.mark.parametrize("kind,kw", [("looksam", {"k": 3, "alpha": 0.7}), ("gsam", {"alpha": 0.3})],
                                ids=["looksam", "gsam"])


def _served(kind: str, backend: str) -> str:
    """What ``report().direction`` says when the kernels served the step: GSAM's direction rides in the fused
    restore + update when that takes every tensor (SGD here)."""
    return f"{backend} kernels" + (", fused into the restore + update" if kind == "gsam" else "")


def make(kind: str, params, backend: str, **kw):
    cls = fastasam.LookSAM if kind == "looksam" else fastasam.GSAM
    return cls(params, torch.optim.SGD, rho=RHO, eta=ETA, lr=LR, momentum=MOMENTUM, backend=backend, **kw)


def _forced(kind: str, kw: dict, backend: str, params_fn, groups_fn, steps: int = 10):
    """Step after step against the oracle without letting rounding differences accumulate: before each step the
    kernels' optimizer gets the reference optimizer's weights and state (momentum, LookSAM's g_v, the step counter),
    then both take the same step. Returns (kernels, reference) weights after each step, and the kernels' optimizer."""
    ref_params, params = params_fn(), params_fn()
    ref_opt = make(kind, groups_fn(ref_params), "reference", **kw)
    opt = make(kind, groups_fn(params), backend, **kw)
    pairs = []
    for _ in range(steps):
        with torch.no_grad():
            for p, r in zip(params, ref_params, strict=True):
                p.copy_(r)
        opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
        for o, ps in ((opt, params), (ref_opt, ref_params)):
            sharpness_loop(o, ps, 1)
        pairs.append(([p.detach().clone() for p in params], [p.detach().clone() for p in ref_params]))
    return pairs, opt


# one step of fp16 / bf16 may differ from the oracle by an ulp or two where the fused update rounds once and
# torch.optim.SGD rounds its intermediate results (values up to ~2: ulp 2e-3 in fp16, 1.6e-2 in bf16)
HALF = {torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}


@KINDS
@kernels_with("dtype", list(HALF), ["fp16", "bf16"])
def test_half_precision_runs_the_kernels_and_equals_the_reference_step_after_step(backend, device, kind, kw, dtype):
    atol, rtol = HALF[dtype]
    pairs, opt = _forced(kind, kw, backend, lambda: awkward_params(device, dtype, chunk_sized=False),
                         lambda ps: [{"params": ps[:20], "adaptive": True}, {"params": ps[20:], "adaptive": False}])
    assert opt.report().direction == _served(kind, backend)
    for got, want in pairs:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@KERNELS
@KINDS
def test_mixed_dtypes_sum_over_every_bucket(backend, device, kind, kw):
    """fp32 and bf16 parameters in one optimizer: two buckets whose sums are added before the combination."""
    def params():
        return [*awkward_params(device, torch.float32, chunk_sized=False)[:25],
                *awkward_params(device, torch.bfloat16, chunk_sized=False)[25:]]

    pairs, opt = _forced(kind, kw, backend, params,
                         lambda ps: [{"params": ps[:25]}, {"params": ps[25:], "lr": 0.02}])
    assert opt.report().direction == _served(kind, backend)
    for got, want in pairs:
        # the fp32 tensors would be off by far more if only their own bucket entered the sums
        for a, b in zip(got[:25], want[:25], strict=True):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)
        for a, b in zip(got[25:], want[25:], strict=True):
            torch.testing.assert_close(a, b, atol=1.6e-2, rtol=3e-2)


def _loop(opt, params, steps: int, set_to_none: bool) -> None:
    for _ in range(steps):
        soup_loss(params).backward()
        if opt.second_pass_needed:
            opt.first_step()
            opt.zero_grad(set_to_none=set_to_none)
            soup_loss(params).backward()
        opt.second_step()
        opt.zero_grad(set_to_none=set_to_none)


def _warm_then_moved(opt, params, built: list[str]) -> tuple[list[list[str]], list[torch.Tensor]]:
    """Cold steps, warm steps, then a full step whose second-pass gradient of one parameter is a new tensor; the
    phases built in each part and the parameters at the end."""
    parts = []
    _loop(opt, params, 4, set_to_none=False)  # every phase once (LookSAM k=3: full, one-pass, one-pass, full)
    parts.append(sorted(built))
    built.clear()
    _loop(opt, params, 3, set_to_none=False)
    parts.append(list(built))
    built.clear()
    soup_loss(params).backward()
    while not opt.second_pass_needed:  # LookSAM: on to a full step
        opt.second_step()
        opt.zero_grad(set_to_none=False)
        soup_loss(params).backward()
    built.clear()
    opt.first_step()
    opt.zero_grad(set_to_none=False)
    soup_loss(params).backward()
    params[2].grad = params[2].grad.clone()  # 4097 elements
    opt.second_step()
    parts.append(list(built))
    return parts, [p.detach().clone() for p in params]


@KERNELS
@KINDS
def test_a_warm_step_rebuilds_nothing_and_a_moved_gradient_rebuilds_its_phase(backend, device, kind, kw,
                                                                             monkeypatch):
    """The first step's copy of g and the second step's decomposition run over the step plan's tables ("keep",
    "update": bound there once, after the first step has built the kept buffers; the plan's watch confirms them), a
    one-pass step over tables of its own. A moved second-pass gradient rebinds the update's."""
    built: list[str] = []
    real, real_bind, real_keep = Decomposer.build, UpdateRunner.bind_variant, PerturbRunner.bind_keep

    def spy(self, phase, *args, **kwargs):
        built.append(phase)
        return real(self, phase, *args, **kwargs)

    def spy_bind(self, *args, **kwargs):
        built.append("update")
        return real_bind(self, *args, **kwargs)

    monkeypatch.setattr(Decomposer, "build", spy)
    def spy_keep(self, *args, **kwargs):
        built.append("keep")
        return real_keep(self, *args, **kwargs)

    monkeypatch.setattr(UpdateRunner, "bind_variant", spy_bind)
    monkeypatch.setattr(PerturbRunner, "bind_keep", spy_keep)
    params = awkward_params(device, torch.float32, chunk_sized=False)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = make(kind, params, backend, **kw)
    parts, got = _warm_then_moved(opt, params, built)
    cold = {"looksam": ["first", "keep", "one", "update"], "gsam": ["first", "keep", "update"]}[kind]
    assert parts == [cold, [], ["update"]]  # cold: each phase once; warm: nothing; moved: the update's tables
    assert opt.report().direction == _served(kind, backend)
    _, want = _warm_then_moved(make(kind, ref, "reference", **kw), ref, [])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-6, rtol=1e-4)


@KERNELS
@KINDS
def test_a_gradient_in_one_pass_only_falls_back_and_says_why(backend, device, kind, kw):
    """A parameter with a gradient in the second pass only: that step runs the torch ops (report says why; LookSAM's
    one-pass steps after it too, its g_v holds that parameter), the next full step the kernels again; the numbers
    equal the reference throughout."""
    def run(name):
        params = awkward_params(device, torch.float32, chunk_sized=False)[:12]
        extra = torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(3)).to(device))
        opt = make(kind, [{"params": params + [extra]}], name, **kw)
        directions = []
        for i in range(7):  # LookSAM k=3: full steps 0, 3, 6
            soup_loss(params).backward()
            if opt.second_pass_needed:
                opt.first_step(zero_grad=True)
                loss = soup_loss(params)
                if i == 3:
                    loss = loss + (extra * extra).sum()
                loss.backward()
            opt.second_step(zero_grad=True)
            directions.append(opt.report().direction)
        return [p.detach().clone() for p in params + [extra]], directions

    (got, dirs), (want, _) = run(backend), run("reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert dirs[3] == "torch ops: the parameters with a gradient differ between the two passes"
    assert dirs[-1] == _served(kind, backend) and dirs[0] == _served(kind, backend)


# --- GSAM's direction inside the fused restore + update -------------------------------------------------------------

BASES = {"sgd": (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 1e-3}),
         "adam": (torch.optim.Adam, {"weight_decay": 1e-3}),
         "adamw": (torch.optim.AdamW, {"weight_decay": 1e-2})}


def _gsam_run(backend: str, device: str, base: str, steps: int = 8, rho_zero_group: bool = False):
    params = awkward_params(device, torch.float32, chunk_sized=False)
    cls, kw = BASES[base]
    groups = [{"params": params[:20], "adaptive": True}, {"params": params[20:]}]
    if rho_zero_group:  # not perturbed: the base optimizer steps them, so the direction must be in their gradients
        groups[1]["rho"] = 0.0
    opt = fastasam.GSAM(groups, cls, rho=RHO, eta=ETA, alpha=0.3, lr=0.01, backend=backend, **kw)
    return sharpness_loop(opt, params, steps), opt


@KERNELS
@pytest.mark.parametrize("base", list(BASES))
def test_gsam_steps_along_its_direction_inside_the_fused_update(backend, device, base):
    """Every tensor fused: the update kernel reads g_s and g and forms the direction itself (no combine launch, one
    pass over the gradients less); equal to the oracle, for SGD, Adam and AdamW."""
    (got, opt), (want, _) = _gsam_run(backend, device, base), _gsam_run("reference", "cpu", base)
    assert opt.report().direction == f"{backend} kernels, fused into the restore + update"
    assert_trajectories_close(got, [[w.to(device) for w in s] for s in want], atol=2e-6, rtol=2e-5)


@KERNELS
def test_gsam_applies_its_direction_first_when_the_base_optimizer_steps_some_tensors(backend, device):
    (got, opt), (want, _) = (_gsam_run(backend, device, "sgd", rho_zero_group=True),
                             _gsam_run("reference", "cpu", "sgd", rho_zero_group=True))
    assert opt.report().direction == f"{backend} kernels"  # the combine launch, then the fused update and SGD
    assert_trajectories_close(got, [[w.to(device) for w in s] for s in want], atol=2e-6, rtol=2e-5)


@pytest.mark.skipif(("cuda_shim", "cpu") not in KERNEL_CASES, reason="the CUDA CPU shim is not loaded")
@pytest.mark.parametrize("bug", [None, "k-coefficient", "k-column"])
def test_planted_bugs_in_the_fused_direction_are_caught(bug):
    plants = {  # K weighted by x instead of y; the direction reads the gradient again instead of K
        "k-coefficient": ("fa::combined(dir.x, d[j], dir.y, kv[j])", "fa::combined(dir.x, d[j], dir.x, kv[j])"),
        "k-column": ("const T* k = col<T>(c, FA_COL_K);", "const T* k = col<T>(c, FA_COL_G);"),
    }
    good = cuda_shim.enable().path
    try:
        if bug is not None:
            cuda_shim.enable(cuda_shim.build({"multi_tensor.cu": plants[bug]}))
        cuda_shim.enable().configure(racecheck=True)
        (got, opt), (want, _) = _gsam_run("cuda_shim", "cpu", "sgd", steps=3), _gsam_run("reference", "cpu", "sgd", 3)
        assert opt.report().direction.endswith("fused into the restore + update")
        close = all(torch.allclose(a, b, atol=2e-6, rtol=2e-5) for s, t in zip(got, want) for a, b in zip(s, t))
        assert close == (bug is None)
    finally:
        cuda_shim.enable(good).configure()
