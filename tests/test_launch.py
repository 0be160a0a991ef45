"""tests/launch.py's torchrun: a rank that never returns fails the test on time, and no rank outlives it.

torch's elastic agent starts each rank in a session of its own, so killing the agent's process group
alone leaves the ranks running (and holding the output pipes, so the test would wait forever).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.launch import torchrun


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through Linux /proc")
def test_hung_ranks_are_killed(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError, match="did not finish in 15 s"):
        torchrun(__file__, str(tmp_path), timeout=15)
    assert time.monotonic() - start < 40
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert len(pids) == 2, "both ranks must have started within the timeout (a very busy machine?)"
    time.sleep(0.5)  # SIGKILL is asynchronous; the kernel reaps the orphans through init
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
    assert not alive, f"ranks {alive} outlived the timeout"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


if __name__ == "__main__":  # a rank that hangs
    (Path(sys.argv[1]) / f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    time.sleep(600)
