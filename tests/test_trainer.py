"""The ImageNet trainer on CPU: a tiny ImageFolder made here, a run interrupted and resumed to the same weights,
torchrun with 2 gloo processes, and the errors for bad input; stopping (a signal to one rank, --max-steps at an
epoch's end), resuming on another number of processes, and the run directory's safety (lock, overwrite, safe loads,
corrupt checkpoints, a full disk, fsync)."""

from __future__ import annotations

import builtins
import errno
import fcntl
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

import fastasam
from benchmarks import checkpoint, train_imagenet
from benchmarks.checkpoint import CheckpointError, RunDirectoryError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path_factory.mktemp("imagenet")
    gen = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 8), ("val", 2)):
        for c in range(3):
            d = root / split / f"n0000{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                h, w = 30 + 4 * (i % 3), 40 - 3 * (i % 2)
                pixels = (torch.rand(h, w, 3, generator=gen) * 80 + 60 * c).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(d / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return root


def _args(data: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--arch", "resnet_tiny", "--image-size", "24", "--epochs", "2",
            "--global-batch", "4", "--lr", "0.05", "--warmup-epochs", "0.5", "--amp", "none", "--workers", "0",
            "--ckpt-dir", str(ckpt), "--print-every", "2", *extra]


def _final(ckpt: Path) -> dict:
    return torch.load(ckpt / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def whole_run(image_folder, tmp_path_factory) -> tuple[dict, Path]:
    """An uninterrupted run of ``_args``: 2 epochs of 6 steps, (what main returned, its run directory)."""
    ckpt = tmp_path_factory.mktemp("whole")
    return train_imagenet.main(_args(image_folder, ckpt)), ckpt


def test_interrupted_run_resumes_to_the_same_weights(image_folder, tmp_path, whole_run):
    whole, whole_dir = whole_run
    shutil.copytree(whole_dir, tmp_path / "a")
    assert whole["steps"] == 12 and not whole["stopped"] and whole["images"] == 6
    stopped = train_imagenet.main(_args(image_folder, tmp_path / "b", "--max-steps", "4"))  # mid-epoch 0
    assert stopped == {"steps": 4, "stopped": True}
    assert _final(tmp_path / "b")["step_in_epoch"] == 4
    resumed = train_imagenet.main(_args(image_folder, tmp_path / "b", "--resume"))
    assert resumed["steps"] == 12
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert a["step"] == b["step"] == 12
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    init = train_imagenet.get_model("resnet_tiny", 3).state_dict()
    assert not torch.equal(init["fc.weight"], a["model"]["fc.weight"])  # it trained
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [e["top1"] for e in log if "top1" in e] and all(e["images_per_s"] > 0 for e in log if "loss" in e)


@pytest.mark.parametrize("opt,impl,amp", [("sam", "reference", "bf16"), ("sgd", "fastasam", "none")])
def test_other_optimizers_and_bf16_autocast_train(image_folder, tmp_path, opt, impl, amp):
    out = train_imagenet.main(_args(image_folder, tmp_path, "--opt", opt, "--impl", impl, "--amp", amp,
                                    "--epochs", "1", "--channels-last"))
    assert out["steps"] == 6 and out["images"] == 6


def _synthetic_args(ckpt: Path, *extra: str) -> list[str]:
    return ["--data", "synthetic", "--arch", "resnet_tiny", "--image-size", "16", "--num-classes", "5",
            "--synthetic-size", "32", "--epochs", "1", "--global-batch", "8", "--amp", "none", "--workers", "0",
            "--ckpt-dir", str(ckpt), "--print-every", "2", *extra]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "benchmarks.train_imagenet", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_torchrun_two_gloo_processes(tmp_path):
    proc = subprocess.run(_torchrun(*_synthetic_args(tmp_path)), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout and "step 4/4" in proc.stdout
    assert "(3 images)" in proc.stdout  # the 3 validation images are counted over both ranks
    assert _final(tmp_path)["step"] == 4


def test_bad_input_is_named(tmp_path, image_folder):
    with pytest.raises(FileNotFoundError, match="no train/ directory"):
        train_imagenet.main(_args(tmp_path, tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="--resume"):
        train_imagenet.main(_args(image_folder, tmp_path / "d", "--resume"))
    with pytest.raises(ValueError, match="no full batch"):
        train_imagenet.main(_args(image_folder, tmp_path / "e", "--global-batch", "64"))


def test_paper_preset_sets_the_papers_asam_options():
    args = train_imagenet.parse_args(["--preset", "paper-asam", "--epochs", "3"])
    assert (args.arch, args.opt, args.rho, args.eta, args.epochs) == ("resnet50", "asam", 1.0, 0.01, 3)


# --- stopping: a signal to one rank, --max-steps at an epoch's end --------------------------------------------------

def _tagged_pids(tag: str, *env: str) -> list[int]:
    """The pids whose environment carries ``STOP_TEST_TAG=tag`` and every ``env`` entry (Linux /proc)."""
    want = {f"STOP_TEST_TAG={tag}".encode(), *(e.encode() for e in env)}
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and want <= set((d / "environ").read_bytes().split(b"\0")):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _worker_pid(tag: str, rank: int, deadline: float) -> int:
    """The pid of the torchrun worker of ``rank`` started with ``tag``."""
    while time.monotonic() < deadline:
        pids = _tagged_pids(tag, f"RANK={rank}")
        if pids:
            return pids[0]
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.fixture(scope="module")
def ddp_run_stopped_by_sigterm_to_rank_1(tmp_path_factory) -> tuple[Path, int, str]:
    """A 2-process run (100 epochs of 4 steps) that gets SIGTERM on rank 1 only, after rank 0 printed step 2:
    (its run directory, the step it stopped at, its stdout)."""
    ckpt, tag = tmp_path_factory.mktemp("sigterm"), uuid.uuid4().hex
    proc = subprocess.Popen(_torchrun(*_synthetic_args(ckpt, "--epochs", "100", "--print-every", "1")), cwd=ROOT,
                            env={**ENV, "STOP_TEST_TAG": tag}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if " (2/400) " in line:
                break
        os.kill(_worker_pid(tag, 1, time.monotonic() + 30), signal.SIGTERM)
        signalled = time.monotonic()
        rest, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - signalled
    except BaseException:
        for pid in [proc.pid, *_tagged_pids(tag)]:  # torchrun's workers lead sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        raise
    stdout = "".join(out) + rest
    assert proc.returncode == 0, stdout  # torchrun exits 0 only when both ranks did
    assert elapsed < 20, stdout
    stops = [line for line in stdout.splitlines() if line.startswith("stopped at step")]
    assert len(stops) == 1 and "(signal)" in stops[0], stdout
    return ckpt, int(stops[0].split()[3]), stdout


def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_bit_exact(ddp_run_stopped_by_sigterm_to_rank_1,
                                                                            tmp_path):
    stopped_dir, stop, _ = ddp_run_stopped_by_sigterm_to_rank_1
    assert 2 <= stop < 400
    state = _final(stopped_dir)
    assert (state["step"], state["world"]) == (stop, 2)
    assert (state["epoch"], state["step_in_epoch"]) == ((stop - 1) // 4, (stop - 1) % 4 + 1)
    report = ({"best.pt"} if _evals(stopped_dir) else set()) | ({"tensorboard"} if _tensorboard_installed() else set())
    assert sorted(p.name for p in stopped_dir.iterdir()) == sorted({".lock", "last.pt", "log.jsonl"} | report)  # no tmp
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(stopped_dir, resumed_dir)
    end = str(stop + 3)
    for cmd in (_torchrun(*_synthetic_args(resumed_dir, "--epochs", "100", "--resume", "--max-steps", end)),
                _torchrun(*_synthetic_args(tmp_path / "whole", "--epochs", "100", "--max-steps", end))):
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = _final(tmp_path / "whole"), _final(resumed_dir)
    assert a["step"] == b["step"] == stop + 3
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]


def _tensorboard_installed() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_resume_on_one_process_of_a_two_process_run(ddp_run_stopped_by_sigterm_to_rank_1, tmp_path, capsys):
    """The documented behaviour: it continues (same global sample order, a printed note), and the new checkpoint
    records the new number of processes."""
    stopped_dir, stop, _ = ddp_run_stopped_by_sigterm_to_rank_1
    shutil.copytree(stopped_dir, tmp_path / "one")
    out = train_imagenet.main(_synthetic_args(tmp_path / "one", "--epochs", "100", "--resume", "--max-steps",
                                              str(stop + 2)))
    assert out["steps"] == stop + 2 and out["stopped"]
    printed = capsys.readouterr().out
    assert "written by 2 process(es), this run has 1" in printed and "same images" in printed
    state = _final(tmp_path / "one")
    assert (state["step"], state["world"], state["global_batch"]) == (stop + 2, 1, 8)


def test_global_sample_order_does_not_depend_on_the_number_of_processes():
    """Step k trains on the same images over all ranks for 1, 2 or 3 processes, also from a mid-epoch start
    (27 images, global batch 6: 4 steps, the 3 images left over never padded in)."""
    def global_batches(world: int, start: int) -> list[list[int]]:
        per_rank = []
        for rank in range(world):
            sampler, batch, steps = train_imagenet.train_sampler(27, 6, rank, world, seed=3)
            assert (batch, steps) == (6 // world, 4)
            sampler.set_epoch(5, start * batch)
            idx = list(sampler)[: (steps - start) * batch]
            per_rank.append([idx[k * batch:(k + 1) * batch] for k in range(steps - start)])
        return [sorted(sum((r[k] for r in per_rank), [])) for k in range(len(per_rank[0]))]

    for start in (0, 2):
        one = global_batches(1, start)
        assert len(one) == 4 - start and len(set(sum(one, []))) == 6 * (4 - start)
        assert global_batches(2, start) == one and global_batches(3, start) == one


def test_a_second_signal_ends_a_stopping_process_at_once():
    code = ("import os, signal, time\n"
            "from benchmarks.train_imagenet import Stop\n"
            "with Stop() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    assert stop.signum == signal.SIGTERM\n"
            "    print('stopping', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(60)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=50)
    assert proc.stdout == "stopping\n", proc.stderr
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - t0 < 40
    before = signal.getsignal(signal.SIGTERM)
    with train_imagenet.Stop():
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are put back


def _evals(ckpt: Path) -> list[dict]:
    """The evaluation records, without their clock readings (``elapsed_s``, ``time``: not part of the trajectory)."""
    return [{k: v for k, v in e.items() if k not in ("elapsed_s", "time")}
            for e in map(json.loads, (ckpt / "log.jsonl").read_text().splitlines()) if "top1" in e]


@pytest.mark.parametrize("how", ["max-steps", "signal"])
def test_a_stop_at_an_epochs_last_step_keeps_its_evaluation(image_folder, tmp_path, monkeypatch, how, whole_run):
    whole, whole_dir = whole_run  # 2 epochs of 6 steps
    shutil.copytree(whole_dir, tmp_path / "a")
    if how == "max-steps":
        out = train_imagenet.main(_args(image_folder, tmp_path / "b", "--max-steps", "6"))
    else:  # SIGTERM arrives during step 6, the last of epoch 0
        lr_factor = train_imagenet.lr_factor

        def signal_at_step_6(step, *a):
            if step == 6:
                os.kill(os.getpid(), signal.SIGTERM)
            return lr_factor(step, *a)

        monkeypatch.setattr(train_imagenet, "lr_factor", signal_at_step_6)
        out = train_imagenet.main(_args(image_folder, tmp_path / "b"))
        monkeypatch.setattr(train_imagenet, "lr_factor", lr_factor)
    assert out["steps"] == 6 and out["stopped"]
    resumed = train_imagenet.main(_args(image_folder, tmp_path / "b", "--resume"))
    assert resumed["steps"] == 12 and not resumed["stopped"]
    assert _evals(tmp_path / "b") == _evals(tmp_path / "a")
    assert [e["epoch"] for e in _evals(tmp_path / "a")] == [0, 1]
    assert whole["epoch"] == resumed["epoch"] == 1 and whole["top1"] == resumed["top1"]
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_the_logged_evaluation_has_the_consoles_epoch(image_folder, tmp_path, capsys):
    train_imagenet.main(_args(image_folder, tmp_path, "--epochs", "1"))
    assert "epoch 0 eval: top-1" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log if "top1" in e] == [0] and {e["epoch"] for e in log if "loss" in e} == {0}


# --- the run directory: lock, overwrite, checkpoint files ------------------------------------------------------------

def test_a_second_run_on_a_locked_directory_is_refused(image_folder, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 424242 on elsewhere\n")
        held.flush()
        with pytest.raises(RunDirectoryError, match="in use by another run.*pid 424242"):
            train_imagenet.main(_args(image_folder, tmp_path, "--epochs", "1", "--max-steps", "1"))
        assert not (tmp_path / "log.jsonl").exists() and not (tmp_path / "last.pt").exists()
    out = train_imagenet.main(_args(image_folder, tmp_path, "--epochs", "1", "--max-steps", "1"))  # lock released
    assert out["steps"] == 1


def test_an_existing_run_is_not_overwritten_without_a_flag(image_folder, tmp_path):
    train_imagenet.main(_args(image_folder, tmp_path, "--max-steps", "2", "--print-every", "1"))
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(RunDirectoryError, match="holds a run.*--resume.*--overwrite"):
        train_imagenet.main(_args(image_folder, tmp_path, "--max-steps", "1"))
    assert (tmp_path / "last.pt").read_bytes() == before
    out = train_imagenet.main(_args(image_folder, tmp_path, "--max-steps", "1", "--print-every", "1", "--overwrite"))
    assert out["steps"] == 1 and _final(tmp_path)["step"] == 1
    assert [e["step"] for e in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())] == [1]
    with pytest.raises(SystemExit):
        train_imagenet.parse_args(["--resume", "--overwrite"])


class _CreatesAFile:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def test_a_crafted_checkpoint_is_refused_unexecuted(image_folder, tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "run").mkdir()
    torch.save({"model": _CreatesAFile(marker), "step": 0}, tmp_path / "run" / "last.pt")
    with pytest.raises(CheckpointError, match=r"refusing to load .*last\.pt.*objects other than tensors"):
        train_imagenet.main(_args(image_folder, tmp_path / "run", "--resume"))
    assert not marker.exists()


@pytest.fixture(scope="module")
def good_checkpoint(image_folder, tmp_path_factory) -> bytes:
    ckpt = tmp_path_factory.mktemp("good")
    train_imagenet.main(_args(image_folder, ckpt, "--max-steps", "1"))
    return (ckpt / "last.pt").read_bytes()


@pytest.mark.parametrize("kind,match", [
    ("empty", r"last\.pt is empty \(0 bytes\)"),
    ("truncated", r"last\.pt \(\d+ bytes\) is truncated or not a torch checkpoint"),
    ("garbage", r"last\.pt \(\d+ bytes\) is (truncated or )?not a torch checkpoint"),
    ("foreign", r"last\.pt is not a checkpoint of this trainer: it lacks \['model', 'optimizer'"),
])
def test_a_bad_checkpoint_is_a_clear_error_naming_the_file(image_folder, tmp_path, good_checkpoint, kind, match):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "last.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good_checkpoint[: len(good_checkpoint) // 2])
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint at all\n" * 10)
    else:  # a model's bare state_dict
        torch.save(train_imagenet.get_model("resnet_tiny", 3).state_dict(), path)
    with pytest.raises(CheckpointError, match=match) as err:
        train_imagenet.main(_args(image_folder, run, "--resume"))
    assert str(path) in str(err.value)


def test_resume_with_another_global_batch_is_refused(image_folder, tmp_path):
    train_imagenet.main(_args(image_folder, tmp_path, "--max-steps", "1"))
    with pytest.raises(CheckpointError, match="--global-batch 4 and 6 steps per epoch.*--global-batch 8"):
        train_imagenet.main(_args(image_folder, tmp_path, "--resume", "--global-batch", "8"))


def _mount_small_tmpfs(mnt: Path) -> bool:
    mnt.mkdir()
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                                capture_output=True).returncode == 0


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_a_full_disk_is_a_clear_error_and_leaves_no_temporary_file(image_folder, tmp_path, monkeypatch, disk):
    """A 1 MiB tmpfs filled but for 32 KiB (the checkpoint needs ~100 KiB; mounting needs root), and a simulated
    full disk: torch.save's writer failing as it does on ENOSPC (the OSError as the context of its RuntimeError)."""
    mnt = tmp_path / "disk"
    if disk == "tmpfs":
        if not _mount_small_tmpfs(mnt):
            pytest.skip("mounting a tmpfs needs root; the simulated case runs everywhere")
        (mnt / "filler").write_bytes(b"\0" * (shutil.disk_usage(mnt).free - 32 * 1024))
    else:
        mnt.mkdir()
        real_save = torch.save

        def save(obj, f, *a, **k):
            if isinstance(f, str | Path):
                return real_save(obj, f, *a, **k)
            f.write(b"PK\3\4partial")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

        monkeypatch.setattr(torch, "save", save)
    run = mnt / "run"
    try:
        with pytest.raises(CheckpointError, match=r"could not write the checkpoint .*last\.pt: the disk is full "
                                                  r"\(\d+\.\d MiB free on .*\)") as err:
            train_imagenet.main(_args(image_folder, run, "--max-steps", "1"))
        assert str(run / "last.pt") in str(err.value)
        assert sorted(p.name for p in run.iterdir()) == [".lock", "log.jsonl"]  # no last.pt.tmp
    finally:
        if disk == "tmpfs" and subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mnt)], check=True)  # a file left open: detach it anyway


def test_a_checkpoint_is_fsynced_with_its_directory(image_folder, tmp_path, monkeypatch):
    synced, fsync = [], os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    train_imagenet.main(_args(image_folder, tmp_path, "--max-steps", "1"))
    assert str(tmp_path / "last.pt.tmp") in synced and str(tmp_path) in synced
    assert synced.index(str(tmp_path / "last.pt.tmp")) < synced.index(str(tmp_path))


def test_a_checkpoint_holds_only_what_loads_with_weights_only(tmp_path):
    with pytest.raises(TypeError, match=r"state\['args'\]\['dir'\] is a pathlib.*PosixPath.*weights_only=True"):
        checkpoint.save_checkpoint(tmp_path / "last.pt", {"args": {"dir": tmp_path}})
    assert not list(tmp_path.iterdir())


def test_the_default_run_directory_is_git_ignored():
    assert train_imagenet.parse_args([]).ckpt_dir == Path("runs/imagenet")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "check-ignore", "-q", "runs/imagenet/last.pt"], cwd=ROOT)
    assert proc.returncode == 0


