"""Attributions: the one result type every method returns, and LRP on the gradient graph.

``lrp`` builds the graph under an LRP rule set (``gradgraph.rules``) and runs the one recursion with
the real semiring: the value at each node is a modified gradient ``g`` and the relevance there is
``activation ⊙ g`` (gradient × input form, as AttnLRP's reference implementation computes it).
The relevance arriving at the logits is ``logits ⊙ ∂metric/∂logits``, which sums to the metric for a
logit difference, so conservation is measured against the metric value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from gradgraph import hooks
from gradgraph.backprop import backprop
from gradgraph.build import build_graph
from gradgraph.components import KINDS, component_values
from gradgraph.graph import GradGraph
from gradgraph.rules import ATTN_LRP, RuleSet
from gradgraph.semirings import Real


@dataclass(frozen=True, eq=False)
class Attribution:
    """Per-token scores of one method, the value at every graph node, and the method's own error.

    ``target`` is what complete scores sum to (LRP: the metric value; integrated gradients:
    F(input) − F(baseline)) and ``delta = scores.sum(1) − target`` is always filled in.
    ``cut_deltas``: the same at every residual-stream cut (each layer's ``hook_resid_pre`` and
    ``hook_resid_mid``, the last ``hook_resid_post``), where every input → metric path passes."""

    method: str
    tokens: torch.Tensor  # [batch, pos]
    scores: torch.Tensor  # [batch, pos]: 0 at padding
    target: torch.Tensor  # [batch]
    delta: torch.Tensor  # [batch]
    values: Mapping[str, torch.Tensor] = field(repr=False)  # node -> [*node shape]
    graph: GradGraph | None = field(default=None, repr=False)
    cut_deltas: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)  # node -> [batch]
    path: torch.Tensor | None = field(default=None, repr=False)  # [batch, steps, pos, d_model] where a path is used

    def by_component(self, kinds=KINDS) -> list[dict]:
        """Tidy rows ``{component, kind, layer, head, position, batch, value}``: the sum of the values
        of each component's elements (a head's output ``hook_z``, its q/k/v inputs, an MLP's output,
        the embeddings) at each real position."""
        if self.graph is None:
            raise ValueError(f"{self.method}: no graph was kept, so there are no component values")
        rows = component_values(self.graph, {n: v[None] for n, v in self.values.items()}, Real)
        return [r for r in rows if r["kind"] in kinds]


def cuts(graph: GradGraph) -> list[str]:
    """The residual-stream nodes that every input → metric path passes through, bottom to top."""
    out = []
    for layer in range(graph.n_layers):
        out += [hooks.name("resid_pre", layer), hooks.name("resid_mid", layer)]
    return out + [hooks.name("resid_post", graph.n_layers - 1)]


def relevance(graph: GradGraph, method: str | None = None) -> Attribution:
    """``activation ⊙ backprop(graph, Real)`` at every node of a (rule-built) graph, with the input
    relevance per token and the conservation error at the input and at every residual cut."""
    grads = backprop(graph, Real)
    values = {n: grads[n][0] * graph.activations[n] for n in graph.order if n != "metric"}
    real = graph.source_mask.to(graph.dtype)
    scores = sum(values[s].sum(-1) for s in graph.sources) * real  # [batch, pos]
    target = graph.metric_value
    cut_deltas = {n: values[n].flatten(1).sum(1) - target for n in cuts(graph)}
    return Attribution(method or graph.rules, graph.tokens, scores, target, scores.sum(1) - target, values, graph,
                       cut_deltas)


def lrp(
    model,
    tokens,
    metric,
    *,
    rules: RuleSet | str = ATTN_LRP,
    head_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Attribution:
    """Layer-wise relevance propagation of ``metric`` through ``model`` on ``tokens``.

    ``rules``: ``ATTN_LRP`` (default), ``CP_LRP``, ``RELP``, ``CHEFER2021`` or a name.
    ``head_mask`` ``[n_layers, n_heads]`` bool (Mask-LRP; ``gradgraph.heads.mask`` builds it):
    relevance flows down only through the heads marked True. Which rule sets conserve: CP-LRP on a
    model without biases, Chefer et al.'s (up to outputs with a zero denominator); AttnLRP's softmax
    rule and biases do not, and ``delta`` says by how much."""
    graph = build_graph(model, tokens, metric, attention_mask=attention_mask, rules=rules, head_mask=head_mask)
    return relevance(graph)


__all__ = ["Attribution", "cuts", "lrp", "relevance"]
