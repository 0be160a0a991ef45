"""One frozen module for the KL reference and the listener when they are the same weights (lgrpo.frozen).

The rule (which configs share, how the shared module is placed), the build (one module: the same
parameter storage behind both roles), the memory plan (one row), and short runs of ``lgrpo.train.main``
with a warm-up (so the copy into the frozen module is used): every metric of a shared run equals the
two-copy run's, and a shared run resumed from its checkpoint equals the uninterrupted one. On 2 ranks,
sharded and replicated: this file's ``__main__`` (the same comparison under torchrun); 2 ranks against one
process on the shared path: tests/test_distributed_vlm.py (its scenarios share, which it checks).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from lgrpo import distributed as D
from lgrpo.config import ConfigError, build_config
from lgrpo.frozen import frozen_layout
from tests.launch import torchrun

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--train.prompts_per_step", "2", "--rollout.group_size", "4", "--rollout.max_new_tokens", "16",
    "--data.synthetic_train_size", "16", "--data.eval", "none", "--reward.listener_batch_size", "2",
    "--loss.micro_batch_size", "4", "--checkpoint.interval", "1", "--checkpoint.export", "false",
    "--run.progress", "false", "--train.device", "cpu", "--sft.steps", "2", "--sft.batch_size", "4",
]
CLOCK = ("time", "tokens_per_s/", "peak_mem_gib")  # when and how long, not what: differ between any two runs


# --- the rule -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("over, mode", [
    ({}, "shared"),  # the default: both copies of the warmed-up policy
    ({"sft": {"steps": 0}}, "shared"),  # both the policy's starting weights
    ({"sft": {"steps": 0}, "model": {"listener": "tiny"}}, "shared"),  # the policy's folder, named
    ({"model": {"reference": "tiny", "listener": "tiny"}}, "shared"),  # one folder, given for both
    ({"model": {"listener": "tiny"}}, "separate"),  # the base model beside a warmed-up copy
    ({"parallel": {"frozen": "separate"}}, "separate"),
    ({"loss": {"beta": 0.0}}, "separate"),  # a listener only
    ({"reward": {"w_listener": 0.0}}, "separate"),  # a reference only
], ids=["warm-up", "start", "named", "both-given", "base-and-warm", "asked", "no-ref", "no-listener"])
def test_which_runs_share(over, mode):
    assert frozen_layout(build_config("tiny", over)).mode == mode


@pytest.mark.parametrize("over, base, loaded", [
    ({}, ("reference", "listener"), ()),  # both the warmed-up (merged) base
    ({"sft": {"steps": 0}, "model": {"listener": "tiny"}}, ("reference", "listener"), ()),  # the start, named
    ({"model": {"listener": "tiny"}}, ("reference",), ("listener",)),  # the start beside a warmed-up base
    ({"sft": {"steps": 0}, "model": {"reference": "tiny"}, "loss": {"beta": 0.0}}, ("listener",), ()),
], ids=["warm-up", "named", "start-beside-warm", "listener-only"])
def test_a_lora_base_serves_every_role_with_its_weights(over, base, loaded):
    """The same rule decides what a LoRA policy's adapters-off base stands for: only a role given other
    weights (here the folder's start beside a warmed-up base) loads a module."""
    pytest.importorskip("peft", reason="LoRA options need the lora extra (peft)")
    cfg = build_config("tiny", {**over, "model": {**over.get("model", {}), "lora_rank": 4}})
    layout = frozen_layout(cfg)
    assert (layout.base_roles, layout.roles) == (base, loaded)
    assert ("adapters off" in layout.describe(cfg, fsdp=False)) == bool(base)
    assert layout.mode == ("shared" if len(base) == 2 else "separate")


def test_the_same_folder_by_another_name_shares_and_another_folder_does_not(tmp_path):
    from lgrpo.model import TINY_DIR

    (tmp_path / "link").symlink_to(TINY_DIR)
    shutil.copytree(TINY_DIR, tmp_path / "copy")
    same = build_config("tiny", {"sft": {"steps": 0}, "model": {"reference": f"{tmp_path}/link/"}})
    assert frozen_layout(same).shared
    other = build_config("tiny", {"sft": {"steps": 0}, "model": {"listener": str(tmp_path / "copy")}})
    layout = frozen_layout(other)
    assert not layout.shared and "other weights" in layout.reason and "copy" in layout.reason


def test_shared_is_refused_where_the_weights_differ():
    with pytest.raises(ConfigError, match="--parallel.frozen shared: .*other weights"):
        frozen_layout(build_config("tiny", {"model": {"listener": "tiny"}, "parallel": {"frozen": "shared"}}))
    with pytest.raises(ConfigError, match="only one frozen model"):
        frozen_layout(build_config("tiny", {"loss": {"beta": 0.0}, "parallel": {"frozen": "shared"}}))
    assert frozen_layout(build_config("tiny", {"parallel": {"frozen": "shared"}})).shared
    with pytest.raises(ConfigError, match="parallel.frozen"):
        build_config("tiny", {"parallel": {"frozen": "one"}})


@pytest.mark.parametrize("ref, lst, fsdp, shared, separate", [
    ("shard", "shard", True, ["shard"], ["shard", "shard"]),
    ("shard", "replicate", True, ["replicate"], ["shard", "replicate"]),  # one replica < n + n/ranks
    ("replicate", "shard", True, ["replicate"], ["replicate", "shard"]),
    ("shard", "shard", False, ["replicate"], ["replicate", "replicate"]),  # no FSDP2: whole everywhere
])
def test_placement(ref, lst, fsdp, shared, separate):
    for mode, want in (("auto", shared), ("separate", separate)):
        cfg = build_config("tiny", {"parallel": {"reference": ref, "listener": lst, "frozen": mode}})
        layout = frozen_layout(cfg)
        assert [how for _, how in layout.copies(cfg, fsdp)] == want
        assert [layout.placement(r, cfg, fsdp) for r in ("reference", "listener")] == (want * 2)[:2]
    cfg = build_config("tiny", {"parallel": {"reference": ref, "listener": lst}})
    line = frozen_layout(cfg).describe(cfg, fsdp)
    assert line.startswith("frozen models: one copy: reference + listener (")
    assert ("differ" in line) == (fsdp and ref != lst)


def test_the_plan_counts_one_copy_when_shared():
    from lgrpo.plan import plan

    over = {"model": {"dtype": "bfloat16"}, "parallel": {"reference": "shard", "listener": "shard"}}
    for ranks, fsdp in ((1, False), (4, True)):
        one = plan(build_config("tiny", over), ranks, fsdp=fsdp, device="cpu")
        two = plan(build_config("tiny", {**over, "parallel": {**over["parallel"], "frozen": "separate"}}),
                   ranks, fsdp=fsdp, device="cpu")
        frozen = [name for name in one.resident if name.startswith("frozen")]
        assert frozen == ["frozen reference + listener"]
        assert [name for name in two.resident if name.startswith("frozen")] == ["frozen reference", "frozen listener"]
        assert one.rows["frozen reference + listener"] == two.rows["frozen reference"] == two.rows["frozen listener"]
        assert two.peak - one.peak == pytest.approx(two.rows["frozen listener"])


# --- the build ------------------------------------------------------------------------------------------


def _storages(model) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def test_build_gives_both_roles_one_module():
    from lgrpo.run import frozen_copies
    from lgrpo.task import build

    cfg = build_config("tiny", {"train": {"steps": 0}})
    _, models, listener = build(cfg, D.Dist())
    assert models.reference is listener.model and models.reference_scorer is listener.scorer
    assert _storages(models.reference) == _storages(listener.model)
    assert not _storages(models.reference) & _storages(models.policy)
    assert frozen_copies(cfg, models, listener) == [listener.model]  # one copy to make after the warm-up

    cfg = build_config("tiny", {"train": {"steps": 0}, "parallel": {"frozen": "separate"}})
    _, models, listener = build(cfg, D.Dist())
    assert models.reference is not listener.model and models.reference_scorer is None
    assert not _storages(models.reference) & _storages(listener.model)
    assert len(frozen_copies(cfg, models, listener)) == 2


# --- short runs -----------------------------------------------------------------------------------------


def steps_of(run_dir: Path) -> dict:
    """Every metric of every step (the last row written for it), the clock's left out."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        rows[m["step"]] = {k: v for k, v in m.items() if not k.startswith(CLOCK)}
    return rows


def frozen_mode(run_dir: Path) -> str:
    return json.loads((run_dir / "config.json").read_text())["parallel"]["frozen"]


@pytest.mark.usefixtures("reference_kernels")
def test_a_shared_run_equals_the_two_copy_run_and_resumes(tmp_path, monkeypatch, capsys):
    import lgrpo.prompts as P
    from lgrpo.train import main
    from tests.test_distributed_vlm import forced_reasoning

    monkeypatch.setattr(P, "parse_completion", forced_reasoning())  # the listener scores from step 1
    runs = tmp_path / "runs"

    def run(name, *extra):
        assert main([*ARGS, "--run.dir", str(runs), "--run.name", name, *extra]) == 0
        return capsys.readouterr().out

    out = run("shared", "--train.steps", "2")
    assert "frozen models: one copy: reference + listener (replicated) (both the warmed-up policy" in out
    assert "frozen models: two copies" in run("separate", "--train.steps", "2", "--parallel.frozen", "separate")
    run("resumed", "--train.steps", "1")
    assert "[resume] reference/listener rebuilt" in run("resumed", "--train.steps", "2",
                                                        "--run.allow_config_change", "true")
    assert [frozen_mode(runs / n) for n in ("shared", "separate", "resumed")] == ["shared", "separate", "shared"]

    shared = steps_of(runs / "shared")
    assert sorted(shared) == [1, 2]
    assert shared[1]["reward/listener"] > 0 and shared[2]["kl"] > 0  # both roles did work
    assert steps_of(runs / "separate") == shared
    assert steps_of(runs / "resumed") == shared


@pytest.mark.slow
@pytest.mark.usefixtures("reference_kernels")
def test_on_two_ranks_sharded_and_replicated_shared_equals_two_copies(tmp_path):
    proc = torchrun(__file__, str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    for placement in SCENARIOS:
        shared, separate = result[placement]["shared"], result[placement]["separate"]
        assert shared["mode"] == "shared" and separate["mode"] == "separate"
        assert sorted(shared["steps"]) == ["1", "2"] and shared["steps"]["1"]["reward/listener"] > 0
        assert shared["steps"] == separate["steps"], placement
    assert result["sharded_once"] is True


# --- on 2 ranks (this file is the rank script) ------------------------------------------------------------

# Placements of (reference, listener): both sharded (one sharded module), and mixed (one replica).
SCENARIOS = {"shard": ["--parallel.reference", "shard", "--parallel.listener", "shard"],
             "mixed": ["--parallel.reference", "shard", "--parallel.listener", "replicate"]}


def rank_main(out: Path) -> None:
    import torch.distributed as dist

    import lgrpo.prompts as P
    from lgrpo.task import build
    from lgrpo.train import main
    from tests.test_distributed_vlm import forced_reasoning

    P.parse_completion = forced_reasoning()
    close, D.close = D.close, lambda: None  # one process group for every run
    result = {}
    try:
        for placement, args in SCENARIOS.items():
            result[placement] = {}
            for mode in ("shared", "separate"):
                name = f"{placement}-{mode}"
                assert main([*ARGS, *args, "--train.steps", "2", "--parallel.frozen", mode,
                             "--run.dir", str(out), "--run.name", name]) == 0
                result[placement][mode] = {"mode": frozen_mode(out / name),
                                           "steps": {str(k): v for k, v in steps_of(out / name).items()}}
        # Sharded and shared: the module is sharded once, under the listener's scorer, which the KL pass uses.
        cfg = build_config("tiny", {"train": {"steps": 0}, "parallel": {"reference": "shard", "listener": "shard"}})
        _, models, listener = build(cfg, D.init("cpu"))
        result["sharded_once"] = (models.reference is listener.model and D.is_sharded(listener.model)
                                  and models.reference_scorer is listener.scorer)
    finally:
        D.close = close
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps(result))
    D.close()


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]))
