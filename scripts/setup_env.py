"""``make setup``: torch when it is missing, then fastasam (editable, from this checkout) with its extras; the C++
extensions are built once per Python environment and again only when what they are built from changes.

    python scripts/setup_env.py --torch 'torch==2.13.0' --extras test,bench
    python scripts/setup_env.py --extras docs --requirements-only      # make docs: mkdocs alone, no torch

Standard library only (it runs before torch is there). A build is recorded in ``build/setup/<environment>.json``:
the interpreter, the torch version the extensions were built against and a hash of every file the build reads
(``setup.py``, ``pyproject.toml``, ``fastasam/_toolchain.py``, ``csrc/``). The package is installed and built again
only when it is not installed from this checkout in this environment, or that record differs; an extra's missing
requirements are installed by themselves (the extras' lists: ``EXTRAS`` in ``setup.py``, read without running it).
Each step says what it does and why, with a line every 30 seconds while pip works; a run with nothing to do says so
in one line.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("setup.py", "pyproject.toml", "fastasam/_toolchain.py")  # with every file under csrc/
BUILD_FOLDERS = ("csrc",)
PLATFORM = {"linux": "Linux", "darwin": "Darwin", "win32": "Windows"}.get(sys.platform, sys.platform)


def say(text: str) -> None:
    print(f"fastasam setup: {text}", flush=True)


def sources_hash() -> str:
    """A hash of every file the package's build reads."""
    h = hashlib.sha256()
    files = [ROOT / f for f in BUILD_INPUTS]
    for folder in BUILD_FOLDERS:
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def record_path() -> Path:
    env = hashlib.sha256(f"{Path(sys.executable).resolve()}\0{sys.prefix}".encode()).hexdigest()[:16]
    return ROOT / "build" / "setup" / f"{env}.json"


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def installed_from_here() -> bool:
    """fastasam is installed in this environment, editable, from this checkout."""
    try:
        text = metadata.distribution("fastasam").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return False
    info = json.loads(text or "{}")
    url = info.get("url", "")
    if not (info.get("dir_info", {}).get("editable") and url.startswith("file://")):
        return False
    return Path(unquote(url.removeprefix("file://"))).resolve() == ROOT


def extras_requirements(extras: list[str]) -> list[str]:
    """The requirements of ``extras`` from ``setup.py``'s ``EXTRAS`` literal, those for another platform left out."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    table = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "EXTRAS" for t in node.targets))
    unknown = sorted(set(extras) - set(table))
    if unknown:
        raise SystemExit(f"fastasam setup: unknown extra(s) {unknown}; setup.py's EXTRAS has {sorted(table)}")
    out = []
    for extra in extras:
        for req in table[extra]:
            system = re.search(r"platform_system\s*==\s*['\"](\w+)['\"]", req.partition(";")[2])
            if system is None or system.group(1) == PLATFORM:
                out.append(req)
    return list(dict.fromkeys(out))


def requirement_name(req: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", req.strip()).group(0)


def missing(requirements: list[str]) -> list[str]:
    return [r for r in requirements if installed_version(requirement_name(r)) is None]


def run_pip(args: list[str], what: str) -> None:
    """``python -m pip args``, saying ``what`` first and printing a line every 30 seconds while it runs; exits with
    pip's status when it fails."""
    say(what)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pip", *args])
    done = threading.Event()

    def progress() -> None:
        while not done.wait(30):
            say(f"  still working ({time.monotonic() - t0:.0f} s)")

    threading.Thread(target=progress, daemon=True).start()
    code = proc.wait()
    done.set()
    if code != 0:
        say(f"pip failed (exit status {code}): pip {' '.join(args)}")
        sys.exit(code)
    say(f"  done in {time.monotonic() - t0:.0f} s")


def why_build(before: dict | None, record: dict) -> str | None:
    """Why the package must be installed and its extensions built again (None: it need not)."""
    if not installed_from_here():
        return f"fastasam is not installed from {ROOT} in this environment ({sys.prefix})"
    if before is None:
        return "no record of an extension build in this environment"
    if before.get("torch") != record["torch"]:
        return f"torch changed ({before.get('torch')} -> {record['torch']})"
    if before.get("sources") != record["sources"]:
        return "the C++/CUDA sources or the build files changed"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", default="torch==2.13.0", help="what to install when torch is missing")
    parser.add_argument("--extras", default="test,bench", help="fastasam's extras, comma-separated")
    parser.add_argument("--requirements-only", action="store_true",
                        help="install the extras' missing requirements only (no torch, no fastasam)")
    parser.add_argument("--force", action="store_true", help="install and build again even when up to date")
    args = parser.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    requirements = extras_requirements(extras)

    if args.requirements_only:
        todo = missing(requirements)
        if todo:
            run_pip(["install", "-q", *todo], f"installing {', '.join(todo)} (the {args.extras} extra)")
        else:
            say(f"the {args.extras} extra's requirements are installed: nothing to do")
        return 0

    if installed_version("torch") is None:
        run_pip(["install", "-q", args.torch], f"installing {args.torch} (torch is not installed in {sys.prefix})")
    record = {"python": str(Path(sys.executable).resolve()), "prefix": sys.prefix,
              "torch": installed_version("torch"), "sources": sources_hash()}
    where = record_path()
    try:
        before = json.loads(where.read_text())
    except (OSError, ValueError):
        before = None
    why = "--force" if args.force else why_build(before, record)
    if why is not None:
        spec = f".[{','.join(extras)}]" if extras else "."
        where.unlink(missing_ok=True)
        run_pip(["install", "-q", "--no-build-isolation", "-e", spec],
                f"{why}: installing fastasam{spec[1:]} (editable) and building its C++ extensions (about 3 minutes "
                "on 2 cores; set FASTASAM_BUILD_HOST=0 to skip them)")
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(json.dumps(record, indent=1) + "\n")
        return 0
    todo = missing(requirements)
    if todo:
        run_pip(["install", "-q", *todo], f"installing {', '.join(todo)} (the {args.extras} extras' requirements; "
                                          "fastasam itself is up to date)")
        return 0
    say(f"fastasam is installed from {ROOT}, its extensions built for torch {record['torch']} and unchanged, the "
        f"{args.extras} extras' requirements present: nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
