"""Figures (matplotlib, no computation)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gradgraph.arch.names import METRIC  # noqa: E402

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


def _save(fig, path: str | Path, *, dpi: int = 120, tight_box: bool = False) -> Path:
    """Write and close ``fig``; ``tight_box`` crops to what is drawn (text outside the axes included)
    instead of laying the axes out."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not tight_box:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if tight_box else None)
    plt.close(fig)
    return path


def head_heatmap(values, path: str | Path, *, title: str, label: str) -> Path:
    """Heatmap of a per-head quantity: rows = layers, columns = heads (``values``: [layers, heads])."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * data.shape[1] + 2), max(4, 0.22 * data.shape[0] + 1.5)))
    image = ax.imshow(data, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(data.shape[1]))
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=label)
    return _save(fig, path)


def branch_shares_plot(panels: dict[str, "object"], path: str | Path, *, title: str) -> Path:
    """Stacked q/k/v/skip shares per layer, one panel per entry (``BranchShares`` objects)."""
    colors = {"q": "#4C72B0", "k": "#DD8452", "v": "#55A868", "skip": "#BBBBBB"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, (name, shares) in zip(axes[0], panels.items()):
        share = shares.share.numpy()
        bottom = 0
        layers = range(share.shape[0])
        for i, branch in enumerate(("q", "k", "v", "skip")):
            ax.bar(layers, share[:, i], bottom=bottom, color=colors[branch], label=branch, width=0.85)
            bottom = bottom + share[:, i]
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("share")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def entropy_plot(rows: list[dict], path: str | Path, *, title: str) -> Path:
    """Mean path entropy against number of attractors, one line per condition: in nats, and divided
    by log(number of paths), which makes conditions of different lengths comparable."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "path_entropy", "path entropy (nats)"),
                           (axes[1], "normalised_entropy", "entropy / log(number of paths)")):
        for condition in CONDITION_NAMES:
            mine = sorted((r for r in rows if r["condition"] == condition), key=lambda r: r["n_attractors"])
            if mine:
                ax.errorbar([r["n_attractors"] for r in mine], [r[key] for r in mine],
                            yerr=[r[f"{key}_sem"] for r in mine], marker="o", capsize=3, label=CONDITION_NAMES[condition])
        ax.set_xlabel("number of attractors")
        ax.set_ylabel(label)
        ax.set_xticks([0, 1, 2])
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def agreement_plot(rows: list[dict], path: str | Path, *, title: str) -> Path:
    """Spearman ρ (dot) with its bootstrap interval (a segment from ``spearman_low`` to
    ``spearman_high``, drawn as it is: it need not contain ρ; none where they are NaN), per method
    (rows) and component group (panels), against each ground truth (colours)."""
    import math

    groups = list(dict.fromkeys(r["group"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    truths = list(dict.fromkeys(r["truth"] for r in rows))
    colors = ["#4C72B0", "#C44E52"]
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 2.5, 0.42 * len(methods) + 1.6),
                             sharey=True, squeeze=False)
    for ax, group in zip(axes[0], groups):
        for j, truth in enumerate(truths):
            for i, method in enumerate(methods):
                r = next((r for r in rows if r["group"] == group and r["method"] == method and r["truth"] == truth), None)
                if r is None or math.isnan(r["spearman"]):
                    continue
                y = i + (j - 0.5 * (len(truths) - 1)) * 0.3
                low, high = r["spearman_low"], r["spearman_high"]
                if not (math.isnan(low) or math.isnan(high)):
                    ax.plot([low, high], [y, y], "-|", color=colors[j % 2], lw=1.2, ms=5)
                ax.plot(r["spearman"], y, "o", color=colors[j % 2], ms=4, label=truth if i == 0 else None)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlim(-1.05, 1.05)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("Spearman ρ")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(methods)), methods, fontsize=8)
    axes[0][0].invert_yaxis()
    if any(ax.get_legend_handles_labels()[0] for ax in axes[0]):
        axes[0][-1].legend(*max((ax.get_legend_handles_labels() for ax in axes[0]), key=lambda h: len(h[0])),
                           fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def head_heatmaps(panels: dict[str, "object"], path: str | Path, *, title: str) -> Path:
    """One layer × head heatmap per method (``[layers, heads]`` arrays), each on its own scale."""
    import numpy as np

    n = len(panels)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    first = np.asarray(next(iter(panels.values())))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols + 0.5, (0.11 * first.shape[0] + 0.9) * rows + 0.6),
                             squeeze=False)
    for ax, (name, values) in zip(axes.flat, panels.items()):
        data = np.asarray(values, dtype=float)
        ax.imshow(data, aspect="auto", cmap="viridis", origin="lower")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(data.shape[1]))
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("layer", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("head", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def subject_wins_plot(rows: list[dict], path: str | Path, *, title: str) -> Path:
    """Bars: per method, the share of items whose subject outweighs every attractor, by number of
    attractors (rows from ``compare.subject_wins`` with a method)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    counts = sorted({r["n_attractors"] for r in rows if r["n_attractors"] is not None and r["condition"] != "all"})
    fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 2.5, 3.4))
    width = 0.8 / max(1, len(counts))
    colors = ["#4C72B0", "#DD8452", "#C44E52"]
    for j, n in enumerate(counts):
        values = []
        for method in methods:
            mine = [r for r in rows if r["method"] == method and r["n_attractors"] == n and r["condition"] != "all"]
            total = sum(r["n"] for r in mine)
            values.append(sum(r["subject_wins"] * r["n"] for r in mine) / total if total else float("nan"))
        ax.bar([i + (j - (len(counts) - 1) / 2) * width for i in range(len(methods))], values, width,
               color=colors[j % 3], label=f"{n} attractor{'s' if n != 1 else ''}")
    ax.set_xticks(range(len(methods)), methods, fontsize=8, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("subject > every attractor")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def method_scatter(panels: dict[str, tuple], path: str | Path, *, title: str) -> Path:
    """One scatter per method: score (x) against the intervention effect (y), with Spearman ρ."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False)
    for ax, (name, (x, y, rho, ylabel)) in zip(axes[0], panels.items()):
        ax.scatter(x, y, s=9, alpha=0.6)
        ax.set_title(f"{name}\nSpearman ρ = {rho:+.2f}", fontsize=9)
        ax.set_xlabel("score")
        ax.set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _place(step: str, registry, n_tokens: int) -> tuple[float, float]:
    """Drawing position of a component label: x = layer (embed left, metric right), y = position."""
    if step == METRIC:
        return registry.n_layers + 1.0, n_tokens - 1
    c = registry.parse(step)
    if c.kind == "embed":
        return -1.0, c.position
    offset = {"q": -0.3, "k": -0.2, "v": -0.1, "mlp": 0.35}.get(c.kind, 0.0)
    return c.layer + offset, c.position


def circuit_plot(paths: list[tuple[tuple[str, ...], float, int]], tokens: list[str], path: str | Path, *,
                 title: str, registry) -> Path:
    """Draw component-level paths: x = layer (embed left, metric right), y = token position."""
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(tokens) + 1.8))
    weights = [abs(w) for _, w, _ in paths] or [1.0]
    for rank, (steps, weight, _) in enumerate(paths):
        points = [_place(s, registry, len(tokens)) for s in steps]
        xs, ys = zip(*points)
        ax.plot(xs, ys, "-o", lw=1 + 3 * abs(weight) / max(weights), alpha=0.75, label=f"#{rank + 1} {weight:+.3g}")
        for (x, y), step in zip(points, steps):
            if step != METRIC and registry.parse(step).kind != "embed":
                ax.annotate(registry.everywhere(step), (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points")
    _token_axis(ax, tokens, registry.n_layers)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def component_graph_plot(graph, tokens: list[str], path: str | Path, *, title: str, registry,
                         top_edges: int = 40) -> Path:
    """The strongest edges of a component graph (``components.component_graph``), drawn on the
    layer × position grid; line width ∝ flow, heads that move information across positions show
    as slanted edges."""
    def across(edge) -> bool:
        return METRIC not in edge[:2] and registry.parse(edge[0]).position != registry.parse(edge[1]).position

    ranked = sorted(graph.edges(data=True), key=lambda e: -e[2]["weight"])
    # the strongest edges within a position, and the strongest that attention moves across positions
    edges = [e for e in ranked if not across(e)][: top_edges // 2] + [e for e in ranked if across(e)][: top_edges // 2]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(tokens) + 2))
    top = edges[0][2]["weight"] if edges else 1.0
    for u, v, data in edges:
        (x0, y0), (x1, y1) = _place(u, registry, len(tokens)), _place(v, registry, len(tokens))
        ax.plot([x0, x1], [y0, y1], "-", color="#4C72B0" if y0 == y1 else "#C44E52",
                lw=0.5 + 4 * (data["weight"] / top) ** 0.5, alpha=0.7)
    labelled = {n for u, v, _ in edges for n in (u, v)}
    for node in labelled:
        if node != METRIC and registry.parse(node).kind != "embed":
            x, y = _place(node, registry, len(tokens))
            ax.annotate(registry.everywhere(node), (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points")
    _token_axis(ax, tokens, registry.n_layers)
    ax.set_title(title + "\nstrongest edges within a position (blue) and across positions (red, attention)",
                 fontsize=9)
    return _save(fig, path)


def _token_axis(ax, tokens: list[str], n_layers: int) -> None:
    ax.set_yticks(range(len(tokens)), [repr(t) for t in tokens], fontsize=7)
    ax.set_xlim(-1.8, n_layers + 1.8)
    ax.set_xlabel("layer (left: embeddings, right: metric)")
    ax.grid(alpha=0.2)


def head_types(rows: list[dict], relations: list[str], path: str | Path, *, title: str) -> Path:
    """Layer × head panels: positional share (the offset written in the cell) and each relation's
    accuracy; the heads over threshold are outlined."""
    import numpy as np

    n_layers = max(r["layer"] for r in rows) + 1
    n_heads = max(r["head"] for r in rows) + 1
    panels = [("positional", "offset_share")] + [(rel, f"{rel}_accuracy") for rel in relations]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels) + 1, max(4, 0.2 * n_layers + 1.5)),
                             sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (name, key) in zip(axes, panels):
        data = np.zeros((n_layers, n_heads))
        for r in rows:
            data[r["layer"], r["head"]] = r.get(key, 0.0)
        image = ax.imshow(data, aspect="auto", cmap="magma", origin="lower", vmin=0, vmax=1)
        for r in rows:
            chosen = r["positional"] if name == "positional" else name in r["syntactic"].split(",")
            if chosen:
                ax.add_patch(plt.Rectangle((r["head"] - 0.5, r["layer"] - 0.5), 1, 1, fill=False, lw=1.5,
                                           edgecolor="#00d0ff"))
                if name == "positional":
                    ax.text(r["head"], r["layer"], f"+{r['offset']}", ha="center", va="center", fontsize=6,
                            color="#00d0ff")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.set_xticks(range(n_heads))
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), label="share / accuracy", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, tight_box=True)


def deletion_curves(curves: dict[str, dict[str, list[float]]], levels, path: str | Path, *, title: str,
                    metric: str = "AOPC") -> Path:
    """One panel per dataset: the metric after deleting the top fraction of tokens, per method."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, (dataset, methods) in zip(axes[0], curves.items()):
        for i, (method, values) in enumerate(methods.items()):
            style = "-" if ("Mask-LRP" in method or "LRP" in method) else "--"
            ax.plot([100 * x for x in levels], values, style, marker="o", ms=3, color=cmap(i % 20), label=method)
        ax.set_xlabel("tokens replaced (%)")
        ax.set_ylabel(metric)
        ax.set_title(dataset, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def token_scores(tokens: list[str], methods: dict[str, list[float]], path: str | Path, *, title: str) -> Path:
    """Coloured text, one line per method: red = positive score, blue = negative, each line scaled by
    its own largest |score|."""
    from matplotlib.colors import TwoSlopeNorm

    fig, ax = plt.subplots(figsize=(min(18, 1.0 + 0.75 * len(tokens)), 0.45 * len(methods) + 0.9))
    cmap = plt.get_cmap("coolwarm")
    for row, (method, scores) in enumerate(methods.items()):
        top = max(abs(s) for s in scores) or 1.0
        norm = TwoSlopeNorm(vmin=-top, vcenter=0.0, vmax=top)
        y = len(methods) - row
        ax.text(-0.01, y, method, ha="right", va="center", fontsize=8, transform=ax.get_yaxis_transform())
        for i, (token, score) in enumerate(zip(tokens, scores)):
            ax.text(i, y, token.replace("\n", "⏎"), ha="center", va="center", fontsize=8,
                    bbox=dict(boxstyle="round,pad=0.2", facecolor=cmap(norm(score)), edgecolor="none"))
    ax.set_xlim(-0.6, len(tokens) - 0.4)
    ax.set_ylim(0.4, len(methods) + 0.6)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    return _save(fig, path, dpi=130, tight_box=True)


def ansi_tokens(tokens: list[str], scores: list[float]) -> str:
    """The tokens on coloured backgrounds for a terminal (24-bit colour): red = positive score,
    blue = negative, intensity ∝ |score| / max |score|."""
    top = max((abs(s) for s in scores), default=0.0) or 1.0
    out = []
    for token, score in zip(tokens, scores):
        level = min(1.0, abs(score) / top)
        fade = int(255 * (1 - 0.75 * level))
        red, blue = (255, fade) if score >= 0 else (fade, 255)
        out.append(f"\x1b[48;2;{red};{fade};{blue}m\x1b[38;2;0;0;0m{token.replace(chr(10), '⏎')}\x1b[0m")
    return "".join(out)


def metric_bars(rows: list[dict], metrics, path: str | Path, *, title: str) -> Path:
    """One panel per metric, grouped bars: methods within each dataset (rows: tidy, one per dataset
    and method, with a value for each metric)."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = plt.get_cmap("tab10")
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 2.5, 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, method in enumerate(methods):
            values = [next((r[metric] for r in rows if r["dataset"] == d and r["method"] == method), float("nan"))
                      for d in datasets]
            ax.bar([j + i * width for j in range(len(datasets))], values, width, color=cmap(i % 10), label=method)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(datasets))], datasets, fontsize=8)
        better = {"log_odds": "lower is better", "sufficiency": "lower is better"}.get(metric, "higher is better")
        ax.set_title(f"{metric.replace('_', '-')} ({better})", fontsize=9)
        ax.axhline(0, color="black", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)



