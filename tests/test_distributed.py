"""DDP on CPU: two processes with the gloo backend, spawned by the test.

"Global" mode needs nothing from fastasam beyond host-sync-free steps: DDP all-reduces (averages) the gradients of
both backward passes, so every rank computes the same norm, the same perturbation and the same update. The run must
equal one process training on the global batch. "m-sharpness" mode (``fastasam.distributed.replica_perturbation``)
perturbs each replica with its own norm; it must equal a hand-written emulation in one process.
"""

from __future__ import annotations

import datetime
import glob
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastasam
from fastasam.testing import cuda_shim

WORLD = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable, port: int, out_dir: str, *args) -> None:
    """One spawned rank: ``fn(rank, out_dir, *args)`` in a gloo group, then ``fastasam.distributed``'s
    ``destroy_process_group`` (a barrier, then torch's), then ``os._exit``: the results are saved, and the
    interpreter's teardown would only cost time (the teardown itself is tested by
    ``test_ddp_teardown_does_not_hang``). A failure is written to ``rank<N>.err`` for the parent to report."""
    code = 0
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        torch.set_num_threads(1)
        fn(rank, out_dir, *args)
        fastasam.distributed.destroy_process_group()
    except BaseException:
        code = 1
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _spawn(fn: Callable, *args, timeout: float = 240.0) -> list:
    """Run ``fn`` on ``WORLD`` spawned ranks; each saves its result to ``rank<N>.pt``, returned in rank order. A rank
    that fails or a run that hangs fails the test with the ranks' tracebacks instead of hanging it."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_rank_main, args=(fn, _free_port(), out, *args), nprocs=WORLD, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {WORLD} ranks did not finish within {timeout:.0f} s")
        except Exception as exc:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            errors = [open(path).read() for path in sorted(glob.glob(os.path.join(out, "rank*.err")))]
            pytest.fail(f"distributed run failed: {exc}\n" + "\n".join(errors))
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(STEPS)]


RHO, ETA, LR = 0.5, 0.01, 0.1


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = x.shape[0] // world
    return x[rank * per : (rank + 1) * per]


def _train(model: nn.Module, opt: fastasam.ASAM, batches, rank: int = 0, world: int = 1, mode: str = "global") -> None:
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches:
        xs, ys = _shard(x, rank, world), _shard(y, rank, world)
        if mode == "global":
            loss_fn(model(xs), ys).backward()
            if opt.second_pass_needed:  # LookSAM's steps between full ones take one pass
                opt.first_step(zero_grad=True)
                loss_fn(model(xs), ys).backward()
        else:
            with fastasam.distributed.replica_perturbation(model, opt):
                loss_fn(model(xs), ys).backward()
            loss_fn(model(xs), ys).backward()
        opt.second_step(zero_grad=True)


def _load(backend: str) -> None:
    """A spawned rank loads the test backend the parent loaded in conftest (the build is cached)."""
    if backend == "cuda_shim":
        cuda_shim.enable()


def _optimizer(params, backend: str, kind: str = "asam") -> fastasam.ASAM:
    """ASAM, or one of the variants (LookSAM with a full step every 2nd step, GSAM) with ASAM's perturbation."""
    kw = dict(rho=RHO, eta=ETA, lr=LR, momentum=0.9, backend=backend)
    if kind == "looksam":
        return fastasam.LookSAM(params, torch.optim.SGD, k=2, alpha=0.7, adaptive=True, **kw)
    if kind == "gsam":
        return fastasam.GSAM(params, torch.optim.SGD, alpha=0.3, adaptive=True, **kw)
    return fastasam.ASAM(params, torch.optim.SGD, **kw)


def _ddp_worker(rank: int, out_dir: str, backend: str, mode: str, kind: str = "asam") -> None:
    _load(backend)
    model = nn.parallel.DistributedDataParallel(_model())
    opt = _optimizer(model.parameters(), backend, kind)
    _train(model, opt, _batches(), rank, WORLD, mode)
    torch.save([p.detach() for p in model.module.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))


