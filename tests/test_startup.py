"""Start-up checks: mistakes that used to fail hours in, or silently, fail (or warn) in the first seconds."""

from __future__ import annotations

import json
import sys
import types

import pytest

from lgrpo import distributed as D
from lgrpo.config import ConfigError, build_config, parse_args, save_config

# A run that would train the tiny model on the synthetic task; the tests stop it before it builds.
QUICK = ["--run.progress", "false", "--sft.steps", "0", "--train.steps", "1", "--data.eval", "none"]


@pytest.fixture
def no_build(monkeypatch):
    """main() must fail before building anything: building raises instead."""
    import lgrpo.train

    def build(*args, **kwargs):
        raise AssertionError("the models were built before the check")

    monkeypatch.setattr(lgrpo.train, "build", build)


class Started(Exception):
    """Raised where the run would start warming up: the models and the task were built, the config written."""


@pytest.fixture
def stop_when_started(monkeypatch):
    import lgrpo.train

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(lgrpo.train, "warm_up_or_restore", started)


# --- the command line --------------------------------------------------------------------------------


def test_an_unknown_option_is_named_as_such():
    with pytest.raises(ConfigError, match=r"unknown option --foo;") as err:
        parse_args(["--foo"])
    assert "missing value" not in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown option --trian\.steps; the closest known: --train\.steps"):
        parse_args(["--trian.steps", "3"])
    with pytest.raises(ConfigError, match=r"--loss\.beta: missing value"):  # a known one without a value
        parse_args(["--loss.beta"])


def test_a_config_file_with_bad_json_is_named(tmp_path):
    bad = tmp_path / "cfg.json"
    bad.write_text('{"loss": {"beta": 0.1,}\n}')
    with pytest.raises(ConfigError, match=rf"--config {bad}: invalid JSON at line 1, column \d+"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match=r"--config .*absent\.json: cannot read it"):
        parse_args(["--config", str(tmp_path / "absent.json")])


def test_a_manifest_with_the_default_warmup_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"--sft\.steps: \(1250\) > 0 with --data\.train my\.jsonl.*--sft\.steps 0"):
        build_config("tiny", {"data": {"train": "my.jsonl"}})
    assert build_config("tiny", {"data": {"train": "my.jsonl"}, "sft": {"steps": 0}}).sft.steps == 0


def test_resume_from_a_folder_that_does_not_exist_says_so(tmp_path, no_build):
    from lgrpo.train import main

    with pytest.raises(ConfigError, match=r"--checkpoint\.resume /nonexistent/step_5: no such folder"):
        main([*QUICK, "--run.dir", str(tmp_path), "--checkpoint.resume", "/nonexistent/step_5"])


def test_tensorboard_on_without_the_package_fails_before_building(tmp_path, monkeypatch, no_build):
    from lgrpo.train import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it raises ImportError
    with pytest.raises(ConfigError, match="--run.tensorboard on, but the tensorboard package is not installed"):
        main([*QUICK, "--run.dir", str(tmp_path), "--run.tensorboard", "on"])


@pytest.mark.usefixtures("stop_when_started")
def test_a_reused_run_name_with_another_config_is_refused_unless_allowed(tmp_path):
    from lgrpo.run import resolve_auto
    from lgrpo.train import main

    run = tmp_path / "r"
    old = parse_args([*QUICK, "--run.dir", str(tmp_path), "--run.name", "r"])
    save_config(resolve_auto(old, D.Dist()), run / "config.json")  # as main writes it
    argv = [*QUICK, "--run.dir", str(tmp_path), "--run.name", "r", "--loss.beta", "0.1", "--run.log_every", "5"]

    with pytest.raises(ConfigError, match=r"holds a run with another config \(loss\.beta: 0\.04 -> 0\.1\)") as err:
        main(argv)
    assert "log_every" not in str(err.value)  # how often it prints is not part of what a run computes
    assert json.loads((run / "config.json").read_text())["loss"]["beta"] == 0.04  # untouched

    with pytest.raises(Started):  # allowed: both configs are kept, then the run goes on to build
        main([*argv, "--run.allow_config_change", "true"])
    kept = [p for p in run.glob("config.*.json")]
    assert len(kept) == 1 and json.loads(kept[0].read_text())["loss"]["beta"] == 0.04
    assert json.loads((run / "config.json").read_text())["loss"]["beta"] == 0.1
    with pytest.raises(Started):  # the same (new) config again: no question asked
        main(argv)
    # A config.json written before an option existed (here: without data.on_bad_row), or before the image
    # bounds were resolved at start-up (None: the model folder's), is not a change.
    saved = json.loads((run / "config.json").read_text())
    del saved["data"]["on_bad_row"]
    saved["data"]["max_pixels"] = None
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(Started):
        main(argv)


