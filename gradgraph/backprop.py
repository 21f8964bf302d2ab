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

from typing import Callable

import torch

from gradgraph import chunked
from gradgraph.arch import names
from gradgraph.arch.names import METRIC
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph, Matmul
from gradgraph.semirings import Real, Semiring

GRANULARITIES = ("neuron", "op")


def _check(graph: GradGraph, semiring: Semiring, granularity: str) -> Semiring:
    """The semiring the blocks use (``semiring.within_op()`` at op granularity)."""
    if not isinstance(graph, GradGraph):
        raise GradGraphError(f"expected a GradGraph from gradgraph.build_graph, got {type(graph).__name__}")
    if not isinstance(semiring, Semiring):
        raise GradGraphError(
            f"semiring must be one of gradgraph.semirings (Real, Abs, Log, Max, SignedMax, KMax(k), Entropy), "
            f"got {semiring!r}"
        )
    if granularity not in GRANULARITIES:
        raise GradGraphError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return semiring.within_op() if granularity == "op" else semiring


def _kept(graph: GradGraph, keep) -> set[str]:
    if keep is None:
        return set(graph.order)
    keep = {keep} if isinstance(keep, str) else set(keep)
    unknown = keep - set(graph.shapes)
    if unknown:
        raise GradGraphError(f"keep names nodes the graph does not have: {sorted(unknown)[:3]}")
    return keep


def backprop(
    graph: GradGraph,
    semiring: Semiring = Real,
    *,
    granularity: str = "neuron",
    dtype: torch.dtype | None = None,
    keep=None,
    visit: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, torch.Tensor]:
    """``{node: [S, *shape]}``: ⊕ over paths node → metric of ⊗ edge weights.

    For ``Real`` (S = 1), ``values[name][0]`` is the gradient of the metric at that node.
    ``dtype`` defaults to the model's; sums over all paths (``Abs``) of a deep model can overflow
    float32, which raises ``GradGraphError`` (use ``dtype=torch.float64``, ``Log`` or ``Entropy``).
    ``keep`` (node names) returns only those nodes and frees every other value once no block needs
    it: a long prompt's backward then holds about what autograd's does. ``visit(node, value)`` is
    called with each node's value as soon as it is complete (not for nodes no path reaches), so a
    caller can reduce every node's value with ``keep=()`` and hold one layer's values at a time.
    """
    inner = _check(graph, semiring, granularity)
    kept = _kept(graph, keep)
    dtype, device = dtype or graph.dtype, graph.metric_value.device
    if visit is None and graph.settled is not None and inner is Real and dtype == graph.dtype and kept <= graph.settled.keys():
        return {node: graph.settled[node].clone() for node in kept}  # the pass that fixed the graph
    values: dict[str, torch.Tensor | None] = {METRIC: semiring.one(graph.shapes[METRIC], dtype=dtype, device=device)}
    readers = {node: len(graph.edges_into(node)) for node in graph.order}  # sources still to read it
    checkpoints = _checkpoints(graph)
    regions = _chunked(graph, kept, visit)  # by target: contributions to their sources made there
    once = _once(graph, semiring, inner, kept, visit)  # norms on per-head copies: their output's copies ⊕-summed first
    skipped, waiting = chunked.skipped(tuple(regions.values())), {}
    for node in reversed(graph.order):
        if node == METRIC:
            continue
        needed = readers[node] > 0 or node in kept or visit is not None  # no block reads a node without incoming edges
        total = waiting.pop(node, None)
        for edge in graph.edges_from(node):
            if needed and values[edge.tgt] is not None and id(edge) not in skipped:
                contribution = _contribution(edge, inner, values[edge.tgt], once.get(node))
                total = contribution if total is None else semiring.plus(total, contribution)
            readers[edge.tgt] -= 1
            if readers[edge.tgt] == 0 and edge.tgt not in kept:
                del values[edge.tgt]
        values[node] = total  # None: no path to the metric (the semiring's zero, formed only if returned)
        if node in regions and total is not None:
            for src, contribution in regions[node].backward(semiring, inner, total).items():
                waiting[src] = contribution if src not in waiting else semiring.plus(waiting[src], contribution)
        if total is not None and node in checkpoints:
            _check_range(semiring, total, node, dtype)
        if total is not None and visit is not None:
            visit(node, total)
        if readers[node] == 0 and node not in kept:
            del values[node]
    return _formed(graph, semiring, values, dtype, device)


def _formed(graph: GradGraph, semiring: Semiring, values: dict, dtype, device) -> dict[str, torch.Tensor]:
    """The values, with the semiring's zero where no path reached a node."""
    return {node: value if value is not None else semiring.zero(graph.shapes[node], dtype=dtype, device=device)
            for node, value in values.items()}


