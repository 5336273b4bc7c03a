"""Host work of a warm optimizer step (the host path): what a step costs the CPU before any kernel runs.

    python -m benchmarks.host_overhead                         # resnet50 (161 tensors), gpt2_medium (292), many_2000
    python -m benchmarks.host_overhead --steps 400 --callgrind resnet50 many_2000   # + instructions per step

Measured where host work is all there is: the parameter set's tensors (their number, names and ranks) with every
dimension cut to at most 2 elements, on the CPU, so every op is dispatched as on a GPU and computes next to nothing
(PyTorch's ``meta`` device would not do: many of its kernels are Python); the multi-tensor backends' kernel launches
are no-ops (the bound launch is not called; for ``triton`` that leaves out Triton's launcher, for ``cuda`` the
dispatcher call of the op). So what is timed is the Python, dispatch and table bookkeeping a GPU step costs the CPU,
the part that makes a step host-bound when the kernels take ~0.3 ms. Variants, interleaved step by step in one run
(``benchmarks.timing.interleave``: this machine's load varies by 10x):

* ``official loop``: the official asam.py ``ascent_step`` + ``descent_step``, op for op (per-tensor ``abs_``, ``mul_``,
  ``norm``, ...), with ``torch.optim.SGD(foreach=True)`` as on a GPU; its ``zero_grad`` calls are left out, as they
  are for every variant;
* ``torch SGD (foreach)``: ``torch.optim.SGD(foreach=True).step()`` alone, for scale;
* ``fastasam <backend>``: ``first_step()`` + ``second_step()`` (SGD momentum + weight decay, the official weight /
  bias split), for every backend; for ``triton`` and ``cuda`` also with the Python version of the warm step's pass
  over the tensors (``, Python pass``: what a step costs where ``fastasam._host`` is not built);
* ``fastasam <backend> GSAM`` (``triton``, ``cuda``): ``fastasam.GSAM``'s two steps, which add keeping ``g``, the
  global sums and the direction (``fastasam._decompose``: three more launches) to ASAM's.

Each phase gets new gradient tensor objects (as after ``zero_grad(set_to_none=True)``) at the same addresses; setting
them is not timed. In each round every variant makes a step right after another variant's (``after another
variant``: its code and objects are partly out of the caches, by an amount that depends on which variant ran before
and on the machine's other tenants: up to 2x for the same host path here), then steps right after its own (steady
state, as in a training loop's step after step: the host path's own cost): one for the millisecond-scale variants;
for a fused one (``triton``, ``cuda``: 10 us to 1 ms, whose step came down to its floor over ~5 steps of its own
here) ``WARM_IN`` untimed steps, then ``STEADY_STEPS`` timed ones.

What is reported of the steady steps: their fastest (``min_us``) and the round medians' median and interquartile range;
the ratio to the official loop held to account (``vs_official``, ``RATIO_OF``) is of the minima, the variant's fastest
steady step over the official loop's. On a shared machine other work only ever adds to a step's time: the fastest step
is the host path's cost with the least of it (the quietest moment of the run), the median is that cost plus what the
other tenants took that minute. A fused step's objects (~2 MB at 2,000 tensors) do not fit a core's L2, so it runs at
the speed of the L3 and memory the tenants share: within one process the median ratio of a 2,000-tensor step drifted by
1.7x over 30 s. Over six processes of 100 rounds the median of the per-round ratios moved by up to 49% between two of
them, the ratio of the minima by up to 13%, and by up to 4% with the same steps pooled into runs of ``ROUNDS`` = 300
(``benchmarks/results/stability-cpu.md``). The median of the per-round ratios (``median_vs_official``, what the step
costs on this machine as loaded) and the first step's (``after_other_vs_official``) are reported beside it. Also
reported: Python-level calls per step (function calls and C calls from Python code, counted with ``sys.setprofile``: a
number noise does not move), and with ``--callgrind`` instructions per step under valgrind (also noise-free). Writes
``benchmarks/results/host-overhead-cpu.{json,md,png}``: the table and its plot (``draw``, also the host panel of the
suite's figure) say that the numbers are host work only, not a step's time, and mark the rows whose kernel launches
are no-ops (``launches``; the table's ``kernel launches`` column, the plot's hatched bars and labels).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

import fastasam
from benchmarks import baselines, step_time, timing
from benchmarks.param_sets import PARAM_SETS
from fastasam import _step_plan, _watch
from fastasam.backends._multi_tensor import MultiTensorBackend

HPARAMS = {"rho": 0.5, "eta": 0.01, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
DEFAULT_SETS = ("resnet50", "gpt2_medium", "many_2000")
PYTHON_PASS = ", Python pass"  # the variant's plan checks the tensors with fastasam._watch.PyWatch, not fastasam._host
# the variants of the fused path (their names also begin the Python-pass and GSAM rows'); --callgrind also counts
# these two with the pass over the tensors skipped
FUSED = ("fastasam triton", "fastasam cuda")
RATIO_OF = "minima"  # ``vs_official``: a variant's fastest steady step over the official loop's (see the docstring)
NO_OP_LAUNCHES = "launches no-ops"  # what the plot's labels of those variants say (the table: ``kernel launches``)


def launches(name: str) -> str:
    """``no-op`` for a variant whose kernel launches are made no-ops (the fused backends' rows, ``FUSED``: only the
    host work of their step is timed, none of its kernels), ``real`` for the others (their ops run, on tiny
    tensors)."""
    return "no-op" if name.startswith(FUSED) else "real"


class _NoLaunch:
    """A multi-tensor backend's launcher whose bound launches do nothing (its dtypes and chunk size are kept)."""

    def __init__(self, real) -> None:
        self.dtypes, self.fused_dtypes, self.chunk = real.dtypes, real.fused_dtypes, real.chunk

    def bind(self, *args, **kwargs) -> Callable[[], None]:
        return _nothing


