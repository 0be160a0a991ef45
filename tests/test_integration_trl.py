"""LGRPOTrainer and ListenerReward against TRL 1.16.0 itself (``pip install -e .[trl]``; skipped without it).

- ``train()``: two optimizer steps of ``LGRPOTrainer`` equal two of TRL's own ``GRPOTrainer`` (same seed,
  fp32, CPU) in loss, gradient norm and TRL's loss metrics, for each loss type, with gradient accumulation,
  a second iteration on the same rollouts (ratios away from 1, clipping active), β > 0 with and without
  the bias-corrected KL, δ, asymmetric ε, sequence-level ratios and a temperature.
- ``_compute_loss`` on fixed inputs: the settings a CPU run of ``train()`` cannot reach (vLLM importance
  weights, ``tool_mask``) and the tiny Qwen2.5-VL with images (vision tower gradients included); fp32, the
  Triton kernels through the interpreter.
- two CPU ranks (torchrun, accelerate's DDP over gloo, ``tests/trl_ddp_rank.py``) with unevenly grouped
  micro-batches: TRL's trainer, ``shared_prefix`` off, on, and on with one rank falling back per micro-step
  train to the same weights (identical on both ranks) and losses.
- every setting the kernel cannot honour raises ``ValueError`` naming it.
- ``ListenerReward`` in ``reward_funcs``: TRL's per-completion rewards equal the listener's confidence.

The models are tiny and run single-threaded: on a loaded 2-core machine two threads make each tiny
matmul 10-70x slower than one.
"""

import copy
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
if trl.__version__ != "1.16.0":
    pytest.skip(f"the adapter targets trl 1.16.0, found {trl.__version__}", allow_module_level=True)

from datasets import Dataset  # noqa: E402  (after the importorskip)
from toy_task import TINY_FAMILIES, char_tokenizer, tiny_lm  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from lgrpo.integrations.trl import (  # noqa: E402
    LGRPOTrainer,
    ListenerReward,
    group_rows,
    unsupported_settings,
)

PROMPTS = ["a red circle", "two blue squares", "a green star", "one small triangle"]
# TRL's loss metrics, filled by LGRPOTrainer from the kernel's per-token outputs.
LOSS_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    """The tiny char-level Qwen2 LM saved as a folder (TRL builds the reference model from its path).
    Three end-of-completion ids make completion lengths vary from the first step."""
    path = tmp_path_factory.mktemp("tiny-lm")
    model = tiny_lm(tok, seed=0)
    model.generation_config.eos_token_id = [tok.eos_token_id, *tok.convert_tokens_to_ids([".", ":"])]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def diversity(completions, **_):
    return [len(set(c)) / 10 + 0.1 * c.count("a") for c in completions]


def config(tmp_path, **overrides) -> GRPOConfig:
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
              gradient_accumulation_steps=2, max_completion_length=8, max_steps=2, logging_steps=1,
              learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, save_strategy="no", bf16=False,
              disable_tqdm=True, gradient_checkpointing=False, beta=0.0)
    kw.update(overrides)
    return GRPOConfig(**kw)


def assert_rel(got, want, rtol, what):
    # relative to the value, floored at 1: on-policy grpo losses are 0 by construction (group-centred
    # advantages), and then both sides hold rounding noise of the order of 1e-8
    assert abs(got - want) <= rtol * max(abs(want), 1.0), f"{what}: {got} vs TRL {want}"


