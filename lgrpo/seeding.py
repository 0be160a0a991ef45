"""A process's random streams: seeding them, and their state as plain data for a checkpoint.

The sampler and the data order have seeds of their own (lgrpo.rollout, lgrpo.data.PromptOrder); these are
the global streams (Python, numpy, torch, CUDA) anything else may draw from, saved per rank with each
checkpoint so a resumed run draws what the straight run would have.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global streams (the trainer passes ``train.seed + rank``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# The state is tensors, numbers and strings only, so a checkpoint's rng_rank{r}.pt is read with
# torch.load(weights_only=True) (lgrpo.checkpoint.load_rng_file): loading it runs none of our code.
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
    """Restore the streams :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
