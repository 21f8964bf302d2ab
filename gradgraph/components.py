"""Component views: node values -> heads, their q/k/v pathways, MLPs, embeddings, per position.

Labels follow TransformerLens: ``L3H7@5`` (head 7's output at position 5), ``L3H7.q@5`` (its query
input), ``L3H6-8.k@5`` (the key input of the key/value head serving query heads 6-8 under
grouped-query attention; ``L3H7.k@5`` without grouping), ``MLP5@5``, ``embed@2``.

A component's value is the ⊕ of its node elements' values (a sum for ``Real``/``Abs`` flows, a
max for ``Max``): head output = ``hook_z[b, p, h, :]``, q/k/v pathway = ``hook_{q,k,v}_input[b, p,
head, :]``, MLP = ``hook_mlp_out[b, p, :]``, embed = ``hook_embed[b, p, :]`` (+ positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradgraph import hooks
from gradgraph.backprop import backprop, forward
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.metrics import resolve_positions
from gradgraph.semirings import Abs, Max, Real, Semiring

BRANCHES = ("q", "k", "v", "skip")
AGGREGATIONS = ("oplus", "bucket_sum", "sum")


def head_group(graph: GradGraph, kv_head: int) -> range:
    """The query heads served by key/value head ``kv_head``."""
    per = graph.n_heads // graph.n_key_value_heads
    return range(kv_head * per, (kv_head + 1) * per)


def label(kind: str, layer: int | None, head: int | None, position: int, graph: GradGraph | None = None) -> str:
    """``L3H7@5``, ``L3H7.q@5``, ``L3H6-8.k@5``, ``MLP5@5``, ``embed@2``."""
    if kind == "embed":
        return f"embed@{position}"
    if kind == "mlp":
        return f"MLP{layer}@{position}"
    if kind == "out":
        return f"L{layer}H{head}@{position}"
    if kind == "q" or graph is None or graph.n_key_value_heads == graph.n_heads:
        return f"L{layer}H{head}.{kind}@{position}"
    group = head_group(graph, head)
    return f"L{layer}H{group.start}-{group.stop - 1}.{kind}@{position}"


def _reduce(semiring: Semiring, value: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """⊕ over ``dims`` of a node's values (S dim first), returning [S, ...]."""
    for dim in sorted(dims, reverse=True):
        value = semiring.sum(value, dim)
    return value


def component_values(graph: GradGraph, values: dict[str, torch.Tensor], semiring: Semiring = Abs) -> list[dict]:
    """Tidy rows ``{component, kind, layer, head, position, batch, value}`` from node values.

    ``values`` are ``[S, *shape]`` tensors (``backprop``/``forward``/``flow`` output) of a size-1
    semiring; each row's value is the ⊕ over that component's elements.
    """
    if semiring.size != 1:
        raise GradGraphError(f"component_values needs a scalar semiring (Real, Abs, Log, Max), got {semiring.name}")
    rows = []

    def emit(kind, layer, head, tensor):  # tensor [batch, pos, (copies)]
        tensor = tensor.detach().double().cpu()
        for b in range(tensor.shape[0]):
            for p in range(tensor.shape[1]):
                if not graph.source_mask[b, p]:
                    continue
                if tensor.ndim == 2:
                    rows.append(dict(component=label(kind, layer, head, p, graph), kind=kind, layer=layer, head=head,
                                     position=p, batch=b, value=float(tensor[b, p])))
                else:
                    for h in range(tensor.shape[2]):
                        rows.append(dict(component=label(kind, layer, h, p, graph), kind=kind, layer=layer, head=h,
                                         position=p, batch=b, value=float(tensor[b, p, h])))

    embed = _reduce(semiring, values[graph.sources[0]], (2,))
    for source in graph.sources[1:]:
        embed = semiring.plus(embed, _reduce(semiring, values[source], (2,)))
    emit("embed", None, None, embed[0])
    for layer in range(graph.n_layers):
        for kind in ("q", "k", "v"):
            emit(kind, layer, None, _reduce(semiring, values[hooks.name(f"{kind}_input", layer)], (3,))[0])
        emit("out", layer, None, _reduce(semiring, values[hooks.name("z", layer)], (3,))[0])
        emit("mlp", layer, None, _reduce(semiring, values[hooks.name("mlp_out", layer)], (2,))[0])
    return rows


