"""ImageNet training with SGD, SAM or ASAM, reference or fastasam, launched with torchrun.

    torchrun --nproc_per_node=8 -m benchmarks.train_imagenet --data /data/imagenet --preset paper-asam
    torchrun --nproc_per_node=8 -m benchmarks.train_imagenet --data synthetic --opt asam --impl reference
    python -m benchmarks.train_imagenet --data synthetic --arch resnet_tiny --image-size 32 --epochs 1   # CPU

``--data`` is an ImageFolder root with ``train/`` and ``val/`` (ImageNet's usual layout) or ``synthetic``. Images in
other pixel formats are converted (16-bit greys scaled to 8 bits, transparency composited onto ImageNet's mean colour)
or refused, and a file that cannot be decoded is an error naming it (``benchmarks.data``). Every numeric flag is
range-checked when parsed (the error names the flag, the range and the value).
DDP with NCCL on GPUs and gloo on CPUs (one process without torchrun). ``--impl reference`` runs ASAM/SAM with
fastasam's per-tensor ``reference`` loop (the published code's algorithm), ``--impl fastasam`` with ``--backend``
(``auto``). AMP bf16 (no scaler) or fp16 (GradScaler, the README recipe), channels_last, label smoothing, linear
warm-up then cosine LR per step, the BatchNorm running statistics frozen in the second pass, top-1/top-5
evaluation after every epoch. ``resnet50`` is torchvision's ResNet-50 (layout, parameter names, default
initialisation) built here, so a run does not depend on whether torchvision is installed.

Run directory (``--ckpt-dir``, default ``runs/imagenet``, git-ignored): ``last.pt`` (the checkpoint),
``log.jsonl`` (one JSON record per logged step: epoch, step, loss, lr, images/s; and one per evaluation: epoch,
top1, top5, images; ``epoch`` counts from 0 in both and in the console), ``.lock``, and the report (see
Reporting): ``best.pt``, ``summary.json``, ``curves.png``, ``tensorboard/``.

- One run per directory: the run takes an exclusive lock on ``.lock`` (``fcntl.flock``, released by the operating
  system when the process ends, even by a crash); a second run on the directory is refused with the holder's pid.
- A directory that holds a run is never silently reused: give ``--resume`` to continue it or ``--overwrite`` to
  start again (which deletes ``last.pt`` and ``log.jsonl``); without either the run is refused.
- Checkpoints are written every ``--ckpt-every`` steps, after each epoch's evaluation and when stopping: to
  ``last.pt.tmp``, fsynced, renamed over ``last.pt``, and the directory fsynced, so ``last.pt`` is always a whole
  checkpoint. They hold only tensors and plain data and are loaded with ``weights_only=True``; a full disk, an
  empty, truncated or foreign file is an error naming the file (and, for a full disk, the free space).
- Nothing is written through a symbolic link: a link at any of the run directory's files (``RUN_FILES``: ``.lock``,
  ``last.pt``, ``best.pt``, ``log.jsonl``, ``summary.json``, ``curves.png``, ``tensorboard/`` and the temporary
  ``*.tmp``) is refused with an error naming it, when the run starts and again before each write (``log.jsonl``,
  ``summary.json``'s temporary file and ``curves.png`` are opened with ``O_NOFOLLOW``). The directory itself may be a
  link.

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
another training set size is refused (both change the schedule). Other flags, against those the checkpoint records:

- applied from the resumed step on, each printed (``resume: --lr 0.1 -> 0.05 applied``) and logged (a ``resume``
  record, ``{flag: [old, new]}``): ``--lr`` (the peak: the schedule's base and each group's lr at the step reached),
  ``--momentum``, ``--weight-decay``, ``--rho``, ``--rho-min``, ``--eta``, ``--alpha``, ``--label-smoothing``,
  ``--clip-grad``, ``--ema``'s decay, ``--amp``, ``--skip-nonfinite``, and ``--data`` naming another folder (the
  training set's size is checked): how far and how each step goes, not which steps there are;
- refused, naming both values, as they fix the model (``--arch``, ``--num-classes``), the algorithm and its param
  groups (``--opt``, ``--adaptive``, ``--no-bn-bias-decay``, ``--every``, ``--sharpness``, ``--rho-follows-lr``,
  ``--ema`` on or off), the schedule (``--epochs``, ``--warmup-epochs``) or the data and its order (``--data`` to or
  from ``synthetic``, ``--seed``, ``--synthetic-size``, ``--image-size``, ``--val-crop``, ``--val-resize``);
- free, as they only say how the run is executed: the intervals, ``--max-steps``, ``--target-top1``, ``--no-eval``,
  the loader and its workers, ``--impl``, ``--backend``, ``--compile``, ``--channels-last``, ``--sync-bn``,
  ``--cudnn-benchmark``.

Non-finite losses: an inf or NaN training loss (either pass, any process) stops the run on every process with
``NonFiniteLossError`` (a non-zero exit status) naming the step, the loss, the process and the fix (a lower ``--lr``,
which a resume applies, ``--clip-grad``, bf16 instead of fp16, ``--skip-nonfinite``). Nothing is written after it:
``last.pt`` and ``best.pt`` stay the last ones before that step, and there is no ``summary.json``. It is found without
a device synchronisation per step: the losses stay on the device (``LossWatch``) and are read at the print interval
(``--print-every``, agreed by the ranks with the stop flag's all-reduce) and before every checkpoint and evaluation,
which also refuse (the same error) weights, buffers, EMA or optimizer state holding an inf or NaN. With
``--skip-nonfinite N`` up to N such steps are skipped instead (no optimizer step: the gradients dropped, a perturbation
undone, the BatchNorm running statistics restored, the EMA not updated; the learning-rate schedule goes on), each
printed and logged (``nonfinite_loss``, ``pass``, ``skipped``: the count so far, kept over resumes, also in
``summary.json``), and the next one stops the run as above; this reads each pass's loss on the host, one device
synchronisation (and, with several processes, one CPU all-reduce) per pass.

Optimizers (``--opt``): ``sgd``, ``sam``, ``asam``, ``looksam`` and ``gsam`` (``fastasam.LookSAM``/``GSAM``; SAM's
perturbation, ASAM's with ``--adaptive``; ``--alpha``: 0.7 and 0.1 by default), and ``msam`` (``fastasam.MSAM``,
Momentum-SAM: one forward/backward a step, as ``sgd``; ``--rho`` 3 by default, the paper's ResNet-50 value; its weights
sit at the perturbed point between steps, so the evaluations, the EMA and ``best.pt`` take them through
``MSAM.unperturbed()``, while ``last.pt`` keeps them as they are, for a bit-exact resume); ``friendlysam``, ``wsam``
and ``bsam`` (``fastasam.FriendlySAM``/``WSAM``/``BSAM``, two passes a step; ``--sigma``/``--lmbda``, ``--gamma``;
BSAM's own update takes ``--lr``, ``--weight-decay`` and ``--rho``, ``num_data`` the training set's size, and is
evaluated and kept at its mean, as MSAM). The loop for each is
``backward(); if opt.second_pass_needed: first_step(zero_grad=True), backward(); second_step()``. An adaptive optimizer
(``asam``, or a variant with ``--adaptive``) takes the official ASAM code's split (``fastasam.adaptive_param_groups``:
parameters named ``weight`` adaptive, biases not). ``--every K``: a two-pass step every K-th step (the others one pass,
the base optimizer on the one gradient): interval SAM for ``sam``/``asam``, LookSAM's ``k`` (default 5).
``--sharpness replica``: m-sharpness, each process perturbs with its own gradient's norm
(``fastasam.distributed.replica_perturbation``: the first backward under DDP's ``no_sync``); ``global`` (default)
perturbs with the all-reduced gradient; the two are the same on one process. ``--rho-follows-lr``: rho follows the
learning rate (``fastasam.RhoFollowsLR``: ``--rho`` at the peak ``--lr``, ``--rho-min`` at lr 0).
``--no-bn-bias-decay``: weight decay 0 for BatchNorm parameters and biases (with the adaptive split: up to four
groups, adaptive or not x decayed or not; empty ones left out). ``--ema DECAY``: an exponential moving average of
the weights and buffers (``ema = DECAY * ema + (1 - DECAY) * w`` after every step, integer buffers copied),
evaluated beside the weights (``ema_top1``/``ema_top5``) and saved in the checkpoints. ``--clip-grad NORM``: the
gradient ``second_step`` steps with is clipped to a global norm of NORM (``clip_grad_norm_``, after GradScaler's
``unscale_`` under fp16): the second pass's gradient (at ``w + e``) on a two-pass step, the one pass's on a one-pass
step; the first pass's gradient, which only sets the perturbation's direction (it is normalised), is not clipped.
``--sync-bn`` (GPUs, several processes), ``--compile`` (``torch.compile`` of the model for the training passes),
``cudnn.benchmark`` on GPUs (``--no-cudnn-benchmark`` for bit-identical resumes there). Evaluation images are
resized to a short side of ``--val-resize`` (default: the crop * 256 / 224) and center-cropped to ``--val-crop``
(default ``--image-size``). ``--preset``: ``paper-asam``, ``paper-sam`` (the papers' settings) and ``composer-sam``
(Composer's SAM recipe: rho 0.5, a two-pass step every 10 steps, on the same ResNet-50 recipe).

Reporting: every logged step prints and logs (``log.jsonl``) the wall-clock time (``time``, Unix seconds),
``elapsed_s`` (the run's wall time, carried over resumes by the checkpoint), ``eta_s`` (the remaining steps at the
last interval's seconds per step, plus the remaining evaluations at the last one's time), and where the time went:
``data_s`` (mean seconds per step the loop waited for the next batch) and ``compute_s`` (the rest of the step's
wall time, measured on the host over the print interval: no extra device synchronisation). Evaluations log
``step``, ``elapsed_s`` and ``time`` too. ``--target-top1 X`` prints and logs once (``target_top1`` records) the
first evaluation whose top-1 reaches X, with the elapsed time. A finished run prints a summary and writes into the
run directory ``summary.json`` (best and final top-1/top-5, EMA's too, wall time, time to the target, images/s over
the training steps, SAM's overhead, peak memory, versions and commit) and ``curves.png`` (accuracy and loss against
epochs and wall-clock hours; needs matplotlib, else a printed note), both from the whole run's ``log.jsonl``
(resumes included; ``benchmarks.run_report``). ``best.pt`` holds the weights (and EMA) of the best top-1 so far,
written like ``last.pt``. With the ``tensorboard`` package installed (``pip install fastasam[tensorboard]``) the
logged numbers also go to ``tensorboard/`` as scalars (one note when it is not installed).
``python -m benchmarks.compare_runs RUN_DIR... [--out FILE]`` plots several runs' top-1 against wall-clock hours.

SAM's overhead (``summary.json``'s ``sam_overhead``): per step, ``pass`` is the time of the first forward and
backward (from the batch on the device to the end of the first ``backward()``) and ``step`` that of the whole step
(both passes, ``first_step``, ``second_step``, clipping, the schedules and EMA); CUDA events on GPUs, read at the
print intervals. ``step_over_pass`` = sum of ``step`` / sum of ``pass`` over the steps after each start's first 5
(warm-up): how many single-pass steps of plain SGD (one forward/backward, whose own update is not in ``pass``) a
step costs; two-pass SAM's floor is 2.0, interval SAM and LookSAM between 1 and 2, ``sgd`` just over 1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

import fastasam
from benchmarks import run_report
from benchmarks.checkpoint import (
    LOCK_NAME,
    CheckpointError,
    RunDirectoryError,
    load_checkpoint,
    lock_run_dir,
    save_checkpoint,
)
from benchmarks.data import ImageFolder, ResumableSampler, Synthetic
from benchmarks.input_pipeline import LOADERS, make_loader
from benchmarks.models import get_model
from benchmarks.run_report import (
    CURVES,
    SUMMARY,
    TENSORBOARD,
    TensorBoard,
    open_nofollow,
    peak_memory,
    refuse_symlink,
)

# The paper's ImageNet setting for ASAM (Kwon et al. 2021): ResNet-50, rho = 1.0, eta = 0.01. The rest is the
# standard ResNet-50 recipe used with it here: 100 epochs, batch 512 in all, lr 0.2, weight decay 1e-4, cosine
# schedule, label smoothing 0.1. SAM's rho = 0.05.
PRESETS = {
    "paper-asam": {"arch": "resnet50", "opt": "asam", "rho": 1.0, "eta": 0.01, "epochs": 100, "global_batch": 512,
                   "lr": 0.2, "weight_decay": 1e-4, "label_smoothing": 0.1, "warmup_epochs": 0.0},
    "paper-sam": {"arch": "resnet50", "opt": "sam", "rho": 0.05, "epochs": 100, "global_batch": 512, "lr": 0.2,
                  "weight_decay": 1e-4, "label_smoothing": 0.1, "warmup_epochs": 0.0},
    # Composer's SAM recipe for ResNet-50 on ImageNet (MosaicML): rho 0.5, SAM's two passes every 10th step only.
    "composer-sam": {"arch": "resnet50", "opt": "sam", "rho": 0.5, "every": 10, "epochs": 100, "global_batch": 512,
                     "lr": 0.2, "weight_decay": 1e-4, "label_smoothing": 0.1, "warmup_epochs": 0.0},
}
CHECKPOINT = "last.pt"
BEST = "best.pt"
TIMED_AFTER = 5  # steps after each start left out of SAM's measured overhead (warm-up: allocator, cudnn, compile)
LOG = "log.jsonl"
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "step_in_epoch", "world",
                   "global_batch", "steps_per_epoch")
# The run directory's files: none may be a symbolic link (refused when the run starts and before each write).
RUN_FILES = (LOCK_NAME, CHECKPOINT, CHECKPOINT + ".tmp", BEST, BEST + ".tmp", LOG, SUMMARY, SUMMARY + ".tmp", CURVES,
             TENSORBOARD)
# --resume (module docstring): the flags a resume applies when they changed (printed and logged), and those it refuses
# because they fix the model, the algorithm and its param groups, the schedule, or the data and its order.
RESUME_APPLIED = ("lr", "momentum", "weight_decay", "rho", "rho_min", "eta", "alpha", "label_smoothing", "clip_grad",
                  "ema", "amp", "skip_nonfinite", "data")
RESUME_FIXED = ("arch", "num_classes", "opt", "adaptive", "no_bn_bias_decay", "every", "sharpness", "rho_follows_lr",
                "ema", "epochs", "warmup_epochs", "data", "seed", "synthetic_size", "image_size", "val_crop",
                "val_resize")


def int_flag(low: int, high: int | None = None, describe: str | None = None):
    """An argparse ``type``: the argument as an int in ``[low, high]`` (no upper bound when ``high`` is None), else
    ``argparse.ArgumentTypeError`` with the range (``describe``, else ">= low" / "in [low, high]") and the value."""
    rng = describe or (f">= {low}" if high is None else f"in [{low}, {high}]")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {rng}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {rng}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_flag(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """An argparse ``type``: the argument as a finite float from ``low`` (excluded when ``low_open``) up to ``high``
    (excluded when ``high_open``; no upper bound when None), else ``argparse.ArgumentTypeError`` with the range."""
    if high is None:
        rng = f"{'>' if low_open else '>='} {low:g}"
    else:
        rng = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number {rng}, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high))
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be a finite number {rng}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[3:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="ImageFolder root (with train/ and val/) or 'synthetic'")
    p.add_argument("--preset", choices=sorted(PRESETS), help="set the paper's hyper-parameters (flags after it win)")
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet_tiny"])
    p.add_argument("--opt", default="asam",
                   choices=["sgd", "sam", "asam", "looksam", "gsam", "msam", "friendlysam", "wsam", "bsam"])
    p.add_argument("--impl", default="fastasam", choices=["reference", "fastasam"])
    p.add_argument("--backend", default="auto", help="fastasam backend for --impl fastasam")
    p.add_argument("--rho", type=float_flag(0), default=None,
                   help="default: 1.0 for an adaptive optimizer (asam, --adaptive), else 0.05")
    p.add_argument("--eta", type=float_flag(0), default=0.01)
    p.add_argument("--adaptive", action="store_true",
                   help="looksam/gsam/msam/friendlysam/wsam/bsam: ASAM's adaptive perturbation")
    p.add_argument("--sigma", type=float_flag(0), default=1.0, help="friendlysam's sigma (default 1)")
    p.add_argument("--lmbda", type=float_flag(0, 1, high_open=True), default=0.9,
                   help="friendlysam's lmbda, in [0, 1) (default 0.9)")
    p.add_argument("--gamma", type=float_flag(0, 1, high_open=True), default=0.9,
                   help="wsam's gamma, in [0, 1) (default 0.9)")
    p.add_argument("--alpha", type=float_flag(0), default=None, help="looksam/gsam's alpha (default 0.7 / 0.1)")
    p.add_argument("--every", type=int_flag(1), default=None,
                   help="a two-pass step every K-th step: interval SAM (sam/asam, default 1), LookSAM's k (default 5)")
    p.add_argument("--sharpness", default="global", choices=["global", "replica"],
                   help="replica: m-sharpness, each process perturbs with its own gradient's norm")
    p.add_argument("--rho-follows-lr", action="store_true",
                   help="rho proportional to the lr (fastasam.RhoFollowsLR): --rho at --lr, --rho-min at lr 0")
    p.add_argument("--rho-min", type=float_flag(0), default=0.0)
    p.add_argument("--no-bn-bias-decay", action="store_true", help="no weight decay on BatchNorm parameters and biases")
    p.add_argument("--ema", type=float_flag(0, 1, high_open=True), default=None, metavar="DECAY",
                   help="evaluate and save an exponential moving average of the weights too (e.g. 0.9999)")
    p.add_argument("--clip-grad", type=float_flag(0, low_open=True), default=None, metavar="NORM",
                   help="clip the gradient second_step uses (the second pass's) to this global norm")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm over the processes (GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for the training passes")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="cudnn.benchmark on GPUs (its algorithm choice may differ between a run and its resume)")
    p.add_argument("--epochs", type=int_flag(1), default=90)
    p.add_argument("--global-batch", type=int_flag(1), default=256, help="images per step over all processes")
    p.add_argument("--lr", type=float_flag(0, low_open=True), default=0.1,
                   help="the peak learning rate")
    p.add_argument("--momentum", type=float_flag(0, 1, high_open=True), default=0.9)
    p.add_argument("--weight-decay", type=float_flag(0), default=1e-4)
    p.add_argument("--label-smoothing", type=float_flag(0, 1, high_open=True), default=0.1)
    p.add_argument("--warmup-epochs", type=float_flag(0), default=0.0,
                   help="linear warm-up, in epochs (at most --epochs)")
    p.add_argument("--amp", default="bf16" if torch.cuda.is_available() else "none", choices=["bf16", "fp16", "none"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    p.add_argument("--image-size", type=int_flag(1), default=224)
    p.add_argument("--val-crop", type=int_flag(1), default=None,
                   help="evaluation: the center crop's side (default --image-size)")
    p.add_argument("--val-resize", type=int_flag(1), default=None,
                   help="evaluation: the short side the image is resized to before the crop (default crop * 256/224)")
    p.add_argument("--num-classes", type=int_flag(1), default=1000, help="synthetic data only")
    p.add_argument("--synthetic-size", type=int_flag(1), default=12_800, help="synthetic training images per epoch")
    p.add_argument("--workers", type=int_flag(0), default=8 if torch.cuda.is_available() else 0,
                   help="decoding processes per process (--loader pil, kept across epochs) or DALI threads")
    p.add_argument("--loader", default="pil", choices=LOADERS,
                   help="pil: CPU decoding in --workers processes, uint8 batches normalised on the device; dali: "
                        "NVIDIA DALI decodes on the GPU (pip install nvidia-dali-cuda130). Both take the same "
                        "samples, order, crop regions and flips from (seed, epoch, index), so a resume continues "
                        "them; dali's pixels are as reproducible as DALI's decoder (not documented bit-exact)")
    p.add_argument("--seed", type=int_flag(0, 2**63 - 1, ">= 0 and < 2**63"), default=0)
    p.add_argument("--ckpt-dir", type=Path, default=Path("runs/imagenet"),
                   help="run directory: last.pt, log.jsonl, .lock (one run at a time; runs/ is git-ignored)")
    p.add_argument("--ckpt-every", type=int_flag(1), default=1000,
                   help="steps between checkpoints (also at epoch ends)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --ckpt-dir from its last.pt (which flags may change: see Resuming)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --ckpt-dir that holds one (deletes its last.pt, log.jsonl and the "
                        "report: best.pt, summary.json, curves.png, tensorboard/)")
    p.add_argument("--max-steps", type=int_flag(1), default=None,
                   help="stop (with a checkpoint, every process at the same step) after this global step")
    p.add_argument("--print-every", type=int_flag(1), default=50,
                   help="steps between progress lines (where the loss is also checked for inf/NaN)")
    p.add_argument("--target-top1", type=float_flag(0, 100), default=None, metavar="X",
                   help="print and log once when the validation top-1 reaches X percent, with the elapsed time")
    p.add_argument("--skip-nonfinite", type=int_flag(0), default=0, metavar="N",
                   help="skip up to N steps whose loss is inf or NaN (no optimizer step, the BatchNorm statistics "
                        "restored; printed and logged) and stop at the next one; reads each pass's loss on the host "
                        "(one device synchronisation per pass). 0 (default): stop at the first, checked at the print "
                        "interval and before every checkpoint")
    p.add_argument("--no-eval", dest="eval", action="store_false")
    first, _ = p.parse_known_args(argv)
    if first.preset:
        p.set_defaults(**PRESETS[first.preset])
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --ckpt-dir and --overwrite deletes it: give one of them")
    variant = args.opt in ("looksam", "gsam")
    if args.adaptive and args.opt in ("sgd", "sam", "asam"):
        p.error(f"--adaptive is for --opt looksam/gsam/msam/friendlysam/wsam/bsam (asam is adaptive, --opt {args.opt} "
                "is not)")
    if args.alpha is not None and not variant:
        p.error("--alpha is LookSAM's and GSAM's: give --opt looksam or --opt gsam")
    if args.every is not None and args.opt not in ("sam", "asam", "looksam"):
        p.error(f"--every {args.every}: give it with --opt sam, asam or looksam (--opt {args.opt} takes none)")
    if args.opt in ("msam", "bsam") and args.sharpness != "global":
        p.error(f"--sharpness replica is for the optimizers whose ascent is normalised by a global norm; --opt "
                f"{args.opt} has none")
    if args.opt == "bsam" and args.rho_follows_lr:
        p.error("--rho-follows-lr is for the optimizers built on fastasam.ASAM; --opt bsam takes a fixed --rho")
    if args.opt == "sgd" and (args.sharpness != "global" or args.rho_follows_lr):
        p.error("--sharpness and --rho-follows-lr are for the sharpness-aware optimizers, not --opt sgd")
    if args.val_resize is not None and args.val_resize < (args.val_crop or args.image_size):
        p.error(f"--val-resize {args.val_resize} is smaller than the crop ({args.val_crop or args.image_size})")
    if args.warmup_epochs > args.epochs:
        p.error(f"--warmup-epochs {args.warmup_epochs:g} is longer than the run (--epochs {args.epochs}): give at most "
                f"{args.epochs}")
    if args.every is None:
        args.every = 5 if args.opt == "looksam" else 1
    if args.alpha is None and variant:
        args.alpha = 0.7 if args.opt == "looksam" else 0.1
    if args.rho is None:  # the papers' ImageNet values (MSAM: Becker et al.'s ResNet-50 with SGD)
        args.rho = 3.0 if args.opt == "msam" else 1.0 if args.opt == "asam" or args.adaptive else 0.05
    if args.rho_follows_lr and args.rho_min > args.rho:
        p.error(f"--rho-min {args.rho_min:g} is above --rho {args.rho:g}: --rho-follows-lr goes from --rho at the peak "
                "lr down to --rho-min at lr 0; give --rho-min <= --rho")
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
        return self.any_ranks(flag)[0]

    def any_ranks(self, *flags: bool) -> tuple[bool, ...]:
        """``any_rank`` of several flags in one MAX all-reduce of CPU int32s (no GPU sync)."""
        if self.world == 1:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.flags)
        return tuple(bool(v) for v in t.tolist())

    def gather(self, obj: object) -> list:
        """``obj`` (a picklable host object) of every rank, in rank order, over the host flags' group."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.flags)
        return out

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

    def close(self, ok: bool = True) -> None:
        """Destroy the process group. After a run that ended on every rank (``ok``):
        ``fastasam.distributed.destroy_process_group``, a barrier then torch's, which avoids PyTorch's gloo teardown
        hang; after an error (other ranks may not come to a barrier): torch's alone."""
        if self.world > 1:
            (fastasam.distributed.destroy_process_group if ok else dist.destroy_process_group)()


