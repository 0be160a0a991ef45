"""Start-up checks of ``python -m lgrpo.train``: what would fail hours in, or go silently wrong, is refused
or warned about in the first seconds.

Before any model loads (:func:`check_run`): ``--run.tensorboard on`` without the package, a
``--checkpoint.resume`` folder that does not exist, and a run folder reused with another config (refused
unless ``--run.allow_config_change``; then both configs are kept). After the models and data are built
(:func:`check_task`): bad manifest rows go to the run's ``bad_rows.jsonl``, prompts too long for the
model's positions are bad rows too, and a ``--rollout.max_new_tokens`` shorter than the warm-up's answers
(every rollout cut before ``</answer>``, every format reward 0) or fewer training prompts than
``--train.prompts_per_step`` gets a warning. A model folder that does not exist is refused before the
run folder is touched (:func:`check_model_folders`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .config import ConfigError, JobConfig
from .metrics import check_tensorboard

# Settings that change how a run is shown, saved, evaluated or sharded, not what it computes: a rerun
# may change them freely.
FREE_TO_CHANGE = (
    "run.dir", "run.name", "run.allow_config_change", "run.progress", "run.log_every", "run.tensorboard",
    "checkpoint.resume", "checkpoint.keep", "checkpoint.export", "train.eval_every", "data.eval_size",
    "parallel.fsdp", "parallel.reference", "parallel.listener", "parallel.backend", "parallel.timeout_s",
    "parallel.frozen",  # one module or two for the same frozen weights: the same numbers (lgrpo.frozen)
    "model.attn_implementation",  # resolved per machine (auto): the same attention, another kernel
    "loss.prefix_attention",  # likewise
)
# Not free: rollout.engine. The engine and the hf path draw different samples from the same distribution,
# so a run resumed on the other path would not be the run that would have happened.

# What a run did before an option existed, where that differs from the option's default: a config.json
# without the option is compared as if it held this value (an option merely added is not a change).
BEFORE_IT_EXISTED = {"rollout.engine": "hf"}

# Resolved at start-up from None (the model folder's value): a config.json written before they were
# resolved holds None, which is whatever this run resolved, not a change.
RESOLVED_FROM_NONE = ("data.min_pixels", "data.max_pixels")

# The listener reads the prompt, the reasoning (at most max_new_tokens) and a few tokens of its own.
LISTENER_MARGIN = 16


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """``"section.field: old -> new"`` for every setting both configs hold that differs and matters.

    A setting only one of them holds is an option added (or removed) by another version of lgrpo, not a
    change the user made: a run folder written before an option existed must still resume — compared
    as what that version did (:data:`BEFORE_IT_EXISTED`) where the new default computes otherwise."""
    a, b = _flat(old), _flat(new)
    a.update({k: v for k, v in BEFORE_IT_EXISTED.items() if k not in a and k in b})
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(set(a) & set(b))
            if k not in FREE_TO_CHANGE and a[k] != b[k] and not (a[k] is None and k in RESOLVED_FROM_NONE)]


def check_model_folders(cfg: JobConfig) -> None:
    """Every model folder the run will load exists: ``--model.policy``, ``--model.reference`` with a KL term,
    ``--model.listener`` with a listener reward. Refused before the run folder is touched, naming the
    option (not a traceback from the loader once the folder is written)."""
    from .model import model_dir

    for option, value, loaded in (("policy", cfg.model.policy, True),
                                  ("reference", cfg.model.reference, cfg.loss.beta > 0),
                                  ("listener", cfg.model.listener, cfg.reward.w_listener > 0)):
        if value is None or not loaded:
            continue
        try:
            model_dir(value)
        except FileNotFoundError as err:
            raise ConfigError(f"--model.{option} {value}: {err}") from None


def check_run(cfg: JobConfig, run_dir: Path) -> list[str]:
    """Checks before anything is built; raises :class:`ConfigError` naming the option to change.

    Returns the config changes against the run folder's ``config.json`` that ``--run.allow_config_change``
    allowed (empty for a new folder or the same config). Reads only: safe on every rank.
    """
    check_tensorboard(cfg.run.tensorboard)
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).is_dir():
        raise ConfigError(f"--checkpoint.resume {resume}: no such folder; pass a step folder "
                          f"(runs/NAME/checkpoints/step_N), auto (the run's newest) or none")
    saved = run_dir / "config.json"
    if not saved.is_file():
        return []
    try:
        old = json.loads(saved.read_text(encoding="utf-8"))
        changes = config_changes(old, cfg.to_dict()) if isinstance(old, dict) else ["(not a JSON object)"]
    except (OSError, ValueError) as err:
        changes = [f"(unreadable: {err})"]
    if changes and not cfg.run.allow_config_change:
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise ConfigError(
            f"--run.name {run_dir.name}: the run folder {run_dir} holds a run with another config "
            f"({shown}). Rerun with its config (--config {saved}), pick a new --run.name, or pass "
            f"--run.allow_config_change true to continue it with the new values (the old config is kept)"
        )
    return changes


def keep_previous_config(run_dir: Path) -> Path:
    """Move the run folder's ``config.json`` aside (``config.<time>.json``) before a changed one is saved."""
    saved = run_dir / "config.json"
    kept = run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.json"
    n = 1
    while kept.exists():
        kept, n = run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}-{n}.json", n + 1
    saved.replace(kept)
    return kept


