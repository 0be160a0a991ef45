"""TRL 1.16 drop-in: ``LGRPOTrainer`` (the fused loss inside TRL's GRPO) and ``ListenerReward``.

``LGRPOTrainer`` is ``trl.GRPOTrainer`` (same constructor, same generation, rewards, advantages,
reference and old log-probs, same logs) whose policy loss is :func:`lgrpo.kernels.linear_grpo_loss` on
the policy's final hidden states: the update never holds ``[B, C, V]`` logits, and the one fused pass
also gives the per-token log-probs and entropies TRL logs.

How TRL 1.16's ``GRPOTrainer._compute_loss`` maps onto the kernel (each line tested against TRL itself):

- rows: the backbone runs on ``[prompt (P); completion (C)]`` and ``hidden[:, P-1:-1]`` predicts the
  completion (TRL's ``labels[:, 1:]`` / ``logits_to_keep``).
- ``loss_type``: grpo, bnpo and dr_grpo (``max_len = max_completion_length``) are the kernel's, divided by
  the gradient-accumulation steps in training; dapo is the kernel's token sum divided by TRL's normaliser
  ``num_items_in_batch / num_processes`` (times accumulation steps / ``steps_per_generation`` in training).
- ``epsilon``/``epsilon_high``, ``delta``, ``beta``, ``temperature``, ``importance_sampling_level`` map one to
  one; ``use_bias_correction_kl`` (TRL's default) is ``kl_bias_correction``.
- vLLM importance sampling multiplies the surrogate (not the KL) by a weight ``w >= 0``, and
  ``w * -min(r̂ A, clip(r) A) = -min(r̂ (wA), clip(r) (wA))``: it rides in per-token advantages ``wA``.
- ``tool_mask`` multiplies the completion mask; images and the other VLM inputs go to the backbone as TRL
  passes them.
- each prompt once (``shared_prefix=True``): TRL's micro-batch holds each prompt once per completion
  (its ``RepeatSampler``), split and shuffled across micro-batches. Rows with the same prompt (ids, mask,
  and for a VLM the same images) become one prompt of a :class:`~lgrpo.group.GroupBatch`, and the backbone
  runs :func:`lgrpo.scoring.completion_states`' shared-prefix forward: each distinct prompt (its images
  through the vision tower) once, no padding. TRL's forward numbers a text row's positions over the padded
  row (no ``position_ids``), the shared one from the first real token: a constant shift per row, which RoPE
  scores do not see (tested equal to TRL within rounding).
- the old and reference log-prob passes (``_get_per_token_logps_and_entropies``, no gradient) group the same
  way and run the same shared forward through the model's (or ``ref_model``'s) forward, TRL's output layout.

Settings the kernel cannot honour raise ``ValueError`` naming them (:func:`unsupported_settings`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import warnings

import torch

from lgrpo.extras import require

require("trl", "lgrpo.integrations.trl")

from accelerate.utils import is_peft_model
from PIL import Image
from torch.distributed.tensor import DTensor
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from lgrpo.attention import install as install_shared_prefix
from lgrpo.group import GroupBatch, PromptBatch, group_identical
from lgrpo.kernels import linear_grpo_loss, loss_options
from lgrpo.models import prepare as prepare_model
from lgrpo.models.qwen_vl import IMAGE_INPUTS
from lgrpo.scoring import completion_states, head_logprobs

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# Inputs TRL's _get_per_token_logps_and_entropies hands to the model besides input_ids/attention_mask
# (num_images / num_tiles only split batches there; the whole batch goes in one call here).
MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                     "token_type_ids", "mm_token_type_ids", "image_position_ids")
# The multimodal inputs lgrpo.scoring's shared-prefix forward knows (the Qwen-VL families', lgrpo.models);
# any other (Gemma's token_type_ids, LLaVA's image_sizes...) keeps a micro-batch on the repeated path.
SHARED_PREFIX_INPUTS = IMAGE_INPUTS
# Config fields that scale the logits before the softmax (TRL's fused head reads them): not in the kernel.
LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def unsupported_settings(args, model=None) -> list[str]:
    """Each ``GRPOConfig`` setting (and, given ``model``, model property) that ``LGRPOTrainer`` cannot
    honour, with the reason; empty when everything maps onto the kernel."""
    found = []
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        found.append(f"loss_type={args.loss_type!r}: the kernel computes the clipped surrogate of "
                     f"{', '.join(SUPPORTED_LOSS_TYPES)}")
    if args.top_entropy_quantile < 1.0:
        found.append(f"top_entropy_quantile={args.top_entropy_quantile}: the token mask needs every rank's "
                     "entropies before the loss, and the fused pass computes both at once")
    if args.off_policy_mask_threshold is not None:
        found.append(f"off_policy_mask_threshold={args.off_policy_mask_threshold}: the sequence mask needs the "
                     "current log-probs before the loss, and the fused pass computes both at once")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        found.append(f"entropy_coef={args.entropy_coef}, use_adaptive_entropy={args.use_adaptive_entropy}: the "
                     "entropy bonus needs the entropy's gradient, and the kernel reports entropy without one")
    if model is None:
        return found
    text = model.config.get_text_config()
    if getattr(text, "final_logit_softcapping", None) is not None:
        found.append(f"final_logit_softcapping={text.final_logit_softcapping} ({type(model).__name__}): logit "
                     "soft-capping is not in the kernel")
    for name in LOGIT_SCALES:
        value = getattr(text, name, None)
        if value is not None and value != 1:
            found.append(f"{name}={value} ({type(model).__name__}): scaled logits are not in the kernel")
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        found.append(f"{type(model).__name__} has no lm_head weight to fuse")
    elif getattr(head, "bias", None) is not None:
        found.append(f"{type(model).__name__}'s lm_head has a bias, which the kernel does not add")
    return found


def _reject(found: list[str]) -> None:
    if found:
        raise ValueError("LGRPOTrainer cannot honour these settings (trl.GRPOTrainer can):\n  - "
                         + "\n  - ".join(found))


class LGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the policy loss computed by ``linear_grpo_loss`` on final hidden states.

    Same constructor and behaviour as ``GRPOTrainer`` (module docstring for the mapping); raises
    ``ValueError`` naming every setting it cannot honour (:func:`unsupported_settings`).
    ``shared_prefix``: the update computes each distinct prompt of a micro-batch once (module
    docstring), and so do TRL's old and reference log-prob passes; False, or a model or micro-batch it
    cannot serve (``eager`` attention, sliding-window layers, other VLM inputs, images in completions: a
    warning names the reason once), runs the backbone on every row's prompt + completion.
    """

    def __init__(self, model, reward_funcs=None, args=None, *more, shared_prefix: bool = True, **kwargs):
        if args is not None:  # fail before any model loads
            _reject(unsupported_settings(args))
        super().__init__(model, reward_funcs, args, *more, **kwargs)
        self._warned_fallbacks: set[str] = set()
        found = unsupported_settings(self.args, self.model)
        if self.aux_loss_enabled:
            found.append(f"router_aux_loss_coef={self.router_aux_loss_coef}: the MoE load-balancing loss is not "
                         "added by the fused path (set router_aux_loss_coef=0.0 to train without it)")
        _reject(found)
        # The loss runs inside the model's forward, as TRL's fused head does, so DDP/FSDP wrappers see
        # every parameter it uses (the lm_head weight included) within their forward.
        target = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_hidden_state_loss(target, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        self.shared_prefix = shared_prefix
        if shared_prefix:
            reason = _shared_prefix_unsupported(target)
            if reason is not None:
                self._fallback(reason)
                self.shared_prefix = False
        # The reference pass runs TRL's ref_model (no adapter to disable): it answers the same requests.
        self._ref_unsupported = None
        if self.ref_model is not None:
            ref = self.accelerator.unwrap_model(self.ref_model)
            add_hidden_state_loss(ref, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
            reason = _shared_prefix_unsupported(ref)
            self._ref_unsupported = None if reason is None else f"the reference model: {reason}"

    def _fallback(self, reason: str) -> None:
        """Warn once per reason that a pass (the update, the old or reference log-probs) runs each row's
        prompt (shared_prefix=True asked otherwise)."""
        if reason not in self._warned_fallbacks:
            self._warned_fallbacks.add(reason)
            warnings.warn(f"LGRPOTrainer: each row's prompt is computed (no shared prefix): {reason}",
                          RuntimeWarning, stacklevel=3)

    def _shared_batch(self, inputs: dict) -> GroupBatch | None:
        """The micro-batch as distinct prompts plus a group index per row, or None (with a one-time
        warning) where the shared-prefix forward cannot reproduce TRL's."""
        if not self.shared_prefix:
            return None
        others = sorted(k for k in MULTIMODAL_INPUTS if inputs.get(k) is not None and k not in SHARED_PREFIX_INPUTS)
        if others:
            self._fallback(f"the shared-prefix forward does not handle the inputs {others}")
            return None
        if inputs.get("pixel_values") is not None and inputs.get("image_grid_thw") is None:
            # InternVL-style tiles: no grid to split the pixels by prompt, nor to place them in the sequence
            self._fallback("pixel_values without image_grid_thw (only the Qwen-VL families' images are shared)")
            return None
        if self._images_in_completions(inputs):
            self._fallback("images inside completions (tool responses): the shared forward reads completions as text")
            return None
        completion_mask = inputs["completion_mask"]
        # TRL attends to completion tokens through completion_mask; the flat sequence keeps a prefix of each
        # row. A mask with holes would give the later tokens other positions than TRL's.
        if bool((completion_mask[:, 1:] > completion_mask[:, :-1]).any()):
            self._fallback("a completion_mask row is not a prefix (tokens, then padding)")
            return None
        return group_rows(inputs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        """TRL's no-gradient log-prob passes (old log-probs: the policy; reference: ``ref_model``, or the
        policy with its adapter disabled) with each distinct prompt computed once, as in the update.

        ``input_ids`` is TRL's ``[prompt; completion]`` (the last ``logits_to_keep`` columns the completion):
        its rows group by the update's rules (:meth:`_shared_batch`). Rows are taken in prompt order and cut
        every ``batch_size`` rows, so no forward holds more rows (or tokens) than TRL's chunk and a prompt is
        computed once per chunk it reaches. Log-probs ``[B, logits_to_keep]`` at ``self.temperature``, 0 at
        padding, as TRL's fused head returns them. Entropies and the MoE aux loss (which TRL's own callers of
        these passes do not request) and micro-batches the shared forward cannot serve go to TRL's method.
        """
        batch = None
        if not (compute_entropy or compute_aux_loss):
            if model is self.ref_model and self._ref_unsupported is not None:
                if self.shared_prefix:
                    self._fallback(self._ref_unsupported)
            else:
                split = input_ids.size(1) - logits_to_keep
                inputs = dict(prompt_ids=input_ids[:, :split], prompt_mask=attention_mask[:, :split],
                              completion_ids=input_ids[:, split:], completion_mask=attention_mask[:, split:],
                              **{k: v for k, v in extra.items() if v is not None})
                batch = self._shared_batch(inputs)
        if batch is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **extra)
        order = torch.argsort(batch.group, stable=True)
        size = batch_size or len(batch)
        parts = []
        for start in range(0, len(batch), size):
            with self.accelerator.autocast():
                parts.append(model(lgrpo_logprobs=dict(groups=batch.select(order[start:start + size]),
                                                       temperature=self.temperature)))
        return torch.cat(parts)[torch.argsort(order)], None, None

    def _images_in_completions(self, inputs: dict) -> bool:
        # TRL marks tool-response images in the completion part of mm_token_type_ids; without that tensor,
        # the image/video placeholder ids in the completions say the same.
        width = inputs["prompt_ids"].shape[1]
        types = inputs.get("mm_token_type_ids")
        if types is not None:
            return bool(types[:, width:].any())
        ids = inputs["completion_ids"]
        marks = [getattr(self.model.config, k, None) for k in ("image_token_id", "video_token_id")]
        marks = torch.tensor([m for m in marks if m is not None], dtype=ids.dtype, device=ids.device)
        return bool(torch.isin(ids, marks).any())

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        batch = self._shared_batch(inputs)
        if batch is None:
            model_inputs = {"input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
                            "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1)}
            model_inputs.update({k: inputs[k] for k in MULTIMODAL_INPUTS if inputs.get(k) is not None})
        else:  # the backbone's inputs ride in the request: the forward reads the GroupBatch
            model_inputs = {}

        advantages = inputs["advantages"]
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights = inputs["importance_sampling_ratio"]  # [B, C] per token or [B, 1] per sequence, >= 0
            per_seq = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
            advantages = (per_seq * weights).expand(mask.shape).contiguous()

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        options = dict(temperature=self.temperature, eps_low=self.epsilon_low, eps_high=self.epsilon_high,
                       delta=self.args.delta, beta=self.beta, importance_level=self.importance_sampling_level,
                       kl_bias_correction=self.beta != 0.0 and bool(self.args.use_bias_correction_kl))
        # dapo: the token sum (num_items 1), which TRL's normaliser divides below; bnpo: this micro-batch's tokens
        options.update(loss_options(self.loss_type, num_items=1 if self.loss_type == "dapo" else None,
                                    max_len=self.max_completion_length))
        request = dict(options, prompt_length=prompt_ids.size(1), targets=completion_ids, advantages=advantages,
                       mask=mask, old_logp=inputs.get("old_per_token_logps"),
                       ref_logp=inputs["ref_per_token_logps"] if self.beta != 0.0 else None)
        if batch is not None:
            request["groups"] = batch
        with self.accelerator.autocast():
            out = model(**model_inputs, lgrpo_loss=request)

        if self.loss_type == "dapo":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = out["loss"] / normalizer
        else:
            loss = out["loss"] / accumulation
        self._log_loss_metrics(mode, out, inputs, mask)
        return loss

    @torch.no_grad()
    def _log_loss_metrics(self, mode: str, out: dict, inputs: dict, mask: torch.Tensor) -> None:
        """TRL's own loss metrics (kl, entropy, clip ratios), from the kernel's per-token outputs.

        Written as in ``GRPOTrainer._compute_loss`` (same shapes, same reductions across ranks), so the
        logged numbers mean what they mean there.
        """
        logp = out["logp"]
        old = inputs.get("old_per_token_logps")
        old = logp if old is None else old
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        log_ratio = logp - old
        if self.importance_sampling_level == "token":
            coef_1 = torch.exp(log_ratio)
        else:  # one ratio per sequence, [B, 1]
            coef_1 = torch.exp((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)

        def masked_seq_mean(x):
            if x.shape[1] == 1:
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * mask).sum(), mask.sum().float()
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if self.beta != 0.0:
            kl = out["kl"] * coef_1 if self.args.use_bias_correction_kl else out["kl"]
            metrics["kl"].append(global_masked_mean(kl))
        metrics["entropy"].append(global_masked_mean(out["entropy"]))
        if self.args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=self.args.delta)
        is_low = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)
        is_high = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"].append(global_masked_mean(is_low.float()))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(is_high.float()))
        metrics["clip_ratio/region_mean"].append(global_masked_mean((is_low | is_high).float()))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(is_low.float()))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(is_high.float()))).item())


