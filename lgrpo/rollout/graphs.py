"""The rollout engine's CUDA graph runtime: batch-size buckets, prompt-column rounding, and one captured
decode step per (bucket, prompt columns, sampling mode, autocast) replayed for every later step.

nano-vllm's ``model_runner`` pattern: static input buffers (:mod:`lgrpo.rollout.buffers`), one memory
pool, buckets captured largest first, the prefill left eager. Graphs point into the buffers and the
weights: they are dropped when either moves.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STEP = 16  # buckets above 8 rows: multiples of 16


def bucket_sizes(max_rows: int) -> list[int]:
    """Batch-size buckets up to the first one >= ``max_rows``: 1, 2, 4, 8, 16, 32, 48, ..."""
    sizes = []
    for b in SMALL_BUCKETS:
        sizes.append(b)
        if b >= max_rows:
            return sizes
    b = BUCKET_STEP
    while True:
        sizes.append(b)
        if b >= max_rows:
            return sizes
        b += BUCKET_STEP


def bucket_for(rows: int) -> int:
    return bucket_sizes(max(rows, 1))[-1]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def prompt_columns(t: int, bucket: int | None, graphs: bool) -> int:
    """The cache columns a ``t``-token prompt gets: a multiple of ``bucket`` when given; with CUDA graphs
    (every distinct value is a graph key: ~20 bucket captures each) ``t`` rounded up to eight steps per
    octave, at least 64: at most an eighth of padding columns (masked, read by the decode attention), and
    above 2048 tokens a quarter of the captures that multiples of 64 would cost; else ``t`` itself."""
    if bucket:
        return _round_up(t, bucket)
    if not graphs:
        return t
    return _round_up(t, max(64, 1 << max(t.bit_length() - 4, 0)))


def autocast_state(device: torch.device) -> tuple:
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return (False,)
    return (True, torch.get_autocast_dtype(kind))


def uncached_autocast(device: torch.device):
    """The caller's autocast (same dtype) with its weight cache off, for a graph capture.

    Autocast keeps the low-precision copies of fp32 weights it made for the rest of the ``autocast`` block:
    after the prefill filled that cache, a captured step would record no cast at all and read the cached
    copies' memory, which leaving the block frees (``torch.amp.autocast_mode``); every later replay (the
    next eval batch, the eval after training) would read the old weights or freed memory. Without the
    cache the graph holds the casts themselves and reads the fp32 weights on each replay, so in-place
    updates reach it. (``torch.cuda.make_graphed_callables`` refuses a cached autocast for this reason.)"""
    enabled, *dtype = autocast_state(device)
    return torch.autocast(device.type, dtype=dtype[0], cache_enabled=False) if enabled else nullcontext()


class DecodeGraphs:
    """The captured decode steps of one engine, keyed by (bucket, prompt columns, mode, autocast state)."""

    def __init__(self):
        self._graphs: dict = {}
        self._pool = None
        self._fingerprint = None

    def drop(self) -> None:
        """Forget every graph (they point into buffers or weights that moved)."""
        self._graphs.clear()
        self._pool = None

    def release(self) -> None:
        self.drop()
        self._fingerprint = None

    def follow_weights(self, model) -> None:
        """Drop the graphs when the model's parameters moved since the last call (a captured graph reads
        the old addresses); in-place updates keep the addresses and the graphs."""
        fingerprint = tuple(p.data_ptr() for p in model.parameters())
        if fingerprint != self._fingerprint:
            self.drop()
            self._fingerprint = fingerprint

    def capture(self, key: tuple, buffers, step, sdpa) -> float | None:
        """Capture ``step()`` (device work only) under ``key`` unless it is captured; returns the seconds it
        took, None when it was there. ``buffers``: the :class:`~lgrpo.rollout.buffers.DecodeBuffers` the step
        reads (quiesced for the warm-up); ``sdpa``: the context the step's attention runs under."""
        if key in self._graphs:
            return None
        start = time.perf_counter()
        device = buffers.device
        buffers.quiesce()
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), sdpa(), uncached_autocast(device):
            step()  # compiles Triton, picks kernels, allocates workspaces
        torch.cuda.current_stream(device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        buffers.j.zero_()
        with torch.cuda.graph(graph, pool=self._pool), sdpa(), uncached_autocast(device):
            step()
        torch.cuda.synchronize(device)
        self._graphs[key] = graph
        return time.perf_counter() - start

    def replay(self, key: tuple) -> None:
        self._graphs[key].replay()
