"""The judge: calibrated pair verdicts, position-bias cancelling, anchor / round-robin rankings, the CLI and the
ranking evaluation. Model tests run the tiny model on CPU; "a judge whose preferences are known" is either a
pure stub comparator (ranking schemes) or the tiny model with hooks on its choice logits (the whole pipeline).
"""

import io
import itertools
import json
import math
import random
import sys

import pytest
import torch
from PIL import Image

from lgrpo import judge as J
from lgrpo.judge import Judge, cli, kendall_tau, pairwise_accuracy, rank_with, spearman_rho, verdicts
from lgrpo.prompts import choice_token_ids, render_listener_prompt
from tests.toy_task import TINY_FAMILIES

MAX_NEW = 4  # the untrained tiny model writes noise: a few tokens exercise generate as well as 512 would


@pytest.fixture(scope="module")
def judge():
    return Judge.from_pretrained("tiny", device="cpu", max_new_tokens=MAX_NEW, batch_size=64)


def gray(level: int, size=(56, 56)) -> Image.Image:
    return Image.new("RGB", size, (level, level, level))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


class Counter:
    """Wraps ``judge._generate``: how many generate calls, and how many rows in all."""

    def __init__(self, judge, monkeypatch):
        self.calls, self.rows, self._inner = 0, 0, judge._generate
        monkeypatch.setattr(judge, "_generate", self)

    def __call__(self, prompts, images):
        self.calls += 1
        self.rows += len(prompts)
        return self._inner(prompts, images)


class KnownPreference:
    """Hooks on the tiny model: the first image's choice logit gets ``gain × (brightness₁ − brightness₂) +
    bias`` on top of the model's own (near-uniform) logits. The brighter image is preferred; ``bias`` is a
    pure position bias towards whatever image is shown first."""

    def __init__(self, judge, gain: float, bias: float):
        self.model, self.gain, self.bias = judge.model, gain, bias
        self.ids = list(choice_token_ids(judge.batcher.tokenizer, judge.batcher.fmt))
        self.diff = None

    def _pre(self, module, args, kwargs):
        # The vision tower sees each batch's images once (before the prefill, and in the listener forward):
        # two per row, in row order.
        pv, grid = args[0] if args else kwargs["hidden_states"], kwargs["grid_thw"]
        means = torch.stack([p.float().mean() for p in pv.split(grid.prod(-1).tolist())])
        pairs = means.view(-1, 2)
        self.diff = pairs[:, 0] - pairs[:, 1]

    def _post(self, module, args, out):
        shift = (self.gain * self.diff + self.bias).to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
        out = out.clone()
        out[..., self.ids[0]] += shift[..., 0]
        return out

    def __enter__(self):
        self.handles = [self.model.model.visual.register_forward_pre_hook(self._pre, with_kwargs=True),
                        self.model.lm_head.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _slow_probs(judge, prompt, images, reasoning):
    """One row alone, unpadded, all-position logits: softmax over the choice tokens at the last position."""
    b = judge.batcher
    batch = b.encode([render_listener_prompt(b.tokenizer, prompt, reasoning, b.fmt)], [images])
    with torch.no_grad():
        logits = judge.model(**batch.model_inputs()).logits[0, -1].double()
    return logits[list(choice_token_ids(b.tokenizer, b.fmt))].softmax(-1).tolist()


# ----------------------------------------------------------------------------------------------------
# Pair verdicts
# ----------------------------------------------------------------------------------------------------

def test_compare_reads_the_judges_own_choice_distribution(judge, monkeypatch):
    """Stubbed completions (reasoned, unanswered, unreasoned): each order's probability equals the slow
    listener computation on that order's reasoning, mapped back to the caller's order, then averaged."""
    imgs = [gray(30), gray(200, (84, 56)), gray(120), gray(90, (56, 112))]
    texts = {  # keyed by the first image shown: (a, b) order first, then (b, a)
        id(imgs[0]): "<think>image 1 is darker and image 2 is brighter</think><answer>2</answer>",
        id(imgs[1]): "<think>the first one is brighter</think>",  # reasoned, no answer (cut off)
        id(imgs[2]): "<answer>1</answer>",  # no think block: the unreasoned distribution
        id(imgs[3]): "<think>the second is darker</think><answer>1</answer>",
    }
    first_pil = {}

    def fake_generate(prompts, images):
        return [texts[first_pil[id(row[0])]] for row in images]

    # The judge processes each PIL once; map its processed objects back to the PIL they came from.
    real = judge.batcher.process_images

    def remember(pils):
        out = real(pils)
        for pil, proc in zip(pils, out):
            first_pil[id(proc)] = id(pil)
        return out

    monkeypatch.setattr(judge.batcher, "process_images", remember)
    monkeypatch.setattr(judge, "_generate", fake_generate)
    prompts = ["a dark square", "a bright square"]
    out = judge.compare_many(prompts, [imgs[0], imgs[2]], [imgs[1], imgs[3]])
    c, d = out
    assert c.reasoning == ("image 1 is darker and image 2 is brighter", "the first one is brighter")
    assert c.answers == (2, None)  # order (b, a): no answer written
    assert d.reasoning == (None, "the second is darker") and d.answers == (1, 2)  # (b, a) wrote 1 = image b
    monkeypatch.undo()
    spread = []
    for comp, prompt, (a, b) in zip(out, prompts, [(imgs[0], imgs[1]), (imgs[2], imgs[3])]):
        ab = _slow_probs(judge, prompt, [a, b], comp.reasoning[0] or "")
        ba = _slow_probs(judge, prompt, [b, a], comp.reasoning[1] or "")
        torch.testing.assert_close(torch.tensor(comp.order_probs, dtype=torch.float64),
                                   torch.tensor([ab, ba[::-1]], dtype=torch.float64), rtol=0, atol=2e-5)
        p_a = (ab[0] + ba[1]) / 2
        assert comp.probs == pytest.approx((p_a, 1 - p_a), abs=2e-5)
        assert comp.choice == (1 if comp.probs[0] >= comp.probs[1] else 2)
        spread += [ab[0], ba[0]]
    assert max(spread) - min(spread) > 1e-3  # the rows differ: a mix-up of rows or orders would show


def test_compare_many_is_one_generate_and_equals_pairs_alone(judge, monkeypatch):
    _many_is_one_generate_and_equals_pairs_alone(judge, monkeypatch)


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "tiny"])
def test_the_judge_on_every_family(family, monkeypatch):
    """The other families' tiny models (lgrpo.models) behind the same judge: both orders in one generate,
    each pair as alone, probabilities that sum to one."""
    judge = Judge.from_pretrained(family, device="cpu", max_new_tokens=MAX_NEW, batch_size=64)
    _many_is_one_generate_and_equals_pairs_alone(judge, monkeypatch)


