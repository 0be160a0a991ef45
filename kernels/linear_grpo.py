"""Fused lm_head + GRPO loss from hidden states, never holding the full logits.

``linear_grpo_loss(hidden, weight, ...)`` is ``grpo_loss(hidden @ weight.T, ...)`` (same loss, same
options, same per-token outputs) for hidden ``[B, T, H]`` / ``[N, H]`` and the lm_head weight
``[V, H]``, differentiable w.r.t. both, with exact gradients.

How (three matmuls in all, the minimum):

1. Only live rows (mask 1) are gathered and projected; masked rows cost no matmul work.
2. Live rows are processed in chunks of ``chunk_size`` rows. Per chunk: ``Z = h_c @ W.T`` (cuBLAS,
   into one reused ``[chunk, V]`` buffer); the vocabulary pass of ``grpo_loss``
   (``_row_stats_kernel``: lse, logp, entropy); the per-token loss kernel
   (``_token_loss_kernel``: ``dL/dlogp``); then the gradient pass (``_row_grad_kernel``) overwrites
   ``Z`` in place with ``D = dL/dZ``. Because every normaliser of the loss depends only on the
   mask, ``dL/dlogp`` of a row is known as soon as its logp is: the gradient is computed in the
   forward pass. Then ``grad_h[rows] = D @ W`` and ``grad_W += D.T @ h_c``.
3. The backward only scales by the incoming gradient ``g``: ``grad_h *= g``, and the last chunk's
   weight-gradient product is deferred to the backward as ``grad_W = g * grad_W + g * D.T @ h``,
   so the scaling rides in the GEMM epilogue instead of costing a pass over ``grad_W``.

Sequence-level ratios need each sequence's mean log-ratio before any gradient, so there the chunks
are made of whole sequences (greedy: as many as fit in ``chunk_size`` rows; a longer sequence gets
a chunk of its own): memory is ``max(chunk_size, longest sequence's live tokens) x V``, time is
unchanged (still three matmuls).

Memory (beyond inputs): the weight gradient (``V x H`` in the weight's dtype), the hidden gradient,
one ``chunk x V`` logits buffer, and a few N-sized vectors. The default chunk keeps the buffer near
224 MiB (768 rows for V = 152064 in bf16). Each chunk re-reads and re-writes the weight gradient, so
fewer, larger chunks are faster and larger: measured on an H100 (N = 8192, H = 3584, bf16), 640
rows: 1.27x the three-matmul floor at 1.26 GiB extra; 768: 1.19x at 1.30 GiB; 1024: 1.20x at
1.37 GiB (bench/results/).

Overlap (``overlap=True``, opt-in until measured on a GPU): chunk k's weight-gradient GEMM runs on
a side stream while the current stream computes chunk k's grad_hidden GEMM (``overlap_buffers=1``)
and, with two logits buffers (``overlap_buffers=2``, the default), chunk k+1's logits GEMM and row
passes. The aim is to hide grad_W's read-modify-write (2.18 GB per chunk at Qwen's size) behind
compute; the price is one more logits buffer, so the default chunk halves (2 x 384 rows) to keep
the buffers at ~224 MiB, or nothing with one buffer (bench/NOTES.md, "overlap").

Weight-gradient precision: ``grad_W`` accumulates across chunks in the weight's dtype; each chunk's
product is computed by cuBLAS in fp32 and rounded once when added. With ``K`` chunks and unit
roundoff ``u`` (2^-8 for bf16), elementwise ``|grad_W - exact| <= (K + 1) u sum_t |D_t| |h_t|`` on
top of what any bf16 implementation loses by rounding the logits and ``D`` (tested). Pass
``fp32_weight_grad=True`` to accumulate in fp32 instead (an extra ``V x H x 4`` bytes, plus the
final cast: 3 GiB for Qwen2.5-VL-7B's lm_head, over the 1.3 GiB budget).
"""

from __future__ import annotations

import functools

import torch

from . import reference
from ._api import GRPOLossOutput
from ._common import use_triton
from ._inputs import grpo_inputs, start_target_check
from .grpo import launch_loss_reduce, launch_token_loss
from .logprobs import launch_row_grad, launch_row_stats

