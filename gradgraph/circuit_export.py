"""A circuit and its edge scores in EAP-IG's graph JSON (``hannamw/EAP-IG``, ``Graph.to_json`` /
``Graph.from_json``; the format MIB's circuit track reads): ``{"cfg": {...}, "nodes": {name:
{"in_graph": bool}}, "edges": {name: {"score": float, "in_graph": bool}}}``.

EAP-IG names nodes ``input``, ``a{layer}.h{head}``, ``m{layer}`` and ``logits``, and edges
``"a0.h1->m2"`` or, into a head's query, key or value input, ``"input->a1.h0<q>"``; its k and v
edges go to each query head. Under grouped-query attention one of gradgraph's key or value inputs
(``L3H6-8.k``) serves several query heads: its edge is written once per head it serves, with its
score (EAP-IG's ``from_json`` then reads a graph whose k/v edges of one group agree). A node is in
the graph when an edge of the circuit touches it (logits always).
"""

from __future__ import annotations

from gradgraph.circuits import Circuit
from gradgraph.edges import LOGITS, EdgeScores
from gradgraph.errors import GradGraphError


def _name(label: str, reg) -> str:
    if label == "embed":
        return "input"
    if label == LOGITS:
        return "logits"
    c = reg.parse(label)
    return f"m{c.layer}" if c.kind == "mlp" else f"a{c.layer}.h{c.head}"


def _targets(label: str, reg) -> list[str]:
    """EAP-IG's name(s) of a downstream node: ``m3``, ``logits`` or ``a3.h7<q>`` (per query head)."""
    if label == LOGITS:
        return ["logits"]
    c = reg.parse(label)
    if c.kind == "mlp":
        return [f"m{c.layer}"]
    return [f"a{c.layer}.h{h}<{c.kind}>" for h in ([c.head] if c.kind == "q" else reg.group(c.head))]


def eap_ig_graph(scores: EdgeScores, circuit: Circuit) -> dict:
    """EAP-IG's graph JSON of ``circuit`` with every edge's score summed over prompts."""
    if circuit.graph is not scores.graph and circuit.graph.upstream != scores.graph.upstream:
        raise GradGraphError("the circuit and the scores belong to different models' edge graphs")
    graph, reg = scores.graph, scores.graph.registry
    total = scores.scores.sum(0)
    cfg = dict(n_layers=reg.n_layers, n_heads=reg.n_heads, d_model=graph.d_model, n_key_value_heads=reg.n_key_value_heads,
               parallel_attn_mlp=not reg.sequential and reg.mlps, attn_only=not reg.mlps,
               scores=scores.method)
    nodes = {_name(label, reg): {"in_graph": False} for label in graph.upstream}
    nodes["logits"] = {"in_graph": True}
    edges = {}
    for u, d in graph.adjacency.nonzero().tolist():
        up, down = graph.upstream[u], graph.downstream[d]
        inside = bool(circuit.edges[u, d])
        for target in _targets(down, reg):
            source = _name(up, reg)
            edges[f"{source}->{target}"] = {"score": float(total[u, d]), "in_graph": inside}
            if inside:
                nodes[source]["in_graph"] = True
                nodes[target.split("<")[0]]["in_graph"] = True
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


__all__ = ["eap_ig_graph"]