def add_hidden_state_loss(model, *, cast_lm_head_to_fp32: bool = False) -> None:
    """Teach ``model(..., lgrpo_loss=request)`` to return ``linear_grpo_loss`` on its final hidden states,
    and ``model(lgrpo_logprobs={"groups": batch, "temperature": T})`` the per-token log-probs ``[N, C]`` of
    a :class:`GroupBatch`'s completions (shared-prefix forward; 0 at padding, as TRL's fused head).

    ``request`` holds ``prompt_length`` P and the keyword arguments of ``linear_grpo_loss`` except
    ``hidden``/``weight``; the backbone (``model.base_model``) runs on the inputs, rows ``[:, P-1:-1]``
    meet the lm_head weight in the kernel, and the result comes back as a dict of ``GRPOLossOutput``'s
    fields. With ``groups`` (a :class:`GroupBatch` of the same rows) in the request the backbone runs the
    shared-prefix forward of :func:`lgrpo.scoring.completion_states` instead, and the positional inputs
    are ignored. Without ``lgrpo_loss`` the forward is the previous one (generation and TRL's fused log-prob
    head are untouched). The lm_head runs in the autocast dtype when autocast is on (as ``F.linear``
    would), in fp32 with ``cast_lm_head_to_fp32``, else in the weight's dtype.
    """
    previous = model.forward

    def head(self) -> tuple[torch.Tensor, torch.dtype]:
        """The lm_head weight (whole) and the dtype it runs in."""
        weight = self.get_output_embeddings().weight
        if isinstance(weight, DTensor):  # FSDP2 shards: gather the head once (differentiably)
            weight = weight.full_tensor()
        device = weight.device.type
        if cast_lm_head_to_fp32:
            return weight, torch.float32
        if torch.is_autocast_enabled(device):
            return weight, torch.get_autocast_dtype(device)
        return weight, weight.dtype

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, lgrpo_loss=None, lgrpo_logprobs=None, **kwargs):
        if lgrpo_loss is None and lgrpo_logprobs is None:
            return previous(*args, **kwargs)
        if lgrpo_logprobs is not None:
            groups = lgrpo_logprobs["groups"]
            hidden = completion_states(self, groups)[:, :-1]
            weight, dtype = head(self)
            with torch.autocast(weight.device.type, enabled=False):
                logp = head_logprobs(hidden.to(weight.device, dtype), weight.to(dtype),
                                     groups.completion_ids.to(weight.device), lgrpo_logprobs["temperature"])
            return logp.masked_fill(~groups.completion_mask.to(logp.device), 0.0)
        request = dict(lgrpo_loss)
        prompt_length = request.pop("prompt_length")
        groups = request.pop("groups", None)
        if groups is not None:  # column c of [:, :-1] predicts completion token c, as below
            hidden = completion_states(self, groups)[:, :-1]
        else:
            kwargs["use_cache"] = False
            hidden = self.base_model(*args, **kwargs).last_hidden_state[:, prompt_length - 1: -1]
        weight, dtype = head(self)
        with torch.autocast(weight.device.type, enabled=False):
            out = linear_grpo_loss(hidden.to(weight.device, dtype), weight.to(dtype), **request)
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}

    model.forward = types.MethodType(forward, model)


