"""A stop signal ends training at a step boundary with a checkpoint saved; rerunning resumes from it."""

from __future__ import annotations

import json
import os
import signal

import pytest

from lgrpo import distributed as D
from lgrpo.checkpoint import complete_checkpoints, step_dir_name
from lgrpo.interrupt import GracefulStop
from tests.test_trainer import make_trainer

# Trainer logic, many steps: the kernels run as the reference (see conftest.reference_kernels).
pytestmark = pytest.mark.usefixtures("reference_kernels")


def test_first_signal_is_recorded_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert stop.signum is None and stop.agreed(D.Dist()) is None
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before kill returns here
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGUSR1)  # a later, different signal does not replace the first
        assert stop.agreed(D.Dist()) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_aborts_at_once():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def _signal_during_step(trainer, at_step: int, signum: int) -> None:
    step = trainer.train_step

    def train_step():
        if trainer.step + 1 == at_step:
            os.kill(os.getpid(), signum)  # mid-step: the step must still finish
        return step()

    trainer.train_step = train_step


def test_sigterm_mid_step_saves_that_step_and_resume_finishes_the_run(tmp_path):
    trainer = make_trainer(tmp_path, train={"steps": 4}, checkpoint={"interval": 0})
    _signal_during_step(trainer, at_step=2, signum=signal.SIGTERM)
    history = trainer.fit()
    assert trainer.stopped_by == signal.SIGTERM and trainer.step == 2 and len(history) == 2
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == [step_dir_name(2)]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after fit

    again = make_trainer(tmp_path, train={"steps": 4}, checkpoint={"interval": 0})
    assert again.resume() and again.step == 2
    assert len(again.fit()) == 2 and again.stopped_by is None and again.step == 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("interval", [0, 2])  # the step not yet saved, and already saved at its interval
def test_a_signal_during_the_periodic_eval_stops_before_the_next_step(tmp_path, interval):
    trainer = make_trainer(tmp_path, train={"steps": 4}, checkpoint={"interval": interval})
    evals = []

    def periodic_eval(tr, _metrics):  # stands in for train.py's held-out eval every 2 steps
        if tr.step % 2 == 0:
            evals.append(tr.step)
            os.kill(os.getpid(), signal.SIGTERM)

    history = trainer.fit(on_step=periodic_eval)
    assert trainer.stopped_by == signal.SIGTERM and trainer.step == 2 and len(history) == 2 and evals == [2]
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == [step_dir_name(2)]


def test_train_main_exits_128_plus_the_signal_without_the_final_stages(tmp_path, monkeypatch):
    from lgrpo.train import main
    from lgrpo.trainer import Trainer

    fit = Trainer.fit

    def fit_with_signal(self, on_step=None):
        _signal_during_step(self, at_step=1, signum=signal.SIGUSR1)
        return fit(self, on_step)

    monkeypatch.setattr(Trainer, "fit", fit_with_signal)
    argv = ["--run.dir", str(tmp_path), "--run.name", "stopped", "--run.progress", "false",
            "--sft.steps", "0", "--train.steps", "3", "--data.eval_size", "4",
            "--data.synthetic_train_size", "16", "--train.prompts_per_step", "2", "--rollout.group_size", "2"]
    assert main(argv) == 128 + signal.SIGUSR1
    run = tmp_path / "stopped"
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == [step_dir_name(1)]
    assert not (run / "final").exists() and not (run / "eval_after.json").exists()


def _start_training(tmp_path, *extra: str):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU: the reference kernels
    argv = [sys.executable, "-m", "lgrpo.train", "--run.dir", str(tmp_path), "--run.name", "cli",
            "--run.progress", "false", "--checkpoint.interval", "0", "--data.eval", "none",
            "--data.synthetic_train_size", "16", "--train.prompts_per_step", "2", "--rollout.group_size", "2",
            "--rollout.max_new_tokens", "8", *extra]
    # SIGINT at its default, as for a program started at a terminal: a test session started as a background
    # shell job has SIGINT ignored, ignored signals survive exec, and Python then installs no Ctrl-C handler.
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, proc, timeout_s: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run did not get there in time"
        time.sleep(0.1)


def test_cli_sigterm_during_grpo_saves_and_exits_143(tmp_path):
    """`python -m lgrpo.train` in its own process: SIGTERM mid-run -> a checkpoint of the last finished
    step, metrics for exactly those steps, exit status 128 + 15."""
    proc = _start_training(tmp_path, "--sft.steps", "0", "--train.steps", "1000")
    metrics = tmp_path / "cli" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    saved = complete_checkpoints(tmp_path / "cli" / "checkpoints")
    steps = len(metrics.read_text().splitlines())
    assert [p.name for p in saved] == [step_dir_name(steps)], (saved, steps)
    assert "[stop] SIGTERM received" in out and "run the same command again" in out


def test_cli_ctrl_c_during_the_warmup_exits_130_without_a_traceback(tmp_path):
    proc = _start_training(tmp_path, "--sft.steps", "100000", "--train.steps", "1")
    _wait_for(lambda: (tmp_path / "cli" / "config.json").exists(), proc)
    import time

    time.sleep(3)  # into model building or the warm-up
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "[stop] interrupted" in out and "Traceback" not in out
