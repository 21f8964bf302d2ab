"""The edge graph of edge attribution patching (EAP; Syed et al. 2023, Hanna et al. 2024's EAP-IG, the
graph MIB scores circuits on).

Upstream nodes write into the residual stream: the input embeddings (``embed``: the residual before
layer 0), each head's output (``L3H7``: ``z[:, :, 7] @ W_O[7]``) and each MLP's output (``MLP3``).
Downstream nodes read it: each head's query, key and value input (``L3H7.q``; grouped-query
attention's ``L3H6-8.k``), each MLP's input (``MLP3``) and the logits (``logits``: the residual
after the last layer). An edge ``u->d`` exists wherever the residual at ``d``'s input holds ``u``'s
output: ``u`` writes before ``d`` reads (a layer's heads before its MLP in a sequential block, not
in a parallel one, where both read the layer's input).

Scores of the edges by every method: ``gradgraph.edge_methods``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradgraph.arch.features import layout_features
from gradgraph.arch.lens import Model
from gradgraph.arch.spec import check_supported
from gradgraph.errors import GradGraphError
from gradgraph.labels import Component, Registry

LOGITS = "logits"
# layouts whose head and MLP outputs do not add into the residual stream as they are
_NOT_ADDITIVE = ("norms after attention and MLP",)


@dataclass(frozen=True)
class EdgeGraph:
    """Upstream and downstream nodes by label (in residual order), and which pairs are edges."""

    upstream: tuple[str, ...]
    downstream: tuple[str, ...]
    adjacency: torch.Tensor  # [upstream, downstream] bool
    registry: Registry
    d_model: int

    @property
    def edges(self) -> list[str]:
        """Every edge's label, ``"u->d"``, upstream by upstream."""
        return [f"{self.upstream[u]}->{self.downstream[d]}" for u, d in self.adjacency.nonzero().tolist()]

    def __len__(self) -> int:
        return int(self.adjacency.sum())

    def index(self, edge: str) -> tuple[int, int]:
        """``(upstream, downstream)`` indices of an edge label."""
        up, sep, down = edge.partition("->")
        if not sep or up not in self.upstream or down not in self.downstream:
            raise GradGraphError(f"{edge!r} is not an edge label of this model (e.g. {self.edges[0]!r}: "
                                 "upstream 'embed', 'L3H7' or 'MLP3'; downstream 'L3H7.q', 'MLP3' or 'logits')")
        u, d = self.upstream.index(up), self.downstream.index(down)
        if not self.adjacency[u, d]:
            raise GradGraphError(f"{edge!r}: {up} writes to the residual stream after {down} reads it")
        return u, d


def edge_graph(model: Model) -> EdgeGraph:
    """EAP's edge graph of ``model`` (every decoder family whose head and MLP outputs add into the
    residual stream as they are)."""
    spec = check_supported(model)
    if spec.layout != "decoder":
        raise GradGraphError("edge graphs are defined for decoders (an encoder's post-norm residual is no sum of "
                             "its components' outputs)")
    blocked = [f for f in layout_features(spec.cfg) if f in _NOT_ADDITIVE]
    if blocked:
        raise GradGraphError(f"{blocked[0]}: a head's output is normalised with the others' before it joins the "
                             "residual stream, so EAP's edges are not defined; use the node methods "
                             "(gradgraph.interventions.attribution_patching)")
    reg = Registry.of(model)
    up: list[tuple[str, float]] = [("embed", -1.0)]  # (label, when it is written: layer, + 0.5 after attention)
    down: list[tuple[str, float]] = []
    for layer in range(reg.n_layers):
        for kind in ("q", "k", "v"):
            down += [(reg.label(Component(kind, layer, h)), layer) for h in range(reg.copies(kind))]
        up += [(reg.label(Component("head", layer, h)), layer) for h in range(reg.n_heads)]
        if reg.mlps:
            down.append((reg.label(Component("mlp", layer)), layer + (0.5 if reg.sequential else 0.0)))
            up.append((reg.label(Component("mlp", layer)), layer + 0.5))
    down.append((LOGITS, float(reg.n_layers)))
    written = torch.tensor([t for _, t in up])
    read = torch.tensor([t for _, t in down])
    return EdgeGraph(tuple(u for u, _ in up), tuple(d for d, _ in down), written[:, None] < read[None, :], reg,
                     spec.cfg.d_model)


@dataclass(frozen=True)
class EdgeScores:
    """Per-prompt edge scores ``[batch, upstream, downstream]`` (zero off the edges) and their graph."""

    graph: EdgeGraph
    scores: torch.Tensor
    method: str

    def of(self, edge: str) -> torch.Tensor:
        """One edge's score per prompt ``[batch]``."""
        u, d = self.graph.index(edge)
        return self.scores[:, u, d]

    def table(self) -> dict[str, float]:
        """``{edge: score summed over prompts}``, every edge."""
        total = self.scores.sum(0)
        return {edge: float(total[self.graph.index(edge)]) for edge in self.graph.edges}


__all__ = ["LOGITS", "EdgeGraph", "EdgeScores", "edge_graph"]
