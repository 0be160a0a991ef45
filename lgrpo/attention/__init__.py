"""Shared-prefix attention: each prompt's keys/values computed once, read by all its completions.

A shared-prefix forward runs the model once on one flat, padding-free sequence: every prompt's tokens
(each prompt once, its images once), then every completion's tokens. Which token may attend to which
(:mod:`.layout`: its own segment causally, plus the prompt it continues) is prepared once per forward as
a :class:`SharedPrefixLayout` and handed to the model as its ``attention_mask``; transformers passes a
dict of prepared masks straight to the attention layers, where :mod:`.hook` runs it. That is exactly
the attention of the plain computation with each prompt repeated once per completion, so outputs and
gradients are the same, while everything outside attention (projections, MLPs, the vision tower) runs
on each prompt once.

Three backends compute it (``prefix_attention``):

- ``sdpa`` (:mod:`.sdpa`): two SDPA calls with gathers; any device, forward and backward;
- ``flex`` (:mod:`.flex`): one compiled ``flex_attention`` call with a block mask, no copies; CUDA
  forward and backward, CPU forward only (torch has no CPU backward for it);
- ``varlen`` (:mod:`.varlen`): FlashAttention varlen kernels, no mask at all; CUDA, 16-bit;
- ``auto``: ``varlen`` on CUDA in 16-bit once it has passed :func:`check_backend` (output and
  gradients against the dense reference) on this device,
  else ``sdpa`` (the CPU, fp32, or a failed check: with a warning).
"""

from __future__ import annotations

import warnings

import torch

from .flex import FlexLayout
from .hook import install, shared_prefix_attention
from .layout import Segments, SharedPrefixLayout, dense_mask
from .sdpa import SdpaLayout
from .varlen import VarlenLayout

BACKENDS = {"sdpa": SdpaLayout, "flex": FlexLayout, "varlen": VarlenLayout}
CHOICES = ("auto", *BACKENDS)

__all__ = ["BACKENDS", "CHOICES", "Segments", "AutoLayout", "SharedPrefixLayout", "build_layout", "check_backend",
           "dense_mask", "install", "resolve_backend", "shared_prefix_attention"]


def build_layout(prompt_lengths: torch.Tensor, completion_lengths: torch.Tensor, group: torch.Tensor,
                 backend: str = "auto") -> SharedPrefixLayout:
    """The layout of one flat sequence: the tokens of each prompt ``[P]``, of each completion ``[N]``,
    and each completion's prompt ``[N]``, prepared for ``backend``. ``auto`` is resolved at the first
    layer, where the device and the compute dtype (autocast, FSDP mixed precision) are known."""
    if backend not in CHOICES:
        raise ValueError(f"prefix_attention must be one of {list(CHOICES)}, got {backend!r}")
    segments = Segments.of(prompt_lengths, completion_lengths, group)
    return AutoLayout(segments) if backend == "auto" else BACKENDS[backend].build(segments)


class AutoLayout(SharedPrefixLayout):
    """Builds the backend :func:`resolve_backend` picks for the first layer's queries, then reuses it
    for every layer (and for gradient checkpointing's replays) of this forward."""

    backend = "auto"

    def __init__(self, segments: Segments):
        self.segments = segments
        self.num_tokens = int(segments.prompt_lengths.sum() + segments.completion_lengths.sum())
        self.built: SharedPrefixLayout | None = None

    def attend(self, query, key, value, dropout, scale):
        if self.built is None:
            # query.dtype is the compute dtype: shared_prefix_attention cast q, k, v to it
            self.built = BACKENDS[resolve_backend("auto", query.device, query.dtype)].build(self.segments)
        return self.built.attend(query, key, value, dropout, scale)


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` → a backend for this device and compute dtype; an explicit choice is returned as is."""
    if requested not in CHOICES:
        raise ValueError(f"prefix_attention must be one of {list(CHOICES)}, got {requested!r}")
    if requested != "auto":
        return requested
    if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    try:
        check_backend("varlen", device, dtype)
    except (ValueError, RuntimeError, ImportError) as e:  # unavailable here, or wrong: never used silently
        _warn_once(f"prefix_attention auto: the varlen backend is not used on {device} ({e}); using sdpa")
        return "sdpa"
    return "varlen"


_checked: dict = {}
_warned: set = set()


def check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Run ``backend`` once on a small random case (ragged prompts, an empty completion, groups out of
    order, grouped-query heads) and compare its output and q/k/v gradients with SDPA under
    :func:`dense_mask`; raises ``ValueError``
    when it disagrees, or ``ValueError``/``RuntimeError``/``ImportError`` where it cannot run: any other
    exception (a ``TypeError`` from a kernel of another signature, torch's ``AssertionError`` without CUDA)
    becomes a ``RuntimeError`` naming it, so that callers that fall back on these three (``auto``, the
    benchmarks) fall back on everything the check can raise. Cached per device and dtype."""
    key = (backend, str(device), dtype)
    if key not in _checked:
        try:
            _checked[key] = _compare_with_dense(backend, torch.device(device), dtype)
        except (ValueError, RuntimeError, ImportError) as e:
            _checked[key] = e
        except Exception as e:
            _checked[key] = RuntimeError(f"the {backend} check raised {type(e).__name__}: {e}")
            _checked[key].__cause__ = e
    if isinstance(_checked[key], Exception):
        raise _checked[key]


def _compare_with_dense(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    segments = Segments.of(torch.tensor([37, 5, 130]), torch.tensor([9, 0, 140, 3, 1, 20]),
                           torch.tensor([2, 0, 0, 2, 1, 0], device=device))
    t = int(segments.prompt_lengths.sum() + segments.completion_lengths.sum())
    # Gradients too, where the backend has a backward here (flex has none on CPU): the update trusts them.
    backward = not (backend == "flex" and device.type == "cpu")
    # The check may run inside a no-grad or inference-mode forward (auto resolves at the first layer).
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        q = torch.randn(4, t, 64, generator=gen).to(device, dtype)
        k, v = (torch.randn(2, t, 64, generator=gen).to(device, dtype) for _ in range(2))
        inputs = [x.clone().requires_grad_(backward) for x in (q, k, v)]
        ref = [x.detach().float().requires_grad_(backward) for x in (q, k, v)]
        got = BACKENDS[backend].build(segments).attend(*inputs, 0.0, None).float()
        want = torch.nn.functional.scaled_dot_product_attention(
            ref[0], ref[1].repeat_interleave(2, 0), ref[2].repeat_interleave(2, 0),
            attn_mask=dense_mask(segments)).transpose(0, 1)
        pairs = [("output", got, want)]
        if backward:
            w = torch.randn(want.shape, generator=gen).to(device)
            grads = torch.autograd.grad((got * w).sum(), inputs)
            pairs += zip(("dq", "dk", "dv"), grads, torch.autograd.grad((want * w).sum(), ref))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, b in pairs:
        err, scale = (a.float() - b).abs().max().item(), b.abs().max().item()
        if not err <= tol * max(scale, 1.0):
            raise ValueError(f"the {backend} shared-prefix attention disagrees with the dense reference on "
                             f"{device} ({dtype}): {name} max error {err:.3g}, scale {scale:.3g}")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
