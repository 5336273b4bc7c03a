"""Optimizer step time of every backend on a model's parameter set: ``first_step`` + ``second_step`` with
SGD (momentum 0.9, weight decay 5e-4), against the per-tensor ``reference`` loop, in one run.

    python -m benchmarks.step_time                     # the device present (cuda if any, else cpu)
    python -m benchmarks.step_time --device cpu --steps 10 --param-sets resnet50 vit_b16
    python -m benchmarks.step_time --variants asam-reference asam-foreach sgd

Variants: every fastasam backend available on the device and ``auto`` (ASAM; ``sam-auto``: SAM), the published loops
users would otherwise run (``benchmarks/baselines.py``: the official asam.py ASAM, the community sam.py SAM,
``pytorch_optimizer``'s SAM/ASAM where installed), the same ASAM step written in foreach ops under ``torch.compile``,
NVIDIA apex where installed, plain ``torch.optim.SGD`` for scale, and a parameter-sized copy that measures the memory
bandwidth of the run. The variants are timed interleaved, one step each per round (``benchmarks.timing``: a shared
machine's load changes by 10x within a run), and the speed-ups are the median of the per-round ratios. Every row gets
achieved GB/s (the least bytes its algorithm must move, ``PASSES``, over its median) and its multiple of the memory
floor (those bytes at the copy's bandwidth in the same run); % of peak where the device's peak is known. Every
fastasam row also gets its paired speed-up over the published loop of its own algorithm (``PUBLISHED_LOOP``: the
official asam.py for ASAM, sam.py for SAM); the other rows say what they are (``ROLES``). Prints a table (also median
ms, spread, that speed-up, the speed-up over fastasam's ``reference`` backend, peak memory from a separate step per
variant) and fastasam's paired speed-ups over the published loops, a warning for every variant whose times spread more
than ``timing.SPREAD_LIMIT``, and writes JSON (with every step's time), markdown and a PNG plot (each row's bar
labelled with its speed-up over its published loop, and a tick at the memory floor of its own algorithm) to
benchmarks/results/. Times on CUDA come from CUDA events; on the CPU from perf_counter.
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
# the least memory traffic of one step, in parameter-sized passes (each read or write of a parameter-sized tensor)
PASSES = {
    "asam": 11,  # norm: read w, g; perturb: read w, g, write w and the saved copy; restore + SGD-momentum update:
                 # read the saved w, g', momentum, write w, momentum
    "sam": 10,   # the same, but the norm reads g alone
    "sgd": 5,    # SGD momentum: read w, g, momentum, write w, momentum
    "msam": 8,   # Momentum-SAM with SGD: move back + update + the norm's partials (read w~, g, m, write w, m), the
                 # perturbation (read w, m, write w~)
    # FriendlySAM with SGD: d = g - sigma * m with m's update and the norm's partials (read g, m, write m, d), the
    # perturbation (read w, d, write w and the saved copy), restore + SGD-momentum update as ASAM's
    "friendlysam": 13,
    # WSAM (decoupled) with SGD: SAM's norm and perturbation keeping g (read g; read w, g, write w, the copy and g's),
    # then restore + SGD on g + the decoupled term (read the copy, g_s, g, momentum, write w, momentum)
    "wsam": 12,
    # BSAM: the ascent keeping g (read g, the mean, s, write w + e and g's copy), then the update of m, s and the mean
    # with the next noise drawn in place (read g_eps, the mean, m, s, g, write m, s, the mean and w + eps)
    "bsam": 14,
    "copy": 2,   # the bandwidth probe: read one tensor, write another
}
# the peers' classes, compared with pytorch_optimizer's (foreach)
PEERS = ("friendlysam", "wsam", "bsam")
NUM_DATA = 1_281_167  # BSAM's training-set size (ImageNet's): it scales the noise only
PASSES_ASAM_SGD = PASSES["asam"]
COPY_REPEATS = 8  # the bandwidth probe's copies per timed call on a GPU (copy_repeats)


HPARAMS = {"rho": 0.5, "eta": 0.01, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
# peak DRAM bandwidth in GB/s by device name; % of peak is reported where the device is known
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}
# fastasam's row and the published rows it is compared with (``comparisons``: the paired speed-up of the first over
# each of the others measured in the run)
COMPARE = {"asam-auto": ("asam-official", "asam-pytorch_optimizer", "asam-compile-foreach"),
           "sam-auto": ("sam-sam.py", "sam-pytorch_optimizer"), "msam-auto": ("msam-authors",),
           **{f"{k}-auto": (f"{k}-pytorch_optimizer",) for k in PEERS}}
PUBLISHED = ("asam-official", "asam-pytorch_optimizer", "sam-sam.py", "sam-pytorch_optimizer", "msam-authors",
             *(f"{k}-pytorch_optimizer" for k in PEERS))
# the published loop of each algorithm, what a user would otherwise run: every fastasam row of the algorithm gets its
# paired speed-up over it (``speedup_vs_published``)
PUBLISHED_LOOP = {"asam": "asam-official", "sam": "sam-sam.py", "msam": "msam-authors",
                  **{k: f"{k}-pytorch_optimizer" for k in PEERS}}
# what the rows that are not fastasam's are, said in their plot label and table cell instead of a speed-up
ROLES = {"asam-official": "published loop", "sam-sam.py": "published loop", "msam-authors": "published loop",
         "asam-pytorch_optimizer": "published, pytorch_optimizer",
         "sam-pytorch_optimizer": "published, pytorch_optimizer", "asam-compile-foreach": "torch.compile baseline",
         **{f"{k}-pytorch_optimizer": "published, pytorch_optimizer (foreach)" for k in PEERS},
         "asam-apex": "apex baseline", "sgd": "SGD alone, for scale", "copy": "bandwidth probe"}
FLOOR_LABEL = "memory floor of the row's algorithm"
VS_PUBLISHED = ("speed-up over the published loop of the row's algorithm (ASAM: asam-official, SAM: sam-sam.py, "
                "MSAM: msam-authors, FriendlySAM/WSAM/BSAM: pytorch_optimizer's)")


def peak_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def default_variants(device: torch.device) -> list[str]:
    """Every fastasam backend that works on ``device``, ``auto``, the published loops (official asam.py, the
    community sam.py, pytorch_optimizer's SAM where installed), the compiled-foreach and apex baselines where they
    run, fastasam's SAM, plain SGD for scale and the copy that measures the memory floor."""
    names = [f"asam-{b}" for b in fastasam.available_backends(device)] + ["asam-auto", "asam-official",
                                                                            "asam-pytorch_optimizer",
                                                                            "asam-compile-foreach"]
    if device.type == "cuda" and baselines.apex_unavailable_reason() is None:
        names.append("asam-apex")
    peers = [f"{k}-{impl}" for k in PEERS for impl in ("auto", "pytorch_optimizer")]
    return [*names, "sam-auto", "sam-sam.py", "sam-pytorch_optimizer", "msam-auto", "msam-authors", *peers, "sgd",
            "copy"]


def with_grads(params: list, step: Callable[[], None]) -> timing.Step:
    """``step`` with the parameters' gradients as they are now assigned again before each call, untimed
    (``timing.Step``'s setup): both passes of every step see the same gradients, so the work is what is measured, and
    re-assigning 161 gradients (host work while a GPU idles) is not in the step's time."""
    grads = [p.grad.clone() for p in params]

    def setup() -> None:
        for p, g in zip(params, grads):
            p.grad = g

    return timing.Step(step, setup)


def copy_repeats(device: torch.device) -> int:
    """Parameter-sized copies per timed call of the bandwidth probe, its time divided by it: on a GPU one copy is a
    single launch of ~70 us (ResNet-50 fp32 on an H100), whose fixed launch and event costs read the bandwidth 5-10%
    low; on the CPU one copy takes milliseconds."""
    return COPY_REPEATS if device.type == "cuda" else 1


def kind_of(variant: str) -> str:
    """Which algorithm's memory floor a row is measured against: asam, sam, msam, sgd or copy."""
    return variant.split("-", 1)[0]


def run(param_set: str, device: torch.device, dtype: torch.dtype, steps: int, warmup: int,
        variants: list[str]) -> dict:
    shapes = PARAM_SETS[param_set]()
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    param_bytes = numel(shapes) * elem_bytes
    sgd_kw = {k: HPARAMS[k] for k in ("lr", "momentum", "weight_decay")}

    def fresh() -> tuple[list, list, list, list]:
        """Parameters of the set with fixed gradients, of the variant's own (state and plans stay independent)."""
        named = make_params(shapes, device=device, dtype=dtype)
        params = [p for _, p in named]
        return named, params, [p for n, p in named if "weight" in n], [p for n, p in named if "weight" not in n]

    def fastasam_step(variant: str, params: list, adaptive: list, plain: list) -> Callable[[], None]:
        kind, backend = variant.split("-", 1)
        if kind == "msam":  # one pass a step: the whole optimizer step is step()
            return with_grads(params, fastasam.MSAM(params, torch.optim.SGD, backend=backend, rho=HPARAMS["rho"],
                                                    **sgd_kw).step)
        if kind == "bsam":
            opt = fastasam.BSAM(params, num_data=NUM_DATA, lr=sgd_kw["lr"], weight_decay=sgd_kw["weight_decay"],
                                rho=HPARAMS["rho"], backend=backend)
        elif kind == "friendlysam":
            opt = fastasam.FriendlySAM(params, torch.optim.SGD, backend=backend, rho=HPARAMS["rho"], **sgd_kw)
        elif kind == "wsam":
            opt = fastasam.WSAM(params, torch.optim.SGD, backend=backend, rho=HPARAMS["rho"], **sgd_kw)
        elif kind == "sam":
            opt = fastasam.SAM(params, torch.optim.SGD, backend=backend, rho=HPARAMS["rho"], **sgd_kw)
        else:
            groups = [{"params": adaptive, "adaptive": True}, {"params": plain, "adaptive": False}]
            opt = fastasam.ASAM(groups, torch.optim.SGD, backend=backend, **HPARAMS)

        def step() -> None:
            opt.first_step()
            opt.second_step()
        return with_grads(params, step)

    def make(variant: str) -> Callable[[], None]:
        if variant == "copy":  # the bandwidth probe: parameter-sized copies, copy_repeats() per call
            src = torch.ones(numel(shapes), dtype=dtype, device=device)
            dst = torch.empty_like(src)
            repeats = copy_repeats(device)

            def copies() -> None:
                for _ in range(repeats):
                    dst.copy_(src)
            return copies
        named, params, adaptive, plain = fresh()
        if variant == "sgd":
            return with_grads(params, torch.optim.SGD(params, **sgd_kw).step)
        if variant == "asam-official":
            loop = baselines.OfficialASAM(torch.optim.SGD(params, **sgd_kw), named, HPARAMS["rho"], HPARAMS["eta"])
            return with_grads(params, loop.step)
        if variant == "sam-sam.py":
            return with_grads(params, baselines.CommunitySAM(params, torch.optim.SGD(params, **sgd_kw),
                                                             HPARAMS["rho"], adaptive=False).step)
        if variant in ("asam-pytorch_optimizer", "sam-pytorch_optimizer"):
            return with_grads(params, baselines.pytorch_optimizer_sam(
                params, rho=HPARAMS["rho"], adaptive=variant.startswith("asam"), **sgd_kw))
        if variant == "asam-compile-foreach":
            return with_grads(params, baselines.compiled_foreach(adaptive, plain, **HPARAMS))
        if variant == "asam-apex":
            return with_grads(params, baselines.apex_asam(adaptive, plain, **HPARAMS))
        if kind_of(variant) in PEERS and variant.endswith("-pytorch_optimizer"):
            return with_grads(params, baselines.pytorch_optimizer_peer(kind_of(variant), params, rho=HPARAMS["rho"],
                                                                       num_data=NUM_DATA, **sgd_kw))
        if variant == "msam-authors":
            return with_grads(params, baselines.AuthorsMSAM(params, rho=HPARAMS["rho"], **sgd_kw).step)
        return fastasam_step(variant, params, adaptive, plain)

    def why_not(variant: str) -> str | None:
        if variant == "asam-apex":
            return baselines.apex_unavailable_reason() or (None if device.type == "cuda" else "apex needs CUDA")
        if variant.endswith("-pytorch_optimizer"):
            return baselines.pytorch_optimizer_unavailable_reason()
        if variant in ("sgd", "copy", "asam-compile-foreach", "asam-official", "sam-sam.py", "msam-authors") or \
                variant.endswith("-auto"):
            return None
        name = variant.split("-", 1)[-1]
        if kind_of(variant) not in ("asam", "sam", "msam", *PEERS):
            return f"unknown variant {variant!r}"
        return fastasam.backends.unavailable_reason(name, device) if name in fastasam.backends.names() else (
            f"unknown variant {variant!r}")

    print(f"{param_set}: {len(shapes)} tensors, {numel(shapes):,} elements, {dtype}, on {device}; "
          f"{steps} interleaved rounds of one optimizer step (first_step + second_step) per variant", flush=True)
    todo = []
    for variant in variants:
        reason = why_not(variant)
        if reason is not None:
            print(f"  {variant}: skipped, {reason}", flush=True)
            continue
        label = variant
        if variant.endswith("-auto"):
            label += f" (= {resolve_backend('auto', device).name})"
        if variant == "copy":
            label = "memory copy (bandwidth probe)"
        todo.append((variant, label))

    def build(variant: str) -> Callable[[], None]:
        if variant == "asam-compile-foreach":
            print(f"  {variant}: compiling (a minute on a CPU)...", flush=True)
        return make(variant)

    # the official loop scales p.grad in place (a second backward would overwrite it); over the fixed gradients of
    # these rounds that scaling compounds towards subnormal numbers, whose arithmetic is slow on some CPUs: flush them
    # to zero while timing, so that no row's time depends on how many rounds ran before it (then back to torch's
    # default, which keeps them)
    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    per_call = {label: copy_repeats(device) for variant, label in todo if variant == "copy"}  # progress lines per copy
    try:
        measured = timing.measure([(label, lambda v=variant: build(v)) for variant, label in todo], device, steps,
                                  warmup, param_set,
                                  what="one optimizer step (first_step + second_step) of each variant",
                                  per_call=per_call)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    rows = [{**row, "variant": variant} for row, (variant, _) in zip(measured, todo)]
    repeats = copy_repeats(device)
    for r in rows:  # the probe's times per copy
        if r["variant"] == "copy" and repeats > 1:
            times = [t / repeats for t in r["times_s"]]
            r.update(timing.summary(times), times_s=times, copies_per_call=repeats)
    by_variant = {r["variant"]: r for r in rows}
    ref = by_variant.get("asam-reference")
    copy = by_variant.get("copy")
    # the memory floor: the bytes a step must move at the bandwidth the copy achieved in the same run
    copy_gbps = PASSES["copy"] * param_bytes / copy["median_s"] / 1e9 if copy else None
    peak = peak_gbps(device)
    for r in rows:
        kind = kind_of(r["variant"])
        floor_bytes = PASSES[kind] * param_bytes if kind in PASSES else None
        # paired per round (timing.paired_ratio): a load change that slows a whole round cancels out
        versus = ref and kind != "copy"
        r["speedup_vs_reference"] = timing.paired_ratio(ref["times_s"], r["times_s"]) if versus else None
        r["speedup_spread"] = timing.paired_spread(ref["times_s"], r["times_s"]) if versus else None
        r["achieved_GBps"] = floor_bytes / r["median_s"] / 1e9 if floor_bytes else None
        r["floor_ms"] = floor_bytes / (copy_gbps * 1e9) * 1e3 if copy_gbps and floor_bytes else None
        r["x_floor"] = r["median_s"] * 1e3 / r["floor_ms"] if r["floor_ms"] else None
        r["pct_of_peak"] = 100 * r["achieved_GBps"] / peak if peak and floor_bytes else None
    for r in rows:  # fastasam's rows against the published loop of their algorithm, paired per round
        r["published"] = None if r["variant"] in ROLES else PUBLISHED_LOOP.get(kind_of(r["variant"]))
        loop = by_variant.get(r["published"])
        r["speedup_vs_published"] = timing.paired_ratio(loop["times_s"], r["times_s"]) if loop else None
        r["published_spread"] = timing.paired_spread(loop["times_s"], r["times_s"]) if loop else None
    comparisons = {}
    for ours, peers in COMPARE.items():
        for peer in peers:
            if ours in by_variant and peer in by_variant:
                comparisons[f"{ours} vs {peer}"] = timing.paired_ratio(by_variant[peer]["times_s"],
                                                                       by_variant[ours]["times_s"])
    return {"param_set": param_set, "tensors": len(shapes), "elements": numel(shapes), "dtype": str(dtype),
            "param_bytes": param_bytes, "passes": PASSES, "copy_GBps": copy_gbps,
            "memory_floor_bytes": PASSES["asam"] * param_bytes, "peak_GBps": peak,
            "floor_ms": PASSES["asam"] * param_bytes / (copy_gbps * 1e9) * 1e3 if copy_gbps else None,
            "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
            "steps": steps, "rows": rows, "comparisons": comparisons}


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


def vs_published(row: dict, flag: bool = False) -> str:
    """What a row's plot label and table cell say against the published loops: for a fastasam row its paired
    speed-up over the published loop of its algorithm (``2.41x vs asam-official``, with the table's `` !`` after a
    spread ratio where ``flag``), for the others what they are (``ROLES``: ``published loop``, ...)."""
    if row.get("variant") in ROLES:
        return ROLES[row["variant"]]
    if row.get("speedup_vs_published"):
        mark = timing.mark(row.get("published_spread")) if flag else ""
        return f"{row['speedup_vs_published']:.2f}x{mark} vs {row['published']}"
    return f"{row['published']} not run" if row.get("published") else "-"


def markdown(result: dict, env: dict) -> str:
    threads = f"{result.get('cpu_threads') or env['cpu_threads']} CPU thread(s)"
    lines = [f"### {result['param_set']} ({result['tensors']} tensors, {result['elements']:,} elements, "
             f"{result['dtype']}) on {env['device_name']} ({env['device']})", "",
             f"torch {env['torch']}, fastasam {env['fastasam']} @ {env['commit']}, {env['date']}, {threads}. "
             "Optimizer time only: one step (first_step + second_step, SGD momentum 0.9 + weight decay) per row and "
             "round, over fixed gradients.", ""]
    if result.get("copy_GBps"):
        p = result["passes"]
        lines += [f"Memory floor: a parameter-sized copy moved {result['copy_GBps']:.1f} GB/s in this run; a step "
                  f"moves at least {p['asam']} parameter-sized passes for ASAM, {p['sam']} for SAM, "
                  f"{p.get('msam', PASSES['msam'])} for "
                  f"MSAM, {p['sgd']} for SGD momentum ({result['param_bytes'] / 1e6:.1f} MB each): ASAM's floor is "
                  f"{result['floor_ms']:.2f} ms. GB/s: those bytes over the row's median; x floor: the median over "
                  f"the row's floor. FriendlySAM, WSAM and BSAM: {p.get('friendlysam', PASSES['friendlysam'])}, "
                  f"{p.get('wsam', PASSES['wsam'])} and {p.get('bsam', PASSES['bsam'])} passes, compared with "
                  "pytorch_optimizer's (foreach).", ""]
    elif result.get("floor_ms"):
        lines += [f"Memory floor: {result['memory_floor_bytes'] / 1e6:.1f} MB at {result['peak_GBps']:.0f} GB/s "
                  f"= {result['floor_ms']:.3f} ms.", ""]
    lines += ["| implementation | median ms | spread | vs published loop | speed-up vs reference | GB/s | x floor | "
              "% of peak | peak MiB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        speed = (f"{r['speedup_vs_reference']:.2f}x{timing.mark(r.get('speedup_spread'))}"
                 if r["speedup_vs_reference"] else "-")
        gbps = f"{r['achieved_GBps']:.1f}" if r.get("achieved_GBps") else "-"
        floor = f"{r['x_floor']:.2f}" if r.get("x_floor") else "-"
        pct = f"{r['pct_of_peak']:.0f}%" if r.get("pct_of_peak") else "-"
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r["peak_mem_bytes"] else "-"
        lines.append(f"| {r['name']} | {r['median_s'] * 1e3:.2f} | {timing.spread_cell(r['spread'])} | "
                     f"{vs_published(r, flag=True)} | {speed} | {gbps} | {floor} | {pct} | {mem} |")
    if result.get("comparisons"):
        lines += ["", "fastasam against the published loops in this run (median of the per-round ratios):", ""]
        lines += [f"- {k}: {v:.2f}x faster" for k, v in result["comparisons"].items()]
    lines += ["", "vs published loop: the " + VS_PUBLISHED + ", the published loop's step time / the row's; the rows "
              "that are not fastasam's say what they are. Speed-up vs reference: fastasam's own per-tensor "
              "`reference` backend's step time / the row's.",
              "", timing.legend(result["steps"], "Both speed-ups")]
    return "\n".join(lines) + "\n"


def draw(ax, result: dict, title: str) -> None:
    """Draw a step-time table on the matplotlib axes ``ax`` (its artists are added, its title, labels and limits
    set): one horizontal bar per row at its median step time, labelled with ``vs_published`` (a fastasam row's
    paired speed-up over the published loop of its algorithm, what the others are), and a red tick on each row at
    the memory floor of that row's algorithm (``floor_ms``: ``PASSES`` at the copy's bandwidth; none without a
    copy in the run)."""
    rows = result["rows"]
    ax.barh([r["name"] for r in rows], [r["median_s"] * 1e3 for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        noisy = f", spread {r['spread']:.0%}!" if r.get("noisy") else ""
        ax.text(r["median_s"] * 1e3, i, f" {r['median_s'] * 1e3:.2f} ms  ({vs_published(r)}){noisy}", va="center",
                fontsize=8)
    floors = [(i, r["floor_ms"]) for i, r in enumerate(rows) if r.get("floor_ms")]
    if floors:
        ax.vlines([x for _, x in floors], [i - 0.45 for i, _ in floors], [i + 0.45 for i, _ in floors],
                  colors="tab:red", linewidth=2, zorder=3, label=FLOOR_LABEL)
        ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median step time (ms), lower is better\nin brackets: the speed-up over the published loop of the "
                  "row's algorithm\n(ASAM: asam-official, SAM: sam-sam.py, MSAM: msam-authors, the others: "
                  "pytorch_optimizer's),\nmedian of the per-round ratios",
                  fontsize=8)
    ax.set_title(f"{title}\nspeed-ups over the published loops", fontsize=10)
    longest = max(r["median_s"] for r in rows) * 1e3
    ax.set_xlim(0, max([longest * 2.1, *(x * 1.1 for _, x in floors)]))


def panel(result: dict, title: str) -> tuple:
    """A step-time table as a panel of ``figure``."""
    return draw, result, title, 0.45 * len(result["rows"]) + 1.6


def figure(panels: list[tuple], path: Path, width: float = 9) -> bool:
    """Write one PNG figure to ``path`` with a panel per (draw, data, title, height in inches), one under the other:
    ``draw(ax, data, title)`` draws the panel's table on its axes (``step_time.draw``, ``host_overhead.draw``,
    ``e2e.draw``). False (and a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    heights = [height for *_, height in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (draw_panel, data, title, _) in zip(axes[:, 0], panels):
        draw_panel(ax, data, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(panels: list[tuple[dict, str]], path: Path) -> bool:
    """Write one figure to ``path`` with a step-time panel per (result, title) (``figure``); False (and a message)
    when matplotlib is missing."""
    return figure([panel(result, title) for result, title in panels], path)


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
                        help="asam-<backend>, asam-auto, asam-official, asam-pytorch_optimizer, asam-compile-foreach, "
                             "asam-apex, sam-<backend>, sam-auto, sam-sam.py, sam-pytorch_optimizer, msam-<backend>, "
                             "msam-auto, msam-authors, {friendlysam,wsam,bsam}-{<backend>,auto,pytorch_optimizer}, "
                             "sgd, copy "
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
