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
from gradgraph.build import assemble, build_graph, record
from gradgraph.components import KINDS, component_values
from gradgraph.graph import GradGraph
from gradgraph.rules import ATTN_LRP, CHEFER2021, GRADIENT, RuleSet
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


def token_scores(graph: GradGraph, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[batch, pos]``: Σ over the input nodes and d_model of activation ⊙ value, for ``grads``
    from ``backprop(graph, Real)`` (gradient × input, or LRP relevance); 0 at padding."""
    scores = sum((grads[s][0] * graph.activations[s]).sum(-1) for s in graph.sources)
    return scores * graph.source_mask.to(scores.dtype)


def relevance(graph: GradGraph, method: str | None = None) -> Attribution:
    """``activation ⊙ backprop(graph, Real)`` at every node of a (rule-built) graph, with the input
    relevance per token and the conservation error at the input and at every residual cut."""
    grads = backprop(graph, Real)
    values = {n: grads[n][0] * graph.activations[n] for n in graph.order if n != "metric"}
    scores = token_scores(graph, grads)
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


# --------------------------------------------------------------------------- attention maps


def _patterns(graph: GradGraph) -> list[str]:
    return [hooks.name("pattern", layer) for layer in range(graph.n_layers)]


def _map(method: str, graph: GradGraph, rows: torch.Tensor, drop_self: bool = False) -> Attribution:
    """An explanation map's row for each item's last real token (the position a next-token metric
    reads) as token scores; ``drop_self`` zeroes that token's own entry (Mask-LRP's code zeroes the
    explained token's self-entry). Maps do not claim completeness: ``delta`` is Σ scores − metric."""
    last = graph.attention_mask.sum(1) - 1  # [batch]
    items = torch.arange(len(last))
    scores = rows[items, last] * graph.source_mask.to(rows.dtype)  # [batch, pos]
    if drop_self:
        scores = scores.clone()
        scores[items, last] = 0
    target = graph.metric_value
    return Attribution(method, graph.tokens, scores, target, scores.sum(1) - target, {}, graph)


def _rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """``Π_l normalise(I + A_l)`` from the first layer up (rows normalised), ``[batch, pos, pos]``."""
    eye = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype, device=maps[0].device)
    out = eye.expand_as(maps[0])
    for a in maps:
        step = eye + a
        out = (step / step.sum(-1, keepdim=True)) @ out
    return out


def raw_attention(graph: GradGraph) -> Attribution:
    """The last layer's attention from the last token, averaged over heads."""
    return _map("raw attention", graph, graph.activations[_patterns(graph)[-1]].mean(1))


def attention_rollout(graph: GradGraph) -> Attribution:
    """Attention rollout (Abnar & Zuidema 2020): per layer the head-averaged pattern with the
    residual as identity, ``(A + I) / 2``, multiplied from the first layer up."""
    return _map("attention rollout", graph, _rollout([graph.activations[p].mean(1) for p in _patterns(graph)]))


def chefer_rollout(gradient_graph: GradGraph, rule_graph: GradGraph, method: str | None = None, *,
                   gradients: dict[str, torch.Tensor] | None = None) -> Attribution:
    """Chefer et al.'s explanation map, as Mask-LRP's code computes it: per layer the gradient ⊙
    relevance of the attention pattern, clamped at 0 and averaged over heads, rolled out with the
    identity added and rows normalised, the explained token's own entry set to 0. The gradient comes
    from ``gradient_graph`` (``GRADIENT``),
    the relevance from ``rule_graph`` (``CHEFER2021``, with Mask-LRP's head mask where given);
    both from one recording. ``gradients`` may pass ``backprop(gradient_graph)`` values already
    computed (at least at the patterns)."""
    patterns = _patterns(rule_graph)
    grads = gradients if gradients is not None else backprop(gradient_graph, keep=patterns)
    mods = backprop(rule_graph, keep=patterns)
    maps = [(grads[p][0] * mods[p][0] * rule_graph.activations[p]).clamp(min=0).mean(1) for p in patterns]
    return _map(method or f"rollout ({rule_graph.rules})", rule_graph, _rollout(maps), drop_self=True)


def partial_lrp(rule_graph: GradGraph) -> Attribution:
    """Partial LRP (Voita et al. 2019): the relevance of the last layer's attention pattern from the
    last token, averaged over heads."""
    last = _patterns(rule_graph)[-1]
    relevance = backprop(rule_graph, keep=[last])[last][0] * rule_graph.activations[last]
    return _map(f"partial LRP ({rule_graph.rules})", rule_graph, relevance.mean(1))


def mask_lrp(
    model,
    tokens,
    metric,
    *,
    head_mask: torch.Tensor | None = None,
    rules: RuleSet | str = CHEFER2021,
    attention_mask: torch.Tensor | None = None,
) -> Attribution:
    """Mask-LRP's token scores (Song et al. 2024): Chefer et al.'s rollout of gradient ⊙ relevance,
    with relevance flowing down only through the heads of ``head_mask`` (``gradgraph.heads.mask``;
    None: every head, which is Chefer et al.'s own map). One forward pass, two assemblies."""
    recording = record(model, tokens, metric, attention_mask=attention_mask)
    rule_graph = assemble(recording, rules, head_mask=head_mask)
    return chefer_rollout(assemble(recording, GRADIENT), rule_graph, f"Mask-LRP ({rule_graph.rules})")


__all__ = ["Attribution", "attention_rollout", "chefer_rollout", "cuts", "lrp", "mask_lrp", "partial_lrp",
           "raw_attention", "relevance", "token_scores"]
