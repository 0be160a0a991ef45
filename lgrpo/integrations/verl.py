"""verl 0.9.1 drop-in: the actor's policy loss from packed hidden states, with ``linear_grpo_loss``.

verl's ``register_policy_loss`` functions receive log-probs already computed from full logits, so
registering there saves nothing. What the fused path replaces is the actor engine's ``loss_fn``,
``verl.workers.utils.losses.ppo_loss(config, model_output, data, dp_group)``: :func:`fused_ppo_loss` has
that signature, but ``model_output`` holds the final hidden states of verl's packed (no-padding) layout
instead of log-probs::

    model_output = {"hidden_states": h,        # [total_nnz, H] (or nested [B, j, H]): every sequence's
                                               # prompt + response rows, one after the other, as the engine runs
                    "lm_head_weight": W}       # [V, H]

and the rows are those of ``data["input_ids"]`` (a nested tensor whose offsets are the ``cu_seqlens``).
The loss runs on that packed layout (``cu_seqlens``), the rows that predict response tokens live, all others
masked (never projected). :func:`shared_prefix_hidden_states` computes those hidden states with each distinct
prompt of the micro-batch once (GRPO repeats each prompt ``rollout.n`` times). README: how to wire both into
verl's FSDP actor.

Mapping (SPEC §2; each tested against verl's own ``ppo_loss`` / ``agg_loss``):

- ``loss_agg_mode``: ``token-mean`` → bnpo, or dapo with ``num_items = batch_num_tokens / dp_size`` when
  verl passes the global token count; ``seq-mean-token-mean`` → grpo; ``seq-mean-token-sum`` → dr_grpo with
  ``max_len = 1``; ``seq-mean-token-sum-norm`` → dr_grpo with ``max_len = loss_scale_factor`` (default: the
  padded response length); ``token-sum`` → dapo with ``num_items = 1``; then verl's data-parallel factors
  (``dp_size``, ``global_batch_size``) scale the result, as its ``agg_loss`` does.
- ``policy_loss.loss_mode``: ``vanilla`` (dual clip ``clip_ratio_c`` → ``delta``) or ``gspo`` (sequence-level
  ratio; verl's token-wise stop-gradient form has the same value, and the same gradient when advantage x
  rollout weight is one value per response, as GRPO's advantages are; otherwise ``ValueError``).
- ``clip_ratio_low``/``clip_ratio_high`` → ``eps_low``/``eps_high``; ``use_kl_loss`` with ``kl_loss_type``
  ``low_var_kl``/``k3`` → ``beta = kl_loss_coef``; ``rollout_is_weights`` multiply the surrogate (not the KL)
  and ride in per-token advantages (``w * -min(rA, clip(r)A) = -min(r(wA), clip(r)(wA))`` for ``w >= 0``).

Differences in extremes: verl clamps the log-ratio to ±20 and its k3 estimate to 10 (zero gradient
beyond); the kernel does not. The metric ``lgrpo/kl_beyond_verl_clamp`` reports the share of tokens where
verl's k3 would have been clamped.
"""

from __future__ import annotations

import torch

from lgrpo.extras import require

require("verl", "lgrpo.integrations.verl")

from verl.trainer.ppo.core_algos import agg_loss
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.utils.torch_functional import masked_mean

from lgrpo.group import GroupBatch, PromptBatch, group_identical
from lgrpo.kernels import linear_grpo_loss, loss_options
from lgrpo.scoring import completion_states

AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LOSS_MODES = ("vanilla", "gspo")
KL_TYPES = ("low_var_kl", "k3")


def unsupported_settings(config) -> list[str]:
    """Each setting of verl's ``ActorConfig`` that :func:`fused_ppo_loss` cannot honour, with the reason."""
    found = []
    mode = config.policy_loss.get("loss_mode", "vanilla")
    if mode not in LOSS_MODES:
        found.append(f"policy_loss.loss_mode={mode!r}: the kernel computes the clipped surrogate of {LOSS_MODES}")
    if config.loss_agg_mode not in AGGREGATIONS:
        found.append(f"loss_agg_mode={config.loss_agg_mode!r}: not one of {AGGREGATIONS}")
    if config.use_kl_loss and config.kl_loss_type not in KL_TYPES:
        found.append(f"kl_loss_type={config.kl_loss_type!r}: the kernel's KL term is k3 ({KL_TYPES})")
    if config.entropy_coeff != 0:
        found.append(f"entropy_coeff={config.entropy_coeff}: the entropy bonus needs the entropy's gradient, and "
                     "the kernel reports entropy without one")
    _, high = _clip_range(config)
    if mode == "vanilla" and not config.clip_ratio_c >= 1 + high:
        found.append(f"clip_ratio_c={config.clip_ratio_c} < 1 + clip_ratio_high = {1 + high}: the kernel's two-sided "
                     "bound then also caps positive advantages, verl's dual clip only negative ones")
    return found


