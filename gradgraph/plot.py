"""Figures (matplotlib, no computation)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONDITION_NAMES = {
    "simple": "simple",
    "pp": "across PP",
    "src": "across subj. RC",
    "orc": "across obj. RC",
}


def sva_accuracy(table: list[dict], path: str | Path, *, title: str) -> Path:
    """Grouped bars: accuracy per condition, one bar per number of attractors."""
    rows = [r for r in table if r["condition"] != "all"]
    conditions = [c for c in CONDITION_NAMES if any(r["condition"] == c for r in rows)]
    attractor_counts = sorted({r["n_attractors"] for r in rows})
    width = 0.8 / max(1, len(attractor_counts))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = ["#4C72B0", "#DD8452", "#C44E52", "#55A868"]
    for j, n_attr in enumerate(attractor_counts):
        xs, ys, ns = [], [], []
        for i, condition in enumerate(conditions):
            match = [r for r in rows if r["condition"] == condition and r["n_attractors"] == n_attr]
            if match:
                xs.append(i + (j - (len(attractor_counts) - 1) / 2) * width)
                ys.append(match[0]["accuracy"])
                ns.append(match[0]["n"])
        bars = ax.bar(xs, ys, width, label=f"{n_attr} attractor{'s' if n_attr != 1 else ''}", color=colors[j % 4])
        for bar, n in zip(bars, ns):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, f"{bar.get_height():.2f}",
                    ha="center", va="bottom", fontsize=7)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(conditions)), [CONDITION_NAMES[c] for c in conditions])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy (good verb preferred)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower left", ncols=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
