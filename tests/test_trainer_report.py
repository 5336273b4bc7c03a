"""The ImageNet trainer's reporting (log fields, --target-top1, summary.json, curves.png, TensorBoard, best.pt, all
over a resume; compare_runs) and its optimizer flags (--opt looksam/gsam, --every, --sharpness, --rho-follows-lr,
--no-bn-bias-decay, --ema, --clip-grad, the composer-sam preset), each resumed bit for bit. Synthetic data, CPU."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastasam
from benchmarks import compare_runs, run_report, train_imagenet

ROOT = Path(__file__).resolve().parents[1]


def _args(ckpt: Path, *extra: str) -> list[str]:
    """4 steps per epoch (32 images, global batch 8), 3 validation images."""
    return ["--data", "synthetic", "--arch", "resnet_tiny", "--image-size", "16", "--num-classes", "5",
            "--synthetic-size", "32", "--epochs", "2", "--global-batch", "8", "--lr", "0.05", "--amp", "none",
            "--workers", "0", "--ckpt-dir", str(ckpt), "--print-every", "2", *extra]


def _main(*argv: str) -> tuple[dict, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train_imagenet.main(list(argv))
    return result, out.getvalue()


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _final(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)


REPORTED = ("--target-top1", "0", "--ema", "0.5")


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory) -> tuple[Path, str]:
    """2 epochs of ASAM with --target-top1 0 (reached at the first evaluation) and --ema: (run dir, stdout)."""
    run = tmp_path_factory.mktemp("reported")
    _, printed = _main(*_args(run, *REPORTED))
    return run, printed


def test_log_lines_carry_clock_eta_and_data_wait(reported_run):
    run, printed = reported_run
    steps = [e for e in _log(run) if "loss" in e]
    assert [e["step"] for e in steps] == [2, 4, 6, 8]
    for e in steps:
        assert e["time"] > 1.7e9 and e["eta_s"] >= 0 and e["data_s"] >= 0 and e["compute_s"] > 0
    assert [e["elapsed_s"] for e in steps] == sorted(e["elapsed_s"] for e in steps) and steps[0]["elapsed_s"] > 0
    for e in steps[:2]:  # epoch 0: the steps left at this interval's rate (no evaluation timed yet)
        assert e["eta_s"] == pytest.approx((8 - e["step"]) * (e["data_s"] + e["compute_s"]))
    assert steps[-1]["eta_s"] < steps[1]["eta_s"] or steps[-1]["eta_s"] < 1  # the last evaluation's time only
    lines = [line for line in printed.splitlines() if " step " in line and "loss" in line]
    assert len(lines) == 4 and all(" elapsed 0:00:" in line and " eta " in line and " ms/step (" in line
                                   for line in lines)


def test_target_top1_is_logged_once_with_the_elapsed_time(reported_run):
    run, printed = reported_run
    log = _log(run)
    hits = [e for e in log if "target_top1" in e]
    evals = [e for e in log if "top1" in e and "target_top1" not in e]
    assert len(hits) == 1 and hits[0]["epoch"] == 0 and hits[0]["step"] == 4 and hits[0]["target_top1"] == 0
    assert hits[0]["top1"] == evals[0]["top1"] and hits[0]["elapsed_s"] >= evals[0]["elapsed_s"]
    line = [x for x in printed.splitlines() if x.startswith("reached --target-top1")]
    assert line == [f"reached --target-top1 0: top-1 {evals[0]['top1']:.2f}% at epoch 0 (step 4) after "
                    f"{train_imagenet._hms(hits[0]['elapsed_s'])} ({hits[0]['elapsed_s']:.1f} s)"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["time_to_target_s"] == evals[0]["elapsed_s"] and summary["target_epoch"] == 0


def test_summary_json_curves_and_best_checkpoint(reported_run):
    run, printed = reported_run
    summary = json.loads((run / "summary.json").read_text())
    evals = [e for e in _log(run) if "top1" in e and "target_top1" not in e]
    assert [e["epoch"] for e in evals] == [0, 1] and all("ema_top1" in e and "ema_top5" in e for e in evals)
    best = max(evals, key=lambda e: e["top1"])
    assert (summary["best_top1"], summary["best_top1_epoch"]) == (best["top1"], best["epoch"])
    assert (summary["final_top1"], summary["final_top5"]) == (evals[-1]["top1"], evals[-1]["top5"])
    assert summary["best_ema_top1"] == max(e["ema_top1"] for e in evals)
    assert summary["finished"] and summary["steps"] == 8 and summary["evaluations"] == 2
    assert summary["wall_time_s"] >= evals[-1]["elapsed_s"] > 0
    assert summary["images_per_s"] == pytest.approx(8 * 8 / summary["train_s"])
    over = summary["sam_overhead"]
    assert over["steps_timed"] == 8 - train_imagenet.TIMED_AFTER  # steps 5, 6, 7
    assert over["step_over_pass"] == pytest.approx(over["step_ms"] / over["pass_ms"]) and over["step_over_pass"] > 1
    assert summary["peak_memory_bytes"] > 2**20 and summary["versions"]["torch"] == torch.__version__
    assert summary["versions"]["fastasam"] == fastasam.__version__
    if shutil.which("git") and (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert summary["commit"].split("+")[0] == head
    assert "summary: best top-1" in printed and "step / single pass" in printed
    pytest.importorskip("matplotlib")
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(run / "best.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["top1"]) == (best["epoch"], 4 * (best["epoch"] + 1), best["top1"])
    assert state["ema"] is not None and state["model"].keys() == _final(run)["model"].keys()


def test_tensorboard_scalars(reported_run):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run, _ = reported_run
    acc = accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    evals = [e for e in _log(run) if "top1" in e and "target_top1" not in e]
    assert [(s.step, s.value) for s in acc.Scalars("val/top1")] == [(4, pytest.approx(evals[0]["top1"])),
                                                                   (8, pytest.approx(evals[1]["top1"]))]
    assert [s.step for s in acc.Scalars("train/loss")] == [2, 4, 6, 8]
    assert {"train/lr", "train/data_s", "train/compute_s", "val/ema_top1"} <= set(acc.Tags()["scalars"])


def test_the_report_covers_a_resumed_run(reported_run, tmp_path):
    whole, _ = reported_run
    stopped, _ = _main(*_args(tmp_path, *REPORTED, "--max-steps", "6"))  # epoch 1, mid-way
    assert stopped["stopped"] and not (tmp_path / "summary.json").exists()
    before = _final(tmp_path)["report"]["elapsed_s"]
    _main(*_args(tmp_path, *REPORTED, "--resume"))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, tmp_path))
    for key in ("best_top1", "final_top1", "best_ema_top1", "evaluations", "steps", "target_epoch"):
        assert a[key] == b[key], key
    resumed = [e for e in _log(tmp_path) if "loss" in e and e["step"] == 8][0]
    assert resumed["elapsed_s"] > before > 0 and b["wall_time_s"] > before  # the clock goes on from the checkpoint
    assert b["logged_steps"] == 4 and b["time_to_target_s"] < before
    assert (tmp_path / "curves.png").exists() == (pytest.importorskip("matplotlib") is not None)


def test_read_log_keeps_the_last_runs_records_after_a_resume_from_an_older_checkpoint(tmp_path):
    """A crash after step 6's record but with the checkpoint at step 4: the resumed run logs steps 6 and 8 again."""
    records = [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.0}, {"epoch": 0, "step": 4, "top1": 10.0, "top5": 50},
               {"step": 6, "loss": 9.0}, {"step": 6, "loss": 1.5}, {"step": 8, "loss": 1.0},
               {"epoch": 1, "step": 8, "top1": 20.0, "top5": 60}, {"target_top1": 15, "step": 8, "top1": 20.0,
                                                                   "epoch": 1}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    steps, evals, targets = run_report.read_log(tmp_path)
    assert [(e["step"], e["loss"]) for e in steps] == [(2, 3.0), (4, 2.0), (6, 1.5), (8, 1.0)]
    assert [e["top1"] for e in evals] == [10.0, 20.0] and len(targets) == 1
    assert run_report.time_to_target(evals, 15)["epoch"] == 1 and run_report.time_to_target(evals, 99) is None


