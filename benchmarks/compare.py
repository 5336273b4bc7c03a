"""Do two runs of the benchmark suite agree? Every ratio the suite prints, run 2 over run 1.

    python -m benchmarks.compare run1/suite-cpu.json run2/suite-cpu.json            # limit 10%
    python -m benchmarks.compare a.json b.json --limit 0.05 --markdown table.md

The ratios: step time, each variant's speed-up over ``asam-reference``; end to end, each variant's step time over
SGD's; host work, each variant's fastest steady-state step vs the official loop's (``vs_official``). Prints one line
per ratio with its change (run 2 / run 1 - 1) and a verdict; the exit code is 1 when a ratio changed by more than
``--limit`` or one run lacks a ratio the other has, 2 when the runs' host ratios are not of the same statistic
(``benchmarks/results/stability-cpu.md`` records such comparisons). Two more host ratios are listed below, for
information, not held to the limit: the median of the per-round ratios of the steady steps (``median_vs_official``:
what the step costs while the machine's other tenants take their share of the caches and memory, which changes by
the minute) and that of the step right after another variant's (``after_other_vs_official``: how much of the caches
it finds is up to those tenants too).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _is_host(res: dict) -> bool:
    """Whether a ``results`` entry is host work (``host_overhead``'s rows), not step time or end to end."""
    return bool(res["rows"]) and "vs_official" in res["rows"][0]


def _host(suite: dict) -> list[dict]:
    """The host-work results of a suite JSON, or of a ``host-overhead-cpu.json`` (``python -m
    benchmarks.host_overhead``)."""
    return suite["host_overhead"] if "host_overhead" in suite else list(filter(_is_host, suite["results"]))


def ratios(suite: dict) -> dict[str, float]:
    """name -> ratio for every ratio in a suite JSON (``python -m benchmarks`` writes ``suite-<device>.json``) or a
    host-overhead JSON."""
    out = {}
    for res in suite["results"]:
        if _is_host(res):
            continue  # a host-overhead JSON's results: below
        for r in res["rows"]:
            if "ratio_vs_sgd" in r:  # end to end
                if r["variant"] != "sgd":
                    out[f"e2e {res['param_set']}: {r['variant']} / sgd"] = r["ratio_vs_sgd"]
            elif r.get("speedup_vs_reference") is not None and r["variant"] != "asam-reference":
                out[f"step {res['param_set']} {res['dtype']}: {r['variant']} vs reference"] = r["speedup_vs_reference"]
    for res in _host(suite):
        for r in res["rows"]:
            if r["name"] != "official loop":
                out[f"host {res['param_set']}: {r['name']} vs official loop"] = r["vs_official"]
    return out


INFORMATION = {"median_vs_official": "median of rounds", "after_other_vs_official": "after another variant"}


def information(suite: dict) -> dict[str, float]:
    """name -> the host ratios listed for information (``INFORMATION``; see the module doc)."""
    return {f"host {res['param_set']}: {r['name']}, {label}": r[key]
            for key, label in INFORMATION.items() for res in _host(suite) for r in res["rows"]
            if r["name"] != "official loop" and key in r}


def ratio_of(suite: dict) -> set[str]:
    """What the host ratios are of (``host_overhead.RATIO_OF``; per-round medians before it was recorded)."""
    return {res.get("ratio_of", "per-round medians") for res in _host(suite)}


def compare(first: dict, second: dict, limit: float) -> tuple[list[tuple[str, float | None, float | None,
                                                                          float | None]], bool]:
    """(name, run 1, run 2, change) per ratio, and whether every ratio is in both runs and changed by at most
    ``limit``."""
    rows = changes(ratios(first), ratios(second))
    return rows, all(c is not None and abs(c) <= limit for *_, c in rows)


def changes(a: dict[str, float], b: dict[str, float]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(name, run 1, run 2, change) for every name in either."""
    rows = []
    for name in [*a, *(n for n in b if n not in a)]:
        x, y = a.get(name), b.get(name)
        rows.append((name, x, y, y / x - 1 if x and y else None))
    return rows


def markdown(rows: list, limit: float, ok: bool, labels: tuple[str, str], info: list | None = None) -> str:
    head = [f"| ratio | {labels[0]} | {labels[1]} | change |", "|---|---:|---:|---:|"]
    lines = [*head]
    for name, x, y, change in rows:
        cell = "missing" if change is None else f"{change * 100:+.1f}%" + (" **over**" if abs(change) > limit else "")
        lines.append(f"| {name} | {_fmt(x)} | {_fmt(y)} | {cell} |")
    worst = max((abs(c) for *_, c in rows if c is not None), default=0.0)
    lines += ["", f"Largest change {worst * 100:.1f}%; limit {limit * 100:.0f}%: "
                  + ("every ratio agrees." if ok else "**not every ratio agrees.**")]
    if info:
        lines += ["", "For information, not held to the limit: host work as the machine was loaded, the median of "
                      "the per-round ratios of the steady steps and of the step right after another variant's (how "
                      "much of the caches and memory a step finds is up to the machine's other tenants):", "", *head]
        lines += [f"| {name} | {_fmt(x)} | {_fmt(y)} | {'-' if c is None else f'{c * 100:+.1f}%'} |"
                  for name, x, y, c in info]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--limit", type=float, default=0.10, help="largest change allowed (0.10: 10%%)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    first, second = (json.loads(p.read_text()) for p in (args.first, args.second))
    of_first, of_second = ratio_of(first), ratio_of(second)
    if of_first and of_second and of_first != of_second:
        print(f"cannot compare: the host ratios of {args.first} are of {', '.join(sorted(of_first))}, those of "
              f"{args.second} of {', '.join(sorted(of_second))}; run both with the same benchmarks version",
              file=sys.stderr)
        return 2
    rows, ok = compare(first, second, args.limit)
    labels = tuple(f"{p.parent.name or p.name} ({s['environment'].get('commit', '?')})"
                   for p, s in ((args.first, first), (args.second, second)))
    md = markdown(rows, args.limit, ok, labels, changes(information(first), information(second)))
    print(md, end="")
    if args.markdown:
        args.markdown.write_text(md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
