"""Integration paths from a baseline to the input embeddings (REFERENCES.md §3–§4).

A ``Path`` is what an integrated-gradients sum needs: the points where gradients are taken and the
step each one is multiplied by, ``attribution = Σ_r g(points[r]) ⊙ steps[r]``, plus the two ends
(``F(end) − F(start)`` is what the attribution should sum to).

- ``straight``: x′ + α(x − x′) with α and weights from a quadrature rule (the rules of captum's
  ``LayerIntegratedGradients``; ``riemann_trapezoid`` is the true trapezoid rule, weights summing
  to 1, where captum's sum to (n − 1)/n).
- ``discretized`` (DIG, Sanyal & Ren 2021; UDIG, Sinha Roy & Kundu 2024): per token a walk over
  vocabulary words from the input word towards the baseline word, each anchor *monotonized*
  (every dimension between baseline and input, moving monotonically), reversed to run baseline →
  input, optionally up-scaled by midpoints; the sum is the left Riemann sum over that polyline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradgraph.errors import GradGraphError
from gradgraph.neighbours import nearest, vocabulary_neighbours

RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")
STRATEGIES = ("greedy", "maxcount")


@dataclass(frozen=True)
class Path:
    """``points`` and ``steps`` ``[rows, pos, d_model]``; ``start`` and ``end`` ``[pos, d_model]``;
    ``polyline`` ``[N, pos, d_model]`` when the path is a sequence of points (DIG, UDIG, Riemann)."""

    kind: str
    points: torch.Tensor
    steps: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    polyline: torch.Tensor | None = None


def quadrature(rule: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alphas [n], weights [n])`` on [0, 1] for ``rule``."""
    if rule not in RULES:
        raise GradGraphError(f"unknown integration rule {rule!r}; choose one of {RULES}")
    if not isinstance(n, int) or n < 1 or (n < 2 and rule == "riemann_trapezoid"):
        raise GradGraphError(f"steps must be an integer ≥ {2 if rule == 'riemann_trapezoid' else 1}, got {n!r}")
    k = torch.arange(n, dtype=torch.float64)
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)
    if rule == "riemann_trapezoid":
        w = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        w[[0, -1]] /= 2
        return k / (n - 1), w
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
    return (k + offset) / n, torch.full((n,), 1.0 / n, dtype=torch.float64)


def straight(x: torch.Tensor, baseline: torch.Tensor, steps: int, rule: str = "gausslegendre") -> Path:
    """The straight line from ``baseline`` to ``x`` (``[pos, d_model]``) under a quadrature rule."""
    alphas, weights = quadrature(rule, steps)
    alphas, weights = alphas.to(x.dtype)[:, None, None], weights.to(x.dtype)[:, None, None]
    points = baseline + alphas * (x - baseline)
    polyline = None
    if rule == "riemann_left":  # the points and the end: a polyline, so conductance can use it
        polyline = torch.cat([points, x[None]])
    return Path(f"straight ({rule}, {steps} steps)", points, weights * (x - baseline), baseline, x, polyline)


def from_polyline(kind: str, polyline: torch.Tensor) -> Path:
    """A path through ``polyline`` ``[N, pos, d]`` (baseline first, input last): gradients at the
    first N − 1 points times the step to the next (the left Riemann sum of DIG's code)."""
    if polyline.ndim != 3 or polyline.shape[0] < 2:
        raise GradGraphError(f"a path needs at least two points [N, pos, d_model], got {tuple(polyline.shape)}")
    return Path(kind, polyline[:-1], polyline[1:] - polyline[:-1], polyline[0], polyline[-1], polyline)


# --------------------------------------------------------------------------- DIG and UDIG