def _shared_prefix_unsupported(model) -> str | None:
    """Why the shared-prefix forward cannot stand in for ``model``'s, or None."""
    try:
        prepare_model(model)  # raises for a vision-language model of a family lgrpo does not know
        install_shared_prefix(model)  # raises for eager attention: no registry entry to hook
    except ValueError as e:
        return str(e)
    text = model.config.get_text_config()
    if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        return "sliding-window layers (the shared-prefix attention computes full attention only)"
    # Positions: the shared forward numbers a row from its first real token, TRL's over the padded row;
    # only relative (rotary) positions make the two the same.
    if getattr(text, "rope_parameters", None) is None and getattr(text, "rope_theta", None) is None:
        return f"{type(model).__name__} has no rotary position embedding (absolute positions would shift)"
    return None


def group_rows(inputs: dict) -> GroupBatch:
    """TRL's micro-batch as a :class:`GroupBatch`: each distinct prompt once, ``group[b]`` row ``b``'s.

    Two rows share a prompt when their ``prompt_ids`` and ``prompt_mask`` rows are equal and, for a VLM,
    their images are (``image_grid_thw`` rows and ``pixel_values`` slices, ``num_images`` per row): the
    same text over other pixels is another prompt. Rows of a prompt may be anywhere in the batch.
    """
    ids, mask = inputs["prompt_ids"], inputs["prompt_mask"]
    rows, width = ids.shape
    types = inputs.get("mm_token_type_ids")
    prompts = PromptBatch(ids, mask, mm_token_type_ids=None if types is None else types[:, :width])
    thw = inputs.get("image_grid_thw")
    if thw is not None:
        per_row = inputs.get("num_images")
        per_row = None if per_row is None else torch.as_tensor(per_row, dtype=torch.long)
        prompts = PromptBatch(ids, mask, prompts.mm_token_type_ids, inputs["pixel_values"], thw, per_row)

    def key(b):  # what the backbone reads of row b's prompt
        parts = [ids[b], mask[b]] + ([] if types is None else [prompts.mm_token_type_ids[b]])
        if thw is not None:
            one = prompts.select([b])
            parts += [one.image_grid_thw, one.pixel_values]
        return parts

    group, leaders = group_identical([key(b) for b in range(rows)])
    group = group.to(ids.device)
    return GroupBatch(prompts.select(leaders), inputs["completion_ids"], inputs["completion_mask"], group)