def _clip_range(config) -> tuple[float, float]:
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return float(low), float(high)


def sequence_lengths(data) -> tuple[torch.Tensor, torch.Tensor]:
    """Real (unpadded) prompt and response tokens of each sequence ``[B]``, read as verl's
    ``no_padding_2_padding`` reads them: nested ``prompts``/``responses``, else ``attention_mask``."""
    prompts, responses = data["prompts"], data["responses"]
    if prompts.is_nested:
        prompt_lens, response_lens = prompts.offsets().diff(), responses.offsets().diff()
    else:
        attention = data["attention_mask"]
        prompt_lens = attention[:, : prompts.shape[1]].sum(1)
        response_lens = attention[:, prompts.shape[1]:].sum(1)
    if bool((prompt_lens == 0).any()):
        raise ValueError("every sequence needs a prompt token: the response's first token is predicted by the "
                         "row before it")
    return prompt_lens, response_lens


def response_rows(data, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, inside)`` ``[B, width]``: the packed row whose hidden state predicts response token ``r`` of
    sequence ``b`` (the row before it), and whether ``r`` exists; the inverse of verl's
    ``no_padding_2_padding``, which reads prompt/response lengths the same way."""
    prompt_lens, response_lens = sequence_lengths(data)
    ends = (prompt_lens + response_lens).cumsum(0)
    r = torch.arange(width, device=ends.device)
    rows = (ends - response_lens - 1).unsqueeze(1) + r
    return rows, r < response_lens.unsqueeze(1)


def _check_per_sequence(scaled: torch.Tensor, live: torch.Tensor) -> None:
    """verl's GSPO is the token-wise form ``sg[s_i] * pi_t / sg[pi_t]``: its gradient equals the sequence-level
    ratio's (the kernel's) only when advantage x rollout weight is one value per sequence, as GRPO's are."""
    first = scaled.gather(1, live.to(torch.uint8).argmax(1, keepdim=True))
    if bool(((scaled != first) & live).any()):
        raise ValueError("advantages (x rollout_is_weights) must be constant within each response for "
                         "policy_loss.loss_mode='gspo': verl's token-wise GSPO then has the sequence-level "
                         "gradient the kernel computes; with per-token values the two differ")


def _temperature(data, temperature: float | None) -> float:
    if temperature is None:
        temperature = tu.get_non_tensor_data(data, "temperature", 1.0) if "temperature" in data.keys() else 1.0
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() and not bool((temperature == temperature.reshape(-1)[0]).all()):
            raise ValueError("temperature: per-sample temperatures are not supported (the kernel takes one)")
        temperature = float(temperature.reshape(-1)[0])
    return float(temperature)


