"""Time to accuracy: several trainer runs' validation top-1 against wall-clock hours on one chart, and a table.

    python -m benchmarks.compare_runs runs/asam runs/sgd [--out time_to_accuracy.png] [--target 75]

Each RUN_DIR is a run directory of ``benchmarks.train_imagenet`` (its ``log.jsonl``, read over resumes as
``benchmarks.run_report.read_log`` does; a finished run's ``summary.json`` adds its images/s). The table: the run,
its optimizer, epochs evaluated, best and final top-1, wall-clock hours, images/s, and the hours to ``--target``
(default: the lowest of the runs' best top-1, so every run has a time). Without matplotlib the table is printed and
no chart is drawn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.run_report import LOG, SUMMARY, read_log, time_to_target


def load_run(run_dir: Path) -> dict:
    """``{"name", "evals", "summary", "opt"}`` of one run directory; ``FileNotFoundError`` without a log."""
    if not (run_dir / LOG).is_file():
        raise FileNotFoundError(f"fastasam: {run_dir} has no {LOG}: give run directories of benchmarks.train_imagenet")
    _, evals, _ = read_log(run_dir)
    summary = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).is_file() else {}
    opt = summary.get("opt")
    if opt is None and (run_dir / "last.pt").is_file():  # a run without a summary: its checkpoint's arguments
        try:  # mmap: only the small "args" entry is read, not the weights
            opt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True, mmap=True)["args"]["opt"]
        except Exception:  # noqa: BLE001 - only a label: "?" for a checkpoint that does not load
            opt = None
    return {"name": str(run_dir), "evals": evals, "summary": summary, "opt": opt or "?"}


def table(runs: list[dict], target: float | None) -> str:
    def f(v, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    head = ["run", "opt", "evals", "best top-1", "final top-1", "hours", "images/s",
            f"hours to {target:g}%" if target is not None else "hours to target"]
    rows = []
    for r in runs:
        ev = r["evals"]
        hit = time_to_target(ev, target)
        last = ev[-1].get("elapsed_s") if ev else None
        rows.append([r["name"], r["opt"], str(len(ev)), f(max((e["top1"] for e in ev), default=None)),
                     f(ev[-1]["top1"] if ev else None), f(r["summary"].get("wall_time_h", last and last / 3600),
                                                          "{:.3f}"),
                     f(r["summary"].get("images_per_s"), "{:.1f}"),
                     f(hit["elapsed_s"] / 3600 if hit and hit["elapsed_s"] is not None else None, "{:.3f}")])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head, *rows])


def plot(runs: list[dict], out: Path, target: float | None) -> bool:
    """Top-1 against wall-clock hours, one line per run; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        pts = [(e.get("elapsed_s", 0) / 3600, e["top1"]) for e in r["evals"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{r['name']} ({r['opt']})")
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:g}%")
    ax.set_xlabel("wall-clock hours")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("time to accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=Path("time_to_accuracy.png"), help="the chart (PNG)")
    p.add_argument("--target", type=float, default=None, help="top-1 (%%) for the hours-to-target column")
    args = p.parse_args(argv)
    runs = [load_run(d) for d in args.runs]
    target = args.target
    if target is None:
        bests = [max(e["top1"] for e in r["evals"]) for r in runs if r["evals"]]
        target = min(bests) if bests else None
    text = table(runs, target)
    print(text)
    if plot(runs, args.out, target):
        print(f"chart: {args.out}")
    else:
        print("note: matplotlib is not installed, so no chart was drawn (pip install matplotlib)")
    return text


if __name__ == "__main__":
    main()
