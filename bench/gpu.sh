#!/usr/bin/env bash
# One command for a GPU machine: build the extension, run the GPU tests, measure the targets
# T1-T4 (bench/gpu_targets.py) and a small Triton tile search; optionally the GPU sweep.
#
#   bash bench/gpu.sh [quick|full] [--dry-run]
#
# Everything lands in $OUT (default: bench/results/gpu-<date>): gpu.log (every foreground
# stage's output, with a stage summary at the end), cuda.log (the build and the CUDA backend's
# tests, which run in the background beside the Triton tests), targets.csv and targets.log, and
# with the sweep selected its CSV and four plots. The whole script keeps to MLCL_GPU_BUDGET_S
# seconds (default 480, 8 minutes): each stage runs under `timeout` with its own share, a failed
# stage is logged and the next one still runs, and a short table of the targets is printed last.
# --dry-run does the CPU-side part on a machine without a GPU: no build, no tests, no
# measurements; the sweep (when selected) only prints its plan. See bench/README.md.
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
BUDGET=${MLCL_GPU_BUDGET_S:-480}
STAGES=" ${MLCL_GPU_STAGES:-env build tests debug targets tiles} "   # e.g. "build tests-triton targets sweep"
# The tile search at T1 (bench/gpu_targets.py --tiles): one kernel family's tile or pipeline depth
# changed at a time, each compiling to wgmma without spills at d = 256 (python -m bench.kernels
# with MLCL_FAST_TRITON_TILE set); the defaults are measured by the targets stage. The column
# kernel owning 128 columns (not 64) at d = 256 compiles without spills under triton 3.6 and 3.9
# (64 x 64 spills 8 B under 3.6): the candidate for the largest term at L = 262144.
TILES=${MLCL_GPU_TILES:-"head:columns=32,128,8,2|free:anchors=128,64,8,2|free:anchors=64,64,8,3|head:columns=32,64,8,3"}
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

# The CUDA side in the background: build, then the CUDA backend's tests, beside the Triton tests
# (those compile Triton kernels on the CPU cores; these need the extension). Its output goes to
# cuda.log; gpu.log records the chain's start and end.
PYTEST=($PY -m pytest -v --tb=short -rfE -p no:cacheprovider)
HAVE_XDIST=0
[ "${MLCL_GPU_XDIST:-1}" != 0 ] && $PY -c "import xdist" >/dev/null 2>&1 && HAVE_XDIST=1
$PY -c "import pytest_timeout" >/dev/null 2>&1 && PYTEST+=(--timeout 150 --timeout-method=thread)
# pytest-timeout >= 2.3: the session stops starting tests before its stage's limit, so that pytest
# still prints its failure summary (a stage killed by its limit prints no tracebacks)
SESSION_TIMEOUT=0
$PY -c "import importlib.metadata as m, sys; sys.exit(tuple(map(int, m.version('pytest-timeout').split('.')[:2])) < (2, 3))" \
  >/dev/null 2>&1 && SESSION_TIMEOUT=1
session_limit() { (( SESSION_TIMEOUT )) && echo "--session-timeout $1"; }
workers() { (( HAVE_XDIST )) && echo "-n $1"; }
# REQUIRE_CUDA: an unavailable cuda backend is an error, not 244 green skips
export MLCL_FAST_REQUIRE_CUDA=1
CUDA_LOG="$OUT/cuda.log"
CUDA_PID=""
# REQUIRE_EXT: a failed build must fail the chain instead of installing without the extension.
# Ignored build outputs are not carried, so this compiles afresh on a new machine.
BUILD_CMD="TORCH_CUDA_ARCH_LIST=\${TORCH_CUDA_ARCH_LIST:-9.0} MLCL_FAST_REQUIRE_EXT=1 MAX_JOBS=\${MAX_JOBS:-8} $PY setup.py build_ext --inplace \
  && $PY -c 'import mlcl_fast, torch; print(mlcl_fast.backend_status()); print(\"cuda backends:\", mlcl_fast.available_backends(\"cuda\") if torch.cuda.is_available() else None)'"
chain=()
want build && chain+=("echo '== build'; $BUILD_CMD || exit 1")
(want tests || want tests-cuda) && chain+=("echo '== tests-cuda'; ${PYTEST[*]} $(workers "${MLCL_GPU_CUDA_WORKERS:-4}") -m 'not slow' ${MLCL_GPU_CUDA_TESTS:-tests/test_cuda.py tests/test_errors.py::test_mixed_cpu_cuda tests/test_cpp.py::test_extension_uses_the_shared_libstdcxx}")
# A host backtrace of the op-error tests that crashed on an H100 (csrc/cuda/README.md "Known
# limits"), only when the tests above did not pass them; cuda-gdb also debugs the host side of a
# Python process.
want debug && chain+=("echo '== debug'; if grep -qE 'test_op_errors.*(FAILED|ERROR)|node down|crashed' '$CUDA_LOG'; then \
  timeout 60 cuda-gdb -q -batch -ex 'set pagination off' -ex run -ex bt \
  --args $PY -X faulthandler -m pytest -q -p no:cacheprovider tests/test_cuda.py -k 'op_errors and (col_labels or self_col)'; \
  else echo 'debug: not needed (the op-error tests did not fail)'; fi")
