"""The package installs without torch in its build requirements and lays out kernels/ as fastasam.kernels."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src") / "fastasam"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                            ".pytest_cache", ".benchmarks", "results"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out), str(src)],
        check=True,
    )
    (path,) = out.glob("fastasam-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_layout(wheel):
    names = set(wheel.namelist())
    assert "fastasam/py.typed" in names
    assert "fastasam/kernels/__init__.py" in names
    assert "fastasam/backends/foreach.py" in names and "fastasam/reference.py" in names
    tops = {n.split("/")[0] for n in names}
    assert not any(t in ("kernels", "tests", "benchmarks") for t in tops), tops


def test_wheel_requires_torch_only_at_run_time(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    requires = [line for line in wheel.read(meta).decode().splitlines() if line.startswith("Requires-Dist")]
    assert any(r.startswith("Requires-Dist: torch") for r in requires)


def test_build_system_does_not_pull_torch():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[build-system]")[1].split("\n[")[0]
    assert "torch" not in section.split("requires")[1].split("\n")[0]


def test_installed_kernels_package_is_namespaced():
    import fastasam.kernels

    assert Path(fastasam.kernels.__file__).parent.name == "kernels"
    assert fastasam.kernels.__name__ == "fastasam.kernels"
