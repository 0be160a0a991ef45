"""Per-step metrics: a JSONL line per step, TensorBoard when installed, a tqdm bar and printed summaries.

Only rank 0 writes; every number it writes was reduced over ranks by the trainer first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch


class Timer:
    """Wall-clock seconds per named phase; synchronises CUDA so a phase's kernels count to it."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        except RuntimeError as err:  # torch.distributed's timeout errors derive from it
            if _is_collective_timeout(err):
                err.add_note(f"lgrpo: a collective timed out in the {name} phase: another rank is stalled, "
                             f"stopped or dead there (the wait is bounded by --parallel.timeout_s)")
            raise
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _is_collective_timeout(err: BaseException) -> bool:
    """gloo says "Timed out waiting ..."; NCCL's watchdog "Watchdog caught collective operation timeout"."""
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory since the last reset (GiB); CPU: the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - not Linux
        return float("nan")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


def show_progress_bar(progress: bool) -> bool:
    """A tqdm bar only when asked for and both output streams are terminals: piped into a file or
    ``tee``, a bar's redraws would interleave with the step lines as fragments."""
    return progress and sys.stdout.isatty() and sys.stderr.isatty()


def check_tensorboard(mode: str) -> None:
    """``--run.tensorboard on`` needs the package: say so at start-up, not when the first step logs."""
    if mode != "on":
        return
    from .config import ConfigError

    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--run.tensorboard on, but the tensorboard package is not installed: pip install tensorboard "
            "(or --run.tensorboard auto: event files only when it is installed)"
        ) from None


def keep_steps_up_to(path: str | os.PathLike, step: int) -> int:
    """Drop the rows of ``path`` (a metrics JSONL) after ``step``: the steps a resumed run will redo.

    A run that crashed after logging steps it never checkpointed logs them again when resumed; without
    this the file would hold them twice. Rewritten atomically; returns the number of rows dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the crash
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return len(lines) - len(kept)


class MetricsWriteError(RuntimeError):
    """``metrics.jsonl`` could not be written (a full disk, a vanished folder): the message says where."""


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.1f} MiB free" if free < 2**30 else f"{free / 2**30:.1f} GiB free"


class MetricsLogger:
    """``log(step, metrics)`` appends a JSON line to ``metrics.jsonl`` (and TensorBoard scalars).

    A failed write does not raise: the logger stops writing, keeps the error (``failed``, ``failure``) and
    the row it could not write, so that the trainer can agree with the other ranks, save a checkpoint and
    then stop with a message that names the disk.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: str = "auto",
        progress: bool = True,
        total_steps: int = 0,
        log_every: int = 1,
        desc: str = "grpo",
        initial_step: int = 0,
    ):
        self.enabled = enabled
        self.log_every = log_every
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._bar = None
        self.failure: str | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run continues the same file, from the step it resumed at: one line per step.
        keep_steps_up_to(self.path, initial_step)
        # Unbuffered bytes: a failed write leaves nothing queued that close() would try (and fail) again.
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the run
        if tensorboard != "off":
            check_tensorboard(tensorboard)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:  # auto, without the package
                self._tb = None
        if show_progress_bar(progress) and total_steps > 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, metrics: dict, *, kind: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        line = json.dumps(row)
        if self.failure is not None:
            self.write(f"[metrics] not written: {line}")
            return
        try:
            self._write_all((line + "\n").encode())
        except OSError as err:
            self._fail(err, step, line)
            return
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
        if self._bar is not None and kind == "train":
            self._bar.update(1)
            self._bar.set_postfix(
                {
                    k: f"{row[k]:.3g}"
                    for k in ("reward", "accuracy", "loss")
                    if isinstance(row.get(k), (int, float))
                },
                refresh=False,
            )

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a raw write may take only part of the bytes
            view = view[self._file.write(view):]

    def _fail(self, err: OSError, step: int, line: str) -> None:
        """Stop writing; keep what went wrong, and print the row so that its numbers survive in the log."""
        reason = err.strerror or str(err)
        self.failure = (f"could not append step {step} to {self.path}: {reason} "
                        f"({_free_space(self.path.parent)} on its filesystem)")
        try:
            self._file.close()
        except OSError:
            pass  # nothing is buffered; the error was reported above
        self._file = None
        self.write(f"[metrics] {self.failure}; the row: {line}")

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def write(self, text: str) -> None:
        """Print without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The rows of a metrics file; for a step written twice (crash + resume) the last row wins.

    A last line without its newline that does not parse was cut short (a crash, a full disk) and is left
    out; any other line that does not parse is an error.
    """
    rows: dict[tuple, dict] = {}
    text = Path(path).read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break
            raise
        if kind is None or row.get("kind") == kind:
            rows[(row.get("kind"), row["step"])] = row
    return sorted(rows.values(), key=lambda r: (r.get("kind", ""), r["step"]))
