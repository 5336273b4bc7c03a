"""Training-loop behaviour: BatchNorm in the second pass, gradient accumulation, bf16 autocast, GradScaler,
torch.compile and CUDA-graph capture."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import FAST_CASES, KERNEL_CASES
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import fastasam
from fastasam import backends
from fastasam.backends import _multi_tensor, foreach


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bn", [nn.BatchNorm1d, nn.BatchNorm2d])
def test_second_pass_leaves_running_stats_alone(momentum, bn):
    layer = bn(4, momentum=momentum)
    model = nn.Sequential(layer)
    shape = (8, 4) if bn is nn.BatchNorm1d else (8, 4, 3, 3)
    x1, x2 = torch.randn(shape), torch.randn(shape) * 3 + 1
    model(x1)
    stats = {k: v.clone() for k, v in layer.state_dict().items()}
    free = model(x2).detach()  # what the second pass computes without the helper
    layer.load_state_dict(stats)
    with fastasam.frozen_batchnorm_stats(model):
        frozen = model(x2)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, stats[k]), k
    torch.testing.assert_close(frozen, free)  # normalised with the batch statistics, as in the first pass
    assert layer.track_running_stats
    model(x2)
    assert layer.num_batches_tracked.item() == 2 and not torch.equal(layer.running_mean, stats["running_mean"])


def test_frozen_stats_restore_flags_after_an_exception_and_keep_untracked_layers():
    tracked, untracked = nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False)
    model = nn.Sequential(tracked, untracked)
    with pytest.raises(ZeroDivisionError), fastasam.frozen_batchnorm_stats(model):
        assert not tracked.track_running_stats
        raise ZeroDivisionError
    assert tracked.track_running_stats and not untracked.track_running_stats


ACCUMULATION_CASES = [("asam", "auto"), *((kind, b) for kind in ("looksam", "gsam")
                                           for b in ("reference", *(b for b, _ in KERNEL_CASES)))]


@pytest.mark.parametrize("kind,backend", ACCUMULATION_CASES, ids=[f"{k}-{b}" for k, b in ACCUMULATION_CASES])
def test_gradient_accumulation_equals_one_big_batch(kind, backend):
    """Both passes accumulated over micro-batches equal one big batch (for LookSAM also its one-pass steps)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    big, small = nn.Linear(6, 2), nn.Linear(6, 2)
    small.load_state_dict(big.state_dict())

    def make(model):
        cls, kw = {"asam": (fastasam.ASAM, {}), "looksam": (fastasam.LookSAM, {"k": 2, "alpha": 0.7}),
                   "gsam": (fastasam.GSAM, {"alpha": 0.3})}[kind]
        return cls(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, backend=backend, **kw)

    opt_big, opt_small = make(big), make(small)
    loss_fn = nn.MSELoss()
    for _ in range(4):
        loss_fn(big(x), y).backward()
        if opt_big.second_pass_needed:
            opt_big.first_step(zero_grad=True)
            loss_fn(big(x), y).backward()
        opt_big.second_step(zero_grad=True)
        for xs, ys in zip(x.chunk(4), y.chunk(4)):  # micro-batches, both passes
            (loss_fn(small(xs), ys) / 4).backward()
        if opt_small.second_pass_needed:
            opt_small.first_step(zero_grad=True)
            for xs, ys in zip(x.chunk(4), y.chunk(4)):
                (loss_fn(small(xs), ys) / 4).backward()
        opt_small.second_step(zero_grad=True)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(big.weight, nn.Linear(6, 2).weight)


