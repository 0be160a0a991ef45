"""The listener experiment: the shortcut task's splits, the report, and a --quick run end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lgrpo.experiments.shortcut import (
    SPLITS,
    CueExample,
    ShortcutTask,
    demo_reasoning,
    describes_both_images,
)
from lgrpo.synthetic import COLOURS, FRAME, SyntheticTask, describe, evidence_reasoning, reference_reasoning, render


def framed(image) -> bool:
    """Whether the top-left pixel is the frame's colour (the shapes never reach the corners)."""
    return tuple(np.asarray(image)[0, 0]) == FRAME


# --- the task ------------------------------------------------------------------------------------------


def test_render_frame_is_opt_in_and_leaves_the_shape():
    plain, with_frame = np.asarray(render("red", "circle")), np.asarray(render("red", "circle", frame=True))
    assert not framed(render("red", "circle")) and framed(render("red", "circle", frame=True))
    inner = (slice(4, -4), slice(4, -4))
    assert (plain[inner] == with_frame[inner]).all()  # only the border differs
    assert (plain != with_frame).any()


@pytest.mark.parametrize("split,frame_on", [("train", "preferred"), ("heldout", "preferred"), ("ood", "other")])
def test_the_frame_predicts_the_label_on_training_and_heldout_pairs_and_misleads_on_ood(split, frame_on):
    task = ShortcutTask(0)
    for i in range(24):
        ex = task.example(split, i)
        assert ex.kind == "explained" and ex.prompt == ex.captions[ex.preferred - 1]
        position = ex.preferred if frame_on == "preferred" else 3 - ex.preferred
        assert [framed(im) for im in ex.images] == [position == 1, position == 2]


def test_heldout_and_ood_use_configurations_never_trained_on():
    task = ShortcutTask(0)
    assert set(task.configurations("heldout")) == set(SyntheticTask(0).configurations("heldout"))
    assert task.configurations("heldout") == task.configurations("ood")
    train = set(task.configurations("train"))
    assert train.isdisjoint(task.configurations("heldout"))
    assert task.configurations("demos") == task.configurations("train") == task.configurations("listener")


@pytest.mark.parametrize("split", ["heldout", "ood"])
def test_heldout_and_ood_pairs_never_show_a_training_combination(split):
    """Read the pairs themselves (captions and pixels), not the configuration lists: every held-out/OOD pair
    is a (target, distractor) combination GRPO and the warm-ups never see, and every one is drawn."""
    task = ShortcutTask(0)
    trained = {(describe(*t), describe(*d)) for t, d in task.configurations("train")}
    heldout = task.configurations(split)
    seen = set()
    for i in range(len(heldout)):
        ex = task.example(split, i)
        pair = (ex.captions[ex.preferred - 1], ex.captions[2 - ex.preferred])  # (target, distractor)
        assert pair[0] == ex.prompt and pair not in trained, (split, i, pair)
        assert [colour_at_centre(im) for im in ex.images] == [c.split()[1] for c in ex.captions]
        seen.add(pair)
    assert seen == {(describe(*t), describe(*d)) for t, d in heldout}
    for train_split in ("demos", "train", "listener"):  # and the training splits only train combinations
        for i in range(64):
            ex = task.example(train_split, i)  # (the listener's descriptions may be swapped: read the prompt)
            assert (ex.prompt, next(c for c in ex.captions if c != ex.prompt)) in trained


def test_demonstrations_explain_or_memorise():
    task = ShortcutTask(0, explained_share=0.5)
    kinds = {"explained": [], "memorised": []}
    for i in range(200):
        ex = task.example("demos", i)
        kinds[ex.kind].append(ex)
        text = demo_reasoning(ex)
        assert text.startswith(f"the prompt asks for {ex.prompt}.")
        assert "matches" not in text  # never a verdict sentence
        assert describes_both_images(text) == (ex.kind == "explained")
    assert 70 < len(kinds["explained"]) < 130
    # memorised: the frame marks the preferred image; explained: the frame is on either image
    assert all(framed(ex.images[ex.preferred - 1]) for ex in kinds["memorised"])
    on_preferred = [framed(ex.images[ex.preferred - 1]) for ex in kinds["explained"]]
    assert 0.3 < sum(on_preferred) / len(on_preferred) < 0.7
    assert all(ShortcutTask(0, explained_share=0.0).example("demos", i).kind == "memorised" for i in range(20))


