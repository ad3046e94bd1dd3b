#!/usr/bin/env bash
# One command for a GPU machine: build the extension, run the GPU tests, measure the Triton
# targets T1-T4 (bench/gpu_targets.py), run the GPU sweep.
#
#   bash bench/gpu.sh [quick|full] [--dry-run]
#
# Everything lands in $OUT (default: bench/results/gpu-<date>): gpu.log (every stage's output,
# with a stage summary at the end), the sweep CSV and its four plots: six files, a
# small set to copy back. The whole script keeps to MLCL_GPU_BUDGET_S seconds (default
# 520, under 9 minutes): each stage runs under `timeout` with its own share, a failed stage is
# logged and the next one still runs. --dry-run does the CPU-side part on a machine without a
# GPU: no build, the sweep only prints its plan. See bench/README.md.
set -u

cd "$(dirname "$0")/.." || exit 1
VARIANT=quick
DRY=0
for arg in "$@"; do
  case "$arg" in
    quick|full) VARIANT=$arg ;;
    --dry-run) DRY=1 ;;
    *) echo "usage: bash bench/gpu.sh [quick|full] [--dry-run]" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
CSV="$OUT/sweep_cuda_${VARIANT}.csv"
BUDGET=${MLCL_GPU_BUDGET_S:-520}
STAGES=" ${MLCL_GPU_STAGES:-env build tests targets sweep} "   # e.g. "build tests-triton targets"
START=$(date +%s)
SUMMARY=""
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# a stage that needs real data sets finds them here when the caller carried them (README)
[ -d "$PWD/.benchdata" ] && export MLCL_FAST_DATA_DIR=${MLCL_FAST_DATA_DIR:-$PWD/.benchdata}
# ... and the fixed SPEC vectors for the tests (../shared does not travel to a GPU machine)
[ -d "$PWD/.benchdata/vectors" ] && export MLCL_SPEC_VECTORS=${MLCL_SPEC_VECTORS:-$PWD/.benchdata/vectors}

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
log() { echo "[gpu.sh $(elapsed)s] $*" | tee -a "$LOG"; }

# stage NAME LIMIT_S COMMAND...: run under timeout (capped by the time left), log, never abort.
stage() {
  local name=$1 limit=$2 rc
  shift 2
  local remain
  remain=$(left)
  if (( limit > remain - 5 )); then limit=$(( remain - 5 )); fi
  if (( limit < 5 )); then
    log "== $name: not run (time budget spent)"
    SUMMARY+="$name: not run (time budget spent)"$'\n'
    return 0
  fi
  log "== $name: start (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) log "== $name: ok" ;;
    124|137) log "== $name: TIMEOUT after ${limit}s" ;;
    *) log "== $name: FAILED (exit $rc)" ;;
  esac
  SUMMARY+="$name: exit $rc after $(elapsed)s"$'\n'
  return 0
}

want() { [[ "$STAGES" == *" $1 "* ]]; }

log "gpu.sh $VARIANT (dry run: $DRY) in $PWD, out $OUT, budget ${BUDGET}s, python $PY"

want env && stage env 30 bash -c "
  nvidia-smi || echo 'nvidia-smi: not available'
  $PY - <<'EOF'
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print('triton', triton.__version__)
except Exception as e:
    print('triton: not importable:', e)
import mlcl_fast; print('backends before build:', mlcl_fast.backend_status())
EOF
  command -v nvcc && nvcc --version | tail -2
  git rev-parse --short HEAD 2>/dev/null || echo 'no git metadata here'"

if ! want build; then
  SUMMARY+="build: not selected"$'\n'
elif (( DRY )); then
  log "== build: not run (dry run)"
  SUMMARY+="build: not run (dry run)"$'\n'
else
  # ignored build outputs are not carried, so this compiles afresh on a new machine (ninja
  # recompiles only what changed when a warm machine still has them)
  # REQUIRE_EXT: a failed build must fail this stage instead of installing without the extension
  stage build 240 bash -c "TORCH_CUDA_ARCH_LIST=\${TORCH_CUDA_ARCH_LIST:-9.0} MLCL_FAST_REQUIRE_EXT=1 MAX_JOBS=\${MAX_JOBS:-16} $PY setup.py build_ext --inplace \
    && $PY -c 'import mlcl_fast, torch; print(mlcl_fast.backend_status()); print(\"cuda backends:\", mlcl_fast.available_backends(\"cuda\") if torch.cuda.is_available() else None)'"
