"""A small run of every GPU kernel, for compute-sanitizer (scripts/gpu_evidence.sh part1, steps ``memcheck`` and
``racecheck``): a few ASAM,
GSAM (the sums, keeping g, the direction inside the fused update) and LookSAM (g_v, the one-pass direction) steps with
the ``cuda`` and ``triton`` backends on awkward sizes (1 element, a chunk boundary, a misaligned view), fp32 and bf16,
with SGD momentum (fused restore + SGD) and AdamW (fused restore + Adam), each checked against the ``reference``
oracle. Exit 0 when every backend present matched; 1 otherwise.

    python scripts/gpu_small_run.py [--backends cuda triton] [--steps 3]
"""

from __future__ import annotations

import argparse
import sys

import torch

import fastasam
from fastasam.__main__ import KINDS  # the optimizers `python -m fastasam --check` runs, with their options

SIZES = [1, 7, 8192, 8193, 3 * 8192 + 5]


def params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    out = [torch.nn.Parameter(torch.randn(n, generator=gen).to("cuda", dtype)) for n in SIZES]
    base = torch.randn(1001, generator=gen).to("cuda", dtype)
    out.append(torch.nn.Parameter(base[1:]))  # a view whose address is not 16-byte aligned
    return out


def run(backend: str, dtype: torch.dtype, base: type, kind: str = "ASAM", steps: int = 3, **kw) -> list[torch.Tensor]:
    ps = params(dtype)
    cls, extra = KINDS[kind]
    opt = cls(ps, base, backend=backend, rho=0.5, eta=0.01, lr=0.01, **extra, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for phase in (opt.first_step, opt.second_step) if opt.second_pass_needed else (opt.second_step,):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to("cuda", dtype)
            phase()
    torch.cuda.synchronize()
    return [p.detach().float().cpu() for p in ps]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"], choices=["cuda", "triton"])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of each run")
    args = parser.parse_args(argv)
    ok = True
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for base, kw in ((torch.optim.SGD, {"momentum": 0.9, "weight_decay": 1e-4}), (torch.optim.AdamW, {})):
            for kind in KINDS:
                want = run("reference", dtype, base, kind, args.steps, **kw)
                for backend in args.backends:
                    if backend not in fastasam.available_backends("cuda"):
                        print(f"{backend}: not available here, skipped")
                        continue
                    got = run(backend, dtype, base, kind, args.steps, **kw)
                    err = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
                    good = err <= tol
                    ok &= good
                    print(f"{backend:6s} {str(dtype):15s} {base.__name__:5s} {kind:7s} max |diff| vs reference "
                          f"{err:.2e} {'ok' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