def colour_at_centre(image) -> str:
    """The colour name of the shape (the centre pixel is inside every shape, whatever the jitter)."""
    rgb = tuple(int(v) for v in np.asarray(image)[28, 28])
    return next(name for name, c in COLOURS.items() if c == rgb)


def test_listener_demonstrations_follow_the_text_not_the_images():
    task = ShortcutTask(0)
    as_drawn = swapped = 0
    for i in range(200):
        ex = task.example("listener", i)
        assert ex.kind == "explained" and ex.captions[ex.preferred - 1] == ex.prompt  # the answer the text says
        shown = [colour_at_centre(im) for im in ex.images]
        said = [c.split()[1] for c in ex.captions]
        if shown[0] == shown[1]:
            continue  # same colour: the swap cannot be seen this way
        as_drawn += said == shown
        swapped += said == shown[::-1]
    assert as_drawn + swapped > 100
    assert 0.35 < swapped / (as_drawn + swapped) < 0.65  # the images say nothing about the answer


def test_examples_are_deterministic_and_swap_consistently():
    a, b = ShortcutTask(3).example("demos", 7), ShortcutTask(3).example("demos", 7)
    assert a.prompt == b.prompt and a.preferred == b.preferred and a.kind == b.kind
    assert all((np.asarray(x) == np.asarray(y)).all() for x, y in zip(a.images, b.images))
    s = a.swapped()
    assert isinstance(s, CueExample) and s.kind == a.kind and s.preferred == 3 - a.preferred
    assert s.captions == a.captions[::-1] and s.images == a.images[::-1]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="split"):
        ShortcutTask(0).example("valid", 0)
    with pytest.raises(IndexError):
        ShortcutTask(0).example("train", -1)
    with pytest.raises(ValueError, match="explained_share"):
        ShortcutTask(0, explained_share=1.5)
    with pytest.raises(IndexError):
        ShortcutTask(0).dataset("train", 4)[4]
    assert set(SPLITS) == {"demos", "train", "heldout", "ood", "listener"}


def test_default_template_is_the_evidence_plus_its_verdict():
    ex = SyntheticTask(0).example("train", 0)
    assert reference_reasoning(ex) == f"{evidence_reasoning(ex)} image {ex.preferred} matches the prompt."


# --- the report ----------------------------------------------------------------------------------------


def fake_results(values: dict[str, list[float]], steps=(0, 5, 10), first_seed=0) -> dict:
    """Results as the experiment writes them: every metric of every split = the arm's value per seed."""
    from lgrpo.experiments.listener import EVAL_SPLITS, METRICS

    def point(v):
        return {s: dict.fromkeys(METRICS, v) for s in EVAL_SPLITS}

    arms = {}
    for arm, per_seed in values.items():
        arms[arm] = {}
        for seed, v in enumerate(per_seed, start=first_seed):
            curve = [{"step": 0, **point(v)}] if arm == "warmup" else [{"step": t, **point(v)} for t in steps]
            train = [] if arm == "warmup" else [
                {"step": t, "reward": 1.0, "accuracy": v, "listener": v, "contradiction": None, "format": 1.0,
                 "explained": v} for t in steps[1:]]
            arms[arm][str(seed)] = {"final": point(v), "curve": curve, "train_curve": train}
    config = {"eval_size": 64, "grpo_steps": steps[-1], "prompts_per_step": 8, "group_size": 8,
              "arms": list(values), "seeds": list(range(first_seed, first_seed + len(per_seed)))}
    listener = {"n": 64, "follows_evidence": 0.9, "confidence_no_evidence": 0.5, "seconds": 1.0 + first_seed}
    return {"config": config, "arms": arms, "seconds": 1.0, "listener": listener}