def monotone(b: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``[..., d]`` bool: the dimensions where ``c`` lies between baseline ``b`` and ``x`` (equal to
    both where they are equal)."""
    low, high = torch.minimum(b, x), torch.maximum(b, x)
    return (c >= low) & (c <= high)


def monotonize(b: torch.Tensor, x: torch.Tensor, c: torch.Tensor, m: int) -> torch.Tensor:
    """``c`` with each non-monotone dimension set to ``x − (x − b) / m`` (DIG, eq. 4)."""
    return torch.where(monotone(b, x, c), c, x - (x - b) / m)


def _pick(W: torch.Tensor, candidates: torch.Tensor, b_id: int, last: int, used: set[int], m: int,
          strategy: str) -> int:
    """The next anchor: among ``candidates`` (ids, nearest first) other than the baseline word,
    the best by ``strategy`` against (baseline, the current anchor's embedding), ties to the nearer,
    skipping words already on the path; the baseline word when none is left."""
    candidates = candidates[candidates != b_id]
    b, x, c = W[b_id], W[last], W[candidates]
    if strategy == "greedy":  # how far monotonizing moves the candidate
        score = (c - monotonize(b, x, c, m)).norm(dim=1)
    else:  # maxcount: the most dimensions already monotone
        score = -monotone(b, x, c).sum(1).double()
    for i in torch.sort(score, stable=True).indices.tolist():
        if int(candidates[i]) not in used:
            return int(candidates[i])
    return b_id


def word_path(model, token: int, baseline: int, m: int, strategy: str, method: str,
              neighbours: torch.Tensor | None = None, k: int = 50) -> list[int]:
    """The anchors ``[token, a_1, …, a_m]`` of one position. ``method="dig"``: candidates are the
    KNN of the current anchor (``neighbours`` from ``vocabulary_neighbours``); ``"udig"``: the ``k``
    words nearest to the point ``b + j/(m+1)·(x − b)``, j = m … 1, walked from the input end."""
    if token == baseline:
        return [token] * (m + 1)
    W = model.W_E.detach()
    if method == "udig":
        j = torch.arange(m, 0, -1, dtype=W.dtype)[:, None] / (m + 1)
        line = W[baseline] + j * (W[token] - W[baseline])  # [m, d], input end first
        per_step = nearest(model, line, min(k, W.shape[0]))
    path, used, last = [token], {token}, token
    for step in range(m):
        if last != baseline:
            candidates = per_step[step] if method == "udig" else neighbours[last].long()
            last = _pick(W, candidates, baseline, last, used, m, strategy)
        path.append(last)
        used.add(last)
    return path


def upscale(polyline: torch.Tensor, factor: int) -> torch.Tensor:
    """``factor`` times, a midpoint between every two consecutive points (N → 2N − 1)."""
    for _ in range(factor):
        out = polyline.new_empty((2 * len(polyline) - 1, *polyline.shape[1:]))
        out[0::2], out[1::2] = polyline, (polyline[:-1] + polyline[1:]) / 2
        polyline = out
    return polyline


def discretized(model, tokens: torch.Tensor, baseline_ids: torch.Tensor, *, method: str = "udig",
                strategy: str = "greedy", m: int = 30, factor: int = 0, k: int | None = None,
                neighbours: torch.Tensor | None = None) -> tuple[Path, list[list[int]]]:
    """The DIG or UDIG path for one prompt ``tokens`` ``[pos]`` with baseline words ``[pos]``:
    ``2^factor · (m + 1) + 1`` points from the baseline embeddings to the input's, and the anchor
    words of each position. ``k``: candidates per step (DIG's KNN size 500; UDIG's 50)."""
    if method not in ("dig", "udig"):
        raise GradGraphError(f"method must be 'dig' or 'udig', got {method!r}")
    if strategy not in STRATEGIES:
        raise GradGraphError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(m, int) or m < 1 or not isinstance(factor, int) or factor < 0:
        raise GradGraphError(f"steps (m) must be an integer ≥ 1 and factor an integer ≥ 0, got {m!r}, {factor!r}")
    W = model.W_E.detach()
    if method == "dig" and neighbours is None:
        neighbours = vocabulary_neighbours(model, min(k or 500, W.shape[0] - 1))
    anchors = [word_path(model, int(t), int(b), m, strategy, method, neighbours, k or 50)
               for t, b in zip(tokens.tolist(), baseline_ids.tolist())]
    columns = []
    for words, b in zip(anchors, baseline_ids.tolist()):
        points = [W[words[0]]]
        for word in words[1:]:  # each anchor monotonized against the previous point
            points.append(monotonize(W[b], points[-1], W[word], m))
        points.append(W[b])
        columns.append(torch.stack(points[::-1]))  # baseline → input, [m + 2, d]
    polyline = upscale(torch.stack(columns, 1), factor)  # [N, pos, d]
    kind = f"{method} ({strategy}, m={m}, {len(polyline)} points)"
    return from_polyline(kind, polyline), anchors


__all__ = ["Path", "RULES", "STRATEGIES", "discretized", "from_polyline", "monotone", "monotonize", "quadrature",
           "straight", "upscale", "word_path"]
