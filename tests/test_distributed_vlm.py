"""The real program on two ranks: ``lgrpo.train.main`` on the tiny models' task under torchrun.

Each scenario runs the same argv once in this process (the oracle, world size 1) and once on 2 CPU
ranks (gloo, FSDP2), in one torchrun launch (this file is the rank script). The two must agree on
every step's losses and rewards and on the held-out report:

- ``a``: the Qwen presets' parallel settings (reference and listener sharded: one shared module,
  lgrpo.frozen), a short warm-up, eval on 5 pairs (3 + 2 over the ranks: uneven), ``listener_batch_size 1``.
- ``b``: reference and listener replicated (one shared replica); on 2 ranks 2 steps, then the same command
  again with 3 steps (a resume); the oracle runs 3 steps straight.
- ``tiny-qwen2-vl``, ``tiny-qwen3-vl``: the other model families (lgrpo.models), sharded, 2 steps, eval.
- ``score``: a sharded listener asked to score 0 rows on rank 0 and 3 on rank 1 (one forward per
  row): without equal forwards this hangs (issue #10), so the launch has a timeout.

Completions get a think block forced on a data-dependent share of rows (``forced_reasoning``), so
the listener does real work from step 1 even without a warm-up, and its row counts differ between
ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest

from tests.launch import torchrun

COMMON = [
    "--train.prompts_per_step", "2", "--rollout.group_size", "4", "--rollout.max_new_tokens", "16",
    "--data.synthetic_train_size", "16", "--data.synthetic_eval_size", "5", "--reward.listener_batch_size", "1",
    "--loss.micro_batch_size", "4", "--checkpoint.interval", "1", "--checkpoint.export", "false",
    "--run.progress", "false", "--train.device", "cpu",
]
SCENARIOS = {
    "a": ["--sft.steps", "12", "--sft.batch_size", "4", "--train.steps", "2",
          "--parallel.reference", "shard", "--parallel.listener", "shard"],
    "b": ["--sft.steps", "0", "--train.steps", "2", "--data.eval", "none",
          "--parallel.reference", "replicate", "--parallel.listener", "replicate"],
}
# The other families (lgrpo.models) through the same sharded program: policy, shared frozen module, eval.
for _family in ("tiny-qwen2-vl", "tiny-qwen3-vl"):
    SCENARIOS[_family] = ["--model.policy", _family, "--sft.steps", "0", "--train.steps", "2",
                          "--parallel.reference", "shard", "--parallel.listener", "shard"]


def forced_reasoning():
    """A parse_completion that also gives a reasoning to some completions without a think block."""
    import lgrpo.prompts as P

    real = P.parse_completion

    def parse(text, fmt=P.DEFAULT_FORMAT):
        parsed = real(text, fmt)
        if parsed.reasoning is None and len(text) % 2 == 0:
            parsed = dataclasses.replace(parsed, reasoning=text[:24] or "empty")
        return parsed

    return parse


def run_all(out: Path) -> dict:
    """Every scenario through lgrpo.train.main (the process group stays up between them)."""
    import lgrpo.distributed as D
    import lgrpo.prompts as P
    from lgrpo.train import main

    P.parse_completion = forced_reasoning()
    close, D.close = D.close, lambda: None  # one process group for all scenarios
    try:
        for name, args in SCENARIOS.items():
            if name == "b" and not D.launched_by_torchrun():
                args = [*args, "--train.steps", "3"]  # the oracle runs b straight through
            assert main([*COMMON, *args, "--run.dir", str(out), "--run.name", name]) == 0
        if D.launched_by_torchrun():  # the same command with more steps resumes b after step 2
            assert main([*COMMON, *SCENARIOS["b"], "--train.steps", "3", "--run.dir", str(out),
                         "--run.name", "b", "--run.allow_config_change", "true"]) == 0
        scored = uneven_listener_scores()
    finally:
        D.close = close
    return {"runs": {name: collect(out / name) for name in SCENARIOS}, "scored": scored,
            "world": int(os.environ.get("WORLD_SIZE", 1))}


def uneven_listener_scores() -> list:
    """Rank r scores 3r rows (one forward each) with a sharded listener; returns its probabilities."""
    import torch

    import lgrpo.distributed as D
    from lgrpo.batching import VLBatcher
    from lgrpo.listener import Listener
    from lgrpo.model import load_listener
    from lgrpo.synthetic import SyntheticTask

    rank = int(os.environ.get("RANK", 0))
    model = load_listener("tiny", device="cpu")
    batcher = VLBatcher.from_pretrained("tiny")
    listener = Listener(model, batcher, micro_batch_size=1)
    if D.launched_by_torchrun():
        D.shard(model, root=listener.scorer)
    examples = [SyntheticTask().example("train", i) for i in range(4)]
    n_rows = 3 * rank if D.launched_by_torchrun() else 3
    reasonings = [f"image {1 + i % 2} shows {ex.prompt}" if i < n_rows else None for i, ex in enumerate(examples)]
    with torch.no_grad():
        scores = listener.score(
            [ex.prompt for ex in examples], [list(ex.images) for ex in examples], reasonings
        )
    return scores.probs[:n_rows].tolist()


def collect(run_dir: Path) -> dict:
    """Per step (the last line written for it) and the held-out reports."""
    steps = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        steps[str(m["step"])] = {k: m.get(k) for k in ("loss", "reward", "reward/listener", "grad_norm", "kl")}
    reports = {p.stem: json.loads(p.read_text()) for p in run_dir.glob("eval_*.json")}
    config = json.loads((run_dir / "config.json").read_text())
    return {"steps": steps, "reports": reports, "attn": config["model"]["attn_implementation"],
            "max_pixels": config["data"]["max_pixels"], "frozen": config["parallel"]["frozen"]}


@pytest.mark.slow
@pytest.mark.usefixtures("reference_kernels")
def test_train_main_on_two_ranks_matches_one_process(tmp_path, monkeypatch):
    proc = torchrun(__file__, str(tmp_path / "two"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["world"] == 2

    import lgrpo.prompts as P

    monkeypatch.setattr(P, "parse_completion", forced_reasoning())
    one = run_all(tmp_path / "one")

    for name in SCENARIOS:
        a, b = one["runs"][name], two["runs"][name]
        assert a["attn"] == b["attn"] == "sdpa" and a["max_pixels"] == b["max_pixels"]
        assert name.startswith("tiny-") or a["max_pixels"] == 12544
        assert a["frozen"] == b["frozen"] == "shared"  # one module for the reference and listener (lgrpo.frozen)
        assert sorted(a["steps"]) == sorted(b["steps"]) == (["1", "2", "3"] if name == "b" else ["1", "2"])
        for step in a["steps"]:
            for key, value in a["steps"][step].items():
                # loss and grad_norm are sums of many fp32 terms reduced in a different order over 2
                # ranks (and thread counts); a GRPO loss can sit near 0, so they get an absolute floor.
                # Rewards come from the same sampled tokens and must match tightly.
                floor = 2e-5 if key in ("loss", "grad_norm", "kl") else 1e-6
                assert b["steps"][step][key] == pytest.approx(value, rel=1e-4, abs=floor), (name, step, key)
        assert sorted(a["reports"]) == sorted(b["reports"])
        for stage, report in a["reports"].items():
            assert report["n"] == 5
            for key in ("accuracy", "accuracy_swapped", "format_rate", "listener_confidence"):
                assert b["reports"][stage][key] == pytest.approx(report[key], rel=1e-5, abs=1e-7), (stage, key)
    # the listener did work on both ranks, and rank 1's uneven rows score as one process scores them
    assert one["runs"]["a"]["steps"]["1"]["reward/listener"] > 0
    assert len(two["scored"]) == 3
    flat = [p for row in one["scored"] for p in row]
    assert [p for row in two["scored"] for p in row] == pytest.approx(flat, rel=1e-5)


if __name__ == "__main__":  # a rank under torchrun
    out = Path(sys.argv[1])
    result = run_all(out)
    import torch.distributed as dist

    import lgrpo.distributed as D

    gathered = [None, None]
    dist.all_gather_object(gathered, result["scored"])
    result["scored"] = gathered[1]  # rank 1 scored 3 rows, rank 0 none
    if int(os.environ.get("RANK", 0)) == 0:
        (out / "result.json").write_text(json.dumps(result))
    D.close()  # frees the group before exit: a sharded model would keep its gloo threads into finalization