@dataclass
class BranchShares:
    """Per layer, how the top-path (or flow) value at a position's attention input splits into the
    query, key, value and skip branches (Du et al. 2023, §6), averaged over the batch.

    ``value[l]`` is ``[4]`` (q, k, v, skip); ``share[l] = value[l] / value[l].sum()``;
    ``head_value[branch]`` is ``[n_layers, copies]`` (query heads for q, key/value heads for k, v).
    """

    value: torch.Tensor  # [n_layers, 4]
    head_value: dict[str, torch.Tensor]
    agg: str
    semiring: str

    @property
    def share(self) -> torch.Tensor:
        total = self.value.sum(-1, keepdim=True)
        return torch.where(total > 0, self.value / torch.where(total > 0, total, 1), 0)

    def rows(self) -> list[dict]:
        out = []
        share = self.share
        for layer in range(self.value.shape[0]):
            for i, branch in enumerate(BRANCHES):
                out.append(dict(layer=layer, branch=branch, head="all", value=float(self.value[layer, i]),
                                share=float(share[layer, i])))
            for branch, per_head in self.head_value.items():
                total = float(self.value[layer].sum())
                for h in range(per_head.shape[1]):
                    out.append(dict(layer=layer, branch=branch, head=h, value=float(per_head[layer, h]),
                                    share=float(per_head[layer, h]) / total if total > 0 else 0.0))
        return out


def _positions(graph: GradGraph, position: int | torch.Tensor) -> torch.Tensor:
    return resolve_positions(torch.as_tensor(position).cpu(), graph.attention_mask.sum(-1).cpu())


