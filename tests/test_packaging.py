"""The package installs without torch in its build requirements and lays out kernels/ as fastasam.kernels; a plain
wheel install imports what the checkout does; every backend's module is named after it; and every repository path that
a comment, docstring or documentation page names exists."""

from __future__ import annotations

import ast
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_BACKENDS = ("reference", "foreach", "cpu", "triton", "cuda")  # the registry's, in order


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src") / "fastasam"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                            ".pytest_cache", ".benchmarks", "results", "*.so",
                                                            ".venv", ".ruff_cache", ".whl", "runs", "site"))
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
    # every backend's module is named after it; the test backend ships under fastasam.testing, outside the registry's
    for backend in PRODUCT_BACKENDS:
        assert f"fastasam/backends/{backend}.py" in names, backend
    assert "fastasam/testing/__init__.py" in names and "fastasam/testing/cuda_shim.py" in names
    assert "fastasam/reference.py" not in names and "fastasam/backends/cuda_shim.py" not in names
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


# --- a plain (non-editable) wheel install ----------------------------------------------------------------------------

_INSTALLED = """
import importlib.util, sys, sysconfig
from pathlib import Path

# this interpreter's editable install of fastasam, if any, must not serve what the wheel lacks
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]

import fastasam, fastasam.kernels, fastasam.testing
from fastasam import backends
from fastasam.testing import cuda_shim

site = Path(sysconfig.get_paths()["purelib"]).resolve()
for module in (fastasam, fastasam.kernels, fastasam.testing, cuda_shim):
    assert Path(module.__file__).resolve().is_relative_to(site), (module.__name__, module.__file__, site)
assert (Path(fastasam.kernels.__file__).parent / "multi_tensor.py").is_file()
# the shim compiles the sources installed with the package
assert cuda_shim.CSRC is not None and cuda_shim.CSRC.resolve().is_relative_to(site), cuda_shim.CSRC
assert (cuda_shim.CSRC / "multi_tensor.cu").is_file()
assert "cuda_shim" not in backends.names()
cuda_shim.register()
assert backends.names()[-1] == "cuda_shim"
if importlib.util.find_spec("triton") is not None:
    from fastasam.kernels import multi_tensor
    assert Path(multi_tensor.__file__).resolve().is_relative_to(site)
    print("kernels imported")
else:
    print("kernels installed; triton is not importable here")
"""


def _borrow_packages(python: Path) -> None:
    """Make this interpreter's installed packages (torch, triton, pip) importable in the new environment of
    ``python``, after its own: a ``.pth`` file naming this interpreter's site directories. (``venv
    --system-site-packages`` would borrow the base interpreter's instead, which has no torch when this one is itself
    a virtual environment.) The ``.pth`` files of the borrowed directories are not run, so this interpreter's
    editable install of fastasam does not follow."""
    import site
    import sysconfig

    theirs = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                          *site.getsitepackages()])
    (Path(theirs) / "_borrowed.pth").write_text("".join(f"{p}\n" for p in ours if Path(p).is_dir()))