# The second step is off-policy: it reuses the first step's rollouts (num_iterations=2), or, for dapo, the
# second half of a generation batch made before the first update (steps_per_generation=4 > accumulation 2,
# which also puts a factor 2/4 into TRL's dapo normaliser). TRL's micro-batches (4 rows drawn from a shuffled
# generation batch of 4 completions per prompt) repeat prompts: the shared-prefix update runs on TRL's own
# batches. dr_grpo with TRL's default activation checkpointing (layers replayed in the backward).
TRAIN_CASES = {
    "grpo": dict(importance_sampling_level="sequence", beta=0.1, delta=1.5, epsilon_high=0.28, num_iterations=2),
    "bnpo": dict(beta=0.1, use_bias_correction_kl=False, temperature=0.7, num_iterations=2),
    "dr_grpo": dict(epsilon=0.1, num_iterations=2, gradient_checkpointing=True),
    "dapo": dict(beta=0.1, epsilon=0.02, epsilon_high=0.05, steps_per_generation=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", list(TRAIN_CASES))
def test_train_matches_trl(tmp_path, model_dir, tok, loss_type):
    options = dict(TRAIN_CASES[loss_type], loss_type=loss_type)
    data = Dataset.from_dict({"prompt": PROMPTS})
    logs, ref_tokens = {}, {}
    for cls in (GRPOTrainer, LGRPOTrainer):
        trainer = cls(model=model_dir, reward_funcs=diversity, args=config(tmp_path / cls.__name__, **options),
                      train_dataset=data, processing_class=tok)
        ref = trainer.ref_model and InputCounter(trainer.ref_model.get_input_embeddings())
        trainer.train()
        logs[cls] = [h for h in trainer.state.log_history if "grad_norm" in h]
        ref_tokens[cls] = ref and ref.count
    want, got = logs[GRPOTrainer], logs[LGRPOTrainer]
    if options.get("beta"):  # the reference pass (and the kl it feeds) ran with each prompt once per chunk
        assert 0 < ref_tokens[LGRPOTrainer] < ref_tokens[GRPOTrainer], ref_tokens
    assert len(want) == len(got) == 2
    assert want[1]["clip_ratio/region_mean"] > 0, "the second step must be off-policy"
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.get("completions/mean_length") == w.get("completions/mean_length"), "same rollouts"
        assert_rel(g["loss"], w["loss"], 1e-5, f"step {step} loss")
        assert_rel(g["grad_norm"], w["grad_norm"], 1e-5, f"step {step} grad_norm")
        for name in LOSS_METRICS:
            if name in w:
                assert_rel(g[name], w[name], 1e-5, f"step {step} {name}")
        assert set(LOSS_METRICS) & set(w) == set(LOSS_METRICS) & set(g)


# ---------------------------------------------------------------------------------------------------
# _compute_loss on fixed inputs
# ---------------------------------------------------------------------------------------------------


def trainer_pair(tmp_path, model, tok, ours=({},), **options):
    """TRL's trainer and ours (one per keyword dict in ``ours``) on identical copies of ``model``, in eval
    mode (normaliser 1)."""
    args = config(tmp_path, **options)
    model.save_pretrained(tmp_path / "model")  # TRL builds the reference model (beta > 0) from this path
    model.config._name_or_path = str(tmp_path / "model")
    data = Dataset.from_dict({"prompt": PROMPTS})
    pair = []
    for cls, kwargs in [(GRPOTrainer, {}), *((LGRPOTrainer, k) for k in ours)]:
        trainer = cls(model=copy.deepcopy(model), reward_funcs=diversity, args=args, train_dataset=data,
                      processing_class=tok, **kwargs)
        trainer.model.eval()
        pair.append(trainer)
    return pair


def loss_inputs(gen, B, P, C, vocab, dtype, *, beta=True, low=2):
    """What TRL's _generate_and_score_completions hands to _compute_loss: left-padded prompts,
    right-padded completions (ids in ``[low, vocab)``), behaviour and reference log-probs near the policy's."""
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    completion_mask = (torch.rand(B, C, generator=gen) < 0.8).long().cummin(dim=1).values
    completion_mask[:, 0] = 1
    inputs = dict(prompt_ids=torch.randint(2, vocab, (B, P), generator=gen), prompt_mask=prompt_mask,
                  completion_ids=torch.randint(low, vocab, (B, C), generator=gen), completion_mask=completion_mask,
                  advantages=torch.randn(B, generator=gen, dtype=dtype),
                  old_per_token_logps=-3.8 + 0.3 * torch.randn(B, C, generator=gen, dtype=dtype),
                  num_items_in_batch=completion_mask.sum() + 5)
    if beta:
        inputs["ref_per_token_logps"] = -3.8 + 0.3 * torch.randn(B, C, generator=gen, dtype=dtype)
    return inputs


def compare_losses(pair, inputs, rtol):
    """Loss, every parameter's gradient and the logged loss metrics of the two trainers."""
    results = []
    for trainer in pair:
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, dict(inputs))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
        results.append((loss.item(), grads, metrics))
    (want, want_grads, want_metrics), (got, got_grads, got_metrics) = results
    assert_rel(got, want, rtol, "loss")
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name, w in want_grads.items():
        torch.testing.assert_close(got_grads[name], w, rtol=rtol, atol=rtol * w.abs().max().item(),
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
    assert got_metrics.keys() == want_metrics.keys()
    for name, w in want_metrics.items():
        assert_rel(got_metrics[name], w, max(rtol, 1e-6), name)
    return want_grads


@pytest.mark.parametrize("case", ["vllm_token", "vllm_sequence", "tool_mask"])
def test_compute_loss_matches_trl(tmp_path, gen, tok, case):
    dtype = torch.float32
    model = tiny_lm(tok, seed=1)
    options = dict(loss_type="dapo", beta=0.05, epsilon_high=0.28)
    if case == "vllm_sequence":
        options.update(loss_type="grpo", importance_sampling_level="sequence", delta=1.4)
    pair = trainer_pair(tmp_path, model, tok, **options)
    inputs = loss_inputs(gen, B=4, P=5, C=6, vocab=len(tok), dtype=dtype)
    if case.startswith("vllm"):
        # what TRL's vLLM path computes: truncated (token) or masked (sequence) sampling ratios, >= 0
        for trainer in pair:
            trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        shape = (4, 6) if case == "vllm_token" else (4, 1)
        ratio = torch.exp(0.4 * torch.randn(shape, generator=gen, dtype=dtype))
        inputs["importance_sampling_ratio"] = ratio.clamp(max=1.3) if case == "vllm_token" else ratio * (ratio < 1.2)
    else:
        inputs["tool_mask"] = (torch.rand(4, 6, generator=gen) < 0.7).long()
    compare_losses(pair, inputs, rtol=1e-5)


def test_vlm_inputs_reach_the_backbone(tmp_path, gen):
    """The tiny Qwen2.5-VL with two images per prompt: same loss and gradients as TRL (vision tower too)."""
    from lgrpo.batching import VLBatcher
    from lgrpo.model import load_policy
    from lgrpo.synthetic import SyntheticTask

    batcher = VLBatcher.from_pretrained("tiny")
    model = load_policy("tiny", dtype=torch.float32, seed=2)
    pair = trainer_pair(tmp_path, model, batcher.tokenizer, loss_type="bnpo", beta=0.05)
    task = SyntheticTask(seed=0)
    examples = [task.example("train", i) for i in range(2)]
    prompts = batcher.reasoner_batch([e.prompt for e in examples], [list(e.images) for e in examples])
    # Completion ids above the tiny VLM's special tokens (< 30): an image token (12) drawn there would be
    # an image without pixels ("image features and image tokens do not match").
    inputs = loss_inputs(gen, B=2, P=prompts.length, C=5, vocab=200, dtype=torch.float32, low=30)
    inputs.update(prompt_ids=prompts.input_ids, prompt_mask=prompts.attention_mask,
                  pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
                  num_images=[2, 2])
    inputs["mm_token_type_ids"] = torch.cat([prompts.mm_token_type_ids,
                                            torch.zeros_like(inputs["completion_ids"])], dim=1)
    grads = compare_losses(pair, inputs, rtol=1e-5)
    vision = [g for n, g in grads.items() if "visual" in n]
    assert vision and any(g.abs().sum() > 0 for g in vision), "the images must reach the loss"


def test_peft_lora_matches_trl(tmp_path, gen, tok):
    """A LoRA policy (TRL's peft_config): the head is added to the base model, as TRL adds its own."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    data = Dataset.from_dict({"prompt": PROMPTS})
    pair = []
    for cls in (GRPOTrainer, LGRPOTrainer):  # TRL seeds the LoRA init: the same adapters in both
        trainer = cls(model=tiny_lm(tok, seed=1), reward_funcs=diversity, args=config(tmp_path, loss_type="bnpo"),
                      train_dataset=data, processing_class=tok, peft_config=lora)
        trainer.model.eval()
        pair.append(trainer)
    inputs = loss_inputs(gen, B=4, P=5, C=6, vocab=len(tok), dtype=torch.float32, beta=False)
    inputs.update(prompt_ids=inputs["prompt_ids"][[0, 1, 0, 1]], prompt_mask=inputs["prompt_mask"][[0, 1, 0, 1]])
    grads = compare_losses(pair, inputs, rtol=1e-5)
    assert grads and all("lora_" in name for name in grads)

    # the log-prob passes: old (adapter on) and TRL's reference for a LoRA policy (adapter off), shared
    old = logprob_passes(pair, inputs, batch_size=None, passes=("old",))
    with pair[0].model.disable_adapter(), pair[1].model.disable_adapter():
        ref = logprob_passes(pair, inputs, batch_size=None, passes=("old",))
    for results in (old, ref):
        assert_logprobs_match(results)
        assert results[1]["old"][2] == int(inputs["prompt_mask"][:2].sum() + inputs["completion_mask"].sum())
    assert not torch.allclose(old[1]["old"][0], ref[1]["old"][0]), "the adapter must matter"


# ---------------------------------------------------------------------------------------------------
# Each prompt once per micro-batch (shared_prefix)
# ---------------------------------------------------------------------------------------------------


class InputCounter:
    """Rows reaching a module (token ids at the embedding, patches at the vision tower), over calls."""

    def __init__(self, module):
        self.count = 0
        module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        self.count += first.numel() if first.dtype == torch.long else first.shape[0]


def compare_counting(trainers, inputs, rtol=1e-5):
    """compare_losses of TRL (first) with each of ours; the tokens each of ours embeds."""
    counters = [InputCounter(t.model.get_input_embeddings()) for t in trainers[1:]]
    for trainer in trainers[1:]:
        compare_losses([trainers[0], trainer], inputs, rtol)
    return [c.count for c in counters]


def text_group_inputs(gen, tok, B, P, C):
    """B = 8 rows of three prompts (left padded 0, 2, 4; mask [3, P]) repeated 3, 3, 2 times, interleaved."""
    group = torch.tensor([0, 1, 2, 0, 2, 1, 0, 1])
    inputs = loss_inputs(gen, B=B, P=P, C=C, vocab=len(tok), dtype=torch.float32)
    pads = torch.tensor([0, 2, 4])
    mask = (torch.arange(P)[None] >= pads[:, None]).long()
    ids = torch.randint(2, len(tok), (3, P), generator=gen).masked_fill(mask == 0, tok.pad_token_id)
    inputs.update(prompt_ids=ids[group], prompt_mask=mask[group])
    return inputs, group, mask


def test_shared_prefix_matches_trl_text(tmp_path, gen, tok):
    """Three prompts (left padded 0, 2, 4) repeated 3, 3, 2 times, rows interleaved, ragged completions:
    the shared-prefix update equals TRL's in loss, gradients and metrics, computing each prompt once;
    shared_prefix=False runs every row's prompt and padding, as before."""
    pair = trainer_pair(tmp_path, tiny_lm(tok, seed=1), tok, ours=({}, dict(shared_prefix=False)),
                        loss_type="grpo", beta=0.05, epsilon_high=0.28)
    assert pair[1].shared_prefix and not pair[2].shared_prefix
    B, P, C = 8, 7, 6
    inputs, group, mask = text_group_inputs(gen, tok, B, P, C)
    assert torch.equal(group_rows(inputs).group, group)

    shared, repeated = compare_counting(pair, inputs)
    assert shared == int(mask.sum() + inputs["completion_mask"].sum()) < repeated == B * (P + C)

    # A completion mask with a hole: TRL's positions count the hole, the flat sequence would not.
    inputs["completion_mask"][0] = torch.tensor([1, 1, 0, 1, 1, 0])
    with pytest.warns(RuntimeWarning, match="not a prefix"):
        assert compare_counting(pair[:2], inputs) == [B * (P + C)]


def vlm_group_inputs(gen, batcher):
    """Six rows of three prompts, interleaved: A, B, C, A, C, B. A and B have the same text and image
    sizes (so the same ids) but B's pixels are inverted; C is another example."""
    from PIL import ImageOps

    from lgrpo.synthetic import SyntheticTask

    task = SyntheticTask(seed=0)
    a, c = (task.example("train", i) for i in range(2))
    prompts = [(a.prompt, list(a.images)), (a.prompt, [ImageOps.invert(im.convert("RGB")) for im in a.images]),
               (c.prompt, list(c.images))]
    group = torch.tensor([0, 1, 2, 0, 2, 1])
    batch = batcher.reasoner_batch([prompts[g][0] for g in group], [prompts[g][1] for g in group])
    inputs = loss_inputs(gen, B=6, P=batch.length, C=5, vocab=200, dtype=torch.float32, low=30)
    inputs.update(prompt_ids=batch.input_ids, prompt_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                  image_grid_thw=batch.image_grid_thw, num_images=[2] * 6)
    inputs["mm_token_type_ids"] = torch.cat([batch.mm_token_type_ids,
                                            torch.zeros_like(inputs["completion_ids"])], dim=1)
    assert torch.equal(batch.input_ids[0], batch.input_ids[1]), "A and B must differ in pixels only"
    return inputs, group


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_shared_prefix_matches_trl_vlm(tmp_path, gen, family):
    """Each family's tiny model, two images per prompt, the same text over other pixels as another prompt:
    equal to TRL (vision tower gradients included), each prompt's patches through the tower once."""
    from lgrpo.batching import VLBatcher
    from lgrpo.model import load_policy

    batcher = VLBatcher.from_pretrained(family)
    pair = trainer_pair(tmp_path, load_policy(family, dtype=torch.float32, seed=2), batcher.tokenizer,
                        loss_type="bnpo", beta=0.05)
    inputs, group = vlm_group_inputs(gen, batcher)
    assert torch.equal(group_rows(inputs).group, group)
    patches = [InputCounter(t.model.model.visual) for t in pair]
    grads = compare_losses(pair, inputs, rtol=1e-5)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "visual" in n), "the images must reach the loss"
    assert patches[1].count * 2 == patches[0].count == int(inputs["image_grid_thw"].prod(-1).sum())

    # Images inside a completion (TRL's tool responses): the flat sequence reads completions as text.
    inputs["mm_token_type_ids"][0, -1] = 1
    with pytest.warns(RuntimeWarning, match="images inside completions"):
        assert pair[1]._shared_batch(inputs) is None


def test_shared_prefix_falls_back_for_eager_attention(tmp_path, gen, tok):
    """eager attention has no registry entry to hook: a warning naming it, then every row's prompt."""
    model = tiny_lm(tok, seed=1)
    model.config._attn_implementation = "eager"
    with pytest.warns(RuntimeWarning, match="'eager'"):
        pair = trainer_pair(tmp_path, model, tok, loss_type="bnpo")
    assert not pair[1].shared_prefix
    inputs = loss_inputs(gen, B=4, P=5, C=6, vocab=len(tok), dtype=torch.float32, beta=False)
    inputs.update(prompt_ids=inputs["prompt_ids"][[0, 0, 1, 1]], prompt_mask=inputs["prompt_mask"][[0, 0, 1, 1]])
    assert compare_counting(pair, inputs) == [4 * (5 + 6)]


# ---------------------------------------------------------------------------------------------------
# The no-gradient passes (old and reference log-probs), each prompt once
# ---------------------------------------------------------------------------------------------------


def logprob_passes(trainers, inputs, batch_size, passes=("ref", "old"), **kwargs):
    """Each trainer's ``_get_per_token_logps_and_entropies`` as TRL calls it (no_grad, ``[prompt;
    completion]``, ``batch_size`` rows per chunk) for the reference model and for the policy (old
    log-probs), with the tokens each pass embeds."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    images = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids")
              if k in inputs}
    results = []
    for trainer in trainers:
        got = {}
        for which in passes:
            model = trainer.ref_model if which == "ref" else trainer.model
            counter = InputCounter(model.get_input_embeddings())
            with torch.no_grad():
                logps, *rest = trainer._get_per_token_logps_and_entropies(
                    model, ids, mask, inputs["completion_ids"].shape[1], batch_size=batch_size, **images, **kwargs)
            got[which] = (logps, rest, counter.count)
        results.append(got)
    return results


def assert_logprobs_match(results, rtol=1e-6):
    """Ours (results[1:]) equal TRL's (results[0]) at every position: log-probs, 0 at padding as TRL's."""
    for got in results[1:]:
        for which, (want, want_rest, _) in results[0].items():
            logps, rest, _ = got[which]
            assert logps.shape == want.shape and logps.dtype == want.dtype
            torch.testing.assert_close(logps, want, rtol=rtol, atol=rtol * want.abs().max().item(),
                                       msg=lambda m, which=which: f"{which} log-probs: {m}")
            assert torch.equal(logps == 0, want == 0), f"{which}: zeros (padding) where TRL has them"
            assert len(rest) == len(want_rest) and all((r is None) == (w is None) for r, w in zip(rest, want_rest))


def test_logprob_passes_match_trl_text(tmp_path, gen, tok):
    """The reference and old-log-prob passes on three left-padded prompts repeated 3, 3, 2 times, rows
    interleaved, in chunks of 3 rows, at a temperature: TRL's numbers (0 at padding), each prompt computed
    once per chunk it reaches (rows taken in prompt order) instead of once per row."""
    pair = trainer_pair(tmp_path, tiny_lm(tok, seed=1), tok, loss_type="grpo", beta=0.05, temperature=0.7)
    assert pair[1].ref_model is not None
    B, P, C = 8, 7, 6
    inputs, group, mask = text_group_inputs(gen, tok, B, P, C)

    results = logprob_passes(pair, inputs, batch_size=3)
    assert_logprobs_match(results)
    # prompt order 0 0 0 | 1 1 1 | 2 2: each chunk holds one prompt
    shared = int(mask.sum() + inputs["completion_mask"].sum())
    assert [r[2] for r in results[1].values()] == [shared] * 2
    assert [r[2] for r in results[0].values()] == [B * (P + C)] * 2

    # entropies asked for (TRL's fused head gives them for the policy only): TRL's own method
    results = logprob_passes(pair, inputs, batch_size=None, passes=("old",), compute_entropy=True)
    assert_logprobs_match(results)
    assert results[1]["old"][2] == B * (P + C)
    torch.testing.assert_close(results[1]["old"][1][0], results[0]["old"][1][0])

    # a completion mask with a hole: the update's rule and warning, TRL's pass
    inputs["completion_mask"][0] = torch.tensor([1, 1, 0, 1, 1, 0])
    with pytest.warns(RuntimeWarning, match="not a prefix"):
        results = logprob_passes(pair, inputs, batch_size=3)
    assert_logprobs_match(results)
    assert [r[2] for r in results[1].values()] == [B * (P + C)] * 2


def test_logprob_passes_match_trl_vlm(tmp_path, gen):
    """The tiny Qwen2.5-VL, two images per prompt, the same text over other pixels as another prompt,
    chunks of 4 of 6 rows: TRL's reference and old log-probs, each prompt's patches through the tower once."""
    from lgrpo.batching import VLBatcher
    from lgrpo.model import load_policy

    batcher = VLBatcher.from_pretrained("tiny")
    pair = trainer_pair(tmp_path, load_policy("tiny", dtype=torch.float32, seed=2), batcher.tokenizer,
                        loss_type="bnpo", beta=0.05)
    inputs, group = vlm_group_inputs(gen, batcher)
    patches = [[InputCounter(m.model.visual) for m in (t.ref_model, t.model)] for t in pair]
    assert_logprobs_match(logprob_passes(pair, inputs, batch_size=4))
    trl_patches = int(inputs["image_grid_thw"].prod(-1).sum())
    assert [c.count for c in patches[0]] == [trl_patches] * 2
    assert [c.count * 2 for c in patches[1]] == [trl_patches] * 2  # chunks A A B B | C C: each prompt once

    # pixel values without a grid (InternVL-style tiles): nothing to group them by prompt
    del inputs["image_grid_thw"]
    with pytest.warns(RuntimeWarning, match="without image_grid_thw"):
        assert pair[1]._shared_batch(inputs) is None


# ---------------------------------------------------------------------------------------------------
# Two ranks: TRL's training loop under torchrun (accelerate's DDP over gloo)
# ---------------------------------------------------------------------------------------------------

STEP_KEYS = ("loss", "grad_norm", "reward", *LOSS_METRICS)


@pytest.mark.slow
def test_ddp_two_ranks(tmp_path, model_dir):
    """Two CPU ranks with uneven work (rank 0's micro-batches hold one prompt, rank 1's two to four;
    tests/trl_ddp_rank.py): TRL's GRPOTrainer, shared_prefix False and True, and a run where one rank
    falls back to every row's prompt on each micro-step while the other shares, all train to the same
    weights, identical on both ranks, with TRL's losses and metrics. A rank-dependent collective or
    parameter set would hang (the launch's timeout fails the test) or fail DDP's reducer."""
    from safetensors.torch import load_file
    from trl_ddp_rank import RUNS

    from tests.launch import torchrun

    proc = torchrun(Path(__file__).with_name("trl_ddp_rank.py"), str(tmp_path), model_dir, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = {(run, r): torch.load(tmp_path / f"{run}.rank{r}.pt") for run in RUNS for r in (0, 1)}

    # the work the ranks did: 2 steps x 2 micro-batches each, grouped differently
    shared = [res["shared", r]["groups"] for r in (0, 1)]
    assert shared[0] == [[0, 0, 0, 0]] * 4, "rank 0: one prompt per micro-batch"
    assert all(g is not None and 2 <= len(set(g)) <= 4 for g in shared[1]), f"rank 1: {shared[1]}"
    assert res["repeated", 0]["groups"] == res["repeated", 1]["groups"] == [None] * 4
    mixed = [[g is None for g in res["mixed", r]["groups"]] for r in (0, 1)]
    assert mixed == [[False, True] * 2, [True, False] * 2], "one rank shares while the other falls back"
    # one generation batch of 8 rows per rank: its old and reference log-prob passes, each prompt once
    for run in ("shared", "mixed"):
        assert res[run, 0]["passes"] == [[0] * 8] * 2, f"{run}, rank 0: {res[run, 0]['passes']}"
        assert [len(set(g)) for g in res[run, 1]["passes"]] == [4, 4], f"{run}, rank 1: {res[run, 1]['passes']}"
    assert res["repeated", 0]["passes"] == res["repeated", 1]["passes"] == [None] * 2

    for run in RUNS:  # DDP keeps the ranks in step: the same weights to the bit, the same (global) logs
        (a, b) = (res[run, r] for r in (0, 1))
        assert all(torch.equal(a["weights"][n], w) for n, w in b["weights"].items()), run
        assert [[h[k] for k in STEP_KEYS if k in h] for h in a["logs"]] == \
            [[h[k] for k in STEP_KEYS if k in h] for h in b["logs"]], run

    init = load_file(Path(model_dir) / "model.safetensors")
    want = res["trl", 0]
    assert len(want["logs"]) == 2 and want["logs"][1]["clip_ratio/region_mean"] > 0, "step 2 must be off-policy"
    scale = max((w - init[n]).abs().max().item() for n, w in want["weights"].items())
    assert scale > 1e-2, "the weights must move"
    for run, base in [("repeated", "trl"), ("shared", "trl"), ("mixed", "trl"), ("shared", "repeated")]:
        got, want, pair = res[run, 0], res[base, 0], f"{run} vs {base}"
        # SGD: the weights' change is the gradients' sum; ~3e-7 of the largest change apart here (rounding)
        for n, w in want["weights"].items():
            torch.testing.assert_close(got["weights"][n] - init[n], w - init[n], rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m, n=n, pair=pair: f"{pair}, {n}: {m}")
        for step, (g, w) in enumerate(zip(got["logs"], want["logs"], strict=True)):
            assert g.get("completions/mean_length") == w.get("completions/mean_length"), "same rollouts"
            for k in STEP_KEYS:
                if k in w or k in g:
                    assert_rel(g[k], w[k], 1e-5, f"{pair}, step {step} {k}")


# ---------------------------------------------------------------------------------------------------
# What it cannot honour
# ---------------------------------------------------------------------------------------------------

REJECTED = [
    (dict(loss_type="cispo"), "loss_type='cispo'"),
    (dict(loss_type="sapo"), "loss_type='sapo'"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile=0.2"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold=0.5"),
    (dict(entropy_coef=0.01), "entropy_coef=0.01"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy=True"),
]


@pytest.mark.parametrize("options,named", REJECTED, ids=[r[1] for r in REJECTED])
def test_unsupported_settings_are_named(tmp_path, model_dir, tok, options, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        LGRPOTrainer(model=model_dir, reward_funcs=diversity, args=config(tmp_path, **options),
                     train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok)


def test_unsupported_models_are_named(tmp_path, tok):
    model = tiny_lm(tok)
    assert unsupported_settings(config(tmp_path), model) == []
    model.config.final_logit_softcapping = 30.0
    model.config.logit_scale = 0.5
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    found = "\n".join(unsupported_settings(config(tmp_path), model))
    assert "final_logit_softcapping=30.0" in found and "logit_scale=0.5" in found and "bias" in found
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        LGRPOTrainer(model=model, reward_funcs=diversity, args=config(tmp_path),
                     train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok)


# ---------------------------------------------------------------------------------------------------
# ListenerReward
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs():
    from lgrpo.synthetic import SyntheticTask

    task = SyntheticTask(seed=1)
    return [task.example("train", i) for i in range(2)]


def test_listener_reward_is_the_listeners_confidence(tmp_path, pairs):
    from lgrpo.batching import VLBatcher
    from lgrpo.listener import Listener
    from lgrpo.model import load_listener

    reward = ListenerReward("tiny", images_column="pair", caption_column="caption")
    texts = ["<think>image 1 shows a red circle</think><answer>1</answer>", "<answer>2</answer>",
             "<think>the second</think><answer>2</answer>"]
    rows = [0, 1, 1]
    paths = []
    for i, image in enumerate(pairs[1].images):  # file paths work as well as PIL images
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    columns = dict(caption=[pairs[r].prompt for r in rows], preferred=[pairs[r].preferred for r in rows],
                   pair=[list(pairs[0].images), paths, paths])
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    got = reward(["ignored"] * 3, conversational, **columns)

    listener = Listener(load_listener("tiny"), VLBatcher.from_pretrained("tiny"))
    scores = listener.score(columns["caption"], [list(pairs[r].images) for r in rows],
                            ["image 1 shows a red circle", None, "the second"])
    want = [float(scores.probs[b, columns["preferred"][b] - 1]) for b in range(3)]
    want[1] = 0.0  # no think block
    assert got == pytest.approx(want, abs=1e-6) and 0 < got[0] < 1 and got[1] == 0.0
    with pytest.raises(ValueError, match="dataset column 'pair'"):
        reward(["p"], ["c"], caption=["x"], preferred=[1])
    with pytest.raises(ValueError, match="batcher"):
        ListenerReward(load_listener("tiny"))


@pytest.mark.slow
def test_listener_reward_in_trl_reward_funcs(tmp_path, model_dir, tok, pairs):
    """One LGRPOTrainer step with the listener as a reward: TRL's per-completion listener rewards equal
    ListenerReward's on the logged completions, and some completions carry a think block."""
    ids = tok.convert_tokens_to_ids
    bias = {}  # make the random char-level policy write think tags now and then
    for tag in ("<think>", "</think>"):
        chars = [ids(c) for c in tag]
        bias.update({tuple(chars[:k]): 12.0 for k in range(3, len(chars) + 1)})
    bias.update({(ids("<"),): 3.0, (ids("<"), ids("t")): 10.0, (ids("<"), ids("/")): 9.0})
    data = Dataset.from_dict({"prompt": [p.prompt for p in pairs], "caption": [p.prompt for p in pairs],
                              "pair": [list(p.images) for p in pairs], "preferred": [p.preferred for p in pairs]})
    reward = ListenerReward("tiny", images_column="pair", caption_column="caption")
    args = config(tmp_path, max_steps=1, gradient_accumulation_steps=1, per_device_train_batch_size=8,
                  max_completion_length=48,
                  log_completions=True, num_completions_to_print=0,
                  generation_kwargs={"sequence_bias": bias, "eos_token_id": tok.eos_token_id})
    trainer = LGRPOTrainer(model=model_dir, reward_funcs=[reward, diversity], args=args, train_dataset=data,
                           processing_class=tok)
    trainer.train()
    logged = trainer._logs
    completions, prompts = list(logged["completion"]), list(logged["prompt"])
    got = list(logged["rewards"]["listener"])
    rows = [[p.prompt for p in pairs].index(prompt) for prompt in prompts]
    want = reward(prompts, completions, caption=[pairs[r].prompt for r in rows],
                  pair=[list(pairs[r].images) for r in rows], preferred=[pairs[r].preferred for r in rows])
    assert len(got) == len(want) == 8
    assert got == pytest.approx(want, abs=1e-6)
    assert any(w > 0 for w in want), f"no think block in {completions}"
    assert "rewards/listener/mean" in trainer.state.log_history[0]


def test_benchmark_smoke(run_bench, reference_kernels):
    # the script runs end to end at smoke sizes and both trainers' losses agree (GPU numbers: bench/gpu_check.sh)
    result = run_bench("bench_trl_step", "bench_trl_step")
    losses = result["losses"]
    assert [r["name"].split()[1] for r in result["rows"]] == ["GRPOTrainer", "LGRPOTrainer", "LGRPOTrainer"]
    assert all(r["ms"] > 0 for r in result["rows"])
    for key in ("shared_prefix=False", "shared_prefix=True"):  # on-policy: a loss near 0 (assert_rel's floor)
        assert_rel(losses[key], losses["trl"], 1e-5, key)
    # the reference/old log-prob pass: TRL's, then ours on every row's prompt and each prompt once
    assert [r["name"].split(",")[-1].strip() for r in result["logprob_rows"]] == \
        ["trl GRPOTrainer (its fused head)", "every row's prompt", "each prompt once"]
    assert all(r["ms"] > 0 for r in result["logprob_rows"])
    assert result["logprob_max_diff"]["shared_prefix=False"] == 0.0  # TRL's own method
    assert result["logprob_max_diff"]["shared_prefix=True"] < 1e-5