def _many_is_one_generate_and_equals_pairs_alone(judge, monkeypatch):
    count = Counter(judge, monkeypatch)
    imgs = [gray(v) for v in (10, 110, 210)]
    pairs = [(0, 1), (2, 0)]
    many = judge.compare_many(["a gray square"] * 2, [imgs[i] for i, _ in pairs], [imgs[j] for _, j in pairs])
    assert (count.calls, count.rows) == (1, 4)  # 2 pairs x 2 orders, one generate
    for (i, j), c in zip(pairs, many):
        alone = judge.compare("a gray square", imgs[i], imgs[j])
        assert alone.completions == c.completions
        assert alone.probs == pytest.approx(c.probs, abs=2e-5)
        assert sum(c.probs) == pytest.approx(1, abs=1e-6) and len(c.reasoning) == 2


def test_both_orders_cancel_a_position_bias(judge):
    """A pure position bias (+3 logits for whatever is shown first) makes a single-order judge contradict
    itself when the images are swapped; averaged over both orders it picks the same image either way, with
    mirrored probabilities, and that image is the one the unbiased preference favours."""
    dark, bright = gray(100), gray(130)  # a small true preference, smaller than the bias
    with KnownPreference(judge, gain=2.0, bias=3.0) as known:
        one = [judge.compare("p", x, y, both_orders=False) for x, y in ((dark, bright), (bright, dark))]
        both = [judge.compare("p", x, y) for x, y in ((dark, bright), (bright, dark))]
        gap = 2.0 * abs(float(known.diff[0]))
    assert 0 < gap < 3.0
    assert [c.choice for c in one] == [1, 1]  # the first image shown wins both times: position, not content
    assert len(one[0].order_probs) == 1
    assert both[0].choice == 2 and both[1].choice == 1  # the brighter image, whichever position it had
    assert both[0].probs == pytest.approx(both[1].probs[::-1], abs=1e-5)
    # The average of σ(x + b) and σ(x - b) for a small true log-odds x (the model's own logits add ~1e-2).
    expect = (sigmoid(gap + 3.0) + sigmoid(gap - 3.0)) / 2
    assert both[1].probs[0] == pytest.approx(expect, abs=0.03)