def faithfulness_curves(curves: dict[str, tuple], path: str | Path, *, title: str) -> Path:
    """``f(C)`` against the circuit's share of the edges (log scale), one line per method, with the
    full model (f = 1) and the empty circuit (f = 0) marked."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for method, (sizes, f) in curves.items():
        style = dict(color="grey", ls="--") if method == "random" else dict(ls="-")
        ax.plot([100 * s for s in sizes], f, marker="o", ms=3, lw=1.2, label=method, **style)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.0, color="black", lw=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("edges in the circuit (% of the model's)")
    ax.set_ylabel("faithfulness f(C)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, ncol=2)
    return _save(fig, path)


INPUT_COLOURS = {"q": "tab:blue", "k": "tab:green", "v": "tab:orange", "mlp": "tab:purple", "logits": "black"}


def circuit_drawing(layout, path: str | Path, *, title: str, most: int = 150) -> Path:
    """A circuit (``gradgraph.circuits.Layout``), layers left to right: heads stacked in their layer's
    column, each MLP right of them and below; an edge's colour is the input it enters (q, k, v, MLP,
    logits), its width |score|, dashed when the score is negative; the ``most`` strongest lines drawn
    (a grouped key or value input's edge is a line to each head it serves)."""
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.45 * (2 * layout.n_layers + 2))), 6.0))
    edges = sorted(layout.edges, key=lambda e: abs(e.score))[-most:]
    top = max((abs(e.score) for e in edges), default=0.0) or 1.0
    shown = {e.upstream for e in edges} | {e.component for e in edges}
    for e in edges:
        (x0, y0), (x1, y1) = layout.places[e.upstream], layout.places[e.component]
        ax.plot([x0, x1], [y0, y1], color=INPUT_COLOURS[e.kind], lw=0.3 + 3.2 * abs(e.score) / top,
                ls="-" if e.score >= 0 else "--", alpha=0.25 + 0.7 * abs(e.score) / top, zorder=1)
    for label in shown:
        x, y = layout.places[label]
        ax.scatter([x], [y], s=30, color="white", edgecolor="black", zorder=2)
        ax.annotate(label, (x, y), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=5, zorder=3)
    ax.set_xticks([0] + [2 * layer + 1.5 for layer in range(layout.n_layers)] + [2 * layout.n_layers + 1],
                  ["embed"] + [f"L{layer}" for layer in range(layout.n_layers)] + ["logits"], fontsize=6)
    ax.set_yticks([])
    for kind, colour in INPUT_COLOURS.items():
        ax.plot([], [], color=colour, label=f"into {kind}" if kind != "logits" else "into the logits")
    ax.legend(fontsize=7, frameon=False, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=5)
    drawn = f"the {len(edges)} strongest of its {len(layout.edges)} lines" if len(edges) < len(layout.edges) else \
        f"{len(edges)} lines"
    ax.set_title(f"{title}\n{drawn}; width |score|, dashed < 0", fontsize=9, pad=18)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return _save(fig, path)


