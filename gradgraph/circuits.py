"""Circuits: sets of edges of ``gradgraph.edges.edge_graph``, chosen by their scores.

``top_edges`` keeps the ``n`` best-scored edges (by |score|, or by the signed score: MIB scores CPR
with signed and CMD with absolute selection), ``above`` those past a threshold; both then prune
dead nodes, as MIB does: an edge stays only while its upstream node is reached (``embed``, or a
component with an edge into one of its inputs) and its downstream node goes on (``logits``, or a
component with an edge out of its output), repeated until nothing changes.

``top_path_circuit`` is the semiring's own selection: the union of the edges that the ``k`` best
input → metric paths of the gradient graph (``KMax`` by Π|w|, ``gradgraph.paths.top_paths``) go
along, each path leaving a component's output and entering the next component's input through the
residual stream; such a circuit needs no pruning (every path runs from an input to the metric).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from gradgraph.arch import names
from gradgraph.edges import LOGITS, EdgeGraph, EdgeScores
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.labels import Component, Registry
from gradgraph.paths import GradientPath, top_paths


@dataclass(frozen=True)
class Circuit:
    """The edges ``[upstream, downstream]`` (bool) of ``graph`` in the circuit."""

    graph: EdgeGraph
    edges: torch.Tensor

    def __len__(self) -> int:
        return int(self.edges.sum())

    @property
    def share(self) -> float:
        """Its edges as a fraction of the model's."""
        return len(self) / len(self.graph)

    @property
    def labels(self) -> list[str]:
        return [f"{self.graph.upstream[u]}->{self.graph.downstream[d]}" for u, d in self.edges.nonzero().tolist()]

    @staticmethod
    def of(graph: EdgeGraph, labels) -> "Circuit":
        """The circuit of the edges named by ``labels`` (``"L0H3->L1H2.q"``, ...)."""
        edges = torch.zeros_like(graph.adjacency)
        for label in labels:
            edges[graph.index(label)] = True
        return Circuit(graph, edges)

    @staticmethod
    def full(graph: EdgeGraph) -> "Circuit":
        return Circuit(graph, graph.adjacency.clone())

    @staticmethod
    def empty(graph: EdgeGraph) -> "Circuit":
        return Circuit(graph, torch.zeros_like(graph.adjacency))


def _ranked(scores: EdgeScores, absolute: bool) -> tuple[EdgeGraph, torch.Tensor]:
    if not isinstance(scores, EdgeScores):
        raise GradGraphError(f"expected EdgeScores from gradgraph.edge_methods.edge_scores, got {type(scores).__name__}")
    total = scores.scores.sum(0).double()  # [U, D] over prompts
    key = total.abs() if absolute else total
    return scores.graph, key.masked_fill(~scores.graph.adjacency, -torch.inf)


def top_edges(scores: EdgeScores, n: int, *, absolute: bool = True, prune: bool = True) -> Circuit:
    """The ``n`` edges of the highest score summed over prompts (|score| with ``absolute``; ties
    broken by the edge order), dead nodes then pruned (so a circuit may hold fewer than ``n``)."""
    graph, key = _ranked(scores, absolute)
    if not isinstance(n, int) or not 0 <= n <= len(graph):
        raise GradGraphError(f"n must be an integer in [0, {len(graph)}] (the model's edges), got {n!r}")
    edges = torch.zeros(key.numel(), dtype=torch.bool)
    edges[torch.sort(key.flatten(), descending=True, stable=True).indices[:n]] = True
    edges = edges.view_as(key) & graph.adjacency
    return Circuit(graph, _pruned(graph, edges) if prune else edges)


def above(scores: EdgeScores, threshold: float, *, absolute: bool = True, prune: bool = True) -> Circuit:
    """The edges whose score summed over prompts (|score| with ``absolute``) exceeds ``threshold``."""
    graph, key = _ranked(scores, absolute)
    edges = (key > threshold) & graph.adjacency
    return Circuit(graph, _pruned(graph, edges) if prune else edges)


def prune(circuit: Circuit) -> Circuit:
    """``circuit`` without the edges of dead nodes (see the module)."""
    return Circuit(circuit.graph, _pruned(circuit.graph, circuit.edges))


def _owners(graph: EdgeGraph) -> torch.Tensor:
    """``[downstream, upstream]`` bool: the component each downstream input belongs to (a key or value
    input of grouped heads: each head of its group)."""
    reg, up = graph.registry, {label: i for i, label in enumerate(graph.upstream)}
    owners = torch.zeros(len(graph.downstream), len(graph.upstream), dtype=torch.bool)
    for d, label in enumerate(graph.downstream):
        if label == LOGITS:
            continue
        c = reg.parse(label)
        if c.kind == "mlp":
            owners[d, up[label]] = True
        else:
            for h in [c.head] if c.kind == "q" else reg.group(c.head):
                owners[d, up[f"L{c.layer}H{h}"]] = True
    return owners