def datasets(args: argparse.Namespace):
    if args.data == "synthetic":
        train = Synthetic(args.synthetic_size, args.num_classes, args.image_size, args.seed)
        val = Synthetic(max(args.synthetic_size // 10, 1), args.num_classes, args.val_crop or args.image_size,
                        args.seed + 1)
        return train, val
    root = Path(args.data)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"--data {root}: no {split}/ directory; expected {root}/train/<class>/<image> "
                                    f"and {root}/val/<class>/<image>, or --data synthetic")
    train = ImageFolder(root / "train", args.image_size, train=True, seed=args.seed, uint8=True)
    val = ImageFolder(root / "val", args.val_crop or args.image_size, train=False, seed=args.seed, uint8=True)
    val.resize = args.val_resize  # the short side before the center crop (None: crop * 256 / 224)
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


def param_groups(args: argparse.Namespace, model: nn.Module) -> list[dict]:
    """The optimizer's param groups: for an adaptive optimizer (``asam``, a variant with ``--adaptive``) the official
    ASAM split (``fastasam.adaptive_param_groups``: ``adaptive`` True for parameters named ``weight``, False for the
    others); with ``--no-bn-bias-decay`` each group split again into decayed parameters and the BatchNorm parameters
    and biases (``weight_decay`` 0). Empty groups are left out; the order is the model's within each group."""
    adaptive = args.opt == "asam" or args.adaptive
    groups = (fastasam.adaptive_param_groups(model) if adaptive
              else [{"params": [p for p in model.parameters() if p.requires_grad]}])
    if not args.no_bn_bias_decay:
        return groups
    no_decay = {id(p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
                if isinstance(m, nn.modules.batchnorm._BatchNorm) or name == "bias"}
    split = []
    for g in groups:
        for decayed in (True, False):
            params = [p for p in g["params"] if (id(p) not in no_decay) == decayed]
            if params:
                split.append({**g, "params": params, **({} if decayed else {"weight_decay": 0.0})})
    return split


def build_optimizer(args: argparse.Namespace, model: nn.Module, num_data: int):
    """``args.opt`` over ``model``'s param groups; ``num_data`` (the training set's size) is BSAM's."""
    base = {"lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay}
    groups = param_groups(args, model)
    if args.opt == "sgd":
        return torch.optim.SGD(groups, **base)
    backend = "reference" if args.impl == "reference" else args.backend
    if args.opt == "friendlysam":
        return fastasam.FriendlySAM(groups, torch.optim.SGD, rho=args.rho, sigma=args.sigma, lmbda=args.lmbda,
                                    adaptive=args.adaptive, backend=backend, **base)
    if args.opt == "wsam":
        return fastasam.WSAM(groups, torch.optim.SGD, rho=args.rho, gamma=args.gamma, adaptive=args.adaptive,
                             backend=backend, **base)
    if args.opt == "bsam":  # its own Adam-like update: --lr, --weight-decay and --rho; no momentum flag
        return fastasam.BSAM(groups, num_data, lr=args.lr, weight_decay=args.weight_decay, rho=args.rho,
                             adaptive=args.adaptive, backend=backend, seed=args.seed)
    if args.opt == "sam":
        return fastasam.SAM(groups, torch.optim.SGD, rho=args.rho, every=args.every, backend=backend, **base)
    if args.opt == "asam":
        return fastasam.ASAM(groups, torch.optim.SGD, rho=args.rho, eta=args.eta, every=args.every, backend=backend,
                             **base)
    if args.opt == "looksam":
        return fastasam.LookSAM(groups, torch.optim.SGD, rho=args.rho, k=args.every, alpha=args.alpha,
                                adaptive=args.adaptive, eta=args.eta, backend=backend, **base)
    if args.opt == "msam":
        return fastasam.MSAM(groups, torch.optim.SGD, rho=args.rho, adaptive=args.adaptive, eta=args.eta,
                             backend=backend, **base)
    return fastasam.GSAM(groups, torch.optim.SGD, rho=args.rho, alpha=args.alpha, adaptive=args.adaptive, eta=args.eta,
                         backend=backend, **base)


def unperturbed(opt):
    """The weights to evaluate and keep as the run's result: Momentum-SAM's and BSAM's sit at a perturbed point
    between steps (``unperturbed()`` moves them back for the block and returns them after); the others' are the
    weights."""
    return opt.unperturbed() if isinstance(opt, (fastasam.MSAM, fastasam.BSAM)) else contextlib.nullcontext()


class Ema:
    """An exponential moving average of a model's weights and buffers, in ``module`` (a copy of the model, so it is
    evaluated as a model and saved as a ``state_dict``). ``update(model)`` after each step: floating entries
    ``ema <- decay * ema + (1 - decay) * w`` (one ``torch._foreach_lerp_`` per dtype), the others (BatchNorm's
    ``num_batches_tracked``) copied. Mutates ``module`` only."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        by_dtype: dict[torch.dtype, tuple[list, list]] = {}
        source = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.is_floating_point():
                pair = by_dtype.setdefault(v.dtype, ([], []))
                pair[0].append(v)
                pair[1].append(source[k])
            else:
                v.copy_(source[k])
        for mine, theirs in by_dtype.values():
            torch._foreach_lerp_(mine, theirs, 1 - self.decay)


class NonFiniteLossError(RuntimeError):
    """The training loss, or before a checkpoint a weight, buffer or optimizer state, is inf or NaN: the run stops
    (on every rank) without writing a checkpoint. The message names the step, the loss, what was kept and the fix."""


class LossWatch:
    """The first inf/NaN loss since the last ``first()``, found without a host synchronisation per step.

    ``add(step, loss)`` after each step keeps the detached 0-d loss tensor (no kernel, no copy); every ``FOLD`` steps
    they are folded on the device into ``[found, step, loss]`` of the first non-finite one (a few small kernels, no
    read). ``first()``, called where the loop reads the device anyway (the print interval, before a checkpoint),
    reads that to the host: ``(step, loss)`` or None. Consecutive ``add`` calls must be consecutive steps. Mutates
    only itself."""

    FOLD = 64

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.start = 0  # the step of losses[0]
        self.found: torch.Tensor | None = None  # float64 [found, step, loss], on the losses' device

    def add(self, step: int, loss: torch.Tensor) -> None:
        if not self.losses:
            self.start = step
        self.losses.append(loss.detach())
        if len(self.losses) >= self.FOLD:
            self._fold()

    def _fold(self) -> None:
        if not self.losses:
            return
        values = torch.stack(self.losses).double()
        bad = values.isfinite().logical_not_()
        i = bad.int().argmax()  # the first non-finite loss (0 when none is)
        here = torch.cat((bad.any().double().view(1), (i.double() + self.start).view(1),
                          values.index_select(0, i.view(1))))
        self.found = here if self.found is None else torch.where(self.found[0] > 0, self.found, here)
        self.losses = []

    def first(self) -> tuple[int, float] | None:
        """``(step, loss)`` of the first inf/NaN loss added since the last call that found none, or None. Reads the
        device (one synchronisation)."""
        self._fold()
        if self.found is None:
            return None
        found, step, loss = self.found.tolist()
        if not found:
            self.found = None
            return None
        return int(step), loss


def first_nonfinite(named: Iterable[tuple[str, object]]) -> str | None:
    """The name of the first floating tensor in ``named`` that holds an inf or NaN, or None; one host read per
    device."""
    tensors = [(name, t) for name, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
    by_device: dict[torch.device, list[int]] = {}
    for k, (_, t) in enumerate(tensors):
        by_device.setdefault(t.device, []).append(k)
    bad = []
    for indices in by_device.values():
        finite = torch.stack([tensors[k][1].isfinite().all() for k in indices]).tolist()
        bad += [k for k, ok in zip(indices, finite) if not ok]
    return tensors[min(bad)][0] if bad else None


class StepTimer:
    """Where a print interval's time went, measured without synchronising the device each step.

    ``data_s``: host seconds spent waiting for the next batch (``timed`` around the loader); ``pass`` and ``step``
    (SAM's overhead): per step, from the batch on the device to the end of the first backward, and to the end of the
    step; ``time.perf_counter`` on a CPU, CUDA events on a GPU, read at ``interval()`` (the print, which waits for
    the last step's end event: one synchronisation per interval). Steps before ``TIMED_AFTER`` in this process are
    not counted in ``pass``/``step`` (warm-up). Totals (``train_s``, ``data_s``, ``pass_s``, ``step_s``,
    ``steps_timed``) survive a resume through ``state``."""

    def __init__(self, device: torch.device, state: dict | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.totals = {"train_s": 0.0, "data_s": 0.0, "pass_s": 0.0, "step_s": 0.0, "steps_timed": 0,
                       **(state or {})}
        self.started = 0  # steps done in this process
        self.pending: list = []
        self.restart()

    def restart(self) -> None:
        """Start an interval now (after an evaluation or a checkpoint, which are not training time)."""
        self.t0, self.data_s, self.steps = time.perf_counter(), 0.0, 0

    def timed(self, batches):
        """Yield ``batches``' items, adding the time spent waiting for each to ``data_s``."""
        it = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.data_s += time.perf_counter() - t
            yield item

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def begin(self) -> None:
        self._marks = [self._mark()] if self.started >= TIMED_AFTER else None

    def first_pass_done(self) -> None:
        if self._marks is not None:
            self._marks.append(self._mark())

    def end(self) -> None:
        if self._marks is not None:
            self._marks.append(self._mark())
            self.pending.append(self._marks)
        self.started += 1
        self.steps += 1

    def interval(self) -> dict:
        """The interval since ``restart``/the last call: ``{"data_s", "compute_s"}`` mean seconds per step (waiting
        for data, the rest of the wall time), added to the totals; then a new interval starts."""
        if self.cuda and self.pending:
            self.pending[-1][-1].synchronize()
        for start, first, stop in self.pending:
            if self.cuda:
                self.totals["pass_s"] += start.elapsed_time(first) / 1e3
                self.totals["step_s"] += start.elapsed_time(stop) / 1e3
            else:
                self.totals["pass_s"] += first - start
                self.totals["step_s"] += stop - start
            self.totals["steps_timed"] += 1
        self.pending = []
        wall = time.perf_counter() - self.t0
        self.totals["train_s"] += wall
        self.totals["data_s"] += self.data_s
        n = max(self.steps, 1)
        out = {"data_s": self.data_s / n, "compute_s": (wall - self.data_s) / n}
        self.restart()
        return out


def finish_report(args: argparse.Namespace, steps_per_epoch: int, step: int, run: Run, report: dict) -> dict:
    """Rank 0, at the end of a run: ``summary.json`` and ``curves.png`` from the whole run's log (resumes
    included), and the summary printed. Returns the summary."""
    steps, evals, _ = run_report.read_log(args.ckpt_dir)
    timing = report["timing"]

    def best(key: str) -> dict | None:
        scored = [e for e in evals if key in e]
        return max(scored, key=lambda e: e[key]) if scored else None

    reached = run_report.time_to_target(evals, args.target_top1)
    top, ema_top = best("top1"), best("ema_top1")
    summary = {
        "finished": True, "arch": args.arch, "opt": args.opt, "impl": args.impl, "processes": run.world,
        "global_batch": args.global_batch, "epochs": args.epochs, "steps": step,
        "best_top1": top["top1"] if top else None, "best_top1_epoch": top["epoch"] if top else None,
        "best_top5": max((e["top5"] for e in evals), default=None),
        "final_top1": evals[-1]["top1"] if evals else None, "final_top5": evals[-1]["top5"] if evals else None,
        "best_ema_top1": ema_top["ema_top1"] if ema_top else None,
        "final_ema_top1": evals[-1].get("ema_top1") if evals else None,
        "wall_time_s": report["elapsed_s"], "wall_time_h": report["elapsed_s"] / 3600,
        "target_top1": args.target_top1, "time_to_target_s": reached["elapsed_s"] if reached else None,
        "target_epoch": reached["epoch"] if reached else None,
        "images_per_s": step * args.global_batch / timing["train_s"] if timing["train_s"] > 0 else None,
        "train_s": timing["train_s"], "data_wait_s": timing["data_s"],
        "data_wait_fraction": timing["data_s"] / timing["train_s"] if timing["train_s"] > 0 else None,
        "sam_overhead": {
            "step_over_pass": timing["step_s"] / timing["pass_s"] if timing["pass_s"] > 0 else None,
            "pass_ms": 1e3 * timing["pass_s"] / timing["steps_timed"] if timing["steps_timed"] else None,
            "step_ms": 1e3 * timing["step_s"] / timing["steps_timed"] if timing["steps_timed"] else None,
            "steps_timed": timing["steps_timed"],
            "definition": "sum over the timed steps of the whole step's time (both passes, first_step, "
                          "second_step, clipping, schedules, EMA) / sum of the first forward+backward's time (the "
                          f"single pass of a plain SGD step, without its update); the first {TIMED_AFTER} steps "
                          "after each start are not timed",
        },
        "nonfinite_skipped": report.get("nonfinite_skipped", 0),
        "peak_memory_bytes": report["peak_memory_bytes"], "peak_memory": peak_memory(run.device)["what"],
        "versions": run_report.versions(), "commit": run_report.git_commit(),
        "logged_steps": len(steps), "evaluations": len(evals),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    run_report.write_json(args.ckpt_dir / SUMMARY, summary)
    plotted = run_report.plot_curves(args.ckpt_dir, args.ckpt_dir / CURVES, steps_per_epoch)
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    over = summary["sam_overhead"]
    run.print(f"summary: best top-1 {fmt(summary['best_top1'])}% (epoch {fmt(summary['best_top1_epoch'], '{}')}), "
              f"final top-1 {fmt(summary['final_top1'])}% top-5 {fmt(summary['final_top5'])}%"
              + (f", EMA best top-1 {fmt(summary['best_ema_top1'])}%" if summary["best_ema_top1"] is not None else ""))
    run.print(f"summary: wall time {_hms(summary['wall_time_s'])}, {fmt(summary['images_per_s'], '{:.1f}')} img/s, "
              f"data wait {fmt(summary['data_wait_fraction'] and 100 * summary['data_wait_fraction'], '{:.1f}')}%, "
              f"step / single pass {fmt(over['step_over_pass'], '{:.3f}')} ({fmt(over['step_ms'], '{:.1f}')} ms / "
              f"{fmt(over['pass_ms'], '{:.1f}')} ms), peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB"
              + ("" if args.target_top1 is None else
                 f", time to top-1 {args.target_top1:g}%: "
                 + ("not reached" if reached is None else _hms(summary["time_to_target_s"]))))
    if not plotted:
        run.print(f"note: matplotlib is not installed, so {CURVES} was not drawn (pip install matplotlib)")
    run.print(f"summary: {args.ckpt_dir / SUMMARY}" + (f", {args.ckpt_dir / CURVES}" if plotted else ""))
    return summary


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


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
        out = train(args, run)
    except BaseException:
        run.close(ok=False)
        raise
    run.close()
    return out


def open_run_dir(args: argparse.Namespace):
    """Rank 0: refuse a symbolic link among the run directory's files (``RUN_FILES``), lock ``--ckpt-dir`` and check
    that this run may use it (a held run needs --resume or --overwrite); remove a temporary checkpoint left by a killed
    writer. Returns the lock (released when the process ends)."""
    for name in RUN_FILES:
        refuse_symlink(args.ckpt_dir / name)
    lock = lock_run_dir(args.ckpt_dir)
    try:
        ckpt, log = args.ckpt_dir / CHECKPOINT, args.ckpt_dir / LOG
        for name in (CHECKPOINT, BEST, SUMMARY):
            (args.ckpt_dir / (name + ".tmp")).unlink(missing_ok=True)
        held = [p.name for p in (ckpt, log) if p.exists()]
        if args.overwrite:
            for p in (ckpt, log, args.ckpt_dir / BEST, args.ckpt_dir / SUMMARY, args.ckpt_dir / CURVES):
                p.unlink(missing_ok=True)
            shutil.rmtree(args.ckpt_dir / TENSORBOARD, ignore_errors=True)
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


def save_run_file(path: Path, state: dict) -> None:
    """``save_checkpoint(path, state)``, refusing (``RunDirectoryError``) a symbolic link at ``path`` or at its
    temporary file, checked just before the write."""
    for p in (path, path.with_name(path.name + ".tmp")):
        refuse_symlink(p)
    save_checkpoint(path, state)


def _flag(key: str, value: object) -> str:
    """How a flag's value reads in a message: ``--lr 0.1``, ``--adaptive``, ``--adaptive off``, ``--ema off``."""
    name = "--" + key.replace("_", "-")
    if value is True:
        return name
    if value is False or value is None:
        return f"{name} off"
    return f"{name} {value}"


def resume_changes(saved: dict, args: argparse.Namespace, ckpt: Path) -> dict[str, list]:
    """The flags this resume changes against ``saved`` (the checkpoint's ``args``): ``{name: [old, new]}`` of those it
    applies (``RESUME_APPLIED``). Raises ``CheckpointError`` naming every changed flag of ``RESUME_FIXED`` (both
    values) and the fix. ``--num-classes`` and ``--synthetic-size`` count for synthetic data only; ``--data`` may
    name another folder (the training set's size is checked apart) but not switch to or from ``synthetic``;
    ``--ema`` may change its decay but not be turned on or off; ``--val-crop``/``--val-resize`` compare their
    effective values."""
    def effective(values: dict) -> dict:
        out = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
        if "image_size" in out:
            out["val_crop"] = out.get("val_crop") or out["image_size"]
            out["val_resize"] = out.get("val_resize") or round(out["val_crop"] * 256 / 224)
        return out

    old, new = effective(saved), effective(vars(args))
    synthetic = new["data"] == "synthetic"
    fixed = [k for k in RESUME_FIXED if k in old and old[k] != new.get(k)
             and (k not in ("num_classes", "synthetic_size") or synthetic)
             and (k != "data" or "synthetic" in (old[k], new[k]))
             and (k != "ema" or None in (old[k], new[k]))]
    if fixed:
        raise CheckpointError(
            f"fastasam: --resume: {ckpt} was written with {', '.join(_flag(k, old[k]) for k in fixed)}; this run has "
            f"{', '.join(_flag(k, new.get(k)) for k in fixed)}. These cannot change mid-run: they fix the model "
            "(--arch, --num-classes), the algorithm and its param groups (--opt, --adaptive, --no-bn-bias-decay, "
            "--every, --sharpness, --rho-follows-lr, --ema on or off), the schedule (--epochs, --warmup-epochs) or "
            "the data and its order (--data synthetic or a folder, --seed, --synthetic-size, --image-size, "
            "--val-crop, --val-resize). Fix: resume with the values it was written with "
            f"({', '.join(_flag(k, old[k]) for k in fixed)}), or start a new run (--overwrite, or another "
            f"--ckpt-dir). A resume may change {', '.join('--' + k.replace('_', '-') for k in RESUME_APPLIED)}: "
            "applied from the resumed step on")
    return {k: [old[k], new.get(k)] for k in RESUME_APPLIED if k in old and old[k] != new.get(k)}


def apply_changes(changed: dict, opt, sched, rho_sched, args: argparse.Namespace, fresh_decay: list[float]) -> None:
    """Put the flags a resume changed (``resume_changes``) into the state loaded from the checkpoint: the param
    groups' momentum, weight decay (this run's value per group, ``fresh_decay``: 0 for --no-bn-bias-decay's), rho and
    eta; a new peak --lr into the LR schedule (its base lrs, each group's initial and current lr, at the step
    reached); --lr, --rho and --rho-min into --rho-follows-lr's schedule (rho recomputed). The other applied flags
    (--alpha, --label-smoothing, --clip-grad, --ema's decay, --amp, --skip-nonfinite, --data) are read from ``args``
    by what was built from it. Mutates ``opt``'s param groups, ``sched`` and ``rho_sched``."""
    groups = opt.param_groups
    for key in ("momentum", "rho", "eta"):
        if key in changed:
            for g in groups:
                if key in g:
                    g[key] = getattr(args, key)
    if "weight_decay" in changed:
        for g, decay in zip(groups, fresh_decay, strict=True):
            g["weight_decay"] = decay
    if "lr" in changed:
        sched.base_lrs = [args.lr] * len(groups)
        for g, factor in zip(groups, sched.lr_lambdas, strict=True):
            g["initial_lr"], g["lr"] = args.lr, args.lr * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in groups]
    if rho_sched is not None and {"lr", "rho", "rho_min"} & changed.keys():
        rho_sched.rho_max, rho_sched.rho_min = args.rho, args.rho_min
        rho_sched.lr_max, rho_sched._fixed_lr_max = [args.lr] * len(rho_sched.lr_max), args.lr
        rho_sched.step()  # each group's rho from its lr now


def _train(args: argparse.Namespace, run: Run) -> dict:
    torch.manual_seed(args.seed)
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    train_set, val_set = datasets(args)
    sampler, batch, steps_per_epoch = train_sampler(len(train_set), args.global_batch, run.rank, run.world,
                                                    args.seed)
    model = get_model(args.arch, len(train_set.classes)).to(run.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if args.sync_bn and run.world > 1:
        if run.device.type != "cuda":
            raise ValueError("fastasam: --sync-bn needs GPUs (torch's SyncBatchNorm runs on CUDA devices only); "
                             "drop --sync-bn for CPU processes")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.sync_bn:
        run.print("note: --sync-bn with one process: nothing to synchronise, plain BatchNorm")
    ema = Ema(model, args.ema) if args.ema is not None else None
    ddp = nn.parallel.DistributedDataParallel(model) if run.world > 1 else None
    net = ddp if ddp is not None else model
    if args.compile:
        net = torch.compile(net)
    opt = build_optimizer(args, model, len(train_set))
    sharpness = args.opt not in ("sgd", "msam")  # the two-pass loop; msam steps once a pass, as sgd
    replica = args.sharpness == "replica" and ddp is not None
    if args.sharpness == "replica" and ddp is None:
        run.print("note: --sharpness replica with one process is --sharpness global (one replica)")

    total = steps_per_epoch * args.epochs
    factors: dict[int, float] = {}

    def factor(s: int) -> float:
        """``lr_factor`` of step ``s``, computed once for all the param groups."""
        if s not in factors:
            factors.clear()
            factors[s] = lr_factor(s, round(args.warmup_epochs * steps_per_epoch), total)
        return factors[s]

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    rho_sched = (fastasam.RhoFollowsLR(opt, rho_max=args.rho, rho_min=args.rho_min, lr_max=args.lr)
                 if args.rho_follows_lr else None)
    scaler = torch.amp.GradScaler(run.device.type, enabled=args.amp == "fp16")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    def autocast():
        return torch.autocast(run.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    ckpt = args.ckpt_dir / CHECKPOINT
    step, epoch, start_in_epoch = 0, 0, 0
    report = {"elapsed_s": 0.0, "best_top1": None, "target_reached": None, "peak_memory_bytes": 0, "timing": {},
              "nonfinite_skipped": 0}
    written = {"step": None}  # the step last.pt holds (None: no checkpoint yet)
    changed: dict[str, list] = {}
    if args.resume:
        state = run.agree(lambda: load_checkpoint(ckpt, CHECKPOINT_KEYS, run.device), f"loading {ckpt}")
        if state["global_batch"] != args.global_batch or state["steps_per_epoch"] != steps_per_epoch:
            raise CheckpointError(
                f"fastasam: {ckpt} was written with --global-batch {state['global_batch']} and "
                f"{state['steps_per_epoch']} steps per epoch; this run has --global-batch {args.global_batch} and "
                f"{steps_per_epoch} (from {len(train_set)} images): both set the schedule and the position in the "
                f"epoch, so resume with --global-batch {state['global_batch']} and the same training data")
        if isinstance(state.get("args"), dict):
            changed = resume_changes(state["args"], args, ckpt)
        model.load_state_dict(state["model"])
        fresh_decay = [g["weight_decay"] for g in opt.param_groups]  # this run's, per group (0: --no-bn-bias-decay)
        try:
            opt.load_state_dict(state["optimizer"])
        except ValueError as e:  # another number or size of param groups: another --opt/--adaptive/--no-bn-bias-decay
            saved = state["args"] if isinstance(state.get("args"), dict) else {}
            flags = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)}" for k in ("opt", "adaptive", "no_bn_bias_decay")
                              if k in saved)
            raise CheckpointError(f"fastasam: the optimizer state in {ckpt} does not fit this run's param groups "
                                  f"({e}); resume with the optimizer flags it was written with "
                                  f"({flags or 'unknown'})") from None
        sched.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when written without fp16 (a resume may change --amp: a fresh scale then)
            scaler.load_state_dict(state["scaler"])
        for name, what, flag in (("ema", ema, "--ema"), ("rho_schedule", rho_sched, "--rho-follows-lr")):
            if what is not None:
                if state.get(name) is None:
                    raise CheckpointError(f"fastasam: {ckpt} was written without {flag}, so it has no {name} state "
                                          f"to resume; resume without {flag}, or start a new run with it")
                if name == "ema":
                    what.module.load_state_dict(state[name])
                else:
                    what.load_state_dict(state[name])
        report.update(state.get("report", {}))
        step, epoch, start_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        written["step"] = step
        run.print(f"resumed from {ckpt}: epoch {epoch}, step {step}")
        apply_changes(changed, opt, sched, rho_sched, args, fresh_decay)
        for k, (was, now) in changed.items():
            run.print(f"resume: --{k.replace('_', '-')} {'off' if was is None else was} -> "
                      f"{'off' if now is None else now} applied")
        if state["world"] != run.world:
            run.print(f"note: {ckpt} was written by {state['world']} process(es), this run has {run.world}: every "
                      "step trains on the same images as before, but BatchNorm now normalises over "
                      f"{batch} images per process, so the numbers are not bit-identical to a run on "
                      f"{state['world']}")
        del state

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        """Rank 0 writes; every rank raises if the write failed. ``step_in_epoch == steps_per_epoch``: the epoch
        is trained but not evaluated (a resumed run evaluates it first). Never after a non-finite loss or with a
        non-finite weight (``guard``)."""
        if timer.steps:  # the steps since the last print count as training time
            timer.interval()
        guard(f"{ckpt} is not written")

        def write() -> None:
            if run.rank == 0:
                save_run_file(ckpt, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                    "world": run.world, "global_batch": args.global_batch, "steps_per_epoch": steps_per_epoch,
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "ema": ema.module.state_dict() if ema is not None else None,
                    "rho_schedule": rho_sched.state_dict() if rho_sched is not None else None,
                    "report": current_report()})
        run.agree(write, f"writing {ckpt}")
        written["step"] = step
        timer.restart()

    def guard(refused: str) -> None:
        """Before a checkpoint or an evaluation (every rank): raise ``NonFiniteLossError`` on every rank if a loss
        since the last check was inf/NaN on any rank, or the weights, buffers, EMA or optimizer state hold one; the
        message says ``refused`` (what is not done). Reads the device once (as the write or evaluation that follows
        does)."""
        bad_loss = watch.first()
        names = {p: n for n, p in model.named_parameters()}
        named = [(f"the model's {k}", v) for k, v in model.state_dict().items()]
        named += [(f"the EMA's {k}", v) for k, v in (ema.module.state_dict().items() if ema is not None else ())]
        named += [(f"the optimizer's {k} of {names.get(p, 'a parameter')}", v)
                  for p, st in opt.state.items() for k, v in st.items()]
        bad_tensor = first_nonfinite(named)
        any_loss, any_tensor = run.any_ranks(bad_loss is not None, bad_tensor is not None)
        if any_loss:
            raise nonfinite_stop(bad_loss)
        if any_tensor:
            raise NonFiniteLossError(
                f"fastasam: {bad_tensor or 'a tensor on another process'} is not finite after step {step}, though "
                f"the training losses up to it were: {refused}. {kept()}. {fix()}")

    def kept() -> str:
        if written["step"] is None:
            return (f"No checkpoint was written before it ({ckpt} does not exist): start again (--overwrite) with "
                    "the fix below")
        return (f"Nothing was written after it: {ckpt} (step {written['step']}) and {args.ckpt_dir / BEST} (if "
                "any) are kept; continue from them with --resume and the fix below")

    def fix() -> str:
        return (f"Fix: lower the learning rate (--lr {args.lr:g} now; a resume applies a new --lr), clip the gradient "
                "(--clip-grad NORM)" + (", train in bf16 (--amp bf16: fp16 overflows sooner)" if args.amp == "fp16"
                                        else "")
                + ", or give --skip-nonfinite N to skip up to N such steps (no optimizer step on them)")

    def nonfinite_stop(mine: tuple | None, beyond: int | None = None) -> NonFiniteLossError:
        """The error every rank raises for the first non-finite loss: ``mine`` is this rank's ``(step, loss)`` or
        None; gathered over the ranks (every rank calls this at the same step)."""
        found = [(s_, r, v) for r, m in enumerate(run.gather(mine)) if m is not None for s_, v in [m]]
        bad_step, rank, value = min(found)
        where = f" on process {rank}" if run.world > 1 else ""
        over = (f" ({beyond} such steps, beyond --skip-nonfinite {args.skip_nonfinite})" if beyond is not None
                else "")
        return NonFiniteLossError(
            f"fastasam: the training loss is not finite at step {bad_step} (epoch {(bad_step - 1) // steps_per_epoch})"
            f": loss {value}{where}{over}. The run stops without writing a checkpoint. {kept()}. {fix()}")

    def current_report() -> dict:
        """What the report needs that lives in no log record: carried over resumes by the checkpoint."""
        peak = max(report["peak_memory_bytes"], peak_memory(run.device)["bytes"])
        return {**report, "elapsed_s": elapsed(), "timing": dict(timer.totals), "peak_memory_bytes": peak}

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    def evaluated(entry: dict) -> None:
        """An evaluation's record, ``best.pt`` when its top-1 is the best so far, and the target line."""
        log({**entry, "step": step, "elapsed_s": elapsed(), "time": time.time()})
        board.scalars(step, {f"val/{k}": entry[k] for k in ("top1", "top5", "ema_top1", "ema_top5") if k in entry})
        if report["best_top1"] is None or entry["top1"] > report["best_top1"]:
            report["best_top1"] = entry["top1"]
            best = args.ckpt_dir / BEST

            guard(f"{best} is not written")

            def write() -> None:
                if run.rank == 0:
                    with unperturbed(opt):  # the weights themselves (msam: not the perturbed point)
                        weights = {k: v.clone() for k, v in model.state_dict().items()}
                    save_run_file(best, {"model": weights, "epoch": entry["epoch"], "step": step,
                                           "top1": entry["top1"], "top5": entry["top5"],
                                           "ema": ema.module.state_dict() if ema is not None else None,
                                           "args": {k: str(v) if isinstance(v, Path) else v
                                                    for k, v in vars(args).items()}})
            run.agree(write, f"writing {best}")
        target = args.target_top1
        if target is not None and report["target_reached"] != target and entry["top1"] >= target:
            report["target_reached"] = target  # logged once for this target (also over resumes)
            hit = {"target_top1": args.target_top1, "epoch": entry["epoch"], "step": step, "top1": entry["top1"],
                   "elapsed_s": elapsed(), "time": time.time()}
            run.print(f"reached --target-top1 {args.target_top1:g}: top-1 {entry['top1']:.2f}% at epoch "
                      f"{entry['epoch']} (step {step}) after {_hms(hit['elapsed_s'])} ({hit['elapsed_s']:.1f} s)")
            log(hit)

    def log(entry: dict) -> None:
        if log_file:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

    log_file = (os.fdopen(open_nofollow(args.ckpt_dir / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")
                if run.rank == 0 else None)  # closed below
    if changed:
        log({"epoch": epoch, "step": step, "resume": changed, "time": time.time()})
    board = TensorBoard(args.ckpt_dir, step if args.resume else None, run.rank == 0, run.print)
    timer = StepTimer(run.device, report["timing"])
    elapsed_before, started, eval_s = report["elapsed_s"], time.perf_counter(), 0.0
    run.print(f"{args.arch} {args.opt} ({args.impl}), {run.world} process(es) on {run.device}, {len(train_set)} "
              f"images, {steps_per_epoch} steps/epoch x {args.epochs} epochs, global batch {args.global_batch}")
    result: dict = {"steps": step}

    def stopped(why: str) -> dict:
        run.print(f"stopped at step {step} ({why}); continue with --resume")
        return {**result, "steps": step, "stopped": True}

    watch = LossWatch()  # without --skip-nonfinite: the losses, read at the print interval and before checkpoints
    skipping = args.skip_nonfinite > 0
    buffers = list(model.buffers())  # --skip-nonfinite: restored after a skipped step's forward
    saved_buffers = [torch.empty_like(b) for b in buffers] if skipping else []

    def nonfinite(loss: torch.Tensor, which: str | None) -> tuple | None:
        """--skip-nonfinite: ``(which, this rank's loss)`` when the loss is inf/NaN on any rank, else None. Reads the
        loss (a device synchronisation) and agrees on it with the other ranks."""
        value = loss.item()
        return (which, value) if run.any_rank(not math.isfinite(value)) else None

    def skip(bad: tuple) -> None:
        """Undo the step in progress (the perturbation, the gradients, the BatchNorm statistics), count it, print and
        log it (the first rank's loss, gathered: every rank calls this at the same step); beyond --skip-nonfinite,
        raise ``NonFiniteLossError`` on every rank."""
        which, value = bad
        if getattr(opt, "perturbed", False):
            opt._abandon_step()  # back to w, no descent direction pending
        opt.zero_grad(set_to_none=True)
        if buffers:
            torch._foreach_copy_(buffers, saved_buffers)
        report["nonfinite_skipped"] += 1
        count, s_ = report["nonfinite_skipped"], step + 1
        mine = None if math.isfinite(value) else (s_, value)
        if count > args.skip_nonfinite:
            raise nonfinite_stop(mine, beyond=count)
        rank, value = next((r, m[1]) for r, m in enumerate(run.gather(mine)) if m is not None)  # the first rank's
        shown = f"{value}" + (f", {which}" if which else "") + (f", on process {rank}" if run.world > 1 else "")
        run.print(f"step {s_} (epoch {epoch}): the loss is not finite ({shown}): skipped, no optimizer step ({count} "
                  f"of --skip-nonfinite {args.skip_nonfinite})")
        log({"epoch": epoch, "step": s_, "nonfinite_loss": str(value), "pass": which, "process": rank,
             "skipped": count, "time": time.time()})

    # Built once (workers persist across epochs); batches arrive on run.device, normalised, in memory_format.
    loader = make_loader(args.loader, train_set, sampler, batch, args.workers, run.device, args.channels_last,
                         limit=steps_per_epoch * batch)
    val_loader = make_loader(args.loader, val_set,
                             ResumableSampler(len(val_set), run.rank, run.world, shuffle=False, pad=False), batch,
                             args.workers, run.device, args.channels_last, drop_last=False)
    try:
        with Stop() as stop:
            while epoch < args.epochs:
                loader.set_epoch(epoch, start_in_epoch * batch)
                t0, seen, i = time.perf_counter(), 0, start_in_epoch
                for x, y in timer.timed(itertools.islice(loader, steps_per_epoch - start_in_epoch)):
                    x = x.to(run.device, non_blocking=True).to(memory_format=memory_format)
                    y = y.to(run.device, non_blocking=True)
                    timer.begin()
                    if saved_buffers:
                        torch._foreach_copy_(saved_buffers, buffers)
                    two_pass = sharpness and opt.second_pass_needed  # a host bool: no sync
                    bad = None  # --skip-nonfinite: a pass whose loss is inf/NaN on some rank
                    loss2 = None
                    if two_pass and replica:  # the first backward under no_sync, then first_step with this
                        with fastasam.distributed.replica_perturbation(ddp, opt):  # rank's own norm
                            with autocast():
                                loss = loss_fn(net(x), y)
                            scaler.scale(loss).backward()
                            timer.first_pass_done()
                        if skipping:
                            bad = nonfinite(loss, "first pass")
                    else:
                        with autocast():
                            loss = loss_fn(net(x), y)
                        scaler.scale(loss).backward()
                        timer.first_pass_done()
                        if skipping:
                            bad = nonfinite(loss, "first pass" if two_pass else None)
                        if two_pass and bad is None:
                            opt.first_step(zero_grad=True)
                    if two_pass and bad is None:
                        with fastasam.frozen_batchnorm_stats(net), autocast():
                            loss2 = loss_fn(net(x), y)
                        scaler.scale(loss2).backward()
                        if skipping:
                            bad = nonfinite(loss2, "second pass")
                    if bad is not None:
                        skip(bad)  # raises beyond --skip-nonfinite
                    else:
                        if args.clip_grad is not None:  # the gradient second_step will use: the second pass's
                            if scaler.is_enabled():
                                scaler.unscale_(opt)
                            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                        if scaler.is_enabled():
                            scaler.step(opt)  # ASAM/SAM: restore + base step, skipped on an fp16 overflow
                            scaler.update()
                        elif sharpness:
                            opt.second_step()
                        else:
                            opt.step()
                    opt.zero_grad(set_to_none=True)
                    if bad is None:
                        sched.step()
                    else:  # the schedule goes on (a skipped first step: "lr_scheduler.step() before optimizer.step()")
                        with warnings.catch_warnings():
                            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`",
                                                    UserWarning)
                            sched.step()
                    if rho_sched is not None:
                        rho_sched.step()
                    if ema is not None and bad is None:
                        with unperturbed(opt):  # msam: the average of the weights, not of the perturbed points
                            ema.update(model)
                    if not skipping:  # loss + 0 * loss2: NaN if either is inf/NaN; one small kernel, no read
                        watch.add(step + 1, loss if loss2 is None else torch.add(loss.detach(), loss2.detach(),
                                                                                 alpha=0))
                    timer.end()
                    step, i, seen = step + 1, i + 1, seen + len(x) * run.world
                    last = i == steps_per_epoch
                    printing = step % args.print_every == 0 or last
                    bad_loss = watch.first() if printing else None  # reads the device where the print does anyway
                    signalled, any_bad = run.any_ranks(stop.signum is not None, bad_loss is not None)
                    if any_bad:  # every rank stops here, before any checkpoint
                        raise nonfinite_stop(bad_loss)
                    if printing and bad is None:  # a skipped step was printed and logged as such
                        loss_value = loss.item()
                        rate = seen / (time.perf_counter() - t0)
                        times = timer.interval()
                        evals_left = (args.epochs - epoch) if args.eval else 0
                        eta = (total - step) * (times["data_s"] + times["compute_s"]) + evals_left * eval_s
                        entry = {"epoch": epoch, "step": step, "loss": loss_value, "lr": sched.get_last_lr()[0],
                                 "images_per_s": rate, "time": time.time(), "elapsed_s": elapsed(), "eta_s": eta,
                                 **times}
                        data_pct = 100 * times["data_s"] / max(times["data_s"] + times["compute_s"], 1e-12)
                        run.print(f"epoch {epoch} step {i}/{steps_per_epoch} ({step}/{total}) loss "
                                  f"{entry['loss']:.4f} lr {entry['lr']:.4g} {rate:.1f} img/s | "
                                  f"{time.strftime('%H:%M:%S')} elapsed {_hms(entry['elapsed_s'])} eta {_hms(eta)} | "
                                  f"data {1e3 * times['data_s']:.1f} ms/step ({data_pct:.0f}%) compute "
                                  f"{1e3 * times['compute_s']:.1f} ms/step")
                        log(entry)
                        board.scalars(step, {"train/loss": loss_value, "train/lr": entry["lr"],
                                             "train/images_per_s": rate, "train/data_s": times["data_s"],
                                             "train/compute_s": times["compute_s"]})
                    if signalled:  # every rank stops at this step
                        checkpoint(epoch, i)  # at the epoch's end: trained, evaluated by the resumed run
                        return stopped("signal")
                    planned = args.max_steps is not None and step >= args.max_steps
                    if planned and not last:
                        checkpoint(epoch, i)
                        return stopped(f"--max-steps {args.max_steps}")
                    if step % args.ckpt_every == 0 and not last:
                        checkpoint(epoch, i)
                if args.eval:
                    guard(f"epoch {epoch} is not evaluated")  # no evaluation (nor best.pt) of non-finite weights
                    eval_t0 = time.perf_counter()
                    with unperturbed(opt):  # msam: evaluated at w, not at the perturbed point
                        result = {"epoch": epoch, **evaluate(model, val_loader, run, autocast)}  # every image once
                    ema_result = {}
                    if ema is not None:
                        ema_result = {f"ema_{k}": v for k, v in evaluate(ema.module, val_loader, run, autocast).items()
                                      if k != "images"}
                    ema_note = (f" (EMA: top-1 {ema_result['ema_top1']:.2f}% top-5 {ema_result['ema_top5']:.2f}%)"
                                if ema_result else "")
                    run.print(f"epoch {epoch} eval: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                              f"({result['images']} images){ema_note}")
                    evaluated({**result, **ema_result})
                    eval_s = time.perf_counter() - eval_t0
                timer.restart()
                epoch, start_in_epoch = epoch + 1, 0
                checkpoint(epoch, 0)
                if run.any_rank(stop.signum is not None):
                    return stopped("signal")
                if args.max_steps is not None and step >= args.max_steps and epoch < args.epochs:
                    return stopped(f"--max-steps {args.max_steps}")
        if run.rank == 0:
            finish_report(args, steps_per_epoch, step, run, current_report())
        return {**result, "steps": step, "stopped": False}
    finally:
        board.close()
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
