"""Compile every Triton kernel for real GPU targets without a GPU, and report how its global loads and its
floating-point arithmetic came out.

``python -m fastasam.kernels.compile_check [--arch 80 90]`` lowers each kernel to PTX and a cubin with Triton's own
toolchain (ptxas ships with the triton wheel) for the given compute capabilities, for fp32 and bf16 storage, with the
compile options the ``triton`` backend launches with (``multi_tensor.COMPILE_OPTIONS``), in two variants: ``vector``
(``ALIGNED=True``: the vector path for rows marked 16-byte aligned and the element path for the others, chosen per
row at run time) and ``element`` (``ALIGNED=False``: a table without aligned rows, the element path alone). It prints
one line per kernel and variant: the number of 16-byte vector loads (``ld.global.v4``), of all global loads, and of
contractible floating-point instructions (``fma``, and ``add``/``sub``/``mul`` without a rounding mode, which ptxas
may fuse). It exits non-zero when a kernel fails to compile, when a ``vector`` variant contains no vector load, or
when any variant contains a contractible instruction (the contraction policy of ``multi_tensor``: every product and
sum rounds once). Run it with ``TRITON_INTERPRET`` unset: the interpreter replaces the kernels by Python functions.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

_DTYPES = ("fp32", "bf16")

# kernel variant name -> (kernel, its parameters, the values of its own compile-time options COPY / MODE / DIRECTION):
# every kernel of the table (fastasam/backends/_signatures.py) once per mode it takes (``<kernel>/<mode>``; the
# fused updates without a suffix for the gradient itself and ``/gsam`` for GSAM's direction); the restore mode is
# ``copy`` but for ``restore_kernel`` (its subtracting path)
_COPY = {"restore": False}


def _variants() -> dict[str, tuple[str, tuple, dict]]:
    from fastasam.backends._signatures import KERNELS, SIGNATURES

    out = {}
    for name, k in KERNELS.items():
        own = {"copy": _COPY.get(name, True)} if k.copy else {}
        for label, mode in k.modes or (("", None),):
            key = f"{name}_kernel/{label}" if label else f"{name}_kernel"
            out[key] = (f"{name}_kernel", SIGNATURES["triton"][name], own if mode is None else {**own, "mode": mode})
    return out


_KERNELS = _variants()
_ARG_TYPES = {"*acc": "*fp32"}  # the accumulate dtype of fp32 and bf16 storage

# a floating-point instruction the compiler contracted (fma), or one ptxas may still contract: add/sub/mul without a
# rounding mode (PTX: "mul/add sequences with no rounding modifiers may be optimized to use fused-multiply-add")
_FMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?fma(?:\.\w+)*\.(?:f16|bf16|f32|f64|f16x2|bf16x2)\s+([^;]*);", re.M)
_UNROUNDED = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:add|sub|mul)(?:\.ftz)?(?:\.sat)?\.(?:f16|bf16|f32|f64|f16x2|bf16x2)\s",
                        re.M)
# +-1 in bf16, fp16 (and two of them packed) and fp32, as PTX writes a register's constant. An fma by +-1 is an exact
# add or subtract: how sm_80 subtracts bf16 values (LLVM computes a bf16 -> fp32 -> bf16 difference in bf16, which
# rounds the same), not a contraction.
_ONES = {"0x3F80", "0xBF80", "0x3C00", "0xBC00",  # bf16, fp16
         "1065369472", "-1082081408", "1006648320", "-1140802560",  # the same, two packed in 32 bits (decimal)
         "0f3F800000", "0fBF800000"}  # fp32
_MOV_CONST = re.compile(r"^\s*mov\.b(?:16|32)\s+(%\w+),\s*([^;\s]+);", re.M)
VARIANTS = {"vector": True, "element": False}  # variant -> ALIGNED


def contractible(ptx: str) -> int:
    """The PTX instructions that are, or may become, fused multiply-adds (an fma by a register holding +-1, an exact
    add or subtract, is not one)."""
    ones = {reg for reg, value in _MOV_CONST.findall(ptx) if value in _ONES}
    fused = 0
    for operands in _FMA.findall(ptx):
        a, b = [x.strip() for x in operands.split(",")][1:3]
        fused += a not in ones and b not in ones
    return fused + len(_UNROUNDED.findall(ptx))


def compile_all(archs: list[int], dtypes: list[str], chunk: int = 1 << 14, block: int = 1 << 10,
                kernels: list[str] | None = None, variants: list[str] | None = None,
                options: dict | None = None) -> list[dict]:
    """One dict per (arch, dtype, kernel, variant) compiled; ``options``: Triton compile options over the backend's
    own (``num_warps``, ``multi_tensor.COMPILE_OPTIONS``)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_check: unset TRITON_INTERPRET; the interpreter does not compile kernels.")
    import triton
    import triton.language as tl
    from fastasam.kernels import multi_tensor as K
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    opts = {"num_warps": 4, **K.COMPILE_OPTIONS, **(options or {})}
    tl_dtype = {"fp32": tl.float32, "bf16": tl.bfloat16}
    rows = []
    for arch in archs:
        for dtype in dtypes:
            for name in kernels or list(_KERNELS):
                kernel, params, own = _KERNELS[name]
                for variant in variants or list(VARIANTS):
                    values = {"dtype": tl_dtype[dtype], "acc": tl.float32, "chunk_size": chunk, "block": block,
                              "aligned": VARIANTS[variant], **own}
                    signature = {p.name: _ARG_TYPES.get(p.type, p.type) for p in params}
                    const = {p.name: values[p.value] for p in params if p.type == "constexpr"}
                    src = ASTSource(fn=getattr(K, kernel), signature=signature, constexprs=const)
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
                    ptx = compiled.asm["ptx"]
                    rows.append({
                        "arch": arch, "dtype": dtype, "kernel": name, "variant": variant,
                        "cubin_bytes": len(compiled.asm["cubin"]),
                        "vector_loads": ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
                        "global_loads": ptx.count("ld.global"),
                        "contractible": contractible(ptx),
                    })
    return rows


def verdict(row: dict) -> str:
    """"ok", or what is wrong with a compiled kernel."""
    problems = []
    if row["variant"] == "vector" and row["vector_loads"] == 0:
        problems.append("NO VECTOR LOADS")
    if row["contractible"]:
        problems.append("CONTRACTIBLE FP ARITHMETIC")
    return ", ".join(problems) or "ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=list(_DTYPES), choices=_DTYPES)
    args = parser.parse_args(argv)
    rows = compile_all(args.arch, args.dtype)
    bad = 0
    for r in rows:
        v = verdict(r)
        bad += v != "ok"
        print(f"sm_{r['arch']} {r['dtype']:>4} {r['kernel']:<24} {r['variant']:<7} cubin {r['cubin_bytes']:>7} B  "
              f"ld.global.v4 {r['vector_loads']:>3} / ld.global {r['global_loads']:>3}  "
              f"fma/unrounded {r['contractible']:>3}  {v}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
