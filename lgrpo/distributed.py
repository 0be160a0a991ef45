"""Process group, devices, collectives and FSDP2 sharding: the same code for 1 CPU process and N GPUs.

``python -m lgrpo.train`` runs without a process group (world size 1). Under ``torchrun`` (RANK and
WORLD_SIZE in the environment) a group is started: nccl on GPUs, gloo on CPU. Multi-node is
torchrun's job; nothing here knows about nodes.

Equal collectives, by construction. A collective that one rank issues and another does not hangs
both forever, and every forward of an FSDP-sharded module is a series of collectives (one
all-gather per block). So every phase follows one of two rules, whatever its data:

- **same count**: the number of forwards is a function of the config alone, never of the data. The
  step gives each rank ``prompts_per_step / world`` prompts and G completions of each, so the
  reference and old-log-prob passes, the policy update and the warm-up run the same micro-batches
  on every rank. Where the count does depend on the data, it is padded to the maximum over ranks
  with dummy work (:func:`max_over_ranks`): the listener scores only completions with a think
  block, so it runs ``max_over_ranks(its chunks)`` forwards, dummy chunks included
  (lgrpo/listener.py).
- **gathered for the phase**: ``generate`` runs a data-dependent number of forwards (it stops when
  its rows are done), so the sharded policy is unsharded once for the whole phase
  (:func:`gathered`: one all-gather per block on every rank) and its forwards then communicate
  nothing. Rollouts and held-out evaluation follow this rule. The rollout engine (lgrpo/rollout/engine.py)
  also keeps the same count: its every-k-steps "all rows done?" test is all-reduced (max), so every
  rank leaves the decode loop at the same step and the all-reduces themselves match.

Evaluation splits the pairs evenly (``ceil(n / world)`` per rank, padded with repeats that are
dropped), so the per-batch listener calls, and their padding all-reduce, are equal in number too.
Checkpoint saves, exports and the per-step metric all-reduces run on every rank unconditionally.
Tests: tests/test_distributed.py (2 processes, gloo, with a timeout so a hang fails).

What equals what between N ranks and one process, the GRPO update and the supervised warm-up alike:

- **bit for bit**: each step's prompts and their order (lgrpo.data.PromptOrder, split by rank), the
  warm-up's targets, the rollouts' random draws (keyed by the global row, not the rank), and the
  global token and sequence counts every loss is normalised by;
- **to float32 rounding**: each step's gradient and gradient norm. Micro-batch gradients are summed in
  another order (autograd's accumulation on one process, FSDP's reduce-scatter across ranks) and a
  sharded norm sums its shards; the logged losses are fp64 sums of the same fp32 terms.
- **closely, not exactly**: the weights. AdamW divides each coordinate's step by its own gradient scale,
  so a coordinate whose gradient is near zero (where rounding is most of its value) can move by up to
  the learning rate either way, and such differences compound step after step.

The seeded sampler draws the same token only while no token's cumulative probability lies within the
weights' difference of its uniform draw. So a short run reproduces one process's rollouts, and its
losses for the first steps after identical weights (tests/test_distributed.py: 3 GRPO steps; and a warm-up
of 8 steps, after which the same completions are sampled, the losses drifting apart from the second GRPO
step at the test's lr 1e-2), while a long run, a long warm-up at its high learning rate above all, may
take another path from some step on: a run distributed like the one-process run, not identical to it.
Bit-identical sums would need a fixed reduction tree over every micro-batch of every rank (per-micro-batch
gradients kept, or gathered), which costs memory the update cannot spare.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

if dist.is_available():
    # FSDP2 imports torch.distributed.nn.functional, whose collectives take ``group=group.WORLD`` as
    # a default argument, bound at import. Imported after the group exists (shard() imports FSDP
    # lazily), those defaults would hold the group for the life of the process (see close()).
    # Imported here, before any group, they are None.
    import torch.distributed.nn.functional  # noqa: F401


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> Dist:
    """Start the process group when launched by torchrun; pick this rank's device.

    ``device``: auto (cuda when available), cpu or cuda. ``backend``: auto (nccl with cuda, gloo on
    cpu), nccl or gloo.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--train.device cuda was asked for, but torch sees no CUDA device")
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if launched_by_torchrun() and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev)


_BEFORE_CLOSE: list = []  # run by close() before the process group goes (lgrpo.rollout.vllm's engines use it)


def on_close(fn) -> None:
    """Run ``fn()`` in :func:`close`, before the process group is destroyed (once; last registered, first run)."""
    if fn not in _BEFORE_CLOSE:
        _BEFORE_CLOSE.append(fn)


def close() -> None:
    """Run the before-close hooks, destroy the process group and free it while the interpreter is whole.

    ``destroy_process_group`` only unregisters the group: it is freed, and its worker threads
    joined, when its last reference goes. After FSDP2 sharding the sharded modules and DTensor's
    process-wide sharding-propagation caches still hold its DeviceMesh, so the gloo workers live on
    into interpreter finalization. A worker frees a finished collective's work object after the
    caller has moved on; when that drops the last reference to a Python tensor, the worker takes the
    GIL, and during finalization taking the GIL ends the thread (pthread_exit) inside that noexcept
    destructor: std::terminate, SIGABRT ("terminate called without an active exception") after the
    rank's work is done. So the group is freed here if nothing else holds it, else at exit, when
    the caller's frames (trainer, models) are gone; atexit functions run before finalization.
    """
    while _BEFORE_CLOSE:
        _BEFORE_CLOSE.pop()()
    if dist.is_available() and dist.is_initialized():
        group = weakref.ref(dist.group.WORLD)
        dist.destroy_process_group()
        if not _free(group):
            atexit.register(_free, group, at_exit=True)


