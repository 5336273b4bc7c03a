"""The front page and the documentation site stay what they promise: a short README that starts with the two
commands, a site whose every page exists, no commit hashes or development wording in the prose, and an
environment-variable table that matches the code (every name it lists is read somewhere, every name the package
reads is listed).

Each check is a function that returns the problems it finds under a root folder; the tests run them on the
repository (no problem allowed) and on a planted copy (each problem found)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 160
COMMANDS_WITHIN = 10  # `make bench` and `make test` must appear in the README's first lines

# a commit-hash-looking token: 7 to 40 hex digits with at least one digit and one letter (plain numbers and words
# such as "defaced" are not hashes)
HASH = re.compile(r"(?<![0-9A-Za-z_])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![0-9A-Za-z_])")
WORDS = re.compile(r"\bS(?:PEC)\b|\bsessions?\b", re.IGNORECASE)  # an outside document; process words

# how the code reads an environment variable: os.environ / os.getenv / an ``env`` mapping built from os.environ
ENV_READ = re.compile(
    r"(?:os\.environ(?:\.get|\.setdefault|\.pop)?|os\.getenv|\benv(?:\.get)?)\s*[\(\[]\s*[\"']([A-Z_][A-Z0-9_]*)[\"']"
)
# where the code that may read an environment variable lives, and how each kind of file names one
CODE_GLOBS = ("fastasam/**/*.py", "kernels/*.py", "benchmarks/*.py", "setup.py", "tests/conftest.py", "scripts/*.sh",
              "csrc/*.sh", "Makefile", ".ci/run")


def _docs_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def readme_problems(root: Path) -> list[str]:
    lines = (root / "README.md").read_text(encoding="utf-8").splitlines()
    problems = []
    if len(lines) > README_MAX_LINES:
        problems.append(f"README.md has {len(lines)} lines (at most {README_MAX_LINES})")
    head = "\n".join(lines[:COMMANDS_WITHIN])
    for command in ("make bench", "make test"):
        if command not in head:
            problems.append(f"README.md's first {COMMANDS_WITHIN} lines lack `{command}`")
    return problems


def nav_pages(root: Path) -> list[str]:
    """The .md files mkdocs.yml's nav lists (read without a YAML parser: one ``- [Title: ]page.md`` per line)."""
    text = (root / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text.split("\nnav:", 1)[1]
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE)


def nav_problems(root: Path) -> list[str]:
    pages = nav_pages(root)
    problems = [] if pages else ["mkdocs.yml's nav lists no page"]
    return problems + [f"mkdocs.yml's nav lists docs/{p}, which does not exist"
                       for p in pages if not (root / "docs" / p).is_file()]


def wording_problems(root: Path) -> list[str]:
    problems = []
    for path in _docs_files(root):
        rel = path.relative_to(root)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in HASH.finditer(line):
                problems.append(f"{rel}:{n}: a commit-hash-looking token {m.group()!r}")
            for m in WORDS.finditer(line):
                problems.append(f"{rel}:{n}: the word {m.group()!r}")
    return problems


def env_table(root: Path) -> set[str]:
    """The names in the first column of docs/reference/environment.md's table."""
    names: set[str] = set()
    for line in (root / "docs" / "reference" / "environment.md").read_text(encoding="utf-8").splitlines():
        cells = line.split("|")
        if len(cells) > 2 and line.startswith("|") and "`" in cells[1]:
            names.update(re.findall(r"`([A-Z_][A-Z0-9_]*)`", cells[1]))
    return names


def _code(root: Path) -> dict[Path, str]:
    files = {p for pattern in CODE_GLOBS for p in root.glob(pattern) if p.is_file()}
    return {p: p.read_text(encoding="utf-8", errors="replace") for p in sorted(files)}


