"""Scoring completions given their prompts, each prompt computed once per group.

Every pass over a step's completions (the reference and old-log-prob passes, the listener, the policy
update) needs, for each completion, the final hidden states at its prompt's last token and at its own
tokens. Two ways to get them, the same numbers (tested against each other, forward and backward):

- **shared prefix** (default): one forward over a flat, padding-free sequence holding each prompt once
  (its images through the vision tower once) and then every completion, with the attention of
  :mod:`lgrpo.attention`: a completion reads its prompt's keys/values and its own causal past. Its
  positions continue from its prompt's (:mod:`lgrpo.positions`: for the Qwen-VL families M-RoPE's).
  Tokens computed per group: ``prompt + G x completion`` instead of ``G x (prompt + completion)``.
- **repeated**: plain transformers on each prompt repeated once per completion, left padded
  (``shared_prefix=False``; the A/B baseline and the reference of the tests).

Public face: :func:`completion_logprobs`. The trainer's :class:`CompletionScorer` wraps a model for
both the log-prob passes and the fused loss, and is the FSDP root.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CHOICES, build_layout, install
from .group import GroupBatch, PromptBatch
from .kernels import grpo_loss, linear_grpo_loss, token_logprobs
from .lora import effective_weight
from .models import prepare
from .positions import continuation_positions, prompt_positions, text_positions, uses_mrope


def completion_states(model, batch: GroupBatch, *, shared_prefix: bool = True,
                      prefix_attention: str = "auto") -> torch.Tensor:
    """Final hidden states ``[N, C + 1, H]``: column 0 at completion ``n``'s prompt's last token, column
    ``j + 1`` at its token ``j``. So ``[:, :-1]`` are the states that predict the completion tokens (row
    ``c`` predicts token ``c``) and ``[n, lengths[n]]`` is the state after its last token. Columns of
    masked tokens hold an arbitrary finite state of the same sequence. ``prefix_attention``: the
    shared-prefix attention's backend (:mod:`lgrpo.attention`: auto, sdpa, flex, varlen).
    """
    if not len(batch):
        raise ValueError("the batch holds no completions")
    if shared_prefix:
        return _shared_states(model, batch, prefix_attention)
    return _repeated_states(model, batch)


def completion_logprobs(model, prompts: PromptBatch, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, group_size: int, *, temperature: float = 1.0,
                        shared_prefix: bool = True, prefix_attention: str = "auto") -> torch.Tensor:
    """Per-token log-probs ``[P*G, C]`` (fp32, differentiable) of completions given their prompts.

    ``prompts``: P prompts as the task makes them (left padded; ``pixel_values``/``image_grid_thw``/
    ``images_per_row`` for a VLM); completion row ``i`` continues prompt ``i // group_size``.
    ``completion_mask`` ``[P*G, C]``: the tokens that count, a prefix of each row; masked entries of the
    result are 0. ``shared_prefix``: each prompt computed once (see the module docstring), else repeated;
    ``prefix_attention``: its attention backend (:mod:`lgrpo.attention`).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = GroupBatch.grouped(prompts, completion_ids, completion_mask, group_size)
    hidden = completion_states(model, batch, shared_prefix=shared_prefix, prefix_attention=prefix_attention)[:, :-1]
    logp = head_logprobs(hidden, model.get_output_embeddings(), batch.completion_ids, temperature)
    return logp.masked_fill(~batch.completion_mask, 0.0)


def head_logprobs(hidden: torch.Tensor, head: nn.Module | torch.Tensor, targets: torch.Tensor,
                  temperature: float = 1.0, chunk_rows: int = 2048) -> torch.Tensor:
    """``log_softmax(head(hidden) / T)[targets]`` ``[N, C]``, ``chunk_rows`` rows of logits at a time.
    ``head``: the output embedding module, or its weight ``[V, H]`` alone (no bias)."""
    n, c, h = hidden.shape
    flat, tgt = hidden.reshape(-1, h), targets.reshape(-1)
    if isinstance(head, torch.Tensor):
        weight, bias = head.to(flat.dtype), None
    else:
        weight = effective_weight(head).to(flat.dtype)
        bias = None if getattr(head, "bias", None) is None else head.bias.to(flat.dtype)
    parts = [token_logprobs(F.linear(flat[i: i + chunk_rows], weight, bias), tgt[i: i + chunk_rows], temperature)
             for i in range(0, flat.shape[0], chunk_rows)]
    return torch.cat(parts).view(n, c)


# --- the two forwards -------------------------------------------------------------------------------------


def _check_prefix_masks(batch: GroupBatch) -> torch.Tensor:
    lengths = batch.lengths
    c = batch.completion_ids.shape[1]
    prefix = torch.arange(c, device=lengths.device)[None] < lengths[:, None]
    if not torch.equal(prefix, batch.completion_mask):
        raise ValueError("completion_mask must be a prefix of each row (tokens up to the stop, then padding)")
    if bool((batch.prompts.lengths() < 1).any()):
        raise ValueError("every prompt needs at least one token (attention_mask has an empty row)")
    return lengths


