"""Compile every Triton kernel for real GPU targets without a GPU, and report how its global loads came out.

``python -m fastasam.kernels.compile_check [--arch 80 90]`` lowers each kernel to PTX and a cubin with Triton's own
toolchain (ptxas ships with the triton wheel) for the given compute capabilities, for fp32 and bf16 storage, and
prints one line per kernel: the number of 16-byte vector loads (``ld.global.v4``) and of all global loads. It exits
non-zero when a kernel fails to compile or when the aligned kernels contain no vector load. Run it with
``TRITON_INTERPRET`` unset: the interpreter replaces the kernels by Python functions.
"""

from __future__ import annotations

import argparse
import os
import sys

_DTYPES = ("fp32", "bf16")

_UPDATE_ARGS = [("rows", "*i64"), ("chunks", "*i32"), ("hyper", "*fp32"), ("sums", "*fp64"), ("alpha", "*fp64")]
# kernel name -> runtime arguments (name, Triton type; "P" = pointer of the storage dtype's accumulate type) and the
# constexpr options besides DTYPE/ACC/CHUNK/BLOCK/ALIGNED
_KERNELS = {
    "sqnorm_kernel": (
        [("rows", "*i64"), ("chunks", "*i32"), ("opts", "*fp32"), ("partials", "*fp32"), ("counter", "*i32"),
         ("out", "*fp32"), ("n_programs", "i32")],
        {},
    ),
    "perturb_kernel": ([("rows", "*i64"), ("chunks", "*i32"), ("opts", "*fp32"), ("sqnorm", "*fp32")], {"COPY": True}),
    "restore_kernel": ([("rows", "*i64"), ("chunks", "*i32")], {"COPY": False}),
    "restore_sgd_kernel": (_UPDATE_ARGS, {"COPY": True, "DIRECTION": 0}),
    "restore_adam_kernel": (_UPDATE_ARGS, {"COPY": True, "DIRECTION": 0}),
    # with GSAM's direction (fastasam/backends/_layout.py: COMBINE_GSAM)
    "restore_sgd_kernel/gsam": (_UPDATE_ARGS, {"COPY": True, "DIRECTION": 3}),
    "restore_adam_kernel/gsam": (_UPDATE_ARGS, {"COPY": True, "DIRECTION": 3}),
    "dots_kernel": (
        [("rows", "*i64"), ("chunks", "*i32"), ("partials", "*fp64"), ("counter", "*i32"), ("out", "*fp64"),
         ("n_programs", "i32")],
        {},
    ),
}
# combine_kernel once per mode (fastasam/backends/_layout.py: COMBINE_*), listed as combine_kernel/<mode>
for _mode, _code in (("keep", 0), ("look_full", 1), ("look_one", 2), ("gsam", 3)):
    _KERNELS[f"combine_kernel/{_mode}"] = (
        [("rows", "*i64"), ("chunks", "*i32"), ("sums", "*fp64"), ("alpha", "*fp64")], {"MODE": _code})


def compile_all(archs: list[int], dtypes: list[str], chunk: int = 1 << 14, block: int = 1 << 10) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_check: unset TRITON_INTERPRET; the interpreter does not compile kernels.")
    import triton
    import triton.language as tl
    from fastasam.kernels import multi_tensor as K
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tl_dtype = {"fp32": tl.float32, "bf16": tl.bfloat16}
    rows = []
    for arch in archs:
        for dtype in dtypes:
            for name, (args, extra) in _KERNELS.items():
                signature = dict(args)
                const = {"DTYPE": tl_dtype[dtype], "ACC": tl.float32, "CHUNK": chunk, "BLOCK": block,
                         "ALIGNED": True, **extra}
                signature.update({k: "constexpr" for k in const})
                src = ASTSource(fn=getattr(K, name.split("/")[0]), signature=signature, constexprs=const)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
                ptx = compiled.asm["ptx"]
                rows.append({
                    "arch": arch, "dtype": dtype, "kernel": name, "cubin_bytes": len(compiled.asm["cubin"]),
                    "vector_loads": ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
                    "global_loads": ptx.count("ld.global"),
                })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=list(_DTYPES), choices=_DTYPES)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = compile_all(args.arch, args.dtype)
    bad = 0
    for r in rows:
        ok = r["vector_loads"] > 0
        bad += not ok
        verdict = "ok" if ok else "NO VECTOR LOADS"
        print(f"sm_{r['arch']} {r['dtype']:>4} {r['kernel']:<24} cubin {r['cubin_bytes']:>7} B  "
              f"ld.global.v4 {r['vector_loads']:>3} / ld.global {r['global_loads']:>3}  {verdict}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
