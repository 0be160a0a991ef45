"""Two CPU ranks (torchrun, gloo, FSDP2) give the same per-step losses as one process.

The test launches this very file under ``torchrun --nproc_per_node 2`` (as a user launches
``-m lgrpo.train``); each rank runs the stand-in trainer with the same global batch, the policy
sharded with ``fully_shard`` and the reference sharded too, saves a distributed checkpoint, and
exports the policy (gathered to rank 0); then a second trainer runs a supervised warm-up and GRPO
after it. The single-process run is the oracle; what must equal what is lgrpo.distributed's docstring.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import torchrun

OVERRIDES = {
    "train": {"steps": 3, "prompts_per_step": 4},
    "loss": {"beta": 0.04, "epochs": 2, "minibatches": 2, "micro_batch_size": 3},
    "checkpoint": {"interval": 2},
    "parallel": {"reference": "shard"},
}


# A warm-up before GRPO: 8 rows a step, in micro-batches of 3 (3 + 3 + 2 in one process, 3 + 1 on each of two
# ranks), so the gradients are summed in another order and the weights agree to rounding, not bit for bit.
WARMUP = {"steps": 8, "batch_size": 8, "lr": 1e-2}


def run(out_dir: Path) -> dict:
    """One training run of the stand-in (world size from the environment); returns what rank 0 saw."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lgrpo import distributed as D
    from lgrpo.checkpoint import latest_checkpoint
    from lgrpo.export import export_pretrained
    from tests.test_trainer import make_trainer

    trainer = make_trainer(out_dir, **OVERRIDES)
    history = trainer.fit()
    export_pretrained(trainer.policy, out_dir / "final", trainer.dist)
    # Resume the step-2 checkpoint into a fresh trainer and redo step 3: the same loss again.
    again = make_trainer(out_dir / "again", **OVERRIDES)
    again.checkpointer.load(latest_checkpoint(out_dir / "checkpoints").with_name("step_0000002"))
    assert again.step == 2  # the trainer's own state (step, data position) came back with the weights
    redo = again.train_step()

    warm = make_trainer(out_dir / "warm", sft=WARMUP, **OVERRIDES)
    warmup_losses = warm.warmup()
    weights = get_model_state_dict(warm.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if warm.dist.is_main:
        torch.save(weights, out_dir / "warm_weights.pt")
    after_warmup = warm.fit()
    result = {
        "losses": [m["loss"] for m in history],
        "rewards": [m["reward"] for m in history],
        "grad_norms": [m["grad_norm"] for m in history],
        "redo_step3": redo["loss"],
        "warmup_losses": warmup_losses,
        "after_warmup": {k: [m[k] for m in after_warmup] for k in ("loss", "reward", "grad_norm")},
        "world": trainer.dist.world_size,
        "fsdp": trainer.fsdp,
    }
    D.close()
    return result


@pytest.mark.slow
@pytest.mark.usefixtures("reference_kernels")
def test_two_ranks_match_one_process(tmp_path):
    one = run(tmp_path / "one")
    assert one["world"] == 1 and not one["fsdp"]

    proc = torchrun(__file__, str(tmp_path / "two"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["world"] == 2 and two["fsdp"]

    # identical rollouts (sampling is keyed by the global row): equal up to the order of summation
    assert two["rewards"] == pytest.approx(one["rewards"], rel=1e-6)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-6)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4)
    assert two["redo_step3"] == pytest.approx(two["losses"][2], rel=1e-4, abs=1e-6)

    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    assert a.keys() == b.keys()
    # Adam divides by sqrt(v): a near-zero gradient summed in another order (FSDP's reduce-scatter vs
    # one process) moves a weight by up to ~lr-sized amounts, so weights agree to ~1e-5, not to rounding.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=5e-5, msg=k)

    # With a warm-up (lgrpo.distributed: "what equals what"): the same batches and normalisers, the gradients
    # summed in another order, so the warm-up's losses and weights agree closely, not bit for bit, and the
    # GRPO steps after it sample the same completions (equal rewards). From the second GRPO step on the
    # losses drift apart (~4e-4 relative here, ~4e-2 at the third): AdamW at lr 1e-2 amplifies the weights'
    # differences step after step, so only the first step's loss is held to the no-warm-up run's tolerance.
    assert two["warmup_losses"] == pytest.approx(one["warmup_losses"], rel=1e-5)
    assert one["warmup_losses"][-1] < 0.8 * one["warmup_losses"][0]  # it did learn: the weights moved
    a = torch.load(tmp_path / "one" / "warm_weights.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "warm_weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=5e-5, msg=k)
    after_one, after_two = one["after_warmup"], two["after_warmup"]
    assert after_two["reward"] == pytest.approx(after_one["reward"], rel=1e-6)
    assert after_two["loss"][0] == pytest.approx(after_one["loss"][0], rel=1e-4, abs=1e-6)
    assert after_two["grad_norm"][0] == pytest.approx(after_one["grad_norm"][0], rel=1e-4)


if __name__ == "__main__":  # a rank under torchrun
    out = Path(sys.argv[1])
    result = run(out)
    if int(os.environ.get("RANK", 0)) == 0:
        (out / "result.json").write_text(json.dumps(result))