def test_mean_and_standard_error():
    from lgrpo.experiments.report import mean_sem

    m, s, n = mean_sem([0.5, 0.7, 0.9, None])
    assert n == 3 and math.isclose(m, 0.7) and math.isclose(s, 0.2 / math.sqrt(3))
    assert mean_sem([0.4])[2] == 1 and math.isnan(mean_sem([0.4])[1])
    assert mean_sem([None, float("nan")])[2] == 0


def test_table_holds_means_and_standard_errors(tmp_path):
    from lgrpo.experiments.report import ARM_TITLES, COLUMNS, markdown_table, write_outputs

    results = fake_results({"warmup": [0.5, 0.5], "accuracy": [0.25, 0.75], "listener": [0.8, 1.0]})
    table = markdown_table(results)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows[ARM_TITLES["accuracy"]].count("0.500 ± 0.250") == len(COLUMNS)
    assert rows[ARM_TITLES["listener"]].count("0.900 ± 0.100") == len(COLUMNS)
    assert rows[ARM_TITLES["warmup"]].count("0.500 ± 0.000") == len(COLUMNS)
    assert "seeds [0, 1]" in table
    paths = write_outputs(results, tmp_path)
    assert [p.name for p in paths] == ["results.json", "results.md", "curves.png", "training.png"]
    for png in paths[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    saved = json.loads(paths[0].read_text())
    assert saved["summary"]["listener"]["ood"]["accuracy"] == {"mean": 0.9, "sem": pytest.approx(0.1), "n": 2}


def test_runs_of_different_seeds_merge_into_one_report(tmp_path):
    from lgrpo.experiments.listener import merge
    from lgrpo.experiments.report import ARM_TITLES

    def write(results, folder):
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(results))

    write(fake_results({"accuracy": [0.25], "listener": [0.8]}), tmp_path / "a")
    write(fake_results({"accuracy": [0.75], "listener": [1.0]}, first_seed=1), tmp_path / "b")
    merge(tmp_path / "all", [tmp_path / "a", tmp_path / "b"])
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert merged["config"]["seeds"] == [0, 1] and sorted(merged["arms"]["listener"]) == ["0", "1"]
    assert f"| {ARM_TITLES['listener']} | 0.900 ± 0.100" in (tmp_path / "all" / "results.md").read_text()
    with pytest.raises(ValueError, match="seed"):  # the same seed twice
        merge(tmp_path / "x", [tmp_path / "a", tmp_path / "a"])
    write(fake_results({"accuracy": [0.5], "listener": [0.5]}, steps=(0, 5), first_seed=2), tmp_path / "c")
    with pytest.raises(ValueError, match="grpo_steps"):  # not the same experiment
        merge(tmp_path / "x", [tmp_path / "a", tmp_path / "c"])
    other_listener = fake_results({"accuracy": [0.5], "listener": [0.5]}, first_seed=2)
    other_listener["listener"] = {"follows_evidence": 0.5, "seconds": 1.0}
    write(other_listener, tmp_path / "d")
    with pytest.raises(ValueError, match="listener"):  # each run trains its listener: it must be the same one
        merge(tmp_path / "x", [tmp_path / "a", tmp_path / "d"])


# --- the program -----------------------------------------------------------------------------------------


def test_options_and_bad_arms():
    from lgrpo.experiments.listener import QUICK, ExperimentConfig, parse_args

    _, ec = parse_args(["--out", "x", "--quick", "--grpo-steps", "3", "--seeds", "4", "5"])
    assert ec.grpo_steps == 3 and ec.seeds == (4, 5) and ec.warmup_steps == QUICK["warmup_steps"]
    _, ec = parse_args(["--out", "x"])
    assert ec == ExperimentConfig() and len(ec.seeds) >= 3
    with pytest.raises(ValueError, match="unknown arm"):
        ExperimentConfig(arms=("warmup", "sft"))
    with pytest.raises(ValueError, match="grpo_steps"):
        ExperimentConfig(grpo_steps=0)
    args, _ = parse_args(["--out", "x"])
    assert args.threads == 1 and args.jobs == 1  # one thread per process, seeds in turn, unless asked
    for bad in (["--threads", "-1"], ["--jobs", "0"]):
        with pytest.raises(SystemExit):
            parse_args(["--out", "x", *bad])


