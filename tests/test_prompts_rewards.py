"""Prompts, the completion parser and the reward arithmetic (no model forward here)."""

import pytest
import torch

from lgrpo.listener import ListenerScores
from lgrpo.model import load_tokenizer
from lgrpo.prompts import (
    DEFAULT_FORMAT,
    IMAGE_PLACEHOLDER,
    PromptFormat,
    choice_token_ids,
    parse_completion,
    render_listener_prompt,
    render_reasoner_prompt,
    strip_verdict,
)
from lgrpo.report import summarize
from lgrpo.rewards import RewardWeights, compute_rewards

NAN = float("nan")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


# -- parser ------------------------------------------------------------------------------------------

# (completion, format_ok, answer, reasoning, reason substring)
CASES = [
    ("<think>red circle left</think><answer>1</answer>", True, 1, "red circle left", "ok"),
    ("  <think>\nx\n</think>\n<answer> 2 </answer>\n", True, 2, "x", "ok"),
    ("<answer>1</answer>", False, 1, None, "missing think"),
    ("<think>abc</think>", False, None, "abc", "missing answer"),
    ("<think>abc</think><answer>1</answer><answer>2</answer>", False, None, "abc", "more than one answer"),
    ("<think>a</think><think>b</think><answer>1</answer>", False, 1, "a", "more than one think"),
    ("<think>abc</think><answer>1</answer> because", False, 1, "abc", "text after the answer"),
    ("<think>abc</think><answer>3</answer>", False, None, "abc", "not one of"),
    ("<think>abc</think><answer>one</answer>", False, None, "abc", "not one of"),
    ("<think>   </think><answer>1</answer>", False, 1, None, "empty think"),
    ("<think></think><answer>2</answer>", False, 2, None, "empty think"),
    ("Sure! <think>abc</think><answer>1</answer>", False, 1, "abc", "outside the blocks"),
    ("<think>abc</think> so <answer>2</answer>", False, 2, "abc", "outside the blocks"),
    ("<answer>1</answer><think>abc</think>", False, 1, "abc", "out of order"),
    ("<think>abc", False, None, None, "missing think"),  # truncated at the length limit
    ("", False, None, None, "missing think"),
]


@pytest.mark.parametrize("text,ok,answer,reasoning,reason", CASES)
def test_parse_completion_edge_cases(text, ok, answer, reasoning, reason):
    p = parse_completion(text)
    assert (p.format_ok, p.answer, p.reasoning) == (ok, answer, reasoning)
    assert reason in p.reason


def test_reasoning_never_carries_an_answer():
    # An answer written inside the think block must not reach the listener.
    p = parse_completion("<think>image 1 wins <answer>1</answer> clearly</think><answer>1</answer>")
    assert not p.format_ok and "more than one answer" in p.reason
    assert "<answer>" not in p.reasoning and "1</answer>" not in p.reasoning
    assert p.reasoning.startswith("image 1 wins") and p.reasoning.endswith("clearly")


def test_custom_tags_and_choices():
    fmt = PromptFormat(think_open="[r]", think_close="[/r]", answer_open="[a]", answer_close="[/a]",
                       choices=("A", "B"))
    text = fmt.completion("because", 2)
    assert text == "[r]because[/r][a]B[/a]"
    p = parse_completion(text, fmt)
    assert (p.format_ok, p.answer, p.reasoning) == (True, 2, "because")
    assert parse_completion("<think>x</think><answer>1</answer>", fmt).answer is None


@pytest.mark.parametrize("kwargs", [
    {"question": "no placeholder"},
    {"think_open": ""},
    {"answer_open": "<think>"},
    {"choices": ("1", "1")},
    {"choices": ("1",)},
    {"verdict_pattern": "(unclosed"},
])
def test_prompt_format_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        PromptFormat(**kwargs)


def test_completion_rejects_bad_answer():
    with pytest.raises(ValueError, match="1 or 2"):
        DEFAULT_FORMAT.completion("x", 3)


def test_parse_rejects_non_text():
    with pytest.raises(TypeError):
        parse_completion(None)


# -- rendering ---------------------------------------------------------------------------------------

def test_reasoner_prompt_layout(tokenizer):
    text = render_reasoner_prompt(tokenizer, "a red circle")
    assert text.count(IMAGE_PLACEHOLDER) == 2
    assert text.startswith("<|im_start|>system\n" + DEFAULT_FORMAT.system)
    assert '"a red circle"' in text
    assert text.index("Image 1:") < text.index("Image 2:") < text.index("a red circle")
    assert text.endswith("<|im_start|>assistant\n")