CHUNK_BYTES = 224 << 20  # default logits buffer: ~224 MiB (see the module docstring for the trade-off)


def default_chunk_rows(vocab: int, element_size: int, buffers: int = 1) -> int:
    """Rows per chunk so the ``buffers`` ``[chunk, V]`` logits buffers together stay near ``CHUNK_BYTES``;
    a multiple of 64 (GEMM tiles) when that is at least 64."""
    rows = CHUNK_BYTES // max(buffers, 1) // max(vocab * element_size, 1)
    return max(64, rows // 64 * 64) if rows >= 64 else max(rows, 1)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


class _SideStream:
    """Work queued on a side stream S beside the current stream M, with the waits the forward's
    overlap needs (the numbers refer to the ordering argument in ``_linear_fwd``)."""

    def __init__(self, device: torch.device):
        # One S per device, kept for the process: cuBLAS keeps a workspace per stream, so a new stream
        # per call would allocate (and count as peak memory) a new workspace each time.
        if device.index not in _SIDE_STREAMS:
            _SIDE_STREAMS[device.index] = torch.cuda.Stream(device)
        self.side, self.main = _SIDE_STREAMS[device.index], torch.cuda.current_stream(device)

    def guard(self, *tensors: torch.Tensor) -> None:
        """Tensors allocated on M that S uses: the caching allocator will not reuse their memory before S's
        work queued by the time they are freed is done (needed only if an error skips ``join``)."""
        for t in tensors:
            t.record_stream(self.side)

    def submit(self, work) -> torch.cuda.Event:
        """Queue ``work()`` on S after everything queued on M so far (1); returns S's event after it."""
        self.side.wait_stream(self.main)  # (1)
        with torch.cuda.stream(self.side):
            work()
        return self.side.record_event()

    def wait(self, event: torch.cuda.Event) -> None:
        self.main.wait_event(event)  # (2)

    def join(self) -> None:
        self.main.wait_stream(self.side)  # (4)


def _overlap_stream(device: torch.device) -> _SideStream | None:
    """The side stream on CUDA; None elsewhere (the overlap's schedule then runs in order)."""
    return _SideStream(device) if device.type == "cuda" else None


def plan_chunks(live_counts: list[int], chunk: int, whole_sequences: bool
                ) -> tuple[list[tuple[int, int]], list[int], list[int], list[int]]:
    """Split live rows (sequence after sequence, ``live_counts[i]`` rows each) into chunks.

    Returns ``(chunks, bounds, seqs, first)``: chunk ``k`` covers live rows ``chunks[k]`` and holds
    segments ``first[k] .. first[k+1]-1``; segment ``s`` is rows ``[bounds[s + k], bounds[s + k + 1])``
    of sequence ``seqs[s]`` (each chunk's bounds are a cu-style list, stored one after the other, so
    chunk ``k``'s table starts at ``first[k] + k``). ``whole_sequences``: never split a sequence.
    """
    starts = [0]
    for n in live_counts:
        starts.append(starts[-1] + n)
    total = starts[-1]
    if whole_sequences:
        edges, rows = [0], 0
        for n in live_counts:
            if n and rows and rows + n > chunk:
                edges.append(edges[-1] + rows)
                rows = 0
            rows += n
        if rows:
            edges.append(edges[-1] + rows)
    else:
        edges = list(range(0, total, chunk)) + [total] if total else [0]
    chunks = list(zip(edges[:-1], edges[1:]))
    bounds, seqs, first = [], [], [0]
    seq = 0
    for c0, c1 in chunks:
        while starts[seq + 1] <= c0:  # first sequence with live rows at or after c0
            seq += 1
        bounds.append(c0)
        s = seq
        while s < len(live_counts) and starts[s] < c1:
            if starts[s + 1] > c0 and live_counts[s]:
                bounds.append(min(starts[s + 1], c1))
                seqs.append(s)
            s += 1
        first.append(len(seqs))
    return chunks, bounds, seqs, first


def _accumulate(acc: torch.Tensor, d: torch.Tensor, h: torch.Tensor, beta: float, alpha: float) -> None:
    """``acc = beta * acc + alpha * d.T @ h`` (beta = 0: acc is not read). ``acc`` may be fp32 while
    ``d``/``h`` are bf16/fp16 (fp32_weight_grad): cuBLAS' mixed-precision addmm where torch has it."""
    if acc.dtype == d.dtype:
        acc.addmm_(d.t(), h, beta=beta, alpha=alpha)
        return
    if acc.is_cuda and hasattr(torch.ops.aten.addmm, "dtype_out"):
        try:
            torch.ops.aten.addmm.dtype_out(acc, d.t(), h, acc.dtype, beta=beta, alpha=alpha, out=acc)
            return
        except Exception:  # noqa: BLE001 - overload missing or unsupported here: upcast below
            pass
    acc.addmm_(d.t().to(acc.dtype), h.to(acc.dtype), beta=beta, alpha=alpha)


# ----------------------------------------------------------------------------------------------
# Custom ops + autograd
# ----------------------------------------------------------------------------------------------

_FWD_OUT = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                 torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("lgrpo::linear_grpo_fwd", mutates_args=())
def _linear_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
    advantages: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
    seq_id: torch.Tensor, num_items: torch.Tensor, temperature: float, eps_low: float, eps_high: float,
    delta: float | None, beta: float, loss_type: str, sequence_level: bool, max_len: int, n_seqs: int,
    chunk_size: int, fp32_weight_grad: bool, need_grad_hidden: bool, need_grad_weight: bool,
    kl_bias_correction: bool, overlap_buffers: int,
) -> _FWD_OUT:
    """hidden [N, H], weight [V, H], flat per-token inputs from grpo_inputs. Returns (loss, logp,
    entropy, kl, clipped, grad_hidden, grad_weight, last_dlogits, last_hidden, accumulated) where
    the gradients are for a unit incoming gradient, except the last chunk's weight-gradient term,
    which the backward adds (``last_*``; ``accumulated`` says whether grad_weight already holds
    earlier chunks). ``overlap_buffers``: 0, one logits buffer and everything in order on the current
    stream; 1 or 2, that many buffers and, on CUDA, the weight-gradient GEMMs on a side stream (below).
    """
    n_rows, vocab, dim = targets.numel(), weight.shape[0], weight.shape[1]
    device, dtype = hidden.device, hidden.dtype
    finish_check = start_target_check(targets, vocab, mask)
    rows = mask.nonzero().squeeze(1)  # live rows, in order (one host sync: the chunk plan needs it)
    live_seq = seq_id.index_select(0, rows)
    counts = torch.bincount(live_seq, minlength=n_seqs)
    live_counts = counts.tolist()
    finish_check()
    counts = counts.to(torch.float32)

    f32 = dict(dtype=torch.float32, device=device)
    logp, entropy, lse = (torch.zeros(n_rows, **f32) for _ in range(3))
    out = dict(wloss=torch.zeros(n_rows, **f32), dlogp=torch.zeros(n_rows, **f32),
               kl=torch.zeros(n_rows, **f32), clipped=torch.zeros(n_rows, dtype=torch.bool, device=device))
    loss = torch.empty((), **f32)
    inv_denom = torch.empty((), **f32)
    launch_loss_reduce(None, counts, num_items, loss, inv_denom, n_seqs=n_seqs, max_len=max_len,
                       loss_type=loss_type)  # the normaliser first: gradients are made in the forward

    need_grad = need_grad_hidden or need_grad_weight
    grad_h = torch.zeros(n_rows, dim, dtype=dtype, device=device) if need_grad_hidden else hidden.new_empty(0)
    grad_w = hidden.new_empty(0)
    if need_grad_weight:
        grad_w = torch.empty(vocab, dim, dtype=torch.float32 if fp32_weight_grad else dtype, device=device)
    last_d, last_h, accumulated = hidden.new_empty(0, vocab), hidden.new_empty(0, dim), False

    chunks, bounds, seqs, first = plan_chunks(live_counts, chunk_size, whole_sequences=sequence_level)
    chunks = [c for c in chunks if c[1] > c[0]]
    # Overlap (overlap_buffers > 0, only where there is a weight-gradient GEMM to move): chunk k's
    # grad_W += D_k.T @ h_k runs on a side stream S while this stream M goes on with chunk k's grad_h
    # GEMM and, with two buffers, chunk k+1's logits GEMM and row passes. Why each wait exists:
    # (1) S reads D_k and h_k only once M has written them: S waits for M right after the gradient
    #     pass of chunk k (before grad_h's GEMM is queued on M, so that the two can overlap). This
    #     also orders S's first write to grad_W after M's earlier use of that memory.
    # (2) M overwrites buffer k % n at chunk k + n's logits GEMM only after S's read of D_k: M waits
    #     for freed[slot], S's event recorded right after chunk k's addmm.
    # (3) h_k, a fresh allocation on M, is held (held[slot]) until M has waited for S's read of it
    #     (2), so the caching allocator cannot hand its block to a later M allocation while S still
    #     reads it. (record_stream would keep each block until the host sees S's event: with the host
    #     running ahead of the GPU, possibly every chunk's rows at once.)
    # (4) grad_W is written only by S in the forward, its addmms queued on S in chunk order (same
    #     summation order as the sequential path); M waits for all of S before returning, so the
    #     caller, the backward's deferred addmm on grad_W, and the buffers' return to the allocator
    #     at exit all come after S's last read and write.
    # The buffers and grad_W are freed only after (4), or by an error that skips it (an out-of-memory
    # a caller retries): guard() covers that case. The work is bound with functools.partial (values,
    # not loop variables), so that it may run late.
    # Without CUDA the same schedule (n buffers used in turn) runs in order, with no stream: results
    # are bit-identical to overlap_buffers = 0 (same operations, same order, other memory).
    n_buf = overlap_buffers if need_grad_weight and len(chunks) > 1 else 0
    side = _overlap_stream(device) if n_buf else None
    buffers, freed, held = [], [None] * max(n_buf, 1), [None] * max(n_buf, 1)  # (2), (3): per buffer
    if chunks:
        bounds_t = torch.tensor(bounds, dtype=torch.int64).to(device, non_blocking=True)
        seqs_t = torch.tensor(seqs, dtype=torch.int64).to(device, non_blocking=True)
        rows_max = max(c1 - c0 for c0, c1 in chunks)
        buffers = [torch.empty(rows_max, vocab, dtype=dtype, device=device) for _ in range(max(n_buf, 1))]
        if side is not None:
            side.guard(grad_w, *buffers)
    for k, (c0, c1) in enumerate(chunks):
        slot = k % len(buffers)
        rows_c = rows[c0:c1]
        h_c = hidden.index_select(0, rows_c)
        z = buffers[slot][: c1 - c0]
        if freed[slot] is not None:
            side.wait(freed[slot])  # (2)
        if side is not None:
            held[slot] = h_c  # (3): chunk k - n's rows are let go only now, after the wait
        torch.mm(h_c, weight.t(), out=z)
        launch_row_stats(z, targets, temperature, logp, lse, entropy=entropy, row_idx=rows_c)
        n_seg = first[k + 1] - first[k]
        table = first[k] + k
        launch_token_loss(
            logp, advantages, old_logp, ref_logp, counts, out, n_segments=n_seg,
            seg_bounds=bounds_t[table: table + n_seg + 1], seg_seq=seqs_t[first[k]: first[k + 1]],
            row_idx=rows,
            count=False, eps_low=eps_low, eps_high=eps_high, delta=delta, beta=beta,
            sequence_level=sequence_level, per_seq_mean=loss_type == "grpo", max_seg_len=c1 - c0,
            kl_bias_correction=kl_bias_correction,
        )
        if not need_grad:
            continue
        launch_row_grad(z, z, targets, lse, out["dlogp"], temperature, scale=inv_denom, row_idx=rows_c)
        if need_grad_weight:
            if k == len(chunks) - 1:
                last_d, last_h = z, h_c  # added by the backward, scaled by the incoming gradient
            elif side is None:
                _accumulate(grad_w, z, h_c, beta=1.0 if accumulated else 0.0, alpha=1.0)
                accumulated = True
            else:  # queued on S before grad_h's GEMM on M, so that the two can run together
                work = functools.partial(_accumulate, grad_w, z, h_c, beta=1.0 if accumulated else 0.0, alpha=1.0)
                freed[slot] = side.submit(work)  # (1)
                accumulated = True
        if need_grad_hidden:
            grad_h.index_copy_(0, rows_c, torch.mm(z, weight))
    if side is not None:
        side.join()  # (4)
    if need_grad_weight and not chunks:
        grad_w.zero_()
        accumulated = True
    launch_loss_reduce(out["wloss"], counts, num_items, loss, inv_denom, n_seqs=n_seqs, max_len=max_len,
                       loss_type=loss_type)
    flag = torch.tensor(accumulated)
    return loss, logp, entropy, out["kl"], out["clipped"], grad_h, grad_w, last_d, last_h, flag


