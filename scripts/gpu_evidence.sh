#!/usr/bin/env bash
# The GPU evidence in two self-contained parts, one command each, each at most 8 minutes on a bare GPU machine (the
# device tool stops a command at 10; about 15 minutes of GPU time in all, machine starts included). The most
# decisive part first:
#
#   bash scripts/gpu_evidence.sh part1   # the driver against torch's CUDA build, fastasam._C built for this GPU only,
#                                        # python -m fastasam --check, the kernel/oracle tests on the GPU,
#                                        # compute-sanitizer memcheck and racecheck over scripts/gpu_small_run.py
#   bash scripts/gpu_evidence.sh part2   # optimizer step time (ResNet-50 fp32 and bf16, 50 rounds; then ViT-B/16
#                                        # and GPT-2-medium) and the end-to-end ResNet-50 step (30 rounds)
#   bash scripts/gpu_evidence.sh tests   # prints the pytest arguments of part 1's test selection, one a line
#   make gpu-evidence PART=1             # or PART=2
#
# Every step runs under `timeout`: its own cap, cut to what is left of the part's budget (PART_BUDGET_S, default
# 450 s); a step that finds too little left is recorded as not run. Results go to benchmarks/results/gpu/
# (GPU_EVIDENCE_RESULTS) as each step ends: part<N>-<step>.log, part<N>-summary.txt (each step's status and time)
# and the benchmarks' json/md, each stamped with the device, driver, torch/Triton/CUDA versions, commit and date.
# When $OUT is set (the device tool) they are copied there after every step: the summary, the step logs and
# gpu-evidence-part<N>.tar.gz of the folder (8 files at most), so a part that fails or is killed midway still brings
# back what it did.
# Exit status: 0 every step passed; 1 a step failed or did not run; 2 no GPU here (nothing is written); 3 the driver
# or this PyTorch cannot use the GPU (the reason is printed and logged, and the part stops).
set -uo pipefail
cd "$(dirname "$0")/.."
SELF=scripts/gpu_evidence.sh
PY=${PYTHON:-python3}
RESULTS=${GPU_EVIDENCE_RESULTS:-benchmarks/results/gpu}
BUDGET=${PART_BUDGET_S:-450}
RESERVE=15  # seconds kept for the last copy to $OUT
t0=$SECONDS
say() { printf '[gpu-evidence %4ds] %s\n' "$((SECONDS - t0))" "$*"; }

# Part 1's tests: the tests parametrised over the kernel backends (`triton`, `cuda`) on the `cuda` device (ids
# "...[triton-cuda..." and "...[cuda-cuda..."), the built extension against the oracle on the GPU, and opcheck of
# the ops' real launches. Left out by the -k expression (the CPU and `make gpu-stack` run them): the just-in-time
# build (test_the_just_in_time_build_compiles_and_registers_the_ops: minutes of nvcc) and every test that is not
# parametrised over a GPU backend (Triton's compile-only checks, the CPU shim, packaging).
TEST_ARGS=(tests -q -p no:cacheprovider -ra --durations=15
  -k "triton-cuda or cuda-cuda or on_the_gpu or opcheck_schema_and_fake_on_every_launch"
  --deselect tests/test_cuda_backend.py::test_the_just_in_time_build_compiles_and_registers_the_ops)

usage() { sed -n '2,22p' "$SELF"; }

# --- internal steps (each runs in its own process, under timeout) --------------------------------------------------
torch_probe() {  # "<torch version> <CUDA version|none> <GPUs torch sees> <capability|->"
  "$PY" -c 'import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
cap = "%d.%d" % torch.cuda.get_device_capability(0) if n else "-"
print(torch.__version__, torch.version.cuda or "none", n, cap)' 2>/dev/null | tail -1
}

