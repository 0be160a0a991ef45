"""Two CPU ranks (torchrun, gloo, FSDP2) give the same per-step losses as one process.

The test launches this very file under ``torchrun --nproc_per_node 2`` (as a user launches
``-m lgrpo.train``); each rank runs the stand-in trainer with the same global batch, the policy
sharded with ``fully_shard`` and the reference sharded too, saves a distributed checkpoint, and
exports the policy (gathered to rank 0). The single-process run is the oracle.
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


def run(out_dir: Path) -> dict:
    """One training run of the stand-in (world size from the environment); returns what rank 0 saw."""
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
    result = {
        "losses": [m["loss"] for m in history],
        "rewards": [m["reward"] for m in history],
        "grad_norms": [m["grad_norm"] for m in history],
        "redo_step3": redo["loss"],
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


if __name__ == "__main__":  # a rank under torchrun
    out = Path(sys.argv[1])
    result = run(out)
    if int(os.environ.get("RANK", 0)) == 0:
        (out / "result.json").write_text(json.dumps(result))
