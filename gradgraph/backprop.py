"""The one generic recursion over the gradient graph; it never branches on the semiring.

``backprop`` gives each node the ⊕ over all paths from that node to the metric of the ⊗ of edge
weights (for ``Real``: the gradient). ``forward`` gives each node the ⊕ over all paths from the
inputs (the embedding elements of real tokens) to it, so the value of all input→metric paths
through a node is ``forward ⊗ backward``.

Granularity: ``"neuron"`` is the exact scalar-graph path sum. ``"op"`` reproduces Du et al.'s
implementation: inside an edge block (one op's derivative with respect to one input, including
its per-head copies) contributions are combined by an ordinary sum, and ⊕ acts only where a
tensor is read by several ops (e.g. the residual stream feeding q, k, v and the skip).
"""

from __future__ import annotations

import torch

from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.semirings import Real, Semiring

GRANULARITIES = ("neuron", "op")


def _check(graph: GradGraph, semiring: Semiring, granularity: str) -> bool:
    if not isinstance(graph, GradGraph):
        raise GradGraphError(f"expected a GradGraph from gradgraph.build_graph, got {type(graph).__name__}")
    if not isinstance(semiring, Semiring):
        raise GradGraphError(
            f"semiring must be one of gradgraph.semirings (Real, Abs, Log, Max, SignedMax, KMax(k), Entropy), "
            f"got {semiring!r}"
        )
    if granularity not in GRANULARITIES:
        raise GradGraphError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity == "op"


def backprop(graph: GradGraph, semiring: Semiring = Real, *, granularity: str = "neuron") -> dict[str, torch.Tensor]:
    """``{node: [S, *shape]}``: ⊕ over paths node → metric of ⊗ edge weights.

    For ``Real`` (S = 1), ``values[name][0]`` is the gradient of the metric at that node.
    """
    op = _check(graph, semiring, granularity)
    dtype, device = graph.metric_value.dtype, graph.metric_value.device
    values: dict[str, torch.Tensor] = {"metric": semiring.one(graph.shapes["metric"], dtype=dtype, device=device)}
    outgoing: dict[str, list] = {}
    for edge in graph.edges:
        outgoing.setdefault(edge.src, []).append(edge)
    for node in reversed(graph.order):
        if node == "metric":
            continue
        total = None
        for edge in outgoing.get(node, []):
            contribution = edge.backward(semiring, values[edge.tgt], op)
            total = contribution if total is None else _combine(semiring, total, contribution, op, edge)
        values[node] = total if total is not None else semiring.zero(graph.shapes[node], dtype=dtype, device=device)
    return values


def forward(graph: GradGraph, semiring: Semiring = Real, *, granularity: str = "neuron") -> dict[str, torch.Tensor]:
    """``{node: [S, *shape]}``: ⊕ over paths input → node of ⊗ edge weights (inputs carry one)."""
    op = _check(graph, semiring, granularity)
    dtype, device = graph.metric_value.dtype, graph.metric_value.device
    incoming: dict[str, list] = {}
    for edge in graph.edges:
        incoming.setdefault(edge.tgt, []).append(edge)
    values: dict[str, torch.Tensor] = {}
    for node in graph.order:
        if node in graph.sources:
            shape = graph.shapes[node]
            one = semiring.one(shape, dtype=dtype, device=device)
            zero = semiring.zero(shape, dtype=dtype, device=device)
            real = graph.source_mask.reshape(graph.source_mask.shape + (1,) * (len(shape) - 2))
            values[node] = torch.where(real, one, zero)
            continue
        total = None
        for edge in incoming.get(node, []):
            contribution = edge.forward(semiring, values[edge.src], op)
            total = contribution if total is None else _combine(semiring, total, contribution, op, edge)
        values[node] = total if total is not None else semiring.zero(graph.shapes[node], dtype=dtype, device=device)
    return values


def _combine(semiring: Semiring, a: torch.Tensor, b: torch.Tensor, op: bool, edge) -> torch.Tensor:
    """⊕ of two edge blocks' contributions at a node (different ops: ⊕ in both granularities)."""
    return semiring.plus(a, b)


def flow(graph: GradGraph, semiring: Semiring, *, granularity: str = "neuron") -> dict[str, torch.Tensor]:
    """``forward ⊗ backward`` at every node: the ⊕ over all input → metric paths through it."""
    fwd = forward(graph, semiring, granularity=granularity)
    bwd = backprop(graph, semiring, granularity=granularity)
    return {node: semiring.times(fwd[node], bwd[node]) for node in graph.order}