if (( ${#chain[@]} )); then
  if (( DRY )); then
    log "== cuda chain: not run (dry run): ${#chain[@]} step(s)"
    SUMMARY+="cuda chain: not run (dry run)"$'\n'
  else
    script=""
    for step in "${chain[@]}"; do script+="$step; echo \"== step exit \$?\"; "; done
    limit=${MLCL_GPU_CUDA_S:-220}
    log "== cuda chain: start in the background (limit ${limit}s, output in cuda.log)"
    timeout -k 10 "$limit" bash -c "$script" >"$CUDA_LOG" 2>&1 &
    CUDA_PID=$!
  fi
fi

# Not in the default stages: where a target point's time goes (bench/gpu_profile.py), before the
# Triton tests so that only the background build shares the machine with it.
if want profile && (( ! DRY )); then
  # shellcheck disable=SC2086
  stage profile "${MLCL_GPU_PROFILE_S:-120}" $PY -m bench.gpu_profile ${MLCL_GPU_PROFILE_ARGS:-}
fi

# The Triton backend's GPU tests, in the foreground, in this order (pytest keeps the order of node
# ids): those that have not passed on a GPU yet first (the compile tests failed on an H200 without
# a recorded cause; aot_eager first, which runs the same traced graph without inductor; the others
# were not reached), the ones that passed there last. Every GPU test
# function of tests/test_triton.py is listed (tests/test_bench.py checks it).
TRITON_TESTS=""
for name in torch_compile_aot_eager torch_compile_fullgraph public_call_torch_compile_fullgraph_with_padded_indices \
    closed_form_torch_compile_fullgraph fp32_precisions dense_kernels_at_d256 closed_form_large_label_space \
    regimes_large_label_space symmetric_backward closed_form_has_no_host_sync_and_replays_in_a_cuda_graph \
    deterministic memory_has_no_anchor_by_column_term canonical_kernel_matches_the_torch_formulation_and_compiles \
    presets; do
  TRITON_TESTS+=" tests/test_triton.py::test_gpu_$name"
done
# pytest-xdist (in the machine's image) spreads them over the cores, which also parallelises
# Triton's compilation; MLCL_GPU_XDIST=0
# runs them in one process. Verbose output names every test as it ends, so a stage cut by its
# time limit still says what ran.
if (want tests || want tests-triton) && (( ! DRY )); then
  # shellcheck disable=SC2046
  triton_s=${MLCL_GPU_TRITON_S:-170}
  (( triton_s > $(left) - 5 )) && triton_s=$(( $(left) - 5 ))
  stage tests-triton "$triton_s" "${PYTEST[@]}" $(workers "${MLCL_GPU_WORKERS:-12}") $(session_limit $(( triton_s - 25 ))) \
    -m "gpu and not slow" ${MLCL_GPU_TRITON_TESTS:-$TRITON_TESTS}
fi

if [ -n "$CUDA_PID" ]; then
  wait "$CUDA_PID"
  rc=$?
  log "== cuda chain: exit $rc ($(grep -c ' PASSED' "$CUDA_LOG") passed, $(grep -c ' FAILED' "$CUDA_LOG") failed lines in cuda.log)"
  SUMMARY+="cuda chain: exit $rc after $(elapsed)s"$'\n'
  grep -E '^(FAILED|ERROR)|error:|Error' "$CUDA_LOG" | head -n 40 >>"$LOG"
fi

# The targets T1-T4 (bench/gpu_targets.py): matmul rate and copy bandwidth, then each provider's
# points, Triton first, each as it is measured; then the tile search.
if want targets || want tiles; then
  if (( DRY )); then
    log "== targets: not run (dry run)"
  else
    want targets && stage targets "${MLCL_GPU_TARGETS_S:-190}" $PY -m bench.gpu_targets --out "$OUT" \
      --budget-s $(( ${MLCL_GPU_TARGETS_S:-190} - 25 )) ${MLCL_GPU_TARGETS_ARGS:-}
    want tiles && stage tiles "${MLCL_GPU_TILES_S:-80}" $PY -m bench.gpu_targets --out "$OUT" --targets none \
      --providers triton --tiles "$TILES" --budget-s $(( ${MLCL_GPU_TILES_S:-80} - 15 ))
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
# the short table last: the reply of a remote call carries the end of the output
[ -s "$OUT/targets.csv" ] && $PY -m bench.gpu_targets --plot "$OUT/targets.csv" --table "$OUT/targets.csv" | tee -a "$LOG"
exit 0
