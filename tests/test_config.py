"""Configuration: presets, CLI overrides, validation that names the field, the saved resolved config."""

from __future__ import annotations

import pytest

from lgrpo.config import (
    PRESETS,
    ConfigError,
    JobConfig,
    LossConfig,
    build_config,
    field_docs,
    help_text,
    load_config,
    parse_args,
    save_config,
)


def test_default_is_the_tiny_preset_and_valid():
    cfg = parse_args([])
    assert cfg.preset == "tiny" and cfg.model.policy is None and cfg.sft.steps > 0


@pytest.mark.parametrize("preset", ["qwen2.5-vl-3b", "qwen2.5-vl-7b"])
def test_qwen_presets_hold_the_spec_defaults(preset):
    cfg = parse_args(["--preset", preset, "--model.policy", "/models/x"])
    assert cfg.rollout.group_size == 8 and cfg.optim.lr == 1e-6 and cfg.loss.beta == 0.04
    assert cfg.loss.eps_low == cfg.loss.eps_high == 0.2
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.max_new_tokens == 512
    assert cfg.model.dtype == "bfloat16" and cfg.model.master_weights == "float32"


def test_qwen_preset_needs_the_weights_folder():
    with pytest.raises(ConfigError, match="--model.policy"):
        parse_args(["--preset", "qwen2.5-vl-3b"])


def test_overrides_are_typed():
    cfg = parse_args(
        [
            "--loss.beta",
            "0",
            "--rollout.group_size=4",
            "--loss.delta",
            "2",
            "--run.progress",
            "false",
            "--model.reference",
            "none",
            "--optim.lr",
            "3e-5",
            "--train.steps",
            "1e2",
        ]
    )
    assert cfg.loss.beta == 0.0 and isinstance(cfg.loss.beta, float)
    assert cfg.rollout.group_size == 4 and cfg.loss.delta == 2.0 and cfg.run.progress is False
    assert cfg.model.reference is None and cfg.optim.lr == 3e-5 and cfg.train.steps == 100


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--loss.loss_type", "ppo"], "--loss.loss_type"),
        (["--rollout.group_size", "1"], "--rollout.group_size"),
        (["--rollout.temperature", "0"], "--rollout.temperature"),
        (["--optim.schedule", "linear"], "--optim.schedule"),
        (["--loss.eps_low", "1.5"], "--loss.eps_low"),
        (["--rollout.group_size", "eight"], "--rollout.group_size"),
        (["--run.progress", "maybe"], "--run.progress"),
        (["--loss.minibatches", "3"], "--loss.minibatches"),  # must divide G = 8
        (["--parallel.fsdp", "yes"], "--parallel.fsdp"),
        (["--loss.beta"], "--loss.beta"),  # no value
    ],
)
def test_bad_values_name_the_field(argv, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_args(argv)


def test_unknown_options_are_rejected_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"loss\.betta.*known.*loss\.beta"):
        parse_args(["--loss.betta", "0.1"])
    with pytest.raises(ConfigError, match="section"):
        parse_args(["--loss", "1"])
    with pytest.raises(ConfigError, match="preset"):
        parse_args(["--preset", "llama"])


def test_world_size_checks():
    cfg = build_config("tiny", {"train": {"prompts_per_step": 6}})
    cfg.validate_world(2)
    with pytest.raises(ConfigError, match="--train.prompts_per_step.*4"):
        cfg.validate_world(4)
    # Unsharded training syncs no gradients: fine in one process, refused on several.
    cfg = build_config("tiny", {"parallel": {"fsdp": "off"}})
    cfg.validate_world(1)
    with pytest.raises(ConfigError, match="--parallel.fsdp.*unsynchronised"):
        cfg.validate_world(2)


def test_saved_config_round_trips_and_takes_overrides(tmp_path):
    cfg = parse_args(["--loss.beta", "0.1", "--run.name", "x"])
    save_config(cfg, tmp_path / "config.json")
    again = parse_args(["--config", str(tmp_path / "config.json"), "--train.steps", "7"])
    assert again.loss.beta == 0.1 and again.run.name == "x" and again.train.steps == 7
    assert load_config(tmp_path / "config.json") == cfg
    with pytest.raises(ConfigError, match="exclusive"):
        parse_args(["--config", str(tmp_path / "config.json"), "--preset", "tiny"])


def test_every_field_has_a_docstring_and_help_shows_it():
    import dataclasses

    for f in dataclasses.fields(JobConfig):
        tp = type(getattr(JobConfig(), f.name))
        if dataclasses.is_dataclass(tp):
            docs = field_docs(tp)
            missing = [g.name for g in dataclasses.fields(tp) if g.name not in docs]
            assert not missing, f"{tp.__name__} fields without a docstring: {missing}"
    text = help_text()
    assert "--loss.beta" in text and "KL (k3) coefficient" in text
    assert "beta" in field_docs(LossConfig)
    assert set(PRESETS) == {"tiny", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen3-vl-4b", "qwen3-vl-8b"}


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0 and "--rollout.group_size" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--optim.lr", "inf"], "--optim.lr: must be a finite number, got inf"),
    (["--optim.lr", "nan"], "--optim.lr: must be a finite number, got nan"),
    (["--optim.lr", "1e300"], r"--optim.lr: must be in \(0, 1\], got 1e\+300"),
    (["--sft.lr", "2"], r"--sft.lr: must be in \(0, 1\]"),
    (["--rollout.temperature", "inf"], "--rollout.temperature: must be a finite number"),
    (["--loss.beta", "-inf"], "--loss.beta: must be a finite number"),
    (["--reward.w_listener", "nan"], "--reward.w_listener: must be a finite number"),
])
def test_float_options_are_finite_and_sane_at_parse_time(argv, message):
    """Issue 27, case 5: refused when parsed, naming the option, not a step later as a divergence."""
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)
    with pytest.raises(ConfigError, match=message.split(":")[0]):  # from a JSON config file alike
        build_config("tiny", {argv[0][2:].split(".")[0]: {argv[0][2:].split(".")[1]: float(argv[1])}})


def test_pointless_settings_are_warned_about_at_start_up(tmp_path, capsys):
    """Issue 27, case 5: --loss.beta 0 with --model.reference, and all reward weights 0, ran silently."""
    from lgrpo import distributed as D
    from lgrpo.run import start_run

    assert build_config("tiny").pointless() == []
    cfg = build_config("tiny", {"loss": {"beta": 0.0}, "model": {"reference": "tiny"},
                                "reward": {"w_format": 0.0, "w_accuracy": 0.0, "w_listener": 0.0},
                                "run": {"dir": str(tmp_path), "name": "r"}})
    start_run(cfg, D.Dist())
    out = capsys.readouterr().out
    assert "[warn] --model.reference tiny is set but --loss.beta is 0" in out
    assert "[warn] every reward weight" in out and "GRPO changes nothing" in out