# --- after the build ------------------------------------------------------------------------------------


def max_positions(model) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), if it says."""
    cfg = getattr(model, "config", None)
    for c in (getattr(cfg, "text_config", None), cfg):
        n = getattr(c, "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def _max_image_tokens(batcher) -> int:
    return batcher.family.max_image_tokens(batcher.image_processor)


def prompt_lengths(batcher, records) -> list[int]:
    """An upper bound on the tokens of each record's reasoner prompt: the text as rendered, plus each
    image at the largest size the image processor resizes to."""
    from .prompts import render_reasoner_prompt

    texts = [render_reasoner_prompt(batcher.tokenizer, r.prompt, batcher.fmt) for r in records]
    ids = [batcher.text_ids(t) for t in texts]  # as the batcher encodes them: the prompt is text
    return [len(row) - 2 + 2 * _max_image_tokens(batcher) for row in ids]  # 2 placeholders -> 2 images


def check_task(cfg: JobConfig, task, policy, run_dir: Path, dist) -> None:
    """Checks that need the built task and model (every rank runs them alike, so every rank marks the
    same rows bad)."""
    from .data import ManifestDataset
    from .images import image_problem

    limit = max_positions(policy)
    for ds in task.splits.values():
        if not isinstance(ds, ManifestDataset):
            continue
        ds.log_bad_rows_to(run_dir / "bad_rows.jsonl", rank=dist.rank, write_known=dist.is_main)
        batcher = getattr(task, "batcher", None)
        if limit is None or batcher is None:
            continue
        room = limit - cfg.rollout.max_new_tokens - LISTENER_MARGIN
        good = [i for i in range(len(ds)) if i not in ds.bad]
        for i, bound in zip(good, prompt_lengths(batcher, [ds.records[i] for i in good])):
            if bound <= room:
                continue  # fits even with both images at the largest size: no need to read them
            record = ds.records[i]
            sizes = [image_problem(p)[0] or (1, 1) for p in (record.image_1, record.image_2)]
            exact = bound - 2 * _max_image_tokens(batcher) + sum(
                batcher.family.image_tokens(batcher.image_processor, w, h) for w, h in sizes)
            if exact > room:
                ds.mark_bad(i, f"the prompt is {exact} tokens with its images; with --rollout.max_new_tokens "
                               f"{cfg.rollout.max_new_tokens} and the listener's {LISTENER_MARGIN} that is over "
                               f"the model's {limit} positions")
    if dist.is_main:
        _check_prompts_per_step(cfg, task)
    if cfg.sft.steps > 0:
        _check_answer_length(cfg, task, dist)


def _check_prompts_per_step(cfg: JobConfig, task) -> None:
    """Warn when a step asks for more prompts than the training data holds: each step then repeats pairs."""
    ds = task.splits.get("train") if hasattr(task, "splits") else None
    usable = task.num_prompts("train") - len(getattr(ds, "bad", ()))
    per_step = cfg.train.prompts_per_step
    if 0 < usable < per_step:
        print(f"[warn] the training data ({cfg.data.train}) holds {usable} usable prompt(s) but "
              f"--train.prompts_per_step is {per_step}: every step repeats each pair up to "
              f"{math.ceil(per_step / usable)} times. Add rows, or set --train.prompts_per_step {usable} or "
              f"less (a multiple of the number of ranks)", flush=True)


def _check_answer_length(cfg: JobConfig, task, dist, sample: int = 32) -> None:
    """Warn when the warm-up teaches answers longer than rollouts may be: they would all be cut."""
    n = min(sample, task.num_prompts("train"))
    targets = task.sft_targets(task.prompts("train", list(range(n))))
    from .prompts import encode_text

    longest = max(len(encode_text(task.tokenizer, t)) for t in targets)  # as encode_completions does
    if longest > cfg.rollout.max_new_tokens and dist.is_main:
        print(f"[warn] the warm-up teaches completions of up to {longest} tokens, but --rollout.max_new_tokens "
              f"is {cfg.rollout.max_new_tokens}: rollouts are cut before they close </answer>, so every "
              f"format reward is 0 and GRPO has nothing to learn from. Set --rollout.max_new_tokens "
              f"{math.ceil(longest * 1.25)} or more", flush=True)