step_env() {  # nvidia-smi and the driver against what torch's CUDA build needs; versions
  nvidia-smi || return 3
  local smi driver driver_cuda torch_v torch_cuda ngpu cap
  smi=$(nvidia-smi)
  driver=$(sed -n 's/.*Driver Version: *\([0-9.]*\).*/\1/p' <<<"$smi" | head -1)
  driver_cuda=$(sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' <<<"$smi" | head -1)
  read -r torch_v torch_cuda ngpu cap <<<"$(torch_probe)"
  echo "driver ${driver:-?} (supports CUDA ${driver_cuda:-?}); torch ${torch_v:-?} built for CUDA ${torch_cuda:-?};" \
       "GPUs torch sees: ${ngpu:-?}, capability ${cap:-?}"
  if [ -z "${torch_v:-}" ]; then
    echo "STOP: $PY cannot import torch"; return 3
  fi
  if [ "$torch_cuda" = none ]; then
    echo "STOP: torch $torch_v is a CPU build: it cannot use the GPU. Use a CUDA build of PyTorch (PYTHON=...)."
    return 3
  fi
  if [ -z "$driver_cuda" ] || [ "${driver_cuda%%.*}" -lt "${torch_cuda%%.*}" ]; then
    echo "STOP: the driver ${driver:-?} supports CUDA ${driver_cuda:-?}, but torch $torch_v is built for CUDA" \
         "$torch_cuda and needs a driver for CUDA ${torch_cuda%%.*}.x (CUDA 13: R580 or newer; CUDA 12: R525 or" \
         "newer). Update the driver, or use a torch built for the driver's CUDA (${driver_cuda:-?} or older)."
    return 3
  fi
  if [ "${ngpu:-0}" -lt 1 ]; then
    echo "STOP: nvidia-smi sees a GPU but torch $torch_v does not (torch.cuda.is_available() is False)."
    "$PY" -c "import torch; torch.cuda.init()" 2>&1 | tail -3
    return 3
  fi
  echo "ok: the driver fits torch's CUDA $torch_cuda build"
  nvcc --version 2>&1 | tail -2
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| device', torch.cuda.get_device_name(0))"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|pytest|ninja|torchvision) " || true
}

step_build() {  # fastasam (and fastasam._C for this GPU's architecture only); a no-op when both are built here
  local cap
  cap=$(torch_probe | awk '{print $4}')
  if "$PY" -c "import fastasam._C, fastasam._host" 2>/dev/null; then
    echo "fastasam._C is already built here"
  else
    echo "building fastasam with fastasam._C for sm_${cap/./} (TORCH_CUDA_ARCH_LIST=$cap)"
    FASTASAM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$cap MAX_JOBS=${MAX_JOBS:-16} \
      "$PY" -m pip install -q --no-build-isolation --no-deps -e . || return 1
  fi
  "$PY" -c "import fastasam._C as c; print('fastasam._C imports; built for', getattr(c, 'archs', '?'))"
}

step_sanitize() {  # TOOL: compute-sanitizer over the small run (the cuda backend's kernels, and Triton's for memcheck)
  local tool=$1 args=() out rc
  [ "$tool" = racecheck ] && args=(--backends cuda)  # racecheck: shared memory, the CUDA kernels' block sums
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer is not on PATH"; return 1; }
  # without the caching allocator every tensor is its own allocation, so memcheck sees an access past its end
  out=$(PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 9 \
        "$PY" scripts/gpu_small_run.py --steps 2 "${args[@]}" 2>&1)
  rc=$?
  echo "$out"
  if grep -q "Device not supported" <<<"$out"; then
    echo "compute-sanitizer cannot attach to this machine's GPU (Device not supported): $tool did not run"
    return 4
  fi
  return $rc
}

# --- the parts ------------------------------------------------------------------------------------------------------
header() {  # one line: what every result file carries
  echo "# fastasam gpu-evidence part $PART, step $1: ${ENV_LINE:-environment not read yet}, commit $COMMIT," \
       "$(date -u +%FT%TZ)"
}

stamp() {  # the benchmarks' json/md written since $1 (seconds since the epoch) get the environment line
  local since=$1 f line
  line=$(header "$2")
  while IFS= read -r f; do
    case $f in
      *.md) printf '%s\n\n%s\n' "<!-- ${line#\# } -->" "$(cat "$f")" >"$f.tmp" && mv "$f.tmp" "$f" ;;
      *.json) "$PY" -c 'import json, sys; p = sys.argv[1]; d = json.load(open(p)); d["gpu_evidence"] = sys.argv[2]
json.dump(d, open(p, "w"), indent=2)' "$f" "${line#\# }" ;;
    esac
  done < <(find "$RESULTS" -maxdepth 1 -newermt "@$since" \( -name '*.json' -o -name '*.md' \) ! -name 'part*')
}

publish() {  # copy what this part wrote so far to $OUT (the device tool brings back at most 8 files)
  [ -n "${OUT:-}" ] || return 0
  local f n=0
  cp "$SUMMARY" "$OUT/" 2>/dev/null && n=1
  for f in "$RESULTS"/part"$PART"-*.log; do
    [ -f "$f" ] && [ $n -lt 7 ] && cp "$f" "$OUT/" && n=$((n + 1))
  done
  tar -czf "$OUT/gpu-evidence-part$PART.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null
}

record() {  # STEP STATUS SECONDS: a line of the summary
  printf '%-24s %-60s %4ss\n' "$1" "$2" "$3" >>"$SUMMARY"
}