def test_a_plain_wheel_install_imports_the_kernels_and_the_test_helpers(wheel, tmp_path):
    """The wheel installed (no editable finder, no source tree) into a venv that borrows this interpreter's packages:
    ``fastasam.kernels.multi_tensor`` (where triton imports) and ``fastasam.testing`` import from the install."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    _borrow_packages(python)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel.filename], check=True,
                   timeout=120)
    outside = tmp_path / "elsewhere"  # the working folder: not the checkout
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", _INSTALLED], cwd=outside, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    triton_here = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode == 0
    assert ("kernels imported" if triton_here else "kernels installed") in proc.stdout, proc.stdout


# --- source layout = import layout ---------------------------------------------------------------------------------


def test_each_backend_module_is_named_after_its_backend_and_the_test_backend_is_not_registered():
    """In a fresh process (this one's conftest registered ``cuda_shim``): the product registry lists the five backends,
    each in ``fastasam.backends.<name>``, and ``import fastasam`` loads nothing from ``fastasam.testing``."""
    code = ("import sys, fastasam; from fastasam import backends; "
            "print([(s.name, s.module) for s in backends._REGISTRY.values()]); "
            "print(sorted(m for m in sys.modules if m.startswith('fastasam.testing')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    registry, testing = proc.stdout.strip().splitlines()[-2:]
    assert ast.literal_eval(registry) == [(b, f"fastasam.backends.{b}") for b in PRODUCT_BACKENDS]
    assert ast.literal_eval(testing) == []
    public = sorted(p.stem for p in (ROOT / "fastasam" / "backends").glob("*.py") if not p.stem.startswith("_"))
    assert public == sorted(PRODUCT_BACKENDS)  # no module of another naming scheme beside them
    assert not (ROOT / "fastasam" / "reference.py").exists()


# --- every repository path named in prose exists -------------------------------------------------------------------

# a repository path: a top-level folder, then folders and a file of a source or documentation kind
POINTER = re.compile(r"(?<![\w./-])((?:fastasam|kernels|csrc|benchmarks|tests|scripts)/[\w/-]+\.(?:py|h|cpp|cu|sh|md))"
                     r"(?![\w])")
INSTALLED_AS = re.compile(r"^fastasam/(kernels|csrc)/")  # the folders installed as fastasam.kernels, fastasam.csrc
# the code whose comments and docstrings are read, and the documentation, whose prose is read (not its link targets)
PYTHON_GLOBS = ("fastasam/**/*.py", "kernels/**/*.py", "benchmarks/**/*.py", "tests/**/*.py", "scripts/*.py",
                "setup.py")
C_GLOBS = ("csrc/**/*.h", "csrc/**/*.cpp", "csrc/**/*.cu")
SHELL_GLOBS = ("scripts/*.sh", "csrc/**/*.sh", "Makefile", ".ci/run")
DOC_GLOBS = ("README.md", "docs/**/*.md")
C_TOKEN = re.compile(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'", re.DOTALL)


def _python_prose(text: str) -> Iterator[tuple[int, str]]:
    """(line, text) of each comment and of each string that stands alone as a statement (docstrings)."""
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for i, line in enumerate(node.value.value.splitlines()):
                yield node.lineno + i, line


def _c_prose(text: str) -> Iterator[tuple[int, str]]:
    for m in C_TOKEN.finditer(text):
        if m.group().startswith("/"):
            for i, line in enumerate(m.group().splitlines()):
                yield text.count("\n", 0, m.start()) + 1 + i, line


def _shell_prose(text: str) -> Iterator[tuple[int, str]]:
    for n, line in enumerate(text.splitlines(), 1):
        m = re.search(r"(?:^|\s)(#.*)$", line)
        if m:
            yield n, m.group(1)


def _doc_prose(text: str) -> Iterator[tuple[int, str]]:
    for n, line in enumerate(text.splitlines(), 1):
        yield n, re.sub(r"\]\([^)]*\)", "]", line)  # a link's target is relative to its page


def stale_pointers(root: Path) -> list[str]:
    """``file:line: <path>`` for each repository path named in a comment, docstring or documentation page under
    ``root`` that does not exist there (under its source path or, for ``fastasam/kernels`` and ``fastasam/csrc``, the
    folder installed as it)."""
    problems = []
    for globs, prose in ((PYTHON_GLOBS, _python_prose), (C_GLOBS, _c_prose), (SHELL_GLOBS, _shell_prose),
                         (DOC_GLOBS, _doc_prose)):
        files = sorted({p for g in globs for p in root.glob(g) if p.is_file() and "__pycache__" not in p.parts})
        for path in files:
            rel = path.relative_to(root)
            for n, line in prose(path.read_text(encoding="utf-8")):
                for m in POINTER.finditer(line):
                    named = m.group(1)
                    if not ((root / named).exists() or (root / INSTALLED_AS.sub(r"\1/", named)).exists()):
                        problems.append(f"{rel}:{n}: {named}, which does not exist")
    return problems


def test_every_repository_path_named_in_comments_docstrings_and_docs_exists():
    assert stale_pointers(ROOT) == []


@pytest.fixture
def copy_of_the_tree(tmp_path: Path) -> Path:
    """The files the check reads, copied."""
    for name in ("setup.py", "Makefile", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("fastasam", "kernels", "csrc", "benchmarks", "tests", "scripts", "docs", ".ci"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    assert stale_pointers(tmp_path) == []
    return tmp_path


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(text)


@pytest.mark.parametrize("file, planted, line_of", [
    ("kernels/multi_tensor.py", "\n# the tables: kernels/_tables.py\n", "# the tables"),
    ("fastasam/backends/_updates.py", '\n\ndef _planted():\n    """Reads\n    fastasam/_tables.py."""\n',
     "fastasam/_tables"),
    ("csrc/multi_tensor.h", "\n/* the layout:\n   csrc/layout.h */\n", "csrc/layout.h"),
    ("csrc/binding.cpp", '\nconst char* s = "//"; // see fastasam/backends/cuda_backend.py\n', "cuda_backend"),
    ("scripts/gpu_stack.sh", "\n# runs tests/test_gone.py\n", "# runs"),
    ("docs/design/map.md", "\n| `fastasam/backends/cuda_shim.py` | gone |\n", "cuda_shim.py` | gone"),
])
def test_a_planted_stale_pointer_is_found_with_its_place(copy_of_the_tree, file, planted, line_of):
    path = copy_of_the_tree / file
    _append(path, planted)
    (problem,) = stale_pointers(copy_of_the_tree)
    lines = path.read_text(encoding="utf-8").splitlines()
    n = next(i for i, line in enumerate(lines, 1) if line_of in line)
    named = POINTER.search(planted).group(1)
    assert problem == f"{file}:{n}: {named}, which does not exist"


def test_a_planted_moved_file_leaves_its_pointers_stale(copy_of_the_tree):
    """A file moved without its pointers: every comment that names it is found (csrc/multi_tensor.h names the tables'
    layout)."""
    (copy_of_the_tree / "fastasam" / "backends" / "_layout.py").rename(copy_of_the_tree / "fastasam" / "_layout.py")
    problems = stale_pointers(copy_of_the_tree)
    assert problems and all(p.endswith(": fastasam/backends/_layout.py, which does not exist") for p in problems)
    assert any(p.startswith("csrc/multi_tensor.h:") for p in problems), problems


def test_strings_in_code_and_link_targets_are_not_pointers(copy_of_the_tree):
    """What a test writes into a temporary folder and a page's relative link name no repository path."""
    _append(copy_of_the_tree / "tests" / "conftest.py", '\nPLANTED = "fastasam/not_here.py"\n')
    _append(copy_of_the_tree / "docs" / "index.md", "\nSee [the results](benchmarks/not_here.md).\n")
    assert stale_pointers(copy_of_the_tree) == []


# --- the checkout never hides an installed package --------------------------------------------------------------------


def test_the_checkouts_kernels_folder_does_not_hide_an_installed_kernels_package(tmp_path):
    """Run from the checkout's root (its folder first on ``sys.path``, as ``python -m``/``-c`` and the test runner
    put it): ``import kernels`` gets the installed package of that name (here a stand-in with the attribute
    ``transformers`` imports from Hugging Face's), and ``fastasam.kernels``, ``fastasam.hf`` and ``transformers``
    import beside it."""
    standin = tmp_path / "site" / "kernels"
    standin.mkdir(parents=True)
    (standin / "__init__.py").write_text("CUDAProperties = 'the installed kernels package'\n")
    (standin / "layers.py").write_text("WHERE = 'the installed kernels package'\n")
    code = ("import kernels, kernels.layers, fastasam.kernels; "
            "assert kernels.CUDAProperties == kernels.layers.WHERE == 'the installed kernels package', kernels; "
            "assert fastasam.kernels.__name__ == 'fastasam.kernels'; "
            "import importlib.util; assert importlib.util.find_spec('triton') is None or "
            "__import__('fastasam.kernels.multi_tensor'); print('ok')")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
    # the real packages where they are installed (transformers 5 imports Hugging Face's kernels)
    env["PYTHONPATH"] = ""
    code = "import fastasam.hf, transformers, kernels; print(kernels.__file__)"
    if importlib.util.find_spec("transformers") is not None:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert Path(proc.stdout.strip().splitlines()[-1]).parent != ROOT / "kernels"
    # with no package of that name installed, the folder imported as a top-level name stays an empty module
    code = "import kernels; print(sorted(n for n in vars(kernels) if not n.startswith('__')))"
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
