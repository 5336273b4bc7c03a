"""Optimizer step time of every backend on a model's parameter set: ``first_step`` + ``second_step`` with
SGD (momentum 0.9, weight decay 5e-4), against the per-tensor ``reference`` loop, in one run.

    python -m benchmarks.step_time                     # the device present (cuda if any, else cpu)
    python -m benchmarks.step_time --device cpu --steps 10

Prints a table (median ms, speed-up over reference, achieved GB/s, % of the memory floor) and writes JSON, markdown
and a PNG plot to benchmarks/results/. Times on CUDA come from CUDA events; on the CPU from perf_counter.
The memory floor counts ~11 passes over the parameter bytes for ASAM + SGD-momentum (SPEC §4).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fastasam
from benchmarks.param_sets import PARAM_SETS, make_params, numel
from fastasam.backends import resolve as resolve_backend

RESULTS = Path(__file__).parent / "results"
PASSES_ASAM_SGD = 11  # read w,g (norm); read w,g write w,buf (perturb); read buf write w (restore); SGD r/w w,g,m


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    if device.type == "cuda":
        def timed(fn: Callable[[], None]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return timed

    def timed_cpu(fn: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return timed_cpu


def measure(name: str, make_step: Callable[[], Callable[[], None]], device: torch.device, steps: int,
            warmup: int) -> dict:
    step = make_step()
    timed = _timer(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    times = []
    for i in range(steps):
        times.append(timed(step))
        if sys.stdout.isatty() or (i + 1) % max(1, steps // 4) == 0:
            print(f"  {name}: step {i + 1}/{steps}, median so far {statistics.median(times) * 1e3:.2f} ms", flush=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"name": name, "median_s": statistics.median(times), "min_s": min(times), "steps": steps,
            "peak_mem_bytes": peak}


def run(param_set: str, device: torch.device, dtype: torch.dtype, steps: int, warmup: int,
        backends: list[str]) -> dict:
    shapes = PARAM_SETS[param_set]()
    named = make_params(shapes, device=device, dtype=dtype)
    params = [p for _, p in named]
    grads = [p.grad.clone() for p in params]
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    param_bytes = numel(shapes) * elem_bytes

    def with_grads(step: Callable[[], None]) -> Callable[[], None]:
        def wrapped() -> None:
            for p, g in zip(params, grads):
                p.grad = g  # both passes see the same gradients: the work is what is measured
            step()
        return wrapped

    def asam(backend: str) -> Callable[[], Callable[[], None]]:
        def make() -> Callable[[], None]:
            groups = [{"params": [p for n, p in named if "weight" in n], "adaptive": True},
                      {"params": [p for n, p in named if "weight" not in n], "adaptive": False}]
            opt = fastasam.ASAM(groups, torch.optim.SGD, rho=0.5, eta=0.01, backend=backend,
                                lr=0.1, momentum=0.9, weight_decay=5e-4)

            def step() -> None:
                opt.first_step()
                opt.second_step()
            return with_grads(step)
        return make

    def plain_sgd() -> Callable[[], None]:
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
        return with_grads(opt.step)

    rows = []
    print(f"{param_set}: {len(shapes)} tensors, {numel(shapes):,} elements, {dtype}, on {device}", flush=True)
    for backend in backends:
        label = f"asam-{backend}"
        if backend == "auto":
            label += f" (= {resolve_backend('auto', device).name})"
        rows.append({**measure(label, asam(backend), device, steps, warmup), "backend": backend})
    rows.append({**measure("torch.optim.SGD (no ASAM)", plain_sgd, device, steps, warmup), "backend": None})

    ref = next((r for r in rows if r["backend"] == "reference"), None)
    floor_bytes = PASSES_ASAM_SGD * param_bytes
    for r in rows:
        r["speedup_vs_reference"] = ref["median_s"] / r["median_s"] if ref else None
        r["achieved_GBps"] = floor_bytes / r["median_s"] / 1e9 if r["backend"] else None
    return {"param_set": param_set, "tensors": len(shapes), "elements": numel(shapes), "dtype": str(dtype),
            "memory_floor_bytes": floor_bytes, "rows": rows}


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": str(device), "device_name": name, "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "fastasam": fastasam.__version__, "python": platform.python_version(),
            "commit": commit, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def markdown(result: dict, env: dict) -> str:
    lines = [f"### {result['param_set']} ({result['tensors']} tensors, {result['elements']:,} elements, "
             f"{result['dtype']}) on {env['device_name']} ({env['device']})", "",
             f"torch {env['torch']}, fastasam {env['fastasam']} @ {env['commit']}, {env['date']}, "
             f"{env['cpu_threads']} CPU threads. Optimizer time only (first_step + second_step, SGD momentum + wd).",
             "", "| implementation | median ms | speed-up vs reference | GB/s over the 11-pass floor |",
             "|---|---:|---:|---:|"]
    for r in result["rows"]:
        speed = f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] else "-"
        gbps = f"{r['achieved_GBps']:.1f}" if r["achieved_GBps"] else "-"
        lines.append(f"| {r['name']} | {r['median_s'] * 1e3:.2f} | {speed} | {gbps} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, env: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.5))
    ax.barh([r["name"] for r in rows], [r["median_s"] * 1e3 for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        speed = f"  ({r['speedup_vs_reference']:.2f}x)" if r["speedup_vs_reference"] else ""
        label = f"{r['median_s'] * 1e3:.1f} ms{speed}"
        ax.text(r["median_s"] * 1e3, i, " " + label, va="center")
    ax.invert_yaxis()
    ax.set_xlabel("median optimizer step time (ms), lower is better")
    ax.set_title(f"{result['param_set']} parameter set on {env['device_name']} ({env['device']})")
    ax.set_xlim(0, max(r["median_s"] for r in rows) * 1e3 * 1.45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--param-set", default="resnet50", choices=sorted(PARAM_SETS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 50 on GPU, 10 on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--backends", nargs="*", default=None, help="default: every backend available on the device")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    steps = args.steps or (50 if on_gpu else 10)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    names = args.backends or [*fastasam.available_backends(device), "auto"]
    result = run(args.param_set, device, getattr(torch, args.dtype), steps, warmup, names)
    env = environment(device)
    md = markdown(result, env)
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"step_time-{result['param_set']}-{args.dtype}-{device.type}"
    (args.out / f"{stem}.json").write_text(json.dumps({"environment": env, **result}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(md)
    if plot(result, env, args.out / f"{stem}.png"):
        print(f"wrote {args.out / stem}.json, .md and .png")
    return result


if __name__ == "__main__":
    main()
