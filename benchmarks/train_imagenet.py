"""ImageNet training with SGD, SAM or ASAM, reference or fastasam, launched with torchrun.

    torchrun --nproc_per_node=8 -m benchmarks.train_imagenet --data /data/imagenet --preset paper-asam
    torchrun --nproc_per_node=8 -m benchmarks.train_imagenet --data synthetic --opt asam --impl reference
    python -m benchmarks.train_imagenet --data synthetic --arch resnet_tiny --image-size 32 --epochs 1   # CPU

``--data`` is an ImageFolder root with ``train/`` and ``val/`` (ImageNet's usual layout) or ``synthetic``.
DDP with NCCL on GPUs and gloo on CPUs (one process without torchrun). ``--impl reference`` runs ASAM/SAM with
fastasam's per-tensor ``reference`` loop (the published code's algorithm), ``--impl fastasam`` with ``--backend``
(``auto``). AMP bf16 (no scaler) or fp16 (GradScaler, the README recipe), channels_last, label smoothing, linear
warm-up then cosine LR per step, the BatchNorm running statistics frozen in the second pass, top-1/top-5
evaluation after every epoch. ``resnet50`` is torchvision's ResNet-50 (layout, parameter names, default
initialisation) built here, so a run does not depend on whether torchvision is installed.

Run directory (``--ckpt-dir``, default ``runs/imagenet``, git-ignored): ``last.pt`` (the checkpoint),
``log.jsonl`` (one JSON record per logged step: epoch, step, loss, lr, images/s; and one per evaluation: epoch,
top1, top5, images; ``epoch`` counts from 0 in both and in the console) and ``.lock``.

- One run per directory: the run takes an exclusive lock on ``.lock`` (``fcntl.flock``, released by the operating
  system when the process ends, even by a crash); a second run on the directory is refused with the holder's pid.
- A directory that holds a run is never silently reused: give ``--resume`` to continue it or ``--overwrite`` to
  start again (which deletes ``last.pt`` and ``log.jsonl``); without either the run is refused.
- Checkpoints are written every ``--ckpt-every`` steps, after each epoch's evaluation and when stopping: to
  ``last.pt.tmp``, fsynced, renamed over ``last.pt``, and the directory fsynced, so ``last.pt`` is always a whole
  checkpoint. They hold only tensors and plain data and are loaded with ``weights_only=True``; a full disk, an
  empty, truncated or foreign file is an error naming the file (and, for a full disk, the free space).

Stopping: SIGTERM or SIGINT (preemption, Ctrl-C) on any process, or reaching ``--max-steps``, stops every process
at the same step: the request is agreed by a MAX all-reduce of a one-element CPU flag after every step (on a gloo
group, so it never waits for the GPU), every rank stops at that step, rank 0 writes one checkpoint and all exit with
status 0 (a SIGTERM to torchrun itself is forwarded to every worker). A failure to open the run directory, load or
write a checkpoint on one rank is raised on every rank, so none is left waiting. A second SIGTERM/SIGINT to a process
that is already stopping ends it at once (the signal's default action). A stop at an epoch's last step keeps that
epoch's evaluation: ``--max-steps`` evaluates before it stops; a signal checkpoints first (the epoch marked
trained but not evaluated) and the resumed run evaluates it before it goes on.

Resuming: ``--resume`` continues from ``last.pt`` to the trajectory of an uninterrupted run, bit for bit on the same
number of processes: the data order and every augmentation are seeded by (seed, epoch, index), and the checkpoint
records the step, the position in the epoch, the number of processes and the global batch. Each step trains on
the same contiguous slice of the epoch's permutation whatever the number of processes, so a resume on another
number of processes keeps the global sample order (with a printed note); its numbers are then not bit-identical,
as BatchNorm normalises over each process's share of the batch. A resume with another ``--global-batch`` or
another training set size is refused (both change the schedule).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

import fastasam
from benchmarks.checkpoint import CheckpointError, RunDirectoryError, load_checkpoint, lock_run_dir, save_checkpoint
from benchmarks.data import ImageFolder, ResumableSampler, Synthetic
from benchmarks.models import get_model

# The paper's ImageNet setting for ASAM (Kwon et al. 2021): ResNet-50, rho = 1.0, eta = 0.01. The rest is the
# standard ResNet-50 recipe used with it here: 100 epochs, batch 512 in all, lr 0.2, weight decay 1e-4, cosine
# schedule, label smoothing 0.1. SAM's rho = 0.05.
PRESETS = {
    "paper-asam": {"arch": "resnet50", "opt": "asam", "rho": 1.0, "eta": 0.01, "epochs": 100, "global_batch": 512,
                   "lr": 0.2, "weight_decay": 1e-4, "label_smoothing": 0.1, "warmup_epochs": 0.0},
    "paper-sam": {"arch": "resnet50", "opt": "sam", "rho": 0.05, "epochs": 100, "global_batch": 512, "lr": 0.2,
                  "weight_decay": 1e-4, "label_smoothing": 0.1, "warmup_epochs": 0.0},
}
CHECKPOINT = "last.pt"
LOG = "log.jsonl"
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "step_in_epoch", "world",
                   "global_batch", "steps_per_epoch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[3:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="ImageFolder root (with train/ and val/) or 'synthetic'")
    p.add_argument("--preset", choices=sorted(PRESETS), help="set the paper's hyper-parameters (flags after it win)")
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet_tiny"])
    p.add_argument("--opt", default="asam", choices=["sgd", "sam", "asam"])
    p.add_argument("--impl", default="fastasam", choices=["reference", "fastasam"])
    p.add_argument("--backend", default="auto", help="fastasam backend for --impl fastasam")
    p.add_argument("--rho", type=float, default=None, help="default: 1.0 for asam, 0.05 for sam")
    p.add_argument("--eta", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--global-batch", type=int, default=256, help="images per step over all processes")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--amp", default="bf16" if torch.cuda.is_available() else "none", choices=["bf16", "fp16", "none"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000, help="synthetic data only")
    p.add_argument("--synthetic-size", type=int, default=12_800, help="synthetic training images per epoch")
    p.add_argument("--workers", type=int, default=8 if torch.cuda.is_available() else 0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-dir", type=Path, default=Path("runs/imagenet"),
                   help="run directory: last.pt, log.jsonl, .lock (one run at a time; runs/ is git-ignored)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints (also at epoch ends)")
    p.add_argument("--resume", action="store_true", help="continue the run in --ckpt-dir from its last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --ckpt-dir that holds one (deletes its last.pt and log.jsonl)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a checkpoint, every process at the same step) after this global step")
    p.add_argument("--print-every", type=int, default=50)
    p.add_argument("--no-eval", dest="eval", action="store_false")
    first, _ = p.parse_known_args(argv)
    if first.preset:
        p.set_defaults(**PRESETS[first.preset])
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --ckpt-dir and --overwrite deletes it: give one of them")
    if args.rho is None:
        args.rho = 1.0 if args.opt == "asam" else 0.05
    return args


class Run:
    """The process group, the device, rank-0-only printing, and the collectives the loop agrees with."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        self.flags = None  # the group for host-side flags: gloo, so agreeing on one never waits for the GPU
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.flags = dist.new_group(backend="gloo") if self.device.type == "cuda" else dist.group.WORLD

    def print(self, *a: object) -> None:
        if self.rank == 0:
            print(*a, flush=True)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank: a MAX all-reduce of one CPU int32 (no GPU sync)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.flags)
        return bool(t.item())

    def agree(self, work, what: str):
        """Run ``work()`` on this rank; if it raises on any rank, raise on every rank (that rank's own error, the
        others a pointer to it) instead of leaving them waiting in the next collective."""
        error = None
        try:
            out = work()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
        if self.any_rank(error is not None):
            if error is not None:
                raise error
            raise RuntimeError(f"fastasam: {what} failed on another process; its error is above")
        return out

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def datasets(args: argparse.Namespace):
    if args.data == "synthetic":
        train = Synthetic(args.synthetic_size, args.num_classes, args.image_size, args.seed)
        val = Synthetic(max(args.synthetic_size // 10, 1), args.num_classes, args.image_size, args.seed + 1)
        return train, val
    root = Path(args.data)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"--data {root}: no {split}/ directory; expected {root}/train/<class>/<image> "
                                    f"and {root}/val/<class>/<image>, or --data synthetic")
    train = ImageFolder(root / "train", args.image_size, train=True, seed=args.seed)
    val = ImageFolder(root / "val", args.image_size, train=False, seed=args.seed)
    if val.classes != train.classes:
        raise ValueError(f"--data {root}: train/ and val/ have different classes")
    return train, val


def train_sampler(size: int, global_batch: int, rank: int, world: int, seed: int):
    """``(sampler, batch per process, steps per epoch)`` for ``size`` training images.

    Rank ``r`` takes positions ``r, r + world, ...`` of the epoch's permutation, ``batch`` at a time, so step ``k``
    trains on positions ``[k * global_batch, (k + 1) * global_batch)`` over all ranks whatever ``world`` is, and an
    epoch is ``size // global_batch`` steps (never a padded duplicate): the global sample order does not depend on
    the number of processes. ``sampler.set_epoch(epoch, k * batch)`` starts an epoch at step ``k``.
    """
    if global_batch % world:
        raise ValueError(f"--global-batch {global_batch} is not divisible by the {world} processes")
    steps = size // global_batch
    if steps == 0:
        raise ValueError(f"{size} training images give no full batch of {global_batch}")
    return ResumableSampler(size, rank, world, shuffle=True, seed=seed), global_batch // world, steps


def build_optimizer(args: argparse.Namespace, model: nn.Module):
    base = {"lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay}
    if args.opt == "sgd":
        return torch.optim.SGD(model.parameters(), **base)
    backend = "reference" if args.impl == "reference" else args.backend
    if args.opt == "sam":
        return fastasam.SAM(model.parameters(), torch.optim.SGD, rho=args.rho, backend=backend, **base)
    return fastasam.ASAM(model.parameters(), torch.optim.SGD, rho=args.rho, eta=args.eta, backend=backend, **base)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0, then cosine decay to 0, per step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Stop:
    """SIGTERM/SIGINT (preemption, Ctrl-C) set ``signum``; the loop agrees on it with the other ranks after each
    step, checkpoints and returns. The first signal also restores the signals' default action, so a second one
    ends the process at once, even inside a collective. A context manager: the previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> Stop:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, run: Run, autocast) -> dict:
    model.eval()
    totals = torch.zeros(3, device=run.device, dtype=torch.float64)  # top-1 hits, top-5 hits, count
    for x, y in loader:
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        with autocast():
            logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(y), device=run.device)])
    model.train()
    top1, top5, n = run.all_sum(totals).tolist()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "images": int(n)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = Run()
    try:
        return train(args, run)
    finally:
        run.close()


def open_run_dir(args: argparse.Namespace):
    """Rank 0: lock ``--ckpt-dir`` and check that this run may use it (a held run needs --resume or --overwrite);
    remove a temporary checkpoint left by a killed writer. Returns the lock (released when the process ends)."""
    lock = lock_run_dir(args.ckpt_dir)
    try:
        ckpt, log = args.ckpt_dir / CHECKPOINT, args.ckpt_dir / LOG
        (args.ckpt_dir / (CHECKPOINT + ".tmp")).unlink(missing_ok=True)
        held = [p.name for p in (ckpt, log) if p.exists()]
        if args.overwrite:
            for p in (ckpt, log):
                p.unlink(missing_ok=True)
        elif args.resume and not ckpt.exists():
            raise FileNotFoundError(f"fastasam: --resume: {ckpt} does not exist; run without --resume to start, or "
                                    "point --ckpt-dir at the run to continue")
        elif held and not args.resume:
            raise RunDirectoryError(f"fastasam: {args.ckpt_dir} holds a run ({', '.join(held)}); give --resume to "
                                    "continue it, --overwrite to delete it and start again, or another --ckpt-dir")
    except BaseException:
        lock.release()
        raise
    return lock


def train(args: argparse.Namespace, run: Run) -> dict:
    lock = run.agree(lambda: open_run_dir(args) if run.rank == 0 else None, f"opening --ckpt-dir {args.ckpt_dir}")
    try:
        return _train(args, run)
    finally:
        if lock is not None:
            lock.release()


def _train(args: argparse.Namespace, run: Run) -> dict:
    torch.manual_seed(args.seed)
    train_set, val_set = datasets(args)
    sampler, batch, steps_per_epoch = train_sampler(len(train_set), args.global_batch, run.rank, run.world,
                                                    args.seed)
    model = get_model(args.arch, len(train_set.classes)).to(run.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    opt = build_optimizer(args, model)
    sharpness = args.opt != "sgd"

    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, round(args.warmup_epochs * steps_per_epoch), total))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(run.device.type, enabled=args.amp == "fp16")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    def autocast():
        return torch.autocast(run.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    ckpt = args.ckpt_dir / CHECKPOINT
    step, epoch, start_in_epoch = 0, 0, 0
    if args.resume:
        state = run.agree(lambda: load_checkpoint(ckpt, CHECKPOINT_KEYS, run.device), f"loading {ckpt}")
        if state["global_batch"] != args.global_batch or state["steps_per_epoch"] != steps_per_epoch:
            raise CheckpointError(
                f"fastasam: {ckpt} was written with --global-batch {state['global_batch']} and "
                f"{state['steps_per_epoch']} steps per epoch; this run has --global-batch {args.global_batch} and "
                f"{steps_per_epoch} (from {len(train_set)} images): both set the schedule and the position in the "
                f"epoch, so resume with --global-batch {state['global_batch']} and the same training data")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, start_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        run.print(f"resumed from {ckpt}: epoch {epoch}, step {step}")
        if state["world"] != run.world:
            run.print(f"note: {ckpt} was written by {state['world']} process(es), this run has {run.world}: every "
                      "step trains on the same images as before, but BatchNorm now normalises over "
                      f"{batch} images per process, so the numbers are not bit-identical to a run on "
                      f"{state['world']}")
        del state

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        """Rank 0 writes; every rank raises if the write failed. ``step_in_epoch == steps_per_epoch``: the epoch
        is trained but not evaluated (a resumed run evaluates it first)."""
        def write() -> None:
            if run.rank == 0:
                save_checkpoint(ckpt, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                    "world": run.world, "global_batch": args.global_batch, "steps_per_epoch": steps_per_epoch,
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}})
        run.agree(write, f"writing {ckpt}")

    def log(entry: dict) -> None:
        if log_file:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

    log_file = open(args.ckpt_dir / LOG, "a") if run.rank == 0 else None  # noqa: SIM115 - closed below
    run.print(f"{args.arch} {args.opt} ({args.impl}), {run.world} process(es) on {run.device}, {len(train_set)} "
              f"images, {steps_per_epoch} steps/epoch x {args.epochs} epochs, global batch {args.global_batch}")
    result: dict = {"steps": step}

    def stopped(why: str) -> dict:
        run.print(f"stopped at step {step} ({why}); continue with --resume")
        return {**result, "steps": step, "stopped": True}

    try:
        with Stop() as stop:
            while epoch < args.epochs:
                sampler.set_epoch(epoch, start_in_epoch * batch)
                train_set.epoch = epoch
                loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=args.workers,
                                    drop_last=True, pin_memory=run.device.type == "cuda")
                t0, seen, i = time.perf_counter(), 0, start_in_epoch
                for x, y in itertools.islice(loader, steps_per_epoch - start_in_epoch):
                    x = x.to(run.device, non_blocking=True).to(memory_format=memory_format)
                    y = y.to(run.device, non_blocking=True)
                    with autocast():
                        loss = loss_fn(net(x), y)
                    scaler.scale(loss).backward()
                    if sharpness:
                        opt.first_step(zero_grad=True)
                        with fastasam.frozen_batchnorm_stats(net), autocast():
                            loss2 = loss_fn(net(x), y)
                        scaler.scale(loss2).backward()
                    if scaler.is_enabled():
                        scaler.step(opt)  # ASAM/SAM: restore + base step, skipped on an fp16 overflow in either pass
                        scaler.update()
                    elif sharpness:
                        opt.second_step()
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                    step, i, seen = step + 1, i + 1, seen + len(x) * run.world
                    last = i == steps_per_epoch
                    if step % args.print_every == 0 or last:
                        rate = seen / (time.perf_counter() - t0)
                        entry = {"epoch": epoch, "step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                                 "images_per_s": rate}
                        run.print(f"epoch {epoch} step {i}/{steps_per_epoch} ({step}/{total}) loss "
                                  f"{entry['loss']:.4f} lr {entry['lr']:.4g} {rate:.1f} img/s")
                        log(entry)
                    if run.any_rank(stop.signum is not None):  # every rank stops at this step
                        checkpoint(epoch, i)  # at the epoch's end: trained, evaluated by the resumed run
                        return stopped("signal")
                    planned = args.max_steps is not None and step >= args.max_steps
                    if planned and not last:
                        checkpoint(epoch, i)
                        return stopped(f"--max-steps {args.max_steps}")
                    if step % args.ckpt_every == 0 and not last:
                        checkpoint(epoch, i)
                if args.eval:
                    val_sampler = ResumableSampler(len(val_set), run.rank, run.world, shuffle=False, pad=False)
                    val_loader = DataLoader(val_set, batch_size=batch, sampler=val_sampler, num_workers=args.workers)
                    result = {"epoch": epoch, **evaluate(model, val_loader, run, autocast)}  # every image once
                    run.print(f"epoch {epoch} eval: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                              f"({result['images']} images)")
                    log(result)
                epoch, start_in_epoch = epoch + 1, 0
                checkpoint(epoch, 0)
                if run.any_rank(stop.signum is not None):
                    return stopped("signal")
                if args.max_steps is not None and step >= args.max_steps and epoch < args.epochs:
                    return stopped(f"--max-steps {args.max_steps}")
        return {**result, "steps": step, "stopped": False}
    finally:
        if log_file:
            log_file.close()


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker leaves without the interpreter's teardown: freeing the DDP reducer after the gloo group
        # is gone sometimes aborts the process ("terminate called without an active exception": once in a CI run of
        # tests/test_trainer.py, after training, checkpoints and logs were done). Everything was written and closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