def _names_in_code(root: Path) -> set[str]:
    """Every name the code could read from the environment: a quoted string in Python, ``$NAME`` / ``${NAME`` in
    shell, ``NAME ?=`` in the Makefile."""
    found: set[str] = set()
    for path, text in _code(root).items():
        if path.suffix == ".py":
            found.update(re.findall(r"[\"']([A-Z_][A-Z0-9_]*)[\"']", text))
        elif path.name == "Makefile":
            found.update(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*\?=", text, flags=re.MULTILINE))
            found.update(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", text))
        else:
            found.update(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", text))
    return found


def env_problems(root: Path) -> list[str]:
    table = env_table(root)
    problems = [] if table else ["docs/reference/environment.md has no table of variables"]
    in_code = _names_in_code(root)
    problems += [f"docs/reference/environment.md lists {name}, which no code reads" for name in sorted(table - in_code)]
    read = set()
    for path in sorted((root / "fastasam").rglob("*.py")):
        read.update(ENV_READ.findall(path.read_text(encoding="utf-8")))
    problems += [f"fastasam/ reads {name}, which docs/reference/environment.md does not list"
                 for name in sorted(read - table)]
    return problems


# --- the repository ------------------------------------------------------------------------------------------------


def test_readme_is_short_and_starts_with_the_two_commands():
    assert readme_problems(ROOT) == []


def test_every_page_in_the_nav_exists():
    assert nav_problems(ROOT) == []


def test_no_commit_hashes_or_development_wording_in_the_docs():
    assert wording_problems(ROOT) == []


def test_environment_table_matches_the_code():
    assert env_problems(ROOT) == []


# --- each check finds what is planted ------------------------------------------------------------------------------


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A copy of what the checks read."""
    for name in ("README.md", "mkdocs.yml", "setup.py", "Makefile"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("docs", "fastasam", "kernels", "benchmarks", "scripts", "csrc"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "results", "cpu_shim"))
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    for check in (readme_problems, nav_problems, wording_problems, env_problems):
        assert check(tmp_path) == [], check.__name__
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_a_long_readme_or_one_without_the_commands_is_found(planted):
    readme = planted / "README.md"
    lines = readme.read_text(encoding="utf-8").splitlines()
    readme.write_text("\n".join(lines + ["filler"] * (README_MAX_LINES + 1 - len(lines))) + "\n", encoding="utf-8")
    assert readme_problems(planted) == [f"README.md has {README_MAX_LINES + 1} lines (at most {README_MAX_LINES})"]
    readme.write_text("# fastasam\n" + "\n" * COMMANDS_WITHIN + "\n".join(lines), encoding="utf-8")
    assert readme_problems(planted) == [f"README.md's first {COMMANDS_WITHIN} lines lack `make bench`",
                                        f"README.md's first {COMMANDS_WITHIN} lines lack `make test`"]


def test_a_missing_nav_page_is_found(planted):
    (planted / "docs" / "guides" / "variants.md").unlink()
    assert nav_problems(planted) == ["mkdocs.yml's nav lists docs/guides/variants.md, which does not exist"]


@pytest.mark.parametrize("line, token", [
    ("measured at 7c4754f on the CPU", "'7c4754f'"),
    ("before 6070b6c2e4b1a9f0c3d5e7f9a1b3c5d7e9f1a3b5 changed it", "'6070b6c2e4b1a9f0c3d5e7f9a1b3c5d7e9f1a3b5'"),
    ("as " + "SP" + "EC section 3 says", "'" + "SP" + "EC'"),
    ("in this session", "'session'"),
])
def test_a_hash_or_development_wording_is_found(planted, line, token):
    page = planted / "docs" / "design" / "kernels.md"
    with page.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    (problem,) = wording_problems(planted)
    assert problem.startswith("docs/design/kernels.md:") and problem.endswith(token)


def test_plain_numbers_and_hex_words_are_not_hashes():
    assert not HASH.search("25557032 elements, 2026-11-22, defaced, 0.00274x, sm_80, fp16x2, 1e-12")


def test_an_unlisted_or_unread_variable_is_found(planted):
    _edit(planted / "docs" / "reference" / "environment.md", "| `FASTASAM_HOST` |", "| `FASTASAM_HOSTS` |")
    assert env_problems(planted) == [
        "docs/reference/environment.md lists FASTASAM_HOSTS, which no code reads",
        "fastasam/ reads FASTASAM_HOST, which docs/reference/environment.md does not list",
    ]
    _edit(planted / "docs" / "reference" / "environment.md", "| `FASTASAM_HOSTS` |", "| `FASTASAM_HOST` |")
    with (planted / "fastasam" / "utils.py").open("a", encoding="utf-8") as f:
        f.write('\nimport os\nNEW = os.environ.get("FASTASAM_SOMETHING_NEW")\n')
    assert env_problems(planted) == [
        "fastasam/ reads FASTASAM_SOMETHING_NEW, which docs/reference/environment.md does not list"]
