"""The listener reward with the tiny model on CPU: equal to a slow full-logits computation, the same in a
left-padded batch as one by one, and the lm_head run at the answer position only."""

import pytest
import torch

from lgrpo.listener import Listener
from lgrpo.model import load_listener
from lgrpo.prompts import choice_token_ids, parse_completion, render_listener_prompt
from lgrpo.rewards import compute_rewards
from lgrpo.synthetic import SyntheticTask, reference_reasoning
from tests.toy_task import TINY_FAMILIES, sharpened


@pytest.fixture(scope="module")
def listener_model():
    return sharpened(load_listener("tiny", seed=3), 8.0)


@pytest.fixture(scope="module")
def rollout():
    """Five completions over three pairs with images of different sizes; one has no think block."""
    task = SyntheticTask(seed=0)
    exs = [task.example("train", i) for i in range(3)]
    images = [list(e.images) for e in exs]
    images[1][1] = images[1][1].resize((84, 56))
    images[2][0] = images[2][0].resize((112, 112))
    rows = [0, 0, 1, 2, 2]
    texts = [
        f"<think>{reference_reasoning(exs[0])}</think><answer>{exs[0].preferred}</answer>",
        "<think>the second one looks better</think><answer>2</answer>",
        f"<think>{reference_reasoning(exs[1])}</think><answer>{exs[1].preferred}</answer> trailing",
        "<answer>1</answer>",
        "<think>hmm, image 1 is a circle and image 2 is not sure</think><answer>1</answer>",
    ]
    return {"prompts": [exs[r].prompt for r in rows], "images": [images[r] for r in rows],
            "preferred": [exs[r].preferred for r in rows], "parsed": [parse_completion(t) for t in texts],
            "pairs": ([e.prompt for e in exs], images), "group": torch.tensor(rows)}


def _slow_probs(model, batcher, prompt, images, reasoning, temperature=1.0):
    """One row alone, no padding, logits at every position; softmax over the two choices at the last one."""
    text = render_listener_prompt(batcher.tokenizer, prompt, reasoning, batcher.fmt)
    batch = batcher.encode([text], [images])
    assert batch.attention_mask.all()
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits[0].double()
    assert logits.shape[0] == batch.length
    ids = list(choice_token_ids(batcher.tokenizer, batcher.fmt))
    return (logits[-1, ids] / temperature).softmax(-1)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_listener_equals_slow_full_logits(listener_model, batcher, rollout, family):
    if family != "tiny":
        from lgrpo.batching import VLBatcher

        listener_model, batcher = sharpened(load_listener(family, seed=3), 8.0), VLBatcher.from_pretrained(family)
    listener = Listener(listener_model, batcher)
    reasonings = [p.reasoning for p in rollout["parsed"]]
    scores = listener.score(rollout["prompts"], rollout["images"], reasonings)
    assert scores.scored.tolist() == [True, True, True, False, True]
    assert (scores.probs[3] == 0).all()
    spread = []
    for b, reasoning in enumerate(reasonings):
        if reasoning is None:
            continue
        slow = _slow_probs(listener_model, batcher, rollout["prompts"][b], rollout["images"][b], reasoning)
        torch.testing.assert_close(scores.probs[b].double(), slow, rtol=0, atol=2e-5)
        spread.append(slow[0].item())
    assert max(spread) - min(spread) > 1e-2  # rows differ: the comparison above can tell them apart
    torch.testing.assert_close(scores.probs.sum(-1)[scores.scored], torch.ones(4))
    assert (scores.logp[scores.scored] <= 0).all() and (scores.logp[scores.scored].exp().sum(-1) <= 1).all()


def test_left_padded_batch_equals_one_by_one(listener_model, batcher, rollout):
    reasonings = [p.reasoning for p in rollout["parsed"]]
    batched = Listener(listener_model, batcher).score(rollout["prompts"], rollout["images"], reasonings)
    single = Listener(listener_model, batcher, micro_batch_size=1).score(
        rollout["prompts"], rollout["images"], reasonings)
    paired = Listener(listener_model, batcher, micro_batch_size=2).score(
        rollout["prompts"], rollout["images"], reasonings)
    for other in (single, paired):
        torch.testing.assert_close(batched.probs, other.probs, rtol=0, atol=2e-5)
        torch.testing.assert_close(batched.logp, other.logp, rtol=0, atol=1e-4)
        assert torch.equal(batched.scored, other.scored)