def fused_ppo_loss(config, model_output: dict, data, dp_group=None, *, temperature: float | None = None,
                   chunk_size: int | None = None):
    """verl's ``ppo_loss`` from packed hidden states: returns ``(loss, metrics)`` like it does.

    ``model_output["hidden_states"]`` ``[total_nnz, H]`` (or nested) and ``model_output["lm_head_weight"]``
    ``[V, H]``; ``data`` is the micro-batch verl's engine hands its ``loss_fn`` (nested ``input_ids``,
    ``prompts``/``responses``, ``response_mask``, ``old_log_probs``, ``advantages``, optional ``ref_log_prob``
    and ``rollout_is_weights``, non-tensor ``dp_size``/``batch_num_tokens``/``global_batch_size``).
    ``temperature``: default ``data["temperature"]`` (one value), else 1.
    """
    del dp_group  # verl passes it; the normalisers come in data, as for ppo_loss
    found = unsupported_settings(config)
    if found:
        raise ValueError("fused_ppo_loss cannot honour these settings (verl's ppo_loss can):\n  - "
                         + "\n  - ".join(found))
    hidden = model_output["hidden_states"]
    hidden = hidden.values() if hidden.is_nested else hidden
    weight = model_output["lm_head_weight"]
    input_ids = data["input_ids"]
    cu_seqlens = input_ids.offsets().to(hidden.device)
    n_rows = int(cu_seqlens[-1])
    if hidden.dim() != 2 or hidden.shape[0] != n_rows:
        raise ValueError(f"hidden_states must be the packed rows [total_nnz={n_rows}, H] of data['input_ids'], "
                         f"got shape {tuple(hidden.shape)}")

    fields = ["response_mask", "old_log_probs", "advantages"]
    fields += [k for k in ("rollout_is_weights", "ref_log_prob") if k in data.keys()]
    padded = data.select(*fields).to_padded_tensor()
    response_mask = padded["response_mask"].to(torch.bool)
    n_seqs, width = response_mask.shape
    rows, inside = response_rows(data, width)
    live = response_mask & inside
    index = rows[live]

    def packed(values: torch.Tensor) -> torch.Tensor:  # padded [B, R] -> packed [N], 0 off the response rows
        out = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        return out.index_put_((index,), values[live].to(torch.float32))

    def padded_view(values: torch.Tensor) -> torch.Tensor:  # packed [N] -> padded [B, R], 0 outside
        return torch.where(live, values[rows.clamp(max=n_rows - 1)], 0)

    advantages = padded["advantages"]
    weights = padded.get("rollout_is_weights", None)
    scaled = advantages if weights is None else advantages * weights
    mode = config.policy_loss.get("loss_mode", "vanilla")
    if mode == "gspo":
        _check_per_sequence(scaled, live)
    low, high = _clip_range(config)
    beta = float(config.kl_loss_coef) if config.use_kl_loss else 0.0
    options = dict(temperature=_temperature(data, temperature), eps_low=low, eps_high=high,
                   delta=float(config.clip_ratio_c) if mode == "vanilla" else None, beta=beta,
                   importance_level="sequence" if mode == "gspo" else "token")
    options.update(_aggregation(config, data, live, width))
    scale = options.pop("scale")
    mask = torch.zeros(n_rows, dtype=torch.bool, device=hidden.device).index_fill_(0, index, True)
    targets = torch.roll(input_ids.values(), -1).to(hidden.device)  # row t predicts token t + 1
    out = linear_grpo_loss(
        hidden, weight, targets, packed(scaled), mask,
        packed(padded["old_log_probs"]), packed(padded["ref_log_prob"]) if beta > 0 else None,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, **options)
    loss = out.loss * scale if scale != 1 else out.loss
    return loss, _metrics(config, data, out, padded_view, padded, live, loss, beta)


def _aggregation(config, data, live: torch.Tensor, width: int) -> dict:
    """Kernel ``loss_type`` (and ``num_items``/``max_len``) for verl's ``loss_agg_mode``, plus the factor
    verl's ``agg_loss`` applies on top for data parallelism (``scale``)."""
    dp_size = tu.get_non_tensor_data(data, "dp_size", 1)
    batch_num_tokens = tu.get_non_tensor_data(data, "batch_num_tokens", None)
    global_batch_size = tu.get_non_tensor_data(data, "global_batch_size", None)
    mode = config.loss_agg_mode
    if mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("batch_num_tokens: the global token count is required when dp_size > 1")
            return dict(loss_options("bnpo"), scale=1)
        return dict(loss_options("bnpo", num_items=float(batch_num_tokens) / dp_size), scale=1)
    if mode == "token-sum":
        return dict(loss_options("dapo", num_items=1), scale=dp_size)
    # seq-mean-*: the kernel divides by B; verl by the global batch size / dp (or this batch's non-empty rows)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        global_batch_size = int((live.sum(1) > 0).sum())
    scale = live.shape[0] * dp_size / max(float(global_batch_size), 1e-30)
    if mode == "seq-mean-token-mean":
        return dict(loss_options("grpo"), scale=scale)
    max_len = 1 if mode == "seq-mean-token-sum" else (config.loss_scale_factor or width)
    return dict(loss_options("dr_grpo", max_len=int(max_len)), scale=scale)