def test_read_log_leaves_out_skipped_steps_and_resume_records(tmp_path):
    """A step skipped for a non-finite loss and the flags a resume changed are logged at a step, beside its training
    record and evaluation: no list returns them, and they supersede neither."""
    records = [{"step": 2, "loss": 3.0}, {"epoch": 0, "step": 3, "nonfinite_loss": "nan", "pass": None, "skipped": 1},
               {"step": 4, "loss": 2.0}, {"epoch": 0, "step": 4, "top1": 10.0, "top5": 50},
               {"epoch": 1, "step": 4, "resume": {"lr": [0.1, 0.05]}}, {"step": 6, "loss": 1.5}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    steps, evals, targets = run_report.read_log(tmp_path)
    assert [e["step"] for e in steps] == [2, 4, 6] and [e["top1"] for e in evals] == [10.0] and targets == []


def test_a_symlinked_tensorboard_directory_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "tensorboard").symlink_to(tmp_path / "elsewhere")
    board = run_report.TensorBoard(tmp_path, None, True, print)
    with pytest.raises(train_imagenet.RunDirectoryError, match=r"tensorboard is a symbolic link"):
        board.scalars(1, {"train/loss": 1.0})
    assert not list((tmp_path / "elsewhere").iterdir())


def test_without_matplotlib_and_tensorboard_a_note_each(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    _, printed = _main(*_args(tmp_path, "--epochs", "1"))
    assert printed.count("note: tensorboard is not installed") == 1
    assert printed.count("note: matplotlib is not installed") == 1
    assert (tmp_path / "summary.json").exists() and not (tmp_path / "curves.png").exists()
    assert not (tmp_path / "tensorboard").exists()


def test_compare_runs_plots_and_tabulates(reported_run, tmp_path, capsys):
    run, _ = reported_run
    other = tmp_path / "sgd"
    _main(*_args(other, "--opt", "sgd", "--epochs", "1"))
    (other / "summary.json").unlink()  # a run without a summary (stopped, or an older trainer's) is read from its log
    out = tmp_path / "tta.png"
    text = compare_runs.main([str(run), str(other), "--out", str(out), "--target", "0"])
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["run", "opt", "evals", "best"] and len(lines) == 3
    summary = json.loads((run / "summary.json").read_text())
    assert lines[1].split()[:5] == [str(run), "asam", "2", f"{summary['best_top1']:.2f}",
                                    f"{summary['final_top1']:.2f}"]
    assert lines[2].split()[:3] == [str(other), "sgd", "1"]
    assert lines[1].split()[-1] == f"{summary['time_to_target_s'] / 3600:.3f}"
    pytest.importorskip("matplotlib")
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="no log.jsonl"):
        compare_runs.main([str(tmp_path / "nothing"), "--out", str(out)])