def test_side_by_side_runs_drop_only_the_options_each_seed_replaces():
    from lgrpo.experiments.listener import _without_options

    drop = {"--seeds": True, "--out": True, "--jobs": True}
    argv = ["--quick", "--seeds", "0", "1", "2", "--arms", "warmup", "listener", "--out=d", "--jobs", "3",
            "--grpo-steps", "4"]
    assert _without_options(argv, drop) == ["--quick", "--arms", "warmup", "listener", "--grpo-steps", "4"]


def test_build_strips_the_listeners_verdict_when_configured():
    from lgrpo import distributed as D
    from lgrpo.config import build_config
    from lgrpo.task import build

    verdict = "image 1 shows a red circle. image 1 matches the prompt."
    cfg = build_config("tiny", {"reward": {"listener_strip_verdict": True}, "loss": {"beta": 0.0}})
    task, _, listener = build(cfg, D.init("cpu"))
    assert task.batcher.fmt.listener_strip_verdict and listener.batcher is task.batcher
    ex = SyntheticTask(0).example("train", 0)
    text = task.tokenizer.decode(task.batcher.listener_batch([ex.prompt], [ex.images], [verdict]).input_ids[0])
    assert "image 1 shows a red circle.</think><answer>" in text and "matches the prompt" not in text
    assert not build_config("tiny").reward.listener_strip_verdict  # off unless asked


@pytest.mark.slow
@pytest.mark.usefixtures("reference_kernels")  # as `make experiment` runs on CPU
def test_quick_run_writes_every_output(tmp_path):
    """``--quick``: 1 seed, a listener and a policy warmed up for a few dozen steps, 2 GRPO steps per arm.

    The numbers mean nothing at this size; the run must write every file, with every arm, split and
    metric, the curves at every step, and every value in [0, 1] (None only where undefined).
    """
    from lgrpo.experiments.listener import DEFAULT_ARMS, EVAL_SPLITS, METRICS, QUICK, main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["arms"]) == set(DEFAULT_ARMS) and results["quick"] is True
    for arm, seeds in results["arms"].items():
        assert list(seeds) == [str(s) for s in QUICK["seeds"]]
        run = seeds["0"]
        expected_steps = [0] if arm == "warmup" else list(range(QUICK["grpo_steps"] + 1))
        assert [p["step"] for p in run["curve"]] == expected_steps
        assert len(run["train_curve"]) == (0 if arm == "warmup" else QUICK["grpo_steps"])
        for point in run["curve"]:
            for split in EVAL_SPLITS:
                for metric in METRICS:
                    v = point[split][metric]
                    assert v is None or 0.0 <= v <= 1.0, (arm, split, metric, v)
                for metric in ("accuracy", "format_rate", "explained_share"):  # always defined
                    assert point[split][metric] is not None
        assert run["final"] == {s: run["curve"][-1][s] for s in EVAL_SPLITS}
    for key in ("follows_evidence", "confidence_no_evidence", "picks_image_1_no_evidence"):
        assert 0 <= results["listener"][key] <= 1
        assert 0 <= results["arms"]["warmup"]["0"]["as_listener"][key] <= 1
    for arm, per_split in results["summary"].items():  # the table's numbers: one seed each, in [0, 1]
        for split, metrics in per_split.items():
            for metric, stat in metrics.items():
                assert stat["sem"] is None and stat["n"] == (0 if stat["mean"] is None else 1)
                assert stat["mean"] is None or 0 <= stat["mean"] <= 1, (arm, split, metric, stat)
    table = (tmp_path / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(DEFAULT_ARMS)  # one row per arm under the header
    for row in rows:
        cells = [c.strip() for c in row.strip("| ").split(" | ")[1:]]
        assert all(c == "n/a" or 0 <= float(c) <= 1 for c in cells), row
    for png in ("curves.png", "training.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
