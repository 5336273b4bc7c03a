"""End-to-end training-step time: ResNet-50 on synthetic ImageNet batches.

    python -m benchmarks.e2e                       # GPU: batch 256, 224 px, bf16 autocast, channels_last
    python -m benchmarks.e2e --device cpu --batch 8 --image-size 64 --steps 3

Variants, each on a fresh copy of the same initial model: plain SGD (one forward/backward), ASAM with the
``reference`` per-tensor loop (the published code's way) and ASAM with fastasam's ``auto`` backend (two
forward/backwards each), interval ASAM (every 5th step two passes), LookSAM (k = 5), GSAM, Momentum-SAM
(``fastasam.MSAM``: one forward/backward a step, as SGD), and FriendlySAM, WSAM and BSAM (two passes each, BSAM with
its own update in place of SGD's), timed interleaved, one step each per round
(``benchmarks.timing``). Reports step time, its
spread, images/s and the ASAM / SGD step-time ratio (2.0 is the limit set by the two passes; the goal is
<= 2.03), the ratios as medians of the per-round ratios, so that a load change between rounds cancels out. ``draw``
draws the table as a panel of the suite's figure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import fastasam
from benchmarks import timing
from benchmarks.models import get_model
from benchmarks.step_time import RESULTS, environment

HPARAMS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
VARIANTS = ("sgd", "asam-reference", "asam-auto", "asam-every5", "looksam-k5", "gsam", "msam", "friendlysam", "wsam",
            "bsam")
# the interval and LookSAM variants perturb on every 5th step: one timed call runs 5 steps, and their times are per
# step (the mean over the 5, a full step included)
STEPS_PER_CALL = {"asam-every5": 5, "looksam-k5": 5}


def run(device: torch.device, arch: str, batch: int, image_size: int, amp: str, channels_last: bool, steps: int,
        warmup: int, variants: tuple[str, ...] = VARIANTS) -> dict:
    torch.manual_seed(0)
    template = get_model(arch, 1000).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    template = template.to(memory_format=memory_format)
    x = torch.randn(batch, 3, image_size, image_size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def make(variant: str) -> Callable[[], None]:
        model = copy.deepcopy(template).train()
        if variant == "sgd":
            opt = torch.optim.SGD(model.parameters(), **HPARAMS)

            def sgd_step() -> None:
                with autocast():
                    loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return sgd_step
        if variant == "msam":  # one forward/backward, as SGD's
            msam = fastasam.MSAM(model.parameters(), torch.optim.SGD, rho=3.0, **HPARAMS)

            def msam_step() -> None:
                with autocast():
                    loss = loss_fn(model(x), y)
                loss.backward()
                msam.step()
                msam.zero_grad(set_to_none=True)
            return msam_step
        if variant == "friendlysam":
            asam = fastasam.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, **HPARAMS)
        elif variant == "wsam":
            asam = fastasam.WSAM(model.parameters(), torch.optim.SGD, rho=0.05, **HPARAMS)
        elif variant == "bsam":
            asam = fastasam.BSAM(model.parameters(), num_data=1_281_167, lr=0.1, weight_decay=1e-4, rho=0.05)
        elif variant == "asam-every5":
            asam = fastasam.ASAM(model.parameters(), torch.optim.SGD, rho=1.0, eta=0.01, every=5, **HPARAMS)
        elif variant == "looksam-k5":
            asam = fastasam.LookSAM(model.parameters(), torch.optim.SGD, rho=1.0, eta=0.01, adaptive=True, k=5,
                                    **HPARAMS)
        elif variant == "gsam":
            asam = fastasam.GSAM(model.parameters(), torch.optim.SGD, rho=1.0, eta=0.01, adaptive=True, **HPARAMS)
        else:
            asam = fastasam.ASAM(model.parameters(), torch.optim.SGD, rho=1.0, eta=0.01,
                                 backend=variant.removeprefix("asam-"), **HPARAMS)

        def one_step() -> None:  # the documented loop: the second pass only where the step perturbs
            with autocast():
                loss = loss_fn(model(x), y)
            loss.backward()
            if asam.second_pass_needed:
                asam.first_step(zero_grad=True)
                with autocast():
                    loss = loss_fn(model(x), y)
                loss.backward()
            asam.second_step(zero_grad=True)

        def asam_steps() -> None:
            for _ in range(STEPS_PER_CALL.get(variant, 1)):
                one_step()
        return asam_steps

    print(f"end to end: {arch}, batch {batch}, {image_size} px, amp {amp}, channels_last {channels_last}, "
          f"on {device}; {steps} interleaved rounds", flush=True)
    labels = [f"{v} (= {fastasam.backends.resolve('auto', device).name})" if v == "asam-auto" else v
              for v in variants]
    per_call = {label: STEPS_PER_CALL[v] for v, label in zip(variants, labels) if v in STEPS_PER_CALL}
    what = "one training step of each variant" + "".join(
        f"; {name}: {n} steps (a perturbing period), shown per step" for name, n in per_call.items())
    measured = timing.measure([(label, lambda v=v: make(v)) for v, label in zip(variants, labels)], device, steps,
                              warmup, f"end to end {arch}", what, per_call)
    rows = [{**row, "variant": v} for row, v in zip(measured, variants)]
    for r in rows:  # per training step
        n = STEPS_PER_CALL.get(r["variant"], 1)
        if n > 1:
            r.update(median_s=r["median_s"] / n, min_s=r["min_s"] / n, times_s=[t / n for t in r["times_s"]],
                     steps_per_call=n)
    sgd = next((r for r in rows if r["variant"] == "sgd"), None)
    ref = next((r for r in rows if r["variant"] == "asam-reference"), None)
    for r in rows:  # the ratios are paired per round (timing.paired_ratio): load changes between rounds cancel out
        r["images_per_s"] = batch / r["median_s"]
        r["ratio_vs_sgd"] = timing.paired_ratio(r["times_s"], sgd["times_s"]) if sgd else None
        r["ratio_spread"] = timing.paired_spread(r["times_s"], sgd["times_s"]) if sgd else None
        r["speedup_vs_reference"] = timing.paired_ratio(ref["times_s"], r["times_s"]) if ref else None
        r["speedup_spread"] = timing.paired_spread(ref["times_s"], r["times_s"]) if ref else None
    return {"param_set": f"{arch} training step", "arch": arch, "batch": batch, "image_size": image_size, "amp": amp,
            "channels_last": channels_last, "steps": steps, "rows": rows}


def markdown(result: dict, env: dict) -> str:
    lines = [f"### End to end: {result['arch']}, batch {result['batch']}, {result['image_size']} px, "
             f"amp {result['amp']}, channels_last {result['channels_last']}, on {env['device_name']} "
             f"({env['device']})", "",
             f"torch {env['torch']}, fastasam {env['fastasam']} @ {env['commit']}, {env['date']}. One training step: "
             "forward/backward + optimizer (ASAM: two forward/backwards).", "",
             "| implementation | median ms | spread | images/s | step time / SGD's | speed-up vs reference ASAM |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = f"{r['ratio_vs_sgd']:.3f}{timing.mark(r.get('ratio_spread'))}" if r["ratio_vs_sgd"] else "-"
        speed = (f"{r['speedup_vs_reference']:.2f}x{timing.mark(r.get('speedup_spread'))}"
                 if r["speedup_vs_reference"] else "-")
        lines.append(f"| {r['name']} | {r['median_s'] * 1e3:.1f} | {timing.spread_cell(r['spread'])} | "
                     f"{r['images_per_s']:.1f} | {ratio} | {speed} |")
    lines += ["", timing.legend(result["steps"], "step time / SGD's and speed-up")]
    return "\n".join(lines) + "\n"


def draw(ax, result: dict, title: str) -> None:
    """Draw the end-to-end table on the matplotlib axes ``ax`` (its artists are added, its title, labels and limits
    set): one horizontal bar per variant at its median training-step time, labelled with its step time over SGD's
    and its speed-up over ASAM with the ``reference`` backend (both paired per round)."""
    rows = result["rows"]
    ax.barh([r["name"] for r in rows], [r["median_s"] * 1e3 for r in rows], color="tab:green")
    for i, r in enumerate(rows):
        if r["variant"] == "sgd":
            said = "SGD: one forward/backward"
        else:
            said = ", ".join(part for part in (
                f"{r['ratio_vs_sgd']:.2f}x SGD's step" if r.get("ratio_vs_sgd") else "",
                f"{r['speedup_vs_reference']:.2f}x vs asam-reference"
                if r.get("speedup_vs_reference") and r["variant"] != "asam-reference" else "") if part)
        noisy = f", spread {r['spread']:.0%}!" if r.get("noisy") else ""
        ax.text(r["median_s"] * 1e3, i, f" {r['median_s'] * 1e3:.1f} ms" + (f"  ({said})" if said else "") + noisy,
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median training-step time (ms), lower is better\nin brackets: the step time over SGD's (ASAM's "
                  "two passes make 2.0 the limit)\nand the speed-up over ASAM with the reference backend, medians of "
                  "the per-round ratios", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(r["median_s"] for r in rows) * 1e3 * 2.4)


def panel(result: dict, title: str) -> tuple:
    """The end-to-end table as a panel of ``step_time.figure``."""
    return draw, result, title, 0.45 * len(result["rows"]) + 1.6


def title(result: dict, env: dict) -> str:
    """The end-to-end panel's title."""
    return (f"{result['arch']} training step, batch {result['batch']}, {result['image_size']} px, amp {result['amp']}, "
            f"{env['device_name']} ({env['device']})")


def main(argv: list[str] | None = None) -> dict:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu")
    parser.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet_tiny"])
    parser.add_argument("--batch", type=int, default=256 if on_gpu else 8)
    parser.add_argument("--image-size", type=int, default=224 if on_gpu else 64)
    parser.add_argument("--amp", default="bf16" if on_gpu else "none", choices=["bf16", "fp16", "none"])
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--steps", type=int, default=30 if on_gpu else 3, help="timed rounds, one step of each variant")
    parser.add_argument("--warmup", type=int, default=5 if on_gpu else 1)
    parser.add_argument("--threads", type=int, default=None, help=timing.THREADS_HELP)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    timing.cpu_threads(args.threads)
    result = run(device, args.arch, args.batch, args.image_size, args.amp, args.channels_last, args.steps, args.warmup)
    env = environment(device)
    md = markdown(result, env)
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e-{args.arch}-{device.type}"
    (args.out / f"{stem}.json").write_text(json.dumps({"environment": env, **result}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(md)
    return result


if __name__ == "__main__":
    timing.steady_cpu("benchmarks.e2e", None)
    main()
