"""The held-out report: its numbers from per-pair judgements, as a table and as JSON.

:func:`summarize` turns the judgements :func:`lgrpo.heldout.judge` collects (one row per pair: accuracy,
format, answer, the contradiction statistic of :func:`lgrpo.rewards.contradiction`, the listener's
confidence) into accuracy, contradiction rate, agree/disagree accuracy and position bias;
:func:`format_report` prints them, :func:`write_report` saves them. Used by ``python -m lgrpo.eval``, the
trainer's held-out evaluations and the experiments.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def _nanmean(x: torch.Tensor) -> float:
    x = x.double()
    keep = ~torch.isnan(x)
    return float(x[keep].mean()) if bool(keep.any()) else float("nan")


def summarize(plain: dict, swapped: dict | None) -> dict:
    """The report's numbers from per-example judgements (tensors; NaN = undefined for that row)."""
    acc, contra = plain["accuracy"], plain["contradiction"]
    comparable = ~torch.isnan(contra)
    agree = comparable & (contra == 0)
    disagree = comparable & (contra == 1)
    report = {
        "n": int(acc.numel()),
        "accuracy": _nanmean(acc),
        "format_rate": _nanmean(plain["format"]),
        "answered": float((plain["answer"] > 0).double().mean()) if acc.numel() else float("nan"),
        "contradiction_rate": _nanmean(contra),
        "accuracy_agree": _nanmean(acc[agree]) if bool(agree.any()) else float("nan"),
        "accuracy_disagree": _nanmean(acc[disagree]) if bool(disagree.any()) else float("nan"),
        "n_agree": int(agree.sum()),
        "n_disagree": int(disagree.sum()),
        "listener_confidence": _nanmean(plain["listener"]),
        "answer_1_rate": float((plain["answer"] == 1).double().mean()) if acc.numel() else float("nan"),
    }
    if swapped is not None:
        a, b = plain["answer"], swapped["answer"]
        both = (a > 0) & (b > 0)
        report.update(
            {
                "accuracy_swapped": _nanmean(swapped["accuracy"]),
                # Same image chosen both ways: answer k as presented, 3 - k after the swap.
                "consistency": float(((a + b == 3) & both).double().sum() / max(int(both.sum()), 1))
                if bool(both.any())
                else float("nan"),
            }
        )
        report["position_bias"] = report["accuracy"] - report["accuracy_swapped"]
    return report


def format_report(report: dict, title: str = "evaluation") -> str:
    rows = [
        ("pairs", "n", "{:d}"),
        ("accuracy", "accuracy", "{:.3f}"),
        ("accuracy, images swapped", "accuracy_swapped", "{:.3f}"),
        ("position consistency", "consistency", "{:.3f}"),
        ("format ok", "format_rate", "{:.3f}"),
        ("answered", "answered", "{:.3f}"),
        ("answers '1'", "answer_1_rate", "{:.3f}"),
        ("contradiction rate", "contradiction_rate", "{:.3f}"),
        ("accuracy | listener agrees", "accuracy_agree", "{:.3f}"),
        ("accuracy | listener disagrees", "accuracy_disagree", "{:.3f}"),
        ("listener confidence in truth", "listener_confidence", "{:.3f}"),
    ]
    lines = [title, "-" * 44]
    for label, key, fmt in rows:
        v = report.get(key)
        if v is None:
            continue
        text = "n/a" if isinstance(v, float) and math.isnan(v) else fmt.format(v)
        if key in ("accuracy_agree",):
            text += f"  (n={report.get('n_agree', 0)})"
        if key in ("accuracy_disagree",):
            text += f"  (n={report.get('n_disagree', 0)})"
        lines.append(f"{label:<32} {text}")
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in report.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean, indent=2) + "\n")
    tmp.replace(path)
    return path
