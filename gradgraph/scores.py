"""Per-item head and MLP scores from one gradient graph, and intervention effects in the same layout
(``[batch, n_layers, n_heads + 1]``: the heads of each layer, then its MLP)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradgraph.backprop import backprop, forward
from gradgraph.components import Component, Registry, head_mlp_scores
from gradgraph.graph import GradGraph
from gradgraph.semirings import Abs, Max, Real, Semiring


@dataclass
class GraphScores:
    """``flow_share``: share of the total |gradient| flow (Abs) through each head's output and MLP;
    ``top_path``: the best path through it relative to the best path overall (Max);
    ``gradients``: Real gradients at the head and MLP outputs (for attribution patching);
    ``max_backward``: ``backprop(graph, Max)`` (branch shares reuse it)."""

    flow_share: torch.Tensor  # [batch, layers, heads + 1]
    top_path: torch.Tensor  # [batch, layers, heads + 1]
    gradients: dict[str, torch.Tensor]
    max_backward: dict[str, torch.Tensor]


def _through(graph: GradGraph, semiring: Semiring, nodes: list[str]) -> tuple[dict, torch.Tensor, dict]:
    """(forward ⊗ backward at ``nodes``, the ⊕ over all input → metric paths per item, backward values)."""
    dtype = semiring.safe_dtype
    bwd = backprop(graph, semiring, dtype=dtype)
    fwd = forward(graph, semiring, dtype=dtype, keep=nodes)
    total = None
    for source in graph.sources:
        value = semiring.sum(bwd[source].flatten(2), 1)  # [S, batch]
        total = value if total is None else semiring.plus(total, value)
    return {n: semiring.times(fwd[n], bwd[n]) for n in nodes}, total[0].double().cpu(), bwd


def graph_scores(graph: GradGraph) -> GraphScores:
    """Flow shares, top-path values and gradients at every head and MLP of every item."""
    reg = Registry.of(graph)
    nodes = [reg.nodes(c)[0] for c in reg.components(kinds=("head", "mlp")) if c.head in (None, 0)]
    flows, total_flow, _ = _through(graph, Abs, nodes)
    best, best_overall, max_backward = _through(graph, Max, nodes)
    gradients = {n: v[0] for n, v in backprop(graph, Real, keep=nodes).items()}
    return GraphScores(
        flow_share=head_mlp_scores(graph, flows, Abs) / total_flow[:, None, None],
        # the same best path multiplied in another order can exceed the overall best by float32 rounding
        top_path=(head_mlp_scores(graph, best, Max) / best_overall[:, None, None]).clamp(max=1.0),
        gradients=gradients,
        max_backward=max_backward,
    )


def stack_effects(effects: dict[str, torch.Tensor], registry: Registry) -> torch.Tensor:
    """``{label: [batch]}`` (``L3H7``, ``MLP3``) -> ``[batch, n_layers, n_heads + 1]``."""
    rows = []
    for layer in range(registry.n_layers):
        labels = [registry.label(Component("head", layer, h)) for h in range(registry.n_heads)]
        labels.append(registry.label(Component("mlp", layer)))
        rows.append(torch.stack([effects[label] for label in labels], 1))
    return torch.stack(rows, 1).double().cpu()
