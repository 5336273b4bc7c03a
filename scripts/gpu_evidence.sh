#!/usr/bin/env bash
# fastasam's GPU evidence: that it builds for this GPU, passes its kernel tests against the oracle there, and how fast
# its optimizer step is, in two commands of at most 8 minutes each on a freshly started machine with one NVIDIA GPU
# and the source tree (nothing built). The machine needs a CUDA build of PyTorch with Triton, pytest (pytest-xdist
# and pytest-timeout are used where installed), setuptools, ninja and the CUDA toolkit (nvcc, compute-sanitizer);
# nothing is downloaded. docs/guides/gpu-evidence.md says what each step checks.
#
#   make gpu-evidence                  # the first command: the most valuable evidence, its steps' caps summed <= 480 s
#   make gpu-evidence PART=2           # the second, optional: the rest
#   make gpu-evidence DRY_RUN=1        # the plan, on any machine (PART=2 too): a line per step with its cap, what
#                                      # each test selection collects (pytest --collect-only), the caps' sum
#   bash scripts/gpu_evidence.sh part1|part2 [--dry-run]
#   bash scripts/gpu_evidence.sh selection tests-triton|tests-cuda   # a selection's pytest arguments, one a line
#   bash scripts/gpu_evidence.sh sources-hash                        # the hash of the sources the results record
#
# The first command, in order: env (the driver against torch's CUDA build; the versions), install (fastasam from
# this tree, editable, no extensions), tests-triton (the Triton kernels, foreach and the CUDA-graph replay on the
# GPU against the oracle) while fastasam._C is built in the background for this GPU's architecture alone, build
# (waits for it), check (python -m fastasam --check), tests-cuda (the CUDA kernels against the oracle, opcheck of
# their real launches, the graph replay), step-time-resnet50-fp32 (fastasam's triton and cuda backends, MSAM, the
# official asam.py loop, the reference loop, SGD and a copy), memcheck (compute-sanitizer over a small run of every
# kernel). The second: bf16, the end-to-end step, racecheck, ViT-B/16 and GPT-2 medium, the torch.compile baseline,
# a longer memcheck.
#
# Every step runs under `timeout` with its own cap, cut to what is left of the command's budget (PART_BUDGET_S,
# default 480 s); a step that finds too little left, or whose input failed (tests-cuda without fastasam._C), is
# recorded as not run. Results: benchmarks/results/gpu/<GPU name>/ (GPU_EVIDENCE_RESULTS: another folder than
# benchmarks/results/gpu), written as each step ends: part<N>-<step>.log, part<N>-summary.txt (a line per step: name,
# cap, seconds, status), environment.txt, the benchmarks' json/md/png, each stamped with the device, driver,
# torch/Triton/CUDA versions, commit (GPU_EVIDENCE_COMMIT where the tree has no git metadata), sources hash and date.
# When OUT names a folder, the summary, environment.txt, an archive of the results folder and the logs of the steps
# that did not pass are copied there after every step.
# Exit status: 0 every step passed; 1 a step failed or did not run (or, dry run, a selection did not collect);
# 2 no GPU here (nothing is written); 3 the driver or this PyTorch cannot use the GPU (the reason is printed and
# logged, and the command stops).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SELF=scripts/gpu_evidence.sh
PY=${PYTHON:-python3}
RESULTS_ROOT=${GPU_EVIDENCE_RESULTS:-benchmarks/results/gpu}
BUDGET=${PART_BUDGET_S:-480}
LIMIT=480        # the first command's caps, its setup (install, build, imports) included, sum to at most this
RESERVE=5        # seconds kept for the summary and the last copy
BUILD_OUT=build/gpu-evidence  # the extensions' build folders (ignored by git)
t0=$SECONDS
say() { printf '[gpu-evidence %4ds] %s\n' "$((SECONDS - t0))" "$*"; }

