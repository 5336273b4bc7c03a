"""A small run of every GPU kernel, for compute-sanitizer (scripts/gpu_evidence.sh: ``memcheck`` in the first
command, the full ``memcheck`` and ``racecheck`` in the second): a few ASAM, GSAM (the sums, keeping g, the direction
inside the fused update), LookSAM (g_v, the one-pass direction) and MSAM (adaptive and plain) steps with the ``cuda``
and ``triton`` backends on awkward sizes (1 element, a chunk boundary, a misaligned view), fp32 and bf16, with SGD
momentum (fused restore + SGD) and AdamW (fused restore + Adam), each checked against the ``reference`` oracle. A
line per run as it ends. Exit 0 when every backend present matched; 1 otherwise.

    python scripts/gpu_small_run.py [--backends cuda triton] [--steps 3] [--kinds ASAM GSAM LookSAM MSAM MSAM-plain]
                                    [--dtypes float32 bfloat16] [--bases SGD AdamW]
"""

from __future__ import annotations

import argparse
import sys

import torch

import fastasam
from fastasam.__main__ import KINDS as CHECKED  # the optimizers `python -m fastasam --check` runs, with their options
from fastasam.__main__ import phases

# and Momentum-SAM without ASAM's scaling (no copy of the weights kept)
KINDS = {**CHECKED, "MSAM-plain": (fastasam.MSAM, {"adaptive": False})}

SIZES = [1, 7, 8192, 8193, 3 * 8192 + 5]
DTYPES = {"float32": (torch.float32, 1e-5), "bfloat16": (torch.bfloat16, 2e-2)}  # with the tolerance of each
BASES = {"SGD": (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 1e-4}), "AdamW": (torch.optim.AdamW, {})}


DEVICE = "cuda"  # --device: "cpu" runs the Triton kernels under TRITON_INTERPRET=1 (the script's own test)


def params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    out = [torch.nn.Parameter(torch.randn(n, generator=gen).to(DEVICE, dtype)) for n in SIZES]
    base = torch.randn(1001, generator=gen).to(DEVICE, dtype)
    out.append(torch.nn.Parameter(base[1:]))  # a view whose address is not 16-byte aligned
    return out


def run(backend: str, dtype: torch.dtype, base: type, kind: str = "ASAM", steps: int = 3, **kw) -> list[torch.Tensor]:
    ps = params(dtype)
    cls, extra = KINDS[kind]
    opt = cls(ps, base, backend=backend, rho=0.5, eta=0.01, lr=0.01, **extra, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for phase in phases(opt):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, dtype)
            phase()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return [p.detach().float().cpu() for p in ps]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"], choices=["cuda", "triton"])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of each run")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES), help="base optimizers")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: the Triton kernels under TRITON_INTERPRET=1, for testing this script")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    ok = True
    for dtype_name in args.dtypes:
        dtype, tol = DTYPES[dtype_name]
        for base_name in args.bases:
            base, kw = BASES[base_name]
            for kind in args.kinds:
                want = run("reference", dtype, base, kind, args.steps, **kw)
                for backend in args.backends:
                    if backend not in fastasam.available_backends(DEVICE):
                        print(f"{backend}: not available here, skipped", flush=True)
                        continue
                    got = run(backend, dtype, base, kind, args.steps, **kw)
                    err = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
                    good = err <= tol
                    ok &= good
                    print(f"{backend:6s} {str(dtype):15s} {base.__name__:5s} {kind:13s} max |diff| vs reference "
                          f"{err:.2e} {'ok' if good else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
