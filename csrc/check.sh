#!/usr/bin/env bash
# Compile every pure-CUDA source for sm_80 (A100) and sm_90 (H100/H200) with nvcc, warnings as errors, and report
# the 16-byte vector loads in each kernel's PTX. Needs only nvcc (no GPU, no PyTorch): CI runs it.
# binding.cpp needs PyTorch's CUDA headers and is compiled by setup.py where those exist.
set -euo pipefail
cd "$(dirname "$0")"
NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "csrc/check.sh: nvcc not found (set NVCC=/path/to/nvcc); CUDA sources not checked" >&2
    exit 1
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for src in *.cu; do
    for arch in 80 90; do
        "$NVCC" -std=c++17 -O3 -arch=sm_$arch -Werror all-warnings -Xcompiler -Wall,-Wextra -c "$src" \
            -o "$out/${src%.cu}.sm_$arch.o"
        "$NVCC" -std=c++17 -O3 -arch=sm_$arch -ptx "$src" -o "$out/${src%.cu}.sm_$arch.ptx"
        for k in sqnorm_kernel perturb_kernel restore_kernel restore_sgd_kernel restore_adam_kernel; do
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
