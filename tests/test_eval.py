"""Evaluation: the report's numbers from known judgements, and a run on the stand-in model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lgrpo.heldout import evaluate
from lgrpo.report import format_report, summarize, write_report
from tests.toy_task import ToyTask, char_tokenizer, tiny_lm

NAN = float("nan")


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_summary_numbers_by_hand():
    plain = {"accuracy": t(1, 1, 0, 0), "format": t(1, 1, 1, 0), "answer": t(1, 2, 1, 0),
             "contradiction": t(0, 1, 0, NAN), "listener": t(0.9, 0.2, 0.4, 0.0)}
    swapped = {"accuracy": t(1, 0, 0, 1), "format": t(1, 1, 1, 1), "answer": t(2, 2, 2, 1),
               "contradiction": t(0, 0, 0, 0), "listener": t(0, 0, 0, 0)}
    r = summarize(plain, swapped)
    assert r["n"] == 4 and r["accuracy"] == 0.5 and r["format_rate"] == 0.75 and r["answered"] == 0.75
    assert r["contradiction_rate"] == 1 / 3  # undefined row left out
    assert r["accuracy_agree"] == 0.5 and r["n_agree"] == 2  # rows 0 (right) and 2 (wrong)
    assert r["accuracy_disagree"] == 1.0 and r["n_disagree"] == 1
    assert r["accuracy_swapped"] == 0.5 and r["position_bias"] == 0.0
    assert r["consistency"] == 2 / 3  # rows 0 and 2 pick the same image both ways; row 1 always says 2
    assert r["answer_1_rate"] == 0.5
    assert math.isclose(r["listener_confidence"], 0.375)


def test_no_disagreement_gives_nan_not_an_error(tmp_path):
    plain = {"accuracy": t(1, 0), "format": t(1, 1), "answer": t(1, 1), "contradiction": t(0, 0),
             "listener": t(NAN, NAN)}
    r = summarize(plain, None)
    assert math.isnan(r["accuracy_disagree"]) and r["n_disagree"] == 0 and "consistency" not in r
    assert "n/a" in format_report(r)
    saved = json.loads(write_report(r, tmp_path / "r.json").read_text())
    assert saved["accuracy_disagree"] is None and saved["accuracy"] == 0.5


def test_evaluate_on_the_stand_in():
    tok = char_tokenizer()
    task = ToyTask(tok, n_eval=6)
    report = evaluate(tiny_lm(tok), task, max_new_tokens=6, batch_size=4)
    assert report["n"] == 6 and report["format_rate"] == 0.0  # a random model writes no format
    assert report["accuracy"] == 0.0 and report["accuracy_swapped"] == 0.0
    assert len(report["examples"]) == 6 and all(len(e["completion"]) <= 6 for e in report["examples"])
    text = format_report(report)
    assert "accuracy, images swapped" in text and "contradiction rate" in text


@pytest.mark.gpu
def test_gpu_eval_twice_with_a_weight_change_between(monkeypatch):
    """The trainer's before/after evals on one GPU: fp32 weights, bf16 autocast, CUDA graphs captured by
    the first eval and replayed by the second after the weights changed in place (as the optimizer changes
    them). The second eval must see the new weights: its completions differ from the first's and equal an
    eager engine's on the new weights. Graphs captured with autocast's weight cache would read the first
    eval's bf16 copies instead, freed when its autocast block ended; the squatters below take that memory
    so that such a replay reads NaN-filled blocks rather than, by luck of the allocator, fresh copies."""
    import lgrpo.rollout as R  # rollout_for reads engine_for from there
    from lgrpo import distributed as D
    from lgrpo.rollout.engine import RolloutEngine, engine_for
    from lgrpo.rollout.hf import clean_generation_config

    tok = char_tokenizer()
    task = ToyTask(tok, n_eval=8)
    model = tiny_lm(tok, seed=0).cuda()
    clean_generation_config(model, tok)
    new_weights = tiny_lm(tok, seed=1).state_dict()
    kw = dict(max_new_tokens=12, batch_size=4, dist=D.Dist(device=torch.device("cuda")),
              autocast_dtype=torch.bfloat16)

    def completions(report):
        return [e["completion"] for e in report["examples"]]

    def eager():
        with monkeypatch.context() as m:
            m.setattr(R, "engine_for", lambda policy, tokenizer, **k: RolloutEngine(policy, tokenizer,
                                                                                    cuda_graphs=False, **k))
            return completions(evaluate(model, task, **kw))

    before = completions(evaluate(model, task, **kw))
    engine = engine_for(model, tok, max_new_tokens=12, stop="</answer>")  # the one evaluate used
    captured = len(engine._graphs)
    assert captured > 0 and before == eager()
    squatters = [torch.full(p.shape, float("nan"), dtype=torch.bfloat16, device="cuda") for p in model.parameters()]
    with torch.no_grad():
        model.load_state_dict(new_weights)  # copies in place: the same addresses, the graphs stay valid
    after = completions(evaluate(model, task, **kw))
    assert len(engine._graphs) == captured and engine.stats["captures"] == 0  # replayed, not recaptured
    assert after != before and after == eager()
    del squatters