def auroc_table(rows: list[dict], path: str | Path, *, title: str) -> Path:
    """AUROC of each method (rows) on each program (columns), one panel per level (edges, nodes,
    tokens), the value written in each cell; blank where undefined."""
    import numpy as np

    levels = [lv for lv in ("edges", "nodes", "tokens") if any(r["level"] == lv for r in rows)]
    programs = list(dict.fromkeys(r["program"] for r in rows))
    heights = [len({r["method"] for r in rows if r["level"] == lv}) for lv in levels]
    fig, axes = plt.subplots(len(levels), 1, figsize=(1.3 * len(programs) + 3.2, 0.28 * sum(heights) + 1.3 * len(levels)),
                             gridspec_kw=dict(height_ratios=heights), squeeze=False)
    for ax, level in zip(axes[:, 0], levels):
        methods = list(dict.fromkeys(r["method"] for r in rows if r["level"] == level))
        data = np.full((len(methods), len(programs)), np.nan)
        for r in rows:
            if r["level"] == level:
                data[methods.index(r["method"]), programs.index(r["program"])] = r["auroc"]
        ax.imshow(data, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for (i, j), value in np.ndenumerate(data):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_yticks(range(len(methods)), methods, fontsize=7)
        ax.set_xticks(range(len(programs)), programs if level == levels[-1] else [], fontsize=7)
        ax.set_title(level, fontsize=9, loc="left")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, tight_box=True)