# --- the optimizer's features as flags ------------------------------------------------------------------------------

def _flat(obj, prefix="") -> dict:
    """Every leaf of a nested checkpoint entry, keyed by its path."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flat(val, f"{prefix}/{i}").items()}
    return {prefix: obj}


def _same_state(a: dict, b: dict, keys=("model", "optimizer", "scheduler", "ema", "rho_schedule")) -> None:
    for key in keys:
        fa, fb = _flat(a[key]), _flat(b[key])
        assert fa.keys() == fb.keys(), key
        for k, v in fa.items():
            assert torch.equal(v, fb[k]) if isinstance(v, torch.Tensor) else v == fb[k], f"{key}{k}"


@pytest.mark.parametrize("flags", [
    ("--ema", "0.5", "--opt", "sam", "--every", "2"),
    ("--opt", "looksam", "--every", "2", "--rho-follows-lr", "--rho-min", "0.01"),
    ("--opt", "gsam", "--adaptive", "--clip-grad", "0.5", "--no-bn-bias-decay"),
], ids=["ema-every", "looksam-rho-follows-lr", "gsam-clip-no-bn-bias-decay"])
def test_stateful_flags_resume_bit_exact(tmp_path, flags):
    """Stopped after step 3 of 4 (the next step a one-pass step for --every 2) and resumed: the same weights, optimizer
    state (LookSAM's g_v, the step counter), EMA and rho schedule as the uninterrupted run."""
    base = ("--epochs", "1", "--no-eval", *flags)
    _main(*_args(tmp_path / "whole", *base))
    out, _ = _main(*_args(tmp_path / "b", *base, "--max-steps", "3"))
    assert out == {"steps": 3, "stopped": True}
    _main(*_args(tmp_path / "b", *base, "--resume"))
    a, b = _final(tmp_path / "whole"), _final(tmp_path / "b")
    assert a["step"] == b["step"] == 4
    _same_state(a, b)
    if "--ema" in flags:
        assert not torch.equal(a["ema"]["fc.weight"], a["model"]["fc.weight"])
    if "looksam" in flags:
        assert a["optimizer"]["fastasam"]["g_v"] and a["optimizer"]["fastasam"]["steps_done"] == 4


def _trained(tmp_path: Path, name: str, *flags: str) -> dict:
    _main(*_args(tmp_path / name, "--epochs", "1", "--no-eval", "--max-steps", "2", *flags))
    return _final(tmp_path / name)


def test_gsam_differs_from_asam(tmp_path):
    """GSAM with ASAM's perturbation (--adaptive, the same rho): only GSAM's correction (alpha 0.1) differs."""
    asam = _trained(tmp_path, "asam", "--opt", "asam")
    gsam = _trained(tmp_path, "gsam", "--opt", "gsam", "--adaptive", "--rho", "1.0")
    assert gsam["optimizer"]["param_groups"][0]["rho"] == asam["optimizer"]["param_groups"][0]["rho"] == 1.0
    assert not torch.equal(asam["model"]["fc.weight"], gsam["model"]["fc.weight"])


@pytest.mark.parametrize("flags,two_pass_steps", [
    (("--opt", "sam"), [0, 1, 2, 3]),
    (("--opt", "sam", "--every", "2"), [0, 2]),
    (("--opt", "looksam", "--every", "2"), [0, 2]),
])
def test_every_k_makes_the_other_steps_one_pass(tmp_path, monkeypatch, flags, two_pass_steps):
    perturbed, passes = [], []
    first_step = fastasam.ASAM.first_step

    def record(self, zero_grad=False):
        perturbed.append(self._steps_done)
        return first_step(self, zero_grad)

    monkeypatch.setattr(fastasam.ASAM, "first_step", record)
    real_forward = train_imagenet.get_model  # count forward passes through a hook on the model

    def model_with_counter(*a, **k):
        m = real_forward(*a, **k)
        m.register_forward_hook(lambda *_: passes.append(1) if m.training else None)
        return m

    monkeypatch.setattr(train_imagenet, "get_model", model_with_counter)
    _main(*_args(tmp_path, "--epochs", "1", "--no-eval", *flags))
    assert perturbed == two_pass_steps
    assert len(passes) == 4 + len(two_pass_steps)


def test_no_bn_bias_decay_leaves_batchnorm_and_biases_undecayed():
    model = train_imagenet.get_model("resnet_tiny", 5)
    names = {id(p): n for n, p in model.named_parameters()}
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    for opt, groups in (("asam", 3), ("sgd", 2), ("gsam", 2)):
        args = train_imagenet.parse_args(["--opt", opt, "--no-bn-bias-decay", "--weight-decay", "0.001"])
        optimizer = train_imagenet.build_optimizer(args, model, 100)
        assert len(optimizer.param_groups) == groups, opt
        for g in optimizer.param_groups:
            for p in g["params"]:
                undecayed = id(p) in bn or names[id(p)].endswith("bias")
                assert g["weight_decay"] == (0.0 if undecayed else 0.001), (opt, names[id(p)])
                if opt == "asam":  # the official adaptive split: names with "weight" adaptive
                    assert g["adaptive"] == ("weight" in names[id(p)]), names[id(p)]
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)
    plain = train_imagenet.build_optimizer(train_imagenet.parse_args(["--opt", "sgd"]), model, 100)
    assert [g["weight_decay"] for g in plain.param_groups] == [1e-4]