# --- the test selections: what each names, why ---------------------------------------------------------------------
# Collected as on a GPU: conftest.py parametrises the kernel tests over (backend, device), ids "...[<backend>-cuda...",
# where the backend works on the device; the cuda backend's cases exist only where fastasam._C imports.
# tests-triton runs while fastasam._C builds (FASTASAM_PREBUILT=0: it never touches the build):
#   triton-cuda                      every Triton kernel test on the GPU against the oracle or torch
#   foreach-cuda and (...)           the foreach backend (auto's fallback) on the GPU: the trajectories, phases,
#                                    determinism and checkpoints against the oracle, every variant against it
#   replays_like_eager and ...       the warm step captured in a CUDA graph and replayed (triton, foreach)
#   capturing_a_cold_step_on_the_gpu and triton, pinned_memory_on_the_gpu and triton-
#                                    a cold step under capture raises; a warm step copies only from pinned memory
SEL_TRITON=(tests -k "triton-cuda or foreach-cuda and (trajectory_matches_reference or phases_match_reference or \
deterministic or state_dict_reload or equals_the_oracle or equals_the_reference) or replays_like_eager and (triton- or \
foreach-) or capturing_a_cold_step_on_the_gpu and triton or pinned_memory_on_the_gpu and triton-")
# tests-cuda runs once fastasam._C is built:
#   cuda-cuda                        every CUDA kernel test on the GPU against the oracle or torch
#   built_extension_steps_like_the_oracle_on_the_gpu, opcheck_schema_and_fake_on_every_launch
#                                    the built extension's steps; torch.library.opcheck of the ops' real launches
#   replays_like_eager and cuda-     the warm step captured in a CUDA graph and replayed
#   capturing_a_cold_step_on_the_gpu and cuda], pinned_memory_on_the_gpu and cuda-
SEL_CUDA=(tests -k "cuda-cuda or built_extension_steps_like_the_oracle_on_the_gpu or \
opcheck_schema_and_fake_on_every_launch or replays_like_eager and cuda- or capturing_a_cold_step_on_the_gpu and cuda] \
or pinned_memory_on_the_gpu and cuda-")
# the environment each selection runs (and is collected) in: no CPU shim of the CUDA kernels (a CPU test device),
# never a just-in-time build of the CUDA extension (the build step builds it)
ENV_TRITON=(FASTASAM_CUDA_SHIM=0 FASTASAM_JIT=0 FASTASAM_PREBUILT=0)
ENV_CUDA=(FASTASAM_CUDA_SHIM=0 FASTASAM_JIT=0)

selection() {  # NAME: the selection's pytest arguments, one a line
  case $1 in
    tests-triton) printf '%s\n' "${SEL_TRITON[@]}" ;;
    tests-cuda) printf '%s\n' "${SEL_CUDA[@]}" ;;
    *) echo "gpu-evidence: unknown selection '$1' (tests-triton or tests-cuda)" >&2; return 1 ;;
  esac
}

