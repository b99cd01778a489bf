"""Human-facing renderings of a run: plots and markdown. Pure: data in, bytes/str out."""

from __future__ import annotations

import io
from typing import Any

from protein.labels import LABELS


def training_plot_png(history: list[dict[str, Any]], challenger_f1: list[float],
                      champion_f1: list[float] | None = None, title: str = "") -> bytes:
    """Training curves (loss, holdout F1 per epoch) beside per-class holdout F1 bars."""
    import matplotlib

    matplotlib.use("Agg")  # headless workers have no display
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    epochs = [h["epoch"] for h in history]
    curves.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    curves.plot(epochs, [h["holdout_loss"] for h in history], marker="o", label="holdout loss")
    curves.set_xlabel("epoch")
    curves.set_ylabel("BCE loss")
    f1_axis = curves.twinx()
    f1_axis.plot(epochs, [h["holdout_f1_samples"] for h in history], color="tab:green", marker="s",
                 label="holdout F1 (samples, @0.5)")
    f1_axis.set_ylim(0, 1)
    f1_axis.set_ylabel("F1")
    lines = curves.get_legend_handles_labels()
    more = f1_axis.get_legend_handles_labels()
    curves.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
    curves.set_title("training")

    positions = np.arange(len(challenger_f1))
    width = 0.4 if champion_f1 is not None else 0.8
    bars.bar(positions - (width / 2 if champion_f1 is not None else 0), challenger_f1, width, label="challenger")
    if champion_f1 is not None:
        bars.bar(positions + width / 2, champion_f1, width, label="champion")
    bars.set_xticks(positions, [f"{i} {name[:14]}" for i, name in enumerate(LABELS[: len(challenger_f1)])],
                    rotation=60, ha="right", fontsize=8)
    bars.set_ylim(0, 1)
    bars.set_ylabel("holdout F1")
    bars.set_title("per-class F1")
    bars.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def per_class_rows(challenger: dict[str, Any], champion: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per class: challenger vs champion precision/recall/F1 on the same holdout."""
    rows = []
    for i, name in enumerate(LABELS):
        row: dict[str, Any] = {
            "class": f"{i} {name}",
            "support": challenger["per_class"]["support"][i],
            "challenger_f1": round(challenger["per_class"]["f1"][i], 4),
            "challenger_precision": round(challenger["per_class"]["precision"][i], 4),
            "challenger_recall": round(challenger["per_class"]["recall"][i], 4),
        }
        if champion is not None:
            row["champion_f1"] = round(champion["per_class"]["f1"][i], 4)
            row["delta_f1"] = round(challenger["per_class"]["f1"][i] - champion["per_class"]["f1"][i], 4)
        rows.append(row)
    return rows


def _interval_text(interval: dict[str, Any]) -> str:
    return (f"{interval['estimate']:+.4f}, {interval['confidence']:.0%} interval [{interval['low']:+.4f}, "
            f"{interval['high']:+.4f}] (paired bootstrap, {interval['resamples']} resamples over "
            f"{interval['rows']} images, seed {interval['seed']})")


def gate_markdown(decision: dict[str, Any], challenger_id: str, champion_id: str | None) -> str:
    verdict = "PROMOTE" if decision["promote"] else "KEEP CHAMPION"
    lines = [f"# Gate: {verdict}", "", f"- challenger: `{challenger_id}`", f"- champion: `{champion_id or 'none'}`",
             f"- metric: `{decision['metric']}`: challenger {decision['challenger_score']:.4f}"
             + (f", champion {decision['champion_score']:.4f}, gain {decision['gain']:+.4f}"
                if decision.get("champion_score") is not None else "")]
    if decision.get("gain_interval"):
        lines.append(f"- gain: {_interval_text(decision['gain_interval'])}")
    elif decision.get("score_interval"):
        lines.append(f"- score: {_interval_text(decision['score_interval'])}")
    rows = decision.get("rows") or {}
    if rows:
        lines.append(f"- rows: {rows.get('n', 0)} ({rows.get('selection', '')}); ids sha256 "
                     f"`{str(rows.get('sha256', ''))[:16]}`, listed in the gate record")
    lines += ["", "## Reasons"]
    lines += [f"- {reason}" for reason in decision["reasons"]]
    return "\n".join(lines)
