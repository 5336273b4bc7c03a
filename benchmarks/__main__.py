"""The benchmark suite (the README's main job) on the device present:

    python -m benchmarks            # GPU: every parameter set, fp32 + bf16 ResNet-50, end to end at batch 256
                                    # CPU: the ResNet-50 parameter set and a small end-to-end step
    python -m benchmarks --update-results   # the same, written over the committed results (benchmarks/results/)
    python -m benchmarks --smoke    # seconds: the tiny model, for CI

How long: on a 2-core CPU shared with other busy processes a CPU run took 25 minutes (measured, wall clock), of
which at most 4 for the step times (24 rounds), at most 6 for the end-to-end step (16 rounds) and the rest, over 15,
for the host work (300 rounds on each of 3 parameter sets; on a GPU machine this part runs on its CPU too).

Parts: optimizer step time (``step_time``), the host work of a warm step against the official loop's dispatch
(``host_overhead``; on the CPU whatever the device, with kernel launches made no-ops), and an end-to-end training step
(``e2e``). Every part times its variants interleaved, one step of each per round, and takes its ratios round by
round (``benchmarks/timing.py``: this machine's load changes by 10x within a run); a variant whose times spread more
than 25% is flagged. The progress lines say what a round times (one step of every variant). Writes
``suite-<device>.json``, ``.md`` (every table) and ``.png`` (one panel per table, host work included, each drawn by
its part's ``draw``), with the device, versions, commit and date, into ``benchmarks/results/local/`` (ignored by
git); ``--update-results`` writes them into ``benchmarks/results/``, the committed results, and ``--out`` anywhere.
``python -m benchmarks.step_time`` / ``.host_overhead`` / ``.e2e`` run one part with more options.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks import e2e, host_overhead, step_time, timing

LOCAL = step_time.RESULTS / "local"  # a run's results unless --update-results (ignored by git)


def plan(device: torch.device, smoke: bool) -> dict:
    """What to run: step-time (param set, dtype) pairs with their step counts, and the end-to-end configuration."""
    host = {"param_sets": list(host_overhead.DEFAULT_SETS), "steps": host_overhead.ROUNDS, "warmup": 5}
    if smoke:
        return {"step_time": [("resnet_tiny", torch.float32)], "steps": 2, "warmup": 1,
                "variants": ["asam-reference", "asam-auto", "asam-official", "sgd", "copy"],
                "host": {"param_sets": ["resnet_tiny"], "steps": 3, "warmup": 1},
                "e2e": {"arch": "resnet_tiny", "batch": 4, "image_size": 32, "amp": "none", "channels_last": True,
                        "steps": 2, "warmup": 1}}
    if device.type == "cuda":
        return {"step_time": [("resnet50", torch.float32), ("resnet50", torch.bfloat16), ("vit_b16", torch.float32),
                              ("gpt2_medium", torch.float32)], "steps": 50, "warmup": 10, "variants": None,
                "host": host,
                "e2e": {"arch": "resnet50", "batch": 256, "image_size": 224, "amp": "bf16", "channels_last": True,
                        "steps": 30, "warmup": 5}}
    # CPU: a round costs ~0.3 s (step time) and ~3 s (end to end); 24 and 16 of them (10 and 6 before) keep the
    # medians of a shared machine's noisy steps steadier from run to run (benchmarks/results/stability-cpu.md)
    return {"step_time": [("resnet50", torch.float32)], "steps": 24, "warmup": 2, "variants": None, "host": host,
            "e2e": {"arch": "resnet50", "batch": 8, "image_size": 64, "amp": "none", "channels_last": True,
                    "steps": 16, "warmup": 1}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="the tiny configuration CI runs (seconds)")
    parser.add_argument("--threads", type=int, default=None, help=timing.THREADS_HELP)
    parser.add_argument("--update-results", action="store_true",
                        help=f"write the committed results ({step_time.RESULTS}) instead of {LOCAL}")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the results folder (default: {LOCAL}, untracked; with --update-results: "
                             f"{step_time.RESULTS})")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = step_time.RESULTS if args.update_results else LOCAL
    device = torch.device(args.device)
    timing.cpu_threads(args.threads)
    todo = plan(device, args.smoke)
    env = step_time.environment(device)
    print(f"fastasam benchmark suite on {env['device_name']} ({device}), torch {env['torch']}, commit {env['commit']}",
          flush=True)
    results, sections = [], []
    total = len(todo["step_time"]) + 2
    for i, (param_set, dtype) in enumerate(todo["step_time"], start=1):
        print(f"[{i}/{total}] optimizer step time: {param_set}, {dtype}; {todo['steps']} rounds, each one optimizer "
              "step (first_step + second_step) of every variant", flush=True)
        variants = todo["variants"] or step_time.default_variants(device)
        result = step_time.run(param_set, device, dtype, todo["steps"], todo["warmup"], variants)
        results.append(result)
        sections.append((step_time.markdown(result, env), step_time.panel(result, step_time.title(result, env))))
    host = todo["host"]
    print(f"[{total - 1}/{total}] host work of a warm step (CPU, launches made no-ops): {host['steps']} rounds per "
          f"parameter set ({', '.join(host['param_sets'])})", flush=True)
    host_results = [host_overhead.run(name, host["steps"], host["warmup"]) for name in host["param_sets"]]
    host_env = step_time.environment(torch.device("cpu"))
    sections.append((host_overhead.markdown(host_results, host_env),
                     host_overhead.panel(host_results, host_overhead.title(host_env))))
    print(f"[{total}/{total}] end-to-end training step: {todo['e2e']['steps']} rounds, each one training step of "
          "every variant", flush=True)
    result = e2e.run(device, **todo["e2e"])
    results.append(result)
    sections.append((e2e.markdown(result, env), e2e.panel(result, e2e.title(result, env))))

    md = "\n".join(m for m, _ in sections)  # the tables in the order they ran: step times, host work, end to end
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"suite-{device.type}{'-smoke' if args.smoke else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": results,
                                                     "host_overhead": host_results}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(f"# fastasam benchmark suite\n\n{md}")
    plotted = step_time.figure([p for _, p in sections], stem.with_suffix(".png"))  # a panel per table
    print(f"wrote {stem}.json, .md{' and .png' if plotted else ''}"
          f"{'' if args.out != LOCAL else ' (untracked; --update-results writes the committed results)'}")
    return {"environment": env, "results": results, "host_overhead": host_results}


if __name__ == "__main__":
    timing.steady_cpu("benchmarks", None)
    main()
