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

from gradgraph import hooks
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


def backprop(
    graph: GradGraph, semiring: Semiring = Real, *, granularity: str = "neuron", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``{node: [S, *shape]}``: ⊕ over paths node → metric of ⊗ edge weights.

    For ``Real`` (S = 1), ``values[name][0]`` is the gradient of the metric at that node.
    ``dtype`` defaults to the model's; sums over all paths (``Abs``) of a deep model can overflow
    float32, which raises ``GradGraphError`` (use ``dtype=torch.float64``, ``Log`` or ``Entropy``).
    """
    op = _check(graph, semiring, granularity)
    dtype, device = dtype or graph.metric_value.dtype, graph.metric_value.device
    values: dict[str, torch.Tensor] = {"metric": semiring.one(graph.shapes["metric"], dtype=dtype, device=device)}
    outgoing: dict[str, list] = {}
    for edge in graph.edges:
        outgoing.setdefault(edge.src, []).append(edge)
    checkpoints = _checkpoints(graph)
    for node in reversed(graph.order):
        if node == "metric":
            continue
        total = None
        for edge in outgoing.get(node, []):
            contribution = edge.backward(semiring, values[edge.tgt], op)
            total = contribution if total is None else semiring.plus(total, contribution)
        values[node] = total if total is not None else semiring.zero(graph.shapes[node], dtype=dtype, device=device)
        if node in checkpoints:
            _check_range(semiring, values[node], node, dtype)
    return values


def forward(
    graph: GradGraph, semiring: Semiring = Real, *, granularity: str = "neuron", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``{node: [S, *shape]}``: ⊕ over paths input → node of ⊗ edge weights (inputs carry one)."""
    op = _check(graph, semiring, granularity)
    dtype, device = dtype or graph.metric_value.dtype, graph.metric_value.device
    incoming: dict[str, list] = {}
    for edge in graph.edges:
        incoming.setdefault(edge.tgt, []).append(edge)
    values: dict[str, torch.Tensor] = {}
    checkpoints = _checkpoints(graph)
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
            total = contribution if total is None else semiring.plus(total, contribution)
        values[node] = total if total is not None else semiring.zero(graph.shapes[node], dtype=dtype, device=device)
        if node in checkpoints:
            _check_range(semiring, values[node], node, dtype)
    return values


def _checkpoints(graph: GradGraph) -> set[str]:
    """Nodes whose values are checked for overflow: every residual-stream node, the inputs and the
    logits. NaN and inf propagate through ⊕ and ⊗, so an overflow anywhere in a layer shows here."""
    return {n for n in graph.order if "resid" in n or n in graph.sources or n in (hooks.name("logits"), "metric")}


def _check_range(semiring: Semiring, value: torch.Tensor, node: str, dtype: torch.dtype) -> None:
    """Overflow is reported, never propagated: a NaN or a value past the dtype's range raises."""
    if semiring.overflowed(value):
        raise GradGraphError(
            f"{semiring.name} values overflowed {dtype} at {node} (the path sums of a deep model grow "
            f"geometrically); pass dtype=torch.float64, or use the Log or Entropy semiring, which hold logs"
        )


def flow(
    graph: GradGraph, semiring: Semiring, *, granularity: str = "neuron", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``forward ⊗ backward`` at every node: the ⊕ over all input → metric paths through it."""
    fwd = forward(graph, semiring, granularity=granularity, dtype=dtype)
    bwd = backprop(graph, semiring, granularity=granularity, dtype=dtype)
    return {node: semiring.times(fwd[node], bwd[node]) for node in graph.order}
