"""What the ImageNet trainer writes about a run besides its checkpoints: the run's log read back (over resumes),
``summary.json``, ``curves.png``, TensorBoard scalars, and the versions and commit a run was made with.

``read_log(run_dir)`` returns ``(steps, evals, targets)``: the records of ``log.jsonl`` as one uninterrupted run
would have written them. A run resumed from a checkpoint older than its last records (a crash after the checkpoint)
logs those steps again; a record for step ``s`` replaces every earlier record from step ``s`` on (an evaluation or
target record: those after ``s`` and the evaluations/targets at ``s``), so the last run's records win. The log's other
records (a step skipped for a non-finite loss: ``nonfinite_loss``; the flags a resume changed: ``resume``) are
superseded the same way and returned by none of the three lists.

Nothing is written through a symbolic link in the run directory: ``refuse_symlink(path)`` raises
``RunDirectoryError`` naming a link, ``open_nofollow`` opens with ``O_NOFOLLOW`` (a link is refused the same way);
``write_json``, ``plot_curves`` and ``TensorBoard`` use them, and the trainer checks its other files with them.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.checkpoint import RunDirectoryError

LOG = "log.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"


def read_log(run_dir: str | Path) -> tuple[list[dict], list[dict], list[dict]]:
    """``(steps, evals, targets)`` of ``run_dir/log.jsonl``: training records (``loss``), evaluations (``top1``)
    and ``--target-top1`` records, each in step order, records superseded by a resume dropped (module docstring).
    A record without ``step`` (an evaluation logged by an older trainer) is kept as it is."""
    kept: list[dict] = []
    path = Path(run_dir) / LOG
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        s = entry.get("step")
        if s is not None:
            if "loss" in entry:  # a training record: everything logged from this step on is superseded
                kept = [e for e in kept if e.get("step") is None or e["step"] < s]
            else:  # evaluation / target at the end of step s: the training record of step s stays
                kept = [e for e in kept if e.get("step") is None or e["step"] < s
                        or (e["step"] == s and "loss" in e) or (e["step"] == s and _kind(e) != _kind(entry))]
        kept.append(entry)
    return ([e for e in kept if "loss" in e], [e for e in kept if "top1" in e and "target_top1" not in e],
            [e for e in kept if "target_top1" in e])


def _kind(entry: dict) -> str:
    if "loss" in entry:
        return "loss"
    for kind in ("target_top1", "top1", "nonfinite_loss", "resume"):
        if kind in entry:
            return kind
    return "other"


def _symlink_error(path: Path) -> RunDirectoryError:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return RunDirectoryError(f"fastasam: {path} is a symbolic link{target}; nothing in the run directory is written "
                             "through a link, which would overwrite the file it points to. Fix: remove the link "
                             f"(rm {path}), or give the run another --ckpt-dir")


def refuse_symlink(path: str | Path) -> None:
    """Raise ``RunDirectoryError`` naming ``path`` if it is a symbolic link (a dangling one too)."""
    path = Path(path)
    if path.is_symlink():
        raise _symlink_error(path)


def open_nofollow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, mode)``: a file descriptor; a symbolic link at ``path`` is
    refused (``RunDirectoryError`` naming it) by the open itself, so no link made before it is followed."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP or Path(path).is_symlink():
            raise _symlink_error(Path(path)) from None
        raise


def time_to_target(evals: list[dict], target: float | None) -> dict | None:
    """The first evaluation with ``top1 >= target``: ``{"epoch", "step", "top1", "elapsed_s"}``, or None."""
    if target is None:
        return None
    for e in evals:
        if e["top1"] >= target:
            return {"epoch": e["epoch"], "step": e.get("step"), "top1": e["top1"], "elapsed_s": e.get("elapsed_s")}
    return None


def git_commit(root: str | Path | None = None) -> str | None:
    """``HEAD``'s hash of the checkout holding this file (``+dirty`` with uncommitted changes), or None."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """Python, torch (and its CUDA/cuDNN), fastasam, triton, and the GPU's name where there is one."""
    import fastasam

    out = {"python": platform.python_version(), "torch": torch.__version__, "fastasam": fastasam.__version__,
           "cuda": torch.version.cuda, "platform": platform.platform()}
    if torch.backends.cudnn.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
    triton = sys.modules.get("triton")
    if triton is None:
        try:
            import triton  # noqa: F401 - only its version
            triton = sys.modules["triton"]
        except ImportError:
            triton = None
    out["triton"] = getattr(triton, "__version__", None)
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def peak_memory(device: torch.device) -> dict:
    """This process's peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the host's peak resident set size
    (``getrusage``'s ``ru_maxrss``) on a CPU; ``{"bytes", "what"}``."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "what": "cuda max_memory_allocated"}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "what": "host peak RSS"}


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` through a temporary file renamed over it (never a half-written file). A symbolic
    link at ``path`` or at its temporary file is refused (``RunDirectoryError``; checked again before the rename)."""
    refuse_symlink(path)
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    refuse_symlink(path)
    os.replace(tmp, path)


def plot_curves(run_dir: str | Path, out: str | Path, steps_per_epoch: int) -> bool:
    """``out``: top-1/top-5 (validation) and training loss against epochs (left) and wall-clock hours (right), from
    the whole run's log. Returns False (and writes nothing) when matplotlib is not installed. ``out`` is opened with
    ``O_NOFOLLOW``: a symbolic link there is refused (``RunDirectoryError``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps, evals, _ = read_log(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col")
    for col, (xlabel, train_x, eval_x) in enumerate((
            ("epoch", [e["step"] / steps_per_epoch for e in steps], [e["epoch"] + 1 for e in evals]),
            ("wall-clock hours", [e.get("elapsed_s", 0) / 3600 for e in steps],
             [e.get("elapsed_s", 0) / 3600 for e in evals]))):
        acc, loss = axes[0][col], axes[1][col]
        for key, label in (("top1", "top-1"), ("top5", "top-5"), ("ema_top1", "EMA top-1")):
            pts = [(x, e[key]) for x, e in zip(eval_x, evals) if key in e]
            if pts:
                acc.plot(*zip(*pts), marker="o", label=label)
        acc.set_ylabel("validation accuracy (%)")
        if evals:
            acc.legend(loc="lower right")
        acc.grid(alpha=0.3)
        if steps:
            loss.plot(train_x, [e["loss"] for e in steps], label="training loss")
        loss.set_ylabel("training loss")
        loss.set_xlabel(xlabel)
        loss.grid(alpha=0.3)
    fig.suptitle(str(Path(run_dir)))
    fig.tight_layout()
    try:
        with os.fdopen(open_nofollow(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return True


class TensorBoard:
    """Scalars to ``run_dir/tensorboard`` through ``torch.utils.tensorboard.SummaryWriter`` when the
    ``tensorboard`` package is installed (``pip install fastasam[tensorboard]``); without it nothing is written and
    one note is printed. The writer is made at the first scalar; a resumed run passes ``purge_step`` (the step it
    resumes from), so TensorBoard hides what an interrupted run logged after its checkpoint. A symbolic link at
    ``run_dir/tensorboard`` is refused (``RunDirectoryError``) before anything is written."""

    def __init__(self, run_dir: Path, purge_step: int | None, enabled: bool, note) -> None:
        self.run_dir, self.purge_step, self.enabled, self.note = run_dir, purge_step, enabled, note
        self.writer = None

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self.writer is None:
            refuse_symlink(self.run_dir / TENSORBOARD)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.enabled = False
                self.note("note: tensorboard is not installed, so no TensorBoard scalars are written "
                          "(pip install tensorboard, or fastasam[tensorboard])")
                return
            self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD), purge_step=self.purge_step)
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
