#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels bench/gpu_check.sh installs on a GPU machine
# that has none (into .whl/, ignored by git; carry it along: the device tool's `carry: [".whl"]`).
#
#   bench/fetch_wheels.sh            # liger-kernel, cut-cross-entropy (the kernel peers), TRL and what it
#                                    # needs beyond the GPU image (datasets, dill, multiprocess)
#
# The GPU image (Python 3.12, torch 2.11, transformers 5.17) already holds pytest-benchmark, py-cpuinfo,
# accelerate, pandas, pyarrow and peft. Pure-Python wheels only: one version of each, since two versions
# of one package stop `pip install --no-deps` there. ~3 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
WHEELS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18)
mkdir -p "$DEST"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
ls -1 "$DEST"