def branch_shares(
    graph: GradGraph,
    position: int | torch.Tensor,
    *,
    semiring: Semiring = Max,
    agg: str = "oplus",
    values: dict[str, torch.Tensor] | None = None,
    include: torch.Tensor | None = None,
) -> BranchShares:
    """q / k / v / skip shares of the value at each layer's attention input at ``position``.

    ``position``: an int (negative counts back from each prompt's last token) or a ``[batch]``
    tensor (e.g. each item's subject position). The branch values at residual unit i are the
    backward values of the q-input copies (one per query head), the k and v inputs (one per
    key/value head) and the skip (``hook_resid_mid``), all reached by weight-1 edges.

    - ``agg="oplus"``: the single ⊕-maximum over units and branches goes to its branch (and head);
    - ``agg="bucket_sum"``: each unit's maximum goes to its branch, summed over units;
    - ``agg="sum"`` (for ``Abs`` flows): every branch keeps the sum of its values.

    ``values`` may pass precomputed ``backprop(graph, semiring)`` output; ``include`` ([batch]
    bool) restricts the average to some items.
    """
    if agg not in AGGREGATIONS:
        raise GradGraphError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if semiring not in (Max, Abs, Real) or (agg != "sum" and semiring is not Max):
        raise GradGraphError(
            f"branch_shares takes semiring=Max with agg 'oplus' or 'bucket_sum', or Abs with agg 'sum'; "
            f"got {semiring.name} with {agg!r}"
        )
    pos = _positions(graph, position)
    if values is None:
        values = backprop(graph, semiring, dtype=torch.float64 if semiring is Abs else None)
    batch = torch.arange(graph.batch_size)
    n_layers, H, G = graph.n_layers, graph.n_heads, graph.n_key_value_heads
    total = torch.zeros(n_layers, 4, dtype=torch.float64)
    heads = {"q": torch.zeros(n_layers, H, dtype=torch.float64), "k": torch.zeros(n_layers, G, dtype=torch.float64),
             "v": torch.zeros(n_layers, G, dtype=torch.float64)}
    for layer in range(n_layers):
        # candidates [batch, copies, d]: q heads, k heads, v heads, skip
        parts = [values[hooks.name(f"{c}_input", layer)][0][batch, pos].abs() for c in ("q", "k", "v")]
        skip = values[hooks.name("resid_mid", layer)][0][batch, pos].abs()[:, None]
        stacked = torch.cat(parts + [skip], dim=1).double().cpu()  # [batch, H + 2G + 1, d]
        branch_of = torch.tensor([0] * H + [1] * G + [2] * G + [3])
        for b in range(graph.batch_size):
            if include is not None and not include[b]:
                continue
            cand = stacked[b]  # [copies, d]
            if agg == "sum":
                per_copy = cand.sum(-1)
            elif agg == "bucket_sum":
                best, winner = cand.max(0)  # per unit
                per_copy = torch.zeros(cand.shape[0], dtype=torch.float64).index_add_(0, winner, best)
            else:
                flat = int(cand.argmax())
                per_copy = torch.zeros(cand.shape[0], dtype=torch.float64)
                per_copy[flat // cand.shape[1]] = cand.reshape(-1)[flat]
            total[layer] += torch.zeros(4, dtype=torch.float64).index_add_(0, branch_of, per_copy)
            heads["q"][layer] += per_copy[:H]
            heads["k"][layer] += per_copy[H : H + G]
            heads["v"][layer] += per_copy[H + G : H + 2 * G]
    n = graph.batch_size if include is None else max(1, int(include.sum()))
    return BranchShares(total / n, {k: v / n for k, v in heads.items()}, agg, semiring.name)


_PATH_KINDS = {"q_input": "q", "k_input": "k", "v_input": "v", "z": "out", "mlp_out": "mlp"}


def component_path(graph: GradGraph, nodes) -> tuple[str, ...]:
    """Collapse a scalar path (``Path.nodes``) into its sequence of component labels, e.g.
    ``("embed@1", "L2H4.v@1", "L9H0@6", "MLP12@6", "metric")``."""
    kinds = {hooks.name(kind, layer): (short, layer) for layer in range(graph.n_layers)
             for kind, short in _PATH_KINDS.items()}
    out: list[str] = []
    for name, index in nodes:
        if name in graph.sources:
            step = label("embed", None, None, index[1])
        elif name == "metric":
            step = "metric"
        elif name in kinds:
            kind, layer = kinds[name]
            head = index[2] if kind in ("q", "k", "v", "out") else None
            step = label(kind, layer, head, index[1], graph)
        else:
            continue
        if not out or out[-1] != step:
            out.append(step)
    return tuple(out)


def top_component_paths(graph: GradGraph, paths, k: int = 5) -> list[list[tuple[tuple[str, ...], float, int]]]:
    """Per batch item, the ``k`` best distinct component-level paths among scalar ``paths``
    (``top_paths`` output): ``(labels, best scalar path weight, scalar paths collapsed into it)``."""
    out = []
    for item_paths in paths:
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


def component_graph(
    graph: GradGraph,
    semiring: Semiring = Abs,
    *,
    batch: int = 0,
    min_share: float = 1e-3,
):
    """Components as nodes, the semiring flow between them as edge weights (one batch item).

    Nodes: ``embed@p``, readers ``L3H7.q@p`` / ``L3H6-8.k@p`` / ``.v@p``, head outputs ``L3H7@p``,
    ``MLP5@p`` and ``metric``. Edges: a writer (embeddings, a head through its slice of W_O, an MLP)
    to a later reader at the same position through the residual stream (Σ_i write_i ⊗ read_i,
    the residual being identity); a reader to its head's output (q at the query position; k and v
    at each key position, through the score and the pattern); the final residual to ``metric``.
    With ``Abs`` an edge's weight is the total |gradient| flow of the input→metric paths that take
    it, and flow is conserved at every component. Edges below ``min_share`` of the metric's total
    (Abs) or best path (Max) are left out; node attribute ``flow`` is the flow through the node.
    """
    import networkx as nx

    if semiring not in (Abs, Max):
        raise GradGraphError(f"component_graph takes semiring Abs or Max, got {semiring.name}")
    if not 0 <= batch < graph.batch_size:
        raise GradGraphError(f"batch {batch} is outside the graph's batch of {graph.batch_size}")
    dtype = torch.float64
    fwd = forward(graph, semiring, dtype=dtype)
    bwd = backprop(graph, semiring, dtype=dtype)
    sr = semiring
    b = batch
    n_pos = int(graph.attention_mask[b].sum())
    H, G = graph.n_heads, graph.n_key_value_heads
    R = H // G

    def reduce_last(x):  # ⊕ over the last dim of a [..., d] tensor of values (S dim dropped)
        return sr.sum(x[None], x.ndim - 1)[0]

    def matmul_edge(src: str, tgt: str):
        return next(e for e in graph.edges if e.src == src and e.tgt == tgt)

    writers: list[tuple[str, int, torch.Tensor]] = []  # (label prefix, layer, [pos, d] write values)
    readers: list[tuple[str, int, torch.Tensor]] = []  # (label prefix, layer, [pos, d] read values)
    emb = None
    for source in graph.sources:
        value = fwd[source][:, b, :n_pos]
        emb = value if emb is None else sr.plus(emb, value)
    writers.append(("embed", -1, emb[0]))
    node_flow: dict[str, float] = {}
    edges: dict[tuple[str, str], float] = {}
    for layer in range(graph.n_layers):
        for kind, copies in (("q", H), ("k", G), ("v", G)):
            node = hooks.name(f"{kind}_input", layer)
            for c in range(copies):
                readers.append((f"{kind}:{c}", layer, bwd[node][0, b, :n_pos, c]))
        z = hooks.name("z", layer)
        w_o = matmul_edge(z, hooks.name("attn_out", layer)).weight[0].to(dtype)  # [(h e), d]
        d_head = w_o.shape[0] // H
        for h in range(H):
            f_z = fwd[z][:, b, :n_pos, h]  # [1, pos, e]
            writers.append((f"out:{h}", layer, sr.matmul(f_z[:, None], w_o[None, h * d_head : (h + 1) * d_head])[0, 0]))
        readers.append(("mlp", layer, bwd[hooks.name("mlp_in", layer)][0, b, :n_pos]))
        writers.append(("mlp", layer, fwd[hooks.name("mlp_out", layer)][0, b, :n_pos]))
        # ---- readers -> head outputs, inside the layer
        scores = hooks.name("attn_scores", layer)
        q_name = hooks.name("rot_q", layer) if hooks.name("rot_q", layer) in graph.shapes else hooks.name("q", layer)
        k_name = hooks.name("rot_k", layer) if hooks.name("rot_k", layer) in graph.shapes else hooks.name("k", layer)
        w_k = matmul_edge(k_name, scores).weight.to(dtype)  # [(b g), (r q), e]: rq / scale
        pattern = graph.activations[hooks.name("pattern", layer)].to(dtype)  # [b, h, q, k]
        q_input = hooks.name("q_input", layer)
        through_q = reduce_last(sr.times(fwd[q_input], bwd[q_input])[0, b, :n_pos])  # [pos, h]
        v_name = hooks.name("v", layer)
        for h in range(H):
            g = h // R
            r = h % R
            head = label("out", layer, h, 0, graph).split("@")[0]
            for q in range(n_pos):
                edges[(label("q", layer, h, q, graph), f"{head}@{q}")] = float(through_q[q, h])
            wk = w_k[b * G + g].view(R, -1, w_k.shape[-1])[r, :n_pos]  # [q, e]
            f_k = fwd[k_name][:, b, :n_pos, g]  # [1, k, e]
            k_side = reduce_last(sr.times(f_k[:, None, :, :], sr.convert(wk)[:, :, None, :])[0])  # [q, k]
            via_k = sr.times(k_side[None], bwd[scores][:, b, h, :n_pos, :n_pos])[0]  # [q, k]
            f_v = fwd[v_name][:, b, :n_pos, g]  # [1, k, e]
            b_z = bwd[z][:, b, :n_pos, h]  # [1, q, e]
            v_side = reduce_last(sr.times(f_v[:, None, :, :], b_z[:, :, None, :])[0])  # [q, k]
            via_v = sr.times(sr.convert(pattern[b, h, :n_pos, :n_pos])[0][None], v_side[None])[0]
            for q in range(n_pos):
                for k in range(q + 1):
                    edges[(label("k", layer, g, k, graph), f"{head}@{q}")] = float(via_k[q, k])
                    edges[(label("v", layer, g, k, graph), f"{head}@{q}")] = float(via_v[q, k])
    final = bwd[hooks.name("resid_post", graph.n_layers - 1)][0, b, :n_pos]
    readers.append(("metric", graph.n_layers, final))
    # ---- writers -> readers through the residual stream (same position, later in the model)
    write = torch.stack([w for _, _, w in writers], 1)  # [pos, n_writers, d]
    read = torch.stack([r for _, _, r in readers], 1)  # [pos, n_readers, d]
    flows = sr.matmul(write[None], read.transpose(-1, -2))[0] if sr is Max else write @ read.transpose(-1, -2)
    for wi, (wname, wlayer, _) in enumerate(writers):
        for ri, (rname, rlayer, _) in enumerate(readers):
            # a head writes into its layer's residual after attention: its own layer's MLP reads it
            later = rlayer > wlayer or (rname == "mlp" and wname.startswith("out") and rlayer == wlayer)
            if not later:
                continue
            for p in range(n_pos):
                edges[(_name(wname, wlayer, p, graph), _name(rname, rlayer, p, graph))] = float(flows[p, wi, ri])
    total = float(bwd[graph.sources[0]][0, b, :n_pos].sum() if sr is Abs else bwd[graph.sources[0]][0, b, :n_pos].max())
    for source in graph.sources[1:]:
        value = bwd[source][0, b, :n_pos]
        total = total + float(value.sum()) if sr is Abs else max(total, float(value.max()))
    out = nx.DiGraph(semiring=sr.name, total=total, batch=batch)
    for (u, v), w in edges.items():
        if w > min_share * total:
            out.add_edge(u, v, weight=w)
    for (u, v), w in edges.items():  # node flow: Abs sums, Max takes the best edge
        for node in (u, v):
            if node in out:
                node_flow.setdefault(node, 0.0)
        if u in out:
            node_flow[u] = node_flow[u] + w if sr is Abs else max(node_flow[u], w)
    nx.set_node_attributes(out, node_flow, "flow")
    return out


def _name(kind: str, layer: int, position: int, graph: GradGraph) -> str:
    """Component label of a writer/reader key (``"out:3"``, ``"k:1"``, ``"mlp"``, ``"embed"``, ``"metric"``)."""
    if kind == "metric":
        return "metric"
    if kind == "embed":
        return label("embed", None, None, position)
    if kind == "mlp":
        return label("mlp", layer, None, position)
    what, copy = kind.split(":")
    return label(what, layer, int(copy), position, graph)