class ListenerReward:
    """The listener's confidence in the human-preferred image (SPEC §1 ``r_list``) as a TRL reward function.

    ``reward_funcs=[ListenerReward("/models/Qwen2.5-VL-3B-Instruct"), ...]``: for each completion, the
    reasoning inside the think block (answer removed) goes to the frozen listener with the pair's caption
    and two images; the reward is its probability of the preferred image, 0 without a think block.

    - ``listener``: a model folder (or ``"tiny"``), a loaded Qwen2.5-VL model (then ``batcher`` is needed:
      a ``VLBatcher`` or the folder to build one from), or a ready ``lgrpo.listener.Listener``.
    - Dataset columns (TRL hands every column to reward functions): ``images_column`` holds each row's two
      images (PIL or file paths), ``preferred_column`` 1 or 2; the caption is ``caption_column`` when given,
      else TRL's prompt (the text of its last user turn when conversational).
    """

    def __init__(self, listener, batcher=None, *, images_column: str = "images", preferred_column: str = "preferred",
                 caption_column: str | None = None, fmt=None, micro_batch_size: int | None = None,
                 temperature: float = 1.0, device=None, dtype=None, name: str = "listener"):
        from lgrpo.batching import VLBatcher
        from lgrpo.listener import Listener
        from lgrpo.model import load_listener
        from lgrpo.prompts import DEFAULT_FORMAT

        self.fmt = fmt or DEFAULT_FORMAT
        if isinstance(listener, Listener):
            if batcher is not None:
                raise ValueError("batcher: a Listener brings its own; pass one or the other")
            self.listener = listener
        else:
            if isinstance(listener, (str, os.PathLike)):
                batcher = listener if batcher is None else batcher
                listener = load_listener(listener, device=device, dtype=dtype)
            elif batcher is None:
                raise ValueError("batcher: a loaded listener model needs the VLBatcher (or the model folder) "
                                 "that builds its inputs")
            if isinstance(batcher, (str, os.PathLike)):
                batcher = VLBatcher.from_pretrained(batcher, self.fmt)
            self.listener = Listener(listener, batcher, micro_batch_size=micro_batch_size, temperature=temperature)
        self.images_column, self.preferred_column, self.caption_column = images_column, preferred_column, caption_column
        self.__name__ = name  # TRL logs rewards/<name>/mean

    def __call__(self, prompts, completions, **columns) -> list[float]:
        from lgrpo.prompts import parse_completion

        for column in (self.images_column, self.preferred_column, self.caption_column):
            if column is not None and column not in columns:
                raise ValueError(f"ListenerReward needs the dataset column {column!r}; the batch has "
                                 f"{sorted(k for k in columns if not k.startswith(('trainer_', 'log_')))}")
        captions = columns[self.caption_column] if self.caption_column else [_text(p) for p in prompts]
        images = [[_image(x) for x in row] for row in columns[self.images_column]]
        preferred = [int(p) for p in columns[self.preferred_column]]
        if any(p not in (1, 2) for p in preferred):
            raise ValueError(f"column {self.preferred_column!r} must hold 1 or 2, got {sorted(set(preferred))}")
        reasonings = [parse_completion(_text(c), self.fmt).reasoning for c in completions]
        scores = self.listener.score(captions, images, reasonings)
        return [float(scores.probs[b, p - 1]) if bool(scores.scored[b]) else 0.0 for b, p in enumerate(preferred)]


def _text(message) -> str:
    """A plain string, or the text of the last turn of a conversation (TRL's conversational format)."""
    if isinstance(message, str):
        return message
    content = message[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _image(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as img:
            return img.convert("RGB")
    raise ValueError(f"images must be PIL images or file paths, got {type(item).__name__}")


__all__ = ["LGRPOTrainer", "ListenerReward", "add_hidden_state_loss", "group_rows", "unsupported_settings"]