sources_hash() {  # a hash of the sources as they are here (the same command over a checkout gives the same value)
  find fastasam csrc kernels benchmarks scripts tests setup.py pyproject.toml -type f \
       \( -name '*.py' -o -name '*.cu' -o -name '*.h' -o -name '*.cpp' -o -name '*.sh' -o -name '*.toml' \) \
       -not -path '*/__pycache__/*' -print0 2>/dev/null | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

commit_of_tree() {
  local c
  if c=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || c+="-dirty"
    echo "$c"
  else
    echo "${GPU_EVIDENCE_COMMIT:-unknown (no git metadata here; GPU_EVIDENCE_COMMIT names it)}"
  fi
}

# --- internal steps (each runs in its own process, under timeout) ----------------------------------------------------
torch_probe() {  # "<torch version> <CUDA version|none> <GPUs torch sees> <capability|->"
  "$PY" -c 'import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
cap = "%d.%d" % torch.cuda.get_device_capability(0) if n else "-"
print(torch.__version__, torch.version.cuda or "none", n, cap)' 2>/dev/null | tail -1 || true
}

step_env() {  # nvidia-smi and the driver against what torch's CUDA build needs; the versions into environment.txt
  nvidia-smi || return 3
  local smi driver driver_cuda torch_v torch_cuda ngpu cap
  smi=$(nvidia-smi)
  driver=$(sed -n 's/.*Driver Version: *\([0-9.]*\).*/\1/p' <<<"$smi" | head -1)
  driver_cuda=$(sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' <<<"$smi" | head -1)
  read -r torch_v torch_cuda ngpu cap <<<"$(torch_probe)" || true
  echo "driver ${driver:-?} (supports CUDA ${driver_cuda:-?}); torch ${torch_v:-?} built for CUDA ${torch_cuda:-?};" \
       "GPUs torch sees: ${ngpu:-?}, capability ${cap:-?}"
  if [ -z "${torch_v:-}" ]; then
    echo "STOP: $PY cannot import torch: name the Python of a CUDA build of PyTorch with PYTHON=..."; return 3
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
    "$PY" -c "import torch; torch.cuda.init()" 2>&1 | tail -3 || true
    return 3
  fi
  echo "ok: the driver fits torch's CUDA $torch_cuda build"
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(commit_of_tree)"
    echo "sources sha256: $(sources_hash) (bash scripts/gpu_evidence.sh sources-hash)"
    echo "driver: ${driver:-?} (supports CUDA ${driver_cuda:-?})"
    echo "nvcc: $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' || true)"
    echo "compute-sanitizer: $(compute-sanitizer --version 2>/dev/null | sed -n 's/.*Version \(.*\)/\1/p' | head -1 || true)"
    echo "CPUs: $(nproc)"
    "$PY" - <<'EOF' 2>&1 || true
import importlib, platform, torch
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
print(f"python: {platform.python_version()}; torch: {torch.__version__} (CUDA {torch.version.cuda})")
for name in ("triton", "numpy", "pytest", "xdist", "pytest_timeout", "torchvision", "matplotlib", "setuptools"):
    try:
        print(f"{name}: {getattr(importlib.import_module(name), '__version__', 'installed')}")
    except ImportError:
        print(f"{name}: not installed")
EOF
  } | tee "$DIR/environment.txt"
}

fastasam_from_tree() {  # fastasam imports from this tree, fastasam.kernels included (cwd elsewhere: no shadowing)
  (cd /tmp && "$PY" -c 'import sys, fastasam, fastasam.kernels
sys.exit(0 if fastasam.__file__.startswith(sys.argv[1]) else 1)' "$ROOT/") >/dev/null 2>&1
}

step_install() {  # fastasam from this tree, editable, without extensions (the build step adds them): offline
  if fastasam_from_tree; then
    echo "fastasam is already installed from this tree"
    return 0
  fi
  FASTASAM_BUILD_CUDA=0 FASTASAM_BUILD_HOST=0 \
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -q -e . || {
      echo "fastasam could not be installed from this tree: it needs pip and setuptools in $PY's environment" \
           "(the install is offline: --no-index --no-build-isolation --no-deps)"; return 1; }
  fastasam_from_tree || { echo "installed, but fastasam does not import from $ROOT"; return 1; }
  echo "fastasam installed from this tree (editable; extensions: the build step)"
}

step_build() {  # ARCH: fastasam._C (this architecture only) and the host extensions, two builds at once
  local arch=${TORCH_CUDA_ARCH_LIST:-$1} jobs=${MAX_JOBS:-16} rc_c=0 rc_h=0
  rm -rf "$BUILD_OUT" && mkdir -p "$BUILD_OUT"
  echo "building fastasam._C for TORCH_CUDA_ARCH_LIST=$arch and fastasam._host/_cpu, into $BUILD_OUT"
  FASTASAM_BUILD_CUDA=1 FASTASAM_BUILD_HOST=0 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$jobs \
    "$PY" setup.py -q build_ext --build-lib "$BUILD_OUT/lib-cuda" --build-temp "$BUILD_OUT/tmp-cuda" \
    >"$BUILD_OUT/cuda.log" 2>&1 &
  local pid_c=$!
  FASTASAM_BUILD_CUDA=0 FASTASAM_BUILD_HOST=1 MAX_JOBS=$jobs \
    "$PY" setup.py -q build_ext --build-lib "$BUILD_OUT/lib-host" --build-temp "$BUILD_OUT/tmp-host" \
    >"$BUILD_OUT/host.log" 2>&1 &
  local pid_h=$!
  wait "$pid_c" || rc_c=$?
  wait "$pid_h" || rc_h=$?
  echo "--- fastasam._C (exit $rc_c) ---"; tail -40 "$BUILD_OUT/cuda.log"
  echo "--- fastasam._host, fastasam._cpu (exit $rc_h) ---"; tail -15 "$BUILD_OUT/host.log"
  return "$rc_c"
}

step_place() {  # put what the build made into fastasam/ and import it
  local n=0 f
  for f in "$BUILD_OUT"/lib-*/fastasam/*.so; do
    [ -f "$f" ] && cp "$f" fastasam/ && n=$((n + 1)) && echo "placed fastasam/$(basename "$f")"
  done
  [ "$n" -gt 0 ] || { echo "the build made no extension (see its output above)"; return 1; }
  "$PY" -c 'import fastasam._C as c; print("fastasam._C imports; built for", getattr(c, "archs", "?"))' || return 1
  "$PY" -c 'import fastasam._host' 2>/dev/null && echo "fastasam._host imports" ||
    echo "fastasam._host did not build: a warm step's pass over the tensors runs in Python (see the output above)"
}

step_wait() {  # RCFILE: wait for the background build (its own timeout ends it), then place what it made
  local rcfile=$1 rc
  while [ ! -s "$rcfile" ]; do sleep 1; done
  rc=$(cat "$rcfile")
  cat "$BUILD_OUT.log" 2>/dev/null || true
  case $rc in
    0) step_place ;;
    124 | 137) echo "the build did not finish within its time (see above)"; return 1 ;;
    *) echo "the build failed (exit $rc; see above)"; return 1 ;;
  esac
}

step_build_now() {  # ARCH: build in the foreground unless fastasam._C already imports, then place it
  if "$PY" -c "import fastasam._C" 2>/dev/null; then
    "$PY" -c 'import fastasam._C as c; print("fastasam._C is already built here, for", getattr(c, "archs", "?"))'
    return 0
  fi
  step_build "$1" && step_place
}

step_pytest() {  # NAME WORKERS: a test selection on the GPU, with pytest-xdist and pytest-timeout where installed
  local name=$1 workers=$2 args=() envs=() rc=0
  mapfile -t args < <(selection "$name")
  if [ "$name" = tests-triton ]; then envs=("${ENV_TRITON[@]}"); else envs=("${ENV_CUDA[@]}"); fi
  if "$PY" -c "import xdist" 2>/dev/null; then
    args+=(-n "$workers")
  else
    echo "pytest-xdist is not installed: one process"
  fi
  "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 120)
  env "${envs[@]}" "$PY" -m pytest "${args[@]}" -p no:cacheprovider -q -rfEs --durations=10 \
    --junitxml "$DIR/part$PART-$name.xml" || rc=$?
  [ "$rc" -ne 5 ] || echo "the selection collected no tests"
  return "$rc"
}

step_sanitize() {  # TOOL ARGS...: compute-sanitizer over scripts/gpu_small_run.py ARGS
  local tool=$1 out rc=0
  shift
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer is not on PATH (the CUDA toolkit's bin)"; return 1; }
  out=$(mktemp)
  # without the caching allocator every tensor is its own allocation, so memcheck sees an access past its end; each
  # run's line is printed (into the step's log) as it ends, so a step stopped at its cap keeps what it checked
  set +e
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 FASTASAM_JIT=0 compute-sanitizer --tool "$tool" --error-exitcode 9 \
    "$PY" scripts/gpu_small_run.py "$@" 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  set -e
  if grep -q "Device not supported" "$out"; then
    echo "compute-sanitizer cannot attach to this machine's GPU (Device not supported): $tool did not run"
    rc=4
  fi
  rm -f "$out"
  return "$rc"
}

# --- running a step ---------------------------------------------------------------------------------------------------
header() {  # one line: what every result file carries
  echo "# fastasam gpu-evidence part $PART, step $1: ${ENV_LINE:-environment not read yet}, commit $COMMIT," \
       "sources $SOURCES, $(date -u +%FT%TZ)"
}

stamp() {  # SINCE STEP: the benchmarks' json/md written since SINCE (seconds since the epoch) get the header line
  local since=$1 f line
  line=$(header "$2")
  while IFS= read -r f; do
    case $f in
      *.md) printf '%s\n\n%s\n' "<!-- ${line#\# } -->" "$(cat "$f")" >"$f.tmp" && mv "$f.tmp" "$f" ;;
      *.json) "$PY" -c 'import json, sys; p = sys.argv[1]; d = json.load(open(p)); d["gpu_evidence"] = sys.argv[2]
json.dump(d, open(p, "w"), indent=2)' "$f" "${line#\# }" || true ;;
    esac
  done < <(find "$DIR" -maxdepth 1 -newermt "@$since" \( -name '*.json' -o -name '*.md' \) ! -name 'part*')
}

publish() {  # when OUT names a folder: the summary, environment.txt, an archive, the logs of the steps not passed
  [ -n "${OUT:-}" ] && [ -d "$OUT" ] || return 0
  local name n=0
  cp "$SUMMARY" "$OUT/"
  [ -f "$DIR/environment.txt" ] && cp "$DIR/environment.txt" "$OUT/"
  tar -czf "$OUT/gpu-evidence-part$PART.tar.gz" -C "$(dirname "$RESULTS_ROOT")" \
      "$(basename "$RESULTS_ROOT")/$DEVICE" 2>/dev/null || true
  for name in "${NOT_PASSED[@]}"; do
    [ $n -lt 5 ] && [ -f "$DIR/part$PART-$name.log" ] && cp "$DIR/part$PART-$name.log" "$OUT/" && n=$((n + 1))
  done
  return 0
}

record() {  # NAME CAP SECONDS STATUS: a line of the summary, here and in its file
  local line
  line=$(printf '%-28s %-10s %-11s %s' "$1" "cap=$2s" "took=$3s" "$4")
  echo "$line" >>"$SUMMARY"
  say "$line"
  case $4 in ok*) ;; *) NOT_PASSED+=("$1"); failed=1 ;; esac
}

not_run() {  # NAME CAP WHY
  PLANNED=$((PLANNED + $2))
  [ -n "$DRY" ] && return 0
  record "$1" "$2" 0 "NOT RUN: $3"
  publish
}

# STEP NAME CAP WHAT -- CMD...: in a dry run one line of the plan (a test step: what its selection collects); else
# CMD under `timeout` (its cap, cut to what is left of the budget), its output in part<N>-NAME.log, the summary.
step() {
  local name=$1 cap=$2 what=$3 log left t s rc=0 started status
  shift 3
  [ "${1:-}" = -- ] && shift
  PLANNED=$((PLANNED + cap))
  if [ -n "$DRY" ]; then
    local collects="" n
    case $name in
      tests-*)
        n=$(collect "$name")
        collects=" collects=$n"
        [ "$n" != ERROR ] && [ "$n" -gt 0 ] || DRY_FAILED=1 ;;
    esac
    printf '  %-28s cap=%ss%s  %s\n' "$name" "$cap" "$collects" "$what"
    return 0
  fi
  log="$DIR/part$PART-$name.log"
  left=$((BUDGET - (SECONDS - t0) - RESERVE))
  if [ "$left" -lt 10 ]; then
    record "$name" "$cap" 0 "NOT RUN: the command's ${BUDGET} s are spent"
    publish
    return 1
  fi
  t=$((cap < left ? cap : left))
  say "step $name (cap ${t} s): $what"
  s=$SECONDS
  started=$(date +%s)
  { header "$name"; echo "# $* (timeout ${t} s)"; } >"$log"
  timeout --kill-after=10 "$t" "$@" >>"$log" 2>&1 || rc=$?
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMED OUT at its cap (${t} s)" ;;
    3) status="STOPPED: the GPU cannot be used (see the log)" ;;
    4) status="NOT SUPPORTED on this machine (see the log)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  echo "# step $name: $status, $((SECONDS - s)) s" >>"$log"
  if [ "$rc" -eq 0 ]; then tail -n 3 "$log" | sed 's/^/    /'; else tail -n 12 "$log" | sed 's/^/    /'; fi
  record "$name" "$t" "$((SECONDS - s))" "$status"
  stamp "$started" "$name"
  publish
  return "$rc"
}

collect() {  # NAME: how many tests the selection collects here, collected as on one sm_90 GPU (a dry run)
  local name=$1 args=() envs=() out rc=0 plugin
  mapfile -t args < <(selection "$name")
  if [ "$name" = tests-triton ]; then envs=("${ENV_TRITON[@]}"); else envs=("${ENV_CUDA[@]}"); fi
  plugin=$(mktemp -d)
  printf '%s\n' "import torch" "torch.cuda.is_available = lambda: True" "torch.cuda.device_count = lambda: 1" \
    "torch.cuda.get_device_capability = lambda device=None: (9, 0)" >"$plugin/gpu_evidence_one_gpu.py"
  out=$(env -u TRITON_INTERPRET "${envs[@]}" PYTHONPATH="$plugin${PYTHONPATH:+:$PYTHONPATH}" \
        "$PY" -m pytest --collect-only -q -p no:cacheprovider -p gpu_evidence_one_gpu "${args[@]}" 2>&1) || rc=$?
  rm -rf "$plugin"
  if [ "$rc" -ne 0 ]; then
    echo "ERROR"
    printf '%s\n' "$out" | tail -15 | sed 's/^/      /' >&2
    return 0
  fi
  if [ -n "${GPU_EVIDENCE_IDS:-}" ]; then
    mkdir -p "$GPU_EVIDENCE_IDS" && grep '::' <<<"$out" >"$GPU_EVIDENCE_IDS/$name.ids" || true
  fi
  grep -c '::' <<<"$out" || true
}

# --- the two commands --------------------------------------------------------------------------------------------------
env_line() {  # after the env step: the device and versions for every result file's header line
  [ -n "$DRY" ] && return 0
  ENV_LINE=$("$PY" - <<'EOF' 2>/dev/null || true
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "none"
p = torch.cuda.get_device_properties(0)
print(f"{p.name} (sm_{p.major}{p.minor}), torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}", end="")
EOF
)
  ENV_LINE+=", driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || true)"
  { header summary; tail -n +2 "$SUMMARY"; } >"$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
}

part1() {
  local arch=9.0 build_total bg_rc="$BUILD_OUT.rc" built=0 bg_t0=$SECONDS wait_cap=45
  step env 20 "nvidia-smi and torch: the driver fits torch's CUDA build; versions into environment.txt" -- \
    bash "$SELF" _env || return 3
  env_line
  # the build, in the background from here to the end of its wait: the caps of install, tests-triton and build
  build_total=$((25 + 140 + 45 - RESERVE))
  if [ -z "$DRY" ]; then
    read -r _ _ _ arch <<<"$(torch_probe)" || true
    if "$PY" -c "import fastasam._C" 2>/dev/null; then
      echo 0 >"$bg_rc"
      echo "fastasam._C was already built here" >"$BUILD_OUT.log"
    else
      rm -f "$bg_rc"
      mkdir -p "$(dirname "$BUILD_OUT")"
      bg_t0=$SECONDS
      { timeout --kill-after=10 "$build_total" bash "$SELF" _build "$arch" >"$BUILD_OUT.log" 2>&1 || echo $? >"$bg_rc"
        [ -s "$bg_rc" ] || echo 0 >"$bg_rc"; } &
    fi
  fi
  step install 25 "fastasam from this tree, editable, no extensions (pip install --no-index --no-build-isolation \
--no-deps -e .)" -- bash "$SELF" _install || true
  step tests-triton 140 "the Triton kernels, foreach and the CUDA-graph replay on the GPU against the oracle \
(selection tests-triton; while fastasam._C builds)" -- bash "$SELF" _pytest tests-triton "$(workers 4)" || true
  # the wait may take what the steps before it left of their caps, up to the build's own end: never more in all
  [ -n "$DRY" ] || wait_cap=$((bg_t0 + build_total + 10 - SECONDS))
  [ "$wait_cap" -ge 45 ] || wait_cap=45
  step build "$wait_cap" "waits for fastasam._C (sm_${arch/./} alone) and fastasam._host, built in the background \
since install (at most ${build_total} s in all; the wait longer when the steps before it end early), and puts them \
into fastasam/" -- bash "$SELF" _wait "$bg_rc" && built=1
  step check 35 "python -m fastasam --check: 3 ASAM, GSAM, LookSAM, MSAM steps of every backend against the oracle" -- \
    env FASTASAM_JIT=0 "$PY" -m fastasam --check || true
  if [ "$built" = 1 ] || [ -n "$DRY" ]; then
    step tests-cuda 90 "the CUDA kernels against the oracle, opcheck of their real launches, the CUDA-graph replay \
(selection tests-cuda; runs when build passed)" -- bash "$SELF" _pytest tests-cuda "$(workers 0)" || true
  else
    not_run tests-cuda 90 "fastasam._C did not build (see part1-build.log)"
  fi
  step step-time-resnet50-fp32 60 "ResNet-50 fp32 optimizer step: fastasam triton, cuda, MSAM; asam.py, the \
reference loop, MSAM's authors' loop, SGD, a copy (50 rounds)" -- env FASTASAM_JIT=0 "$PY" -m benchmarks.step_time \
    --device cuda --param-sets resnet50 --dtype float32 --steps 50 --warmup 10 --out "$DIR" --variants asam-triton \
    asam-cuda asam-official asam-reference msam-auto msam-authors sgd copy || true
  step memcheck 60 "compute-sanitizer memcheck over one step of every kernel (scripts/gpu_small_run.py: cuda, \
triton; fp32, bf16)" -- bash "$SELF" _sanitize memcheck --steps 1 || true
}

part2() {
  local arch=9.0
  step env 20 "nvidia-smi and torch: the driver fits torch's CUDA build; versions into environment.txt" -- \
    bash "$SELF" _env || return 3
  env_line
  [ -n "$DRY" ] || { read -r _ _ _ arch <<<"$(torch_probe)" || true; }
  step install 25 "fastasam from this tree (a no-op after the first command)" -- bash "$SELF" _install || true
  local built=0
  step build 240 "fastasam._C for sm_${arch/./} and fastasam._host (a no-op after the first command)" -- \
    bash "$SELF" _build_now "$arch" && built=1
  local bench=(--device cuda --steps 50 --warmup 10 --out "$DIR")
  local fast=(asam-triton asam-cuda asam-official asam-reference msam-auto msam-authors sgd copy)
  step step-time-resnet50-bf16 60 "ResNet-50 bf16 optimizer step, the rows of the first command's fp32 table" -- \
    env FASTASAM_JIT=0 "$PY" -m benchmarks.step_time --param-sets resnet50 --dtype bfloat16 "${bench[@]}" \
    --variants "${fast[@]}" || true
  step e2e-resnet50 90 "the end-to-end ResNet-50 training step (batch 256, bf16 autocast): SGD, ASAM, its variants" \
    -- env FASTASAM_JIT=0 "$PY" -m benchmarks.e2e --device cuda --arch resnet50 --batch 256 --amp bf16 --steps 30 \
    --warmup 5 --out "$DIR" || true
  if [ "$built" = 1 ] || [ -n "$DRY" ]; then
    step racecheck 60 "compute-sanitizer racecheck over the CUDA kernels' shared memory (block sums)" -- \
      bash "$SELF" _sanitize racecheck --backends cuda --steps 1 || true
  else
    not_run racecheck 60 "fastasam._C did not build (see part2-build.log)"
  fi
  step step-time-vit-gpt2 90 "ViT-B/16 and GPT-2 medium fp32 optimizer step: fastasam against asam.py, SGD, a copy" \
    -- env FASTASAM_JIT=0 "$PY" -m benchmarks.step_time --param-sets vit_b16 gpt2_medium --dtype float32 \
    "${bench[@]}" --variants asam-triton asam-cuda asam-official sgd copy || true
  step step-time-resnet50-compiled 120 "ResNet-50 fp32: the ASAM step in foreach ops under torch.compile (cold) \
and SAM's rows, against asam.py and sam.py" -- env FASTASAM_JIT=0 "$PY" -m benchmarks.step_time --param-sets \
    resnet50 --dtype float32 "${bench[@]}" --variants asam-auto asam-official asam-compile-foreach sam-auto \
    sam-sam.py copy || true
  step memcheck-full 60 "compute-sanitizer memcheck over three steps of every kernel" -- \
    bash "$SELF" _sanitize memcheck --steps 3 || true
}

workers() {  # SPARE: pytest-xdist workers, SPARE cores left to other work (the build), 2 to 8
  local n
  n=$(( $(nproc) - $1 ))
  [ "$n" -gt 8 ] && n=8
  [ "$n" -lt 2 ] && n=2
  echo "$n"
}

usage() { sed -n '2,/^set -euo pipefail/{/^set -euo/!p}' "$SELF"; }

# --- the command line ----------------------------------------------------------------------------------------------
DRY=""
DRY_FAILED=0
PLANNED=0
PART=""
case "${1:-}" in
  part1 | 1) PART=1 ;;
  part2 | 2) PART=2 ;;
  selection) selection "${2:-}"; exit ;;
  sources-hash) sources_hash; exit ;;
  _env) step_env; exit ;;
  _install) step_install; exit ;;
  _build) step_build "$2"; exit ;;
  _wait) step_wait "$2"; exit ;;
  _build_now) step_build_now "$2"; exit ;;
  _pytest) step_pytest "$2" "$3"; exit ;;
  _sanitize) shift; step_sanitize "$@"; exit ;;
  *) usage; exit 1 ;;
esac
[ "${2:-}" = --dry-run ] && DRY=1

if [ -n "$DRY" ]; then
  echo "gpu-evidence part $PART, dry run: the plan, nothing run. Results would go to $RESULTS_ROOT/<GPU name>/." \
       "Each test selection is collected here (pytest --collect-only, torch made to report one sm_90 GPU); the" \
       "cuda backend's cases ([cuda-cuda...]) are among them only where fastasam._C imports."
  if ! "$PY" -c "import torch, pytest" 2>/dev/null; then
    echo "gpu-evidence: $PY cannot import torch and pytest: name the Python that has them with PYTHON=..."
    exit 1
  fi
  COMMIT="" SOURCES="" DIR="" DEVICE=""
  "part$PART"
  if [ "$PART" = 1 ]; then
    echo "total cap=${PLANNED}s (the first command's limit: ${LIMIT}s)"
  else
    echo "total cap=${PLANNED}s (the budget, PART_BUDGET_S=${BUDGET}s, cuts the last steps to what is left; after" \
         "the first command, install and build take seconds)"
  fi
  if [ "$PART" = 1 ] && [ "$PLANNED" -gt "$LIMIT" ]; then
    echo "gpu-evidence: the first command's caps sum to ${PLANNED} s, over its ${LIMIT} s"; exit 1
  fi
  exit "$DRY_FAILED"
fi

# No GPU: say so and write nothing.
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  read -r torch_v _ ngpu _ <<<"$(torch_probe)" || true
  if [ "${ngpu:-0}" -lt 1 ]; then
    echo "gpu-evidence: no CUDA GPU is visible here (nvidia-smi lists none; torch ${torch_v:-not importable}" \
         "sees ${ngpu:-0}), so there is nothing to measure. Run it on a machine with an NVIDIA GPU:"
    echo "  make gpu-evidence          (bash scripts/gpu_evidence.sh part1), then optionally  make gpu-evidence PART=2"
    echo "  make gpu-evidence DRY_RUN=1 prints the plan on any machine."
    exit 2
  fi
fi

DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 |
         sed 's/[^A-Za-z0-9._-]/-/g; s/--*/-/g; s/^-//; s/-$//' || true)
DEVICE=${DEVICE:-unknown-gpu}
DIR="$RESULTS_ROOT/$DEVICE"
export DIR PART PYTHONUNBUFFERED=1
mkdir -p "$DIR"
SUMMARY="$DIR/part$PART-summary.txt"
COMMIT=$(commit_of_tree)
SOURCES=$(sources_hash)
ENV_LINE=""
NOT_PASSED=()
failed=0
{ header summary; echo "# budget ${BUDGET} s; a line per step: name, cap, seconds, status"; } >"$SUMMARY"
rm -f "$DIR"/part"$PART"-*.log "$DIR"/part"$PART"-*.xml

stopped=0
"part$PART" || stopped=$?
if [ "$stopped" = 3 ]; then
  say "the GPU cannot be used here: see $DIR/part$PART-env.log"
  exit 3
fi
ok=$(grep -c ' ok' "$SUMMARY" || true)
echo "# done: $ok steps ok, $((SECONDS - t0)) s" >>"$SUMMARY"
publish
say "part $PART done in $((SECONDS - t0)) s: $SUMMARY"
cat "$SUMMARY"
exit $failed
