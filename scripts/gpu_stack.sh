#!/usr/bin/env bash
# The GPU machines' software stack, on this (CPU) machine: PyTorch 2.11.0 (the CUDA 13.0 build PyPI serves for Linux
# x86_64) and Triton 3.6.0 in a cached virtual environment; there, fastasam is built for real (fastasam._C for sm_80
# and sm_90 with the machine's nvcc), imported, its Triton kernels compiled for sm_80/sm_90, and the test suite run
# (on the CPU: Triton's interpreter, no GPU).
#
#   make gpu-stack                 # or: bash scripts/gpu_stack.sh [pytest args...]
#
# GPU_STACK (default .venv/gpu-stack) is the environment: made once (~5 GB of wheels), reused after. The working
# tree is copied into $GPU_STACK/src (tracked and untracked, not ignored, files) and built there, so the repository's
# own in-place build (for the CPU torch) is left alone. CUDA_HOME: as setup.py finds it (CUDA_HOME, else the
# folder above nvcc or /usr/local/cuda, whichever has include/cuda_runtime.h).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STACK=$(realpath -m "${GPU_STACK:-.venv/gpu-stack}")
TORCH_VERSION=2.11.0
TRITON_VERSION=3.6.0
PY=${PYTHON:-python3}
t0=$SECONDS
say() { printf '[gpu-stack %4ds] %s\n' "$((SECONDS - t0))" "$*"; }

if [ ! -x "$STACK/bin/python" ]; then
  say "making the environment $STACK"
  "$PY" -m venv "$STACK"
fi
# numpy<2.4: Triton 3.6's interpreter turns a one-element array into an int with int(array), which NumPy 2.4 made an
# error ("only 0-dimensional arrays can be converted to Python scalars"; Triton 3.9 squeezes first). Compiled kernels
# on a GPU do not use numpy.
if ! "$STACK/bin/python" -c "import numpy, setuptools, wheel, torch, triton, sys; sys.exit(not (numpy.lib.NumpyVersion(numpy.__version__) < '2.4.0' and torch.__version__.startswith('$TORCH_VERSION') and triton.__version__ == '$TRITON_VERSION'))" 2>/dev/null; then
  say "installing torch==$TORCH_VERSION triton==$TRITON_VERSION (CUDA 13.0 build; several GB, once)"
  "$STACK/bin/pip" install -q "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "numpy<2.4" setuptools wheel
fi
# ninja: the cuda backend's just-in-time build (tests/test_cuda_backend.py compiles it for real here)
"$STACK/bin/python" -c "import ninja" 2>/dev/null || "$STACK/bin/pip" install -q ninja
"$STACK/bin/python" -c "import torch, triton; print('[gpu-stack] torch', torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__)"

say "copying the working tree to $STACK/src"
mkdir -p "$STACK/src"
# a fresh copy: files an earlier copy had and the tree no longer has (a removed test) must not run; build/ is kept
find "$STACK/src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
# (a tracked file deleted in the working tree is not in it: left out)
git ls-files -z --cached --others --exclude-standard | grep -zv '^\.venv/' \
  | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
  | tar -C "$ROOT" --null -T - -cf - | tar -C "$STACK/src" -xf -
cd "$STACK/src"
rm -f fastasam/*.so

say "building fastasam there (fastasam._C for sm_80/sm_90 and fastasam._host; a few minutes the first time)"
FASTASAM_BUILD_CUDA=1 FASTASAM_BUILD_HOST=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" \
  "$STACK/bin/pip" install -q --no-build-isolation -e ".[test,bench]"
"$STACK/bin/python" - <<'EOF'
import torch
import fastasam._C, fastasam._host  # noqa: F401
from fastasam.backends._signatures import KERNELS
ops = [n for n in KERNELS if hasattr(torch.ops.fastasam, n)]
print(f"[gpu-stack] fastasam._C imports; torch.ops.fastasam: {', '.join(ops)}")
EOF

say "compiling every Triton kernel for sm_80 and sm_90 (Triton $TRITON_VERSION)"
"$STACK/bin/python" -m fastasam.kernels.compile_check

say "running the test suite on this stack (CPU; Triton's interpreter)"
"$STACK/bin/python" -m pytest -q -p no:cacheprovider "$@"
say "done"
