"""How well each method's component ranking agrees with interventions, with bootstrap intervals
over items; and token-level checks of the subject against the attractors.

A component's importance under a method (or an intervention) is the mean over items of the
magnitude of its score (effect), |·|: a method that gets the sign of an effect wrong still ranks the
component right, and a mean of signed effects would let items cancel. Agreement of a method with
an intervention on a group of components (heads, q/k/v inputs, MLPs, all):

- Spearman ρ between the two importance vectors;
- top-k overlap: the fraction of the intervention's k most important components that are among the
  method's k most important.

Both with a basic bootstrap interval over items (``gradgraph.bootstrap``: ``resamples`` resamples,
none below ``bootstrap.MIN_ITEMS`` items). A ρ over few items is biased towards 0, and the interval,
for the value over infinitely many items, can lie above the estimate; it is reported as it is.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from gradgraph.bootstrap import MIN_ITEMS, basic, resample_weights
from gradgraph.errors import GradGraphError
from gradgraph.labels import KINDS, Component, Registry

GROUPS = {"heads": ("head",), "q/k/v inputs": ("q", "k", "v"), "MLPs": ("mlp",), "all": KINDS}  # component kinds
TOP_K = {"heads": 10, "q/k/v inputs": 10, "MLPs": 5, "all": 10}


COLUMN_KIND = {"q": "q", "k": "k", "v": "v", "head": "head", "mlp": "MLP"}  # the kind column of the studies' tables


def head_grid(registry: Registry, labels: list[str], values) -> torch.Tensor:
    """``values`` per component (``labels``, in order) → ``[n_layers, n_heads]`` of the head outputs."""
    grid = torch.zeros(registry.n_layers, registry.n_heads, dtype=torch.float64)
    for column, label in enumerate(labels):
        c = registry.parse(label)
        if c.kind == "head":
            grid[c.layer, c.head] = float(values[column])
    return grid


def importance(scores: np.ndarray) -> np.ndarray:
    """``[..., items, components]`` → ``[..., components]``: mean over items of |score|."""
    return np.abs(scores).mean(-2)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman ρ along the last axis (average ranks for ties), vectorised over leading axes."""
    ra, rb = rankdata(a, axis=-1), rankdata(b, axis=-1)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    denominator = np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(-1) / denominator, np.nan)


def _overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Fraction of ``b``'s top k among ``a``'s top k, along the last axis."""
    k = min(k, a.shape[-1])
    top_a = np.argsort(-a, axis=-1, kind="stable")[..., :k]
    top_b = np.argsort(-b, axis=-1, kind="stable")[..., :k]
    return (top_a[..., :, None] == top_b[..., None, :]).any(-1).sum(-1) / k


def agreement(method: torch.Tensor, truth: torch.Tensor, components: list[Component], *, resamples: int = 1000,
              seed: int = 0) -> list[dict]:
    """Rows ``{group, n_items, components, spearman, spearman_low, spearman_high, top_k, overlap,
    overlap_low, overlap_high, interval}`` for ``method`` and ``truth`` scores ``[items, components]``
    of ``components`` (``Registry.parse`` of the score columns' labels)
    (the same items), with 95 % basic bootstrap intervals (NaN below ``bootstrap.MIN_ITEMS`` items; ``interval``
    says which)."""
    m, t = np.abs(method.double().numpy()), np.abs(truth.double().numpy())
    n = m.shape[0]
    if n == 0 or t.shape[0] != n:
        raise GradGraphError(f"agreement needs the same items for the method and the truth, got {n} and {t.shape[0]}")
    weights = resample_weights(n, resamples, seed) if n >= MIN_ITEMS else None
    rows = []
    for group, kinds in GROUPS.items():
        columns = [i for i, c in enumerate(components) if c.kind in kinds]
        if not columns:
            continue
        k = TOP_K[group]
        a, b = m[:, columns], t[:, columns]  # importance under weights w: w @ |score|
        rho = basic(lambda w: spearman(w @ a, w @ b), n, weights=weights, bounds=(-1, 1))
        overlap = basic(lambda w: _overlap(w @ a, w @ b, k), n, weights=weights, bounds=(0, 1))
        rows.append(dict(group=group, n_items=n, components=len(columns), spearman=rho.estimate,
                         spearman_low=rho.low, spearman_high=rho.high, top_k=min(k, len(columns)),
                         overlap=overlap.estimate, overlap_low=overlap.low, overlap_high=overlap.high,
                         interval=rho.note))
    return rows


def subject_wins(scores: list[torch.Tensor], items) -> list[dict]:
    """Per condition and number of attractors: how often the subject's |attribution| exceeds every
    attractor's. ``scores[i]`` is item i's token scores (NaN: the method did not run on it);
    items without attractors are left out."""
    groups: dict[tuple[str, int], list[bool]] = {}
    for score, item in zip(scores, items):
        if not item.attractor_pos or bool(torch.isnan(score).any()):
            continue
        values = score.abs()
        won = bool(values[item.subject_pos] > max(values[p] for p in item.attractor_pos))
        groups.setdefault((item.condition, item.n_attractors), []).append(won)
        groups.setdefault(("all", None), []).append(won)
    return [dict(condition=c, n_attractors=n, n=len(v), subject_wins=sum(v) / len(v))
            for (c, n), v in sorted(groups.items(), key=lambda kv: (kv[0][0] != "all", kv[0][0], kv[0][1] or 0))]


__all__ = ["COLUMN_KIND", "GROUPS", "TOP_K", "agreement", "head_grid", "importance", "spearman", "subject_wins"]
