import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import fastasam
from benchmarks import baselines, host_overhead, step_time
from fastasam import _watch


def test_step_time_benchmark_runs_and_writes_results(tmp_path):
    (result,) = step_time.main(["--device", "cpu", "--steps", "1", "--warmup", "0", "--variants", "asam-reference",
                                "asam-auto", "asam-apex", "sgd", "--out", str(tmp_path)])
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "asam-reference" and names[1].startswith("asam-auto (= ") and names[2] == "sgd"  # apex: skipped
    assert result["rows"][0]["speedup_vs_reference"] == 1.0
    (js,) = tmp_path.glob("*.json")
    data = json.loads(js.read_text())
    assert data["environment"]["torch"] and data["elements"] == 25_557_032
    assert (tmp_path / js.name.replace(".json", ".md")).read_text().count("| asam-") == 2
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


def test_suite_smoke_configuration_writes_table_and_plot(tmp_path):
    from benchmarks.__main__ import main as suite

    out = suite(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    kinds = [r["param_set"] for r in out["results"]]
    assert kinds == ["resnet_tiny", "resnet_tiny training step"]
    e2e_rows = {r["variant"]: r for r in out["results"][1]["rows"]}
    assert e2e_rows["sgd"]["ratio_vs_sgd"] == 1.0 and e2e_rows["asam-auto"]["images_per_s"] > 0
    assert [r["param_set"] for r in out["host_overhead"]] == ["resnet_tiny"]
    md = (tmp_path / "suite-cpu-smoke.md").read_text()
    assert md.count("### ") == 3 and "step time / SGD's" in md and "vs official loop" in md
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
    if _watch.cpp_in_use():  # each multi-tensor backend also with the Python pass
        assert sum(n.endswith(host_overhead.PYTHON_PASS) for n in fused) * 2 == len(fused)
    for name in fused:
        assert tiny[name]["python_calls"] == many[name]["python_calls"] < many["official loop"]["python_calls"] / 100
    assert many["official loop"]["python_calls"] > 10 * tiny["official loop"]["python_calls"]
    assert (tmp_path / "host-overhead-cpu.md").read_text().count("| many_2000 (2000) |") == len(many)
