"""The multi-tensor kernels' fused restore + update and norm, for every backend with kernels on this machine:
``triton`` (under ``TRITON_INTERPRET=1`` on a CPU), ``cuda_shim`` (the ``cuda`` backend's kernels compiled for the CPU,
``csrc/cpu_shim``) and, on a GPU, ``cuda``. Each is compared with the ``reference`` oracle (or torch's own optimizers)
step by step, and its report must show that the fused path really ran."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPE_IDS,
    DTYPE_TOLERANCES,
    KERNELS,
    assert_trajectories_close,
    assert_trajectories_equal,
    kernels_with,
    soup_loss,
)

import fastasam


def small_params(device: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Chunk boundaries (CHUNK is 4096 under the interpreter, 2048 in the shim), a block tail, channels_last, size 0
    and 1, tiny ones."""
    gen = torch.Generator().manual_seed(7)

    def make(shape, fmt=torch.contiguous_format):
        t = (torch.randn(shape, generator=gen) * 0.5).to(device, dtype).contiguous(memory_format=fmt)
        return torch.nn.Parameter(t)

    return [make((1,)), make((9, 41)), make((4097,)), make((2 * 4096 + 5,)), make((0,)),
            make((6, 3, 5, 5), torch.channels_last), *[make((n,)) for n in (2, 3, 17, 64)]]


SGD_OPTIONS = {
    "momentum": dict(momentum=0.9, weight_decay=5e-4),
    "nesterov-dampening0": dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    "dampening-maximize": dict(momentum=0.8, dampening=0.3, maximize=True),
    "plain": dict(),
}
ADAM_OPTIONS = {
    "adamw": (torch.optim.AdamW, dict(betas=(0.9, 0.99), weight_decay=0.05)),
    "adam-l2-amsgrad": (torch.optim.Adam, dict(weight_decay=0.01, amsgrad=True)),
}


