"""Views that read node values through the component registry (``gradgraph.labels``): per-component
values, pathway scores, and component-level paths. A component's value is the ⊕ of its elements'
values.
"""

from __future__ import annotations

import torch

from gradgraph.arch import names
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.labels import Component, Registry
from gradgraph.paths import top_paths
from gradgraph.semirings import Semiring


def _reduce(semiring: Semiring, value: torch.Tensor, dims) -> torch.Tensor:
    """⊕ over node ``dims`` of ``[S, *shape]`` values."""
    for dim in sorted(dims, reverse=True):
        value = semiring.sum(value, dim)
    return value


def component_values(graph: GradGraph, values: dict[str, torch.Tensor], semiring: Semiring) -> list[dict]:
    """Tidy rows ``{component, kind, layer, head, position, batch, value}``, one per component at
    each real position: the ⊕ of its elements' values (``backprop``/``forward``/``flow`` output of
    a size-1 semiring). Padded positions are not components."""
    if semiring.size != 1:
        raise GradGraphError(f"component_values needs a scalar semiring (Real, Abs, Log, Max), got {semiring.name}")
    reg = Registry.of(graph)
    per_node: dict[str, torch.Tensor] = {}  # [batch, pos, (copies)]: ⊕ over the last dim
    for node in reg.embeds + tuple(n for n in reg._node_kinds() if n in values):
        per_node[node] = _reduce(semiring, values[node], (values[node].ndim - 2,))[0].detach().double().cpu()
    embed = None
    for node in reg.embeds:
        embed = per_node[node] if embed is None else semiring.plus(embed[None], per_node[node][None])[0]
    rows = []
    real = graph.source_mask.cpu()
    for c in reg.components(positions=range(graph.tokens.shape[1])):
        table = embed if c.kind == "embed" else per_node[reg.nodes(c)[0]]
        index = (slice(None), c.position) + (() if c.head is None else (c.head,))
        for b, value in enumerate(table[index].tolist()):
            if real[b, c.position]:
                rows.append(dict(component=reg.label(c), kind=c.kind, layer=c.layer, head=c.head,
                                 position=c.position, batch=b, value=value))
    return rows


PATHWAY_KINDS = ("q", "k", "v", "head", "mlp")


def pathway_scores(graph: GradGraph, values: dict[str, torch.Tensor], semiring: Semiring,
                   kinds=PATHWAY_KINDS, *, per_position: bool = False) -> torch.Tensor:
    """``[batch, n components]``: the ⊕ over positions and units of each component's values, for
    the position-less components ``Registry.of(graph).components(kinds)`` in that order (layer by
    layer: q inputs, k, v, head outputs, the MLP). ``values``: ``{node: [1, batch, pos, ...]}`` of
    a size-1 semiring (a sum for Real / Abs, a max for Max); padding must hold the zero.
    ``per_position``: ``[batch, pos, n components]``, the ⊕ over units only."""
    if semiring.size != 1:
        raise GradGraphError(f"pathway_scores needs a scalar semiring, got {semiring.name}")
    reg = Registry.of(graph)
    columns = []
    over = () if per_position else (1,)
    for layer in range(graph.n_layers):
        for kind in ("q", "k", "v", "head", "mlp"):
            if kind not in kinds or (kind == "mlp" and not reg.mlps):
                continue
            node = reg.nodes(Component(kind, layer, 0 if kind != "mlp" else None))[0]
            value = values[node]  # [1, batch, pos, (copies,) units]
            if kind == "mlp":
                columns.append(_reduce(semiring, value, over + (2,))[0][..., None])
            else:
                columns.append(_reduce(semiring, value, over + (3,))[0])  # [batch, (pos,) copies]
    return torch.cat(columns, -1).double().cpu()


def component_path(graph: GradGraph, nodes) -> tuple[str, ...]:
    """Collapse a scalar path (``GradientPath.nodes``) into its sequence of component labels, e.g.
    ``("embed@1", "L2H4.v@1", "L9H0@6", "MLP12@6", "metric")``."""
    reg = Registry.of(graph)
    out: list[str] = []
    for name, index in nodes:
        if name == names.METRIC:
            step = names.METRIC
        else:
            found = reg.kind_of_node(name)
            if found is None:
                continue
            kind, layer = found
            head = index[2] if kind in ("q", "k", "v", "head") else None
            step = reg.label(Component(kind, layer, head, index[1]))
        if not out or out[-1] != step:
            out.append(step)
    return tuple(out)


def top_component_paths(graph: GradGraph, k: int = 5, *, search: int | None = None, items: list[int] | None = None,
                        sources=None, best: dict | None = None):
    """Per batch item, the ``k`` best distinct component-level paths among the best ``search``
    (default 8k) scalar paths: ``(labels, best scalar path weight, scalar paths collapsed into it)``.
    ``sources``, ``best``: the input positions the paths start at, and the Max pass if the caller
    has it (``gradgraph.paths.top_paths``)."""
    out = []
    for item_paths in top_paths(graph, search or 8 * k, items=items, sources=sources, best=best):
        seen: dict[tuple[str, ...], list] = {}
        for path in item_paths:
            key = component_path(graph, path.nodes)
            if key in seen:
                seen[key][1] += 1
            else:
                seen[key] = [path.weight, 1]
        ranked = sorted(seen.items(), key=lambda kv: -abs(kv[1][0]))[:k]
        out.append([(key, weight, count) for key, (weight, count) in ranked])
    return out