@torch.no_grad()
def _metrics(config, data, out, padded_view, padded, live, loss, beta) -> dict:
    """verl's ``ppo_loss`` metrics (same names, same formulas) from the kernel's per-token outputs."""
    mode = config.policy_loss.get("loss_mode", "vanilla")
    low, high = _clip_range(config)
    advantages = padded["advantages"]
    log_prob, old = padded_view(out.logp), padded["old_log_probs"]
    negative_approx_kl = log_prob - old
    if mode == "gspo":
        seq = (negative_approx_kl * live).sum(-1) / live.sum(-1).clamp(min=1)
        ratio = torch.exp(seq.unsqueeze(-1).clamp(max=10.0)).expand_as(log_prob)
    else:
        ratio = torch.exp(negative_approx_kl.clamp(min=-20.0, max=20.0))
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * ratio.clamp(1 - low, 1 + high)
    clipfrac_lower = torch.zeros(())
    if mode == "vanilla":
        clipped = torch.maximum(pg_losses1, pg_losses2)
        clipfrac_lower = masked_mean(torch.gt(clipped, -advantages * config.clip_ratio_c) * (advantages < 0).float(),
                                     live)
    global_info = dict(dp_size=tu.get_non_tensor_data(data, "dp_size", 1),
                       batch_num_tokens=tu.get_non_tensor_data(data, "batch_num_tokens", None),
                       global_batch_size=tu.get_non_tensor_data(data, "global_batch_size", None),
                       loss_scale_factor=config.loss_scale_factor)
    aggregation = AggregationType.MEAN
    if global_info["dp_size"] > 1 or any(global_info[k] is not None for k in global_info if k != "dp_size"):
        aggregation = AggregationType.SUM
    metrics = {"actor/pg_clipfrac": masked_mean(torch.gt(pg_losses2, pg_losses1).float(), live).item(),
               "actor/ppo_kl": masked_mean(-negative_approx_kl, live).item(),
               "actor/pg_clipfrac_lower": clipfrac_lower.item()}
    metrics = Metric.from_dict(metrics, aggregation=AggregationType.MEAN)
    pg_loss = loss.detach()
    if beta > 0:
        kl = padded_view(out.kl)
        kl_loss = agg_loss(loss_mat=kl, loss_mask=live, loss_agg_mode=config.loss_agg_mode, **global_info)
        pg_loss = pg_loss - beta * kl_loss
        metrics["kl_loss"] = Metric(value=kl_loss, aggregation=aggregation)
        metrics["kl_coef"] = config.kl_loss_coef
        d = padded["ref_log_prob"] - log_prob
        beyond = live & ((d.abs() > 20) | (torch.expm1(d) - d > 10))
        metrics["lgrpo/kl_beyond_verl_clamp"] = Metric(value=masked_mean(beyond.float(), live).item(),
                                                       aggregation=AggregationType.MEAN)
    metrics["actor/pg_loss"] = Metric(value=pg_loss, aggregation=aggregation)
    if tu.get_non_tensor_data(data, "calculate_entropy", False) or config.calculate_entropy:
        entropy = agg_loss(loss_mat=padded_view(out.entropy), loss_mask=live, loss_agg_mode=config.loss_agg_mode,
                           **global_info)
        metrics["actor/entropy_loss"] = Metric(value=entropy, aggregation=aggregation)
    return metrics


