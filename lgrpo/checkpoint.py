"""Checkpoints that count only once complete, resume of everything a step depends on, and the final export.

Layout of a run's ``checkpoints/`` folder::

    step_0000010/           complete: has DONE
      .metadata, __*.distcp   model + optimizer (torch.distributed.checkpoint, sharded, any world size)
      trainer_state.json      step, scheduler, data position, world size
      rng_rank{r}.pt          torch / cuda / python / numpy RNG of rank r
      DONE                    written last; the folder was renamed from step_0000010.tmp after it
    step_0000020.tmp/       a save in progress or killed mid-way: ignored and cleaned up

Writes go to ``step_N.tmp`` and are renamed to ``step_N`` only after every rank finished and DONE
was written, so a crash at any moment leaves the previous complete checkpoint loadable. The folder
must be on a file system every rank sees (one node, or a shared file system across nodes).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from . import distributed as D

STEP_RE = re.compile(r"^step_(\d+)$")
DONE = "DONE"


# --- RNG ------------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


class Checkpointer:
    """Save/load the policy, optimizer, scheduler, trainer state and per-rank RNG; keep the latest k."""

    def __init__(self, folder: str | os.PathLike, keep: int, dist: D.Dist):
        self.folder = Path(folder)
        self.keep = keep
        self.dist = dist

    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, trainer_state: dict
    ) -> Path:
        """Write ``step_N`` atomically (collective: every rank calls it)."""
        final = self.folder / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a stale attempt at the same step
            tmp.mkdir()
        D.barrier()

        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _single_process_quiet():
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")
        D.barrier()

        if self.dist.is_main:
            state = {
                "step": step,
                "world_size": self.dist.world_size,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                **trainer_state,
            }
            _fsync_write(tmp / "trainer_state.json", json.dumps(state, indent=2))
            _fsync_write(tmp / DONE, json.dumps({"step": step, "time": time.time()}))
            if final.exists():  # the same step saved again (e.g. the end of a run that was resumed there)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        D.barrier()
        return final

    def _prune(self) -> None:
        for old in complete_checkpoints(self.folder)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for p in self.folder.glob("step_*.tmp"):  # attempts killed mid-save
            shutil.rmtree(p, ignore_errors=True)

    def load(
        self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler
    ) -> dict:
        """Restore a complete checkpoint in place; returns its trainer state (step, data position...)."""
        path = Path(path)
        if not (path / DONE).is_file():
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint (no {DONE} marker): it was "
                f"interrupted while being written; use an earlier step folder"
            )
        state = json.loads((path / "trainer_state.json").read_text())
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            sd = {"model": model_sd, "optimizer": optim_sd}
            with _single_process_quiet():
                dcp.load(sd, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        else:
            model_sd = get_model_state_dict(model)
            sd = {"model": model_sd}
            with _single_process_quiet():
                dcp.load(sd, checkpoint_id=str(path))
            set_state_dict(model, [], model_state_dict=sd["model"], optim_state_dict={})
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        rng_file = path / f"rng_rank{self.dist.rank}.pt"
        if rng_file.is_file() and state.get("world_size") == self.dist.world_size:
            set_rng_state(torch.load(rng_file, weights_only=False))
        elif self.dist.is_main:
            print(
                f"[checkpoint] {path.name} was written by {state.get('world_size')} ranks, now "
                f"{self.dist.world_size}: model/optimizer are resharded, RNG streams start fresh",
                flush=True,
            )
        return state


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
