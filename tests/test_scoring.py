"""Shared-prefix scoring against plain transformers on prompts repeated G times (CPU, fp32).

The truth in every test is the model's own forward and full logits on each completion's prompt
repeated, built independently of lgrpo.group / lgrpo.scoring (the prompts re-encoded G times, or the
text rows concatenated by hand).
"""

from __future__ import annotations

import pytest
import torch

from lgrpo.group import GroupBatch, PromptBatch
from lgrpo.model import enable_activation_checkpointing, load_model
from lgrpo.positions import text_positions
from lgrpo.scoring import CompletionScorer, completion_logprobs, completion_states
from lgrpo.synthetic import SyntheticTask
from tests.toy_task import TINY_FAMILIES, char_tokenizer, sharpened, tiny_lm

REL = 1e-5
# Gradients sum many more products than log-probs (an embedding row over every position of its token, the
# vision tower over all patches), in another order on each path. Measured on a seed where the two fp32 paths
# differed by 1.14e-5 of the largest embedding gradient: each was itself ~1.4e-5 of it away from the same
# computation in fp64 (shared 2.61e-3, repeated 2.55e-3, scale 188), so 1e-5 between two fp32 paths is
# below their own rounding; over 80 other seeds the largest difference was 8.7e-6. For scale: a completion
# token allowed one future token of its own fails the log-probs by 0.13 of theirs.
REL_GRAD = 3e-5
# The Triton kernels are checked against fp64 in their own tests; here the interpreter would only add time.
pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture(scope="module")
def vlm():
    return sharpened(load_model("tiny", seed=1), 4.0)


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_vlm(request, vlm, batcher):
    """Each family's tiny model (sharpened like ``vlm``) and its batcher."""
    if request.param == "tiny":
        return vlm, batcher
    from lgrpo.batching import VLBatcher

    return sharpened(load_model(request.param, seed=1), 4.0), VLBatcher.from_pretrained(request.param)


def _completions(gen, n, width, vocab, lengths=None, low=30):
    ids = torch.randint(low, vocab, (n, width), generator=gen)  # the tiny VLM's special tokens are < 30
    if lengths is None:
        lengths = torch.randint(1, width + 1, (n,), generator=gen)
        lengths[0] = width  # one row uses the whole width
    mask = torch.arange(width)[None] < torch.as_tensor(lengths)[:, None]
    return ids, mask


def _truth_vlm(model, batcher, texts, images, ids, mask, group_size):
    """Plain transformers: every prompt re-encoded once per completion, full logits, shifted by hand."""
    rows = torch.arange(len(texts)).repeat_interleave(group_size).tolist()
    rep = batcher.reasoner_batch([texts[r] for r in rows], [images[r] for r in rows])
    types = torch.cat([rep.mm_token_type_ids, torch.zeros_like(ids, dtype=torch.int32)], 1)
    logits = model(input_ids=torch.cat([rep.input_ids, ids], 1),
                   attention_mask=torch.cat([rep.attention_mask, mask.long()], 1), mm_token_type_ids=types,
                   pixel_values=rep.pixel_values, image_grid_thw=rep.image_grid_thw).logits
    p = rep.length
    return logits[:, p - 1: -1].log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)


def _grads(model, out, weights):
    model.zero_grad(set_to_none=True)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_close(got, want, what, rel=REL):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def _assert_grads(got, want):
    assert got.keys() == want.keys()
    for name in want:
        _assert_close(got[name], want[name], name, REL_GRAD)