def _nothing() -> None:
    return None


def _launchless(name: str) -> SimpleNamespace | str:
    """The ``name`` backend's host path with no-op launches, usable on CPU tensors; or why it cannot be made."""
    try:
        if name == "triton":
            from fastasam.backends import triton as mod
        else:
            from fastasam.backends import cuda as mod
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    host = MultiTensorBackend(name, _NoLaunch(mod._Launcher))
    return SimpleNamespace(name=name, prepare=host.prepare, traceable=False, device_supported=lambda device: None,
                           _BACKEND=host)


@contextlib.contextmanager
def _resolving_to(module) -> Iterator[None]:
    """While building the step plan, resolve every backend name to ``module`` (a CPU has no GPU backend)."""
    real = _step_plan.backends.resolve
    _step_plan.backends.resolve = lambda name, device: module
    try:
        yield
    finally:
        _step_plan.backends.resolve = real


class Variant:
    """One thing to time, with its own parameters (state and plans stay independent): ``phases`` are the timed
    callables of one warm step; new gradient objects are set before each (not timed)."""

    def __init__(self, name: str, param_set: str, kind: str, backend=None) -> None:
        named = tiny_params(param_set)
        self.name, self.kind, self.backend = name, kind, backend
        self.params = [p for _, p in named]
        self.grads = [p.grad for p in self.params]  # the storage new gradient objects view (same addresses)
        sgd_kw = {k: HPARAMS[k] for k in ("lr", "momentum", "weight_decay")}
        if kind == "official":
            loop = baselines.OfficialASAM(torch.optim.SGD(self.params, foreach=True, **sgd_kw), named, HPARAMS["rho"],
                                HPARAMS["eta"])
            self.phases = (loop.ascent_step, loop.descent_step)
        elif kind == "sgd":
            self.phases = (torch.optim.SGD(self.params, foreach=True, **sgd_kw).step,)
        else:
            groups = [{"params": [p for n, p in named if "weight" in n], "adaptive": True},
                      {"params": [p for n, p in named if "weight" not in n], "adaptive": False}]
            cls = fastasam.GSAM if kind == "gsam" else fastasam.ASAM
            self.opt = cls(groups, torch.optim.SGD, backend="reference", **HPARAMS)
            self.phases = (self.opt.first_step, self.opt.second_step)

    def new_grads(self) -> None:
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g.detach()  # a new tensor object at the same address

    def run(self) -> float:
        """One warm step; the seconds spent in its phases."""
        spent = 0.0
        for phase in self.phases:
            self.new_grads()
            t0 = time.perf_counter()
            phase()
            spent += time.perf_counter() - t0
        return spent

    def warm_up(self, steps: int) -> None:
        """Build the step plan (with the Python pass over the tensors for a ``PYTHON_PASS`` variant) and warm up."""
        ctx = _resolving_to(self.backend) if self.kind in ("fastasam", "gsam") else contextlib.nullcontext()
        with ctx, _watch.using("python") if self.name.endswith(PYTHON_PASS) else contextlib.nullcontext():
            for _ in range(steps):
                self.run()

    def python_calls(self) -> int:
        """Python function calls and C calls made from Python code in the phases of one warm step (deterministic)."""
        count = [0]

        def profiler(frame, event, arg):
            if event in ("call", "c_call"):
                count[0] += 1

        for phase in self.phases:
            self.new_grads()
            sys.setprofile(profiler)
            try:
                phase()
            finally:
                sys.setprofile(None)
        return count[0] - len(self.phases)  # the profiler sees its own removal as one C call


