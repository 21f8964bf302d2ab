"""The component graph of one prompt: components as nodes, the semiring flow between them as edges."""

from __future__ import annotations

import networkx as nx
import torch

from gradgraph.arch import names
from gradgraph.backprop import backprop, forward
from gradgraph.errors import GradGraphError
from gradgraph.graph import Broadcast, GradGraph, Identity, Matmul
from gradgraph.labels import Component, Registry
from gradgraph.semirings import Abs, Semiring
from gradgraph.weights import Weight


def _oplus(semiring: Semiring, values: list[float]) -> float:
    """⊕ of plain values."""
    return float(semiring.sum(torch.tensor(values, dtype=torch.float64)[None], 0)[0]) if values else 0.0


def _check(graph: GradGraph, semiring: Semiring, batch: int) -> None:
    if semiring.size != 1 or not semiring.nonnegative or not semiring.plain:
        raise GradGraphError(f"component_graph takes a semiring of path magnitudes (Abs or Max), got {semiring.name}")
    if not 0 <= batch < graph.batch_size:
        raise GradGraphError(f"batch {batch} is outside the graph's batch of {graph.batch_size}")
    rescaled = [e for e in graph.edges if e.op in ("residual", "copy") and not isinstance(e, (Identity, Broadcast))]
    if rescaled:
        raise GradGraphError(
            f"component_graph reads the residual stream as a sum of writes; the rule set {graph.rules!r} rescales "
            f"residual edges (e.g. {rescaled[0].src} → {rescaled[0].tgt})"
        )


def _forward_through(graph: GradGraph, semiring: Semiring, src: str, tgt: str, value: torch.Tensor) -> torch.Tensor:
    """⊕ over the blocks from ``src`` to ``tgt`` of their forward contribution of ``value``."""
    total = None
    for block in graph.edges_into(tgt):
        if block.src == src:
            part = block.forward(semiring, value)
            total = part if total is None else semiring.plus(total, part)
    return total


