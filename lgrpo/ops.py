"""Python face of the native ops in ``lgrpo._C`` (csrc/): loading, fake kernels, fallback.

``import lgrpo._C`` runs the library's ``TORCH_LIBRARY`` registrations, after which the ops are
``torch.ops.lgrpo.*``; each gets a fake (meta) implementation here so ``torch.compile(fullgraph=True)``
traces through it. When the extension did not build or load, or has no kernel for the logits'
device (a CPU-only build given CUDA tensors), the functions fall back to the pure-PyTorch
reference in ``lgrpo.kernels.reference`` and say so once with a warning.
"""

from __future__ import annotations

import warnings

import torch

from lgrpo.kernels import reference
from lgrpo.kernels._inputs import check_listener_layout

try:
    from lgrpo import _C  # noqa: F401 - imported for its op registrations
except ImportError as exc:  # not built (e.g. an isolated build without torch) or built for another torch
    _LOAD_ERROR: ImportError | None = exc
else:
    _LOAD_ERROR = None

HAS_EXTENSION = _LOAD_ERROR is None

def _native_devices() -> frozenset[str]:
    """Device types the extension has kernels for ("meta": the fake kernel registered below)."""
    if not HAS_EXTENSION:
        return frozenset()
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("lgrpo::listener_confidence", "CUDA")
    return frozenset({"cpu", "meta"} | ({"cuda"} if has_cuda else set()))


NATIVE_DEVICES = _native_devices()

if not HAS_EXTENSION:
    warnings.warn(
        f"lgrpo._C could not be loaded ({_LOAD_ERROR}); lgrpo.ops falls back to the pure-PyTorch reference. "
        "Rebuild with `make install` (or `pip install --no-build-isolation -e .`).",
        RuntimeWarning,
        stacklevel=2,
    )

_warned_devices: set[str] = set()

__all__ = ["HAS_EXTENSION", "NATIVE_DEVICES", "listener_confidence", "listener_launch_plan"]


def listener_confidence(
    logits: torch.Tensor,
    positions: torch.Tensor | None,
    candidate_ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    check_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The listener's confidence in each of K candidate tokens at one position per row (SPEC §3).

    ``logits`` ``[B, T, V]`` read only at ``positions[b]`` (int32/int64 ``[B]``), or ``[B, V]`` with
    ``positions=None``; fp32, fp16 or bf16, any strides (a contiguous vocabulary dimension is the
    fast path; nothing is ever copied). ``candidate_ids`` int32/int64 ``[K]`` shared by every row,
    or ``[B, K]``. Returns fp32 ``(probs, logp)``, both ``[B, K]``::

        probs[b, k] = softmax_k(z[c_k] / temperature)          over the K candidates
        logp[b, k]  = log_softmax(z / temperature)[c_k]        over the whole vocabulary

    with ``z`` the row's logits. ``-inf`` logits are fine; a row whose logits are all ``-inf``
    (or whose K candidates all are, for ``probs``) gives NaN, as the reference does. Not
    differentiable (the listener is frozen).

    ``check_indices``: an out-of-range position or candidate id raises ``IndexError`` naming the
    argument. On CUDA that check is one copy of ``B`` int32 to the host and a stream sync after
    the kernel; ``check_indices=False`` skips it (one asynchronous launch, and the mode used inside
    CUDA-graph capture), and invalid rows come back as NaN instead of raising. Out-of-range
    indices are never dereferenced either way.
    """
    if logits.device.type in NATIVE_DEVICES:
        return torch.ops.lgrpo.listener_confidence(
            logits, positions, candidate_ids, temperature, check_indices=check_indices
        )
    if logits.device.type not in _warned_devices:
        _warned_devices.add(logits.device.type)
        kind = logits.device.type
        why = "lgrpo._C is not loaded" if not HAS_EXTENSION else f"lgrpo._C has no {kind} kernel"
        warnings.warn(f"{why}: listener_confidence runs the PyTorch reference", RuntimeWarning, stacklevel=2)
    return reference.listener_confidence(logits, positions, candidate_ids, temperature)


def listener_launch_plan(
    logits: torch.Tensor, positions: torch.Tensor | None, candidate_ids: torch.Tensor
) -> dict | None:
    """How the CUDA kernel splits the work of ``listener_confidence(logits, positions, candidate_ids)``
    on the logits' device: ``blocks_per_row`` (a thread-block cluster when > 1), ``sms``,
    ``resident_blocks_per_sm``, ``clusters`` (whether the device and the loaded binary can run
    them). None where no CUDA kernel would run. ``LGRPO_LISTENER_MAX_CHUNKS`` (1..8) caps
    ``blocks_per_row`` at every launch: a tuning knob for benchmarks."""
    if logits.device.type != "cuda" or "cuda" not in NATIVE_DEVICES:
        return None
    chunks, sms, per_sm, clusters = torch.ops.lgrpo.listener_launch_plan(logits, positions, candidate_ids)
    return {"blocks_per_row": chunks, "sms": sms, "resident_blocks_per_sm": per_sm, "clusters": bool(clusters)}


if HAS_EXTENSION:

    @torch.library.register_fake("lgrpo::listener_confidence")
    def _listener_confidence_fake(logits, positions, candidate_ids, temperature=1.0, *, check_indices=True):
        # Index ranges need the data, so a traced call checks them when it runs, in the kernel.
        check_listener_layout(logits, positions, candidate_ids, temperature)
        shape = (logits.shape[0], candidate_ids.shape[-1])
        return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.float32)
