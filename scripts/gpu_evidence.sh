#!/usr/bin/env bash
# GPU evidence in a few device calls: each phase is self-contained (builds what it needs) and ends in under 9 minutes
# on the lent machines (16 cores; the device tool stops a command at 10 and may hand a bare machine to the next call).
#
#   bash scripts/gpu_evidence.sh PHASE [PHASE...]      phases: env build tests sanitize bench   (all: every phase)
#   make gpu-evidence PHASES="env build tests"
#
# Logs and results go to benchmarks/results/gpu/ (commit them) and, when $OUT is set (the device tool), to
# $OUT/gpu-evidence-<phases>.tar.gz plus the suite's own files (the tool brings back at most 8 files).
# Without a CUDA GPU it says so and exits 2, doing nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=benchmarks/results/gpu
LIMIT=${PHASE_LIMIT_S:-500}  # per phase: under the device tool's 10 minutes, with room for the transfers
t0=$SECONDS
say() { printf '[gpu-evidence %4ds] %s\n' "$((SECONDS - t0))" "$*"; }

if [ $# -eq 0 ]; then
  sed -n '2,10p' "$0"
  exit 1
fi
phases=("$@")
[ "${phases[0]}" = all ] && phases=(env build tests sanitize bench)

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-evidence: no CUDA GPU is visible to PyTorch here ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1)),"
  echo "so there is nothing to measure. Run it on a GPU machine (the device tool), e.g.:"
  echo "  bash scripts/gpu_evidence.sh env build tests     then     bash scripts/gpu_evidence.sh sanitize bench"
  exit 2
fi

mkdir -p "$RESULTS"

build() {  # the extension, for this GPU only (fast: ~1 min with 16 cores); a no-op when it is already built here
  if "$PY" -c "import fastasam._C" 2>/dev/null; then return 0; fi
  say "building fastasam (fastasam._C for this GPU)"
  FASTASAM_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-build-isolation --no-deps -e . &&
    "$PY" -c "import fastasam._C; print('fastasam._C built and imported')"
}

run_phase() {
  local phase=$1 log="$RESULTS/$1.log"
  say "phase $phase -> $log"
  {
    echo "# gpu-evidence phase $phase, commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo -dirty), $(date -u +%FT%TZ)"
    case $phase in
      env)
        nvidia-smi || true
        nvcc --version || true
        "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'CUDA', torch.version.cuda); print('device', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
        "$PY" -c "import triton; print('triton', triton.__version__)" || true
        "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|pytest|ninja|timm|lightning|torchvision) " || true
        ;;
      build)
        build && "$PY" -m fastasam.kernels.compile_check && "$PY" -m fastasam --check
        ;;
      tests)
        build && timeout "$LIMIT" "$PY" -m pytest -q -p no:cacheprovider -ra
        ;;
      sanitize)
        build && for tool in memcheck racecheck; do
          echo "## compute-sanitizer --tool $tool"
          timeout $((LIMIT / 2)) compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" scripts/gpu_small_run.py
          echo "compute-sanitizer $tool exit: $?"
        done
        ;;
      bench)
        build && timeout "$LIMIT" "$PY" -m benchmarks && cp benchmarks/results/suite-cuda.* "$RESULTS/" 2>/dev/null
        ;;
      *)
        echo "unknown phase $phase (env build tests sanitize bench)"
        false
        ;;
    esac
    echo "# phase $phase exit: $?"
  } 2>&1 | tee "$log"
}

status=0
for phase in "${phases[@]}"; do
  run_phase "$phase"
  tail -1 "$RESULTS/$phase.log" | grep -q "exit: 0$" || status=1
done
if [ -n "${OUT:-}" ]; then
  name="gpu-evidence-$(IFS=-; echo "${phases[*]}").tar.gz"
  tar -czf "$OUT/$name" "$RESULTS" && say "bundled $RESULTS into \$OUT/$name"
  cp benchmarks/results/suite-cuda.* "$OUT/" 2>/dev/null || true
fi
say "done (status $status)"
exit $status
