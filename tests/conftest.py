"""Devices, backends, dtype tolerances and the synthetic problems shared by the tests."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton: its kernels then run on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastasam
from fastasam import backends
from fastasam.testing import cuda_shim

# The cuda backend's kernels, compiled for the CPU (csrc/cpu_shim), join the fast backends below, so every test over
# them covers `cuda`'s kernels too. They are a test device, not one of the product's backends: registered here, as
# `cuda_shim`. FASTASAM_CUDA_SHIM=0 leaves them out (tests/test_cuda_shim.py then says so).
SHIM_WANTED = os.environ.get("FASTASAM_CUDA_SHIM", "1") != "0"
if SHIM_WANTED:
    backends.register(cuda_shim.REGISTRATION)
    try:
        cuda_shim.enable()
    except Exception as exc:  # reported by tests/test_cuda_shim.py, which fails while the shim is wanted
        SHIM_ERROR: str | None = f"{type(exc).__name__}: {exc}"
    else:
        SHIM_ERROR = None
else:
    SHIM_ERROR = "FASTASAM_CUDA_SHIM=0"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (dtype, atol, rtol): the tolerance sits next to its dtype.
DTYPE_TOLERANCES = [(torch.float32, 1e-6, 1e-5), (torch.float16, 1e-4, 1e-3), (torch.bfloat16, 1e-3, 1e-2)]
DTYPE_IDS = ["float32", "float16", "bfloat16"]  # DTYPE_TOLERANCES' ids
CHUNK = 1 << 16  # the CPU foreach chunk: sizes around it exercise the chunking


def fast_backend_cases() -> list[tuple[str, str]]:
    """Every (backend, device) pair other than the oracle that works on this machine."""
    return [
        (name, dev)
        for dev in DEVICES
        for name in backends.available_backends(dev)
        if name != "reference"
    ]


FAST_CASES = fast_backend_cases()
MULTI_TENSOR = ("triton", "cuda", "cuda_shim", "cpu")  # the backends with multi-tensor kernels and the fused
# restore + update
FAST_IDS = [f"{b}-{d}" for b, d in FAST_CASES]
KERNEL_CASES = [(b, d) for b, d in FAST_CASES if b in MULTI_TENSOR]  # the multi-tensor kernels that run here
KERNELS = pytest.mark.parametrize("backend,device", KERNEL_CASES, ids=[f"{b}-{d}" for b, d in KERNEL_CASES])


def kernels_take(backend: str, device: str, dtypes: tuple[torch.dtype, ...], fused: bool = False) -> bool:
    """Whether ``backend``'s multi-tensor kernels take every one of ``dtypes`` (``fused``: in the fused restore +
    update) on ``device``; the others go to its foreach fallback (the ``cpu`` backend sends fp16 there)."""
    launcher = backends.resolve(backend, torch.device(device))._BACKEND.launcher
    return all(d in (launcher.fused_dtypes if fused else launcher.dtypes) for d in dtypes)


def kernels_with(argnames: str, values: list, ids: list[str], fused: bool = False):
    """``KERNELS`` crossed with ``values`` of ``argnames`` (the first of each value: a dtype or a tuple of dtypes),
    leaving out the (backend, dtype) pairs whose kernels do not take the dtype."""
    cases, case_ids = [], []
    for b, d in KERNEL_CASES:
        for value, vid in zip(values, ids):
            value = value if "," in argnames else (value,)
            first = value[0]
            if kernels_take(b, d, first if isinstance(first, tuple) else (first,), fused):
                cases.append((b, d, *value))
                case_ids.append(f"{b}-{d}-{vid}")
    return pytest.mark.parametrize(f"backend,device,{argnames}", cases, ids=case_ids)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- the slow tier ------------------------------------------------------------------------------------------------
# `make test` leaves out the tests marked slow; `make test-slow` runs them (CI runs both). Slow: every case of the
# triton backend under Triton's interpreter (a GPU runs them in the default tier), and these, each measured over ~6 s
# on 2 shared cores: separate processes (torchrun, spawned ranks, builds, compilers, the benchmarks), not the oracle
# comparisons, which stay in the default tier for every other backend.
SLOW_TESTS = frozenset({
    "test_benchmarks.py::test_compiled_foreach_baseline_computes_the_reference_asam_step",
    "test_benchmarks.py::test_host_overhead_counts_python_calls_that_do_not_grow_with_the_tensor_count",
    "test_benchmarks.py::test_op_level_pytest_benchmarks_run",
    "test_benchmarks.py::test_step_time_benchmark_runs_and_writes_results",
    "test_cli.py::test_check_passes_here_and_fails_on_a_wrong_or_crashing_backend",
    "test_decompose.py::test_planted_bugs_in_the_fused_direction_are_caught",
    "test_distributed.py::test_ddp_global_mode_equals_one_process_on_the_global_batch",
    "test_distributed.py::test_ddp_m_sharpness_perturbs_each_replica_with_its_own_norm",
    "test_distributed.py::test_ddp_teardown_does_not_hang",
    "test_distributed.py::test_fsdp2_looksam_and_gsam_equal_one_process_on_the_global_batch",
    "test_distributed.py::test_fsdp2_sharded_run_equals_one_process_on_the_global_batch",
    "test_make_targets.py::test_the_tests_that_need_16_gb_are_left_out_by_default_and_run_with_bigmem",
    "test_packaging.py::test_a_planted_moved_file_leaves_its_pointers_stale",
    "test_packaging.py::test_a_planted_stale_pointer_is_found_with_its_place",
    "test_packaging.py::test_strings_in_code_and_link_targets_are_not_pointers",
    "test_trainer.py::test_a_non_finite_loss_on_one_rank_stops_every_rank",
    "test_trainer.py::test_a_second_signal_ends_a_stopping_process_at_once",
    "test_trainer.py::test_a_stop_at_an_epochs_last_step_keeps_its_evaluation",
    "test_trainer.py::test_interrupted_run_resumes_to_the_same_weights",
    "test_trainer.py::test_lr_1e30_exits_non_zero_and_writes_no_non_finite_checkpoint",
    "test_trainer.py::test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_bit_exact",
    "test_trainer.py::test_torchrun_two_gloo_processes",
    "test_trainer_report.py::test_replica_sharpness_perturbs_with_each_processes_own_norm",
    "test_trainer_report.py::test_stateful_flags_resume_bit_exact",
    "test_training_loop.py::test_torch_compile_of_a_training_step_that_calls_fastasam",
    "test_triton.py::test_every_launch_compiles_without_floating_point_contraction",
    "test_triton.py::test_kernels_compile_for_sm80_and_sm90_with_vector_loads_and_no_contraction",
})


def slow_reason(item) -> str | None:
    """Why ``item`` is in the slow tier, or None."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("backend") == "triton" and not torch.cuda.is_available():
        return "the triton backend under Triton's interpreter"
    if f"{item.path.name}::{item.originalname}" in SLOW_TESTS:
        return "listed in conftest.SLOW_TESTS"
    return None


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if slow_reason(item) is not None:
            item.add_marker(pytest.mark.slow)