def test_resnet50_is_torchvisions_with_its_default_init(monkeypatch):
    """torchvision's documented init (zero_init_residual=False): convolutions kaiming_normal_(fan_out, relu), every
    BatchNorm weight 1 and bias 0 (the last BN of each block too), and the Linear's default; one model whether or
    not torchvision imports."""
    fake = type(sys)("torchvision")
    fake.models = type(sys)("torchvision.models")
    fake.models.resnet50 = lambda **k: pytest.fail("get_model used torchvision's model")
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake.models)
    torch.manual_seed(0)
    model = train_imagenet.get_model("resnet50", 1000)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
        elif isinstance(m, torch.nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            std = (2 / fan_out) ** 0.5
            assert abs(m.weight.std().item() / std - 1) < 0.1 and abs(m.weight.mean().item()) < 0.1 * std, name
    bound = 1 / 2048**0.5
    assert model.fc.weight.abs().max() <= bound and model.fc.weight.std() > 0.9 * bound / 3**0.5


# --- a non-finite loss: stop (or skip with --skip-nonfinite), never checkpoint it ------------------------------------

def _nonfinite_error():
    return getattr(train_imagenet, "NonFiniteLossError", AssertionError)  # the trainer's error for it


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _all_finite(path: Path) -> bool:
    return all(t.isfinite().all() for t in _tensors(torch.load(path, weights_only=True)) if t.is_floating_point())


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_finite_checkpoints(tmp_path):
    """Epoch 0 trained and evaluated (last.pt, best.pt), then resumed with --lr 1e30: the loss turns NaN/inf in epoch
    1; the run stops with an error naming the step, the loss and the fix, and both checkpoints stay as they were."""
    run = tmp_path / "run"
    train_imagenet.main(_synthetic_args(run, "--epochs", "3", "--max-steps", "4"))
    kept = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt")}
    with pytest.raises(_nonfinite_error(), match=r"not finite at step [5-8] \(epoch 1\): loss (nan|inf|-inf)\b.*"
                                                 r"last\.pt \(step 4\).*--resume.*--lr.*--skip-nonfinite"):
        train_imagenet.main(_synthetic_args(run, "--epochs", "3", "--resume", "--lr", "1e30"))
    assert {name: (run / name).read_bytes() for name in kept} == kept
    assert not (run / "summary.json").exists()
    assert all(math.isfinite(e["loss"]) for e in map(json.loads, (run / "log.jsonl").read_text().splitlines())
               if "loss" in e)


def test_lr_1e30_exits_non_zero_and_writes_no_non_finite_checkpoint(tmp_path):
    """From the command line, a checkpoint due after every step: the status is non-zero, the message names the step,
    and whatever last.pt holds is finite."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_imagenet",
                           *_synthetic_args(tmp_path, "--lr", "1e30", "--ckpt-every", "1", "--print-every", "100")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert re.search(r"NonFiniteLossError: fastasam: .*not finite .*step \d+", proc.stderr), proc.stderr
    assert not (tmp_path / "last.pt").exists() or _all_finite(tmp_path / "last.pt")
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "best.pt").exists()


def _nan_at(monkeypatch, forwards: set[int]) -> None:
    """The model's output is NaN on these training forward passes (1-based), as a diverging step would make it."""
    real, count = train_imagenet.get_model, [0]

    def get_model(*a, **k):
        m = real(*a, **k)

        def hook(module, inputs, out):
            if module.training:
                count[0] += 1
                if count[0] in forwards:
                    return out * float("nan")
            return None

        m.register_forward_hook(hook)
        return m

    monkeypatch.setattr(train_imagenet, "get_model", get_model)


def test_skip_nonfinite_skips_such_steps_without_a_trace_and_stops_beyond_n(tmp_path, monkeypatch, capsys):
    """SGD (one forward per step), NaN on step 2: skipped with --skip-nonfinite 1 (logged, printed): after step 2 the
    weights, BatchNorm statistics and momentum are those after step 1. NaN on steps 2 and 3: the second is beyond 1."""
    sgd = ("--opt", "sgd", "--epochs", "2", "--print-every", "1")
    train_imagenet.main(_synthetic_args(tmp_path / "one", *sgd, "--max-steps", "1"))
    _nan_at(monkeypatch, {2})
    out = train_imagenet.main(_synthetic_args(tmp_path / "skip", *sgd, "--skip-nonfinite", "1", "--max-steps", "2"))
    assert out == {"steps": 2, "stopped": True}
    a, b = _final(tmp_path / "one"), _final(tmp_path / "skip")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    printed = capsys.readouterr().out
    assert re.search(r"step 2 \(epoch 0\): the loss is not finite \(nan\b.*skipped.*1 of --skip-nonfinite 1",
                     printed), printed
    log = [json.loads(line) for line in (tmp_path / "skip" / "log.jsonl").read_text().splitlines()]
    assert [(e["step"], e["nonfinite_loss"], e["skipped"]) for e in log if "nonfinite_loss" in e] == [(2, "nan", 1)]
    assert [e["step"] for e in log if "loss" in e] == [1]
    monkeypatch.undo()
    _nan_at(monkeypatch, {2, 3})
    with pytest.raises(_nonfinite_error(), match=r"not finite at step 3 .*beyond --skip-nonfinite 1"):
        train_imagenet.main(_synthetic_args(tmp_path / "beyond", *sgd, "--skip-nonfinite", "1"))
    assert not (tmp_path / "beyond" / "last.pt").exists()


def test_the_non_finite_check_reads_the_device_only_where_the_loop_already_does(tmp_path, monkeypatch):
    """The trainer reads no value to the host inside a step, nor after the steps between the print points (reads a GPU
    would wait for): with --print-every 4 over 8 two-pass steps, every read after a step's end is at step 4 or 8 (the
    print, the checkpoint's check, the next epoch's sample order). fastasam's own reads (of its host-side tables) are
    not counted."""
    reads, where = [], {"phase": "setup", "step": 0}
    begin, end = train_imagenet.StepTimer.begin, train_imagenet.StepTimer.end

    def began(self):
        where["phase"] = "step"
        begin(self)

    def ended(self):
        end(self)
        where["phase"], where["step"] = "after", where["step"] + 1

    monkeypatch.setattr(train_imagenet.StepTimer, "begin", began)
    monkeypatch.setattr(train_imagenet.StepTimer, "end", ended)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def read(self, *a, _real=real, **k):
            if "fastasam" not in Path(sys._getframe(1).f_code.co_filename).parts:  # not its host-side tables
                reads.append((where["phase"], where["step"]))
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)
    train_imagenet.main(_synthetic_args(tmp_path, "--epochs", "2", "--print-every", "4", "--ckpt-every", "100",
                                        "--no-eval"))
    monkeypatch.undo()
    assert where["step"] == 8 and not [r for r in reads if r[0] == "step"], sorted(set(reads))
    assert {s for phase, s in reads if phase == "after"} <= {4, 8}, sorted(set(reads))