def _free(group: weakref.ref, at_exit: bool = False) -> bool:
    """Drop the references that keep a destroyed group alive; True once it is freed (its threads joined).

    Sharded modules the caller no longer holds are reference cycles (FSDP2's hooks): collected here.
    DeviceMeshes hold their groups (``_pg_registry`` in recent torch) and DTensor's caches hold
    meshes (sharding propagation, in C++ too; redistribute planners; ...): rather than clear each
    cache, the destroyed group is dropped from every live mesh, which no collective can use any more.
    """
    gc.collect()
    pg = group()
    if pg is not None:
        from torch.distributed.device_mesh import DeviceMesh

        for obj in gc.get_objects():  # type(), not isinstance: __class__ of deprecated torch objects warns
            registry = getattr(obj, "_pg_registry", None) if issubclass(type(obj), DeviceMesh) else None
            for name in [n for n, g in registry.items() if g is pg] if registry else ():
                del registry[name]
        del pg
    if group() is not None and at_exit:
        warnings.warn("lgrpo.distributed.close: the process group is still referenced at exit; its worker "
                      "threads may abort the exit (SIGABRT) after the work is done", RuntimeWarning, stacklevel=1)
    return group() is None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned); identity without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def max_over_ranks(n: int) -> int:
    """The largest ``n`` over all ranks (a count every rank pads to); ``n`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return n
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    """Every rank's object, in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --- FSDP2 ----------------------------------------------------------------------------------------


def use_fsdp(mode: str) -> bool:
    """parallel.fsdp: auto shards when a process group is up (torchrun), on forces it, off never."""
    up = dist.is_available() and dist.is_initialized()
    if mode == "on" and not up:
        raise RuntimeError("--parallel.fsdp on needs a process group: launch with torchrun")
    return up if mode == "auto" else mode == "on"


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard one by one: every nn.ModuleList's children.

    For Qwen2.5-VL that is the language model's decoder layers and the vision tower's blocks; for a
    causal LM the decoder layers. Sharding per block lets FSDP2 gather one block's weights at a time
    (and prefetch the next), so peak memory holds one full block rather than the whole model.
    """
    blocks: list[nn.Module] = []
    inside: list[str] = []  # names of the blocks taken: a ModuleList nested in one is left to it
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(b + ".") for b in inside):
            continue
        for i, block in enumerate(module):
            if next(block.parameters(), None) is not None:  # blocks without weights need no group
                blocks.append(block)
                inside.append(f"{name}.{i}" if name else str(i))
    return blocks


def shard(
    model: nn.Module,
    *,
    mixed_precision: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    root: nn.Module | None = None,
) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` per transformer block, then to ``root`` (default ``model``).

    ``root`` lets the caller shard a wrapper (e.g. the module that computes the loss from the policy's
    hidden states and the lm_head weight) as the root, so the embedding/lm_head/norm weights that the
    root group owns are gathered for the wrapper's whole forward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for block in repeated_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    top = root if root is not None else model
    fully_shard(top, reshard_after_forward=reshard_after_forward, **kwargs)
    # FSDP2 decides which state is the root at the first forward it sees. Rollouts call the inner HF
    # model's forward (through generate) before the wrapper's, which would make a decoder layer
    # "root"; settle it now. (Private API, stable since torch 2.4; without it, nothing is done.)
    state = getattr(top, "_get_fsdp_state", None)
    if state is not None and hasattr(state(), "_lazy_init"):
        state()._lazy_init()
    return top


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (gathered), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_sharded(module: nn.Module) -> bool:
    """Whether any part of ``module`` is an FSDP2 module (its forwards are collectives)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


@contextmanager
def gathered(module: nn.Module):
    """Hold every FSDP2 group of ``module`` unsharded (e.g. for ``generate``); a no-op without FSDP.

    ``generate`` runs the HF model's forward once per token and stops when its rows are done: a
    data-dependent count. Left sharded, every decode step would all-gather every layer, and ranks
    whose rows finish earlier would stop issuing those all-gathers (a hang); and the root group's
    weights (embeddings, lm_head) are only gathered by the root's own forward, which generate never
    calls. So: gather everything once (the same collectives on every rank), keep it for the whole
    phase, reshard after. Pass the FSDP root (e.g. the trainer's scorer) so its weights come too.
    This holds a full (compute-dtype) copy of the model on every rank for the phase: fine up to ~7B
    on 80 GB cards; larger policies want a dedicated inference engine.
    """
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not groups:
        yield
        return
    settable = hasattr(FSDPModule, "set_reshard_after_forward")  # torch >= 2.6
    for m in groups:
        if settable:
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            if settable:
                m.set_reshard_after_forward(True, recurse=False)
            m.reshard()
