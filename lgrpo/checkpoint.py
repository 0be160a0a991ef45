"""Checkpoints that count only once complete and verified, and resume of everything a step depends on.

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

What a checkpoint holds is the registry of stateful objects the :class:`Checkpointer` is handed
(torchtitan's pattern): each entry's ``state_dict()`` is saved and its ``load_state_dict()`` called on
resume, so the trainer never passes its pieces one by one.

The same atomic, verified folder holds the warm-up's weights (:func:`save_weights`): the frozen
reference and listener are copies of the warmed-up policy, and a resumed run rebuilds them from it.
Elsewhere: process seeding and RNG state (lgrpo.seeding), the run folder's lock (lgrpo.run_lock), the
final Hugging Face export (lgrpo.export).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import distributed as D
from .seeding import RNG_FORMAT, rng_state, set_rng_state

STEP_RE = re.compile(r"^step_(\d+)$")
DONE = "DONE"
MANIFEST = "MANIFEST.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message says why and what is intact."""


# --- RNG files ---------------------------------------------------------------------------------


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


class ModelState:
    """The model as a stateful entry of the checkpointer's registry: plain or FSDP-sharded, any dtype.

    ``trainable_only``: the parameters that train and nothing else (a LoRA policy's adapters; its frozen
    base is rebuilt from where it came from, lgrpo.lora)."""

    def __init__(self, model: nn.Module, trainable_only: bool = False):
        self.model = model
        # Named once: requires_grad flips while a LoRA policy's adapters are off (lgrpo.lora).
        self.keys = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None

    def state_dict(self) -> dict:
        return _only(get_model_state_dict(self.model), self.keys)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state, options=StateDictOptions(strict=self.keys is None))


def _only(state: dict, keys: set[str] | None) -> dict:
    return state if keys is None else {k: v for k, v in state.items() if k in keys}


class OptimizerState:
    """The optimizer as a stateful entry: its state keyed by parameter name (the model's), so it reshards."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


# Entries of the registry whose state is tensors: written with DCP (sharded, any world size). The others
# are JSON in trainer_state.json: "trainer" at its top level (step, data position...), each other under
# its own name ("scheduler").
TENSOR_STATES = ("model", "optimizer")
TOP_LEVEL_STATE = "trainer"


class Checkpointer:
    """Save/load a registry of stateful objects and per-rank RNG; keep the latest k.

    ``states`` (torchtitan's Stateful registry) maps a name to an object with ``state_dict()`` and
    ``load_state_dict()``: the trainer hands ``{"model", "optimizer", "scheduler", "trainer"}``
    (:class:`ModelState`, :class:`OptimizerState`, its LR scheduler, itself). A scheduler may be None.
    """

    def __init__(self, folder: str | os.PathLike, keep: int, dist: D.Dist, states: dict):
        self.folder = Path(folder)
        self.keep = keep
        self.dist = dist
        self.states = states

    def save(self, step: int) -> Path:
        """Write ``step_N`` atomically (collective: every rank calls it); raises :class:`CheckpointError`
        (every rank) when it cannot, leaving the earlier checkpoints as they were."""

        def write_all(tmp: Path) -> None:
            tensors = {k: self.states[k].state_dict() for k in TENSOR_STATES if k in self.states}
            with _single_process_quiet():
                dcp.save(tensors, checkpoint_id=str(tmp))
            torch.save(rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")

        def write_main(tmp: Path) -> None:
            state: dict = {"step": step, "world_size": self.dist.world_size}
            for name, obj in self.states.items():
                if name in TENSOR_STATES:
                    continue
                if name == TOP_LEVEL_STATE:
                    state.update(obj.state_dict())
                else:
                    state[name] = obj.state_dict() if obj is not None else None
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

    def load(self, path: str | os.PathLike, *, verified: bool = False) -> dict:
        """Restore a complete checkpoint into every registered state, in place; returns the JSON state
        (step, world size, data position...).

        Verifies it first (collective) unless ``verified`` (it came from :meth:`find`)."""
        path = Path(path)
        problems = [] if verified else verify_checkpoint(path, self.dist)
        if problems:
            raise CheckpointError(f"{path} cannot be loaded: {'; '.join(problems)}" + self._others(path))
        state = json.loads((path / "trainer_state.json").read_text())
        tensors = {k: self.states[k].state_dict() for k in TENSOR_STATES if k in self.states}
        with _single_process_quiet():
            dcp.load(tensors, checkpoint_id=str(path))  # in place, into the entries' own (sharded) tensors
        for name, sd in tensors.items():
            self.states[name].load_state_dict(sd)
        for name, obj in self.states.items():
            if name == TOP_LEVEL_STATE:
                obj.load_state_dict(state)
            elif name not in TENSOR_STATES and obj is not None and state.get(name) is not None:
                obj.load_state_dict(state[name])
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


def _load_model(path: Path, model: nn.Module, frozen_only: bool = False) -> None:
    """The "model" entry of a DCP folder into ``model``: plain or FSDP-sharded, any dtype (cast on load);
    ``frozen_only``: the entries that do not train, the rest left as they are."""
    state = get_model_state_dict(model)
    if frozen_only:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k not in trainable}
    sd = {"model": state}
    with _single_process_quiet():
        dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd["model"], options=StateDictOptions(strict=not frozen_only))


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
                 dist: D.Dist | None = None, frozen_only: bool = False) -> None:
    """Load weights saved by :func:`save_weights` into each of ``models`` (plain or FSDP-sharded; their
    own dtypes). ``frozen_only``: only the weights that do not train (a resumed LoRA policy's warmed-up
    base; its adapters come from the GRPO checkpoint). Raises :class:`CheckpointError` naming the
    problems if the folder does not verify."""
    folder = Path(folder)
    problems = [] if verified else weights_info(folder, dist)[1]
    if problems:
        raise CheckpointError(f"{folder}: {'; '.join(problems)}")
    for m in models:
        _load_model(folder, m, frozen_only)