def component_graph(graph: GradGraph, semiring: Semiring = Abs, *, batch: int = 0, min_share: float = 1e-3):
    """Components as nodes, the semiring flow between them as edge weights (one batch item).

    Nodes: ``embed@p``, readers ``L3H7.q@p`` / ``L3H6-8.k@p`` / ``.v@p``, head outputs ``L3H7@p``,
    ``MLP5@p`` and ``metric``. Edges: a writer (embeddings, a head through its part of the output
    map, an MLP) to a later reader at the same position through the residual stream (Σ_i write_i ⊗
    read_i); a reader to its head's output (q at the query position; k and v at each key position,
    read from the graph's blocks: the forward contribution of the key block into each score, and
    the flow each pattern weight carries from v into z); the final residual to ``metric``. With
    ``Abs`` an edge's weight is the total |gradient| flow of the input→metric paths that take it,
    and flow is conserved at every component. Edges below ``min_share`` of the metric's total (Abs)
    or best path (Max) are left out; node attribute ``flow`` is the ⊕ of a node's out-edges.
    """
    _check(graph, semiring, batch)
    sr, b, dtype = semiring, batch, torch.float64
    fwd = forward(graph, sr, dtype=dtype)
    bwd = backprop(graph, sr, dtype=dtype)
    reg = Registry.of(graph)
    n_pos = int(graph.attention_mask[b].sum())
    H, G = graph.n_heads, graph.n_key_value_heads

    def reduce_last(x: torch.Tensor) -> torch.Tensor:  # ⊕ over the last dim of [S, ..., d]
        return sr.sum(x, x.ndim - 2)

    def label(kind: str, layer: int | None, head: int | None, position: int) -> str:
        return reg.label(Component(kind, layer, head, position))

    # (component kind, layer, head, [S, pos, d] values) of residual writers and readers
    writers: list[tuple[str, int, int | None, torch.Tensor]] = []
    readers: list[tuple[str, int, int | None, torch.Tensor]] = []
    emb = None
    for source in reg.embeds:
        value = fwd[source][:, b, :n_pos]
        emb = value if emb is None else sr.plus(emb, value)
    writers.append(("embed", -1, None, emb))
    edges: dict[tuple[str, str], float] = {}
    for layer in range(graph.n_layers):
        nodes = reg.branch_nodes(layer)
        for kind in ("q", "k", "v"):
            for c in range(reg.copies(kind)):
                readers.append((kind, layer, c, bwd[nodes[kind]][:, b, :n_pos, c]))
        z, attn_out = names.name("z", layer), names.name("attn_out", layer)
        for h in range(H):  # head h's write: its z alone through the output map
            alone = sr.zero(graph.shapes[z], dtype=dtype, device=fwd[z].device)
            alone[:, :, :, h] = fwd[z][:, :, :, h]
            writers.append(("head", layer, h, _forward_through(graph, sr, z, attn_out, alone)[:, b, :n_pos]))
        readers.append(("mlp", layer, None, bwd[names.name("mlp_in", layer)][:, b, :n_pos]))
        writers.append(("mlp", layer, None, fwd[names.name("mlp_out", layer)][:, b, :n_pos]))
        # readers -> head outputs, inside the layer
        q_input = nodes["q"]
        through_q = reduce_last(sr.times(fwd[q_input], bwd[q_input])[:, b, :n_pos])[0]  # [pos, h]
        scores = names.name("attn_scores", layer)
        key = names.name("rot_k", layer) if names.name("rot_k", layer) in graph.shapes else names.name("k", layer)
        into_scores = _forward_through(graph, sr, key, scores, fwd[key])  # None: the rules hold the pattern constant
        via_k = (sr.zero(bwd[scores].shape[1:], dtype=bwd[scores].dtype, device=bwd[scores].device) if into_scores is None
                 else sr.times(into_scores, bwd[scores]))[0, b]  # [h, q, k]
        value_blocks = [e for e in graph.edges_into(z) if e.src == names.name("v", layer)]
        if not all(isinstance(e, Matmul) and e.weight_node is not None for e in value_blocks):
            raise GradGraphError(f"component_graph reads the value pathway from bilinear blocks into {z}")
        via_v = None
        for block in value_blocks:
            part = block.weight_flow(sr, fwd[block.src], bwd[z])
            via_v = part if via_v is None else sr.plus(via_v, part)
        via_v = via_v[0, b]  # [h, q, k]
        for h in range(H):
            g = h // (H // G)
            for q in range(n_pos):
                head = label("head", layer, h, q)
                edges[(label("q", layer, h, q), head)] = float(through_q[q, h])
                for k in range(q + 1):
                    edges[(label("k", layer, g, k), head)] = float(via_k[h, q, k])
                    edges[(label("v", layer, g, k), head)] = float(via_v[h, q, k])
    readers.append((names.METRIC, graph.n_layers, None, bwd[names.name("resid_post", graph.n_layers - 1)][:, b, :n_pos]))
    # writers -> readers through the residual stream (same position, later in the model)
    write = torch.cat([w for *_, w in writers], 0).transpose(0, 1)  # [pos, n_writers, d]
    read = torch.cat([r for *_, r in readers], 0).permute(1, 2, 0)  # [pos, d, n_readers]
    flows = sr.matmul(write[None], Weight(read))[0]  # [pos, n_writers, n_readers]
    for wi, (wkind, wlayer, whead, _) in enumerate(writers):
        for ri, (rkind, rlayer, rhead, _) in enumerate(readers):
            # a head writes into its layer's residual after attention: its own layer's MLP reads it
            later = rlayer > wlayer or (rkind == "mlp" and wkind == "head" and rlayer == wlayer)
            if not later:
                continue
            for p in range(n_pos):
                target = names.METRIC if rkind == names.METRIC else label(rkind, rlayer, rhead, p)
                edges[(label(wkind, wlayer if wlayer >= 0 else None, whead, p), target)] = float(flows[p, wi, ri])
    total = _oplus(sr, [float(reduce_last(bwd[s][:, b, :n_pos].reshape(1, -1))[0]) for s in reg.embeds])
    out = nx.DiGraph(semiring=sr.name, total=total, batch=batch)
    for (u, v), w in edges.items():
        if w > min_share * total:
            out.add_edge(u, v, weight=w)
    outgoing: dict[str, list[float]] = {}
    for (u, v), w in edges.items():
        outgoing.setdefault(u, []).append(w)
    nx.set_node_attributes(out, {n: _oplus(sr, outgoing.get(n, [])) for n in out.nodes}, "flow")
    return out
