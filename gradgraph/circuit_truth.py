"""Every method against a compiled circuit (``gradgraph.tracr_models``): node-, edge- and token-level
AUROC, as ACDC (Conmy et al. 2023) scores circuit discovery on tracr programs.

The items are inputs of the longest length, each with a counterfactual input whose output at the
last position differs (drawn at random); the metric is ``logit(clean answer) − logit(counterfactual
answer)`` there (a numerical program: its value, logit 0 − logit 1).

- **edges**: each edge method's (``edge_methods.METHODS``) mean |score| over items against the
  compiled circuit's edges;
- **nodes** (heads and MLPs): an edge method's node score is Σ over the node's outgoing edges of the
  mean |score|; the component methods (``component_methods``: flow, best path, attribution and
  relevance patching, AttnLRP, UDIG conductance) score the node itself (mean |score|);
- **tokens**: each input attribution (``attribution.attribute``: saliency, gradient × input,
  SmoothGrad, IG, DIG, UDIG, LAFA; the baseline tracr's padding token) against the positions the
  output depends on (those where some other token changes the compiled output), |attribution| over
  every (item, position); undefined where every position matters.

AUROC = P(score of a member > score of a non-member) + ½ P(tie) (the Mann–Whitney statistic), so
tied zeros count half, never as a win.
"""

from __future__ import annotations

import random

import torch

from gradgraph import component_methods
from gradgraph.attribution import attribute
from gradgraph.edge_methods import METHODS as EDGE_METHODS
from gradgraph.edge_methods import NEEDS_COUNTERFACTUAL, edge_scores
from gradgraph.errors import GradGraphError
from gradgraph.metrics import logit_diff
from gradgraph.tracr_models import Compiled

COMPONENT_METHODS = ("flow", "top_path", "attribution", "relp", "attn_lrp", "udig")
TOKEN_METHODS = ("saliency", "grad_x_input", "smoothgrad", "ig", "dig", "udig", "lafa")


def auroc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """P(s⁺ > s⁻) + ½ P(s⁺ = s⁻) over members (``truth``) and non-members; NaN when either is empty."""
    scores, truth = scores.flatten().double(), truth.flatten().bool()
    pos, neg = scores[truth], scores[~truth]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return float(wins / (len(pos) * len(neg)))


def items(compiled: Compiled, n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, counterfactual tokens, good class, bad class)``: ``n`` inputs, each with an input
    whose compiled output at the last position differs."""
    answers = [row[-1] for row in compiled.meta["outputs"]]
    rng = random.Random(seed)
    chosen = rng.sample(range(len(answers)), min(n, len(answers)))
    others = []
    for i in chosen:
        differing = [j for j in range(len(answers)) if answers[j] != answers[i]]
        if not differing:
            raise GradGraphError(f"{compiled.name}: every input has the same output; no counterfactual differs")
        others.append(rng.choice(differing))
    classes = compiled.meta["classes"]
    if compiled.meta["numerical"]:
        good, bad = torch.zeros(len(chosen), dtype=torch.long), torch.ones(len(chosen), dtype=torch.long)
    else:
        good = torch.tensor([classes.index(answers[i]) for i in chosen])
        bad = torch.tensor([classes.index(answers[j]) for j in others])
    return compiled.inputs[chosen], compiled.inputs[others], good, bad


def dependence(compiled: Compiled, tokens: torch.Tensor) -> torch.Tensor:
    """``[items, pos]`` bool: the positions where some other word changes the compiled output at the
    last position (BOS never)."""
    row = {tuple(t): k for k, t in enumerate(compiled.inputs.tolist())}
    answers = [r[-1] for r in compiled.meta["outputs"]]
    words = sorted({int(t) for t in compiled.inputs[:, 1:].flatten()})
    out = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, t in enumerate(tokens.tolist()):
        for p in range(1, len(t)):
            out[i, p] = any(answers[row[tuple(t[:p] + [w] + t[p + 1:])]] != answers[row[tuple(t)]] for w in words)
    return out


def evaluate(compiled: Compiled, *, n: int = 32, steps: int = 5, seed: int = 0) -> list[dict]:
    """Rows ``{program, level, method, auroc, members, non_members}`` for every method (see the module)."""
    model, truth = compiled.model, compiled.circuit
    tokens, other, good, bad = items(compiled, n, seed=seed)
    metric = logit_diff(good, bad)
    graph = truth.graph
    heads_mlps = [u for u, label in enumerate(graph.upstream) if label != "embed"]
    node_truth = truth.edges.any(1)[heads_mlps]
    rows = []

    def row(level: str, method: str, value: float, members: int, total: int) -> None:
        rows.append(dict(program=compiled.name, level=level, method=method, auroc=value, members=members,
                         non_members=total - members))

    for method in EDGE_METHODS:
        scored = edge_scores(model, tokens, metric, other if method in NEEDS_COUNTERFACTUAL else None, method=method,
                             steps=steps)
        mean = scored.scores.abs().mean(0)  # [U, D]
        on = graph.adjacency
        row("edges", method, auroc(mean[on], truth.edges[on]), int(truth.edges.sum()), int(on.sum()))
        row("nodes", method, auroc(mean.sum(1)[heads_mlps], node_truth), int(node_truth.sum()), len(heads_mlps))
    mask = torch.ones_like(tokens)
    scores = component_methods.score(model, tokens, mask, good, bad, methods=COMPONENT_METHODS, counterfactual=other,
                                     baseline=compiled.pad)
    labels = component_methods.component_labels(model)
    index = [labels.index(graph.upstream[u]) for u in heads_mlps]
    for method in COMPONENT_METHODS:
        values = scores.components[method].abs().mean(0)[index]
        row("nodes", f"{method} (component)", auroc(values, node_truth), int(node_truth.sum()), len(heads_mlps))
    depends = dependence(compiled, tokens)
    positions = list(range(1, tokens.shape[1]))
    corpus = compiled.inputs[torch.randperm(len(compiled.inputs), generator=torch.Generator().manual_seed(seed))[:64]]
    for method in TOKEN_METHODS:
        extra = dict(corpus=corpus) if method == "lafa" else {}  # LAFA's neighbours: other inputs
        value = torch.cat([attribute(model, tokens[i:i + 1], logit_diff(int(good[i]), int(bad[i])), method=method,
                                     baseline=compiled.pad, positions=positions, **extra).scores.abs()[:, 1:]
                           for i in range(len(tokens))])  # one prompt at a time, as attribute runs them
        row("tokens", method, auroc(value, depends[:, 1:]), int(depends.sum()), depends[:, 1:].numel())
    return rows


__all__ = ["COMPONENT_METHODS", "TOKEN_METHODS", "auroc", "dependence", "evaluate", "items"]