def forward(
    graph: GradGraph,
    semiring: Semiring = Real,
    *,
    granularity: str = "neuron",
    dtype: torch.dtype | None = None,
    keep=None,
) -> dict[str, torch.Tensor]:
    """``{node: [S, *shape]}``: ⊕ over paths input → node of ⊗ edge weights (inputs carry one).

    ``keep`` as for ``backprop``."""
    inner = _check(graph, semiring, granularity)
    kept = _kept(graph, keep)
    dtype, device = dtype or graph.dtype, graph.metric_value.device
    values: dict[str, torch.Tensor | None] = {}
    readers = {node: len(graph.edges_from(node)) for node in graph.order}
    checkpoints = _checkpoints(graph)
    regions = _chunked(graph, kept, None)
    skipped = chunked.skipped(tuple(regions.values()))
    for region in regions.values():  # a region reads its sources at its target
        for src in region.sources:
            readers[src] += 1
    for node in graph.order:
        if node in graph.sources:
            shape = graph.shapes[node]
            one = semiring.one(shape, dtype=dtype, device=device)
            zero = semiring.zero(shape, dtype=dtype, device=device)
            real = graph.source_mask.reshape(graph.source_mask.shape + (1,) * (len(shape) - 2))
            values[node] = torch.where(real, one, zero)
        else:
            needed = readers[node] > 0 or node in kept
            total = None
            if node in regions:
                region = regions[node]
                total = region.forward(semiring, inner, {src: values[src] for src in region.sources})
                for src in region.sources:
                    readers[src] -= 1
                    if readers[src] == 0 and src not in kept:
                        del values[src]
            for edge in graph.edges_into(node):
                if needed and values[edge.src] is not None and id(edge) not in skipped:
                    contribution = edge.forward(inner, values[edge.src])
                    total = contribution if total is None else semiring.plus(total, contribution)
                readers[edge.src] -= 1
                if readers[edge.src] == 0 and edge.src not in kept:
                    del values[edge.src]
            values[node] = total  # None: no path from an input
        if values[node] is not None and node in checkpoints:
            _check_range(semiring, values[node], node, dtype)
        if readers[node] == 0 and node not in kept:
            del values[node]
    return _formed(graph, semiring, values, dtype, device)


def _chunked(graph: GradGraph, kept: set[str], visit) -> dict[str, chunked.Region]:
    """The graph's chunked regions by target, unless a pass keeps or visits what they hold inside
    (the scores and patterns are then formed whole, one layer at a time)."""
    if visit is not None or any(set(region.inner) & kept for region in graph.regions):
        return {}
    return {region.target: region for region in graph.regions}


def _contribution(edge, inner: Semiring, value: torch.Tensor, copies: int | None) -> torch.Tensor:
    """``edge.backward``; at the output of a norm on per-head copies (along node dim ``copies``),
    ⊕-summed over them and kept as one copy: the norm then runs once (a shared linear map into the
    copies sums them in its product, ``Matmul.summed``)."""
    if copies is None:
        return edge.backward(inner, value)
    summed = edge.summed(inner, value) if isinstance(edge, Matmul) else None
    return summed if summed is not None else inner.sum(edge.backward(inner, value), copies).unsqueeze(copies + 1)


def _once(graph: GradGraph, semiring: Semiring, inner: Semiring, kept: set[str], visit) -> dict[str, int]:
    """The first nodes of norms on per-head copies (``GradGraph.copies``) by copy dim, where a pass
    may ⊕ the copies there before the norm: ⊕_h f(v_h) = f(⊕_h v_h) for the norm's semiring-linear
    map f, the same for every copy (not at op granularity, where the copies' sum and the node's ⊕
    differ, nor where a node of the norm is kept or visited)."""
    if visit is not None or inner is not semiring:
        return {}
    return {node: dim for node, dim, nodes in graph.copies if not set(nodes) & kept}


def _checkpoints(graph: GradGraph) -> set[str]:
    """Nodes whose values are checked for overflow: every residual-stream node, the inputs and the
    logits. NaN and inf propagate through ⊕ and ⊗, so an overflow anywhere in a layer shows here."""
    return {n for n in graph.order if names.is_residual(n) or n in graph.sources or n in (names.name("logits"), METRIC)}


def _check_range(semiring: Semiring, value: torch.Tensor, node: str, dtype: torch.dtype) -> None:
    """Overflow is reported, never propagated: a NaN or a value past the dtype's range raises."""
    if semiring.overflowed(value):
        raise GradGraphError(
            f"{semiring.name} values overflowed {dtype} at {node} (the path sums of a deep model grow "
            f"geometrically); pass dtype=torch.float64, or use the Log or Entropy semiring, which hold logs"
        )


def through(
    graph: GradGraph, semiring: Semiring, *, granularity: str = "neuron", dtype: torch.dtype | None = None, keep=None
) -> dict[str, torch.Tensor]:
    """``forward ⊗ backward`` at every node (or at ``keep``): the ⊕ over all input → metric paths
    through it (for ``Abs``: the gradient flow through each element)."""
    fwd = forward(graph, semiring, granularity=granularity, dtype=dtype, keep=keep)
    bwd = backprop(graph, semiring, granularity=granularity, dtype=dtype, keep=keep)
    return {node: semiring.times(fwd[node], bwd[node]) for node in fwd}
