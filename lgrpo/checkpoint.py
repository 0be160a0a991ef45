"""Checkpoints that count only once complete and verified, resume of everything a step depends on, and
the final export.

Layout of a run's ``checkpoints/`` folder::

    step_0000010/           complete: has DONE
      .metadata, __*.distcp   model + optimizer (torch.distributed.checkpoint, sharded, any world size)
      trainer_state.json      step, scheduler, data position, world size
      rng_rank{r}.pt          torch / cuda / python / numpy RNG of rank r (tensors and numbers only)
      MANIFEST.json           size and SHA-256 of every file above
      DONE                    written last; the folder was renamed from step_0000010.tmp after it
    step_0000020.tmp/       a save in progress or killed mid-way: ignored and cleaned up

Writes go to ``step_N.tmp`` and are renamed to ``step_N`` only after every rank finished, the manifest
and DONE were written, so a crash at any moment leaves the previous complete checkpoint loadable. A
save that fails (a full disk, an I/O error) removes its ``.tmp`` on the way out and says which
checkpoint is intact; it never deletes or overwrites a complete one (older ones are pruned only after
the new one is in place). On resume the newest checkpoint is verified against its manifest (sizes and
checksums); a damaged one is passed over, with a warning naming it and the one used instead. The
folder must be on a file system every rank sees (one node, or a shared file system across nodes).

The same atomic, verified folder holds the warm-up's weights (:func:`save_weights`): the frozen
reference and listener are copies of the warmed-up policy, and a resumed run rebuilds them from it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from . import distributed as D

STEP_RE = re.compile(r"^step_(\d+)$")
DONE = "DONE"
MANIFEST = "MANIFEST.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message says why and what is intact."""


# --- one owner per run folder ---------------------------------------------------------------------

LOCK_FILE = "run.lock"


class RunFolderBusy(CheckpointError):
    """Another live process holds the run folder's lock; the message names it."""


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run folder>/run.lock``, held for the life of the process.

    Two trainers in one folder would replace each other's ``metrics.jsonl`` and delete each other's
    ``step_N.tmp`` (a requeued job started while the old one still runs). The kernel drops a flock
    when its holder dies, however it dies, so a lock that can be taken is never a live owner's; the
    file's contents (host, PID, since when) only name the holder in the refusal, and when a taken lock
    still names someone, that holder died without releasing it: taken over with a warning.
    """

    def __init__(self, run_dir: str | os.PathLike):
        import fcntl
        import socket
        from datetime import datetime

        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(self._fd)
            os.close(self._fd)
            raise RunFolderBusy(
                f"run folder {self.path.parent} is in use by {holder} (lock {self.path}): wait for that run "
                "to end or stop it, or start this one under another --run.name") from None
        except OSError as err:  # a file system without locks (some network mounts): say so, go on
            print(f"[warn] cannot lock {self.path} ({err.strerror}): this file system does not support "
                  "locks, so nothing stops a second run from using the folder at the same time", flush=True)
            self.taken_over = None
        else:
            self.taken_over = _lock_holder(self._fd, default=None)
        if self.taken_over is not None:
            print(f"[warn] {self.path}: taking over the lock of {self.taken_over}, which ended without "
                  "releasing it (killed or crashed)", flush=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Empty the file (a clean end: the next owner has nothing to warn about), then unlock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None


def _lock_holder(fd: int, default: str | None = "another process") -> str | None:
    """"PID 1234 on host h since 2026-12-07 11:40:03 UTC" from the lock file, or ``default`` when empty."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        return f"PID {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, TypeError, KeyError):
        return default


_HELD: dict[str, RunLock] = {}  # run folder (real path) -> this process's lock on it


def lock_run_folder(run_dir: str | os.PathLike, dist: D.Dist) -> RunLock | None:
    """Rank 0 takes the run folder's :class:`RunLock` (released at exit); every rank raises the same
    :class:`RunFolderBusy` when it is held, so no rank waits in a collective for one that gave up."""
    import atexit

    lock, refusal = None, None
    if dist.is_main:
        key = os.path.realpath(run_dir)
        lock = _HELD.get(key)
        if lock is None or lock._fd is None:  # this process already owns it: a second main() in one process
            try:
                lock = _HELD[key] = RunLock(run_dir)
                atexit.register(lock.release)
            except RunFolderBusy as err:
                refusal = str(err)
    refusal = D.broadcast_object(refusal)
    if refusal is not None:
        raise RunFolderBusy(refusal)
    return lock


# --- RNG ------------------------------------------------------------------------------------------


