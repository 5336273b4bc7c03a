"""``python -m fastasam``: the report names versions, devices, every backend (available or why not, with the fix),
what ``auto`` picks, and the extensions; ``--check`` compares every available backend with the oracle and fails
(exit 1) when one disagrees or raises."""

from __future__ import annotations

import subprocess
import sys

import torch

from fastasam import __main__ as cli
from fastasam import backends


def test_report_names_everything_a_user_needs():
    proc = subprocess.run([sys.executable, "-m", "fastasam"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch    {torch.__version__}" in out and "triton   " in out and "supported >=3.6,<4" in out
    assert "fastasam._C " in out and "fastasam._host " in out
    assert "cpu (CPU): auto -> " in out
    for name in backends.names():
        if name not in ("auto", "cuda_shim"):
            assert f"    {name} " in out
    assert "cuda_shim" not in out  # a test backend (tests/conftest.py registers it), not one of the product's
    if torch.version.cuda is None:
        assert "triton     no: Triton kernels run on CUDA/ROCm GPUs" in out or "triton     available" in out


def test_check_passes_here_and_fails_on_a_wrong_or_crashing_backend(monkeypatch, capsys):
    assert cli.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "check: all passed" in out
    for kind in ("ASAM", "GSAM", "LookSAM", "MSAM"):  # every variant, on every backend here
        assert f"pass  foreach  cpu      torch.float32   {kind}" in out
    real = cli._steps

    def wrong(backend, device, dtype, kind):
        out = real(backend, device, dtype, kind)
        if backend == "foreach" and kind == "GSAM":
            out[1] = out[1] + 1e-3  # a planted error of 1e-3 in one tensor of one variant
        return out

    monkeypatch.setattr(cli, "_steps", wrong)
    assert cli.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  foreach  cpu      torch.float32   GSAM" in out and "check: FAILED" in out
    assert "pass  foreach  cpu      torch.float32   ASAM" in out

    def crash(backend, device, dtype, kind):
        if backend == "foreach":
            raise RuntimeError("planted")
        return real(backend, device, dtype, kind)

    monkeypatch.setattr(cli, "_steps", crash)
    assert cli.main(["--check"]) == 1
    assert "RuntimeError: planted" in capsys.readouterr().out
