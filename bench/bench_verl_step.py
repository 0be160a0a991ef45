"""verl 0.9.1's actor update micro-batch: each row's prompt vs each distinct prompt once, time and peak memory.

One micro-batch of verl's packed (no-padding) layout, forward + backward, the same random-weight model:
  verl ppo_loss            the backbone on the packed rows (every row's prompt), full logits, verl's ppo_loss
  plain + fused_ppo_loss   the same backbone forward, the loss by linear_grpo_loss on the hidden states
  alone + fused_ppo_loss   the backbone on each sequence alone (the attention FlashAttention's varlen
                           kernel computes for the packed call on a GPU; SDPA masks all packed rows)
  shared + fused_ppo_loss  shared_prefix_hidden_states (each distinct prompt once), the same fused loss
The packed forward is verl's call: ``model(input_ids [1, total_nnz], position_ids)`` with per-sequence
positions (transformers builds the block-diagonal mask from them). The variants alternate, each keeps its
best round, so ratios are side by side. Default: a Qwen2.5-1.5B-shaped Qwen2 (random weights, bf16, SDPA),
8 rows of 2 prompts (4 samples each, rows interleaved) x (256 prompt + 1024 response) tokens, token-mean,
k3 KL; --model 7b, --lengths P R. The losses must agree (printed in the notes).

Needs verl 0.9.1 (``pip install -e .[verl]`` then ``pip install --no-deps verl==0.9.1``). ``time`` = do_bench
median on CUDA (wall clock on CPU); ``extra mem`` = peak allocated above the model, its gradients and inputs.

    python bench/bench_verl_step.py [--out DIR] [--smoke] [--model 1.5b|7b] [--lengths P R]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.common` from any working directory

from bench.bench_trl_step import SHAPES, build_model, step_parser  # noqa: E402
from bench.common import GiB, Row, bench_ms, environment, peak_extra_bytes, print_table, write_json  # noqa: E402,E501


def micro_batch(rows: int, prompts: int, prompt: int, response: int, vocab: int, device: str):
    """verl's micro-batch: ``rows`` sequences of ``prompts`` prompts (row b continues prompt b % prompts),
    responses of different lengths, log-probs near a random model's (near uniform)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    gen = torch.Generator().manual_seed(1)
    group = torch.arange(rows) % prompts
    response_lens = response - (torch.arange(rows) * response) // (2 * rows)
    attention = torch.cat([torch.ones(rows, prompt, dtype=torch.long),
                           (torch.arange(response)[None] < response_lens[:, None]).long()], 1)
    input_ids = torch.cat([torch.randint(2, vocab, (prompts, prompt), generator=gen)[group],
                           torch.randint(2, vocab, (rows, response), generator=gen)], 1)
    near = -math.log(vocab)
    data = TensorDict(dict(
        input_ids=input_ids, attention_mask=attention, response_mask=attention[:, prompt:],
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0), prompts=input_ids[:, :prompt],
        responses=input_ids[:, prompt:], advantages=torch.randn(rows, 1, generator=gen).expand(rows, response),
        old_log_probs=near + 0.1 * torch.randn(rows, response, generator=gen),
        ref_log_prob=near + 0.1 * torch.randn(rows, response, generator=gen),
    ), batch_size=[rows])
    data = left_right_2_no_padding(data).to(device)
    tu.assign_non_tensor(data, temperature=1.0, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    return data


def main(argv: list[str] | None = None) -> dict:
    args = step_parser(__doc__.splitlines()[0], "response").parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment()
    try:
        from verl.utils.torch_functional import logprobs_from_logits
        from verl.workers.config import FSDPActorConfig, PolicyLossConfig
        from verl.workers.utils.losses import ppo_loss

        from lgrpo.integrations.verl import fused_ppo_loss, shared_prefix_hidden_states
    except ImportError as exc:
        print(f"bench_verl_step: skipped, verl 0.9.1 is not installed ({exc}); pip install -e .[verl] and "
              "pip install --no-deps verl==0.9.1")
        return {}

    shape = "smoke" if smoke else args.model
    rows, prompts = 8, 2
    prompt, response = (8, 16) if smoke else (256, 1024)
    if args.lengths:
        prompt, response = args.lengths
    dtype = torch.float32 if smoke else torch.bfloat16
    model = build_model(shape, device, dtype)
    model.train()
    data = micro_batch(rows, prompts, prompt, response, SHAPES[shape][-1], device)
    config = FSDPActorConfig(strategy="fsdp", rollout_n=rows // prompts, ppo_micro_batch_size_per_gpu=rows,
                             use_kl_loss=True, kl_loss_coef=0.04, kl_loss_type="low_var_kl",
                             loss_agg_mode="token-mean", policy_loss=PolicyLossConfig(loss_mode="vanilla"))
    ids, positions = data["input_ids"], data["position_ids"]
    weight = model.get_output_embeddings().weight

    def plain():  # verl's packed forward: one sequence of every row, positions restarting per row
        return model.model(input_ids=ids.values()[None], position_ids=positions.values()[None],
                           use_cache=False).last_hidden_state[0]

    def alone():  # the same rows, each sequence its own forward: attention within a sequence only, as
        # FlashAttention's varlen kernel computes verl's packed call on a GPU (SDPA on the packed row
        # above masks a total_nnz x total_nnz score matrix instead)
        offsets = ids.offsets().tolist()
        return torch.cat([model.model(input_ids=ids.values()[None, a:z], position_ids=positions.values()[None, a:z],
                                      use_cache=False).last_hidden_state[0] for a, z in zip(offsets, offsets[1:])])

    def verl_step():
        hidden = plain()
        logits = hidden @ weight.T.to(hidden.dtype)
        labels = torch.roll(ids.values(), -1)
        log_probs = torch.nested.nested_tensor_from_jagged(logprobs_from_logits(logits.float(), labels),
                                                           ids.offsets())
        return ppo_loss(config, {"log_probs": log_probs}, data)[0]

    variants = {
        "verl ppo_loss (packed forward, full logits)": verl_step,
        "plain packed forward + fused_ppo_loss": lambda: fused_ppo_loss(
            config, {"hidden_states": plain(), "lm_head_weight": weight}, data)[0],
        "each sequence alone + fused_ppo_loss": lambda: fused_ppo_loss(
            config, {"hidden_states": alone(), "lm_head_weight": weight}, data)[0],
        "shared_prefix_hidden_states + fused_ppo_loss": lambda: fused_ppo_loss(
            config, {"hidden_states": shared_prefix_hidden_states(model, data), "lm_head_weight": weight}, data)[0],
    }

    def step(loss_fn):
        def run():
            model.zero_grad(set_to_none=False)  # gradient buffers exist before timing: the same for all
            loss = loss_fn()
            loss.backward()
            return loss
        return run

    losses = {name: step(fn)().item() for name, fn in variants.items()}
    best: dict[str, float] = {}
    for _ in range(1 if torch.cuda.is_available() else 3):  # alternate: side by side even on a busy CPU
        for name, fn in variants.items():
            ms = bench_ms(step(fn), warmup_ms=25 if smoke else 200, rep_ms=100 if smoke else 1000)
            best[name] = min(best.get(name, ms), ms)
    table = []
    for name, fn in variants.items():
        extra = peak_extra_bytes(step(fn)) / GiB if torch.cuda.is_available() else None
        table.append(Row(name, best[name], extra_gib=extra))
    want = losses[table[0].name]
    for row in table:
        row.ratio = row.ms / table[0].ms
        row.note = f"loss {losses[row.name]:.6g} (rel {abs(losses[row.name] - want) / max(abs(want), 1e-12):.1e})"
    table[3].note += (f"; {table[1].ms / table[3].ms:.2f}x faster than the packed forward, "
                      f"{table[2].ms / table[3].ms:.2f}x than each sequence alone (same loss)")
    tokens = int(ids.offsets()[-1])
    title = (f"verl actor micro-batch, fwd+bwd: {shape} Qwen2 shape, {rows} rows of {prompts} prompts x ({prompt} + "
             f"<= {response}) tokens ({tokens} packed), {str(dtype).removeprefix('torch.')}, token-mean, k3 KL")
    print_table(title, table, env)
    payload = {"title": title, "env": env, "rows": table, "losses": losses, "packed_tokens": tokens}
    write_json(args.out, "bench_verl_step", payload)
    return payload


if __name__ == "__main__":
    main()