def variant_specs() -> tuple[list[tuple[str, str, object]], dict[str, str]]:
    """(name, kind, backend module) of every variant, and the backends that cannot be measured here, with why."""
    from fastasam.backends import foreach, reference

    specs: list[tuple[str, str, object]] = [("official loop", "official", None), ("torch SGD (foreach)", "sgd", None)]
    skipped = {}
    for name, module in (("reference", reference), ("foreach", foreach), ("triton", _launchless("triton")),
                         ("cuda", _launchless("cuda"))):
        if isinstance(module, str):
            skipped[name] = module
        else:
            specs.append((f"fastasam {name}", "fastasam", module))
            if name in ("triton", "cuda") and _watch.cpp_in_use():
                specs.append((f"fastasam {name}{PYTHON_PASS}", "fastasam", module))
            if name in ("triton", "cuda"):  # GSAM: ASAM's step plus keeping g, the sums and the direction
                specs.append((f"fastasam {name} GSAM", "gsam", module))
    return specs, skipped


def tiny_params(param_set: str) -> list:
    """The set's parameters (names, count, ranks) with every dimension cut to at most 2 elements, on the CPU, each
    with a gradient: every op is dispatched as usual and computes next to nothing."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, shape in PARAM_SETS[param_set]():
        small = tuple(min(d, 2) for d in shape)
        p = torch.nn.Parameter(torch.randn(small, generator=gen))
        p.grad = torch.randn(small, generator=gen) * 1e-2
        out.append((name, p))
    return out


# Rounds a run makes (the suite's too): the fastest steps are those of the quietest moment of the run, so a longer run
# finds them more surely. Six runs of 100 rounds at 2,000 tensors: the ratios moved by up to 13% between two of them;
# the same steps pooled two by two (200 rounds) by up to 11%, three by three (300) by up to 4% (stability-cpu.md).
ROUNDS = 300
WARM_IN = 4  # a fused variant's untimed steps right after its first, before its timed steady ones
STEADY_STEPS = 16  # a fused variant's timed steps in a row each round (a step of its own after the warm-in ones)


def _turn(v: Variant, first: list[float], steady: list[float], warm_in: int = 0,
          n: int = 1) -> Callable[[], float]:
    """A round's turn of ``v``: a step right after another variant's (its seconds appended to ``first``), then
    ``warm_in`` untimed steps, then ``n`` steps right after its own (steady state; their seconds appended to
    ``steady``), whose median is returned (the round's sample)."""
    def run() -> float:
        first.append(v.run())
        for _ in range(warm_in):
            v.run()
        times = [v.run() for _ in range(n)]
        steady.extend(times)
        return statistics.median(times)
    return run


def _steady_plan(v: Variant) -> tuple[int, int]:
    """(warm-in steps, timed steady steps) of a round's turn: ``WARM_IN`` and ``STEADY_STEPS`` for a fused variant
    (a host step of 10 us to 1 ms whose objects a step of another variant pushed out of the caches: here it came down
    to its floor over ~5 steps of its own), one timed step for the others (milliseconds of dispatch, at their floor
    after one). By kind, not by a measured time, so every process makes the same number of steps."""
    return (WARM_IN, STEADY_STEPS) if v.name.startswith(FUSED) else (0, 1)


def run(param_set: str, steps: int, warmup: int, callgrind: bool = False) -> dict:
    specs, skipped = variant_specs()
    variants = [Variant(name, param_set, kind, backend) for name, kind, backend in specs]
    for v in variants:
        v.warm_up(warmup)
    if steps < 2:
        raise SystemExit("host_overhead: --steps must be at least 2")
    # round robin, the order rotating (timing.interleave): each variant's steps of a round under the same load
    first: dict[str, list[float]] = {v.name: [] for v in variants}
    steady: dict[str, list[float]] = {v.name: [] for v in variants}
    times = timing.interleave([(v.name, _turn(v, first[v.name], steady[v.name], *_steady_plan(v)))
                               for v in variants], steps, label=f"host work, {param_set}",
                              what=f"one warm step's host work of each variant; fused ones: the median of "
                                   f"{STEADY_STEPS} steps in a row")
    official, official_first, floor = times["official loop"], first["official loop"], min(steady["official loop"])
    rows = []
    for v in variants:
        med, fastest = statistics.median(times[v.name]), min(steady[v.name])
        q1, _, q3 = statistics.quantiles(times[v.name], n=4)
        row = {"name": v.name, "min_us": fastest * 1e6, "median_us": med * 1e6,
               "iqr_us": (q3 - q1) * 1e6, "vs_official": fastest / floor,
               "median_vs_official": timing.paired_ratio(times[v.name], official),
               "after_other_us": statistics.median(first[v.name]) * 1e6,
               "after_other_vs_official": timing.paired_ratio(first[v.name], official_first),
               "steady_steps": len(steady[v.name]), "python_calls": v.python_calls(),
               "kernel_launches": launches(v.name)}
        if callgrind:
            row["instructions"] = callgrind_instructions(param_set, v.name)
            if v.name in FUSED:
                row["instructions_no_pass"] = callgrind_instructions(param_set, v.name, trust_pass=True)
        rows.append(row)
    return {"param_set": param_set, "tensors": len(variants[0].params), "steps": steps, "ratio_of": RATIO_OF,
            "rows": rows, "skipped": skipped}


def callgrind_instructions(param_set: str, variant: str, steps: int = 5, trust_pass: bool = False) -> int | None:
    """Instructions per warm step of one variant under ``valgrind --tool=callgrind``, or None when valgrind is
    missing. Counting is switched on only around two windows of the worker (``_worker``): ``steps`` warm steps, and
    the same number of gradient resets alone; their difference over ``steps`` is the step's. ``trust_pass``: with
    the warm step's pass over the tensors skipped (a diagnostic; see ``_trusting``)."""
    if not (_which("valgrind") and _which("callgrind_control")):
        return None
    out = Path(f"/tmp/fastasam-callgrind-{os.getpid()}.out")
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", sys.executable,
           "-m", "benchmarks.host_overhead", "--worker", param_set, variant, str(steps),
           *(["--trust-pass"] if trust_pass else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    dumps = [Path(f"{out}.{k}") for k in (1, 2)]
    try:
        if proc.returncode != 0 or not all(d.exists() for d in dumps):
            print(f"  callgrind failed for {variant}: {proc.stderr[-500:]}")
            return None
        with_step, resets_only = (_totals(d) for d in dumps)
        return (with_step - resets_only) // steps
    finally:
        for f in (out, *dumps):
            f.unlink(missing_ok=True)


def _totals(dump: Path) -> int:
    return next(int(line.split()[1]) for line in dump.read_text().splitlines() if line.startswith("totals:"))


def _which(cmd: str) -> bool:
    return any(os.access(os.path.join(d, cmd), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))


@contextlib.contextmanager
def _trusting() -> Iterator[None]:
    """Plans built inside skip the warm step's pass over the tensors: each watch answers what its first check did,
    and the identity pass says "the same". Only to count what the rest of a step costs (the benchmark's tensors do
    not move); never in training, where it would let the kernels read stale addresses."""

    class Trusted:
        def __init__(self, real) -> None:
            self.real, self.answer = real, real.check()

        def check(self):
            return self.answer

        def params_intact(self) -> bool:
            return True

        def __len__(self) -> int:
            return len(self.real)

    real_watch, real_same = _watch.watch, _watch.same_params
    _watch.watch = lambda *args, **kwargs: Trusted(real_watch(*args, **kwargs))
    _watch.same_params = lambda groups, expected: True
    try:
        yield
    finally:
        _watch.watch, _watch.same_params = real_watch, real_same


def _worker(param_set: str, variant: str, steps: int, trust_pass: bool = False) -> None:
    """Inside valgrind: warm the variant up, then count two windows (dumped to separate files): ``steps`` warm steps,
    then as many gradient resets alone. ``trust_pass``: see ``_trusting``."""
    if trust_pass:
        with _trusting():
            return _worker(param_set, variant, steps)
    specs, _ = variant_specs()
    chosen = next(Variant(name, param_set, kind, backend) for name, kind, backend in specs if name == variant)
    chosen.warm_up(3)
    pid = str(os.getpid())

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, pid], check=True, capture_output=True)

    control("-i", "on")
    for _ in range(steps):
        chosen.run()
    control("-i", "off")
    control("-d", "steps")
    control("-i", "on")
    for _ in range(steps * len(chosen.phases)):
        chosen.new_grads()
    control("-i", "off")
    control("-d", "resets")


