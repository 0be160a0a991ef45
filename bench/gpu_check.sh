#!/usr/bin/env bash
# One command for a GPU machine: build the project (CUDA extension required), run the GPU-marked tests
# and every bench/bench_*.py beside its peers, write JSON + logs under OUT_DIR, print a table last.
#
#   PART=1 bench/gpu_check.sh OUT_DIR     # one of three subsets, each planned to fit one 600 s device call
#   PART=2 bench/gpu_check.sh OUT_DIR     #   (1: GPU tests but flex, linear_grpo listener train_step rollout;
#   PART=3 bench/gpu_check.sh OUT_DIR     #    2: flex tests, shared_prefix grpo_loss sampler, the other families' step; 3: trl_step
#                                         #    verl_step and pytest bench, no GPU tests)
#   bench/gpu_check.sh OUT_DIR            # everything (about 15 minutes: more than one device call)
#   ONLY="grpo_loss listener" bench/gpu_check.sh OUT_DIR   # a subset of the benchmarks
#   TESTS_K="not flex" bench/gpu_check.sh OUT_DIR   # GPU tests chosen by a pytest -k expression (TESTS_TIMEOUT, 240 s)
#   TESTS=0 bench/gpu_check.sh OUT_DIR    # no GPU tests (said in the log and the last line)
#   ONLY=pytest bench/gpu_check.sh OUT_DIR   # only `pytest bench --benchmark-only` (PYTEST_BENCH_TIMEOUT, 300 s;
#                                            # PYTEST_BENCH_K="not compile" to leave out some rows)
#
# A PART sets ONLY, TESTS_K, TESTS and the timeouts unless they are given, and a time budget for the whole
# script (BUDGET, 540 s with a PART, else none): every step's timeout is cut to what the budget has left, so
# the summary is printed before the device call ends. The exit status is 0 only when the build succeeded
# with the CUDA extension (LGRPO_BUILD_CUDA=1: a missing nvcc fails the build instead of silently testing
# the op's CPU fallback), torch sees a GPU, the GPU tests ran (at least one passed, none failed, none left
# out by a timeout) and every benchmark exited 0; otherwise the last line says what went wrong.
#
# Peers (liger-kernel, cut-cross-entropy) and TRL (for bench_trl_step.py) are installed from .whl/ when that
# folder holds wheels (machines without network: fetch them beforehand with bench/fetch_wheels.sh and carry
# .whl along), else whatever the environment already has is used; without TRL bench_trl_step.py says it was
# skipped (ONLY=trl_step runs it alone). The pytest-benchmark step needs pytest-benchmark and py-cpuinfo
# (the [dev] extra; the GPU image has both).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-bench_results}" && cd "${1:-bench_results}" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "== $* ($(date +%H:%M:%S))" | tee -a "$LOG"; }
PROBLEMS=()  # what makes the exit status 1, printed last
problem() { PROBLEMS+=("$*"); echo "!! $*" | tee -a "$LOG"; }

# The planned subsets (bench/NOTES.md, "The next GPU run"): the GPU tests before the benchmarks they vouch
# for, so that no number is read from a kernel that fails its comparison.
case "${PART:-}" in
  "") ;;
  1) : "${TESTS_K=not flex}" "${TESTS_TIMEOUT:=150}" "${BENCH_TIMEOUT:=180}"
     : "${ONLY:=linear_grpo listener train_step rollout}" ;;
  2) : "${TESTS_K=flex}" "${TESTS_TIMEOUT:=200}" "${BENCH_TIMEOUT:=150}" "${ONLY:=shared_prefix grpo_loss sampler family_step}" ;;
  3) : "${TESTS:=0}" "${BENCH_TIMEOUT:=150}" "${PYTEST_BENCH_TIMEOUT:=240}" "${ONLY:=trl_step verl_step pytest}" ;;
  *) echo "PART must be 1, 2 or 3 (or unset: everything), got '$PART'"; exit 2 ;;
esac
BUDGET=${BUDGET:-$([ -n "${PART:-}" ] && echo 540 || echo 0)}  # seconds for the whole script; 0: no limit
RESERVE=20  # kept back from the budget for the summary

# limit SECONDS: the step's own timeout cut to what the budget has left (0: nothing left, skip the step)
limit() {
  local want=$1 left
  if [ "$BUDGET" -gt 0 ]; then
    left=$((BUDGET - SECONDS - RESERVE))
    [ "$left" -lt "$want" ] && want=$left
  fi
  [ "$want" -lt 1 ] && want=0
  echo "$want"
}

