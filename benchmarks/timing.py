"""Timing that survives a noisy machine: the variants are interleaved step by step, ratios are paired per round.

A shared machine's load can change by 10x within a run (measured here: ``auto`` (= foreach) at 181 ms a step and
``foreach`` at 4,541 ms in one suite run). Timing each variant in turn lets such a change land on one variant and not
the others, and its median ends up on the wrong side of every comparison. So:

* ``interleave`` runs ``rounds`` rounds in which every variant makes one step, round ``i`` starting at variant
  ``i mod n`` (the order rotates: every variant takes every place in a round in turn, so none is always first or
  always right after the same one); a change of load between rounds hits all the variants of a round alike;
* ``paired_ratio`` compares two variants round by round, the median of ``t_a[i] / t_b[i]``: a load that slows a whole
  round cancels out, and a change within a round spoils that round's ratio only, where it can move the ratio of the
  two medians (``tests/test_benchmarks.py`` has a case where that ratio is 10x off and the paired one exact);
* ``summary`` reports a variant's median, min and spread (interquartile range / median), and ``warn`` flags (printed
  line, ``noisy`` field) a spread above ``SPREAD_LIMIT``: then that variant's times are not to be trusted.

None of this cancels what differs from one process to the next, or a load that slows some variants more than others
(two threads on two shared cores): ``benchmarks/results/stability-cpu.md`` measures both on a 2-core CPU. So a CPU run
of the suite, ``step_time`` or ``e2e`` is a *steady CPU run* (``steady_cpu``): one torch thread unless ``--threads``
says otherwise, PyTorch's CPU allocator on transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, read when torch
starts) and glibc's malloc with fixed thresholds (``STEADY_ENV``, read when the process starts: the command runs again
in a new process with them set). Huge pages and one thread alone did not stop the per-tensor reference loop from
taking 108-165 ms a step from one process to the next; with malloc's thresholds fixed it took 97-101 ms in three.

Used by ``step_time`` and ``e2e`` (through ``measure``: CUDA events on a GPU, ``perf_counter`` on the CPU, peak memory
from one separate step per variant) and by ``host_overhead`` (its variants time their own phases). A variant's step
may bring an untimed ``setup`` (``Step``: ``step_time`` sets the fixed gradients there), which ``measure`` runs right
before each timed call, outside the timed region.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import torch

SPREAD_LIMIT = 0.25  # interquartile range / median above which a variant's times are flagged as not to be trusted
# PyTorch's CPU allocator on transparent huge pages (read when torch starts), and glibc's malloc with fixed thresholds
# (read when the process starts): by default glibc moves its mmap threshold after each large free and hands freed heap
# back to the kernel above a trim threshold, so how often a per-tensor loop's temporaries page-fault anew depends on the
# process's own history. Fixed (mmap threshold 32 MiB, glibc's largest; no trimming; 256 MiB top pad), the reference
# loop took 97-101 ms a step in three processes where it took 138-155 ms without (stability-cpu.md).
STEADY_ENV = {"THP_MEM_ALLOC_ENABLE": "1", "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
              "MALLOC_TRIM_THRESHOLD_": str(4 << 30), "MALLOC_TOP_PAD_": str(256 << 20)}


def steady_cpu(module: str, argv: list[str] | None) -> None:
    """Called first by a benchmark's ``__main__``: unless it is meant for a GPU (``--device cuda``, or no ``--device``
    and a GPU present), is a ``--smoke`` run, or ``STEADY_ENV`` is already set, run ``python -m module argv`` again
    in this process's place with ``STEADY_ENV`` in the environment and ``--threads 1`` unless ``argv`` names a count
    (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--smoke" in argv or all(os.environ.get(k) is not None for k in STEADY_ENV):
        return
    device = next((a.split("=", 1)[1] for a in argv if a.startswith("--device=")), None)
    if "--device" in argv[:-1]:
        device = argv[argv.index("--device") + 1]
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return
    if not any(a == "--threads" or a.startswith("--threads=") for a in argv):
        argv += ["--threads", "1"]
    print(f"(steady CPU run: {' '.join(f'{k}={v}' for k, v in STEADY_ENV.items())} {' '.join(argv)}; "
          "benchmarks/timing.py)", flush=True)
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], {**os.environ, **STEADY_ENV})


