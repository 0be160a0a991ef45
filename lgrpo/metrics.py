"""Per-step metrics: a JSONL line per step, TensorBoard when installed, a tqdm bar and printed summaries.

Only rank 0 writes; every number it writes was reduced over ranks by the trainer first.
"""

from __future__ import annotations

import json
import math
import os
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
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


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


class MetricsLogger:
    """``log(step, metrics)`` appends a JSON line to ``metrics.jsonl`` (and TensorBoard scalars)."""

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
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file (its lines carry the step, so a reader
        # can keep the last line of each step if a crash repeated some).
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives as long as the run
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:
                if tensorboard == "on":
                    raise RuntimeError(
                        "--run.tensorboard on, but the tensorboard package is not installed "
                        "(pip install tensorboard)"
                    ) from None
        if progress and total_steps > 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, metrics: dict, *, kind: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
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
    """The rows of a metrics file; for a step written twice (crash + resume) the last row wins."""
    rows: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if kind is None or row.get("kind") == kind:
            rows[(row.get("kind"), row["step"])] = row
    return sorted(rows.values(), key=lambda r: (r.get("kind", ""), r["step"]))
