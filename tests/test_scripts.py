"""The GPU scripts degrade to a clear message on a machine without a GPU (the GPU evidence command is dry-run here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_gpu_evidence_says_there_is_no_gpu_and_does_nothing(tmp_path):
    before = sorted((ROOT / "benchmarks" / "results").rglob("*"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_evidence.sh"), "env", "build"], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path),
                                                       "PYTHON": sys.executable})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU is visible" in proc.stdout and "scripts/gpu_evidence.sh env build tests" in proc.stdout
    assert sorted((ROOT / "benchmarks" / "results").rglob("*")) == before
    assert not list(tmp_path.iterdir())


def test_gpu_evidence_without_phases_prints_its_usage():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_evidence.sh")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "phases: env build tests sanitize bench" in proc.stdout