def cpu_threads(threads: int | None) -> None:
    """Set torch's CPU threads when ``--threads`` was given (``steady_cpu`` gives 1 to a CPU run)."""
    if threads:
        torch.set_num_threads(threads)


THREADS_HELP = ("CPU threads for torch's ops (default: 1 on a CPU run, torch's own on a GPU run); on a CPU shared with "
                "other busy processes fewer threads than cores keep the times far steadier (an op's threads wait for "
                "each other)")


class Step:
    """A variant's step (``run``, the work timed) with an untimed ``setup`` that ``measure`` calls right before every
    call of it, outside the timed region (``step_time``: the fixed gradients assigned again, so that every step sees
    the same ones; that is host work during which a GPU would idle, not the optimizer's)."""

    def __init__(self, run: Callable[[], None], setup: Callable[[], None]) -> None:
        self.run, self.setup = run, setup

    def __call__(self) -> None:
        self.run()


def prepare(step: Callable[[], None]) -> None:
    """Run ``step``'s untimed ``setup`` (a ``Step``'s), if it has one."""
    setup = getattr(step, "setup", None)
    if setup is not None:
        setup()


def clock(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """``timed(fn)``: the seconds one call of ``fn`` takes on ``device`` (CUDA events on a GPU, whose work is
    asynchronous; ``perf_counter`` on the CPU)."""
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


def rotation(n: int, round_index: int) -> list[int]:
    """The order of the ``n`` variants in round ``round_index``: starting at ``round_index mod n``, wrapping."""
    k = round_index % n
    return [*range(k, n), *range(k)]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def interleave(runs: Sequence[tuple[str, Callable[[], float]]], rounds: int, warmup: int = 0,
               label: str = "", what: str = "one step of each variant",
               per_call: Mapping[str, int] | None = None) -> dict[str, list[float]]:
    """Seconds per step of every variant, ``rounds`` each, in rotated round-robin order (``rotation``).

    ``runs`` are (name, run) pairs, built beforehand; ``run()`` makes one step and returns its seconds (from ``clock``
    or the variant's own timing). Each variant first makes ``warmup`` untimed steps, one variant after the other.
    Prints progress every quarter of the rounds, every round on a terminal: the round, ``what`` a round times, and the
    medians so far per step (a variant's ``per_call[name]`` steps per ``run()`` divided out, as its table does)."""
    per_call = per_call or {}
    for _, run in runs:
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for i in range(rounds):
        for j in rotation(len(runs), i):
            name, run = runs[j]
            times[name].append(run())
        if sys.stdout.isatty() or (i + 1) % max(1, rounds // 4) == 0:
            so_far = ", ".join(f"{name} {_ms(statistics.median(t) / per_call.get(name, 1))}"
                               for name, t in times.items())
            print(f"  {label + ': ' if label else ''}round {i + 1}/{rounds} ({what}); medians per step so far: "
                  f"{so_far}", flush=True)
    return times


def spread(times: Sequence[float]) -> float | None:
    """Interquartile range / median (0.1 = the middle half of the steps lies within 10% of the median); None for
    fewer than 2 values."""
    if len(times) < 2:
        return None
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(times)


def summary(times: Sequence[float]) -> dict:
    """A variant's step times: median, min, spread (``spread``), steps, and whether the spread flags it (``noisy``)."""
    s = spread(times)
    return {"median_s": statistics.median(times), "min_s": min(times), "spread": s, "steps": len(times),
            "noisy": s is not None and s > SPREAD_LIMIT}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[i] / den[i]`` (both from one ``interleave``): a load change that hits a whole
    round cancels out."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio needs two equally long, non-empty series (got {len(num)} and {len(den)})")
    return statistics.median(n / d for n, d in zip(num, den))


def paired_spread(num: Sequence[float], den: Sequence[float]) -> float | None:
    """``spread`` of the per-round ratios ``num[i] / den[i]``: how far a paired ratio is to be trusted."""
    return spread([n / d for n, d in zip(num, den)])


def warn(rows: list[dict], label: str = "") -> list[str]:
    """Print (and return) one warning line per row whose ``noisy`` flag is set by ``summary``."""
    lines = [f"  WARNING: {label + ': ' if label else ''}{r['name']}: step times spread {r['spread']:.0%} "
             f"(interquartile range / median) > {SPREAD_LIMIT:.0%}: its times are not to be trusted"
             for r in rows if r.get("noisy")]
    for line in lines:
        print(line, flush=True)
    return lines


def mark(s: float | None) -> str:
    """The markdown tables' flag (`` !``) after a number whose spread is above ``SPREAD_LIMIT``."""
    return " !" if s is not None and s > SPREAD_LIMIT else ""


def spread_cell(s: float | None) -> str:
    """A spread as a markdown table cell: ``12%``, ``43% !`` (flagged), ``-`` (unknown: one step)."""
    return "-" if s is None else f"{s:.0%}{mark(s)}"


def legend(steps: int, ratios: str) -> str:
    """The line under a table: how the numbers were taken, what ``spread`` and ``!`` mean."""
    return (f"Median of {steps} interleaved rounds (every variant one step a round, the order rotating). spread: "
            f"interquartile range / median of the variant's step times. {ratios}: median over the rounds of the "
            f"per-round ratio (a load change that slows a whole round cancels out). ! = spread of the times, or of "
            f"the per-round ratios, above {SPREAD_LIMIT:.0%}: not to be trusted.")


def peak_memory(step: Callable[[], None], device: torch.device, held_by_others: int = 0) -> int | None:
    """Make one un-timed call of ``step`` (a variant's first step, before the interleaved rounds; its ``setup`` first,
    ``prepare``) and return the peak bytes allocated on ``device`` during it, less ``held_by_others`` (what the
    variants built before this one hold): about what the variant would peak at alone. None off CUDA. Taken apart from
    the rounds, where the peak would mix the variants."""
    prepare(step)
    if device.type != "cuda":
        step()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - held_by_others


def measure(variants: Sequence[tuple[str, Callable[[], Callable[[], None]]]], device: torch.device, steps: int,
            warmup: int, label: str = "", what: str = "one step of each variant",
            per_call: Mapping[str, int] | None = None) -> list[dict]:
    """Build every variant (name, make_step), take each one's peak memory in one step of its own (CUDA), warm each
    up, time ``steps`` interleaved rounds (``interleave``, whose progress lines say ``what`` a round times and divide
    out ``per_call``) and return one row per variant: ``summary`` fields, peak memory and the step times (``times_s``,
    for ``paired_ratio``; per call of the variant's step). A step's untimed ``setup`` (``Step``) runs before each of
    its calls, outside the timed region. Prints a warning per noisy variant."""
    timed = clock(device)

    def untimed_setup_then_timed(step: Callable[[], None]) -> float:
        prepare(step)
        return timed(step)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    built, peaks = [], {}
    for name, make_step in variants:
        held = torch.cuda.memory_allocated(device) - base if device.type == "cuda" else 0
        step = make_step()
        peaks[name] = peak_memory(step, device, held)
        built.append((name, lambda s=step: untimed_setup_then_timed(s)))
    times = interleave(built, steps, warmup, label, what, per_call)
    rows = [{"name": name, **summary(times[name]), "peak_mem_bytes": peaks[name], "times_s": times[name]}
            for name, _ in variants]
    if warn(rows, label) and device.type == "cpu" and torch.get_num_threads() > 1:
        print(f"  (on a CPU shared with other busy processes, an op's {torch.get_num_threads()} threads wait for each "
              "other: fewer threads than cores, e.g. --threads 1, keep the times far steadier)", flush=True)
    return rows