def test_position_bias_averaging_is_exact_for_a_stub(judge, monkeypatch):
    """Per-order verdicts from a stub with known log-odds d and bias b: p = (σ(d+b) + σ(d−b)) / 2, and the
    choice is the sign of d for any b."""
    strength = {}

    def stub_rows(prompts, images):
        return [verdicts._Judged("", None, None, (sigmoid(strength[id(x)] - strength[id(y)] + 5.0),
                                          1 - sigmoid(strength[id(x)] - strength[id(y)] + 5.0))) for x, y in images]

    monkeypatch.setattr(judge, "_judge_rows", stub_rows)
    procs = judge.batcher.process_images([gray(0)] * 6)
    for p, s in zip(procs, [-2.0, -0.5, -0.1, 0.1, 0.5, 2.0]):
        strength[id(p)] = s
    for x, y in itertools.permutations(procs, 2):
        d = strength[id(x)] - strength[id(y)]
        c = judge.compare("p", x, y)
        assert c.probs[0] == pytest.approx((sigmoid(d + 5) + sigmoid(d - 5)) / 2, abs=1e-12)
        assert c.choice == (1 if d > 0 else 2)
        assert judge.compare("p", x, y, both_orders=False).choice == 1


# ----------------------------------------------------------------------------------------------------
# Rankings
# ----------------------------------------------------------------------------------------------------

def test_anchor_uses_n_comparisons_and_round_robin_all_pairs():
    for n, probes in itertools.product(range(2, 16), range(1, 6)):
        asked = []
        r = rank_with(n, lambda i, j, asked=asked: asked.append((i, j)) or 0.5, "anchor", probes)
        m = min(n, probes)
        assert r.comparisons == len(asked) == m * (m - 1) // 2 + n - m <= n + probes * (probes - 1) // 2
        assert len({frozenset(p) for p in asked}) == len(asked) and all(i != j for i, j in asked)
        assert {i for p in asked for i in p if r.anchor in p} | {r.anchor} == set(range(n))  # all meet it
        if probes == 3:
            assert r.comparisons == (n if n >= 3 else 1)
        rr = rank_with(n, lambda i, j: 0.5, "round_robin")
        assert rr.comparisons == n * (n - 1) // 2 and rr.anchor is None


def test_rankings_recover_a_bradley_terry_judge(gen):
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    for _ in range(20):
        n = rng.randint(2, 12)
        s = [rng.uniform(-4, 4) for _ in range(n)]
        mean = sum(s) / n
        for method in J.METHODS:
            r = rank_with(n, lambda i, j, s=s: sigmoid(s[i] - s[j]), method)
            assert r.order == sorted(range(n), key=lambda i: -s[i])
            assert r.scores == pytest.approx([x - mean for x in s], abs=1e-6)
    # The anchor is the median probe: a middling image, not an extreme one.
    s = [0.0, 5.0, 1.0, 4.0, 2.0, 3.0, -1.0]  # probes 0, 3, 6 have strengths 0, 4, -1: the median is image 0
    assert rank_with(7, lambda i, j: sigmoid(s[i] - s[j])).anchor == 0


def test_rank_through_the_model_with_known_preferences(judge, monkeypatch):
    """The whole pipeline (batched generate, listener, rank_many's pair bookkeeping) with the tiny model
    hooked to prefer brighter images and biased towards the first position: both methods rank by
    brightness, anchor with n comparisons in two generates, round robin with n(n-1)/2 in one."""
    levels = [140, 20, 230, 80, 185]
    images = [gray(v, (56 + 28 * (k % 2), 56)) for k, v in enumerate(levels)]
    truth = sorted(range(len(levels)), key=lambda k: -levels[k])
    count = Counter(judge, monkeypatch)
    with KnownPreference(judge, gain=3.0, bias=2.0):
        anchor = judge.rank("a bright square", images)
        assert (count.calls, count.rows, anchor.comparisons) == (2, 10, 5)
        rr, two = judge.rank_many(["a bright square"] * 2, [images, images[:2]], method="round_robin")
        assert (count.calls, rr.comparisons, two.comparisons) == (3, 10, 1)
    assert anchor.order == truth and rr.order == truth and two.order == [0, 1]
    assert kendall_tau(anchor.scores, levels) == 1.0


