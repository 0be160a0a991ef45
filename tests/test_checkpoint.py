"""Checkpoints: exact resume, completeness, keep-k, RNG, and the from_pretrained export."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lgrpo import distributed as D
from lgrpo.checkpoint import CheckpointError, complete_checkpoints, latest_checkpoint
from lgrpo.export import export_pretrained
from lgrpo.metrics import read_jsonl
from lgrpo.seeding import rng_state, set_rng_state
from tests.test_trainer import make_trainer

STEPS = {"steps": 4}

# Trainer logic, many steps: the kernels run as the reference (see conftest.reference_kernels).
pytestmark = pytest.mark.usefixtures("reference_kernels")


def test_n_steps_equal_k_steps_plus_resume_exactly(tmp_path):
    straight = make_trainer(
        tmp_path / "straight",
        train=STEPS,
        checkpoint={"interval": 2},
        loss={"epochs": 2, "beta": 0.04},
        optim={"schedule": "cosine", "warmup_steps": 1},
    )
    losses = [m["loss"] for m in straight.fit()]

    # The same run, killed right after step 2 (its step-2 checkpoint complete), then started again.
    first = make_trainer(
        tmp_path / "resumed",
        train=STEPS,
        checkpoint={"interval": 2},
        loss={"epochs": 2, "beta": 0.04},
        optim={"schedule": "cosine", "warmup_steps": 1},
    )
    head = []

    def crash_after_step_2(trainer, metrics):
        head.append(metrics["loss"])
        if trainer.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.fit(on_step=crash_after_step_2)
    torch.manual_seed(12345)  # a fresh process would not share the RNG state either
    second = make_trainer(
        tmp_path / "resumed",
        seed=0,
        train=STEPS,
        checkpoint={"interval": 2},
        loss={"epochs": 2, "beta": 0.04},
        optim={"schedule": "cosine", "warmup_steps": 1},
    )
    assert second.resume()
    assert second.step == 2
    tail = [m["loss"] for m in second.fit()]
    assert head + tail == losses  # exactly: same floats
    for a, b in zip(straight.policy.parameters(), second.policy.parameters()):
        assert torch.equal(a, b)
    # The metrics file of the resumed run holds every step once.
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl", kind="train")] == [
        1,
        2,
        3,
        4,
    ]


def test_incomplete_checkpoint_is_ignored_and_keep_k_prunes(tmp_path):
    trainer = make_trainer(tmp_path, train={"steps": 3}, checkpoint={"interval": 1, "keep": 2})
    trainer.fit()
    folder = tmp_path / "checkpoints"
    assert [p.name for p in complete_checkpoints(folder)] == ["step_0000002", "step_0000003"]
    # A save killed half-way: a .tmp folder, and a step folder without DONE.
    (folder / "step_0000004.tmp").mkdir()
    (folder / "step_0000005").mkdir()
    assert latest_checkpoint(folder).name == "step_0000003"
    with pytest.raises(CheckpointError, match="step_0000005.*interrupted while being written"):
        trainer.checkpointer.load(folder / "step_0000005")
    trainer.step = 6
    trainer.save()
    assert not (folder / "step_0000004.tmp").exists()
    assert [p.name for p in complete_checkpoints(folder)] == ["step_0000003", "step_0000006"]
    state = json.loads((folder / "step_0000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data"]["offset"] > 0 and state["world_size"] == 1


def test_rng_state_round_trip():
    state = rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


class _Payload:
    """What a crafted rng_rank0.pt holds: unpickling it with weights_only=False creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def _replace_and_re_manifest(step_dir, name, write):
    """Replace one file of a complete checkpoint and update its MANIFEST, as an attacker would: the
    folder still verifies, so only the loader stands between the file and the run."""
    import hashlib

    write(step_dir / name)
    manifest = json.loads((step_dir / "MANIFEST.json").read_text())
    data = (step_dir / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "MANIFEST.json").write_text(json.dumps(manifest))


def test_rng_state_is_plain_data_read_with_weights_only(tmp_path):
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # no numpy arrays, no objects
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


@pytest.mark.parametrize("resume", ["auto", "path"])
def test_a_crafted_rng_pickle_in_a_checkpoint_is_not_executed(tmp_path, resume):
    trainer = make_trainer(tmp_path, train={"steps": 2}, checkpoint={"interval": 2})
    trainer.fit()
    step_dir = latest_checkpoint(tmp_path / "checkpoints")
    marker = tmp_path / "payload_ran"
    _replace_and_re_manifest(step_dir, "rng_rank0.pt", lambda p: torch.save({"torch": _Payload(marker)}, p))
    other = make_trainer(tmp_path, train={"steps": 4}, checkpoint={"interval": 2})
    with pytest.raises(CheckpointError, match="rng_rank0.pt: holds more than tensors and numbers.*"
                                              "--checkpoint.resume none"):
        other.resume(None if resume == "auto" else step_dir)
    assert not marker.exists()


def test_load_restores_optimizer_and_schedule(tmp_path):
    trainer = make_trainer(tmp_path, train={"steps": 2}, checkpoint={"interval": 2})
    trainer.fit()
    other = make_trainer(tmp_path / "other", seed=1)
    other.checkpointer.load(latest_checkpoint(tmp_path / "checkpoints"))
    for a, b in zip(trainer.policy.parameters(), other.policy.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(trainer.optimizer.state[a]["exp_avg_sq"], other.optimizer.state[b]["exp_avg_sq"])
    assert other.scheduler.last_epoch == trainer.scheduler.last_epoch == 2
    assert other.step == 2 and other.order.state_dict() == trainer.order.state_dict()  # the trainer's entry


def test_export_loads_with_from_pretrained(tmp_path):
    trainer = make_trainer(tmp_path, train={"steps": 1})
    trainer.fit()
    out = export_pretrained(
        trainer.policy, tmp_path / "final", D.Dist(), extra_savers=(trainer.task.tokenizer,)
    )
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(trainer.policy.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