def _shared_states(model, batch: GroupBatch, backend: str) -> torch.Tensor:
    install(model)
    prepare(model)  # the family's forward takes the layout dict as it is
    prompts, group, mask = batch.prompts, batch.group, batch.completion_mask
    lengths_c = _check_prefix_masks(batch)
    valid_p = prompts.attention_mask.bool()
    lengths_p = valid_p.sum(-1)
    pos_p, nxt = prompt_positions(model, prompts)
    c = batch.completion_ids.shape[1]
    pos_c = continuation_positions(model, nxt[group], torch.arange(c, device=nxt.device))
    if pos_p.dim() == 3:  # M-RoPE: [3, tokens]
        flat_pos = torch.cat([pos_p[:, valid_p], pos_c[:, mask]], -1)[:, None]
    else:
        flat_pos = torch.cat([pos_p[valid_p], pos_c[mask]])[None]
    layout = build_layout(lengths_p, lengths_c, group, backend)
    inputs = {
        "input_ids": torch.cat([prompts.input_ids[valid_p], batch.completion_ids[mask]])[None],
        # A dict of prepared masks reaches every attention layer as is (no 4-D mask is built).
        "attention_mask": {"full_attention": layout, "sliding_attention": layout},
        "position_ids": flat_pos,
    }
    if prompts.has_images:
        image_inputs = prompts.model_inputs(model)
        inputs.update(pixel_values=image_inputs["pixel_values"], image_grid_thw=image_inputs["image_grid_thw"])
    out = model.base_model(**inputs, use_cache=False)
    hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[0]
    prompt_last = (torch.cumsum(lengths_p, 0) - 1)[group]
    n_prompt = int(lengths_p.sum())
    starts = n_prompt + torch.cumsum(lengths_c, 0) - lengths_c
    own = starts[:, None] + torch.arange(c, device=starts.device)[None]
    index = torch.cat([prompt_last[:, None], torch.where(mask, own, prompt_last[:, None])], 1)
    return hidden[index]


def _repeated_states(model, batch: GroupBatch) -> torch.Tensor:
    prompt = batch.repeated_prompts()
    inputs = prompt.model_inputs(model)
    ids, mask = batch.completion_ids, batch.completion_mask
    # Completion tokens are text: per-token inputs are extended with the ids, the mask, and zeros.
    inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], mask.to(inputs["attention_mask"].dtype)], 1)
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(ids, dtype=types.dtype)], 1)
    if not uses_mrope(model):
        # Text: positions as generate assigned them. A VLM computes its (3-D) positions from the mask.
        inputs["position_ids"] = text_positions(inputs["attention_mask"])
    out = model.base_model(**inputs, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    p = prompt.length
    return hidden[:, p - 1: p + ids.shape[1]]


# --- the trainer's scorer ---------------------------------------------------------------------------------


class CompletionScorer(nn.Module):
    """Wraps a Hugging Face (V)LM; ``forward(batch)`` scores the completions of a :class:`GroupBatch`.

    Returns per-token log-probs ``[N, C]`` (``loss=None``), or runs the GRPO loss on the final hidden
    states (``loss`` holds its keyword arguments). One model forward per call, shared-prefix or repeated.
    Under FSDP2 this wrapper is the root module, so the weights the root group owns (embeddings, lm_head,
    final norm) are gathered for the whole call, including the loss on ``lm_head.weight`` outside the HF
    model's own forward.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        fused: bool = True,
        chunk_rows: int = 2048,
        chunk_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        shared_prefix: bool = True,
        prefix_attention: str = "auto",
    ):
        super().__init__()
        self.model = model
        self.fused = fused
        self.chunk_rows = chunk_rows
        self.chunk_size = chunk_size  # linear_grpo_loss's row chunk (None: its default)
        self.autocast_dtype = autocast_dtype
        self.shared_prefix = shared_prefix
        if prefix_attention not in CHOICES:
            raise ValueError(f"prefix_attention must be one of {list(CHOICES)}, got {prefix_attention!r}")
        self.prefix_attention = prefix_attention
        head = model.get_output_embeddings()
        if fused and getattr(head, "bias", None) is not None:
            self.fused = False  # linear_grpo_loss has no bias term

    def forward(self, batch: GroupBatch, temperature: float = 1.0, loss: dict | None = None, *,
                last_logits: bool = False):
        """Per-token log-probs ``[N, C]``; with ``loss``, the GRPO loss and its per-token statistics; with
        ``last_logits``, the logits ``[N, V]`` after each completion's last token (the listener's read-out)."""
        completion_ids, completion_mask = batch.completion_ids, batch.completion_mask
        ctx = (
            torch.autocast(completion_ids.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        with ctx:
            states = completion_states(self.model, batch, shared_prefix=self.shared_prefix,
                                       prefix_attention=self.prefix_attention)
        head = self.model.get_output_embeddings()
        if last_logits:
            last = states[torch.arange(len(batch), device=states.device), batch.lengths.to(states.device)]
            return head(last.to(head.weight.dtype))
        hidden = states[:, :-1]
        if loss is None:
            return head_logprobs(hidden, head, completion_ids, temperature, self.chunk_rows)
        kwargs = dict(loss, temperature=temperature)
        weight = effective_weight(head)  # an adapted lm_head's W + s·B·A (lgrpo.lora)
        if self.fused:
            out = linear_grpo_loss(hidden, weight, completion_ids, mask=completion_mask,
                                   chunk_size=self.chunk_size, **kwargs)
        else:
            logits = F.linear(hidden, weight.to(hidden.dtype))
            out = grpo_loss(logits, completion_ids, mask=completion_mask, **kwargs)
        # A tuple of tensors (not the dataclass): FSDP2 registers its backward hooks on outputs it can see.
        return out.loss, out.logp, out.entropy, out.kl, out.clipped
