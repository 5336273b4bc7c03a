"""The GPU evidence command on a machine without a GPU: it says so and writes nothing; its dry run plans every step
with a cap (the first command's within 480 s) and collects each test selection as on a GPU; a command whose steps
fail (a fake ``nvidia-smi``/``python`` on PATH) leaves its logs and summary and goes on. The step-time benchmark it
runs times the optimizer alone; the README's status says whether GPU results exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import step_time, timing
from benchmarks.param_sets import make_params

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_evidence.sh"
LIMIT_S = 480  # the first command's steps' caps, its setup included
SMI = """#!/bin/sh
if [ "$1" = -L ]; then echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"; exit 0; fi
if [ "$1" = --query-gpu=driver_version ]; then echo {driver}; exit 0; fi
if [ "$1" = --query-gpu=name ]; then echo "NVIDIA H200"; exit 0; fi
echo "| NVIDIA-SMI {driver}    Driver Version: {driver}    CUDA Version: {cuda}     |"
"""
DEVICE_DIR = "NVIDIA-H200"  # the fake GPU's name as the results folder spells it


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


def summary_steps(path: Path) -> list[tuple[str, str, str]]:
    """(name, cap=..s, status) of each step line of a summary file."""
    steps = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, cap, _took, *status = line.split()
            steps.append((name, cap, " ".join(status)))
    return steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_gpu_evidence_says_there_is_no_gpu_and_does_nothing(tmp_path):
    before = sorted((ROOT / "benchmarks" / "results").rglob("*"))
    for part in ("part1", "part2"):
        proc = evidence(part, env={"OUT": str(tmp_path)})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "no CUDA GPU is visible" in proc.stdout and "make gpu-evidence" in proc.stdout
        assert "DRY_RUN=1" in proc.stdout
    assert sorted((ROOT / "benchmarks" / "results").rglob("*")) == before
    assert not list(tmp_path.iterdir())


def test_gpu_evidence_without_a_part_prints_its_usage():
    for args in ((), ("env", "build")):
        proc = evidence(*args, timeout=60)
        assert proc.returncode == 1 and "gpu_evidence.sh part1" in proc.stdout and "PART=2" in proc.stdout
        assert "DRY_RUN=1" in proc.stdout


# --- the dry run: the plan, each test selection collected here as on one GPU ------------------------------------------


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``make gpu-evidence DRY_RUN=1`` (the script itself where make is missing), the collected ids of each
    selection written to a folder: (the process, {selection: [ids]})."""
    ids = tmp_path_factory.mktemp("ids")
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "GPU_EVIDENCE_IDS": str(ids),
           "PYTHON": sys.executable}
    cmd = (["make", "-s", "gpu-evidence", "DRY_RUN=1", f"PYTHON={sys.executable}"] if shutil.which("make")
           else ["bash", str(SCRIPT), "part1", "--dry-run"])
    before = sorted((ROOT / "benchmarks" / "results").rglob("*"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert sorted((ROOT / "benchmarks" / "results").rglob("*")) == before  # a plan writes nothing
    return proc, {f.stem: f.read_text().splitlines() for f in ids.glob("*.ids")}


def plan_lines(stdout: str) -> list[re.Match]:
    return [m for line in stdout.splitlines() if (m := re.match(r"  (\S+) +cap=(\d+)s(?: collects=(\S+))?", line))]


def test_the_dry_run_plans_every_step_with_its_cap_within_480_s(dry_run):
    proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = plan_lines(proc.stdout)
    assert [m[1] for m in steps] == ["env", "install", "tests-triton", "build", "check", "tests-cuda",
                                     "step-time-resnet50-fp32", "memcheck"]
    caps = [int(m[2]) for m in steps]
    assert all(c > 0 for c in caps)
    total = int(re.search(r"^total cap=(\d+)s", proc.stdout, re.M)[1])
    assert total == sum(caps) <= LIMIT_S, proc.stdout
    # the background build's whole time lies within the caps of the steps it overlaps
    assert f"at most {caps[1] + caps[2] + caps[3] - 5} s in all" in proc.stdout


def test_every_test_selection_collects_what_it_should(dry_run):
    """The selections, collected here with torch reporting one sm_90 GPU (the cuda backend's own kernel cases, ids
    ``[cuda-cuda...]``, only where fastasam._C is built): the warm CUDA-graph replay and the foreach backend on CUDA
    are among them, CPU cases and the just-in-time build are not."""
    proc, ids = dry_run
    counts = {m[1]: m[3] for m in plan_lines(proc.stdout) if m[3] is not None}
    assert set(counts) == {"tests-triton", "tests-cuda"} == set(ids), proc.stdout
    for name, n in counts.items():
        assert n.isdigit() and int(n) == len(ids[name]) > 0, (name, n)
    triton, cuda = ids["tests-triton"], ids["tests-cuda"]
    assert "tests/test_training_loop.py::test_cuda_graph_captured_step_replays_like_eager[triton-sgd]" in triton
    assert "tests/test_training_loop.py::test_cuda_graph_captured_step_replays_like_eager[foreach-sgd]" in triton
    assert "tests/test_backends.py::test_sgd_trajectory_matches_reference[copy-foreach-cuda-float32]" in triton
    assert "tests/test_multi_tensor.py::test_fused_adamw_in_bf16_is_bit_exact_against_torchs_fused_adamw[triton-cuda]" \
        in triton
    assert len([i for i in triton if "triton-cuda" in i]) >= 100
    assert all("triton" in i or "foreach" in i for i in triton), triton
    assert "tests/test_cuda_backend.py::test_the_built_extension_steps_like_the_oracle_on_the_gpu" in cuda
    assert "tests/test_library_ops.py::test_opcheck_schema_and_fake_on_every_launch_of_real_steps" in cuda
    assert "tests/test_capture.py::test_capturing_a_cold_step_on_the_gpu_raises_the_clear_error[cuda]" in cuda
    assert not [i for i in cuda if "triton" in i or "foreach" in i]
    for i in triton + cuda:
        assert "cpu]" not in i and "-cpu-" not in i and "cuda_shim" not in i and "just_in_time" not in i, i
    from fastasam.backends import cuda as cuda_backend

    if cuda_backend.EXTENSION is not None:  # fastasam._C built here: the cuda backend's own cases are collected too
        assert len([i for i in cuda if "cuda-cuda" in i]) >= 100
        assert "tests/test_training_loop.py::test_cuda_graph_captured_step_replays_like_eager[cuda-sgd]" in cuda


def test_the_selections_print_one_argument_a_line():
    for name in ("tests-triton", "tests-cuda"):
        args = evidence("selection", name, timeout=60).stdout.splitlines()
        assert args[0] == "tests" and args[1] == "-k" and len(args) == 3
    assert evidence("selection", "tests-cpu", timeout=60).returncode == 1


# --- a command whose steps fail ---------------------------------------------------------------------------------------


def test_a_cpu_build_of_torch_beside_a_gpu_stops_part1_and_leaves_its_log(tmp_path):
    probe = "#!/bin/sh\necho 2.13.0+cpu none 0 -\n"  # what a CPU build of torch says, whatever torch runs the test
    env = fake_bin(tmp_path, "580.159.03", "13.0", python=probe)
    proc = evidence("part1", env=env, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    results = tmp_path / "results" / DEVICE_DIR
    assert "is a CPU build: it cannot use the GPU" in (results / "part1-env.log").read_text()
    assert sorted(f.name for f in results.iterdir()) == ["part1-env.log", "part1-summary.txt"]
    steps = summary_steps(results / "part1-summary.txt")
    assert [(name, status.split(":")[0]) for name, _, status in steps] == [("env", "STOPPED")]
    assert "fastasam gpu-evidence part 1" in (results / "part1-env.log").read_text().splitlines()[0]
    out = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert out == ["gpu-evidence-part1.tar.gz", "part1-env.log", "part1-summary.txt"]


def test_a_driver_older_than_torchs_cuda_stops_with_the_fix(tmp_path):
    probe = "#!/bin/sh\necho 2.11.0+cu130 13.0 0 -\n"  # what torch would say: built for CUDA 13.0, no usable GPU
    env = fake_bin(tmp_path, "550.54.15", "12.4", python=probe)
    proc = evidence("part2", env=env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    log = (tmp_path / "results" / DEVICE_DIR / "part2-env.log").read_text()
    assert "the driver 550.54.15 supports CUDA 12.4, but torch 2.11.0+cu130 is built for CUDA 13.0" in log
    assert "R580 or newer" in log


# a python that answers the script's calls: torch sees one sm_90 GPU, fastasam imports from the tree, pytest and the
# benchmarks pass, fastasam._C is not built and its build fails
FAILING_BUILD = """#!/bin/sh
case "$*" in
  *device_count*) echo 2.11.0+cu130 13.0 1 9.0 ;;
  *fastasam.kernels*) exit 0 ;;
  *'import fastasam._C'*) exit 1 ;;
  *setup.py*) echo 'error: nvcc exploded' >&2; exit 1 ;;
  *'-m pytest'*) echo '3 passed' ;;
  *'-m fastasam --check'*) echo 'check: all passed' ;;
  *'-m benchmarks.step_time'*) echo 'wrote the table' ;;
  *) exit 1 ;;
esac
"""


def test_a_failed_build_leaves_out_only_what_needs_it(tmp_path):
    """Each step's log and the summary are written (and copied to OUT) as the command goes; a build that fails leaves
    out the CUDA tests alone (recorded as not run, naming the build's log): the Triton tests, the check, the step time
    and memcheck still run. Exit 1."""
    env = fake_bin(tmp_path, "580.159.03", "13.0", python=FAILING_BUILD)
    proc = evidence("part1", env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = tmp_path / "results" / DEVICE_DIR
    steps = summary_steps(results / "part1-summary.txt")
    assert [(name, status.split()[0]) for name, _, status in steps] == [
        ("env", "ok"), ("install", "ok"), ("tests-triton", "ok"), ("build", "FAILED"), ("check", "ok"),
        ("tests-cuda", "NOT"), ("step-time-resnet50-fp32", "ok"), ("memcheck", "FAILED")]
    assert all(re.fullmatch(r"cap=\d+s", cap) for _, cap, _ in steps)
    assert "fastasam._C did not build (see part1-build.log)" in dict((n, s) for n, _, s in steps)["tests-cuda"]
    assert "nvcc exploded" in (results / "part1-build.log").read_text()
    assert "compute-sanitizer is not on PATH" in (results / "part1-memcheck.log").read_text()
    assert "sources sha256" in (results / "environment.txt").read_text()
    assert all(f.read_text().startswith("# fastasam gpu-evidence part 1, step ") for f in results.glob("*.log"))
    out = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert out == ["environment.txt", "gpu-evidence-part1.tar.gz", "part1-build.log", "part1-memcheck.log",
                   "part1-summary.txt"]
    with tarfile.open(tmp_path / "out" / "gpu-evidence-part1.tar.gz") as tar:
        assert f"results/{DEVICE_DIR}/part1-summary.txt" in tar.getnames()


# --- what the step-time benchmark times -------------------------------------------------------------------------------


class Timed:
    """Whether a stub timer is inside its timed call, and the gradient assignments made inside and outside it."""

    inside = False
    counts = {"inside": 0, "outside": 0}


class CountingParameter(torch.nn.Parameter):
    """A parameter that counts the assignments to its ``grad``, inside and outside the stub timer's timed call."""

    @property
    def grad(self):
        return torch.Tensor.grad.__get__(self)

    @grad.setter
    def grad(self, g):
        Timed.counts["inside" if Timed.inside else "outside"] += 1
        torch.Tensor.grad.__set__(self, g)


def stub_clock(seconds: float):
    def clock(device):
        def timed(fn):
            Timed.inside = True
            try:
                fn()
            finally:
                Timed.inside = False
            return seconds
        return timed
    return clock


def test_the_step_time_benchmark_sets_the_gradients_outside_the_timed_call(monkeypatch):
    """A row's timed call is the optimizer step alone: the fixed gradients are assigned again before it (a GPU idles
    while 161 of them are), in the variant's untimed setup."""

    def counting_params(*args, **kwargs):
        out = []
        for name, p in make_params(*args, **kwargs):
            q = CountingParameter(p.detach().clone())
            q.grad = p.grad
            out.append((name, q))
        return out

    monkeypatch.setattr(step_time, "make_params", counting_params)
    monkeypatch.setattr(timing, "clock", stub_clock(1e-3))
    Timed.counts.update(inside=0, outside=0)
    variants = ["sgd", "asam-reference", "asam-official", "msam-auto"]
    result = step_time.run("resnet_tiny", torch.device("cpu"), torch.float32, steps=2, warmup=1, variants=variants)
    assert [r["variant"] for r in result["rows"]] == variants
    assert Timed.counts["inside"] == 0, Timed.counts
    tensors = result["tensors"]  # made (1), then before the peak-memory step, the warm-up step and each round
    assert Timed.counts["outside"] == len(variants) * tensors * (1 + 1 + 1 + 2)


def test_the_copy_probe_times_several_copies_a_call_and_reports_one(monkeypatch):
    """The bandwidth probe: one copy on a GPU is a ~70 us launch whose fixed costs would read the bandwidth low, so a
    timed call makes several (``copy_repeats``) and the row reports one."""
    assert step_time.copy_repeats(torch.device("cpu")) == 1  # a CPU copy takes milliseconds already
    assert step_time.copy_repeats(torch.device("cuda")) > 1
    monkeypatch.setattr(step_time, "copy_repeats", lambda device: 4)
    monkeypatch.setattr(timing, "clock", stub_clock(4e-3))
    result = step_time.run("resnet_tiny", torch.device("cpu"), torch.float32, steps=3, warmup=0, variants=["copy"])
    (row,) = result["rows"]
    assert row["copies_per_call"] == 4 and row["median_s"] == pytest.approx(1e-3)
    assert row["times_s"] == pytest.approx([1e-3] * 3)
    assert result["copy_GBps"] == pytest.approx(2 * result["param_bytes"] / 1e-3 / 1e9)


# --- the README's status and the GPU results --------------------------------------------------------------------------


def test_the_readme_says_not_yet_run_on_a_gpu_exactly_while_no_gpu_result_is_committed():
    """``make gpu-evidence`` writes ``benchmarks/results/gpu/<GPU name>/``; until one holds a result, the README's
    status says the GPU has not been run, and once one does, it names that folder."""
    readme = (ROOT / "README.md").read_text()
    status = readme.split("\n## Status\n", 1)[1].split("\n## ", 1)[0]
    gpu = ROOT / "benchmarks" / "results" / "gpu"
    with_results = sorted(d.name for d in gpu.glob("*") if d.is_dir() and any(d.glob("part*-summary.txt")))
    assert ("not yet run on a gpu" in status.lower()) == (not with_results), status
    for name in with_results:
        assert f"benchmarks/results/gpu/{name}" in status, status
    assert "make gpu-evidence" in status and "docs/guides/gpu-evidence.md" in status


# --- the sanitizer's small run --------------------------------------------------------------------------------------


def small_run():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_small_run", ROOT / "scripts" / "gpu_small_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sanitizer_run_steps_every_kind_msam_included_and_tells_a_mismatch(monkeypatch, capsys):
    """``scripts/gpu_small_run.py`` (what compute-sanitizer watches) runs each kind's steps, Momentum-SAM's one pass a
    step among them, on the Triton kernels (interpreted here, ``--device cpu``) against the oracle, and exits 1 when
    they differ (a perturbation planted in the oracle's MSAM)."""
    from fastasam.backends import reference

    run = small_run()
    assert {"ASAM", "GSAM", "LookSAM", "MSAM", "MSAM-plain"} <= set(run.KINDS)
    args = ["--device", "cpu", "--backends", "triton", "--kinds", "MSAM", "MSAM-plain", "--steps", "2",
            "--dtypes", "float32", "--bases", "SGD", "AdamW"]
    assert run.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("triton")]
    assert len(lines) == 4 and all(line.endswith(" ok") for line in lines), lines

    perturb = reference.msam_perturb_

    def planted(job, *a, **kw):
        out = perturb(job, *a, **kw)
        job.params[0].data.add_(1e-3)
        return out

    monkeypatch.setattr(reference, "msam_perturb_", planted)
    assert run.main(args[:7] + ["--dtypes", "float32", "--bases", "SGD"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
