"""A full disk while ``metrics.jsonl`` is written: the step is checkpointed first, the error names the file
and its filesystem, the row that could not be written is printed, and the same command resumes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lgrpo.checkpoint import complete_checkpoints, step_dir_name
from lgrpo.metrics import MetricsLogger, MetricsWriteError, read_jsonl
from tests.test_failures import SMALL

pytestmark = pytest.mark.usefixtures("reference_kernels")
ROOT = Path(__file__).resolve().parents[1]


def _disk_full_from_step(monkeypatch, step: int) -> None:
    write = MetricsLogger._write_all

    def write_all(self, data: bytes) -> None:
        if f'"step": {step},'.encode() in data:
            self._file.write(data[:7])  # part of the line got out, as on a real full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, data)

    monkeypatch.setattr(MetricsLogger, "_write_all", write_all)


def test_full_disk_during_metrics_saves_the_step_then_stops_and_resume_continues(tmp_path, monkeypatch, capsys):
    from lgrpo.train import main

    argv = [*SMALL, "--sft.steps", "0", "--run.dir", str(tmp_path), "--run.name", "full"]
    run = tmp_path / "full"
    with monkeypatch.context() as m:
        _disk_full_from_step(m, 3)
        with pytest.raises(MetricsWriteError) as err:
            main(argv)
    msg = str(err.value)
    assert f"could not append step 3 to {run / 'metrics.jsonl'}: No space left on device" in msg
    assert "free on its filesystem" in msg and f"Step 3 is saved in {run / 'checkpoints' / step_dir_name(3)}" in msg
    # Step 3 was not a checkpoint step (interval 2): it was saved because the metrics could not be.
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == [step_dir_name(2), step_dir_name(3)]
    out = capsys.readouterr().out
    assert '[metrics] could not append step 3' in out and 'the row: {"step": 3, "kind": "train"' in out
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl", kind="train")] == [1, 2]  # cut line dropped

    assert main(argv) == 0  # the same command, with room again: resumes after step 3
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl", kind="train")] == [1, 2, 4]


def test_a_real_full_disk_is_one_line_without_a_traceback(tmp_path):
    """``metrics.jsonl`` on /dev/full (every write fails with ENOSPC), through the command line."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    run = tmp_path / "devfull"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")
    argv = [*SMALL, "--sft.steps", "0", "--train.steps", "2", "--run.dir", str(tmp_path), "--run.name", "devfull"]
    proc = subprocess.run([sys.executable, "-m", "lgrpo.train", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not append step 1 to ") and "No space left on device" in last
    assert f"Step 1 is saved in {run / 'checkpoints' / step_dir_name(1)}" in last
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == [step_dir_name(1)]