def _run_ddp(backend: str, mode: str, kind: str = "asam") -> list[list[torch.Tensor]]:
    return _spawn(_ddp_worker, backend, mode, kind)


@pytest.mark.parametrize("backend,kind", [("reference", "asam"), ("foreach", "asam"), ("foreach", "looksam"),
                                          ("foreach", "gsam")])
def test_ddp_global_mode_equals_one_process_on_the_global_batch(backend, kind):
    model = _model()
    opt = _optimizer(model.parameters(), backend, kind)
    _train(model, opt, _batches())
    want = [p.detach() for p in model.parameters()]
    assert not torch.equal(want[0], _model()[0].weight)  # it trained
    ranks = _run_ddp(backend, "global", kind)
    for r in range(1, WORLD):
        for a, b in zip(ranks[0], ranks[r]):
            assert torch.equal(a, b), "ranks diverged"
    for got, ref in zip(ranks[0], want):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def _m_sharpness_emulation() -> list[torch.Tensor]:
    """One process, written out by hand: each replica's perturbation from its own shard's gradient and norm, the
    second-pass gradients averaged over replicas, then SGD with momentum on the average."""
    model = _model()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=LR, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in _batches():
        start = [p.detach().clone() for p in params]
        second = [torch.zeros_like(p) for p in params]
        for rank in range(WORLD):
            xs, ys = _shard(x, rank, WORLD), _shard(y, rank, WORLD)
            grads = torch.autograd.grad(loss_fn(model(xs), ys), params)
            t = [w.abs() + ETA for w in start]
            norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, g in zip(t, grads)))
            with torch.no_grad():
                for p, w, ti, g in zip(params, start, t, grads):
                    p.copy_(w + RHO * ti * ti * g / (norm + 1e-12))
            for acc, g in zip(second, torch.autograd.grad(loss_fn(model(xs), ys), params)):
                acc += g / WORLD
            with torch.no_grad():
                for p, w in zip(params, start):
                    p.copy_(w)
        for p, g in zip(params, second):
            p.grad = g
        base.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("backend", ["foreach"])
def test_ddp_m_sharpness_perturbs_each_replica_with_its_own_norm(backend):
    want = _m_sharpness_emulation()
    ranks = _run_ddp(backend, "m-sharpness")
    for a, b in zip(ranks[0], ranks[1]):
        assert torch.equal(a, b), "ranks diverged: the second pass must be synchronised"
    for got, ref in zip(ranks[0], want):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    # and it is not global mode in disguise
    global_mode = _run_ddp(backend, "global")[0]
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(ranks[0], global_mode))


def test_replica_perturbation_rejects_a_model_without_no_sync():
    model = _model()
    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        with fastasam.distributed.replica_perturbation(model, opt):
            pass


# FSDP2 -------------------------------------------------------------------------------------------------------------
# fully_shard turns every parameter into a DTensor sharded on dim 0 (here unevenly: 15 rows over 2 ranks, and a
# 1-row layer that leaves rank 1 an empty shard). The backends work on the local shards; the norm shares are summed
# over the shard group, so training equals one process on the global batch.


def _fsdp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 15), nn.Tanh(), nn.Linear(15, 1, bias=False), nn.Tanh(), nn.Linear(1, 3))