def test_lm_head_runs_at_the_answer_position_only(listener_model, batcher, rollout):
    seen = []
    record = lambda module, args, out: seen.append(tuple(args[0].shape))
    hook = listener_model.lm_head.register_forward_hook(record)
    try:
        Listener(listener_model, batcher, micro_batch_size=2).score(
            rollout["prompts"], rollout["images"], [p.reasoning for p in rollout["parsed"]])
    finally:
        hook.remove()
    # Four rows have reasoning: micro-batches of 2, 2; one position each. The row without a think block
    # is never run.
    assert seen == [(2, listener_model.config.text_config.hidden_size)] * 2


def test_temperature_scales_the_choice_logits(listener_model, batcher, rollout):
    b = 0
    reasoning = rollout["parsed"][b].reasoning
    scores = Listener(listener_model, batcher, temperature=2.0).score(
        rollout["prompts"][:1], rollout["images"][:1], [reasoning])
    slow = _slow_probs(listener_model, batcher, rollout["prompts"][b], rollout["images"][b], reasoning, 2.0)
    torch.testing.assert_close(scores.probs[0].double(), slow, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="temperature"):
        Listener(listener_model, batcher, temperature=0.0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        Listener(listener_model, batcher, micro_batch_size=0)


def test_mismatched_inputs_are_rejected(listener_model, batcher, rollout):
    with pytest.raises(ValueError, match="reasonings"):
        Listener(listener_model, batcher).score(rollout["prompts"], rollout["images"], ["x"])


def test_rewards_from_a_rollout(listener_model, batcher, rollout):
    parsed = rollout["parsed"]
    scores = Listener(listener_model, batcher).score(rollout["prompts"], rollout["images"],
                                                     [p.reasoning for p in parsed])
    out = compute_rewards(parsed, rollout["preferred"], scores)
    for b, p in enumerate(parsed):
        pref = rollout["preferred"][b]
        r_list = scores.probs[b, pref - 1].item() if p.reasoning is not None else 0.0
        expected = 1.0 * p.format_ok + 0.5 * (p.answer == pref) + 0.5 * r_list
        assert out.total[b].item() == pytest.approx(expected, abs=1e-6)
        if p.answer is not None and p.reasoning is not None:
            assert out.contradiction[b].item() == (int(scores.probs[b].argmax()) + 1 != p.answer)
        else:
            assert out.contradiction[b].isnan()
    assert out.format.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_group_prompts_once_equal_the_rendered_texts(listener_model, batcher, rollout, shared_prefix):
    """A rollout's prompts, each once, with completions pointing at them (what the trainer passes): the
    same confidences as each row's rendered listener text, and with the shared prefix the vision tower
    sees each prompt's images once per forward."""
    texts, images = rollout["pairs"]
    prompts = batcher.reasoner_batch(texts, images)
    reasonings = [p.reasoning for p in rollout["parsed"]]
    listener = Listener(listener_model, batcher, shared_prefix=shared_prefix)
    # The prefill, tokenized after the prompt, gives the ids of the whole rendered listener text.
    for b in (0, 4):
        ids, mask = listener.prefill_ids([reasonings[b]], "cpu")
        alone = batcher.listener_batch([rollout["prompts"][b]], [rollout["images"][b]], [reasonings[b]])
        prompt = batcher.reasoner_batch([rollout["prompts"][b]], [rollout["images"][b]])
        assert torch.cat([prompt.input_ids[0], ids[0][mask[0]]]).tolist() == alone.input_ids[0].tolist()
    patches = []
    hook = listener_model.model.visual.register_forward_hook(lambda m, a, o: patches.append(a[0].shape[0]))
    try:
        grouped = listener.score_group(prompts, rollout["group"], reasonings)
    finally:
        hook.remove()
    used = prompts.select([0, 1, 2]).pixel_values.shape[0]  # rows 0, 2, 4 have a think block: all pairs
    assert patches == ([used] if shared_prefix else [sum(
        prompts.select([g]).pixel_values.shape[0] for g in rollout["group"][[0, 1, 2, 4]].tolist())])
    for b, reasoning in enumerate(reasonings):
        if reasoning is None:
            assert not grouped.scored[b]
            continue
        slow = _slow_probs(listener_model, batcher, rollout["prompts"][b], rollout["images"][b], reasoning)
        torch.testing.assert_close(grouped.probs[b].double(), slow, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="group"):
        listener.score_group(prompts, rollout["group"][:2], reasonings)