def _pruned(graph: EdgeGraph, edges: torch.Tensor) -> torch.Tensor:
    owners = _owners(graph)  # [D, U]
    is_logits = torch.tensor([label == LOGITS for label in graph.downstream])
    is_embed = torch.tensor([label == "embed" for label in graph.upstream])
    while True:
        reached = is_embed | (owners & edges.any(0)[:, None]).any(0)  # upstream u: embed, or an edge into its inputs
        goes_on = is_logits | (owners & edges.any(1)[None, :]).any(1)  # downstream d: logits, or its owner has an edge out
        kept = edges & reached[:, None] & goes_on[None, :]
        if torch.equal(kept, edges):
            return kept
        edges = kept


class Line(NamedTuple):
    """One drawn line of a circuit: its edge ``upstream->input`` into ``component`` (the head or MLP
    the input belongs to, or ``logits``), which input ``kind`` it enters, and its ``score``."""

    upstream: str
    input: str
    component: str
    kind: str  # "q", "k", "v", "mlp" or "logits"
    score: float


@dataclass(frozen=True)
class Layout:
    """A circuit laid out for drawing, layers left to right: ``places`` of its nodes ``{label: (x, y)}``
    (``embed`` at x = 0, layer l's heads at 2l + 1 one above the other, its MLP at 2l + 2 below them,
    ``logits`` last) and its ``edges`` ``(upstream, component, input, score)``: the component whose input the
    edge enters (``input``: ``"q"``, ``"k"``, ``"v"``, ``"mlp"`` or ``"logits"``; a grouped key or
    value input's edge drawn to each head of its group that the circuit keeps)."""

    places: dict[str, tuple[float, float]]
    edges: list[Line]
    registry: Registry

    @property
    def n_layers(self) -> int:
        return self.registry.n_layers


def layout(circuit: Circuit, scores: EdgeScores) -> Layout:
    """Where ``circuit``'s nodes and edges are drawn, each edge with its score summed over prompts."""
    graph, reg = circuit.graph, circuit.graph.registry
    owners, total = _owners(graph), scores.scores.sum(0)
    alive = circuit.edges.any(1)  # upstream nodes with an edge out
    edges = []
    for u, d in circuit.edges.nonzero().tolist():
        down = graph.downstream[d]
        if down == LOGITS:
            targets, kind = [LOGITS], "logits"
        else:
            heads = owners[d].nonzero().flatten()
            kept = [h for h in heads.tolist() if alive[h]] or heads.tolist()
            targets, kind = [graph.upstream[h] for h in kept], reg.parse(down).kind
        edges += [Line(graph.upstream[u], down, t, kind, float(total[u, d])) for t in targets]
    places: dict[str, tuple[float, float]] = {}
    for label in {e.upstream for e in edges} | {e.component for e in edges}:
        if label in ("embed", LOGITS):
            places[label] = (0.0 if label == "embed" else 2.0 * reg.n_layers + 1, 0.0)
        else:
            c = reg.parse(label)
            places[label] = ((2.0 * c.layer + 2, -(reg.n_heads + 1) / 2) if c.kind == "mlp" else
                             (2.0 * c.layer + 1, c.head - (reg.n_heads - 1) / 2))
    return Layout(places, edges, reg)


def path_edges(path: GradientPath, graph: EdgeGraph) -> list[str]:
    """The edges one gradient-graph path goes along, in order (``"embed->L0H3.v"``, ...)."""
    reg = graph.registry
    writer, out = "embed", []
    for name, index in path.nodes:
        parsed = names.parse(name)
        if parsed is None:
            continue
        kind, layer, _ = parsed
        if kind in ("q_input", "k_input", "v_input"):
            reader = reg.label(Component(kind[0], layer, index[2]))
        elif kind == "mlp_in":
            reader = reg.label(Component("mlp", layer))
        elif kind == "resid_post" and layer == reg.n_layers - 1:
            reader = LOGITS
        else:
            if kind == "z":
                writer = reg.label(Component("head", layer, index[2]))
            elif kind == "mlp_out":
                writer = reg.label(Component("mlp", layer))
            continue
        out.append(f"{writer}->{reader}")
    return out


def top_path_circuit(model_graph: GradGraph, graph: EdgeGraph, k: int, *, sources=None) -> Circuit:
    """The edges of the ``k`` best paths of each prompt (see the module); ``sources`` as for
    ``top_paths`` (the input positions the paths start at)."""
    if not isinstance(k, int) or k < 1:
        raise GradGraphError(f"k must be a positive number of paths, got {k!r}")
    paths = top_paths(model_graph, k, sources=sources)
    return Circuit.of(graph, {edge for per_item in paths for path in per_item for edge in path_edges(path, graph)})


__all__ = ["Circuit", "Layout", "Line", "above", "layout", "path_edges", "prune", "top_edges", "top_path_circuit"]
