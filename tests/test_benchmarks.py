import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastasam
from benchmarks import baselines, e2e, host_overhead, step_time, timing
from fastasam import _watch


def test_step_time_benchmark_runs_and_writes_results(tmp_path):
    (result,) = step_time.main(["--device", "cpu", "--steps", "1", "--warmup", "0", "--variants", "asam-reference",
                                "asam-auto", "asam-apex", "sgd", "--out", str(tmp_path)])
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "asam-reference" and names[1].startswith("asam-auto (= ") and names[2] == "sgd"  # apex: skipped
    assert result["rows"][0]["speedup_vs_reference"] == 1.0
    assert all(r["steps"] == 1 and len(r["times_s"]) == 1 and r["spread"] is None and not r["noisy"]
               for r in result["rows"])  # one round: no spread to judge, no warning
    (js,) = tmp_path.glob("*.json")
    data = json.loads(js.read_text())
    assert data["environment"]["torch"] and data["elements"] == 25_557_032
    md = (tmp_path / js.name.replace(".json", ".md")).read_text()
    assert sum(line.startswith("| asam-") for line in md.splitlines()) == 2
    assert "| median ms | spread | vs published loop | speed-up vs reference |" in md
    assert "| asam-official not run |" in md  # no published loop in this run: said so, no speed-up over it
    assert "Median of 1 interleaved rounds" in md
    assert (tmp_path / js.name.replace(".json", ".png")).stat().st_size > 0


def test_compiled_foreach_baseline_computes_the_reference_asam_step():
    """The compiled baseline must do the same work as fastasam, or the comparison means nothing."""
    def params() -> list[torch.nn.Parameter]:
        gen = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(5, 3), (7,), (4, 4, 3), (1,)]]

    mine, ref = params(), params()
    hp = step_time.HPARAMS
    step = baselines.compiled_foreach(mine[::2], mine[1::2], **hp)
    opt = fastasam.ASAM([{"params": ref[::2], "adaptive": True}, {"params": ref[1::2], "adaptive": False}],
                        torch.optim.SGD, backend="reference", **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in mine]
        for p, q, g in zip(mine, ref, grads):
            p.grad, q.grad = g, g.clone()
        step()
        opt.first_step()
        for q, g in zip(ref, grads):
            q.grad = g.clone()
        opt.second_step()
    for p, q in zip(mine, ref):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert not torch.equal(mine[0], params()[0])


def _named_params(seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (5, 3), "conv.bias": (5,), "fc.weight": (4, 4, 3), "fc.bias": (1,)}
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen))) for n, s in shapes.items()]