@_linear_fwd.register_fake
def _(hidden, weight, targets, mask, advantages, old_logp, ref_logp, seq_id, num_items, temperature, eps_low,
      eps_high, delta, beta, loss_type, sequence_level, max_len, n_seqs, chunk_size, fp32_weight_grad,
      need_grad_hidden, need_grad_weight, kl_bias_correction, overlap_buffers):
    n, (vocab, dim) = targets.numel(), weight.shape
    f = hidden.new_empty(n, dtype=torch.float32)
    grad_h = hidden.new_empty(n, dim) if need_grad_hidden else hidden.new_empty(0)
    grad_w = hidden.new_empty(0)
    if need_grad_weight:
        grad_w = hidden.new_empty(vocab, dim, dtype=torch.float32 if fp32_weight_grad else hidden.dtype)
    ctx = torch.library.get_ctx()
    c_last = ctx.new_dynamic_size()  # rows of the deferred last chunk: data-dependent
    return (hidden.new_empty((), dtype=torch.float32), f, torch.empty_like(f), torch.empty_like(f),
            hidden.new_empty(n, dtype=torch.bool), grad_h, grad_w, hidden.new_empty(c_last, vocab),
            hidden.new_empty(c_last, dim), torch.empty((), dtype=torch.bool))


@torch.library.custom_op("lgrpo::linear_grpo_bwd", mutates_args=("grad_hidden", "grad_weight"))
def _linear_bwd(grad_loss: torch.Tensor, grad_hidden: torch.Tensor, grad_weight: torch.Tensor,
                last_dlogits: torch.Tensor, last_hidden: torch.Tensor, accumulated: torch.Tensor) -> None:
    """Scale the forward's unit-gradient results by ``g = grad_loss`` in place; the last chunk's
    product enters the weight gradient here as ``grad_W = g grad_W + g D.T h`` (one GEMM epilogue)."""
    g = float(grad_loss)  # one host sync: cuBLAS takes alpha/beta from the host
    if grad_weight.numel():
        if last_dlogits.shape[0]:
            _accumulate(grad_weight, last_dlogits, last_hidden, beta=g if bool(accumulated) else 0.0, alpha=g)
        elif g != 1.0:
            grad_weight.mul_(g)
    if grad_hidden.numel() and g != 1.0:
        grad_hidden.mul_(g)


