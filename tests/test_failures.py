"""Nothing lost, nothing silently wrong: resume after the warm-up, damaged checkpoints, a full disk, and
the start-up checks of ``python -m lgrpo.train`` and ``python -m lgrpo.eval``."""

from __future__ import annotations

import errno
import json
import signal
from contextlib import contextmanager

import pytest
import torch

from lgrpo.checkpoint import (
    MANIFEST,
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    load_weights,
    save_weights,
    step_dir_name,
    verify_checkpoint,
)
from lgrpo.metrics import read_jsonl
from tests.test_trainer import make_trainer

# Trainer logic, many steps: the kernels run as the reference (see conftest.reference_kernels).
pytestmark = pytest.mark.usefixtures("reference_kernels")

# The default task (tiny model, synthetic pairs, listener, KL reference), with everything made small.
SMALL = ["--run.progress", "false", "--run.tensorboard", "off", "--sft.steps", "3", "--sft.batch_size", "2",
         "--train.steps", "4", "--checkpoint.interval", "2", "--checkpoint.export", "false",
         "--data.eval", "none", "--data.synthetic_train_size", "16", "--train.prompts_per_step", "2",
         "--rollout.group_size", "2", "--rollout.max_new_tokens", "8"]
# Wall-clock numbers differ between runs; everything else a step logs must not.
CLOCK = ("time", "time/", "tokens_per_s/", "peak_mem_gib")


def _signal_at_step(trainer, at_step: int, signum: int = signal.SIGTERM) -> None:
    step = trainer.train_step

    def train_step():
        if trainer.step + 1 == at_step:
            signal.raise_signal(signum)  # mid-step: the step still finishes, then it saves and stops
        return step()

    trainer.train_step = train_step


@contextmanager
def _capture_trainers(monkeypatch, stop_at: int | None = None):
    """Record the Trainer of each main() call (and optionally SIGTERM it during step ``stop_at``)."""
    from lgrpo.trainer import Trainer

    seen, fit = [], Trainer.fit

    def fit_and_record(self, on_step=None):
        seen.append(self)
        if stop_at is not None:
            _signal_at_step(self, stop_at)
        return fit(self, on_step)

    monkeypatch.setattr(Trainer, "fit", fit_and_record)
    yield seen
    monkeypatch.setattr(Trainer, "fit", fit)


def _frozen_weights(trainer) -> list[torch.Tensor]:
    ref = trainer.ref_scorer.model
    listener = trainer.task.listener.model
    return [p.detach().clone() for m in (ref, listener) for p in m.parameters()]


def test_resume_after_the_warmup_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """Crashed right after the warm-up, then stopped after GRPO step 2 of 4, and run again each time: every
    step's metrics equal the run that was never stopped, and the KL reference and the listener are the
    warmed-up copies, not the initial model."""
    from lgrpo.train import main

    with _capture_trainers(monkeypatch) as seen:
        assert main([*SMALL, "--run.dir", str(tmp_path), "--run.name", "straight"]) == 0
    straight_frozen = _frozen_weights(seen[0])

    argv = [*SMALL, "--run.dir", str(tmp_path), "--run.name", "stopped"]
    run = tmp_path / "stopped"
    # First a crash between the warm-up and the first GRPO checkpoint: the warm-up is not redone.
    from lgrpo.trainer import Trainer

    def crash(self, on_step=None):
        raise RuntimeError("crash before the first step")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "fit", crash)
        with pytest.raises(RuntimeError, match="crash before"):
            main(argv)
    assert not verify_checkpoint(run / "warmup") and not complete_checkpoints(run / "checkpoints")
    warm = {p.name: p.stat().st_mtime_ns for p in (run / "warmup").iterdir()}
    with _capture_trainers(monkeypatch, stop_at=2):  # then a stop during step 2
        assert main(argv) == 128 + signal.SIGTERM
    assert {p.name: p.stat().st_mtime_ns for p in (run / "warmup").iterdir()} == warm  # loaded, not redone
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == [step_dir_name(2)]
    with _capture_trainers(monkeypatch) as seen:
        assert main(argv) == 0  # the same command again: resumes at step 2
    assert seen[0].step == 4
    for a, b in zip(straight_frozen, _frozen_weights(seen[0]), strict=True):
        assert torch.equal(a, b)

    def steps(name):
        rows = read_jsonl(tmp_path / name / "metrics.jsonl", kind="train")
        return [{k: v for k, v in r.items() if not k.startswith(CLOCK)} for r in rows]

    expected = steps("straight")
    assert [r["step"] for r in expected] == [1, 2, 3, 4]
    assert steps("stopped") == expected  # loss, kl, rewards, grad norm...: the same floats
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4  # one line per step


