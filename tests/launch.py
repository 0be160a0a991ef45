"""Launch a test's rank script under torchrun (2 CPU processes, gloo), with a timeout that kills them all.

A distributed bug usually shows as a hang (one rank in a collective the other never issues). On
timeout the agent *and* its ranks are killed and the test fails, instead of orphaned ranks spinning on a
collective (and holding the output pipes open, so the test waits forever) for the rest of the suite.
Killing the agent's process group is not enough: torch's elastic agent starts each rank in a session
of its own (``start_new_session=True``), so the ranks are found as the agent's descendants.
"""

from __future__ import annotations

import contextlib
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
        PYTHONFAULTHANDLER="1",  # a rank killed by a signal (an abort in C++) prints its Python stacks
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = _descendants(proc.pid)  # before the agent dies and they are re-parented
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun {Path(script).name} did not finish in {timeout:.0f} s (a hang?)\n"
                             f"{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux ``/proc``; elsewhere none, and only the agent's group is killed)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found