def test_rho_follows_lr_sets_rho_from_the_cosine_lr(tmp_path):
    """No warm-up, 4 steps: after 2 the lr is half the peak, so rho is halfway between --rho-min and --rho."""
    state = _trained(tmp_path, "r", "--opt", "sam", "--rho", "0.5", "--rho-follows-lr", "--rho-min", "0.1")
    assert [g["rho"] for g in state["optimizer"]["param_groups"]] == [pytest.approx(0.3)]
    fixed = _trained(tmp_path, "f", "--opt", "sam", "--rho", "0.5")
    assert [g["rho"] for g in fixed["optimizer"]["param_groups"]] == [0.5]
    assert not torch.equal(state["model"]["fc.weight"], fixed["model"]["fc.weight"])


def test_clip_grad_clips_the_second_pass_gradient_before_second_step(tmp_path, monkeypatch):
    events = []
    clip, first, second = torch.nn.utils.clip_grad_norm_, fastasam.ASAM.first_step, fastasam.ASAM.second_step

    def clip_and_check(params, max_norm, *a, **k):
        params = list(params)
        total = clip(params, max_norm, *a, **k)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        events.append(("clip", float(total) > max_norm, float(norm) <= max_norm * (1 + 1e-5)))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_check)
    monkeypatch.setattr(fastasam.ASAM, "first_step", lambda self, zero_grad=False: (events.append("first"),
                                                                                    first(self, zero_grad))[1])
    monkeypatch.setattr(fastasam.ASAM, "second_step", lambda self, zero_grad=False: (events.append("second"),
                                                                                     second(self, zero_grad))[1])
    clipped = _trained(tmp_path, "c", "--opt", "asam", "--clip-grad", "0.01")
    assert events == ["first", ("clip", True, True), "second"] * 2  # clipped (the norm was above 0.01), after
    monkeypatch.undo()
    unclipped = _trained(tmp_path, "u", "--opt", "asam")
    assert not torch.equal(clipped["model"]["fc.weight"], unclipped["model"]["fc.weight"])


