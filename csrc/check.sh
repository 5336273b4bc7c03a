#!/usr/bin/env bash
# Compile every pure-CUDA source for sm_80 (A100) and sm_90 (H100/H200) with nvcc, warnings as errors, and report
# the 16-byte vector loads in each kernel's PTX. Needs only nvcc (no GPU, no PyTorch): CI runs it.
# The floating-point contraction policy (multi_tensor.cu's header): compiled with -fmad=false, as setup.py and the
# just-in-time build compile it (fastasam/_toolchain.py: NVCC_FLAGS), the PTX must hold no fma and no add/sub/mul
# without a rounding mode (ptxas may fuse those). A deliberate __fmaf_rn / fma() would show there too: the kernels
# have none.
# binding.cpp needs PyTorch's CUDA headers and is compiled by setup.py where those exist.
set -euo pipefail
cd "$(dirname "$0")"
NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "csrc/check.sh: nvcc not found (set NVCC=/path/to/nvcc); CUDA sources not checked" >&2
    exit 1
fi
NVCC_FLAGS=(-std=c++17 -O3 -fmad=false)
# the kernels' entry points, from the table of every kernel's signature (needs python3 alone: the table imports nothing
# but the table layout); csrc/ sits beside fastasam/ in a checkout and inside it where installed
PYTHON="${PYTHON:-python3}"
for sig in ../fastasam/backends/_signatures.py ../backends/_signatures.py; do
    [ -f "$sig" ] && break
done
if ! ENTRIES="$("$PYTHON" "$sig" cuda-entries)" || [ -z "$ENTRIES" ]; then
    echo "csrc/check.sh: could not read the kernels' entry points from $sig (fastasam/backends/_signatures.py)" >&2
    exit 1
fi
# a contracted (fma) or contractible (add/sub/mul without a rounding mode) floating-point PTX instruction
CONTRACTED='^\s*(@!?%p[0-9]+\s+)?(fma(\.[a-z0-9]+)*|(add|sub|mul)(\.ftz)?(\.sat)?)\.(f16|bf16|f32|f64|f16x2|bf16x2)\s'
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for src in *.cu; do
    for arch in 80 90; do
        "$NVCC" "${NVCC_FLAGS[@]}" -arch=sm_$arch -Werror all-warnings -Xcompiler -Wall,-Wextra -c "$src" \
            -o "$out/${src%.cu}.sm_$arch.o"
        "$NVCC" "${NVCC_FLAGS[@]}" -arch=sm_$arch -ptx "$src" -o "$out/${src%.cu}.sm_$arch.ptx"
        n=$(grep -cE "$CONTRACTED" "$out/${src%.cu}.sm_$arch.ptx" || true)
        if [ "$n" -ne 0 ]; then
            echo "csrc/check.sh: $src sm_$arch: $n contracted or contractible floating-point instructions in the PTX" \
                 "(fma, or add/sub/mul without .rn); the kernels must round every product and sum" >&2
            grep -m 5 -nE "$CONTRACTED" "$out/${src%.cu}.sm_$arch.ptx" >&2
            exit 1
        fi
        printf '  %s sm_%s no fma, every fp add/sub/mul rounded (.rn)\n' "$src" "$arch"
        ptx="$out/${src%.cu}.sm_$arch.ptx"
        # every __global__ kernel is one of the table's (three instantiations each: fp32, fp16, bf16)
        total=$(grep -cE '^\.(visible )?\.?entry' "$ptx" || true)
        listed=0
        for k in $ENTRIES; do
            listed=$((listed + $(grep -E '^\.(visible )?\.?entry' "$ptx" | grep -c "${#k}${k}I" || true)))
        done
        if [ "$total" -ne "$listed" ]; then
            echo "csrc/check.sh: $src sm_$arch: $total kernels in the PTX, $listed of them in the table of kernels" \
                 "(fastasam/backends/_signatures.py: KERNELS; a fused update: FA_FUSED_UPDATES in csrc/elementwise.h)" >&2
            grep -E '^\.(visible )?\.?entry' "$ptx" >&2
            exit 1
        fi
        for k in $ENTRIES; do
            # 16-byte loads in each kernel's three instantiations (fp32, fp16, bf16)
            n=$(awk -v k="$k" '/^\.visible \.entry|^\.entry/ {f = index($0, k "I") > 0} f && /ld\.global(\.cg|\.nc)?\.v4/ {c++}
                END {print c + 0}' "$out/${src%.cu}.sm_$arch.ptx")
            if [ "$n" -lt 3 ]; then
                echo "csrc/check.sh: $src sm_$arch: $k has $n 16-byte loads (expected >= 3, one per dtype)" >&2
                exit 1
            fi
            printf '  %s sm_%s %-20s %3d x ld.global.v4\n' "$src" "$arch" "$k" "$n"
        done
        echo "ok: $src sm_$arch"
    done
done

# binding.cpp: a syntax check against the installed PyTorch's headers where they are (the CPU wheel ships c10/cuda but
# not the header CMake generates for CUDA builds, which a stub stands in for here).
if inc="$("$PYTHON" -c 'import sysconfig, torch.utils.cpp_extension as c
print(" ".join(["-isystem" + p for p in c.include_paths()] + ["-isystem" + sysconfig.get_paths()["include"]]))' \
        2>/dev/null)"; then
    mkdir -p "$out/stub/c10/cuda/impl"
    echo '#pragma once' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
    # the CUDA headers nvcc itself uses (CUDA_HOME/include when set)
    cuda_inc="${CUDA_HOME:+$CUDA_HOME/include}"
    cuda_inc="${cuda_inc:-$("$NVCC" -v -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)}"
    # shellcheck disable=SC2086
    "${CXX:-g++}" -std=c++17 -fsyntax-only -Wall -Wextra -Werror $inc -isystem "$out/stub" -isystem "$cuda_inc" \
        -DTORCH_EXTENSION_NAME=_C binding.cpp
    echo "ok: binding.cpp (syntax, against torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
else
    echo "csrc/check.sh: PyTorch not importable with $PYTHON: binding.cpp not checked"
fi