@pytest.mark.parametrize("bad, fixed, message", [
    (["--model.reference", "/nonexistent"], [],
     r"^--model\.reference /nonexistent: '/nonexistent' is neither 'tiny' nor a local model folder"),
    (["--data.max_pixels", "1"], ["--data.max_pixels", "12544"],
     r"^--data\.max_pixels 1: need 0 < min_pixels <= max_pixels, got 3136, 1 \(a bound not given is the model "
     r"folder's\)$"),
])
@pytest.mark.usefixtures("stop_when_started")
def test_a_start_that_fails_leaves_no_config_and_the_fixed_command_runs(tmp_path, bad, fixed, message):
    """Issue 27, case 5: a start that failed (a missing model folder, contradictory image bounds) was a
    traceback after config.json was written, and the corrected command was then refused as "a run with
    another config" although no step ran."""
    from lgrpo.train import main

    argv = [*QUICK, "--run.dir", str(tmp_path), "--run.name", "r"]
    with pytest.raises(ConfigError, match=message):
        main([*argv, *bad])
    assert not (tmp_path / "r" / "config.json").exists()
    with pytest.raises(Started):
        main([*argv, *fixed])
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"]["reference"] is None


def test_a_build_that_fails_leaves_no_config(tmp_path, monkeypatch):
    """Whatever fails while the models and the task are built: the folder holds no config, so the same
    command (once the cause is fixed) is not refused as another config."""
    import lgrpo.train
    from lgrpo.train import main

    def build(*args, **kwargs):
        raise OSError("disk unplugged while loading")

    monkeypatch.setattr(lgrpo.train, "build", build)
    with pytest.raises(OSError, match="unplugged"):
        main([*QUICK, "--run.dir", str(tmp_path), "--run.name", "r", "--loss.beta", "0.5"])
    assert not (tmp_path / "r" / "config.json").exists()


def test_a_missing_model_folder_is_one_line_without_a_traceback(tmp_path):
    import subprocess

    from lgrpo.models import family_names

    out = subprocess.run([sys.executable, "-m", "lgrpo.train", *QUICK, "--run.dir", str(tmp_path),
                          "--model.listener", str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: --model.listener {tmp_path / 'nope'}: {str(tmp_path / 'nope')!r} is neither 'tiny' nor a local "
        f"model folder with a config.json; models are never downloaded: pass the folder of a {family_names()} "
        "checkpoint"]
    assert not list(tmp_path.iterdir())  # refused before the run folder was made


# --- metrics and progress ------------------------------------------------------------------------------


def test_metrics_keep_one_line_per_step_after_a_resume(tmp_path):
    from lgrpo.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    # A crash after steps 3 and 4 were logged but only step 2 was checkpointed (and a line cut short).
    path.write_text("".join(json.dumps({"step": s, "kind": "train", "loss": s}) + "\n" for s in (1, 2, 3, 4))
                    + '{"step": 5, "ki')
    logger = MetricsLogger(tmp_path, tensorboard="off", progress=False, initial_step=2)
    for s in (3, 4):
        logger.log(s, {"loss": 10 * s})
    logger.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1), (2, 2), (3, 30), (4, 40)]


@pytest.mark.usefixtures("reference_kernels")
def test_no_progress_bars_when_the_output_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    from lgrpo.metrics import MetricsLogger
    from tests.test_trainer import make_trainer

    logger = MetricsLogger(tmp_path, tensorboard="off", progress=True, total_steps=5)
    assert logger._bar is None  # pytest captures stdout: not a terminal
    logger.close()
    trainer = make_trainer(tmp_path, sft={"steps": 10, "batch_size": 4}, run={"progress": True})
    trainer.warmup()
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err and "it/s" not in out.err  # no bar redraws
    assert [line.split()[1] for line in out.out.splitlines() if line.startswith("warm-up")] == [
        f"{k}/10" for k in range(1, 11)]

    for stream in (sys.stdout, sys.stderr):
        monkeypatch.setattr(stream, "isatty", lambda: True)
    logger = MetricsLogger(tmp_path, tensorboard="off", progress=True, total_steps=5)
    assert logger._bar is not None
    logger.close()