def fused_run(backend, device, dtype, base, kwargs, restore, steps=4, base_optimizer_kwargs=None):
    """Steps on ``small_params``; returns the weights after each step, the final optimizer state and the report of
    each step (which proves what ran)."""
    params = small_params(device, dtype)
    n = len(params)
    groups = [
        {"params": params[: n // 2], "rho": 0.5, "eta": 0.01, "adaptive": True, "lr": 0.05},
        {"params": params[n // 2 :], "rho": 0.05, "adaptive": False, "lr": 0.02},
    ]
    opt = fastasam.ASAM(groups, base, backend=backend, restore=restore, base_optimizer_kwargs=base_optimizer_kwargs,
                        **kwargs)
    history, reports = [], []
    for _ in range(steps):
        soup_loss(params).backward()
        opt.first_step(zero_grad=True)
        soup_loss(params).backward()
        opt.second_step(zero_grad=True)
        history.append([p.detach().clone() for p in params])
        reports.append(opt.report())
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    return history, state, reports


def all_fused(reports) -> bool:
    n = len(small_params("cpu", torch.float32))
    return all(r.second_step == "fused" and r.fused == n for r in reports)


def assert_same_step_counts(got_state: list[dict], want_state: list[dict]) -> None:
    """The Adam step counts of two runs are equal, compared as numbers: fastasam keeps a fused tensor's count on the
    CPU, torch's fused (or capturable) Adam on the parameter's device, where ``torch.equal`` of the two raises
    ("Expected all tensors to be on the same device")."""
    for g, w in zip(got_state, want_state, strict=True):
        assert float(g["step"]) == float(w["step"]), (g["step"], w["step"])


class OnAnotherDevice(torch.Tensor):
    """A step count as torch's fused CUDA Adam keeps it, made on the CPU: an op that takes it beside a CPU tensor
    raises what a CUDA tensor beside a CPU one raises; its value reads as a number."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.equal:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               "cuda:0 and cpu!")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_step_counts_compare_across_devices():
    """fastasam's CPU step count against torch's fused Adam's device one (faked here): ``torch.equal`` raises, the
    comparison the oracle tests make does not, and still tells a different count."""
    ours, torchs = torch.tensor(4.0), torch.tensor(4.0).as_subclass(OnAnotherDevice)
    with pytest.raises(RuntimeError, match="same device"):
        torch.equal(ours, torchs)
    assert_same_step_counts([{"step": ours}], [{"step": torchs}])
    with pytest.raises(AssertionError):
        assert_same_step_counts([{"step": ours}], [{"step": torch.tensor(3.0).as_subclass(OnAnotherDevice)}])


def test_a_fused_adam_group_on_a_gpu_is_left_to_torch():
    """fastasam's fused update counts Adam's steps on the CPU, torch's fused Adam on the device: a ``fused=True``
    group on a GPU (``meta`` stands in for it here) is not fused, so no CPU step count of fastasam's reaches torch's
    fused kernel when a tensor later falls back to the base optimizer's step; on the CPU both keep it there."""
    from fastasam.backends._updates import AdamUpdate

    update = AdamUpdate(decoupled_default=True)
    group = {"params": [torch.empty(3, device="meta")], "fused": True, "lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8,
             "weight_decay": 0.0}
    assert "fused=True on a GPU" in update.group_reason(group)
    assert update.group_reason({**group, "fused": False}) is None
    assert update.group_reason({**group, "params": [torch.empty(3)]}) is None
    assert "fused" in update.options  # turning it on later re-plans the group


@pytest.mark.parametrize("restore", ["copy", "subtract"])
@pytest.mark.parametrize("options", list(SGD_OPTIONS), ids=list(SGD_OPTIONS))
@kernels_with("dtype,atol,rtol", DTYPE_TOLERANCES, DTYPE_IDS, fused=True)
def test_fused_restore_sgd_matches_reference(backend, device, options, restore, dtype, atol, rtol):
    kwargs = SGD_OPTIONS[options]
    got, got_state, reports = fused_run(backend, device, dtype, torch.optim.SGD, kwargs, restore)
    assert all_fused(reports), reports[-1]  # every tensor, every step: the path under test really ran
    want, want_state, _ = fused_run("reference", device, dtype, torch.optim.SGD, kwargs, restore)
    # fused math rounds once per element; torch.optim.SGD rounds fp16/bf16 after every op
    assert_trajectories_close(got, want, atol * 4, rtol * 4)
    for g, w in zip(got_state, want_state):
        assert g.keys() == w.keys()
        for k in g:
            torch.testing.assert_close(g[k], w[k], atol=atol * 4, rtol=rtol * 4)


@pytest.mark.parametrize("options", list(ADAM_OPTIONS), ids=list(ADAM_OPTIONS))
@kernels_with("dtype,atol,rtol", DTYPE_TOLERANCES, DTYPE_IDS, fused=True)
def test_fused_restore_adam_matches_reference(backend, device, options, dtype, atol, rtol):
    base, kwargs = ADAM_OPTIONS[options]
    adam_eps = {"eps": 1e-3}  # fp16 storage flushes Adam's default 1e-8 to 0
    got, got_state, reports = fused_run(backend, device, dtype, base, kwargs, "copy", base_optimizer_kwargs=adam_eps)
    assert all_fused(reports), reports[-1]
    # torch's fused Adam computes in fp32 and rounds once, as the fused kernel does; its per-op (foreach) Adam rounds
    # the moments to fp16/bf16 before using them, which on the first step differs by far more than rounding
    fused = {"fused": True} if dtype != torch.float32 else {}
    want, want_state, _ = fused_run("reference", device, dtype, base, {**kwargs, **fused}, "copy",
                                    base_optimizer_kwargs=adam_eps)
    assert_trajectories_close(got, want, atol * 4, rtol * 4)
    assert_same_step_counts(got_state, want_state)  # torch's fused Adam keeps them on the device
    for g, w in zip(got_state, want_state):
        assert g.keys() == w.keys()
        for k in g:
            if k != "step":
                torch.testing.assert_close(g[k], w[k], atol=atol * 4, rtol=rtol * 4)


@KERNELS
def test_fused_adamw_in_bf16_is_bit_exact_against_torchs_fused_adamw(backend, device):
    """On the CPU torch's fused AdamW computes in fp32 from hyper-parameters the host computed in double and rounds
    once, as the kernel does: in bf16 the same numbers, to the last bit (weights after every step, both moments).

    On a CUDA device torch's fused AdamW (ATen/native/cuda/fused_adam_utils.cuh) is other arithmetic: it casts lr, the
    betas, eps and the weight decay to fp32 on the device, computes the bias corrections there in fp32
    (``1 - pow(beta, step)``: 1 - 0.99f is 1e-6 off 0.01), decays as ``p - lr * wd * p`` and forms the moments with
    fma (``fma(beta1, m, fma(-beta1, d, d))``), where the kernel takes the host's double ``1 - lr * wd``,
    ``lr / (1 - beta1**step)`` and ``sqrt(1 - beta2**step)`` rounded once and torch's CPU formulas. Each fp32 result
    then differs by a relative ~1e-6 or less, so its bf16 rounding (an ulp is 2^-8..2^-7 of the value) differs only
    where the fp32 value lies that close to a rounding midpoint: about 1e-6 * 2^8 ~ 3e-4 of the elements a step, by one
    ulp. A differing weight carries into the next steps (its own update, and the loss's mean term the other
    gradients of its tensor), where meeting a second midpoint can make two ulps. So on CUDA: the step counts equal,
    and the weights after every step and both moments within 2 bf16 ulps, at most 1% of their elements differing at
    all. A real bug moves far more: updating with the bf16-stored first moment instead of the fp32 one changes ~11% of
    the weights here and 9% of all the values, by up to thousands of ulps (planted in the CPU shim's kernel)."""
    kwargs = dict(betas=(0.9, 0.99), weight_decay=0.05)
    got, got_state, reports = fused_run(backend, device, torch.bfloat16, torch.optim.AdamW, kwargs, "copy")
    want, want_state, _ = fused_run("reference", device, torch.bfloat16, torch.optim.AdamW, {**kwargs, "fused": True},
                                    "copy")
    assert all_fused(reports)
    assert all(g.keys() == w.keys() for g, w in zip(got_state, want_state, strict=True))
    assert_same_step_counts(got_state, want_state)  # on CUDA torch's fused AdamW keeps them on the device
    if torch.device(device).type != "cuda":
        assert_trajectories_equal(got, want)
        for g, w in zip(got_state, want_state):
            assert all(torch.equal(g[k], w[k]) for k in g)
        return

    def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """bf16 values apart, counted in representable numbers (the bit patterns, ordered through zero)."""
        def ordered(t):
            bits = t.contiguous().view(torch.int16).int()
            return torch.where(bits < 0, -(bits & 0x7FFF), bits)
        return (ordered(a) - ordered(b)).abs()

    pairs = [(g, w) for gs, ws in zip(got, want) for g, w in zip(gs, ws)]
    pairs += [(g[k], w[k]) for g, w in zip(got_state, want_state) for k in g if k != "step"]
    apart = torch.cat([ulps(g, w).flatten() for g, w in pairs if g.numel()])
    assert apart.max().item() <= 2, f"{apart.max().item()} bf16 ulps apart"
    assert (apart > 0).float().mean().item() <= 0.01, f"{(apart > 0).sum().item()} of {apart.numel()} values differ"


@KERNELS
def test_fused_adamw_in_fp32_matches_torchs_per_tensor_adamw(backend, device):
    """In fp32 the kernel does torch's per-tensor AdamW's operations in its order (decay as p * (1 - lr * wd), lerp,
    IEEE sqrt and division): on the CPU equal up to the last bit or two. On CUDA torch's per-tensor AdamW runs ATen's
    CUDA kernels, which nvcc compiles with contraction (``a * b + c`` as one fma, rounded once, in lerp and addcmul)
    and whose addcdiv may multiply by a reciprocal, where the fused kernels (``-fmad=false``, IEEE division) round
    each operation: every step can move a weight by a few ulps more, so there the tolerance is fp32's default."""
    kwargs = dict(betas=(0.9, 0.99), weight_decay=0.05)
    got, _, reports = fused_run(backend, device, torch.float32, torch.optim.AdamW, kwargs, "copy")
    want, _, _ = fused_run("reference", device, torch.float32, torch.optim.AdamW, {**kwargs, "foreach": False}, "copy")
    assert all_fused(reports)
    atol, rtol = (1e-6, 1e-5) if torch.device(device).type == "cuda" else (2e-7, 2e-6)
    assert_trajectories_close(got, want, atol=atol, rtol=rtol)


@KERNELS
def test_unsupported_base_optimizer_falls_back_unfused(backend, device):
    params = small_params(device, torch.float32)
    opt = fastasam.ASAM(params, torch.optim.RMSprop, backend=backend, lr=0.01)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = fastasam.ASAM(ref_params, torch.optim.RMSprop, backend="reference", lr=0.01)
    for o, ps in ((opt, params), (ref, ref_params)):
        for _ in range(2):
            soup_loss(ps).backward()
            o.first_step(zero_grad=True)
            soup_loss(ps).backward()
            o.second_step(zero_grad=True)
    report = opt.report()
    assert report.fused == 0 and report.kernel == len(params)
    assert "RMSprop has no fused update" in report.second_step
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@KERNELS
def test_norm_is_deterministic_and_matches_the_oracle(backend, device):
    from fastasam._engine import SharpnessEngine

    params = small_params(device, torch.float32)
    soup_loss(params).backward()
    groups = [{"params": params, "rho": 0.5, "eta": 0.01, "adaptive": True}]
    norms = []
    for name in (backend, backend, "reference"):
        engine = SharpnessEngine(backend=name)
        with torch.no_grad():
            engine.first_step(groups)
            norms.append(engine.grad_norm.clone())
            engine.restore()
    assert torch.equal(norms[0], norms[1])
    torch.testing.assert_close(norms[0], norms[2], atol=0, rtol=1e-6)


# --- per-tensor vector loads: one misaligned tensor among aligned ones ----------------------------------------------


def misaligned_params(device: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Aligned tensors (over a chunk, block tails, tiny) around ``[1]``: a view at element offset 1 of a larger
    storage, so its address is not 16-byte aligned. It is dense, so it stays a kernel tensor."""
    gen = torch.Generator().manual_seed(5)

    def rand(n: int) -> torch.Tensor:
        return (torch.randn(n, generator=gen) * 0.5).to(device, dtype)

    storage = rand(2 * 4096 + 6)
    return [torch.nn.Parameter(rand(4097)), torch.nn.Parameter(storage[1:]),
            *(torch.nn.Parameter(rand(n)) for n in (600, 1, 33, 64))]


def misalign_grad(p: torch.Tensor) -> None:
    """Move ``p.grad`` (same values) to element offset 1 of a new storage: a gradient at a misaligned address."""
    g = torch.empty(p.numel() + 1, device=p.device, dtype=p.grad.dtype)
    g[1:].copy_(p.grad.reshape(-1))
    p.grad = g[1:].view_as(p.grad)


MISALIGNED_GRAD = 2  # from step 2 on, this parameter's gradients (both passes) sit at misaligned addresses


def misaligned_run(backend, device, dtype, base, kwargs, steps=4):
    params = misaligned_params(device, dtype)
    if backend == "reference":
        params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fastasam.ASAM(params, base, backend=backend, rho=0.5, lr=0.05, **kwargs)
    history, reports = [], []
    for step in range(steps):
        for second in (False, True):
            soup_loss(params).backward()
            if step >= 2:
                misalign_grad(params[MISALIGNED_GRAD])
            (opt.second_step if second else opt.first_step)(zero_grad=True)
        history.append([p.detach().clone() for p in params])
        reports.append(opt.report())
    return params, history, reports


@pytest.mark.parametrize("dtype,atol,rtol", [c for c in DTYPE_TOLERANCES if c[0] in (torch.float32, torch.bfloat16)],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("base,kwargs", [(torch.optim.SGD, dict(momentum=0.9, weight_decay=5e-4)),
                                         (torch.optim.AdamW, dict(weight_decay=0.05))], ids=["sgd", "adamw"])
@KERNELS
def test_a_misaligned_tensor_among_aligned_ones_matches_the_reference(backend, device, base, kwargs, dtype, atol,
                                                                      rtol):
    """The misaligned parameter (and, from step 2, a misaligned gradient) take the element path, the other tensors
    of the bucket the vector path, in the same launches. Under the interpreter a vector path on a misaligned row
    raises; the shim refuses any misaligned 16-byte access."""
    params, got, reports = misaligned_run(backend, device, dtype, base, kwargs)
    assert params[1].data_ptr() % 16 != 0  # the view really is misaligned
    assert all(r.kernel == len(params) and r.fused == len(params) for r in reports), reports[-1]
    _, want, _ = misaligned_run("reference", device, dtype, base, kwargs)
    assert_trajectories_close(got, want, atol * 4, rtol * 4)


@pytest.mark.parametrize("steps", [1, 3])
@KERNELS
def test_the_tables_mark_exactly_the_misaligned_addresses(backend, device, steps, monkeypatch):
    """The host sets one alignment bit per address column in each row's flags when it builds a table and whenever it
    rewrites addresses (moved gradients) or flags (after the fused update's first step): exactly the misaligned
    parameter's W bit (and, after step 2, the moved gradient's G bit) are clear, in the first step's table and in the
    fused update's."""
    from fastasam.backends import _layout as L
    from fastasam.backends import _multi_tensor

    made = []
    for cls in (_multi_tensor.PerturbRunner, _multi_tensor.UpdateRunner):
        def spy(self, *args, _init=cls.__init__, **kw):
            _init(self, *args, **kw)
            made.append(self)

        monkeypatch.setattr(cls, "__init__", spy)
    params, _, reports = misaligned_run(backend, device, torch.float32, torch.optim.SGD, dict(momentum=0.9), steps)
    assert reports[-1].fused == len(params)
    every = L.aligned_mask(*L.POINTER_COLS)
    w_bit, g_bit = L.aligned_mask(L.COL_W), L.aligned_mask(L.COL_G)
    for cls in (_multi_tensor.PerturbRunner, _multi_tensor.UpdateRunner):
        tab = [r for r in made if isinstance(r, cls)][-1].rows_d.cpu()  # the tables the last step ran with
        rows = {int(w): r for r, w in enumerate(tab[:, L.COL_W].tolist())}
        assert len(rows) == len(params)
        marks = [int(f) & every for f in tab[:, L.COL_FLAGS].tolist()]
        want = [every] * len(params)
        want[rows[params[1].data_ptr()]] &= ~w_bit
        if steps > 2:
            want[rows[params[MISALIGNED_GRAD].data_ptr()]] &= ~g_bit
            assert int(tab[rows[params[MISALIGNED_GRAD].data_ptr()], L.COL_G]) % 16 != 0
        assert marks == want, (cls.__name__, [hex(m) for m in marks], [hex(m) for m in want])


# --- one floating-point contraction policy: the CUDA kernels' builds ------------------------------------------------


def test_every_build_of_the_cuda_kernels_turns_contraction_off(monkeypatch):
    """setup.py's extension and the just-in-time build both compile ``csrc/multi_tensor.cu`` with nvcc's
    ``-fmad=false`` (nvcc fuses ``a * b + c`` by default; the Triton kernels, the shim and the oracle do not).
    ``csrc/check.sh`` checks the PTX those flags produce."""
    import importlib.util
    from pathlib import Path

    import torch.utils.cpp_extension as cpp_extension

    from fastasam import _toolchain
    from fastasam.backends import cuda as cuda_backend

    assert "-fmad=false" in _toolchain.NVCC_FLAGS
    nvcc_flags = {}

    def load(**kwargs):  # the just-in-time build: what it would hand nvcc
        nvcc_flags["jit"] = kwargs["extra_cuda_cflags"]
        raise RuntimeError("not built in this test")

    def cuda_extension(name, sources, extra_compile_args, **kwargs):  # setup.py's extension
        nvcc_flags["setup"] = extra_compile_args["nvcc"]
        return cpp_extension.CppExtension(name, [], **kwargs)

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(cpp_extension, "CUDAExtension", cuda_extension)
    monkeypatch.setattr(_toolchain, "configure_cuda_build", lambda torch, ext: ("/usr/local/cuda", "9.0"))
    monkeypatch.setattr(cuda_backend, "EXTENSION", None)
    monkeypatch.setattr(cuda_backend, "JIT_ERROR", None)
    monkeypatch.setattr(cuda_backend, "jit_unavailable_reason", lambda env=None: None)
    assert "not built in this test" in cuda_backend.build(verbose=False)

    spec = importlib.util.spec_from_file_location("fastasam_setup", Path(__file__).resolve().parents[1] / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # defines the helpers; setup() runs only as __main__
    monkeypatch.setattr(setup, "_toolchain", _toolchain)
    monkeypatch.setattr(setup, "cuda_build_decision", lambda env: (True, "forced by the test"))
    monkeypatch.setattr(setup, "host_build_decision", lambda env: (False, "FASTASAM_BUILD_HOST=0"))
    monkeypatch.setenv("CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setenv("MAX_JOBS", "1")
    exts, _ = setup._extensions()
    assert [e.name for e in exts] == ["fastasam._C"]
    assert "-fmad=false" in nvcc_flags["jit"] and "-fmad=false" in nvcc_flags["setup"], nvcc_flags
