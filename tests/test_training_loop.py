"""Training-loop behaviour: BatchNorm in the second pass, gradient accumulation, bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastasam


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


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    big, small = nn.Linear(6, 2), nn.Linear(6, 2)
    small.load_state_dict(big.state_dict())
    opt_big = fastasam.ASAM(big.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    opt_small = fastasam.ASAM(small.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    loss_fn = nn.MSELoss()
    for _ in range(4):
        loss_fn(big(x), y).backward()
        opt_big.first_step(zero_grad=True)
        loss_fn(big(x), y).backward()
        opt_big.second_step(zero_grad=True)
        for xs, ys in zip(x.chunk(4), y.chunk(4)):  # micro-batches, both passes
            (loss_fn(small(xs), ys) / 4).backward()
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


def test_torch_compile_of_a_training_step_that_calls_fastasam():
    """The whole two-pass step under torch.compile runs and matches eager (dynamo traces or breaks around the
    optimizer; it must not fail on it)."""
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    results = []
    for compiled in (False, True):
        model = _tiny_model()
        opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)

        def step(model=model, opt=opt):
            nn.functional.mse_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.second_step(zero_grad=True)

        fn = torch.compile(step, backend="aot_eager") if compiled else step
        for _ in range(3):
            fn()
        results.append([p.detach().clone() for p in model.parameters()])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_captured_optimizer_step_replays_like_eager():
    device = "cuda"
    ref_model, model = _tiny_model().to(device), _tiny_model().to(device)
    x, y = torch.randn(16, 6, device=device), torch.randn(16, 2, device=device)
    ref_opt = fastasam.ASAM(ref_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)

    def step(m, o):
        nn.functional.mse_loss(m(x), y).backward()
        o.first_step()
        o.zero_grad(set_to_none=False)
        nn.functional.mse_loss(m(x), y).backward()
        o.second_step()
        o.zero_grad(set_to_none=False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: buffers and momentum allocated outside the graph
            step(model, opt)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        step(ref_model, ref_opt)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, opt)
    for _ in range(4):
        graph.replay()
        step(ref_model, ref_opt)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