def test_warmup_weights_load_into_frozen_models_of_another_dtype(tmp_path):
    from lgrpo import distributed as D

    trainer = make_trainer(tmp_path)
    save_weights(tmp_path / "warmup", trainer.policy, D.Dist(), {"steps": 0})
    other = make_trainer(tmp_path / "other", seed=1).policy.to(torch.bfloat16)
    load_weights(tmp_path / "warmup", [other])
    for a, b in zip(trainer.policy.parameters(), other.parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b)
    info = tmp_path / "warmup" / "info.json"
    info.write_text(info.read_text().replace("0", "9"))  # same size, changed after the manifest was written
    with pytest.raises(CheckpointError, match="info.json: checksum differs"):
        load_weights(tmp_path / "warmup", [other])


# --- damaged checkpoints ---------------------------------------------------------------------------


TINY_RUN = dict(train={"steps": 2, "prompts_per_step": 2}, rollout={"group_size": 2, "max_new_tokens": 4})


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run folder with the checkpoints of steps 1 and 2 (trained once for the module)."""
    run = tmp_path_factory.mktemp("two_checkpoints")
    make_trainer(run, **TINY_RUN, checkpoint={"interval": 1, "keep": 3}).fit()
    return run


def _two_checkpoints(tmp_path, two_checkpoints):
    """A copy of the module's run folder, and a trainer for it."""
    import shutil

    shutil.copytree(two_checkpoints / "checkpoints", tmp_path / "checkpoints")
    folder = tmp_path / "checkpoints"
    assert [p.name for p in complete_checkpoints(folder)] == [step_dir_name(1), step_dir_name(2)]
    return make_trainer(tmp_path, **TINY_RUN), folder