# Triton's interpreter runs a kernel's programs one by one in Python: a test of the triton backend on the CPU leaves
# out the two tensors either side of the foreach chunk (most of the soup's elements; the triton kernels' own chunk is
# crossed by the 4097-element tensor), which make such a test 5-10x slower and exercise foreach's chunking only.
_INTERPRETED_TRITON = [False]


@pytest.fixture(autouse=True)
def _cheaper_interpreter(request):
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    _INTERPRETED_TRITON[0] = params.get("backend") == "triton" and not torch.cuda.is_available()
    yield
    _INTERPRETED_TRITON[0] = False


def awkward_params(device: str, dtype: torch.dtype, start: torch.dtype | None = None,
                   chunk_sized: bool | None = None) -> list[torch.nn.Parameter]:
    """Shapes that break naive multi-tensor code: size 1, 9x41, 4097, empty, chunk boundaries, channels_last,
    non-contiguous, and many tiny tensors. ``start``: round the values to this dtype first (a high-precision run
    that starts where a low-precision one does). ``chunk_sized=False`` leaves out the two tensors either side of the
    foreach chunk (most of the elements), for tests about numbers rather than chunking; None (the default): they are
    in, except in a test of the interpreted triton backend."""
    if chunk_sized is None:
        chunk_sized = not _INTERPRETED_TRITON[0]
    gen = torch.Generator().manual_seed(1234)

    def make(shape: tuple[int, ...], layout: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
        data = torch.randn(shape, generator=gen) * 0.5
        if start is not None:
            data = data.to(start)
        return torch.nn.Parameter(layout(data.to(device, dtype)))

    params = [
        make((1,)), make((9, 41)), make((4097,)), make((0,)), make((3, 0, 2)),
        *((make((CHUNK - 1,)), make((CHUNK + 3,))) if chunk_sized else ()),
        make((8, 3, 5, 5), lambda t: t.contiguous(memory_format=torch.channels_last)),
        make((41, 9), lambda t: t.t()),  # non-contiguous leaf
    ]
    params += [make((n,)) for n in range(1, 41)]  # many tiny tensors
    return params


def soup_loss(params: list[torch.Tensor]) -> torch.Tensor:
    """A smooth non-quadratic loss whose gradient depends on the weights, computed in fp32."""
    total = torch.zeros((), device=params[0].device)
    for i, p in enumerate(params):
        w = p.float()
        total = total + ((w - 0.1 * (i % 3)) ** 2).sum() * 0.5 + torch.sin(3 * w).sum() * 0.1
        if w.numel():
            total = total + w.mean() ** 2
    return total


def three_groups(params: list[torch.nn.Parameter]) -> list[dict]:
    """Adaptive, non-adaptive and rho=0 groups with their own base options."""
    n = len(params)
    return [
        {"params": params[: n // 2], "rho": 0.5, "eta": 0.01, "adaptive": True, "lr": 0.1},
        {"params": params[n // 2 : n - 3], "rho": 0.05, "adaptive": False, "lr": 0.05},
        {"params": params[n - 3 :], "rho": 0.0, "eta": 0.2, "lr": 0.02},
    ]


def trajectory(
    backend: str, device: str, dtype: torch.dtype, *, steps: int = 8, reload_at: int | None = 4,
    base: type[torch.optim.Optimizer] = torch.optim.SGD, restore: str = "copy",
    base_kwargs: dict | None = None, unused: bool = True, base_optimizer_kwargs: dict | None = None,
    start: torch.dtype | None = None, chunk_sized: bool | None = None,
) -> list[list[torch.Tensor]]:
    """Run ``steps`` ASAM steps on the awkward parameter soup; reload a ``state_dict`` into a new optimizer midway.

    Returns the parameters after each step (copies). One parameter gets no gradient at all (``grad is None``)."""
    params = awkward_params(device, dtype, start, chunk_sized)
    extra = torch.nn.Parameter(torch.ones(5, device=device, dtype=dtype))  # never used: grad stays None
    trained = params
    groups = three_groups(params)
    if unused:
        groups[0]["params"] = [*groups[0]["params"], extra]
    kwargs = base_kwargs if base_kwargs is not None else {"momentum": 0.9, "weight_decay": 5e-4}

    def make_opt() -> fastasam.ASAM:
        return fastasam.ASAM(
            [dict(g) for g in groups], base, backend=backend, restore=restore,
            base_optimizer_kwargs=base_optimizer_kwargs, **kwargs,
        )

    opt = make_opt()
    history = []
    for step in range(steps):
        if step == reload_at:
            saved = copy.deepcopy(opt.state_dict())
            opt = make_opt()
            opt.load_state_dict(saved)
        soup_loss(trained).backward()
        opt.first_step(zero_grad=True)
        soup_loss(trained).backward()
        opt.second_step(zero_grad=True)
        history.append([p.detach().clone() for p in [*params, extra]])
    return history


def assert_trajectories_close(got, want, atol: float, rtol: float) -> None:
    assert len(got) == len(want)
    for step, (g_step, w_step) in enumerate(zip(got, want)):
        for i, (g, w) in enumerate(zip(g_step, w_step)):
            assert g.dtype == w.dtype and g.shape == w.shape
            where = f"step {step}, tensor {i}"
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, where=where: f"{where}: {m}")


def max_error(got, truth) -> float:
    """The largest absolute difference from ``truth`` (computed in a higher precision) over all steps and tensors."""
    return max((g.double() - t.double()).abs().max().item()
               for gs, ts in zip(got, truth, strict=True) for g, t in zip(gs, ts, strict=True) if g.numel())


def assert_trajectories_equal(got, want) -> None:
    for step, (g_step, w_step) in enumerate(zip(got, want)):
        for i, (g, w) in enumerate(zip(g_step, w_step)):
            assert torch.equal(g, w), f"step {step}, tensor {i} differs"


def numel(params) -> int:
    return sum(math.prod(p.shape) for p in params)


def sharpness_loop(opt, params, steps: int, reload_at: int | None = None, make=None,
                   scaler: torch.amp.GradScaler | None = None, unscale_at: str | None = None
                   ) -> list[list[torch.Tensor]]:
    """The documented loop for every variant (``if opt.second_pass_needed``: first_step and the second backward;
    then second_step) on ``soup_loss``; at ``reload_at`` a ``state_dict`` goes into ``make()``'s new optimizer. With
    ``scaler``: scaled losses and ``scaler.step(opt)`` / ``scaler.update()`` for the second step, and
    ``scaler.unscale_(opt)`` where ``unscale_at`` says: ``"first"`` (before first_step), ``"between"`` (after
    ``first_step(zero_grad=True)``, before the second backward) or ``"last"`` (after the last backward, to clip).
    Returns the parameters after each step."""
    history = []
    for i in range(steps):
        if i == reload_at:
            saved = copy.deepcopy(opt.state_dict())
            opt = make()
            opt.load_state_dict(saved)
        for second in (False, True):
            if second and not opt.second_pass_needed:
                break
            if second:
                if unscale_at == "first":
                    scaler.unscale_(opt)
                opt.first_step(zero_grad=True)
                if unscale_at == "between":
                    scaler.unscale_(opt)
            loss = soup_loss(params)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if unscale_at == "last":
            scaler.unscale_(opt)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.second_step()
        opt.zero_grad()
        history.append([p.detach().clone() for p in params])
    return history
