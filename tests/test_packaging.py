"""The package installs without torch in its build requirements and lays out kernels/ as fastasam.kernels."""

from __future__ import annotations

import os
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
                                                            ".pytest_cache", ".benchmarks", "results", "*.so"))
    out = tmp_path_factory.mktemp("wheel")
    # FASTASAM_BUILD_HOST=0: the layout is the point here, and the C++ build takes a minute on 2 cores (it is built
    # in place by `make setup`, which test_watch.py checks, and its failure path is tested below)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out), str(src)],
        check=True, env={**os.environ, "FASTASAM_BUILD_HOST": "0", "FASTASAM_BUILD_CUDA": "0"},
    )
    (path,) = out.glob("fastasam-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_layout(wheel):
    names = set(wheel.namelist())
    assert "fastasam/py.typed" in names
    assert "fastasam/kernels/__init__.py" in names
    assert "fastasam/backends/foreach.py" in names and "fastasam/reference.py" in names
    tops = {n.split("/")[0] for n in names}
    assert not any(t in ("kernels", "tests", "benchmarks", "csrc") for t in tops), tops
    # the CUDA sources ship inside the package: the just-in-time build and the CPU shim compile them from there
    for src in ("binding.cpp", "multi_tensor.cu", "multi_tensor.h", "cpu_shim/fa_cuda_shim.cpp",
                "cpu_shim/fa_cuda_shim.h", "cpu_shim/kernels.cpp", "cpu_shim/cuda_runtime.h"):
        assert f"fastasam/csrc/{src}" in names, src


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


def _setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastasam_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_finds_the_cuda_toolkit_behind_a_wrapper(tmp_path):
    """CUDA_HOME when set; else nvcc's ``..`` following links, when it has include/cuda_runtime.h; a wrapper script
    whose folder has no headers is passed over (PyTorch's own guess would take it)."""
    setup = _setup_module()
    assert setup.find_cuda_home({"CUDA_HOME": "/opt/my-cuda", "PATH": ""}) == "/opt/my-cuda"
    real = tmp_path / "cuda-13.0"
    (real / "bin").mkdir(parents=True)
    (real / "include").mkdir()
    (real / "include" / "cuda_runtime.h").write_text("")
    (real / "bin" / "nvcc").write_text("#!/bin/sh\n")
    links = tmp_path / "links" / "bin"
    links.mkdir(parents=True)
    (links / "nvcc").symlink_to(real / "bin" / "nvcc")
    assert setup.find_cuda_home({"PATH": str(links)}) == str(real)
    wrapper = tmp_path / "wrapper" / "bin"
    wrapper.mkdir(parents=True)
    (wrapper / "nvcc").write_text("#!/bin/sh\nexec /somewhere/nvcc \"$@\"\n")
    found = setup.find_cuda_home({"PATH": str(wrapper)})
    assert found != str(wrapper.parent)
    assert found is None or (Path(found) / "include" / "cuda_runtime.h").is_file()


def test_setup_host_extension_flags():
    setup = _setup_module()
    assert setup.host_build_decision({"FASTASAM_BUILD_HOST": "0"}) == (False, "FASTASAM_BUILD_HOST=0")
    assert setup.host_build_decision({})[0] and setup.host_build_decision({"FASTASAM_BUILD_HOST": "1"})[0]


@pytest.mark.parametrize("flag", ["", "1"])
def test_a_failed_automatic_build_says_why_and_installs_without_it(tmp_path, flag):
    """A planted compile error in csrc/host.cpp: with the flag unset the build says why and succeeds without the
    extension; FASTASAM_BUILD_HOST=1 fails."""
    for name in ("setup.py", "README.md", "fastasam/__init__.py", "fastasam/_toolchain.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "host.cpp").write_text("#error planted: this extension does not compile\n")
    env = {**os.environ, "FASTASAM_BUILD_CUDA": "0", "FASTASAM_BUILD_HOST": flag, "MAX_JOBS": "1"}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "planted" in out
    if flag:
        assert proc.returncode != 0
    else:
        assert proc.returncode == 0, out
        assert "building fastasam._host failed" in out and "installing without it" in out
        assert not list(tmp_path.glob("fastasam/_host*.so"))
