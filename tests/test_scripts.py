"""The GPU scripts on a machine without a GPU: the evidence command says so and writes nothing, its test selection
collects, and a part whose step fails (a fake ``nvidia-smi``/``python`` on PATH) leaves its logs and summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_evidence.sh"
SMI = """#!/bin/sh
if [ "$1" = -L ]; then echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"; exit 0; fi
if [ "$1" = --query-gpu=driver_version ]; then echo {driver}; exit 0; fi
echo "| NVIDIA-SMI {driver}    Driver Version: {driver}    CUDA Version: {cuda}     |"
"""


def evidence(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, **(env or {})})


def fake_bin(tmp_path: Path, driver: str, cuda: str, python: str | None = None) -> dict[str, str]:
    """A PATH with a fake ``nvidia-smi`` (one H200 with ``driver``/``cuda``) and, if given, a fake ``python``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(SMI.format(driver=driver, cuda=cuda))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "GPU_EVIDENCE_RESULTS": str(tmp_path / "results"),
           "OUT": str(tmp_path / "out")}
    if python is not None:
        (bin_dir / "python").write_text(python)
        env["PYTHON"] = str(bin_dir / "python")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "out").mkdir()
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_gpu_evidence_says_there_is_no_gpu_and_does_nothing(tmp_path):
    before = sorted((ROOT / "benchmarks" / "results").rglob("*"))
    for part in ("part1", "part2"):
        proc = evidence(part, env={"OUT": str(tmp_path)})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "no CUDA GPU is visible" in proc.stdout and "scripts/gpu_evidence.sh part1" in proc.stdout
    assert sorted((ROOT / "benchmarks" / "results").rglob("*")) == before
    assert not list(tmp_path.iterdir())


def test_gpu_evidence_without_a_part_prints_its_usage():
    for args in ((), ("env", "build")):
        proc = evidence(*args, timeout=60)
        assert proc.returncode == 1 and "gpu_evidence.sh part1" in proc.stdout and "PART=2" in proc.stdout


def test_part1s_test_selection_collects_and_leaves_the_build_and_compile_only_tests_out(tmp_path):
    """The selection part 1 runs, collected here as on a GPU (a plugin makes torch report one sm_90 device): the
    kernel tests on ``cuda``, not the just-in-time build or the compile-only checks."""
    args = evidence("tests", timeout=60).stdout.splitlines()
    assert args[0] == "tests" and "-k" in args
    plugin = tmp_path / "one_fake_gpu.py"
    plugin.write_text("import torch\ntorch.cuda.is_available = lambda: True\ntorch.cuda.device_count = lambda: 1\n"
                      "torch.cuda.get_device_capability = lambda device=None: (9, 0)\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-p", "one_fake_gpu", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                               "PYTHONPATH": str(tmp_path)})  # as on a GPU, where Triton compiles
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(ids) >= 100, proc.stdout[-2000:]
    assert all("-cuda" in i or "on_the_gpu" in i or "opcheck" in i for i in ids), ids
    assert any("test_fused_adamw_in_bf16_is_bit_exact_against_torchs_fused_adamw[triton-cuda]" in i for i in ids)
    assert "tests/test_cuda_backend.py::test_the_built_extension_steps_like_the_oracle_on_the_gpu" in ids
    assert not [i for i in ids if "just_in_time" in i or "compile_for_sm80" in i or "cpu]" in i]
    jit = args[args.index("--deselect") + 1]
    assert subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", jit], capture_output=True,
                          text=True, timeout=300, cwd=ROOT).returncode == 0  # the deselected test exists


def test_a_cpu_build_of_torch_beside_a_gpu_stops_part1_and_leaves_its_log(tmp_path):
    probe = "#!/bin/sh\necho 2.13.0+cpu none 0 -\n"  # what a CPU build of torch says, whatever torch runs the test
    env = fake_bin(tmp_path, "580.159.03", "13.0", python=probe)
    proc = evidence("part1", env=env, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "is a CPU build: it cannot use the GPU" in proc.stdout
    results = tmp_path / "results"
    assert sorted(f.name for f in results.iterdir()) == ["part1-env.log", "part1-summary.txt"]
    summary = (results / "part1-summary.txt").read_text()
    assert "env" in summary and "STOPPED" in summary and "build" not in summary
    assert "fastasam gpu-evidence part 1" in (results / "part1-env.log").read_text().splitlines()[0]
    out = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert out == ["gpu-evidence-part1.tar.gz", "part1-env.log", "part1-summary.txt"]


def test_a_driver_older_than_torchs_cuda_stops_with_the_fix(tmp_path):
    probe = "#!/bin/sh\necho 2.11.0+cu130 13.0 0 -\n"  # what torch would say: built for CUDA 13.0, no usable GPU
    env = fake_bin(tmp_path, "550.54.15", "12.4", python=probe)
    proc = evidence("part2", env=env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "the driver 550.54.15 supports CUDA 12.4, but torch 2.11.0+cu130 is built for CUDA 13.0" in proc.stdout
    assert "R580 or newer" in proc.stdout
    assert (tmp_path / "results" / "part2-env.log").is_file()


def test_a_failed_build_is_recorded_and_the_later_steps_do_not_run(tmp_path):
    """Each step's log and the summary are written (and copied to $OUT) as the part goes; a build that fails ends
    the part with exit 1."""
    python = ("#!/bin/sh\ncase \"$*\" in\n  *device_count*) echo 2.11.0+cu130 13.0 1 9.0 ;;\n"
              "  *'-m pip install'*) echo 'error: nvcc exploded' >&2; exit 1 ;;\n  *) exit 1 ;;\nesac\n")
    env = fake_bin(tmp_path, "580.159.03", "13.0", python=python)
    proc = evidence("part1", env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = tmp_path / "results"
    summary = (results / "part1-summary.txt").read_text()
    assert [line.split()[:2] for line in summary.splitlines()[2:]] == [["env", "ok"], ["build", "FAILED"]]
    assert "nvcc exploded" in (results / "part1-build.log").read_text()
    assert "step check" not in proc.stdout and "step tests" not in proc.stdout
    out = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert out == ["gpu-evidence-part1.tar.gz", "part1-build.log", "part1-env.log", "part1-summary.txt"]