def test_listener_prompt_is_reasoner_prompt_plus_prefill(tokenizer):
    base = render_reasoner_prompt(tokenizer, "a red circle")
    text = render_listener_prompt(tokenizer, "a red circle", "image 2 shows a blue square")
    assert text == base + "<think>image 2 shows a blue square</think><answer>"


# (reasoning, what is left after strip_verdict with the default pattern)
VERDICTS = [
    # the default synthetic template: its verdict goes, the descriptions stay
    ("the prompt asks for a red circle. image 1 shows a red circle. image 2 shows a blue square. "
     "image 1 matches the prompt.",
     "the prompt asks for a red circle. image 1 shows a red circle. image 2 shows a blue square."),
    ("The sky is more detailed. Therefore, image 2 is better.", "The sky is more detailed."),
    ("Colours are off in the first one.\nThe answer is Image 1", "Colours are off in the first one."),
    ("Both are sharp! I prefer picture 2.", "Both are sharp!"),
    ("Image 1 matches the prompt.", ""),                                # all verdict: nothing left
    # no verdict at the end: unchanged (descriptions, a verdict that is not last, no image named)
    ("image 1 shows a red circle. image 2 shows a blue square.",
     "image 1 shows a red circle. image 2 shows a blue square."),
    ("image 1 is better. but image 2 shows more detail.", "image 1 is better. but image 2 shows more detail."),
    ("The first is better.", "The first is better."),
    ("Image 2 has 2.5 more stars than image 1", "Image 2 has 2.5 more stars than image 1"),  # no verdict word
]


@pytest.mark.parametrize("reasoning,left", VERDICTS)
def test_strip_verdict_removes_only_a_trailing_verdict_sentence(reasoning, left):
    assert strip_verdict(reasoning) == left


def test_strip_verdict_pattern_is_configurable_and_checked():
    assert strip_verdict("it is red. VERDICT: 2", r"VERDICT") == "it is red."
    assert strip_verdict("image 1 is better.", r"VERDICT") == "image 1 is better."
    with pytest.raises(TypeError):
        strip_verdict(None)


def test_listener_prompt_strips_the_verdict_only_when_asked(tokenizer):
    reasoning = "image 1 shows a red circle. image 2 shows a blue square. image 1 matches the prompt."
    base = render_reasoner_prompt(tokenizer, "a red circle")
    assert not DEFAULT_FORMAT.listener_strip_verdict  # off by default: the listener reads everything
    assert render_listener_prompt(tokenizer, "a red circle", reasoning) == \
        base + f"<think>{reasoning}</think><answer>"
    fmt = PromptFormat(listener_strip_verdict=True)
    assert render_listener_prompt(tokenizer, "a red circle", reasoning, fmt) == \
        base + "<think>image 1 shows a red circle. image 2 shows a blue square.</think><answer>"
    # the reasoner's own prompt and the parser do not change
    assert render_reasoner_prompt(tokenizer, "a red circle", fmt) == base
    assert parse_completion(f"<think>{reasoning}</think><answer>1</answer>", fmt).reasoning == reasoning


def test_empty_prompt_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="prompt"):
        render_reasoner_prompt(tokenizer, "   ")


def test_template_that_drops_images_is_rejected(tokenizer):
    class TextOnly:
        def apply_chat_template(self, messages, **kwargs):
            return "".join(i.get("text", "") for m in messages for i in m["content"])

    with pytest.raises(ValueError, match="placeholders"):
        render_reasoner_prompt(TextOnly(), "a red circle")


def test_choice_tokens_are_single_digits(tokenizer):
    one, two = choice_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens([one, two]) == ["1", "2"]
    # They are exactly what follows <answer> in an encoded completion.
    ids = tokenizer.encode("</think><answer>2</answer>", add_special_tokens=False)
    assert two in ids and one not in ids


def test_multi_token_choices_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="one extra token"):
        choice_token_ids(tokenizer, PromptFormat(choices=("first", "second image")))


# -- rewards -----------------------------------------------------------------------------------------

