#!/usr/bin/env bash
# One command for a GPU machine: build the project (extension included), run the GPU-marked tests
# and every bench/bench_*.py beside its peers, write JSON + logs under OUT_DIR, print a table last.
#
#   bench/gpu_check.sh OUT_DIR            # everything
#   ONLY="grpo_loss listener" bench/gpu_check.sh OUT_DIR   # a subset of the benchmarks
#   TESTS_K="not flex" bench/gpu_check.sh OUT_DIR   # GPU tests chosen by a pytest -k expression (TESTS_TIMEOUT, 240 s)
#   ONLY=pytest bench/gpu_check.sh OUT_DIR   # only `pytest bench --benchmark-only` (PYTEST_BENCH_TIMEOUT, 300 s;
#                                            # PYTEST_BENCH_K="not compile" to leave out some rows)
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

say "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee -a "$LOG"

if compgen -G ".whl/*.whl" > /dev/null; then
  say "installing peer wheels from .whl/"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/lgrpo-peers .whl/*.whl >> "$LOG" 2>&1
  export PYTHONPATH="/tmp/lgrpo-peers${PYTHONPATH:+:$PYTHONPATH}"
fi

say "building lgrpo (extension for ${TORCH_CUDA_ARCH_LIST:=9.0})"
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16}
if ! $PY -m pip install -q --no-build-isolation --no-deps -e . >> "$LOG" 2>&1; then
  tail -40 "$LOG"; echo "BUILD FAILED"; exit 1
fi

say "GPU tests"
timeout "${TESTS_TIMEOUT:-240}" $PY -m pytest -q -m gpu tests -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
cat "$OUT/gpu_tests.log" >> "$LOG"

for bench in bench/bench_*.py; do
  name=$(basename "$bench" .py)
  if [ -n "${ONLY:-}" ] && ! grep -qw "${name#bench_}" <<< "$ONLY"; then continue; fi
  say "$name"
  timeout "${BENCH_TIMEOUT:-300}" $PY "$bench" --out "$OUT" 2>&1 | tee -a "$LOG"
done

# The same kernels as pytest-benchmark tests (bench/test_kernels_benchmark.py, ~2-3 min on an H100/H200):
# one JSON in pytest-benchmark's format, every implementation checked against the fp64 reference before it
# is timed. After the scripts, so that its torch.compile rows find inductor's cache warm. SIGINT on timeout:
# pytest then ends the session normally and the JSON keeps what was measured.
if [ -z "${ONLY:-}" ] || grep -qw pytest <<< "$ONLY"; then
  say "pytest bench --benchmark-only"
  if $PY -c "import pytest_benchmark" 2> /dev/null; then
    timeout -s INT -k 30 "${PYTEST_BENCH_TIMEOUT:-300}" $PY -m pytest bench --benchmark-only -q -rs \
      -p no:cacheprovider --benchmark-json "$OUT/pytest_benchmark.json" ${PYTEST_BENCH_K:+-k "$PYTEST_BENCH_K"} 2>&1 \
      | tee "$OUT/pytest_benchmark.log" | tail -15
    cat "$OUT/pytest_benchmark.log" >> "$LOG"
  else
    echo "skipped: pytest-benchmark is not installed (pip install -e .[dev], or its wheel and py-cpuinfo2's in .whl/)" \
      | tee -a "$LOG"
  fi
fi

say "summary"
$PY bench/summary.py "$OUT" | tee "$OUT/summary.txt"