def _same_steps(loop, mine: list, opt, ref: list, steps: int = 3) -> None:
    """The published ``loop``'s two phases over ``mine`` and fastasam's ``opt`` (the reference backend) over ``ref``
    (its copy, in the same order), the same gradients in both passes of each step (set anew before the second pass,
    as a second backward would: the official loop scales ``p.grad`` in place)."""
    gen = torch.Generator().manual_seed(1)
    first, second = (loop.ascent_step, loop.descent_step) if hasattr(loop, "ascent_step") else (
        loop.first_step, loop.second_step)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in mine]
        for ps, step in ((mine, first), (ref, opt.first_step)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            step()
        for p, q in zip(mine, ref):  # the perturbed weights (with fixed gradients the restore hides e afterwards)
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        for ps, step in ((mine, second), (ref, opt.second_step)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            step()


def test_the_official_asam_transcription_computes_fastasams_asam_step():
    """The official asam.py loop (ASAM for names holding ``weight``, SAM for the others) does fastasam's ASAM step,
    so timing it against fastasam compares the same work."""
    hp = step_time.HPARAMS
    named = _named_params()
    mine = [p for _, p in named]
    loop = baselines.OfficialASAM(torch.optim.SGD(mine, lr=hp["lr"], momentum=hp["momentum"],
                                                  weight_decay=hp["weight_decay"]), named, hp["rho"], hp["eta"])
    ref_named = _named_params()
    opt = fastasam.ASAM([{"params": [p for n, p in ref_named if "weight" in n], "adaptive": True},
                         {"params": [p for n, p in ref_named if "weight" not in n], "adaptive": False}],
                        torch.optim.SGD, backend="reference", norm_eps=1e-16, **hp)
    _same_steps(loop, mine, opt, [p for _, p in ref_named])
    for (_, p), (_, q) in zip(named, ref_named):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert not torch.equal(mine[0], _named_params()[0][1])


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_the_community_sam_transcription_computes_fastasams_sam_step(adaptive):
    """The community sam.py loop: SAM is fastasam's SAM; its adaptive form is ASAM with ``eta = 0``."""
    hp = step_time.HPARAMS
    sgd = {"lr": hp["lr"], "momentum": hp["momentum"], "weight_decay": hp["weight_decay"]}
    mine = [p for _, p in _named_params()]
    loop = baselines.CommunitySAM(mine, torch.optim.SGD(mine, **sgd), hp["rho"], adaptive=adaptive)
    ref = [p for _, p in _named_params()]
    opt = (fastasam.ASAM(ref, torch.optim.SGD, backend="reference", rho=hp["rho"], eta=0.0, **sgd) if adaptive
           else fastasam.SAM(ref, torch.optim.SGD, backend="reference", rho=hp["rho"], **sgd))
    _same_steps(loop, mine, opt, ref)
    for p, q in zip(mine, ref):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def _agg_axes():
    """A figure with one matplotlib axes on the Agg backend (nothing shown), to draw a panel on and inspect it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    return plt, fig, ax


def test_step_time_reports_the_published_loops_and_the_memory_floor(tmp_path):
    """Every row gets GB/s and its multiple of the floor measured by the copy in the same run; every fastasam row
    gets its paired speed-up over the published loop of its own algorithm (ASAM: asam-official, SAM: sam-sam.py), in
    the JSON, the table and the plot's labels; the plot draws each row's memory floor (its algorithm's passes) on
    that row."""
    (result,) = step_time.main(["--device", "cpu", "--steps", "2", "--warmup", "0", "--param-sets", "resnet_tiny",
                                "--variants", "asam-reference", "asam-auto", "asam-official", "sam-auto",
                                "sam-sam.py", "sgd", "copy", "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"asam-reference", "asam-auto", "asam-official", "sam-auto", "sam-sam.py", "sgd", "copy"}
    for ours, loop in (("asam-reference", "asam-official"), ("asam-auto", "asam-official"),
                       ("sam-auto", "sam-sam.py")):
        assert rows[ours]["published"] == loop
        assert rows[ours]["speedup_vs_published"] == timing.paired_ratio(rows[loop]["times_s"],
                                                                         rows[ours]["times_s"])
    assert rows["asam-auto"]["speedup_vs_published"] == result["comparisons"]["asam-auto vs asam-official"]
    assert rows["sam-auto"]["speedup_vs_published"] == result["comparisons"]["sam-auto vs sam-sam.py"]
    for other in ("asam-official", "sam-sam.py", "sgd", "copy"):  # not fastasam's: what they are, no speed-up
        assert rows[other]["published"] is None and rows[other]["speedup_vs_published"] is None
    assert result["copy_GBps"] > 0 and rows["copy"]["x_floor"] == pytest.approx(1.0)
    for r in rows.values():
        kind = step_time.kind_of(r["variant"])
        floor_s = step_time.PASSES[kind] * result["param_bytes"] / (result["copy_GBps"] * 1e9)
        assert r["x_floor"] == pytest.approx(r["median_s"] / floor_s)
        moved = step_time.PASSES[kind] * result["param_bytes"]
        assert r["achieved_GBps"] == pytest.approx(moved / r["median_s"] / 1e9)
    assert set(result["comparisons"]) == {"asam-auto vs asam-official", "sam-auto vs sam-sam.py"}
    # denormals flushed to zero only while timing: the process gets torch's default back (later tests compare
    # conversions of subnormal numbers)
    assert torch.tensor([1e-40]).mul(1.0).item() != 0.0
    md = (tmp_path / "step_time-resnet_tiny-float32-cpu.md").read_text()
    assert "| x floor |" in md and "- asam-auto vs asam-official: " in md
    assert "Memory floor: a parameter-sized copy" in md
    table = {line.split(" | ")[0].removeprefix("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert f" | {rows['sam-auto']['speedup_vs_published']:.2f}x" in table[rows["sam-auto"]["name"]]
    assert " vs sam-sam.py | " in table[rows["sam-auto"]["name"]]  # "x" or "x !" (the spread mark)
    assert " | published loop | " in table["asam-official"] and " | published loop | " in table["sam-sam.py"]
    assert " | SGD alone, for scale | " in table["sgd"]

    plt, fig, ax = _agg_axes()
    try:
        step_time.draw(ax, result, "resnet_tiny")
        labels = dict(zip((r["variant"] for r in result["rows"]), (t.get_text() for t in ax.texts)))
        for ours, loop in (("asam-reference", "asam-official"), ("asam-auto", "asam-official"),
                           ("sam-auto", "sam-sam.py")):
            assert f" ms  ({rows[ours]['speedup_vs_published']:.2f}x vs {loop})" in labels[ours]
        assert " ms  (published loop)" in labels["asam-official"] and " ms  (published loop)" in labels["sam-sam.py"]
        assert " ms  (SGD alone, for scale)" in labels["sgd"] and " ms  (bandwidth probe)" in labels["copy"]
        assert "published loop" in ax.get_xlabel() and "published" in ax.get_title()
        # one floor tick per row, on that row, at the floor of the row's own algorithm
        (floors,) = [c for c in ax.collections if c.get_label() == step_time.FLOOR_LABEL]
        ticks = floors.get_segments()
        assert len(ticks) == len(result["rows"])
        copy_floor = rows["copy"]["floor_ms"]
        for i, (r, tick) in enumerate(zip(result["rows"], ticks)):
            (x0, y0), (x1, y1) = tick
            kind = step_time.kind_of(r["variant"])
            assert x0 == x1 == pytest.approx(r["floor_ms"]) and y0 < i < y1
            assert x0 == pytest.approx(copy_floor * step_time.PASSES[kind] / step_time.PASSES["copy"])
        assert len({round(t[0][0], 9) for t in ticks}) == 4  # asam, sam, sgd and copy: four different floors
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [step_time.FLOOR_LABEL]
        assert not ax.lines  # no line across every row
    finally:
        plt.close(fig)


@pytest.mark.skipif(step_time.baselines.pytorch_optimizer_unavailable_reason() is not None,
                    reason="pytorch_optimizer is not installed (the test extra installs it)")
def test_friendlysam_wsam_and_bsam_rows_are_compared_with_pytorch_optimizers_and_their_floors(tmp_path):
    """The peers' rows: fastasam's against pytorch_optimizer's (foreach) of the same algorithm, paired per round, in
    the JSON, the comparisons and the table; each row measured against its own algorithm's floor."""
    peers = [f"{k}-{impl}" for k in step_time.PEERS for impl in ("auto", "pytorch_optimizer")]
    assert set(peers) <= set(step_time.default_variants(torch.device("cpu")))
    (result,) = step_time.main(["--device", "cpu", "--steps", "2", "--warmup", "0", "--param-sets", "resnet_tiny",
                                "--variants", *peers, "sgd", "copy", "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in result["rows"]}
    for kind in step_time.PEERS:
        ours, theirs = rows[f"{kind}-auto"], rows[f"{kind}-pytorch_optimizer"]
        assert ours["published"] == f"{kind}-pytorch_optimizer" and theirs["published"] is None
        assert ours["speedup_vs_published"] == timing.paired_ratio(theirs["times_s"], ours["times_s"])
        assert result["comparisons"][f"{kind}-auto vs {kind}-pytorch_optimizer"] == ours["speedup_vs_published"]
        floor_s = step_time.PASSES[kind] * result["param_bytes"] / (result["copy_GBps"] * 1e9)
        for r in (ours, theirs):
            assert r["x_floor"] == pytest.approx(r["median_s"] / floor_s)
    md = (tmp_path / "step_time-resnet_tiny-float32-cpu.md").read_text()
    assert "FriendlySAM, WSAM and BSAM: 13, 12 and 14 passes" in md
    assert "| published, pytorch_optimizer (foreach) |" in md and " vs bsam-pytorch_optimizer |" in md  # "x" or "x !"


def test_rows_that_are_not_fastasams_say_what_they_are_instead_of_a_speedup():
    """The plot's labels and the table's ``vs published loop`` cells: a fastasam row's speed-up over its own
    algorithm's published loop (with the table's ``!`` after a spread ratio), the published loops, the other
    baselines, SGD and the copy by what they are, and a fastasam row whose published loop did not run says so."""
    def cell(variant: str, **row) -> str:
        return step_time.vs_published({"variant": variant, **row}, flag=True)

    assert cell("asam-foreach", published="asam-official", speedup_vs_published=2.5,
                published_spread=0.5) == "2.50x ! vs asam-official"
    assert step_time.vs_published({"variant": "sam-auto", "published": "sam-sam.py", "speedup_vs_published": 1.5,
                                   "published_spread": 0.5}) == "1.50x vs sam-sam.py"  # the plot: no flag
    assert cell("sam-foreach", published="sam-sam.py", speedup_vs_published=None) == "sam-sam.py not run"
    assert {v: cell(v) for v in ("asam-official", "sam-sam.py", "asam-pytorch_optimizer", "sam-pytorch_optimizer",
                                 "asam-compile-foreach", "asam-apex", "sgd", "copy")} == {
        "asam-official": "published loop", "sam-sam.py": "published loop",
        "asam-pytorch_optimizer": "published, pytorch_optimizer",
        "sam-pytorch_optimizer": "published, pytorch_optimizer",
        "asam-compile-foreach": "torch.compile baseline", "asam-apex": "apex baseline",
        "sgd": "SGD alone, for scale", "copy": "bandwidth probe"}
    assert set(step_time.ROLES) >= set(step_time.PUBLISHED) | set(step_time.PUBLISHED_LOOP.values())


def test_suite_smoke_configuration_writes_table_and_plot(tmp_path, monkeypatch):
    """The suite's tables, JSON and figure; the figure has a panel per table it prints, in the same order: each
    step-time table, the host-work table and the end-to-end table."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from benchmarks.__main__ import main as suite

    saved = []  # (path, the figure's panels: title and y labels) of every figure written
    real_savefig = Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        saved.append((Path(path).name, [(ax.get_title(), [t.get_text() for t in ax.get_yticklabels()])
                                        for ax in fig.axes]))
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    out = suite(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    ((name, panels),) = saved
    assert name == "suite-cpu-smoke.png"
    assert len(panels) == 3  # the step-time table, the host-work table, the end-to-end table
    (step, step_labels), (host, host_labels), (end, end_labels) = panels
    assert step.startswith("resnet_tiny optimizer step") and "published" in step
    assert step_labels == [r["name"] for r in out["results"][0]["rows"]]
    assert "Host work" in host and "not a step's time" in host
    assert [label.split("\n")[0] for label in host_labels] == [r["name"] for r in out["host_overhead"][0]["rows"]]
    assert end.startswith("resnet_tiny training step") and end_labels == [r["name"] for r in out["results"][1]["rows"]]
    kinds = [r["param_set"] for r in out["results"]]
    assert kinds == ["resnet_tiny", "resnet_tiny training step"]
    e2e_rows = {r["variant"]: r for r in out["results"][1]["rows"]}
    assert e2e_rows["sgd"]["ratio_vs_sgd"] == 1.0 and e2e_rows["asam-auto"]["images_per_s"] > 0
    assert e2e_rows["asam-reference"]["speedup_vs_reference"] == 1.0
    assert all(len(r["times_s"]) == 2 and "noisy" in r for res in out["results"] for r in res["rows"])
    assert [r["param_set"] for r in out["host_overhead"]] == ["resnet_tiny"]
    md = (tmp_path / "suite-cpu-smoke.md").read_text()
    assert md.count("### ") == 3 and "step time / SGD's" in md and "vs official loop" in md
    assert [line.split(" ")[1] for line in md.splitlines() if line.startswith("### ")] == ["resnet_tiny", "Host",
                                                                                          "End"]
    assert md.count("| median ms | spread |") == 2 and md.count("interleaved rounds") == 3  # + host work
    assert (tmp_path / "suite-cpu-smoke.png").stat().st_size > 0
    assert json.loads((tmp_path / "suite-cpu-smoke.json").read_text())["environment"]["commit"]


def test_op_level_pytest_benchmarks_run(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FASTASAM_BENCH_SET": "resnet_tiny"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_ops.py",
                           "--benchmark-disable"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    benchmarked = [b for b in fastasam.available_backends("cpu") if b != "cuda_shim"]  # a test backend, not loaded
    assert f"{3 * len(benchmarked)} passed" in proc.stdout


def test_host_overhead_counts_python_calls_that_do_not_grow_with_the_tensor_count(tmp_path):
    """The benchmark runs every variant; a warm step of a multi-tensor backend makes the same number of Python calls
    for 2,000 tensors as for the tiny ResNet (the watch's passes are C-level maps), far fewer than the official loop."""
    results = host_overhead.main(["--param-sets", "resnet_tiny", "many_2000", "--steps", "3", "--warmup", "1",
                                  "--out", str(tmp_path)])
    tiny, many = ({r["name"]: r for r in res["rows"]} for res in results)
    assert set(tiny) >= {"official loop", "torch SGD (foreach)", "fastasam reference", "fastasam foreach"}
    fused = [n for n in tiny if n.startswith(("fastasam triton", "fastasam cuda"))]
    assert fused, "no multi-tensor backend measured"
    backends = [n for n in fused if not n.endswith((host_overhead.PYTHON_PASS, " GSAM"))]
    assert [n for n in fused if n.endswith(" GSAM")] == [f"{n} GSAM" for n in backends]  # and fastasam.GSAM on each
    if _watch.cpp_in_use():  # each multi-tensor backend also with the Python pass
        assert [n for n in fused if n.endswith(host_overhead.PYTHON_PASS)] == [n + host_overhead.PYTHON_PASS
                                                                            for n in backends]
    for name in fused:
        assert tiny[name]["python_calls"] == many[name]["python_calls"] < many["official loop"]["python_calls"] / 100
    assert many["official loop"]["python_calls"] > 10 * tiny["official loop"]["python_calls"]
    assert (tmp_path / "host-overhead-cpu.md").read_text().count("| many_2000 (2000) |") == len(many)
    assert all(r["kernel_launches"] == ("no-op" if r["name"] in fused else "real") for r in many.values())
    for res in results:
        rows = {r["name"]: r for r in res["rows"]}
        assert res["ratio_of"] == host_overhead.RATIO_OF == "minima"
        for name, row in rows.items():  # a round: a step after another variant's, then steps after its own
            assert row["after_other_us"] > 0 and row["after_other_vs_official"] > 0
            assert 0 < row["min_us"] <= row["median_us"] and row["median_vs_official"] > 0
            assert row["vs_official"] == pytest.approx(row["min_us"] / rows["official loop"]["min_us"])
            per_round = host_overhead.STEADY_STEPS if name.startswith(host_overhead.FUSED) else 1
            assert row["steady_steps"] == 3 * per_round
        official = rows["official loop"]
        assert official["after_other_vs_official"] == official["vs_official"] == official["median_vs_official"] == 1


def _host_row(name: str, us: float) -> dict:
    """A host-overhead table row of ``name`` whose fastest step took ``us`` (the official loop: 1,000 us)."""
    return {"name": name, "min_us": us, "median_us": 1.2 * us, "iqr_us": 0.1 * us, "vs_official": us / 1000,
            "median_vs_official": us / 1000, "after_other_us": 2 * us, "after_other_vs_official": us / 500,
            "steady_steps": 3, "python_calls": 10}


def test_the_host_table_and_plot_say_host_work_only_and_mark_the_rows_with_no_op_launches():
    """The triton/cuda rows (their GSAM and Python-pass rows too) time host work with their kernel launches made
    no-ops: the table has a ``kernel launches`` column (no-op / real) and a heading that says host work only, not a
    step's time; the plot labels those rows ``(launches no-ops)``, hatches their bars and says the same."""
    names = {"official loop": 1000, "torch SGD (foreach)": 200, "fastasam foreach": 800, "fastasam triton": 3,
             "fastasam triton, Python pass": 30, "fastasam triton GSAM": 4, "fastasam cuda": 3}
    results = [{"param_set": s, "tensors": n, "steps": 3, "ratio_of": "minima", "skipped": {},
                "rows": [_host_row(name, us * k) for name, us in names.items()]}
               for s, n, k in (("resnet50", 161, 1), ("many_2000", 2000, 10))]
    env = {"device_name": "cpu", "device": "cpu", "torch": "t", "fastasam": "f", "commit": "c", "date": "d"}
    md = host_overhead.markdown(results, env)
    heading = next(line for line in md.splitlines() if line.startswith("### "))
    assert heading.startswith("### Host work only, not a step's time") and "no-ops" in heading
    assert "| parameter set | variant | kernel launches | fastest us |" in md
    no_op = {"fastasam triton", "fastasam triton, Python pass", "fastasam triton GSAM", "fastasam cuda"}
    for name in names:
        cell = "no-op" if name in no_op else "real"
        assert md.count(f"| {name} | {cell} | ") == 2, name

    plt, fig, ax = _agg_axes()
    try:
        host_overhead.draw(ax, results, "Host work")
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == [f"{n}\n(launches no-ops)" if n in no_op else n for n in names]
        assert "host work only, not a step's time" in ax.get_title() and "not a step's time" in ax.get_xlabel()
        bars = [b for c in ax.containers for b in c]
        assert len(bars) == 2 * len(names)
        assert [b.get_hatch() == "//" for b in bars] == [n in no_op for n in names] * 2
        assert "kernel launches no-ops" in [t.get_text() for t in ax.get_legend().get_texts()]
    finally:
        plt.close(fig)


def test_host_overhead_times_steady_steps_after_each_step_after_another_variant():
    """Each round a variant makes a step right after another variant's (to ``first``), then untimed warm-in steps,
    then steady steps (to ``steady``), whose median the round reports; fused variants get the warm-in and several
    steady steps, the others one, whatever their speed."""
    calls = []

    class Fake:
        name = "fastasam cuda"

        def run(self) -> float:
            calls.append(len(calls))
            return float(len(calls))  # 1.0, 2.0, 3.0, ...

    first: list[float] = []
    steady: list[float] = []
    times = timing.interleave([("a", host_overhead._turn(Fake(), first, steady))], 3)
    assert first == [1.0, 3.0, 5.0] and times["a"] == steady == [2.0, 4.0, 6.0]
    calls.clear()  # 2 warm-in steps (not timed), 3 steady steps: the round's is their median
    first, steady = [], []
    times = timing.interleave([("a", host_overhead._turn(Fake(), first, steady, 2, 3))], 2)
    assert first == [1.0, 7.0] and steady == [4.0, 5.0, 6.0, 10.0, 11.0, 12.0] and times["a"] == [5.0, 11.0]
    assert host_overhead._steady_plan(Fake()) == (host_overhead.WARM_IN, host_overhead.STEADY_STEPS)
    for name in ("fastasam cuda GSAM", "fastasam triton, Python pass"):
        assert host_overhead._steady_plan(SimpleNamespace(name=name))[1] == host_overhead.STEADY_STEPS
    for name in ("official loop", "torch SGD (foreach)", "fastasam foreach", "fastasam reference"):
        assert host_overhead._steady_plan(SimpleNamespace(name=name)) == (0, 1)


def test_interleave_runs_every_variant_once_a_round_in_rotated_order():
    """Warm-up first (each variant in turn), then round i starts at variant i mod n and wraps: every variant steps
    under the same load, and none is always first or always right after the same one."""
    calls = []

    def run(name: str):
        def step() -> float:
            calls.append(name)
            return 1.0
        return step

    times = timing.interleave([(n, run(n)) for n in "abc"], rounds=4, warmup=1)
    assert calls == [*"abc", *"abc", *"bca", *"cab", *"abc"]
    assert times == {"a": [1.0] * 4, "b": [1.0] * 4, "c": [1.0] * 4}
    assert [timing.rotation(3, i) for i in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_paired_ratios_cancel_a_load_that_changes_10x_between_rounds():
    """Variant b does exactly twice a's work. The load changes 10x between rounds, and once between a's and b's step
    of a round. The per-round ratio is 2.0 in every round but that one: the paired ratio is 2.0 exactly, the ratio
    of the medians is 0.2 (10x off the other way)."""
    load = iter([1, 1, 10, 10, 10, 10, 1, 1, 10, 1])  # per call, in call order

    def variant(work: float):
        return lambda: work * next(load)

    times = timing.interleave([("a", variant(1.0)), ("b", variant(2.0))], rounds=5)
    assert times == {"a": [1, 10, 10, 1, 10], "b": [2, 20, 20, 2, 2]}  # rounds 1 and 3 run b first (rotation)
    assert timing.paired_ratio(times["b"], times["a"]) == 2.0
    assert timing.paired_ratio(times["a"], times["b"]) == 0.5
    assert statistics.median(times["b"]) / statistics.median(times["a"]) == 0.2  # the median of medians
    with pytest.raises(ValueError):
        timing.paired_ratio([1.0, 2.0], [1.0])


def test_measure_flags_a_high_spread_variant_and_not_a_steady_one(monkeypatch, capsys):
    """``measure`` on the CPU with a fake clock: the steady variant takes 1/64 s every round; the jumpy one 1/64 s or
    1/16 s by turns (binary fractions: the clock's sums are exact). Only the jumpy one is flagged (``noisy``, a printed
    warning, ``!`` in the table)."""
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    jumps = iter([2**-6, 2**-4] * 20)

    def make(kind: str):
        def step() -> None:
            now[0] += 2**-6 if kind == "steady" else next(jumps)
        return lambda: step

    rows = timing.measure([("steady", make("steady")), ("jumpy", make("jumpy"))], torch.device("cpu"), steps=8,
                          warmup=1, label="fake")
    steady, jumpy = rows
    assert steady["times_s"] == [2**-6] * 8 and steady["spread"] == 0.0 and not steady["noisy"]
    assert steady["peak_mem_bytes"] is None and steady["median_s"] == steady["min_s"] == 2**-6
    assert jumpy["noisy"] and jumpy["spread"] > timing.SPREAD_LIMIT and jumpy["steps"] == 8
    out = capsys.readouterr().out
    assert "WARNING: fake: jumpy: step times spread" in out and "steady: step times" not in out
    assert "fake: round 8/8" in out

    result = {"param_set": "fake", "tensors": 1, "elements": 1, "dtype": "torch.float32", "memory_floor_bytes": 11,
              "peak_GBps": None, "floor_ms": None, "steps": 8,
              "rows": [{**r, "speedup_vs_reference": timing.paired_ratio(steady["times_s"], r["times_s"]),
                        "speedup_spread": timing.paired_spread(steady["times_s"], r["times_s"]),
                        "achieved_GBps": 1.0, "pct_of_peak": None} for r in rows]}
    env = {"device_name": "cpu", "device": "cpu", "torch": "t", "fastasam": "f", "commit": "c", "date": "d",
           "cpu_threads": 2}
    table = {line.split(" | ")[0]: line for line in step_time.markdown(result, env).splitlines()}
    assert "| 0% | - | 1.00x |" in table["| steady"]  # no published loop in the rows: "-"
    assert "% ! | " in table["| jumpy"] and "x ! |" in table["| jumpy"]  # its times and its paired ratio
    e2e_result = {"arch": "fake", "batch": 1, "image_size": 1, "amp": "none", "channels_last": False, "steps": 8,
                  "rows": [{**r, "images_per_s": 1.0, "ratio_vs_sgd": 1.0, "ratio_spread": r["spread"],
                            "speedup_vs_reference": 1.0, "speedup_spread": None} for r in rows]}
    e2e_table = {line.split(" | ")[0]: line for line in e2e.markdown(e2e_result, env).splitlines()}
    assert "| 0% |" in e2e_table["| steady"] and "% ! |" in e2e_table["| jumpy"]


def test_a_cpu_run_restarts_itself_steady_and_a_gpu_or_smoke_run_does_not(monkeypatch):
    """``timing.steady_cpu``: a CPU run of a benchmark runs again with PyTorch's allocator on huge pages, glibc's
    malloc thresholds fixed and one thread (unless --threads says otherwise); GPU runs, smoke runs and runs already
    steady start nothing."""
    calls = []
    monkeypatch.setattr(timing.os, "execve", lambda exe, argv, env: calls.append((argv[1:], env)))
    monkeypatch.setattr(timing.torch.cuda, "is_available", lambda: False)
    for k in timing.STEADY_ENV:
        monkeypatch.delenv(k, raising=False)
    timing.steady_cpu("benchmarks", ["--smoke"])
    timing.steady_cpu("benchmarks.e2e", ["--device", "cuda"])
    timing.steady_cpu("benchmarks.e2e", ["--device=cuda:1"])
    assert calls == []
    timing.steady_cpu("benchmarks", [])
    timing.steady_cpu("benchmarks.step_time", ["--device", "cpu", "--threads", "2"])
    assert [argv for argv, _ in calls] == [["-m", "benchmarks", "--threads", "1"],
                                          ["-m", "benchmarks.step_time", "--device", "cpu", "--threads", "2"]]
    assert all(env["THP_MEM_ALLOC_ENABLE"] == "1" and env["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)
               and env["MALLOC_TRIM_THRESHOLD_"] for _, env in calls)
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    timing.steady_cpu("benchmarks", [])  # only part of the settings: run again with all of them
    assert len(calls) == 3
    for k, v in timing.STEADY_ENV.items():  # already steady (the restarted process itself)
        monkeypatch.setenv(k, v)
    timing.steady_cpu("benchmarks", [])
    assert len(calls) == 3


def test_trusting_skips_the_pass_only_inside_and_the_split_table_shows_what_the_pass_adds():
    """``--trust-pass`` (a callgrind diagnostic): inside ``_trusting`` a watch answers its first check whatever moved
    and the identity pass says "the same"; outside, both are the real ones again. The table derives the pass's cost
    per tensor from the two counts."""
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with host_overhead._trusting():
        w = _watch.watch([p], [], [], [], [], check_params=True)
        p.grad = torch.ones(3)  # moved: a real watch says None
        assert w.check() == []
        assert _watch.same_params([{"params": [p]}], [])
    w = _watch.watch([p], [], [], [], [], check_params=True)
    p.grad = torch.ones(3)
    assert w.check() is None
    assert not _watch.same_params([{"params": [p]}], [])
    rows = [{"param_set": s, "tensors": n, "rows": [{"name": "fastasam cuda", "instructions": i,
                                                      "instructions_no_pass": j}]}
            for s, n, i, j in (("resnet50", 161, 156_000, 129_000), ("many_2000", 2000, 409_000, 127_000))]
    table = "\n".join(host_overhead.pass_split_lines(rows))
    assert "| many_2000 (2000) | fastasam cuda | 409,000 | 2.62x | 127,000 | 0.98x | 141 |" in table


def test_compare_reads_every_ratio_of_two_suite_runs_and_fails_on_a_change_over_the_limit(tmp_path, capsys):
    """``python -m benchmarks.compare``: step-time speed-ups, end-to-end ratios and host ratios of two suite JSONs,
    each with its change; exit code 1 when one moved by more than the limit or is missing from a run."""
    from benchmarks import compare

    def suite(speedup: float, e2e_ratio: float, host: float) -> dict:
        return {"environment": {"commit": "abc"},
                "results": [{"param_set": "resnet50", "dtype": "torch.float32",
                             "rows": [{"variant": "asam-reference", "speedup_vs_reference": 1.0},
                                      {"variant": "asam-foreach", "speedup_vs_reference": speedup}]},
                            {"param_set": "resnet50 training step",
                             "rows": [{"variant": "sgd", "ratio_vs_sgd": 1.0},
                                      {"variant": "asam-auto", "ratio_vs_sgd": e2e_ratio}]}],
                "host_overhead": [{"param_set": "resnet50", "rows": [{"name": "official loop", "vs_official": 1.0},
                                                                     {"name": "fastasam cuda", "vs_official": host}]}]}

    paths = {}
    for name, args in {"one": (1.15, 2.0, 0.007), "close": (1.2, 2.1, 0.0075), "far": (1.15, 2.0, 0.009)}.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(suite(*args)))
    assert set(compare.ratios(suite(1.15, 2.0, 0.007))) == {
        "step resnet50 torch.float32: asam-foreach vs reference", "e2e resnet50 training step: asam-auto / sgd",
        "host resnet50: fastasam cuda vs official loop"}
    assert compare.main([str(paths["one"]), str(paths["close"])]) == 0
    assert "+7.1%" in capsys.readouterr().out  # 0.0075 / 0.007
    assert compare.main([str(paths["one"]), str(paths["far"])]) == 1  # the host ratio moved by 29%
    assert "+28.6% **over**" in capsys.readouterr().out
    missing = suite(1.15, 2.0, 0.007)
    missing["host_overhead"] = []
    paths["missing"] = tmp_path / "missing.json"
    paths["missing"].write_text(json.dumps(missing))
    assert compare.main([str(paths["one"]), str(paths["missing"]), "--markdown", str(tmp_path / "t.md")]) == 1
    assert "missing" in (tmp_path / "t.md").read_text()
    # the host ratios of the step after another variant's are listed, with their change, and not held to the limit
    cold = suite(1.15, 2.0, 0.007)
    cold["host_overhead"][0]["rows"][1]["after_other_vs_official"] = 0.02
    colder = json.loads(json.dumps(cold))
    colder["host_overhead"][0]["rows"][1]["after_other_vs_official"] = 0.03
    paths["cold"], paths["colder"] = tmp_path / "cold.json", tmp_path / "colder.json"
    paths["cold"].write_text(json.dumps(cold))
    paths["colder"].write_text(json.dumps(colder))
    assert compare.main([str(paths["cold"]), str(paths["colder"])]) == 0
    out = capsys.readouterr().out
    assert "| host resnet50: fastasam cuda, after another variant | 0.02x | 0.03x | +50.0% |" in out
    assert "**over**" not in out
    colder["host_overhead"][0]["rows"][1]["median_vs_official"] = 0.011  # as loaded: listed, not held either
    cold["host_overhead"][0]["rows"][1]["median_vs_official"] = 0.01
    paths["cold"].write_text(json.dumps(cold))
    paths["colder"].write_text(json.dumps(colder))
    assert compare.main([str(paths["cold"]), str(paths["colder"])]) == 0
    assert "| host resnet50: fastasam cuda, median of rounds | 0.01x | 0.011x | +10.0% |" in capsys.readouterr().out
    # host ratios of different statistics (minima against an older run's per-round medians) are not compared
    colder["host_overhead"][0]["ratio_of"] = "minima"
    paths["colder"].write_text(json.dumps(colder))
    assert compare.main([str(paths["cold"]), str(paths["colder"])]) == 2
    assert "cannot compare" in capsys.readouterr().err
    # a host-overhead JSON (python -m benchmarks.host_overhead) compares too
    host_only = {"environment": {"commit": "abc"}, "results": cold["host_overhead"]}
    assert compare.ratios(host_only) == {"host resnet50: fastasam cuda vs official loop": 0.007}