def _damage(path, how: str) -> str:
    """Damage one file of a checkpoint folder; returns the file's name."""
    if how == "truncated shard":
        shard = sorted(path.glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        return shard.name
    if how == "flipped byte":
        shard = sorted(path.glob("*.distcp"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        return shard.name
    name = {"missing state": "trainer_state.json", "missing rng": "rng_rank0.pt"}[how]
    (path / name).unlink()
    return name


@pytest.mark.parametrize("how", ["truncated shard", "flipped byte", "missing state", "missing rng"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, two_checkpoints, how, capsys):
    _, folder = _two_checkpoints(tmp_path, two_checkpoints)
    name = _damage(folder / step_dir_name(2), how)
    assert any(name in p for p in verify_checkpoint(folder / step_dir_name(2)))

    again = make_trainer(tmp_path, **TINY_RUN)
    assert again.resume() and again.step == 1
    out = capsys.readouterr().out
    assert f"{step_dir_name(2)} is damaged" in out and f"resuming from {step_dir_name(1)}" in out
    assert name in out
    # Asked for by name, the damaged one is refused with the reason, and the good one is named.
    with pytest.raises(CheckpointError, match=f"{name}.*other complete checkpoints there: {step_dir_name(1)}"):
        make_trainer(tmp_path, **TINY_RUN, checkpoint={"resume": str(folder / step_dir_name(2))}).resume()


def test_no_checkpoint_that_verifies_is_an_error_not_a_fresh_start(tmp_path, two_checkpoints):
    trainer, folder = _two_checkpoints(tmp_path, two_checkpoints)
    for p in complete_checkpoints(folder):
        _damage(p, "missing state")
    with pytest.raises(CheckpointError, match="no checkpoint.*verifies.*--checkpoint.resume none"):
        trainer.resume()


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written, as on a full disk."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._room:
            self._f.write(bytes(memoryview(data).cast("B")[: self._room]))
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_full_disk_during_a_save_keeps_the_last_checkpoint_and_leaves_no_tmp(tmp_path, two_checkpoints,
                                                                              monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystem

    trainer, folder = _two_checkpoints(tmp_path, two_checkpoints)
    good = {p.name: p.read_bytes() for p in (folder / step_dir_name(2)).iterdir()}

    @contextmanager
    def create_stream(self, path, mode):
        with open(path, mode) as f:
            yield _FullDisk(f, room=100)

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    for step in (3, 2):  # a new step, and the same step saved again over a good one
        trainer.step = step
        with pytest.raises(CheckpointError, match=f"no space left.*{step_dir_name(2)} is intact"):
            trainer.save()
        assert [p.name for p in complete_checkpoints(folder)] == [step_dir_name(1), step_dir_name(2)]
        assert not list(folder.glob("*.tmp"))
        assert {p.name: p.read_bytes() for p in (folder / step_dir_name(2)).iterdir()} == good

    # torch.save's own writer says only "file write failed" on a full disk: the free space tells.
    monkeypatch.undo()
    import lgrpo.checkpoint as ckpt

    def zip_writer_fails(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", zip_writer_fails)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: type("U", (), {"free": 2**20})())
    trainer.step = 3
    # The advice must be one that works now: pruning happens only after a successful save.
    with pytest.raises(CheckpointError, match=r"no space left on the disk.*\(1 MiB free\).*a lower "
                       r"--checkpoint.keep frees nothing now: delete the oldest step_\* by hand"):
        trainer.save()
    assert latest_checkpoint(folder).name == step_dir_name(2) and not list(folder.glob("*.tmp"))


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path, two_checkpoints):
    _, folder = _two_checkpoints(tmp_path, two_checkpoints)
    path = folder / step_dir_name(2)
    files = json.loads((path / MANIFEST).read_text())["files"]
    on_disk = {p.name for p in path.iterdir()} - {MANIFEST, "DONE"}
    assert set(files) == on_disk and {"trainer_state.json", "rng_rank0.pt", ".metadata"} <= on_disk
    assert all(len(e["sha256"]) == 64 and e["size"] == (path / n).stat().st_size for n, e in files.items())


# --- sharded frozen models (2 ranks) ------------------------------------------------------------------


def _sharded_round_trip(out) -> dict:
    """Under torchrun: save a sharded policy's weights, load them into a sharded reference (wrapped in
    its scorer, as the trainer shards it), a sharded listener-like model and a plain one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lgrpo import distributed as D

    trainer = make_trainer(out, loss={"beta": 0.04}, parallel={"reference": "shard"})
    assert trainer.fsdp and trainer.dist.world_size == 2
    from tests.toy_task import char_tokenizer, tiny_lm

    plain = tiny_lm(char_tokenizer(), seed=7)
    listener = D.shard(tiny_lm(char_tokenizer(), seed=8))
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(0.01)  # the "warm-up": now the policy differs from every frozen model
    save_weights(out / "warmup", trainer.policy, trainer.dist, {"steps": 1})
    load_weights(out / "warmup", [trainer.ref_scorer.model, listener, plain], dist=trainer.dist)

    def full(m):
        return get_model_state_dict(m, options=StateDictOptions(full_state_dict=True))

    want = full(trainer.policy)
    result = {"equal": [all(torch.equal(want[k], got[k]) for k in want)
                        for got in (full(trainer.ref_scorer.model), full(listener), plain.state_dict())]}
    D.close()
    return result


@pytest.mark.slow
def test_warmup_weights_load_into_sharded_and_plain_models_on_two_ranks(tmp_path):
    from tests.launch import torchrun

    proc = torchrun(__file__, str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "result.json").read_text()) == {"equal": [True, True, True]}


if __name__ == "__main__":  # a rank under torchrun
    import os
    import sys
    from pathlib import Path

    result = _sharded_round_trip(Path(sys.argv[1]))
    if int(os.environ.get("RANK", 0)) == 0:
        (Path(sys.argv[1]) / "result.json").write_text(json.dumps(result))