def _scores(probs_image1, scored):
    p1 = torch.tensor(probs_image1, dtype=torch.float32)
    probs = torch.stack([p1, 1 - p1], 1)
    scored = torch.tensor(scored)
    probs = torch.where(scored.unsqueeze(1), probs, 0.0)
    return ListenerScores(probs=probs, logp=probs.clamp_min(1e-9).log(), scored=scored)


def test_rewards_formula_and_contradictions():
    texts = [
        "<think>a</think><answer>1</answer>",   # ok, correct, listener agrees (0.9)
        "<think>b</think><answer>2</answer>",   # ok, wrong (pref 1), listener disagrees (0.7 on 1)
        "<answer>1</answer>",                   # no think: r_list 0, no contradiction possible
        "<think>c</think><answer>2</answer>x",  # bad format, right (pref 2), listener on 1: contradiction
        "<think>d</think>",                     # no answer: listener scored, no contradiction
    ]
    parsed = [parse_completion(t) for t in texts]
    preferred = [1, 1, 1, 2, 2]
    scores = _scores([0.9, 0.7, 0.0, 0.6, 0.2], [True, True, False, True, True])
    w = RewardWeights(fmt=1.0, acc=0.5, listener=0.5)
    out = compute_rewards(parsed, preferred, scores, w)

    fmt = [1, 1, 0, 0, 0]
    acc = [1, 0, 1, 1, 0]
    lst = [0.9, 0.7, 0.0, 0.4, 0.8]
    expected = [w.fmt * f + w.acc * a + w.listener * r for f, a, r in zip(fmt, acc, lst)]
    torch.testing.assert_close(out.format, torch.tensor(fmt, dtype=torch.float32))
    torch.testing.assert_close(out.accuracy, torch.tensor(acc, dtype=torch.float32))
    torch.testing.assert_close(out.listener, torch.tensor(lst))
    torch.testing.assert_close(out.total, torch.tensor(expected))
    assert out.answer.tolist() == [1, 2, 1, 2, 0]
    assert out.listener_choice.tolist() == [1, 1, 0, 1, 2]
    torch.testing.assert_close(out.contradiction, torch.tensor([0.0, 1.0, NAN, 1.0, NAN]), equal_nan=True)

    # The report's statistics over these rows (lgrpo.report, the one place they are computed).
    m = summarize({"accuracy": out.accuracy, "format": out.format, "answer": out.answer,
                   "contradiction": out.contradiction, "listener": out.listener}, None)
    assert m["contradiction_rate"] == pytest.approx(2 / 3)  # rows 0, 1, 3 are comparable
    assert m["accuracy_agree"] == pytest.approx(1.0)        # row 0
    assert m["accuracy_disagree"] == pytest.approx(0.5)     # rows 1 (wrong) and 3 (right)
    assert (m["n_agree"], m["n_disagree"]) == (1, 2)
    assert m["answered"] == pytest.approx(4 / 5)
    assert m["listener_confidence"] == pytest.approx(sum(lst) / 5)


def test_rewards_without_listener():
    parsed = [parse_completion("<think>a</think><answer>2</answer>")]
    out = compute_rewards(parsed, torch.tensor([2]), None, RewardWeights(fmt=0.0, acc=2.0, listener=9.0))
    assert out.total.tolist() == [2.0] and out.listener.isnan().all()  # r_list 0 in the total, not measured
    assert out.contradiction.isnan().all()


def test_listener_score_is_ignored_without_reasoning():
    # A caller that scored a row anyway cannot give reward to a completion without a think block.
    parsed = [parse_completion("<answer>1</answer>")]
    out = compute_rewards(parsed, [1], _scores([0.99], [True]))
    assert out.listener.tolist() == [0.0] and out.contradiction.isnan().all()


@pytest.mark.parametrize("preferred,err", [([1, 3], "1 or 2"), ([1], "labels")])
def test_rewards_reject_bad_labels(preferred, err):
    parsed = [parse_completion("<think>a</think><answer>1</answer>")] * 2
    with pytest.raises(ValueError, match=err):
        compute_rewards(parsed, preferred)


def test_rewards_reject_mismatched_listener():
    parsed = [parse_completion("<think>a</think><answer>1</answer>")] * 2
    with pytest.raises(ValueError, match="listener scores"):
        compute_rewards(parsed, [1, 2], _scores([0.5], [True]))


def test_reward_weights_must_be_finite():
    with pytest.raises(ValueError, match="listener"):
        RewardWeights(listener=float("nan"))