def shared_prefix_hidden_states(model, data, *, prefix_attention: str = "auto") -> torch.Tensor:
    """Final hidden states ``[total_nnz, H]`` of verl's packed micro-batch, each distinct prompt computed once.

    ``model``: a Hugging Face causal LM (text; its attention registered with transformers, e.g. ``sdpa``);
    ``data``: the micro-batch verl's engine hands its ``loss_fn`` (nested ``input_ids`` and ``position_ids``,
    ``prompts``/``responses``, and ``attention_mask`` where ``prompts`` is padded). Rows whose real prompt
    tokens are equal (GRPO's ``n`` samples, wherever they sit in the micro-batch) become one prompt of a
    :class:`~lgrpo.group.GroupBatch`, and one :func:`lgrpo.scoring.completion_states` forward runs each
    distinct prompt once, then every response attending to its prompt's keys/values. Positions: verl
    numbers each sequence 0, 1, ... from its first real token (checked against ``position_ids``); the
    shared forward numbers a prompt the same way and its responses on from the prompt's end, so every
    row sees the positions of verl's plain forward.

    Rows hold the plain forward's states (differentiable to the model's parameters) from each sequence's
    last prompt token to its last response token: every row :func:`fused_ppo_loss` reads. The other
    prompt rows hold **zeros** (the loss masks them and never projects them; a consumer that reads prompt
    rows must run the plain forward). Raises ``ValueError`` for ``multi_modal_inputs`` (images need
    M-RoPE positions and the vision tower in the shared forward: not wired for verl), position ids that
    are not verl's text numbering, or a layout whose ``input_ids`` disagree with the prompt/response
    lengths. ``prefix_attention``: the shared-prefix attention backend (:mod:`lgrpo.attention`).
    """
    if "multi_modal_inputs" in data.keys() and any(_non_empty(x) for x in _rows_of(data["multi_modal_inputs"])):
        raise ValueError("multi_modal_inputs: shared_prefix_hidden_states handles text micro-batches only "
                         "(images need M-RoPE positions and the vision tower in the shared forward); run the "
                         "model's plain forward for multimodal data")
    input_ids = data["input_ids"]
    if not input_ids.is_nested:
        raise ValueError("input_ids must be verl's nested no-padding layout (left_right_2_no_padding)")
    prompt_lens, response_lens = sequence_lengths(data)
    offsets = input_ids.offsets()
    prompt_lens, response_lens = prompt_lens.to(offsets.device), response_lens.to(offsets.device)
    if not torch.equal(offsets.diff(), prompt_lens + response_lens):
        raise ValueError(f"input_ids: sequence lengths {offsets.diff().tolist()} are not prompt + response lengths "
                         f"{(prompt_lens + response_lens).tolist()}")
    tokens = input_ids.values()
    starts = offsets[:-1]
    # verl's text position ids: 0, 1, ... from each sequence's first real token (compute_position_id_with_mask)
    numbering = torch.arange(tokens.shape[0], device=offsets.device) - starts.repeat_interleave(offsets.diff())
    if "position_ids" in data.keys():
        position_ids = data["position_ids"]
        values = position_ids.values() if position_ids.is_nested else position_ids
        if values.dim() != 1 or not torch.equal(values.to(numbering.device), numbering):
            raise ValueError("position_ids must number each sequence 0, 1, ... from its first real token (verl's "
                             f"text layout), got shape {tuple(values.shape)}; M-RoPE or shifted positions are not "
                             "supported")

    n_seqs = len(prompt_lens)
    # the lengths read to the host once (a GPU micro-batch: one sync, not two per row)
    starts_h, prompt_lens_h = starts.tolist(), prompt_lens.tolist()
    prompt_rows = [tokens[starts_h[b]: starts_h[b] + prompt_lens_h[b]] for b in range(n_seqs)]
    group, leaders = group_identical([[p] for p in prompt_rows])
    prompt_width, width = max(prompt_lens_h), max(int(response_lens.max()), 1)
    ids = tokens.new_zeros(len(leaders), prompt_width)
    mask = torch.zeros(len(leaders), prompt_width, dtype=torch.long, device=tokens.device)
    for g, b in enumerate(leaders):  # left padded, as PromptBatch holds prompts
        ids[g, prompt_width - len(prompt_rows[b]):] = prompt_rows[b]
        mask[g, prompt_width - len(prompt_rows[b]):] = 1
    column = torch.arange(width, device=tokens.device)
    inside = column < response_lens[:, None]
    response_index = (starts + prompt_lens)[:, None] + column
    completion_ids = torch.where(inside, tokens[response_index.clamp(max=tokens.shape[0] - 1)], 0)
    batch = GroupBatch(PromptBatch(ids, mask), completion_ids, inside, group.to(tokens.device))

    states = completion_states(model, batch, prefix_attention=prefix_attention)  # [B, width + 1, H]
    # states[b, j]: the row of sequence b's last prompt token (j = 0), then of its response token j - 1
    column = torch.arange(width + 1, device=states.device)
    kept = column <= response_lens.to(states.device)[:, None]
    rows = (starts + prompt_lens - 1).to(states.device)[:, None] + column
    out = states.new_zeros(tokens.shape[0], states.shape[-1])
    return out.index_put((rows[kept],), states[kept])


def _rows_of(value) -> list:
    """verl's per-row non-tensor entries (a NonTensorStack, NonTensorData or a list) as a list."""
    value = value.tolist() if hasattr(value, "tolist") and not isinstance(value, torch.Tensor) else value
    value = getattr(value, "data", value)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _non_empty(entry) -> bool:
    entry = getattr(entry, "data", entry)
    return entry is not None and (not hasattr(entry, "__len__") or len(entry) > 0)


__all__ = ["fused_ppo_loss", "response_rows", "sequence_lengths", "shared_prefix_hidden_states",
           "unsupported_settings"]