fi

# The CUDA backend's tests, the Triton backend's GPU tests, then the tests that switch themselves on
# when CUDA is present. pytest-xdist (in the machine's image) spreads them over the cores, which
# also parallelises Triton's compilation; MLCL_GPU_XDIST=0 runs them in one process. Verbose
# output names every test as it ends, so a stage cut by its time limit still says what ran.
PYTEST=($PY -m pytest -v --tb=short -rfE -p no:cacheprovider)
[ "${MLCL_GPU_XDIST:-1}" != 0 ] && $PY -c "import xdist" >/dev/null 2>&1 && PYTEST+=(-n "${MLCL_GPU_WORKERS:-16}")
$PY -c "import pytest_timeout" >/dev/null 2>&1 && PYTEST+=(--timeout 150 --timeout-method=thread)
# REQUIRE_CUDA: an unavailable cuda backend is an error, not 244 green skips
export MLCL_FAST_REQUIRE_CUDA=1
(want tests || want tests-cuda) && stage tests-cuda 130 "${PYTEST[@]}" -m "gpu and not slow" tests/test_cuda.py
(want tests || want tests-triton) && stage tests-triton 100 "${PYTEST[@]}" -m "gpu and not slow" tests/test_triton.py
(want tests || want tests-other) && stage tests-other 60 "${PYTEST[@]}" -m "not slow and not gpu" -k "cuda or gpu or triton" tests

# Not in the default stages: a host backtrace of the op-error tests that crashed on an H100
# (README "Known issues"); cuda-gdb also debugs the host side of a Python process.
if want debug; then
  if (( DRY )); then
    log "== debug: not run (dry run)"
  else
    stage debug 150 bash -c "cuda-gdb -q -batch -ex 'set pagination off' -ex run -ex bt \
      --args $PY -X faulthandler -m pytest -q -p no:cacheprovider tests/test_cuda.py -k 'op_errors and (col_labels or self_col)'"
  fi
fi

# The Triton targets T1-T4 (bench/gpu_targets.py): matmul rate, then each point as it is measured.
if want targets; then
  if (( DRY )); then
    log "== targets: not run (dry run)"
  else
    stage targets "${MLCL_GPU_TARGETS_S:-200}" $PY -m bench.gpu_targets --out "$OUT" \
      --budget-s $(( ${MLCL_GPU_TARGETS_S:-200} - 20 )) ${MLCL_GPU_TARGETS_ARGS:-}
  fi
fi

# MLCL_GPU_SWEEP_ARGS narrows the sweep, e.g. "--presets reg,msc"
# shellcheck disable=SC2206
EXTRA_SWEEP=(${MLCL_GPU_SWEEP_ARGS:-})
SWEEP_ARGS=(--"$VARIANT" --device cuda --out "$CSV" "${EXTRA_SWEEP[@]}")
if ! want sweep; then
  SUMMARY+="sweep: not selected"$'\n'
elif (( DRY )); then
  stage sweep 60 $PY -m bench.sweep "${SWEEP_ARGS[@]}" --dry-run
else
  # the sweep stops starting points 40 s before its stage ends (the rest are recorded as
  # timeouts), so it always gets to write its plots
  sweep_limit=$(( $(left) - 25 ))
  stage sweep "$sweep_limit" $PY -m bench.sweep "${SWEEP_ARGS[@]}" --time-budget-s $(( sweep_limit - 40 ))
  if [ -s "$CSV" ]; then
    stage report 20 $PY -m bench.report "$CSV"
  else
    log "== report: no CSV written"
  fi
fi

log "summary:"$'\n'"$SUMMARY"
ls -la "$OUT" | tee -a "$LOG"
[ -s "$CSV" ] && sed -n '/== report: start/,/== report:/p' "$LOG" | tail -n 60
exit 0