def test_invalid_arguments_name_themselves(judge, tmp_path):
    with pytest.raises(ValueError, match="at least 2 images"):
        judge.rank("p", [gray(1)])
    with pytest.raises(ValueError, match="method"):
        judge.rank("p", [gray(1), gray(2)], method="elo")
    with pytest.raises(ValueError, match="probes"):
        rank_with(3, lambda i, j: 0.5, probes=0)
    with pytest.raises(ValueError, match="images_b"):
        judge.compare_many(["p"], [gray(1)], [])
    with pytest.raises(ValueError, match=r"images_a\[0\] must be"):
        judge.compare("p", 3, gray(1))
    with pytest.raises(ValueError, match=r"images_b\[0\]: cannot read image"):
        judge.compare("p", gray(1), tmp_path / "missing.png")
    with pytest.raises(ValueError, match="batch_size"):
        Judge(judge.model, judge.batcher, batch_size=0)


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------

def test_rank_metrics_against_hand_computed_values(gen):
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert spearman_rho([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert kendall_tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))  # τ-b with a tie
    assert spearman_rho([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert pairwise_accuracy([3, 2, 1], [1, 2, 3]) == 0.0
    assert pairwise_accuracy([1, 1, 2], [1, 2, 3]) == pytest.approx((0.5 + 1 + 1) / 3)
    assert pairwise_accuracy([2, 1, 0], [1, 1, 0]) == 1.0  # the tied true pair does not count
    assert math.isnan(kendall_tau([1, 2], [5, 5])) and math.isnan(pairwise_accuracy([1, 2], [5, 5]))
    # Without ties, Spearman's ρ is 1 - 6 Σ d² / (n (n² - 1)) and τ = (C - D) / C(n, 2).
    x = torch.randperm(9, generator=gen).tolist()
    y = torch.randperm(9, generator=gen).tolist()
    d2 = sum((a - b) ** 2 for a, b in zip(x, y))
    assert spearman_rho(x, y) == pytest.approx(1 - 6 * d2 / (9 * 80))
    signs = [(x[i] - x[j]) * (y[i] - y[j]) > 0 for i in range(9) for j in range(i + 1, 9)]
    assert kendall_tau(x, y) == pytest.approx((2 * sum(signs) - 36) / 36)
    assert pairwise_accuracy(x, y) == pytest.approx(sum(signs) / 36)


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------

def _write_images(folder, levels):
    names = []
    for v in levels:
        name = f"g{v}.png"
        gray(v).save(folder / name)
        names.append(name)
    return names


def test_cli_judges_good_rows_and_reports_bad_ones(tmp_path, capsys):
    names = _write_images(tmp_path, [10, 90, 170, 250])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        json.dumps({"prompt": "a square", "images": names[:2], "id": "pair"}),
        json.dumps({"prompt": "a square", "images": names}),
        json.dumps({"prompt": "a square", "images": [names[0], "nope.png"]}),
        json.dumps({"prompt": "a square", "images": [names[0]]}),
        '{"prompt": "a square", "images": [',
        "",  # blank lines are not rows
        json.dumps({"prompt": "a square", "images": [names[0], "broken.png"]}),
        json.dumps({"images": names[:2]}),
        json.dumps({"prompt": "a square", "images": [str(tmp_path / names[3]), names[2]]}),  # absolute path
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out" / "judged.jsonl"
    rc = J.main(["--model", "tiny", "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
                 "--max-new-tokens", str(MAX_NEW), "--device", "cpu"])
    assert rc == 1  # some rows were bad; every row still has its output line
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["row"] for g in got] == [1, 2, 3, 4, 5, 7, 8, 9]
    pair, ranked, missing, single, bad_json, broken, no_prompt, absolute = got
    assert pair["id"] == "pair" and pair["choice"] in (1, 2) and sum(pair["probs"]) == pytest.approx(1, abs=1e-6)
    assert len(pair["reasoning"]) == 2 and len(pair["answers"]) == 2 and "error" not in pair
    assert sorted(ranked["order"]) == [0, 1, 2, 3] and len(ranked["scores"]) == 4 and ranked["comparisons"] == 4
    assert sum(ranked["scores"]) == pytest.approx(0, abs=1e-9)
    assert absolute["choice"] in (1, 2)
    for g, why in ((missing, "row 3: image 1 not found"), (single, "row 4: needs at least 2 images, got 1"),
                   (bad_json, "row 5: invalid JSON"), (broken, "row 7: image 1 unreadable"),
                   (no_prompt, 'row 8: needs a non-empty "prompt"')):
        assert why in g["error"] and set(g) == {"row", "error"}
    printed = capsys.readouterr()
    assert "row/s" not in printed.out  # stdout is not a terminal: no progress bar
    assert "3 rows judged, 5 bad rows" in printed.err


def test_progress_bar_only_on_a_terminal(monkeypatch):
    class Screen(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    for tty, enabled, drawn in ((True, True, True), (False, True, False), (True, False, False)):
        screen = Screen(tty)
        monkeypatch.setattr(sys, "stdout", screen)
        with cli._progress(3, enabled) as bar:
            bar.update(3)
        assert ("3/3" in screen.getvalue()) == drawn


def test_cli_usage_errors(tmp_path, capsys):
    assert J.main(["--model", "tiny", "--input", str(tmp_path / "none.jsonl"), "--output", "x"]) == 2
    with pytest.raises(SystemExit):
        J.main(["eval-rank", "--model", "tiny", "--data", "x", "--methods", "elo"])
    assert "no such file" in capsys.readouterr().err


def test_rank_evaluation_anchor_against_round_robin(judge, tmp_path, monkeypatch, capsys):
    """ImageReward-style lists: with the known-preference judge every metric is perfect for both methods;
    anchor spends n comparisons per list, round robin n(n-1)/2; bad lists are reported and skipped."""
    levels = [30, 90, 150, 210]
    names = _write_images(tmp_path, levels)
    rank_of = {v: r for r, v in enumerate(sorted(levels, reverse=True), start=1)}  # brightest = rank 1
    lists = [
        {"prompt": "a bright square", "generations": names, "ranking": [rank_of[v] for v in levels]},
        {"prompt": "a bright square", "generations": names[:3][::-1],
         "ranking": [rank_of[v] for v in levels[:3]][::-1]},
        {"prompt": "a bright square", "generations": names[:3], "ranking": [1, 2]},
        {"prompt": "a bright square", "images": [names[0], "gone.png"], "ranking": [1, 2]},
    ]
    data = tmp_path / "ranked.json"
    data.write_text(json.dumps(lists))  # a JSON list, as ImageReward ships it
    monkeypatch.setattr(Judge, "from_pretrained", classmethod(lambda cls, *a, **k: judge))
    with KnownPreference(judge, gain=3.0, bias=2.0):
        assert J.main(["eval-rank", "--model", "tiny", "--data", str(data), "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_lists"] == 2 and len(report["bad"]) == 2
    assert report["bad"][0].startswith("row 3: needs a \"ranking\"")
    assert report["bad"][1].startswith("row 4: image 1 not found")
    anchor, rr = report["methods"]["anchor"], report["methods"]["round_robin"]
    for m in (anchor, rr):
        assert m["pairwise_accuracy"] == m["kendall_tau"] == m["spearman_rho"] == 1.0
    assert (anchor["comparisons"], rr["comparisons"]) == (4 + 3, 6 + 3)
    assert anchor["generations"] == 2 * anchor["comparisons"]
    printed = capsys.readouterr().out
    assert "Kendall tau-b" in printed and "round_robin" in printed and "2 bad rows skipped" in printed



def test_judge_file_contains_each_failure_to_its_row(judge, tmp_path, monkeypatch):
    """Issue 27, case 4: a control token, an over-long prompt, a directory, a symlink loop and a row whose
    judging raises each cost their own row only, with an error that names what is wrong and the row's
    id; the other rows of the same batch are judged and the output file is written."""
    import os

    from lgrpo.judge.cli import judge_file

    names = _write_images(tmp_path, [10, 90])
    (tmp_path / "adir").mkdir()
    os.symlink("loop.png", tmp_path / "loop.png")  # points at itself
    rows = [
        {"prompt": "a <|image_pad|> square", "images": names, "id": "ctl"},
        {"prompt": "a square " * 2500, "images": names, "id": "long"},
        {"prompt": "a square", "images": [names[0], "adir"], "id": "dir"},
        {"prompt": "a square", "images": [names[0], "loop.png"], "id": "loop"},
        {"prompt": "boom", "images": names, "id": "boom"},
        {"prompt": "a square", "images": names, "id": "ok"},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    real = judge._compare_processed

    def fails_on_boom(prompts, *args):
        if "boom" in prompts:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(prompts, *args)

    monkeypatch.setattr(judge, "_compare_processed", fails_on_boom)
    judged, bad = judge_file(judge, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False)
    got = {g["id"]: g for g in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert (judged, bad) == (1, 5) and list(got) == ["ctl", "long", "dir", "loop", "boom", "ok"]
    assert "control token <|image_pad|>" in got["ctl"]["error"]
    assert "over the model's 4096 positions" in got["long"]["error"]
    assert "image 1 is a directory" in got["dir"]["error"]
    assert "image 1 is a symlink loop" in got["loop"]["error"]
    assert "row 5: judging failed: RuntimeError: CUDA out of memory" in got["boom"]["error"]
    assert got["ok"]["choice"] in (1, 2) and "error" not in got["ok"]