def test_bf16_autocast_recipe_trains():
    """bf16 autocast needs no GradScaler: gradients stay fp32 on fp32 parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.05, momentum=0.9)
    x = torch.randn(64, 8)
    y = x.sum(1, keepdim=True)
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        opt.first_step(zero_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nn.functional.mse_loss(model(x).float(), y).backward()
        opt.second_step(zero_grad=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert not bool(opt.perturbation_skipped)


def _scaler_step(model, opt, scaler, x, y, poison=None):
    """One ASAM step under a GradScaler; ``poison`` = 'first' or 'second' writes an inf into that pass's gradient."""
    loss_fn = nn.MSELoss()
    scaler.scale(loss_fn(model(x), y)).backward()
    if poison == "first":
        model.weight.grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    scaler.scale(loss_fn(model(x), y)).backward()
    if poison == "second":
        model.bias.grad[0] = float("nan")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_recipe_matches_unscaled_training(fused):
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    a, b = nn.Linear(6, 2), nn.Linear(6, 2)
    b.load_state_dict(a.state_dict())
    opt_a = fastasam.ASAM(a.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    opt_b = fastasam.ASAM(b.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for _ in range(4):
        nn.functional.mse_loss(a(x), y).backward()
        opt_a.first_step(zero_grad=True)
        nn.functional.mse_loss(a(x), y).backward()
        opt_a.second_step(zero_grad=True)
        _scaler_step(b, opt_b, scaler, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)
    assert scaler.get_scale() == 2.0**12


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("poison", ["first", "second"])
def test_grad_scaler_overflow_in_either_pass_skips_the_step(fused, poison):
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    model = nn.Linear(6, 2)
    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    _scaler_step(model, opt, scaler, x, y)  # one good step: momentum exists
    weights = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    _scaler_step(model, opt, scaler, x, y, poison=poison)
    assert not opt.perturbed
    for p, w, m in zip(model.parameters(), weights, momentum):
        assert torch.equal(p, w), "weights must be untouched"
        assert torch.equal(opt.state[p]["momentum_buffer"], m), "base optimizer state must be untouched"
    if poison == "second":
        assert scaler.get_scale() == 2.0**11  # the scale backs off as usual
    _scaler_step(model, opt, scaler, x, y)  # and training goes on
    assert not torch.equal(model.weight, weights[0])


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


_COMPILE_CASES = [("reference", "cpu", "aot_eager"), *((b, d, "aot_eager") for b, d in FAST_CASES),
                  ("auto", "cpu", "inductor")]


@pytest.mark.parametrize("backend,device,compiler", _COMPILE_CASES, ids=[f"{b}-{d}-{c}" for b, d, c in _COMPILE_CASES])
def test_torch_compile_of_a_training_step_that_calls_fastasam(backend, device, compiler):
    """The whole two-pass step under torch.compile runs, warns of nothing and matches eager: dynamo traces the
    per-tensor and foreach paths and runs the multi-tensor backends' launches between its graphs."""
    torch._dynamo.reset()
    x, y = torch.randn(16, 6, device=device), torch.randn(16, 2, device=device)
    results = []
    for compiled in (False, True):
        model = _tiny_model().to(device)
        opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)

        def step(model=model, opt=opt):
            nn.functional.mse_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.second_step(zero_grad=True)

        fn = torch.compile(step, backend=compiler) if compiled else step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                fn()
        assert not [str(w.message) for w in caught if "ynamo" in str(w.message)]
        results.append([p.detach().clone() for p in model.parameters()])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)


_REPLAY_CASES = [(b, base) for b, d in FAST_CASES if d == "cuda" for base in ("sgd", "adamw-capturable")] or [
    ("auto", "sgd")]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend,base", _REPLAY_CASES, ids=["-".join(c) for c in _REPLAY_CASES])