say "environment${PART:+ (part $PART, budget ${BUDGET} s)}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee -a "$LOG"
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >> "$LOG" 2>&1; then
  echo "FAILED: torch sees no CUDA device; every GPU test would be skipped and every number a CPU one" | tee -a "$LOG"
  exit 1
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  say "installing peer wheels from .whl/"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/lgrpo-peers .whl/*.whl >> "$LOG" 2>&1
  export PYTHONPATH="/tmp/lgrpo-peers${PYTHONPATH:+:$PYTHONPATH}"
fi

say "building lgrpo (extension for ${TORCH_CUDA_ARCH_LIST:=9.0})"
# LGRPO_BUILD_CUDA=1 whatever the environment says: without nvcc setup.py would build the CPU kernels only,
# and the GPU tests of the listener op would pass on its CPU fallback.
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16} LGRPO_BUILD_CUDA=1
t=$(limit "${BUILD_TIMEOUT:-300}")
[ "$t" -gt 0 ] || { echo "FAILED: BUDGET=$BUDGET s leaves no time for the build"; exit 1; }
if ! timeout "$t" $PY -m pip install -q --no-build-isolation --no-deps -e . >> "$LOG" 2>&1; then
  tail -40 "$LOG"; echo "BUILD FAILED (with LGRPO_BUILD_CUDA=1: is nvcc there? set CUDA_HOME)"; exit 1
fi

if [ "${TESTS:-1}" = 0 ]; then
  say "GPU tests not run (TESTS=0)"
else
  t=$(limit "${TESTS_TIMEOUT:-240}")
  say "GPU tests${TESTS_K:+ (-k \"$TESTS_K\")}, at most $t s"
  if [ "$t" -eq 0 ]; then
    problem "GPU tests not run: the time budget is spent"
  else
    timeout "$t" $PY -m pytest -q -rfEs -m gpu tests -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
      | tee "$OUT/gpu_tests.log" | tail -25
    rc=${PIPESTATUS[0]}
    cat "$OUT/gpu_tests.log" >> "$LOG"
    case $rc in
      0) grep -Eq '[0-9]+ passed' "$OUT/gpu_tests.log" \
           || problem "GPU tests: every selected test was skipped (nothing was checked on the GPU)" ;;
      5) problem "GPU tests: pytest collected no test (-m gpu${TESTS_K:+ -k \"$TESTS_K\"})" ;;
      124) problem "GPU tests timed out after $t s: the ones not reached were not checked" ;;
      *) problem "GPU tests FAILED (pytest exit status $rc; see gpu_tests.log)" ;;
    esac
  fi
fi

for bench in bench/bench_*.py; do
  name=$(basename "$bench" .py)
  if [ -n "${ONLY:-}" ] && ! grep -qw "${name#bench_}" <<< "$ONLY"; then continue; fi
  t=$(limit "${BENCH_TIMEOUT:-300}")
  say "$name, at most $t s"
  if [ "$t" -eq 0 ]; then problem "$name not run: the time budget is spent"; continue; fi
  timeout "$t" $PY "$bench" --out "$OUT" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  # a timed-out script keeps the JSON of the phases it finished; the rest is missing
  [ "$rc" -eq 0 ] || problem "$name exited with status $rc$([ "$rc" -eq 124 ] && echo " (timed out after $t s)")"
done

# The other model families' full GRPO step (bench_train_step.py --family: train_step_FAMILY.json), in the same
# run as the Qwen2.5-VL one when ONLY names both.
if [ -z "${ONLY:-}" ] || grep -qw family_step <<< "$ONLY"; then
  for family in qwen2_vl qwen3_vl; do
    t=$(limit "${BENCH_TIMEOUT:-300}")
    say "bench_train_step --family $family, at most $t s"
    if [ "$t" -eq 0 ]; then problem "train_step_$family not run: the time budget is spent"; continue; fi
    timeout "$t" $PY bench/bench_train_step.py --family "$family" --out "$OUT" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || problem "train_step_$family exited with status $rc$([ "$rc" -eq 124 ] && echo " (timed out after $t s)")"
  done
fi

# The same kernels as pytest-benchmark tests (bench/test_kernels_benchmark.py, ~2-3 min on an H100/H200):
# one JSON in pytest-benchmark's format, every implementation checked against the fp64 reference before it
# is timed. After the scripts, so that its torch.compile rows find inductor's cache warm. SIGINT on timeout:
# pytest then ends the session normally and the JSON keeps what was measured.
if [ -z "${ONLY:-}" ] || grep -qw pytest <<< "$ONLY"; then
  say "pytest bench --benchmark-only"
  t=$(limit "${PYTEST_BENCH_TIMEOUT:-300}")
  if [ "$t" -eq 0 ]; then
    problem "pytest bench not run: the time budget is spent"
  elif $PY -c "import pytest_benchmark" 2> /dev/null; then
    timeout -s INT -k 30 "$t" $PY -m pytest bench --benchmark-only -q -rs \
      -p no:cacheprovider --benchmark-json "$OUT/pytest_benchmark.json" ${PYTEST_BENCH_K:+-k "$PYTEST_BENCH_K"} 2>&1 \
      | tee "$OUT/pytest_benchmark.log" | tail -15
    rc=${PIPESTATUS[0]}
    cat "$OUT/pytest_benchmark.log" >> "$LOG"
    [ "$rc" -eq 0 ] || problem "pytest bench exited with status $rc"
  else
    echo "skipped: pytest-benchmark is not installed (pip install -e .[dev], or its wheel and py-cpuinfo2's in .whl/)" \
      | tee -a "$LOG"
  fi
fi

say "summary"
$PY bench/summary.py "$OUT" | tee "$OUT/summary.txt"
if [ ${#PROBLEMS[@]} -gt 0 ]; then
  { echo "FAILED (${#PROBLEMS[@]}):"; printf '  %s\n' "${PROBLEMS[@]}"; } | tee -a "$LOG" "$OUT/summary.txt"
  exit 1
fi
echo "OK${PART:+ (part $PART)}" | tee -a "$LOG"