@pytest.mark.parametrize("group_size", [1, 3])
def test_vlm_logprobs_and_gradients_equal_repeated_prompts(family_vlm, pairs, gen, group_size):
    """Images of different sizes, left-padded prompts of different lengths, ragged completions; every
    parameter's gradient (vision tower included, Qwen3-VL's DeepStack mergers too) equal to plain
    transformers on repeated prompts, for each family."""
    vlm, batcher = family_vlm
    texts, images = pairs
    prompts = batcher.reasoner_batch(texts, images)
    assert len(set(prompts.lengths().tolist())) == 3  # left padding differs per row
    ids, mask = _completions(gen, 3 * group_size, 9, 500)
    weights = torch.randn(ids.shape, generator=gen) * mask

    got = completion_logprobs(vlm, prompts, ids, mask, group_size, temperature=1.0)
    want = _truth_vlm(vlm, batcher, texts, images, ids, mask, group_size)
    _assert_close(got[mask], want[mask], "log-probs")
    assert (got[~mask] == 0).all()
    grads, truth = _grads(vlm, got, weights), _grads(vlm, want, weights)
    assert any(n.startswith("model.visual") for n in grads) and any("lm_head" in n for n in grads)
    if hasattr(vlm.model.visual, "deepstack_merger_list"):  # Qwen3-VL: DeepStack's features reach the loss
        assert any("deepstack_merger_list" in n for n in grads)
    _assert_grads(grads, truth)


def test_vision_tower_sees_each_prompts_images_once(family_vlm, pairs, gen):
    vlm, batcher = family_vlm
    texts, images = pairs
    prompts = batcher.reasoner_batch(texts, images)
    seen = []
    hook = vlm.model.visual.register_forward_hook(lambda m, args, kw_out: seen.append(args[0].shape[0]))
    try:
        ids, mask = _completions(gen, 12, 5, 500)
        with torch.no_grad():
            completion_logprobs(vlm, prompts, ids, mask, 4)
            completion_logprobs(vlm, prompts, ids, mask, 4, shared_prefix=False)
    finally:
        hook.remove()
    patches = prompts.pixel_values.shape[0]
    assert seen == [patches, 4 * patches]


def test_text_model_equals_repeated_prompts(gen):
    """The trainer tests' Qwen2 LM: 1-D positions continue from each left-padded prompt."""
    tok = char_tokenizer()
    model = tiny_lm(tok, seed=2)
    enc = tok(["pick 1:", "pick 222 or 1:", "p:"], return_tensors="pt", padding=True)
    prompts = PromptBatch(enc["input_ids"], enc["attention_mask"])
    group_size = 2
    ids, mask = _completions(gen, 6, 7, len(tok), low=2)
    weights = torch.randn(ids.shape, generator=gen) * mask
    got = completion_logprobs(model, prompts, ids, mask, group_size, temperature=0.7)
    rows = torch.arange(3).repeat_interleave(group_size)
    seq = torch.cat([enc["input_ids"][rows], ids], 1)
    attn = torch.cat([enc["attention_mask"][rows], mask.long()], 1)
    logits = model(input_ids=seq, attention_mask=attn, position_ids=text_positions(attn)).logits
    p = enc["input_ids"].shape[1]
    want = (logits[:, p - 1: -1] / 0.7).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    _assert_close(got[mask], want[mask], "log-probs")
    _assert_grads(_grads(model, got, weights), _grads(model, want, weights))


def test_group_split_across_micro_batches(vlm, batcher, pairs, gen):
    """Two micro-batches over 2 prompts x G=3, rows shuffled as a minibatch draws them: both groups are
    split, the completions of a micro-batch interleave their groups, and each micro-batch computes the
    prompts it uses once. Log-probs and accumulated gradients equal plain transformers on the whole batch."""
    texts, images = pairs
    prompts = batcher.reasoner_batch(texts[:2], images[:2])
    ids, mask = _completions(gen, 6, 6, 500)
    batch = GroupBatch.grouped(prompts, ids, mask, 3)
    scorer = CompletionScorer(vlm)
    weights = torch.randn(ids.shape, generator=gen) * mask
    want_logp = _truth_vlm(vlm, batcher, texts[:2], images[:2], ids, mask, 3)
    want = _grads(vlm, want_logp, weights)
    got_logp = torch.zeros_like(want_logp)
    for rows in (torch.tensor([4, 0, 3, 1]), torch.tensor([5, 2])):
        part = batch.select(rows)
        assert len(part.prompts) == 2 and part.group.tolist() == (rows >= 3).long().tolist()
        logp = scorer(part)
        (logp * weights[rows]).sum().backward()
        got_logp[rows] = logp.detach()
    got = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    vlm.zero_grad(set_to_none=True)
    _assert_close(got_logp[mask], want_logp.detach()[mask], "log-probs")
    _assert_grads(got, want)