def test_cuda_graph_captured_step_replays_like_eager(backend, base):
    """Both passes and both optimizer steps captured in one graph; each replay on a new batch (copied into the
    static inputs) equals an eager step of an identical model on that batch."""
    device = "cuda"
    ref_model, model = _tiny_model().to(device), _tiny_model().to(device)

    def make(m):
        if base == "sgd":
            return fastasam.ASAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
        return fastasam.ASAM(m.parameters(), torch.optim.AdamW, lr=1e-2, capturable=True, backend=backend)

    ref_opt, opt = make(ref_model), make(model)
    batches = [(torch.randn(16, 6, device=device), torch.randn(16, 2, device=device)) for _ in range(7)]
    static_x, static_y = torch.empty(16, 6, device=device), torch.empty(16, 2, device=device)

    def step(m, o, x, y):
        nn.functional.mse_loss(m(x), y).backward()
        o.first_step()
        o.zero_grad(set_to_none=False)
        nn.functional.mse_loss(m(x), y).backward()
        o.second_step()
        o.zero_grad(set_to_none=False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x, y in batches[:3]:  # warm-up: buffers, optimizer state and tables made outside the graph
            static_x.copy_(x), static_y.copy_(y)
            step(model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(stream)
    for x, y in batches[:3]:
        step(ref_model, ref_opt, x, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, opt, static_x, static_y)
    for x, y in batches[3:]:
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
        step(ref_model, ref_opt, x, y)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    assert not torch.equal(model[0].weight, _tiny_model()[0].weight.to(device))


# --- what stream capture demands, checked on any device -------------------------------------------------------------
#
# A CUDA graph records one step's kernel launches and replays them with the same arguments. A step can be captured and
# replayed faithfully only if, once warm, it (1) never reads a device value on the host, (2) never makes a device
# tensor from host data (a pageable host-to-device copy, which capture forbids), (3) allocates no new persistent
# state, so the tables the kernels read keep their addresses, and (4) issues exactly the same operations with the same
# host arguments every step (a host number that changes from step to step would be frozen in the graph). The trace
# below records every ATen op and every multi-tensor launch of a warm step, on whatever device runs the tests, and
# checks all four; the replay test after it runs the real capture where a GPU is present.

_HOST_READS = {"aten._local_scalar_dense.default", "aten.equal.default", "aten.is_nonzero.default"}
_FROM_HOST = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default"}


def _describe(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device.type)
    if isinstance(x, dict):  # a param group: its hyperparameters, not its tensors
        return tuple(sorted((k, v) for k, v in x.items() if k != "params"))
    if isinstance(x, (bool, int, float, str, torch.dtype, torch.device, type(None))):
        return x
    return type(x).__name__


class _StepTrace(TorchDispatchMode):
    """Every ATen op of the traced region with its arguments as a graph sees them: tensors by shape/dtype/device,
    everything else by value. Multi-tensor launches are recorded as one entry each (the Triton interpreter's own host
    work inside a launch is not part of the step)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            name = str(func)
            self.ops.append((name, tree_map(_describe, args), tree_map(_describe, kwargs)))
            if name == "aten._to_copy.default" and "device" in kwargs:
                src = args[0].device
                if kwargs["device"] is not None and torch.device(kwargs["device"]).type != src.type:
                    self.ops.append(("device-change", src.type, str(kwargs["device"])))
            if name == "aten.copy_.default" and args[0].device.type != args[1].device.type:
                self.ops.append(("device-change", args[1].device.type, args[0].device.type))
        return func(*args, **kwargs)


class _RecordedLauncher:
    """Stands in for a multi-tensor backend's launcher: each launch it binds records itself in the current trace, with
    its tensors' addresses (a captured graph replays those), then launches."""

    def __init__(self, launcher, trace_of):
        self._launcher, self._trace_of = launcher, trace_of

    def __getattr__(self, name):
        return getattr(self._launcher, name)

    def bind(self, kernel, count, tensors, dtype, aligned, copy):
        launch = self._launcher.bind(kernel, count, tensors, dtype, aligned, copy)
        described = (kernel, count, tuple((_describe(t), t.data_ptr()) for t in tensors), dtype, aligned, copy)

        def recorded():
            trace = self._trace_of()
            if trace is None:
                return launch()
            trace.ops.append(("launch", *described))
            trace.paused = True
            try:
                return launch()
            finally:
                trace.paused = False

        return recorded


# torch's Adam keeps its step count on the host unless capturable=True, which only accelerators support
_CAPTURE_CASES = [(b, d, "sgd") for b, d in [("reference", "cpu"), *FAST_CASES]]
_CAPTURE_CASES += [(b, d, "adamw-capturable") for b, d, _ in _CAPTURE_CASES if d != "cpu"]


@pytest.mark.parametrize("backend,device,base", _CAPTURE_CASES, ids=["-".join(c) for c in _CAPTURE_CASES])
def test_a_warm_step_obeys_the_rules_of_cuda_graph_capture(backend, device, base, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).to(device)
    groups = fastasam.adaptive_param_groups(model)
    groups[1]["rho"] = 0.2  # a second rho: two scales in one bucket
    if base == "sgd":
        opt = fastasam.ASAM(groups, torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                            backend=backend)
    else:
        opt = fastasam.ASAM(groups, torch.optim.AdamW, lr=1e-3, capturable=True, backend=backend)
    x, y = torch.randn(16, 6, device=device), torch.randn(16, 2, device=device)

    current: list[_StepTrace | None] = [None]
    if backend == "foreach":  # on a CPU foreach reads its finite-norm flag on the host; check the path devices take
        monkeypatch.setattr(foreach, "HOST_FLAG_DEVICES", frozenset())
    module = backends.resolve(backend, torch.device(device))
    host = getattr(module, "_BACKEND", None)
    builds = [0]
    if host is not None:  # a multi-tensor backend: record its launches and count table builds and uploads
        monkeypatch.setattr(host, "launcher", _RecordedLauncher(host.launcher, lambda: current[0]))
        runners = (_multi_tensor.PerturbRunner, _multi_tensor.UpdateRunner)
        for owner, name in ((runners[0], "__init__"), (runners[0], "refresh_addresses"), (runners[1], "__init__"),
                            (_multi_tensor, "_upload")):
            real = getattr(owner, name)

            def counted(*args, real=real, **kwargs):
                builds[0] += 1
                return real(*args, **kwargs)

            monkeypatch.setattr(owner, name, counted)

    def step() -> _StepTrace:
        nn.functional.mse_loss(model(x), y).backward()
        trace = current[0] = _StepTrace()
        with trace:
            opt.first_step()
            opt.zero_grad(set_to_none=False)
        nn.functional.mse_loss(model(x), y).backward()
        with trace:
            opt.second_step()
            opt.zero_grad(set_to_none=False)
        current[0] = None
        return trace

    for _ in range(2):  # warm-up: restore buffers, momentum and the kernels' tables are made here
        step()
    built = builds[0]
    traces = [step(), step()]
    ops = traces[0].ops
    names = [op[0] for op in ops]
    assert not _HOST_READS & set(names), "a warm step reads a device value on the host"
    assert not _FROM_HOST & set(names), "a warm step makes a tensor from host data"
    assert "device-change" not in names, "a warm step copies between host and device"
    assert builds[0] == built, "a warm step rebuilt or uploaded the kernels' tables"
    if host is not None:
        assert any(op[0] == "launch" for op in ops)
    assert traces[1].ops == ops, "two warm steps differ in their operations or host arguments"


def test_the_capture_trace_sees_what_capture_forbids():
    """The probe itself: a host read, a tensor from host data and a changing host number are all caught."""
    t = torch.ones(3)
    with _StepTrace() as trace:
        (t * 2).sum().item()
        torch.tensor([1.0, 2.0])
    names = [op[0] for op in trace.ops]
    assert "aten._local_scalar_dense.default" in names and "aten.lift_fresh.default" in names
    runs = []
    for lr in (0.1, 0.2):
        with _StepTrace() as trace:
            t.mul(lr)
        runs.append(trace.ops)
    assert runs[0] != runs[1]