def markdown(results: list[dict], env: dict) -> str:
    lines = [f"### Host work only, not a step's time: a warm step on {env['device_name']} (tiny CPU tensors; the "
             "triton/cuda rows' kernel launches no-ops)", "",
             "What is timed is the CPU's work before any kernel runs. The rows marked `no-op` under kernel launches "
             "(the triton and cuda backends, whose launches are not made here) time only the Python, dispatch and "
             "table bookkeeping of their step: their ratio to the official loop compares host work alone, not step "
             "times (the step-time table has those, kernels included). The other rows' ops run, on tiny tensors.", "",
             f"torch {env['torch']}, fastasam {env['fastasam']} @ {env['commit']}, {env['date']}. "
             f"{results[0]['steps']} interleaved rounds, in each a variant's step right after another variant's, "
             f"then steps right after its own (for a fused variant {WARM_IN} untimed, then {STEADY_STEPS} timed; one "
             "for the others): the fastest of the latter (steady state), their round medians' median (IQR), vs "
             "official loop: the fastest step over the official loop's fastest (held to account: other work only "
             "adds time) and the median of the per-round ratios (as loaded); after another variant: the median and "
             "per-round ratio of the former (partly cold caches). SGD momentum + weight decay, official weight/bias "
             f"split; the pass over the tensors: {env.get('host_pass', 'python')}.", ""]
    has_cg = any(r.get("instructions") for res in results for r in res["rows"])
    head = ("| parameter set | variant | kernel launches | fastest us | median us (IQR) | vs official loop: fastest | "
            "median of rounds | after another variant: us, vs official | Python calls / step |")
    lines += [head + (" instructions / step |" if has_cg else ""),
              "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if has_cg else "")]
    for res in results:
        for r in res["rows"]:
            cg = f" {r['instructions']:,} |" if has_cg and r.get("instructions") else (" - |" if has_cg else "")
            lines.append(f"| {res['param_set']} ({res['tensors']}) | {r['name']} | {launches(r['name'])} | "
                         f"{r['min_us']:,.0f} | "
                         f"{r['median_us']:,.0f} ({r['iqr_us']:,.0f}) | {_ratio(r['vs_official'])} | "
                         f"{_ratio(r['median_vs_official'])} | {r['after_other_us']:,.0f}, "
                         f"{_ratio(r['after_other_vs_official'])} | {r['python_calls']:,} |{cg}")
    scaling = scaling_rows(results)
    if scaling:
        lines += ["", "Scaling in the number of tensors (fastest us of the set / fastest us of resnet50):", "",
                  "| variant | " + " | ".join(f"{s} ({n})" for s, n, _ in scaling[0][1]) + " |",
                  "|---|" + "---:|" * len(scaling[0][1])]
        for name, cols in scaling:
            lines.append(f"| {name} | " + " | ".join(f"{x:.2f}x" for _, _, x in cols) + " |")
    lines += pass_split_lines(results)
    for res in results:
        for name, why in res["skipped"].items():
            lines.append(f"\n{name} skipped: {why}")
    return "\n".join(lines) + "\n"


def _ratio(x: float) -> str:
    """A ratio to the official loop with three significant digits at least (0.00342x, 0.214x, 1.552x)."""
    return f"{x:.3f}x" if x >= 0.1 else f"{x:.3g}x"


def pass_split_lines(results: list[dict]) -> list[str]:
    """Instructions per warm step with and without the one pass over the tensors (``--callgrind``): what is flat in
    the tensor count and what the pass adds per tensor."""
    base = {r["name"]: r for res in results if res["param_set"] == "resnet50" for r in res["rows"]}
    rows = [(res, r) for res in results for r in res["rows"] if r.get("instructions_no_pass")]
    if not rows:
        return []
    lines = ["", "Instructions per warm step with the pass over the tensors skipped (its checks trusted: a "
             "diagnostic, `--trust-pass`), and what the pass costs (both phases' checks and the identity pass):", "",
             "| parameter set | variant | instructions / step | vs resnet50 | without the pass | vs resnet50 | "
             "the pass, per tensor |", "|---|---|---:|---:|---:|---:|---:|"]

    def vs(r: dict, key: str) -> str:
        b = base.get(r["name"], {}).get(key)
        return f"{r[key] / b:.2f}x" if b else "-"

    for res, r in rows:
        per = (r["instructions"] - r["instructions_no_pass"]) / res["tensors"]
        lines.append(f"| {res['param_set']} ({res['tensors']}) | {r['name']} | {r['instructions']:,} | "
                     f"{vs(r, 'instructions')} | {r['instructions_no_pass']:,} | {vs(r, 'instructions_no_pass')} | "
                     f"{per:,.0f} |")
    return lines


def scaling_rows(results: list[dict]) -> list:
    base = next((r for r in results if r["param_set"] == "resnet50"), None)
    if base is None or len(results) < 2:
        return []
    out = []
    for row in base["rows"]:
        cols = []
        for res in results:
            other = next(r for r in res["rows"] if r["name"] == row["name"])
            cols.append((res["param_set"], res["tensors"], other["min_us"] / row["min_us"]))
        out.append((row["name"], cols))
    return out


def title(env: dict) -> str:
    """The host-work panel's title."""
    return f"Host work of a warm ASAM step on {env['device_name']} (tiny CPU tensors)"


def draw(ax, results: list[dict], title: str) -> None:
    """Draw the host-work table on the matplotlib axes ``ax`` (its artists are added, its title, labels and scale
    set): per variant a group of horizontal bars, one per parameter set, at the fastest steady step (log scale), with
    the median of the rounds (x) and the step after another variant's (|); the variants whose kernel launches are
    no-ops (``launches``) hatched and labelled so."""
    from matplotlib.patches import Patch

    names = [r["name"] for r in results[0]["rows"]]
    width = 0.8 / len(results)
    for k, res in enumerate(results):
        rows = {r["name"]: r for r in res["rows"]}
        ys = [i + k * width for i, name in enumerate(names) if name in rows]
        shown = [rows[name] for name in names if name in rows]
        bars = ax.barh(ys, [r["min_us"] for r in shown], width, label=f"{res['param_set']} ({res['tensors']})")
        for bar, r in zip(bars, shown):
            if launches(r["name"]) == "no-op":
                bar.set_hatch("//")
                bar.set_edgecolor("black")
        ax.scatter([r["median_us"] for r in shown], ys, marker="x", s=30, color="dimgray", zorder=3,
                   label="median of the rounds" if k == 0 else None)
        ax.scatter([r["after_other_us"] for r in shown], ys, marker="|", s=120, color="black", zorder=3,
                   label="the step after another variant's" if k == 0 else None)
    labels = [f"{name}\n({NO_OP_LAUNCHES})" if launches(name) == "no-op" else name for name in names]
    ax.set_yticks([i + width * (len(results) - 1) / 2 for i in range(len(names))], labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("host us per warm step (log), fastest steady step: host work only, not a step's time")
    ax.set_title(f"{title}\nhost work only, not a step's time; hatched: kernel launches no-ops (no kernel runs)",
                 fontsize=10)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label=f"kernel {NO_OP_LAUNCHES}"))
    ax.legend(handles=handles, fontsize=8, loc="best")


