"""One owner per run folder: a second ``lgrpo.train`` in a folder another live process holds is refused in
one line naming the holder, before it reads or writes anything there; a lock whose holder died (kill -9)
is taken over with a warning."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lgrpo.run_lock import LOCK_FILE, RunFolderBusy, RunLock

ROOT = Path(__file__).resolve().parents[1]

HOLD = """
import sys
from lgrpo.run_lock import RunLock
lock = RunLock(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()  # hold until the test says so
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_in_a_held_folder_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    holder = _holder(run)
    try:
        out = subprocess.run([sys.executable, "-m", "lgrpo.train", "--run.dir", str(tmp_path), "--run.name", "r",
                              "--train.steps", "1", "--run.progress", "false"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr  # one line, no traceback
    assert lines[0].startswith(f"error: run folder {run} is in use by PID {holder.pid} on host "
                               f"{socket.gethostname()} since ")
    assert "UTC" in lines[0] and "--run.name" in lines[0]
    # nothing of the holder's was touched: no config written, the metrics as they were
    assert not (run / "config.json").exists()
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_lock_is_exclusive_and_released_cleanly(tmp_path):
    lock = RunLock(tmp_path)
    info = json.loads((tmp_path / LOCK_FILE).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(RunFolderBusy, match=f"in use by PID {os.getpid()} on host"):
        RunLock(tmp_path)  # another open file description: refused even within one process
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean end leaves nothing to warn about
    again = RunLock(tmp_path)
    assert again.taken_over is None
    again.release()


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    lock = RunLock(tmp_path)
    try:
        assert lock.taken_over.startswith(f"PID {holder.pid} on host {socket.gethostname()} since ")
        out = capsys.readouterr().out
        assert f"taking over the lock of PID {holder.pid}" in out and "[warn]" in out
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