def test_fused_loss_and_gradient_checkpointing_match(batcher, gen):
    """The update's path: linear_grpo_loss on the shared-prefix hidden states, in training mode with
    gradient checkpointing (transformers turns its KV cache off there; the layout goes through the
    checkpoint's replay), equals the repeated path."""
    model = load_model("tiny", seed=4)
    enable_activation_checkpointing(model)
    model.train()
    task = SyntheticTask(seed=1)
    exs = [task.example("train", i) for i in range(2)]
    prompts = batcher.reasoner_batch([e.prompt for e in exs], [list(e.images) for e in exs])
    ids, mask = _completions(gen, 4, 8, 500)
    batch = GroupBatch.grouped(prompts, ids, mask, 2)
    loss_kw = {"advantages": torch.randn(4, generator=gen), "loss_type": "grpo"}
    results = []
    for shared in (True, False):
        loss = CompletionScorer(model, shared_prefix=shared)(batch, temperature=0.9, loss=loss_kw)[0]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    _assert_close(results[0][0], results[1][0], "loss")
    _assert_grads(results[0][1], results[1][1])


def test_states_after_the_last_token(vlm, batcher, pairs, gen):
    """Column lengths[n] is the state after completion n's last token (the listener reads it there)."""
    texts, images = pairs
    prompts = batcher.reasoner_batch(texts, images)
    ids, mask = _completions(gen, 3, 5, 500, lengths=[5, 2, 0])
    batch = GroupBatch.grouped(prompts, ids, mask, 1)
    with torch.no_grad():
        shared = completion_states(vlm, batch)
        repeated = completion_states(vlm, batch, shared_prefix=False)
    last = batch.lengths
    rows = torch.arange(3)
    _assert_close(shared[rows, last], repeated[rows, last], "last states")


def test_invalid_inputs_raise(batcher, pairs):
    texts, images = pairs
    prompts = batcher.reasoner_batch(texts[:1], images[:1])
    model = load_model("tiny", seed=0)
    ids = torch.ones(2, 3, dtype=torch.long)
    holes = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="completion_mask"):
        completion_logprobs(model, prompts, ids, holes, 2)
    with pytest.raises(ValueError, match="completion_ids"):
        completion_logprobs(model, prompts, ids, holes, 3)
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(model, prompts, ids, holes.bool() | True, 2, temperature=0.0)
    eager = load_model("tiny", seed=0, attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation"):
        completion_logprobs(eager, prompts, ids, torch.ones_like(holes), 2)


def test_benchmark_smoke(run_bench):
    """bench/bench_shared_prefix.py at smoke sizes: every row measured, shared == repeated in value, and
    the shared path computes each prompt once (its token count and its saved activations are smaller).
    On CPU: sdpa forward and backward, flex forward only."""
    result = run_bench("bench_shared_prefix", "shared_prefix")
    rows = result["rows"]
    assert len(rows) == 15 and all(r["ms"] > 0 for r in rows)
    for kind, backends in (("fwd", {None, "sdpa", "flex"}), ("fwd+bwd", {None, "sdpa"})):
        got = [r["extra"]["prefix_attention"] for r in rows if r["extra"]["kind"] == kind]
        assert sorted(got, key=str) == sorted(list(backends) * 3, key=str)
    for r in rows:
        e = r["extra"]
        assert e["max_abs_logp_diff_vs_repeated"] < 1e-4
        prompt_copies = 1 if e["shared"] else e["group_size"]
        assert e["tokens_computed"] > prompt_copies * e["prompt_tokens"]
        if e["kind"] == "fwd+bwd" and e["shared"]:
            assert e["activation_ratio_vs_repeated"] > 1
    assert sorted({round(r["extra"]["ratio"]) for r in rows}) == [1, 4, 10]