def test_one_process_notes_and_refusals(tmp_path):
    _, printed = _main(*_args(tmp_path / "a", "--epochs", "1", "--no-eval", "--max-steps", "2", "--sharpness",
                              "replica", "--sync-bn"))
    assert "--sharpness replica with one process is --sharpness global" in printed and "--sync-bn with one" in printed
    glob = _trained(tmp_path, "g", "--sharpness", "global")
    _same_state(_final(tmp_path / "a"), glob, keys=("model", "optimizer"))  # one replica: the same step
    for bad in (["--opt", "gsam", "--every", "2"], ["--opt", "sgd", "--every", "2"], ["--opt", "sgd", "--sharpness",
                "replica"], ["--opt", "asam", "--alpha", "0.1"], ["--opt", "sam", "--adaptive"], ["--ema", "1"],
                ["--clip-grad", "0"]):
        with pytest.raises(SystemExit):
            train_imagenet.parse_args(bad)


def test_composer_sam_preset():
    args = train_imagenet.parse_args(["--preset", "composer-sam"])
    assert (args.arch, args.opt, args.rho, args.every) == ("resnet50", "sam", 0.5, 10)
    assert train_imagenet.parse_args(["--preset", "composer-sam", "--every", "5"]).every == 5
    looksam = train_imagenet.parse_args(["--opt", "looksam"])
    assert (looksam.every, looksam.alpha, looksam.rho) == (5, 0.7, 0.05)


def test_val_resize_and_val_crop_set_the_evaluation_transform(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for split in ("train", "val"):
        d = tmp_path / split / "n0"
        d.mkdir(parents=True)
        pixels = torch.arange(48 * 64 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(48, 64, 3)
        Image.fromarray(pixels.numpy()).save(d / "a.png")

    def val_image(*flags: str) -> torch.Tensor:
        args = train_imagenet.parse_args(["--data", str(tmp_path), "--image-size", "16", *flags])
        return train_imagenet.datasets(args)[1][0][0]

    default, crop, resized = val_image(), val_image("--val-crop", "20"), val_image("--val-crop", "20", "--val-resize",
                                                                                   "40")
    assert default.shape == (3, 16, 16) and crop.shape == resized.shape == (3, 20, 20)
    assert not torch.equal(crop, resized)  # short side 23 (20 * 256 / 224) against 40
    assert torch.equal(val_image("--val-crop", "20", "--val-resize", "23"), crop)
    with pytest.raises(SystemExit):
        train_imagenet.parse_args(["--val-crop", "20", "--val-resize", "19"])


@pytest.mark.slow  # two torchruns of 2 processes (~20 s on 2 busy cores)
def test_replica_sharpness_perturbs_with_each_processes_own_norm(tmp_path):
    """2 gloo processes, one SAM step each way (both torchruns at once): m-sharpness (the first backward under
    no_sync, each rank's own norm) moves the weights elsewhere than the global perturbation; with one process the two
    are the same step (test_one_process_notes_and_refusals)."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    HOW = ("global", "replica")  # noqa: N806
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "benchmarks.train_imagenet", *_args(tmp_path / how, "--opt", "sam", "--epochs", "1", "--no-eval",
                                             "--max-steps", "1", "--print-every", "1", "--sharpness", how)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for how in HOW]
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
        assert "2 process(es)" in out and "one process" not in out, out
    a, b = _final(tmp_path / "global"), _final(tmp_path / "replica")
    assert a["step"] == b["step"] == 1
    assert not torch.equal(a["model"]["fc.weight"], b["model"]["fc.weight"])


def test_resume_with_other_param_groups_is_a_clear_error(tmp_path):
    _main(*_args(tmp_path, "--opt", "sgd", "--no-eval", "--max-steps", "1"))
    with pytest.raises(train_imagenet.CheckpointError, match=r"written with --no-bn-bias-decay off; this run has "
                                                             r"--no-bn-bias-decay\. These cannot change mid-run"):
        _main(*_args(tmp_path, "--opt", "sgd", "--no-eval", "--resume", "--no-bn-bias-decay"))
    state = _final(tmp_path)
    del state["args"]  # a checkpoint without its flags: the optimizer's state itself does not fit
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(train_imagenet.CheckpointError, match=r"does not fit this run's param groups .*unknown"):
        _main(*_args(tmp_path, "--opt", "sgd", "--no-eval", "--resume", "--no-bn-bias-decay"))