failed=0
run_step() {  # NAME CAP_S CMD...: CMD under timeout, its output in part<N>-NAME.log (and here); the summary updated
  local name=$1 cap=$2 log left t s rc started status
  shift 2
  log="$RESULTS/part$PART-$name.log"
  left=$((BUDGET - (SECONDS - t0) - RESERVE))
  if [ "$left" -lt 20 ]; then
    record "$name" "NOT RUN: the part's ${BUDGET} s are spent" 0
    failed=1
    publish
    return 1
  fi
  t=$((cap < left ? cap : left))
  say "step $name (at most ${t} s): $*"
  s=$SECONDS
  started=$(date +%s)
  { header "$name"; echo "# $* (timeout ${t} s)"; } >"$log"
  timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMED OUT after ${t} s (its cap)" ;;
    3) status="STOPPED: the GPU cannot be used (see the log)" ;;
    4) status="NOT SUPPORTED on this machine (see the log)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  echo "# step $name: $status, $((SECONDS - s)) s" >>"$log"
  record "$name" "$status" "$((SECONDS - s))"
  stamp "$started" "$name"
  [ "$rc" -eq 0 ] || failed=1
  publish
  return "$rc"
}

case "${1:-}" in
  part1 | 1) PART=1 ;;
  part2 | 2) PART=2 ;;
  tests) printf '%s\n' "${TEST_ARGS[@]}"; exit 0 ;;
  _env) step_env; exit ;;
  _build) step_build; exit ;;
  _sanitize) step_sanitize "$2"; exit ;;
  *) usage; exit 1 ;;
esac

# No GPU: say so and write nothing.
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  read -r torch_v torch_cuda ngpu _ <<<"$(torch_probe)"
  if [ "${ngpu:-0}" -lt 1 ]; then
    echo "gpu-evidence: no CUDA GPU is visible here (nvidia-smi lists none; torch ${torch_v:-not importable}" \
         "sees ${ngpu:-0}), so there is nothing to measure. Run it on a GPU machine (the device tool):"
    echo "  bash scripts/gpu_evidence.sh part1      then      bash scripts/gpu_evidence.sh part2"
    exit 2
  fi
fi

mkdir -p "$RESULTS"
SUMMARY="$RESULTS/part$PART-summary.txt"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo -dirty)"
ENV_LINE=""
{ header summary; echo "# budget ${BUDGET} s"; } >"$SUMMARY"
rm -f "$RESULTS"/part"$PART"-*.log

if ! run_step env 60 bash "$SELF" _env; then
  say "the GPU cannot be used here: see $RESULTS/part$PART-env.log"
  exit 3
fi
read -r _ torch_cuda _ cap <<<"$(torch_probe)"
ENV_LINE="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)"
ENV_LINE+=" (sm_${cap/./}), driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
ENV_LINE+=", torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) (CUDA $torch_cuda)"
ENV_LINE+=", triton $("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null || echo none)"
ENV_LINE+=", nvcc $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
sed -i "1s|.*|$(header summary)|" "$SUMMARY"

if run_step build 240 bash "$SELF" _build; then
  if [ "$PART" = 1 ]; then
    run_step check 90 "$PY" -m fastasam --check
    run_step tests 200 "$PY" -m pytest "${TEST_ARGS[@]}"
    run_step memcheck 100 bash "$SELF" _sanitize memcheck
    run_step racecheck 100 bash "$SELF" _sanitize racecheck
  else
    bench=(--out "$RESULTS" --steps 50 --warmup 10)
    # fp32: every variant, the published loops and the compiled step included; the others: fastasam's backends
    # against the official loop and the copy that measures the floor (the compile alone takes a minute)
    short=(--variants asam-reference asam-triton asam-cuda asam-auto asam-official sam-auto sam-sam.py sgd copy)
    run_step step_time-resnet50-fp32 120 "$PY" -m benchmarks.step_time --param-sets resnet50 --dtype float32 "${bench[@]}"
    run_step step_time-resnet50-bf16 90 "$PY" -m benchmarks.step_time --param-sets resnet50 --dtype bfloat16 \
      "${bench[@]}" "${short[@]}"
    run_step e2e-resnet50 120 "$PY" -m benchmarks.e2e --arch resnet50 --batch 256 --amp bf16 --steps 30 --warmup 5 \
      --out "$RESULTS"
    run_step step_time-vit-gpt2 120 "$PY" -m benchmarks.step_time --param-sets vit_b16 gpt2_medium --dtype float32 \
      "${bench[@]}" "${short[@]}"
  fi
fi
say "part $PART done: $(grep -c ' ok ' "$SUMMARY") steps ok; $SUMMARY"
cat "$SUMMARY"
exit $failed