# Our own state in a checkpoint is tensors, numbers and strings only, read with torch.load(weights_only=True):
# loading a checkpoint runs none of our code (a pickle could run any). DCP's .metadata is torch's own
# pickle: a checkpoint folder must still come from a trusted source (docs/failures.md).
RNG_FORMAT = 2


def rng_state() -> dict:
    """This process's RNG streams as plain data: torch/cuda tensors, Python's state tuple of ints, and
    numpy's MT19937 state with its key array as a tensor (numpy arrays are not weights_only-loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"format": RNG_FORMAT, "torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_file(path: Path) -> dict:
    """A checkpoint's ``rng_rank{r}.pt``, read with ``weights_only=True``: nothing in it is executed."""
    import pickle

    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: holds more than tensors and numbers, so it is not loaded (loading it could run code "
            f"from the checkpoint folder). A checkpoint from lgrpo before RNG format {RNG_FORMAT} cannot be "
            "resumed: start over with --checkpoint.resume none or a new --run.name") from None
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        raise CheckpointError(f"{path}: not an lgrpo RNG state of format {RNG_FORMAT}; start over with "
                              "--checkpoint.resume none or a new --run.name")
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it "assumes a single process" when no process group is up: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# --- the step folders -----------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete step folders (with DONE), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / DONE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# --- manifests: what a complete folder holds, to verify before it is trusted ------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)  # releases the GIL: the pool below hashes files in parallel
    return h.hexdigest()


def _hash_files(folder: Path, names: list[str]) -> dict[str, dict]:
    with ThreadPoolExecutor(max_workers=min(8, max(len(names), 1))) as pool:
        digests = list(pool.map(lambda n: _sha256(folder / n), names))
    return {n: {"size": (folder / n).stat().st_size, "sha256": d} for n, d in zip(names, digests)}


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, DONE))


def _share(names: list[str], dist: D.Dist | None) -> list[str]:
    """This rank's share of the files to hash: ranks split the reading of a large checkpoint."""
    return names if dist is None else names[dist.rank :: dist.world_size]


