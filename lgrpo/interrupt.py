"""Stop a run at a step boundary, checkpoint saved, on SIGTERM, SIGUSR1 or Ctrl-C.

Schedulers preempt with SIGTERM (SLURM also sends SIGUSR1 ahead of time with ``--signal``), and a
person stops a run with Ctrl-C. Without handling, everything since the last periodic checkpoint
(``checkpoint.interval`` steps: hours on a large model) would be lost. With :class:`GracefulStop`
around the training loop the first such signal only sets a flag; the loop finishes the step it is
in, every rank agrees to stop, the trainer saves a checkpoint, and the program exits with
128 + the signal number. Rerunning the same command resumes from that checkpoint. A second
Ctrl-C aborts at once (KeyboardInterrupt), for a step that hangs.
"""

from __future__ import annotations

import signal
import threading

import torch

from . import distributed as D

STOP_SIGNALS = tuple(
    s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None
)


class GracefulStop:
    """Context manager: while inside, the first stop signal is recorded (``signum``), not fatal.

    Handlers are installed only in the main thread (Python allows no other) and the previous ones
    are restored on exit.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, no checkpoint
        if self.signum is None:
            self.signum = signum
            name = signal.Signals(signum).name
            print(f"\n[stop] {name} received: finishing this step, then saving a checkpoint "
                  f"(Ctrl-C again to abort without saving)", flush=True)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def agreed(self, dist: D.Dist) -> int | None:
        """The signal that stops the run if any rank got one (the largest number), else None.

        A collective with more than one rank: every rank must call it at the same point of the loop,
        so that all of them stop after the same step.
        """
        return agree_max(dist, self.signum or 0)[0] or None


def agree_max(dist: D.Dist, *values: int) -> list[int]:
    """Each value's maximum over ranks, in one all-reduce (every rank calls it at the same point)."""
    if dist.world_size == 1 or not dist.initialized:
        return list(values)
    flags = torch.tensor(values, dtype=torch.int64, device=dist.device)
    return [int(v) for v in D.all_reduce_max(flags).tolist()]