def _fsdp_worker(rank: int, out_dir: str, backend: str, kind: str = "asam") -> None:
    from torch.distributed.fsdp import fully_shard

    _load(backend)
    model = _fsdp_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    if kind == "asam":
        opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, rho=RHO, eta=ETA, lr=LR, momentum=0.9,
                            weight_decay=1e-2, backend=backend)
    else:
        opt = _optimizer(model.parameters(), backend, kind)
    directions = []
    for batch in _batches():
        _train(model, opt, [batch], rank, WORLD, "global")
        directions.append(opt.report().direction)
    local = [p.to_local().detach().clone() for p in model.parameters()]
    full = [p.full_tensor().detach() for p in model.parameters()]
    norm = opt.grad_norm.detach().clone() if opt.grad_norm is not None else None
    saved = opt.state_dict()["fastasam"] if kind == "looksam" else None
    torch.save({"full": full, "local": local, "norm": norm, "directions": directions, "saved": saved},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("backend", ["reference", *fastasam.backends.available_backends("cpu")[1:]])
def test_fsdp2_sharded_run_equals_one_process_on_the_global_batch(backend):
    model = _fsdp_model()
    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, rho=RHO, eta=ETA, lr=LR, momentum=0.9,
                        weight_decay=1e-2, backend=backend)
    _train(model, opt, _batches())
    want = [p.detach() for p in model.parameters()]
    ranks = _spawn(_fsdp_worker, backend)
    # the shards really are shards (rank 1 holds 7 of 15 rows, and nothing of the 1-row layer)
    assert [t.shape[0] for t in ranks[0]["local"]] == [8, 8, 1, 2, 2]
    assert [t.shape[0] for t in ranks[1]["local"]] == [7, 7, 0, 1, 1]
    # the norm is the global one on every rank (a per-shard norm would differ between ranks)
    torch.testing.assert_close(ranks[0]["norm"], ranks[1]["norm"], atol=0, rtol=0)
    torch.testing.assert_close(ranks[0]["norm"].double(), opt.grad_norm.double(), atol=1e-6, rtol=1e-5)
    for got, ref in zip(ranks[0]["full"], want):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


CPU_BACKENDS = ("reference", *fastasam.backends.available_backends("cpu")[1:])


@pytest.mark.parametrize("backend,kind", [(b, k) for b in CPU_BACKENDS for k in ("looksam", "gsam")])
def test_fsdp2_looksam_and_gsam_equal_one_process_on_the_global_batch(backend, kind):
    """The decompositions' sums over local shards are all-reduced over the shard group (the kernels' too): the
    sharded run equals one process, and LookSAM's g_v is saved as DTensors."""
    model = _fsdp_model()
    opt = _optimizer(model.parameters(), backend, kind)
    _train(model, opt, _batches())
    want = [p.detach() for p in model.parameters()]
    ranks = _spawn(_fsdp_worker, backend, kind)
    for got, ref in zip(ranks[0]["full"], want):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    for got, ref in zip(ranks[1]["full"], want):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    if backend in ("triton", "cuda_shim"):
        assert ranks[0]["directions"][-1] == f"{backend} kernels"
    if kind == "looksam":
        g_v = ranks[0]["saved"]["g_v"]
        assert len(g_v) == 5 and all(type(v).__name__ == "DTensor" for v in g_v.values())


def test_a_dtensor_gradient_that_is_not_reduced_yet_is_refused():
    from torch.distributed.tensor import DeviceMesh, DTensor, Partial, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        p = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        p.grad = DTensor.from_local(torch.randn(4, 3), mesh, [Partial()])
        opt = fastasam.ASAM([p], torch.optim.SGD, lr=0.1)
        with pytest.raises(RuntimeError, match="Partial gradient has not been reduced"):
            opt.first_step()
        assert not opt.perturbed
    finally:
        dist.destroy_process_group()


# Teardown ----------------------------------------------------------------------------------------------------------
# Destroying a gloo process group soon after DDP's last backward pass can hang in PyTorch: the group's destructor runs
# with the GIL held and waits for a gloo worker that needs the GIL to free its last collective (see
# fastasam.distributed.destroy_process_group). With torch's destroy_process_group one teardown in three to seven hangs
# here, so 60 would hang almost surely. One spawned pair repeats init, training and teardown, in both orders (the
# group freed with the DDP Reducer, or by destroy_process_group itself); a teardown that hangs stops the progress,
# and the test fails instead of hanging.

