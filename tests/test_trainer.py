"""The ImageNet trainer on CPU: a tiny ImageFolder made here, a run interrupted and resumed to the same weights,
torchrun with 2 gloo processes, and the errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import train_imagenet

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
    return torch.load(ckpt / "last.pt", weights_only=False)


def test_interrupted_run_resumes_to_the_same_weights(image_folder, tmp_path):
    whole = train_imagenet.main(_args(image_folder, tmp_path / "a"))
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


def test_torchrun_two_gloo_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "benchmarks.train_imagenet", "--data", "synthetic", "--arch", "resnet_tiny", "--image-size", "16",
           "--num-classes", "5", "--synthetic-size", "32", "--epochs", "1", "--global-batch", "8", "--amp", "none",
           "--workers", "0", "--ckpt-dir", str(tmp_path), "--print-every", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
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