# --- checks that need the task ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batcher():
    from lgrpo.batching import VLBatcher

    return VLBatcher.from_pretrained("tiny")


def test_max_new_tokens_shorter_than_the_warmup_answer_warns(batcher, capsys):
    from lgrpo.preflight import _check_answer_length
    from lgrpo.synthetic import SyntheticTask
    from lgrpo.task import PreferenceTask

    task = PreferenceTask(batcher, {"train": SyntheticTask(0).dataset("train", 8)})
    for tokens, warned in ((16, True), (48, False)):
        cfg = build_config("tiny", {"rollout": {"max_new_tokens": tokens}})
        _check_answer_length(cfg, task, D.Dist())
        out = capsys.readouterr().out
        assert ("completions of up to 40 tokens, but --rollout.max_new_tokens is 16" in out) == warned, out


@pytest.mark.parametrize("on_bad_row", ["skip", "stop"])
def test_prompts_longer_than_the_model_takes_are_bad_rows(tmp_path, batcher, on_bad_row):
    from PIL import Image

    from lgrpo.data import DataError, ManifestDataset
    from lgrpo.preflight import check_task
    from lgrpo.task import PreferenceTask

    for name in ("a", "b"):
        Image.new("RGB", (56, 56), (9, 9, 9)).save(tmp_path / f"{name}.png")
    rows = [{"prompt": p, "image_1": "a.png", "image_2": "b.png", "preferred": 1}
            for p in ("short", "word " * 4000, "short too")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config("tiny", {"data": {"train": str(tmp_path / "m.jsonl"), "on_bad_row": on_bad_row},
                                "sft": {"steps": 0}})
    task = PreferenceTask(batcher, {"train": ManifestDataset(tmp_path / "m.jsonl", on_bad_row=on_bad_row)})
    policy = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=4096))
    if on_bad_row == "stop":
        with pytest.raises(DataError, match=r"m\.jsonl:2: the prompt is \d+ tokens.*over the model's 4096"):
            check_task(cfg, task, policy, tmp_path / "run", D.Dist())
        return
    check_task(cfg, task, policy, tmp_path / "run", D.Dist())
    ds = task.splits["train"]
    assert list(ds.bad) == [1] and ds[1].prompt == "short too"
    logged = [json.loads(line) for line in (tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()]
    assert [r["line"] for r in logged] == [2] and "4096 positions" in logged[0]["reason"]


def test_fewer_training_prompts_than_a_step_takes_warns_with_the_numbers(tmp_path, batcher, capsys):
    """Issue 27, case 5: a 1-row manifest with 8 prompts per step ran silently, every step the same pair."""
    from PIL import Image

    from lgrpo.data import ManifestDataset
    from lgrpo.preflight import check_task
    from lgrpo.task import PreferenceTask

    Image.new("RGB", (56, 56), (9, 9, 9)).save(tmp_path / "a.png")
    row = {"prompt": "which?", "image_1": "a.png", "image_2": "a.png", "preferred": 1}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    policy = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=4096))
    for per_step, warned in ((8, True), (1, False)):
        cfg = build_config("tiny", {"data": {"train": str(tmp_path / "m.jsonl")}, "sft": {"steps": 0},
                                    "train": {"prompts_per_step": per_step}})
        task = PreferenceTask(batcher, {"train": ManifestDataset(tmp_path / "m.jsonl")})
        check_task(cfg, task, policy, tmp_path / "run", D.Dist())
        out = capsys.readouterr().out
        assert ("holds 1 usable prompt(s) but --train.prompts_per_step is 8: every step repeats each pair up "
                "to 8 times" in out) == warned, out
        assert ("--train.prompts_per_step 1 or less" in out) == warned


# --- python -m lgrpo.eval ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--limit", "0"], "--limit must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1"),
        (["--out", "{tmp}/a_file/report.json"], "--out {tmp}/a_file/report.json: cannot write the report there"),
    ],
)
def test_eval_cli_rejects_bad_arguments_before_loading(tmp_path, monkeypatch, capsys, args, message):
    import lgrpo.task
    from lgrpo.eval import main

    (tmp_path / "a_file").write_text("a file, not a folder")

    def build_eval_task(*a, **k):
        raise AssertionError("loaded the model before checking the arguments")

    monkeypatch.setattr(lgrpo.task, "build_eval_task", build_eval_task)
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "tiny", "--data", "synthetic", *[a.format(tmp=tmp_path) for a in args]])
    assert exit_.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