TEARDOWN_BACKENDS = (*CPU_BACKENDS, "auto")
TEARDOWN_CYCLES = 12  # per backend
TEARDOWN_LIMIT = 60.0  # seconds without a finished cycle (the first one also starts the process): a hang


def _teardown_rank(rank: int, port: int, out_dir: str, backends: tuple[str, ...], cycles: int,
                   teardown: Callable[[], None]) -> None:
    """One spawned rank: for each backend, ``cycles`` times a gloo group, DDP training with fastasam and
    ``teardown()``; after each cycle a line in ``rank<N>.progress``; then ``os._exit``."""
    code = 0
    try:
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, WORLD, rank == 0, timeout=datetime.timedelta(seconds=60))
        for backend in backends:
            _load(backend)
            for cycle in range(cycles):
                dist.init_process_group("gloo", store=dist.PrefixStore(f"{backend}/{cycle}", store), rank=rank,
                                        world_size=WORLD)
                model = nn.parallel.DistributedDataParallel(_model())
                opt = _optimizer(model.parameters(), backend)
                _train(model, opt, _batches(), rank, WORLD)
                if cycle % 2:  # the Reducer first; the group goes in teardown()
                    del model, opt
                    teardown()
                else:  # the group goes with the Reducer, its last reference
                    teardown()
                    del model, opt
                with open(os.path.join(out_dir, f"rank{rank}.progress"), "a") as f:
                    f.write(f"{backend} {cycle}\n")
    except BaseException:
        code = 1
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _progress(out_dir: str) -> list[list[str]]:
    """Each rank's finished cycles, as ``"backend cycle"`` lines."""
    done = []
    for r in range(WORLD):
        path = os.path.join(out_dir, f"rank{r}.progress")
        done.append(open(path).read().split("\n")[:-1] if os.path.exists(path) else [])
    return done


def _run_teardowns(teardown: Callable[[], None], backends: tuple[str, ...] = TEARDOWN_BACKENDS,
                   cycles: int = TEARDOWN_CYCLES) -> int:
    """Run ``_teardown_rank`` on ``WORLD`` spawned ranks; the number of cycles both ranks finished. A rank that
    fails, or no finished cycle for ``TEARDOWN_LIMIT`` seconds (a hang), fails the test with where it stopped."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_teardown_rank, args=(_free_port(), out, backends, cycles, teardown), nprocs=WORLD,
                                 join=False, start_method="spawn")
        seen, since = -1, time.monotonic()
        try:
            while not ctx.join(timeout=0.5):
                done = min(map(len, _progress(out)))
                if done != seen:
                    seen, since = done, time.monotonic()
                elif time.monotonic() - since > TEARDOWN_LIMIT:
                    raise TimeoutError(f"no cycle finished within {TEARDOWN_LIMIT:.0f} s: a teardown hangs")
        except Exception as exc:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            last = [lines[-1] if lines else "none" for lines in _progress(out)]
            errors = [open(path).read() for path in sorted(glob.glob(os.path.join(out, "rank*.err")))]
            pytest.fail(f"the DDP teardown cycles failed: {exc}; the last cycle each rank finished (backend, cycle): "
                        f"{last}\n" + "\n".join(errors))
        return min(map(len, _progress(out)))


def test_ddp_teardown_does_not_hang():
    """12 DDP runs on each backend that runs here, each ended by fastasam.distributed.destroy_process_group and the
    model's deletion: none hangs."""
    assert _run_teardowns(fastasam.distributed.destroy_process_group) == len(TEARDOWN_BACKENDS) * TEARDOWN_CYCLES


def test_destroy_process_group_destroys_every_group_after_a_kept_barrier_on_each_gloo_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    dist.new_group([0], backend="gloo")
    fastasam.distributed.destroy_process_group()
    assert not dist.is_initialized()
    assert len(fastasam.distributed._KEPT) == 2 and all(w.is_completed() for w in fastasam.distributed._KEPT)
