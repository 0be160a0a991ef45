"""TRL 1.16's GRPO update with its own loss beside LGRPOTrainer's fused loss: time and peak memory.

One micro-batch of the policy update, forward + backward through ``_compute_loss`` (what
``GRPOTrainer.training_step`` runs between the rollouts and the optimizer), on the same inputs and the
same random-weight model in both trainers:
  trl GRPOTrainer     TRL's fused log-prob head (chunked lm_head, Triton on CUDA) + its loss in torch
  lgrpo LGRPOTrainer  linear_grpo_loss on the final hidden states (the loss, its gradients, logp, entropy),
                      the backbone on every row's prompt (shared_prefix=False), then on each distinct
                      prompt once (shared_prefix=True, the default); the two alternate on one trainer
Rollouts, rewards and the optimizer are the same code in both and are left out. A second table: the
no-gradient log-prob pass TRL runs for the reference (and old) log-probs on the same rows
(``_get_per_token_logps_and_entropies``, one chunk of 8 rows): TRL's, and LGRPOTrainer's on every row's
prompt and on each distinct prompt once; the log-probs must agree (max difference in the notes). Default: a
Qwen2.5-1.5B-shaped Qwen2 (random weights, bf16, SDPA), 8 completions x (256 prompt + 1024 completion)
tokens, of 2 prompts with 4 completions each, rows interleaved (a micro-batch of TRL's shuffled
generation batch), dapo, beta = 0.04 with TRL's bias-corrected KL, activation checkpointing on (TRL's
default); --model 7b for a Qwen2.5-7B shape, --lengths P C for other prompt/completion lengths. The
loss values must agree (printed in the notes).

Needs ``trl==1.16.0`` (``pip install -e .[trl]``). ``time`` = do_bench median on CUDA (wall clock on
CPU, smoke only); ``extra mem`` = peak allocated above the model, its gradients and the inputs.

    python bench/bench_trl_step.py [--out DIR] [--smoke] [--model 1.5b|7b] [--lengths P C]
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.common` from any working directory

from bench.common import (  # noqa: E402
    GiB,
    Row,
    arg_parser,
    bench_ms,
    environment,
    peak_extra_bytes,
    print_table,
    write_json,
)

SHAPES = {  # Qwen2.5 text-model shapes (hidden, intermediate, layers, heads, kv heads, vocab)
    "smoke": (32, 64, 2, 2, 1, 1000),
    "1.5b": (1536, 8960, 28, 12, 2, 151936),
    "7b": (3584, 18944, 28, 28, 4, 152064),
}


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.config._attn_implementation = "sdpa"
    return model


def make_trainer(cls, model, tokenizer, out_dir: str, *, checkpointing: bool):
    from datasets import Dataset
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=8, num_generations=8, report_to=[],
                      use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), loss_type="dapo",
                      beta=0.0, gradient_checkpointing=False, max_completion_length=1024, save_strategy="no")
    trainer = cls(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                  train_dataset=Dataset.from_dict({"prompt": ["x"] * 8}), processing_class=tokenizer)
    # beta > 0 without building a reference model: its log-probs come with the inputs, as in a real step
    trainer.beta = 0.04
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    if checkpointing:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return trainer


def step_inputs(batch: int, prompt: int, completion: int, vocab: int, device: str, prompts: int = 2) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(1)
    group = torch.arange(batch) % prompts  # row b continues prompt b % prompts: groups interleaved
    near = -math.log(vocab)  # a random-weight model's log-probs are near uniform
    mask = torch.ones(batch, completion, dtype=torch.long)
    for b in range(batch):  # completions of different lengths
        mask[b, completion - (b * completion) // (2 * batch):] = 0
    inputs = dict(prompt_ids=torch.randint(2, vocab, (prompts, prompt), generator=gen)[group],
                  prompt_mask=torch.ones(batch, prompt, dtype=torch.long),
                  completion_ids=torch.randint(2, vocab, (batch, completion), generator=gen), completion_mask=mask,
                  advantages=torch.randn(batch, generator=gen),
                  old_per_token_logps=near + 0.1 * torch.randn(batch, completion, generator=gen),
                  ref_per_token_logps=near + 0.1 * torch.randn(batch, completion, generator=gen),
                  num_items_in_batch=mask.sum())
    return {k: v.to(device) for k, v in inputs.items()}


def measure(name: str, trainer, inputs: dict, smoke: bool) -> tuple[Row, float]:
    model = trainer.model

    def step():
        model.zero_grad(set_to_none=False)  # gradient buffers exist before timing: the same for both
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        return loss

    loss = step().item()
    ms = bench_ms(step, warmup_ms=25 if smoke else 200, rep_ms=100 if smoke else 1000)
    peak = peak_extra_bytes(step)
    return Row(name, ms, extra_gib=peak / GiB if torch.cuda.is_available() else None), loss


def measure_logprobs(name: str, trainer, inputs: dict, smoke: bool) -> tuple[Row, torch.Tensor]:
    """The reference/old log-prob pass as TRL runs it: no_grad, [prompt; completion], the micro-batch's rows
    in one chunk. The policy stands in for the reference model (the same architecture and forward)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    keep = inputs["completion_ids"].shape[1]

    def run():
        with torch.no_grad():
            return trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep, batch_size=len(ids))[0]

    logps = run()
    ms = bench_ms(run, warmup_ms=25 if smoke else 200, rep_ms=100 if smoke else 1000)
    return Row(name, ms), logps


