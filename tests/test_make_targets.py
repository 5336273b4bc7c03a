"""What `make test` and `make bench` do for a newcomer: the memory tier of the tests, the benchmark suite's results
folder and progress lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import timing

ROOT = Path(__file__).resolve().parents[1]


def _collected(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr  # 5: nothing selected
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_the_tests_that_need_16_gb_are_left_out_by_default_and_run_with_bigmem():
    """The CPU case of the 2^31-element test (16 GB of host memory) is in the bigmem tier: `make test` leaves it out,
    `make test-bigmem` (pytest -m bigmem) runs it; the GPU cases (device memory) stay in the default run."""
    huge = "tests/test_optim.py::test_a_tensor_of_more_than_2_31_elements"
    default = _collected("tests/test_optim.py", "-k", "more_than_2_31")
    assert f"{huge}[foreach-cpu]" not in default
    assert _collected("tests/test_optim.py", "-k", "more_than_2_31", "-m", "bigmem") == [f"{huge}[foreach-cpu]"]


def test_interleave_progress_says_what_a_round_times_per_step(capsys):
    """The progress line names what a round times, and a variant that makes several steps a call is shown per step,
    as its table row is."""
    times = timing.interleave([("one", lambda: 0.002), ("every5", lambda: 0.010)], rounds=1,
                              what="one training step of each variant; every5: 5 steps", per_call={"every5": 5})
    assert times == {"one": [0.002], "every5": [0.010]}  # the measurements themselves stay per call
    line = capsys.readouterr().out.strip()
    assert line == ("round 1/1 (one training step of each variant; every5: 5 steps); medians per step so far: "
                    "one 2.00 ms, every5 2.00 ms")


def test_the_suite_writes_untracked_results_unless_asked_to_update_the_committed_ones(monkeypatch, tmp_path, capsys):
    import benchmarks.__main__ as suite
    from benchmarks import e2e, host_overhead, step_time

    committed, local = tmp_path / "results", tmp_path / "results" / "local"
    monkeypatch.setattr(step_time, "RESULTS", committed)
    monkeypatch.setattr(suite, "LOCAL", local, raising=False)
    small = {"step_time": [], "steps": 1, "warmup": 0, "variants": None, "host": {"param_sets": [], "steps": 2},
             "e2e": {"steps": 1}}
    monkeypatch.setattr(suite, "plan", lambda device, smoke: small)  # the parts themselves are tested elsewhere
    monkeypatch.setattr(host_overhead, "markdown", lambda results, env: "host\n")
    monkeypatch.setattr(host_overhead, "panel", lambda results, title: ("host panel", results))
    monkeypatch.setattr(e2e, "run", lambda device, **kw: {"param_set": "p training step", "arch": "p", "batch": 1,
                                                          "image_size": 1, "amp": "none", "rows": []})
    monkeypatch.setattr(e2e, "markdown", lambda result, env: "e2e\n")
    monkeypatch.setattr(e2e, "panel", lambda result, title: ("e2e panel", result))
    figures = []
    monkeypatch.setattr(step_time, "figure", lambda panels, path: figures.append(panels) and False)

    suite.main(["--device", "cpu"])
    assert sorted(p.name for p in local.iterdir()) == ["suite-cpu.json", "suite-cpu.md"]
    assert [name for name, _ in figures[0]] == ["host panel", "e2e panel"]  # a panel per table, host work included
    assert (local / "suite-cpu.md").read_text().endswith("host\n\ne2e\n")
    assert not (committed / "suite-cpu.json").exists()
    out = capsys.readouterr().out
    assert "[1/2] host work of a warm step (CPU, launches made no-ops): 2 rounds per parameter set" in out
    assert "[2/2] end-to-end training step: 1 rounds, each one training step of every variant" in out
    assert f"wrote {local / 'suite-cpu'}.json, .md (untracked; --update-results" in out

    suite.main(["--device", "cpu", "--update-results"])
    assert json.loads((committed / "suite-cpu.json").read_text())["results"][0]["batch"] == 1


def test_every_test_named_slow_exists_and_the_default_tier_leaves_the_slow_ones_out():
    """conftest.SLOW_TESTS names existing tests (a rename would put a slow test back in the default tier
    silently); `make test`'s selection leaves out each of them and every interpreted triton case, and keeps the
    other backends' oracle comparisons."""
    import conftest

    every = _collected()
    names = {line.split("[")[0] for line in every}
    stale = sorted(t for t in conftest.SLOW_TESTS if f"tests/{t}" not in names)
    assert not stale, stale
    default = set(_collected("-m", "not bigmem and not slow"))
    assert not any(line.split("[")[0].removeprefix("tests/") in conftest.SLOW_TESTS for line in default)
    if not __import__("torch").cuda.is_available():
        assert not any("triton-cpu" in line for line in default)
    assert "tests/test_backends.py::test_state_dict_reload_is_bit_exact[cpu-cpu]" in default