def _merge_gathered(parts: list) -> dict:
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def verify_checkpoint(folder: str | os.PathLike, dist: D.Dist | None = None) -> list[str]:
    """What is wrong with a checkpoint folder (empty list: complete and every file as written).

    Collective when ``dist`` is given: ranks hash a share of the files each. A folder written before
    manifests existed is checked for its DONE marker and state file only.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    if not (folder / DONE).is_file():
        return [f"no {DONE} marker: it was interrupted while being written"]
    try:
        manifest = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return [] if (folder / "trainer_state.json").is_file() or (folder / "info.json").is_file() else [
            "no state file (trainer_state.json)"]
    except (ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST} is unreadable: {err}"]
    # Ranks share the checking (the manifest, hence the split, is the same on every rank).
    mine, sized = [], []
    for name in _share(sorted(manifest), dist):
        path, size = folder / name, manifest[name]["size"]
        if not path.is_file():
            mine.append(f"{name} is missing")
        elif path.stat().st_size != size:
            mine.append(f"{name} is {path.stat().st_size} bytes, {size} were written (truncated?)")
        else:
            sized.append(name)
    mine += [f"{n}: checksum differs from the one written" for n, e in _hash_files(folder, sized).items()
             if e["sha256"] != manifest[n]["sha256"]]
    return sorted(p for part in (D.all_gather_objects(mine) if dist is not None else [mine]) for p in part)


# --- writing a folder atomically, on every rank ---------------------------------------------------------


def _no_space(err: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of disk: ENOSPC anywhere in the exception (DCP wraps each rank's
    error; torch.save's zip writer reports only "file write failed"), or almost nothing left free."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
            return True
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    try:
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False


def _agree(error: BaseException | None, dist: D.Dist) -> bool:
    """True on every rank when no rank failed (one all-reduce, whatever happened)."""
    flag = torch.tensor([0.0 if error is None else 1.0], device=dist.device)
    return float(D.all_reduce_max(flag)) == 0.0


def _write_folder(final: Path, dist: D.Dist, write_all: Callable[[Path], None],
                  write_main: Callable[[Path], None], what: str) -> Path:
    """Write ``final`` as ``final.tmp`` (``write_all`` on every rank, collective; then ``write_main`` on
    rank 0), add the manifest and DONE, and rename it into place. On any failure every rank raises
    :class:`CheckpointError` and the ``.tmp`` is removed; an existing ``final`` is replaced only by a
    complete new one."""
    tmp = final.with_name(final.name + ".tmp")
    error: BaseException | None = None

    def attempt(fn: Callable[[], None], on_main_only: bool = False) -> None:
        nonlocal error
        if error is None and (dist.is_main or not on_main_only):
            try:
                fn()
            except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
                error = err
        if not _agree(error, dist):
            _fail(error)

    def _fail(err: BaseException | None) -> None:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written folder behind
        D.barrier()
        kept = latest_checkpoint(final.parent)
        intact = f"{kept} is intact" if kept is not None and kept != final else (
            f"{final} is intact" if (final / DONE).is_file() else "no earlier checkpoint was touched")
        if err is None:
            msg = f"saving {what} failed on another rank; the partial {tmp.name} was removed, {intact}"
        elif _no_space(err, final.parent):
            free = shutil.disk_usage(final.parent).free / 2**20 if final.parent.exists() else 0.0
            msg = (f"no space left on the disk of {final.parent} ({free:.0f} MiB free) while saving {what}; "
                   f"the partial {tmp.name} was removed and {intact}. Free some space and run the same "
                   f"command again (older checkpoints are pruned only after a new one is saved, so a "
                   f"lower --checkpoint.keep frees nothing now: delete the oldest step_* by hand if needed)")
        else:
            msg = f"saving {what} to {tmp} failed: {type(err).__name__}: {err}; the partial save was removed, {intact}"
        raise CheckpointError(msg) from err

    def prepare() -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a stale attempt at the same folder
        tmp.mkdir()

    attempt(prepare, on_main_only=True)
    attempt(lambda: write_all(tmp))
    attempt(lambda: write_main(tmp), on_main_only=True)
    # Rank 0's listing, shared, so every rank hashes its share of the same list.
    listing: list[str] = []
    attempt(lambda: listing.extend(_files(tmp)), on_main_only=True)
    names: list[str] = D.broadcast_object(listing)
    hashed: dict = {}

    def hash_share() -> None:
        hashed.update(_hash_files(tmp, _share(names, dist)))

    attempt(hash_share)
    gathered = _merge_gathered(D.all_gather_objects(hashed))

    def finish() -> None:
        _fsync_write(tmp / MANIFEST, json.dumps({"files": {n: gathered[n] for n in names}}, indent=1))
        _fsync_write(tmp / DONE, json.dumps({"time": time.time()}))
        old = final.with_name(final.name + ".replaced")
        if final.exists():  # the same folder saved again: swap, then delete the old one
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    attempt(finish, on_main_only=True)
    return final


class Checkpointer:
    """Save/load the policy, optimizer, scheduler, trainer state and per-rank RNG; keep the latest k."""

    def __init__(self, folder: str | os.PathLike, keep: int, dist: D.Dist):
        self.folder = Path(folder)
        self.keep = keep
        self.dist = dist

    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, trainer_state: dict
    ) -> Path:
        """Write ``step_N`` atomically (collective: every rank calls it); raises :class:`CheckpointError`
        (every rank) when it cannot, leaving the earlier checkpoints as they were."""

        def write_all(tmp: Path) -> None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            with _single_process_quiet():
                dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
            torch.save(rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")

        def write_main(tmp: Path) -> None:
            state = {
                "step": step,
                "world_size": self.dist.world_size,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                **trainer_state,
            }
            _fsync_write(tmp / "trainer_state.json", json.dumps(state, indent=2))

        final = _write_folder(self.folder / step_dir_name(step), self.dist, write_all, write_main,
                              f"the checkpoint of step {step}")
        if self.dist.is_main:
            self._prune()
        D.barrier()
        return final

    def _prune(self) -> None:
        for old in complete_checkpoints(self.folder)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for pattern in ("step_*.tmp", "step_*.replaced"):  # attempts killed mid-save
            for p in self.folder.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)

    def find(self, resume: str) -> Path | None:
        """The checkpoint ``--checkpoint.resume`` names, verified (collective).

        ``auto``: the newest complete checkpoint that verifies; damaged newer ones are passed over with a
        warning naming them and the one used. A path: that folder, which must verify. ``none``: None.
        """
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            problems = verify_checkpoint(path, self.dist)
            if problems:
                raise CheckpointError(
                    f"--checkpoint.resume {path}: cannot resume from it: {'; '.join(problems)}"
                    + self._others(path))
            return path
        candidates = complete_checkpoints(self.folder)
        damaged: list[tuple[Path, list[str]]] = []
        for path in reversed(candidates):
            problems = verify_checkpoint(path, self.dist)
            if not problems:
                if damaged and self.dist.is_main:
                    for bad, why in damaged:
                        print(f"[checkpoint] WARNING: {bad} is damaged ({'; '.join(why)}); resuming from "
                              f"{path.name} instead", flush=True)
                return path
            damaged.append((path, problems))
        if damaged:
            listed = "; ".join(f"{p.name}: {', '.join(w)}" for p, w in damaged)
            raise CheckpointError(
                f"no checkpoint in {self.folder} verifies ({listed}). Start over with --checkpoint.resume "
                f"none (or a new --run.name)")
        return None

    def _others(self, path: Path) -> str:
        good = [p for p in complete_checkpoints(path.parent) if p != path]
        return f"; other complete checkpoints there: {', '.join(p.name for p in good)}" if good else ""

    def load(
        self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler,
        *, verified: bool = False,
    ) -> dict:
        """Restore a complete checkpoint in place; returns its trainer state (step, data position...).

        Verifies it first (collective) unless ``verified`` (it came from :meth:`find`)."""
        path = Path(path)
        problems = [] if verified else verify_checkpoint(path, self.dist)
        if problems:
            raise CheckpointError(f"{path} cannot be loaded: {'; '.join(problems)}" + self._others(path))
        state = json.loads((path / "trainer_state.json").read_text())
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            sd = {"model": model_sd, "optimizer": optim_sd}
            with _single_process_quiet():
                dcp.load(sd, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        else:
            _load_model(path, model)
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        rng_file = path / f"rng_rank{self.dist.rank}.pt"
        if rng_file.is_file() and state.get("world_size") == self.dist.world_size:
            set_rng_state(load_rng_file(rng_file))
        elif self.dist.is_main:
            print(
                f"[checkpoint] {path.name} was written by {state.get('world_size')} ranks, now "
                f"{self.dist.world_size}: model/optimizer are resharded, RNG streams start fresh",
                flush=True,
            )
        return state


def _load_model(path: Path, model: nn.Module) -> None:
    """The "model" entry of a DCP folder into ``model``: plain or FSDP-sharded, any dtype (cast on load)."""
    sd = {"model": get_model_state_dict(model)}
    with _single_process_quiet():
        dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd["model"])


# --- model weights alone: the warm-up's result ----------------------------------------------------------


def save_weights(folder: str | os.PathLike, model: nn.Module, dist: D.Dist, info: dict) -> Path:
    """Save ``model``'s weights (plain or sharded) as an atomic, verified folder, with ``info.json``.

    Collective. The trainer saves the warmed-up policy this way once, so a resumed run can rebuild the
    frozen reference and listener that were copied from it."""

    def write_all(tmp: Path) -> None:
        with _single_process_quiet():
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp))

    def write_main(tmp: Path) -> None:
        _fsync_write(tmp / "info.json", json.dumps(info, indent=2))

    return _write_folder(Path(folder), dist, write_all, write_main, f"the weights to {folder}")


def weights_info(folder: str | os.PathLike, dist: D.Dist | None = None) -> tuple[dict | None, list[str]]:
    """``(info, [])`` for a saved weights folder that verifies, ``(None, problems)`` otherwise (collective)."""
    folder = Path(folder)
    problems = verify_checkpoint(folder, dist)
    if not problems and not (folder / "info.json").is_file():
        problems = ["info.json is missing"]
    return (None, problems) if problems else (json.loads((folder / "info.json").read_text()), [])


def load_weights(folder: str | os.PathLike, models: list[nn.Module], *, verified: bool = False,
                 dist: D.Dist | None = None) -> None:
    """Load weights saved by :func:`save_weights` into each of ``models`` (plain or FSDP-sharded; their
    own dtypes). Raises :class:`CheckpointError` naming the problems if the folder does not verify."""
    folder = Path(folder)
    problems = [] if verified else weights_info(folder, dist)[1]
    if problems:
        raise CheckpointError(f"{folder}: {'; '.join(problems)}")
    for m in models:
        _load_model(folder, m)


# --- the final export -----------------------------------------------------------------------------


def export_pretrained(
    model: nn.Module, out_dir: str | os.PathLike, dist: D.Dist, extra_savers: tuple = ()
) -> Path | None:
    """Write ``model`` as a safetensors Hugging Face folder that ``from_pretrained`` loads.

    Collective under FSDP2 (the full weights are gathered to rank 0's CPU, one tensor at a time);
    rank 0 writes to ``out_dir.tmp`` and renames. ``extra_savers`` are objects with
    ``save_pretrained`` (tokenizer, image processor) written into the same folder.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = Path(out_dir)
    if dist.is_main:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), state_dict=full, safe_serialization=True)
        for saver in extra_savers:
            if saver is not None:
                saver.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    D.barrier()
    return out if dist.is_main else None