def step_parser(description: str, second: str = "completion"):
    """The RL-step benchmarks' command line: ``--model``, ``--lengths P C`` (``second``: what C counts)."""
    parser = arg_parser(description)
    parser.add_argument("--model", choices=["1.5b", "7b"], default="1.5b")
    parser.add_argument("--lengths", type=int, nargs=2, metavar=("P", second[0].upper()), default=None,
                        help=f"prompt and {second} tokens per row (default 256 1024; smoke 8 16)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment()
    try:
        import trl  # noqa: F401
        from trl import GRPOTrainer

        from lgrpo.integrations.trl import LGRPOTrainer
    except ImportError as exc:
        print(f"bench_trl_step: skipped, trl 1.16.0 is not installed ({exc}); pip install -e .[trl]")
        return {}
    from lgrpo.model import load_tokenizer  # TRL wants a tokenizer (pad/eos ids); no text is generated here

    shape = "smoke" if smoke else args.model
    batch, prompt, completion = (8, 8, 16) if smoke else (8, 256, 1024)
    if args.lengths:
        prompt, completion = args.lengths
    dtype = torch.float32 if smoke else torch.bfloat16
    inputs = step_inputs(batch, prompt, completion, SHAPES[shape][-1], device)
    rows, losses = [], {}
    logprob_rows, logprobs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for cls, label in ((GRPOTrainer, "trl GRPOTrainer (its fused head + loss)"),
                           (LGRPOTrainer, "lgrpo LGRPOTrainer (linear_grpo_loss)")):
            trainer = make_trainer(cls, build_model(shape, device, dtype), load_tokenizer("tiny"), tmp,
                                   checkpointing=not (smoke or args.no_checkpointing))
            if cls is GRPOTrainer:
                row, losses["trl"] = measure(label, trainer, inputs, smoke)
                rows.append(row)
                row, logprobs["trl"] = measure_logprobs("trl GRPOTrainer (its fused head)", trainer, inputs, smoke)
                logprob_rows.append(row)
            else:
                # One trainer, the two forwards alternating: the same model and allocator state, so the
                # ratio is side by side even on a busy CPU; each variant keeps its best round.
                best, best_logprobs = {}, {}
                for _ in range(1 if torch.cuda.is_available() else 3):
                    for shared in (False, True):
                        trainer.shared_prefix = shared
                        variant = "each prompt once" if shared else "every row's prompt"
                        row, losses[f"shared_prefix={shared}"] = measure(f"{label}, {variant}", trainer, inputs, smoke)
                        if shared not in best or row.ms < best[shared].ms:
                            best[shared] = row
                        row, logprobs[f"shared_prefix={shared}"] = measure_logprobs(
                            f"lgrpo LGRPOTrainer, {variant}", trainer, inputs, smoke)
                        if shared not in best_logprobs or row.ms < best_logprobs[shared].ms:
                            best_logprobs[shared] = row
                rows += [best[False], best[True]]
                logprob_rows += [best_logprobs[False], best_logprobs[True]]
            del trainer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    base = rows[0].ms
    for row in rows:
        row.ratio = row.ms / base
    want = losses["trl"]
    for row, key in zip(rows[1:], ("shared_prefix=False", "shared_prefix=True")):
        got = losses[key]
        row.note = f"loss {got:.6g} vs trl {want:.6g} (rel {abs(got - want) / max(abs(want), 1e-12):.1e})"
    rows[0].note = "x floor column: time / trl's"
    rows[2].note += f"; {rows[1].ms / rows[2].ms:.2f}x faster than every row's prompt"
    title = (f"GRPO update micro-batch, fwd+bwd: {shape} Qwen2 shape, {batch} x ({prompt} + {completion}) tokens "
             f"(2 prompts, interleaved), {str(dtype).removeprefix('torch.')}, dapo, beta 0.04")
    print_table(title, rows, env)
    for row, key in zip(logprob_rows, ("trl", "shared_prefix=False", "shared_prefix=True")):
        row.ratio = row.ms / logprob_rows[0].ms
        row.note = f"max |logp - trl's| {(logprobs[key] - logprobs['trl']).abs().max().item():.1e}"
    logprob_rows[2].note += f"; {logprob_rows[1].ms / logprob_rows[2].ms:.2f}x faster than every row's prompt"
    logprob_title = f"reference/old log-prob pass, no_grad: the same {batch} rows, one chunk"
    print_table(logprob_title, logprob_rows, env)
    payload = {"title": title, "env": env, "rows": rows, "losses": losses, "logprob_title": logprob_title,
               "logprob_rows": [dataclasses.asdict(r) for r in logprob_rows],
               "logprob_max_diff": {k: (v - logprobs["trl"]).abs().max().item() for k, v in logprobs.items()}}
    write_json(args.out, "bench_trl_step", payload)
    return payload


if __name__ == "__main__":
    main()
