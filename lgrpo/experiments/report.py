"""The listener experiment's outputs: ``results.json``, a Markdown table (means ± standard errors) and
PNG plots of the metrics over GRPO steps (matplotlib, headless)."""

from __future__ import annotations

import json
import math
from pathlib import Path

# (split, metric, column title) of the table, in order.
COLUMNS = (
    ("heldout", "accuracy", "held-out acc"),
    ("ood", "accuracy", "OOD acc"),
    ("heldout", "contradiction_rate", "contradiction, held-out"),
    ("ood", "contradiction_rate", "contradiction, OOD"),
    ("heldout", "listener_confidence", "listener conf. in truth, held-out"),
    ("ood", "listener_confidence", "listener conf. in truth, OOD"),
    ("heldout", "format_rate", "format ok"),
    ("heldout", "explained_share", "explained reasoning"),
)
ARM_TITLES = {
    "warmup": "warm-up only",
    "accuracy": "GRPO, fmt + 0.5 acc",
    "listener": "GRPO, fmt + 0.5 acc + 0.5 listener",
    "paper-listener": "GRPO, listener = warmed-up policy",
}
COLOURS = {"warmup": "0.45", "accuracy": "tab:orange", "listener": "tab:blue", "paper-listener": "tab:green"}


def mean_sem(values: list[float | None]) -> tuple[float, float, int]:
    """Mean and standard error (sample std / sqrt n) of the defined values; NaN where undefined."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    if n == 1:
        return mean, math.nan, 1
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n), n


def summary(results: dict) -> dict:
    """``{arm: {split: {metric: {"mean", "sem", "n"}}}}`` over the seeds' final measurements."""
    out = {}
    for arm, seeds in results["arms"].items():
        out[arm] = {}
        for split, metric, _ in COLUMNS:
            m, s, n = mean_sem([r["final"][split][metric] for r in seeds.values()])
            out[arm].setdefault(split, {})[metric] = {"mean": _nan_none(m), "sem": _nan_none(s), "n": n}
    return out


def _nan_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def markdown_table(results: dict) -> str:
    stats = summary(results)
    seeds = sorted({int(s) for seeds in results["arms"].values() for s in seeds})
    head = "| arm | " + " | ".join(title for *_, title in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for arm, per_split in stats.items():
        cells = []
        for split, metric, _ in COLUMNS:
            s = per_split[split][metric]
            if s["mean"] is None:
                cells.append("n/a")
            elif s["sem"] is None:
                cells.append(f"{s['mean']:.3f}")
            else:
                cells.append(f"{s['mean']:.3f} ± {s['sem']:.3f}")
        lines.append(f"| {ARM_TITLES.get(arm, arm)} | " + " | ".join(cells) + " |")
    cfg = results["config"]
    note = (f"Mean ± standard error over seeds {seeds} (greedy, {cfg['eval_size']} held-out and "
            f"{cfg['eval_size']} OOD pairs each; {cfg['grpo_steps']} GRPO steps of {cfg['prompts_per_step']} "
            f"prompts x {cfg['group_size']}).")
    return "\n".join(lines) + "\n\n" + note + "\n"


def _curve_stats(runs: list[list[dict]], key) -> tuple[list[int], list[float], list[float]]:
    """Mean and s.e. over seeds at each step that every seed measured."""
    steps = sorted(set.intersection(*[{p["step"] for p in run} for run in runs])) if runs else []
    means, sems = [], []
    for step in steps:
        m, s, _ = mean_sem([key(next(p for p in run if p["step"] == step)) for run in runs])
        means.append(m)
        sems.append(0.0 if math.isnan(s) else s)
    return steps, means, sems


def plot_curves(results: dict, path: Path) -> Path:
    """Held-out/OOD metrics over GRPO steps (greedy evaluation), one panel per table column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5), constrained_layout=True)
    for ax, (split, metric, title) in zip(axes.flat, COLUMNS):
        for arm, seeds in results["arms"].items():
            runs = [r["curve"] for r in seeds.values()]
            steps, means, sems = _curve_stats(runs, lambda p, s=split, m=metric: p[s][m])
            label = ARM_TITLES.get(arm, arm)
            if arm == "warmup":  # no GRPO: one point, drawn across the whole axis
                if means:
                    ax.axhline(means[0], color=COLOURS[arm], ls="--", lw=1.2, label=label)
                continue
            lo = [m - s for m, s in zip(means, sems)]
            hi = [m + s for m, s in zip(means, sems)]
            colour = COLOURS.get(arm)
            ax.plot(steps, means, marker="o", ms=3, color=colour, label=label)
            ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, loc="lower left")
    n = len(next(iter(results["arms"].values()), {}))
    fig.suptitle(f"Listener experiment (tiny model, shortcut task): mean ± s.e. over {n} seed(s)")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_training(results: dict, path: Path) -> Path:
    """What GRPO saw: the sampled training batches' metrics per step (the shortcut holds on all of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("accuracy", "training accuracy (sampled)"), ("listener", "listener reward r_list"),
              ("contradiction", "contradiction rate (sampled)"), ("explained", "explained reasoning (sampled)"))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), constrained_layout=True)
    for ax, (key, title) in zip(axes, panels):
        for arm, seeds in results["arms"].items():
            runs = [r["train_curve"] for r in seeds.values() if r["train_curve"]]
            if not runs:
                continue
            steps, means, sems = _curve_stats(runs, lambda p, k=key: p[k])
            colour = COLOURS.get(arm)
            ax.plot(steps, means, color=colour, label=ARM_TITLES.get(arm, arm))
            ax.fill_between(steps, [m - s for m, s in zip(means, sems)], [m + s for m, s in zip(means, sems)],
                            color=colour, alpha=0.2, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(results: dict, out: Path) -> list[Path]:
    """``results.json`` (with the summary), ``results.md``, ``curves.png``, ``training.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results, summary=summary(results))
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown_table(results))
    paths.append(plot_curves(results, out / "curves.png"))
    paths.append(plot_training(results, out / "training.png"))
    return paths