@_linear_bwd.register_fake
def _(grad_loss, grad_hidden, grad_weight, last_dlogits, last_hidden, accumulated):
    return None


def _linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[5:10])
    ctx.weight_dtype = inputs[1].dtype
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.consumed = False


def _linear_backward(ctx, grad_loss, *_unused):
    nones = (None,) * 22
    if grad_loss is None:
        return (None, None, *nones)
    if ctx.consumed:
        raise RuntimeError("linear_grpo_loss computes its gradients once, in place: a second backward "
                           "through the same graph (retain_graph=True) is not supported")
    ctx.consumed = True
    grad_h, grad_w, last_d, last_h, accumulated = ctx.saved_tensors
    _linear_bwd(grad_loss, grad_h, grad_w, last_d, last_h, accumulated)
    gh = grad_h if ctx.needs_input_grad[0] and grad_h.numel() else None
    gw = None
    if ctx.needs_input_grad[1] and grad_w.numel():
        gw = grad_w if grad_w.dtype == ctx.weight_dtype else grad_w.to(ctx.weight_dtype)
    return (gh, gw, *nones)


_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    fp32_weight_grad: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    loss_type: str = "dapo",
    importance_level: str = "token",
    max_len: int | None = None,
    num_items: int | float | torch.Tensor | None = None,
    kl_bias_correction: bool = False,
    inplace_grad: bool = False,
    overlap: bool = False,
    overlap_buffers: int = 2,
) -> GRPOLossOutput:
    """``grpo_loss(hidden @ weight.T, ...)`` without materialising the logits (module docstring).

    ``hidden``: ``[B, T, H]`` (padded, ``mask [B, T]``) or ``[N, H]`` (packed, ``cu_seqlens``);
    ``weight``: the lm_head ``[V, H]``; same dtype (fp32, fp16 or bf16). Options as ``grpo_loss``;
    ``chunk_size``: live rows projected at a time (default: a ~224 MiB logits buffer);
    ``fp32_weight_grad``: accumulate the weight gradient in fp32 (more memory, see the module
    docstring for the bf16 error bound). ``inplace_grad`` is accepted for signature parity: the
    chunk buffers are always overwritten in place, the caller's tensors never.

    ``overlap`` (CUDA, off by default until measured): each chunk's weight-gradient GEMM runs on a side
    stream, beside the same chunk's grad_hidden GEMM (``overlap_buffers=1``: no extra memory) or also
    beside the next chunk's logits GEMM and row passes (``overlap_buffers=2``: two logits buffers; the
    default chunk is then halved so that they take the memory of one; only with a weight gradient to
    compute: otherwise there is nothing to overlap and nothing changes). Same results as without (same
    operations in the same order per output); without CUDA the same schedule runs in order.

    The backward must run at most once per forward (the gradients are computed in the forward and
    scaled in place). Falls back to ``reference.linear_grpo_loss`` (which materialises the logits)
    where the Triton kernels do not run.
    """
    del inplace_grad
    if not isinstance(overlap, bool):
        raise ValueError(f"overlap must be a bool, got {overlap!r}")
    if type(overlap_buffers) is not int or overlap_buffers not in (1, 2):
        raise ValueError(f"overlap_buffers must be 1 or 2 (logits buffers in flight), got {overlap_buffers!r}")
    options = dict(cu_seqlens=cu_seqlens, temperature=temperature, eps_low=eps_low, eps_high=eps_high,
                   delta=delta, beta=beta, loss_type=loss_type, importance_level=importance_level,
                   max_len=max_len, num_items=num_items, kl_bias_correction=kl_bias_correction)
    if not use_triton(hidden, weight):
        return reference.linear_grpo_loss(hidden, weight, targets, advantages, mask, old_logp, ref_logp,
                                          chunk_size=chunk_size, **options)
    if weight.dim() != 2:
        raise ValueError(f"weight must be the lm_head matrix [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() not in (2, 3) or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] or [B, T, H] with H = {weight.shape[1]} (weight's dim 1), "
                         f"got shape {tuple(hidden.shape)}")
    if hidden.device != weight.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
    vocab = weight.shape[0]
    inp = grpo_inputs(hidden.shape[:-1], vocab, hidden.device, targets, advantages, mask, old_logp, ref_logp,
                      **options, name="hidden", check_target_ids=False)
    grad_on = torch.is_grad_enabled()
    need_grad_w = grad_on and weight.requires_grad
    buffers = overlap_buffers if overlap and need_grad_w else 0  # no weight gradient: nothing to overlap
    chunk = chunk_size or default_chunk_rows(vocab, weight.element_size(), buffers=max(buffers, 1))
    loss, logp, entropy, kl, clipped, *_ = _linear_fwd(
        hidden.reshape(-1, hidden.shape[-1]), weight, inp.targets, inp.mask, inp.advantages, inp.old_logp,
        inp.ref_logp, inp.seq_id, inp.num_items, float(temperature), float(eps_low), float(eps_high),
        None if delta is None else float(delta), float(beta), loss_type, importance_level == "sequence",
        inp.max_len, inp.n_seqs, int(chunk), bool(fp32_weight_grad), grad_on and hidden.requires_grad,
        need_grad_w, bool(kl_bias_correction), buffers,
    )
    shape = inp.token_shape
    return GRPOLossOutput(loss=loss, logp=logp.view(shape), entropy=entropy.view(shape), kl=kl.view(shape),
                          clipped=clipped.view(shape))
