"""Optimizer step time of every backend on a model's parameter set: ``first_step`` + ``second_step`` with
SGD (momentum 0.9, weight decay 5e-4), against the per-tensor ``reference`` loop, in one run.

    python -m benchmarks.step_time                     # the device present (cuda if any, else cpu)
    python -m benchmarks.step_time --device cpu --steps 10 --param-sets resnet50 vit_b16
    python -m benchmarks.step_time --variants asam-reference asam-foreach sgd

Variants: every fastasam backend available on the device, ``auto``, the same step written in foreach ops under
``torch.compile``, NVIDIA apex where installed, and plain ``torch.optim.SGD`` for scale. The variants are timed
interleaved, one step each per round (``benchmarks.timing``: a shared machine's load changes by 10x within a run), and
the speed-ups are the median of the per-round ratios. Prints a table (median ms, spread, speed-up over reference,
achieved GB/s, % of peak bandwidth where the device's peak is known, peak memory from a separate step per variant),
a warning for every variant whose times spread more than ``timing.SPREAD_LIMIT``, and writes JSON (with every step's
time), markdown and a PNG plot to benchmarks/results/. Times on CUDA come from CUDA events; on the CPU from
perf_counter. The memory floor counts ~11 passes over the parameter bytes for ASAM + SGD-momentum.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

import fastasam
from benchmarks import baselines, timing
from benchmarks.param_sets import PARAM_SETS, make_params, numel
from fastasam import _watch
from fastasam.backends import resolve as resolve_backend

RESULTS = Path(__file__).parent / "results"
PASSES_ASAM_SGD = 11  # read w,g (norm); read w,g write w,buf (perturb); read buf write w (restore); SGD r/w w,g,m


HPARAMS = {"rho": 0.5, "eta": 0.01, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
# peak DRAM bandwidth in GB/s by device name; % of peak is reported where the device is known
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}


def peak_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def default_variants(device: torch.device) -> list[str]:
    """Every fastasam backend that works on ``device``, ``auto``, the compiled-foreach and apex baselines where they
    run, and plain SGD for scale."""
    names = [f"asam-{b}" for b in fastasam.available_backends(device)] + ["asam-auto", "asam-compile-foreach"]
    if device.type == "cuda" and baselines.apex_unavailable_reason() is None:
        names.append("asam-apex")
    return [*names, "sgd"]


def run(param_set: str, device: torch.device, dtype: torch.dtype, steps: int, warmup: int,
        variants: list[str]) -> dict:
    shapes = PARAM_SETS[param_set]()
    named = make_params(shapes, device=device, dtype=dtype)
    params = [p for _, p in named]
    adaptive = [p for n, p in named if "weight" in n]
    plain = [p for n, p in named if "weight" not in n]
    grads = [p.grad.clone() for p in params]
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    param_bytes = numel(shapes) * elem_bytes

    def with_grads(step: Callable[[], None]) -> Callable[[], None]:
        def wrapped() -> None:
            for p, g in zip(params, grads):
                p.grad = g  # both passes see the same gradients: the work is what is measured
            step()
        return wrapped

    def asam(backend: str) -> Callable[[], None]:
        groups = [{"params": adaptive, "adaptive": True}, {"params": plain, "adaptive": False}]
        opt = fastasam.ASAM(groups, torch.optim.SGD, backend=backend, **HPARAMS)

        def step() -> None:
            opt.first_step()
            opt.second_step()
        return with_grads(step)

    def make(variant: str) -> Callable[[], None]:
        if variant == "sgd":
            opt = torch.optim.SGD(params, lr=HPARAMS["lr"], momentum=HPARAMS["momentum"],
                                  weight_decay=HPARAMS["weight_decay"])
            return with_grads(opt.step)
        if variant == "asam-compile-foreach":
            return with_grads(baselines.compiled_foreach(adaptive, plain, **HPARAMS))
        if variant == "asam-apex":
            return with_grads(baselines.apex_asam(adaptive, plain, **HPARAMS))
        return asam(variant.removeprefix("asam-"))

    def why_not(variant: str) -> str | None:
        if variant == "asam-apex":
            return baselines.apex_unavailable_reason() or (None if device.type == "cuda" else "apex needs CUDA")
        if variant in ("sgd", "asam-compile-foreach", "asam-auto"):
            return None
        name = variant.removeprefix("asam-")
        return fastasam.backends.unavailable_reason(name, device) if name in fastasam.backends.names() else (
            f"unknown variant {variant!r}")

    print(f"{param_set}: {len(shapes)} tensors, {numel(shapes):,} elements, {dtype}, on {device}; "
          f"{steps} interleaved rounds", flush=True)
    todo = []
    for variant in variants:
        reason = why_not(variant)
        if reason is not None:
            print(f"  {variant}: skipped, {reason}", flush=True)
            continue
        label = variant
        if variant == "asam-auto":
            label += f" (= {resolve_backend('auto', device).name})"
        todo.append((variant, label))

    def build(variant: str) -> Callable[[], None]:
        if variant == "asam-compile-foreach":
            print(f"  {variant}: compiling (a minute on a CPU)...", flush=True)
        return make(variant)

    measured = timing.measure([(label, lambda v=variant: build(v)) for variant, label in todo], device, steps,
                              warmup, param_set)
    rows = [{**row, "variant": variant} for row, (variant, _) in zip(measured, todo)]
    ref = next((r for r in rows if r["variant"] == "asam-reference"), None)
    floor_bytes = PASSES_ASAM_SGD * param_bytes
    peak = peak_gbps(device)
    for r in rows:
        is_asam = r["variant"] != "sgd"
        # paired per round (timing.paired_ratio): a load change that slows a whole round cancels out
        r["speedup_vs_reference"] = timing.paired_ratio(ref["times_s"], r["times_s"]) if ref else None
        r["speedup_spread"] = timing.paired_spread(ref["times_s"], r["times_s"]) if ref else None
        r["achieved_GBps"] = floor_bytes / r["median_s"] / 1e9 if is_asam else None
        r["pct_of_peak"] = 100 * r["achieved_GBps"] / peak if is_asam and peak else None
    return {"param_set": param_set, "tensors": len(shapes), "elements": numel(shapes), "dtype": str(dtype),
            "memory_floor_bytes": floor_bytes, "peak_GBps": peak,
            "floor_ms": floor_bytes / peak / 1e6 if peak else None, "steps": steps, "rows": rows}


def environment(device: torch.device) -> dict:
    try:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)benchmarks/results"], capture_output=True,
                               text=True, cwd=here, check=True).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": str(device), "device_name": name, "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "fastasam": fastasam.__version__, "python": platform.python_version(),
            "commit": commit, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host_pass": _watch.IMPLEMENTATION}


def markdown(result: dict, env: dict) -> str:
    lines = [f"### {result['param_set']} ({result['tensors']} tensors, {result['elements']:,} elements, "
             f"{result['dtype']}) on {env['device_name']} ({env['device']})", "",
             f"torch {env['torch']}, fastasam {env['fastasam']} @ {env['commit']}, {env['date']}, "
             f"{env['cpu_threads']} CPU threads. Optimizer time only (first_step + second_step, SGD momentum + wd).",
             "", "| implementation | median ms | spread | speed-up vs reference | GB/s (11-pass floor) | % of peak "
             "| peak MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    if result["floor_ms"]:
        lines.insert(3, f"Memory floor: {result['memory_floor_bytes'] / 1e6:.1f} MB at {result['peak_GBps']:.0f} GB/s "
                        f"= {result['floor_ms']:.3f} ms.")
    for r in result["rows"]:
        speed = (f"{r['speedup_vs_reference']:.2f}x{timing.mark(r.get('speedup_spread'))}"
                 if r["speedup_vs_reference"] else "-")
        gbps = f"{r['achieved_GBps']:.1f}" if r["achieved_GBps"] else "-"
        pct = f"{r['pct_of_peak']:.0f}%" if r["pct_of_peak"] else "-"
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r["peak_mem_bytes"] else "-"
        lines.append(f"| {r['name']} | {r['median_s'] * 1e3:.2f} | {timing.spread_cell(r['spread'])} | {speed} | "
                     f"{gbps} | {pct} | {mem} |")
    lines += ["", timing.legend(result["steps"], "speed-up: the reference's step time / the variant's")]
    return "\n".join(lines) + "\n"


def draw(ax, result: dict, title: str) -> None:
    """One horizontal bar per row: median step time, labelled with the speed-up over ``reference``."""
    rows = result["rows"]
    ax.barh([r["name"] for r in rows], [r["median_s"] * 1e3 for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        speed = f"  ({r['speedup_vs_reference']:.2f}x)" if r.get("speedup_vs_reference") else ""
        noisy = f", spread {r['spread']:.0%}!" if r.get("noisy") else ""
        ax.text(r["median_s"] * 1e3, i, f" {r['median_s'] * 1e3:.2f} ms{speed}{noisy}", va="center", fontsize=8)
    if result.get("floor_ms"):
        ax.axvline(result["floor_ms"], color="tab:red", linestyle="--", label="memory floor")
        ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median step time (ms), lower is better")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(r["median_s"] for r in rows) * 1e3 * 1.6)


def plot(panels: list[tuple[dict, str]], path: Path) -> bool:
    """Write one figure with a panel per (result, title); False (and a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    heights = [0.45 * len(r["rows"]) + 1.2 for r, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (result, title) in zip(axes[:, 0], panels):
        draw(ax, result, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def title(result: dict, env: dict) -> str:
    return (f"{result['param_set']} optimizer step, {result['dtype'].removeprefix('torch.')}, "
            f"{env['device_name']} ({env['device']})")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--param-sets", nargs="+", default=["resnet50"], choices=sorted(PARAM_SETS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=None,
                        help="timed rounds, one step of every variant each (default: 50 on GPU, 10 on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--variants", nargs="*", default=None,
                        help="asam-<backend>, asam-auto, asam-compile-foreach, asam-apex, sgd "
                             "(default: all that run on the device)")
    parser.add_argument("--threads", type=int, default=None, help=timing.THREADS_HELP)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    timing.cpu_threads(args.threads)
    on_gpu = device.type == "cuda"
    steps = args.steps or (50 if on_gpu else 10)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    variants = args.variants or default_variants(device)
    env = environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for param_set in args.param_sets:
        result = run(param_set, device, getattr(torch, args.dtype), steps, warmup, variants)
        md = markdown(result, env)
        print("\n" + md)
        stem = f"step_time-{param_set}-{args.dtype}-{device.type}"
        (args.out / f"{stem}.json").write_text(json.dumps({"environment": env, **result}, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(md)
        if plot([(result, title(result, env))], args.out / f"{stem}.png"):
            print(f"wrote {args.out / stem}.json, .md and .png")
        results.append(result)
    return results


if __name__ == "__main__":
    timing.steady_cpu("benchmarks.step_time", None)
    main()