def panel(results: list[dict], title: str) -> tuple:
    """The host-work table as a panel of ``step_time.figure``."""
    return draw, results, title, 0.2 * len(results[0]["rows"]) * len(results) + 2.4


def plot(results: list[dict], path: Path, env: dict | None = None) -> bool:
    """Write the host-work figure (one ``draw`` panel) to ``path``; False (and a message) when matplotlib is
    missing."""
    env = env or step_time.environment(torch.device("cpu"))
    return step_time.figure([panel(results, title(env))], path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--param-sets", nargs="+", default=list(DEFAULT_SETS), choices=sorted(PARAM_SETS))
    parser.add_argument("--steps", type=int, default=ROUNDS, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--callgrind", nargs="*", metavar="SET", default=None,
                        help="also count instructions per step under valgrind (for these sets; none named: all)")
    parser.add_argument("--out", type=Path, default=step_time.RESULTS)
    parser.add_argument("--worker", nargs=3, metavar=("SET", "VARIANT", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--trust-pass", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=timing.THREADS_HELP)
    args = parser.parse_args(argv)
    timing.cpu_threads(args.threads)
    if args.worker:
        _worker(args.worker[0], args.worker[1], int(args.worker[2]), args.trust_pass)
        return []
    env = step_time.environment(torch.device("cpu"))
    results = []
    for i, name in enumerate(args.param_sets, start=1):
        print(f"[{i}/{len(args.param_sets)}] host work per warm step: {name}", flush=True)
        counted = args.callgrind is not None and (not args.callgrind or name in args.callgrind)
        results.append(run(name, args.steps, args.warmup, counted))
    md = markdown(results, env)
    print("\n" + md)
    write(results, md, args.out, env)
    return results


def write(results: list[dict], md: str, out: Path, env: dict | None = None) -> None:
    """``host-overhead-cpu.json`` / ``.md`` / ``.png`` under ``out``."""
    env = env or step_time.environment(torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "host-overhead-cpu"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(f"# fastasam host overhead\n\n{md}")
    if plot(results, stem.with_suffix(".png"), env):
        print(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    if "--worker" not in sys.argv:
        timing.steady_cpu("benchmarks.host_overhead", None)
    main()
