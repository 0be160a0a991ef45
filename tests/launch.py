"""Launch a test's rank script under torchrun (2 CPU processes, gloo), with a timeout that kills them all.

A distributed bug usually shows as a hang (one rank in a collective the other never issues). The
launcher runs in its own process group so that on timeout the agent *and* its ranks are killed and
the test fails, instead of orphaned ranks spinning on a collective for the rest of the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS="1",
        TRITON_INTERPRET="0",  # ranks use the reference kernels, like the in-process oracle runs
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun {Path(script).name} did not finish in {timeout:.0f} s (a hang?)\n"
                             f"{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