def test_the_loss_watch_finds_the_first_non_finite_loss_across_its_folds(monkeypatch):
    """Folded every 3 losses: the first inf/NaN is found whichever fold holds it, a later one does not replace it, and
    a check that found none starts afresh."""
    monkeypatch.setattr(train_imagenet.LossWatch, "FOLD", 3)
    inf, nan = math.inf, math.nan
    for start, losses, expect in ((1, [1.0] * 8, None), (1, [1.0, 2.0, 3.0, 4.0, inf, 6.0, nan], (5, "inf")),
                                  (10, [nan, 1.0, 1.0, 1.0, inf], (10, "nan")),
                                  (10, [1.0] * 6 + [-inf], (16, "-inf"))):
        watch = train_imagenet.LossWatch()
        for k, v in enumerate(losses):
            watch.add(start + k, torch.tensor(v))
        got = watch.first()
        assert (got if got is None else (got[0], str(got[1]))) == expect, (losses, got)
    watch = train_imagenet.LossWatch()
    watch.add(1, torch.tensor(1.0))
    assert watch.first() is None
    watch.add(2, torch.tensor(nan))
    assert watch.first()[0] == 2


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """torchrun, 2 processes, NaN on rank 1's third step only: both stop with a non-zero status, the message names
    step 3 and process 1, and last.pt (written after step 2) is kept."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(
        "import os\n"
        "from benchmarks import train_imagenet\n"
        "real, count = train_imagenet.get_model, [0]\n"
        "def get_model(*a, **k):\n"
        "    m = real(*a, **k)\n"
        "    def hook(module, inputs, out):\n"
        "        if module.training:\n"
        "            count[0] += 1\n"
        "            if count[0] == 3 and os.environ['RANK'] == '1':\n"
        "                return out * float('nan')\n"
        "    m.register_forward_hook(hook)\n"
        "    return m\n"
        "train_imagenet.get_model = get_model\n"
        "train_imagenet.main()\n")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *_synthetic_args(run, "--opt", "sgd", "--epochs", "3", "--ckpt-every", "2", "--print-every", "4")]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert re.search(r"not finite at step 3 \(epoch 0\): loss nan on process 1", out), out
    state = _final(run)
    assert state["step"] == 2 and _all_finite(run / "last.pt")


# --- nothing is written through a symbolic link in the run directory -------------------------------------------------

RUN_FILES = (".lock", "last.pt", "last.pt.tmp", "best.pt", "best.pt.tmp", "log.jsonl", "summary.json",
             "summary.json.tmp", "curves.png", "tensorboard")


def test_a_symlink_in_the_run_directory_is_refused_at_the_start(tmp_path):
    victim, victim_dir = tmp_path / "victim", tmp_path / "victim_dir"
    victim.write_text("keep me\n")
    victim_dir.mkdir()
    for k, name in enumerate(RUN_FILES):
        run = tmp_path / f"run{k}"
        run.mkdir()
        (run / name).symlink_to(victim_dir if name == "tensorboard" else victim)
        for extra in ((), ("--overwrite",), ("--resume",)):
            with pytest.raises(RunDirectoryError, match=rf"{re.escape(str(run / name))} is a symbolic link .*Fix"):
                train_imagenet.main(_synthetic_args(run, "--max-steps", "1", *extra))
        assert victim.read_text() == "keep me\n" and not list(victim_dir.iterdir()), name
        assert (run / name).is_symlink()


def test_a_symlink_made_during_the_run_is_refused_before_the_write(tmp_path, monkeypatch):
    """A link appears at step 2 of 4; the write it would redirect (the epoch-end checkpoint, best.pt, summary.json,
    curves.png) is refused naming it, and the file it points to is untouched."""
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    lr_factor = train_imagenet.lr_factor
    for name in ("last.pt.tmp", "last.pt", "best.pt", "summary.json", "curves.png"):
        run = tmp_path / name

        def link_at_step_2(step, *a, _run=run, _name=name):
            if step == 2 and not (_run / _name).is_symlink():
                (_run / _name).unlink(missing_ok=True)
                (_run / _name).symlink_to(victim)
            return lr_factor(step, *a)

        monkeypatch.setattr(train_imagenet, "lr_factor", link_at_step_2)
        with pytest.raises(RunDirectoryError, match=rf"{re.escape(str(run / name))} is a symbolic link"):
            train_imagenet.main(_synthetic_args(run))
        assert victim.read_text() == "keep me\n", name


# --- numeric flags are range-checked by the parser -------------------------------------------------------------------

def test_numeric_flags_are_range_checked_by_the_parser(capsys):
    bad = [("--print-every", "0", ">= 1"), ("--ckpt-every", "0", ">= 1"), ("--global-batch", "0", ">= 1"),
           ("--epochs", "0", ">= 1"), ("--max-steps", "0", ">= 1"), ("--print-every", "2.5", "integer"),
           ("--lr", "0", "> 0"), ("--lr", "nan", "finite"), ("--lr", "inf", "finite"), ("--lr", "x", "number"),
           ("--momentum", "1", "[0, 1)"), ("--momentum", "-0.1", "[0, 1)"), ("--weight-decay", "-0.0001", ">= 0"),
           ("--rho", "-1", ">= 0"), ("--eta", "-0.01", ">= 0"), ("--rho-min", "-1", ">= 0"),
           ("--alpha", "-0.5", ">= 0"), ("--every", "0", ">= 1"), ("--ema", "1", "[0, 1)"),
           ("--clip-grad", "0", "> 0"), ("--image-size", "0", ">= 1"), ("--val-crop", "0", ">= 1"),
           ("--val-resize", "0", ">= 1"), ("--num-classes", "0", ">= 1"), ("--synthetic-size", "0", ">= 1"),
           ("--workers", "-1", ">= 0"), ("--label-smoothing", "1", "[0, 1)"), ("--warmup-epochs", "-1", ">= 0"),
           ("--seed", "-1", ">= 0"), ("--target-top1", "101", "[0, 100]"), ("--skip-nonfinite", "-1", ">= 0")]
    for flag, value, words in bad:
        with pytest.raises(SystemExit):
            train_imagenet.parse_args([flag, value])
        err = capsys.readouterr().err
        assert f"argument {flag}: " in err and words in err and value in err, (flag, value, err)
    ok = train_imagenet.parse_args(["--label-smoothing", "0", "--momentum", "0", "--workers", "0", "--ema", "0",
                                    "--target-top1", "100", "--warmup-epochs", "0", "--lr", "1e30", "--seed", "0"])
    assert (ok.label_smoothing, ok.momentum, ok.ema, ok.lr) == (0.0, 0.0, 0.0, 1e30)
    for flags in (["--warmup-epochs", "3", "--epochs", "2"], ["--rho-follows-lr", "--rho", "0.1", "--rho-min", "0.2"]):
        with pytest.raises(SystemExit):
            train_imagenet.parse_args(flags)
        assert flags[1] in capsys.readouterr().err


# --- a resume with changed flags: applied and said, or refused --------------------------------------------------------

def test_a_resume_applies_a_changed_lr_momentum_weight_decay_and_rho_and_says_so(tmp_path, capsys):
    base = ("--opt", "sam", "--epochs", "2", "--no-eval")
    train_imagenet.main(_synthetic_args(tmp_path, *base, "--max-steps", "2"))
    capsys.readouterr()
    train_imagenet.main(_synthetic_args(tmp_path, *base, "--resume", "--max-steps", "3", "--lr", "0.02",
                                        "--momentum", "0.5", "--weight-decay", "0.001", "--rho", "0.1"))
    printed = capsys.readouterr().out
    for line in ("resume: --lr 0.1 -> 0.02 applied", "resume: --momentum 0.9 -> 0.5 applied",
                 "resume: --weight-decay 0.0001 -> 0.001 applied", "resume: --rho 0.05 -> 0.1 applied"):
        assert line in printed, printed
    state = _final(tmp_path)
    (group,) = state["optimizer"]["param_groups"]
    assert (group["initial_lr"], group["momentum"], group["weight_decay"], group["rho"]) == (0.02, 0.5, 0.001, 0.1)
    assert group["lr"] == pytest.approx(0.02 * train_imagenet.lr_factor(3, 0, 8))
    assert state["scheduler"]["base_lrs"] == [0.02]
    records = [e for e in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "resume" in e]
    assert len(records) == 1 and records[0]["step"] == 2
    assert records[0]["resume"] == {"lr": [0.1, 0.02], "momentum": [0.9, 0.5], "weight_decay": [0.0001, 0.001],
                                    "rho": [0.05, 0.1]}


def test_a_resume_refuses_flags_that_fix_the_schedule_the_model_or_the_data(tmp_path):
    train_imagenet.main(_synthetic_args(tmp_path, "--epochs", "2", "--max-steps", "1"))
    before = (tmp_path / "last.pt").read_bytes()
    for flags, match in ((["--epochs", "3"], r"--epochs 2.*this run has --epochs 3"),
                         (["--seed", "1", "--warmup-epochs", "0.5"], r"--warmup-epochs 0\.0, --seed 0.*this run has "
                                                                     r"--warmup-epochs 0\.5, --seed 1"),
                         (["--opt", "sam"], r"--opt asam.*this run has --opt sam")):
        with pytest.raises(CheckpointError, match=match + r".*cannot change.*Fix: resume with"):
            train_imagenet.main(_synthetic_args(tmp_path, "--epochs", "2", "--resume", *flags))
    assert (tmp_path / "last.pt").read_bytes() == before


def test_msam_trains_in_one_pass_and_evaluates_and_keeps_its_unperturbed_weights(image_folder, tmp_path):
    """--opt msam: one forward/backward a step; the evaluation and best.pt see w (unperturbed), last.pt holds the
    weights as they are between steps (w~ = w - a * m) with the optimizer's state: w = w~ + a * m gives best.pt's."""
    out = train_imagenet.main(_args(image_folder, tmp_path, "--opt", "msam", "--epochs", "1", "--lr", "0.05"))
    assert out["steps"] == 6
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)  # the one evaluation: the same step as last.pt
    (factor,) = last["optimizer"]["fastasam"]["factors"]  # one param group
    assert factor > 0
    names = [n for n, _ in train_imagenet.get_model("resnet_tiny", 3).named_parameters()]
    moved = 0
    for i, name in enumerate(names):
        m = last["optimizer"]["state"][i]["momentum_buffer"]
        want = last["model"][name] + factor * m
        torch.testing.assert_close(best["model"][name], want, atol=1e-6, rtol=1e-6, msg=name)
        moved += int(not torch.equal(best["model"][name], last["model"][name]))
    assert moved > len(names) // 2


@pytest.mark.parametrize("opt,flags", [("friendlysam", ["--sigma", "0.5", "--lmbda", "0.8"]),
                                       ("wsam", ["--gamma", "0.8", "--adaptive"]),
                                       ("bsam", ["--lr", "0.01", "--rho", "0.01"])])
def test_the_peers_variants_train_and_bsam_is_kept_at_its_mean(image_folder, tmp_path, opt, flags):
    """--opt friendlysam/wsam/bsam: two passes a step, the options reach the optimizer; BSAM's weights sit at
    w + noise between steps, so best.pt (evaluated through unperturbed()) holds its mean and last.pt the noisy point."""
    out = train_imagenet.main(_args(image_folder, tmp_path, "--opt", opt, "--epochs", "1", *flags))
    assert out["steps"] == 6
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    names = [n for n, _ in train_imagenet.get_model("resnet_tiny", 3).named_parameters()]
    if opt != "bsam":
        for name in names:
            assert torch.equal(best["model"][name], last["model"][name]), name
        return
    state = last["optimizer"]["state"]
    for i, name in enumerate(names):
        torch.testing.assert_close(best["model"][name], state[i]["mean"], atol=0, rtol=0, msg=name)
    assert sum(not torch.equal(best["model"][n], last["model"][n]) for n in names) > len(names) // 2


def test_the_peers_variants_take_their_flags(capsys):
    model = train_imagenet.get_model("resnet_tiny", 3)

    def build(*flags):
        return train_imagenet.build_optimizer(train_imagenet.parse_args(list(flags)), model, 123)

    friendly = build("--opt", "friendlysam", "--sigma", "0.5", "--lmbda", "0.8", "--rho", "0.2")
    assert (type(friendly), friendly.sigma, friendly.lmbda, friendly.param_groups[0]["rho"]) == (
        fastasam.FriendlySAM, 0.5, 0.8, 0.2)
    wsam = build("--opt", "wsam", "--gamma", "0.7", "--adaptive")
    assert (type(wsam), wsam.gamma, len(wsam.param_groups)) == (fastasam.WSAM, 0.7, 2)  # the adaptive split
    bsam = build("--opt", "bsam", "--lr", "0.01", "--weight-decay", "0.001")
    assert (type(bsam), bsam.num_data, bsam.param_groups[0]["lr"], bsam.param_groups[0]["weight_decay"]) == (
        fastasam.BSAM, 123, 0.01, 0.001)
    for flags, match in ((["--opt", "bsam", "--sharpness", "replica"], "--sharpness replica"),
                         (["--opt", "wsam", "--every", "2"], "--every 2"),
                         (["--opt", "friendlysam", "--lmbda", "1"], "lmbda"),
                         (["--opt", "bsam", "--rho-follows-lr"], "--rho-follows-lr")):
        with pytest.raises(SystemExit):
            train_imagenet.parse_args(flags)
        assert match in capsys.readouterr().err, flags
