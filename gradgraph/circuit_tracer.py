"""The component graph in the JSON format of circuit-tracer's attribution graphs (Anthropic,
``decoderesearch/circuit-tracer``: ``frontend/graph_models.py``), so that its viewer opens it.

circuit-tracer's nodes are transcoder features, error nodes, input tokens and output logits, each
``node_id = "{layer}_{feature}_{position}"``; here the features are components: a head's output
(feature h), its query input (100 + h), a key/value head's key and value inputs (200 + g, 300 + g)
and the MLP (999), with gradgraph's label as the node's description (``clerp``). Links carry the
flow between components (``weight``); a node's ``influence`` is its share of the total flow.
To view: ``from circuit_tracer.frontend.local_server import serve; serve(data_dir=FOLDER, port=8041)``
with FOLDER holding ``<slug>.json`` and ``graph-metadata.json``, then open http://localhost:8041.
"""

from __future__ import annotations

from gradgraph.arch import names
from gradgraph.labels import Registry

_FEATURE = {"q": 100, "k": 200, "v": 300}


def _node(label: str, graph: dict, registry: Registry, influence: float | None) -> dict:
    tokens, n_layers = graph["tokens"], registry.n_layers
    if label == names.METRIC:
        last = graph["n_tokens"] - 1
        return dict(node_id=f"{n_layers + 1}_0_{last}", feature=0, layer=str(n_layers + 1), ctx_idx=last,
                    feature_type="logit", token_prob=0.0, is_target_logit=True, run_idx=0, reverse_ctx_idx=0,
                    jsNodeId=f"L_0-{last}", clerp=f"logit({graph['good']!r}) − logit({graph['bad']!r})",
                    influence=influence, activation=None)
    c = registry.parse(label)
    p = c.position
    if c.kind == "embed":
        return dict(node_id=f"E_{p}_{p}", feature=p, layer="E", ctx_idx=p, feature_type="embedding", token_prob=0.0,
                    is_target_logit=False, run_idx=0, reverse_ctx_idx=0, jsNodeId=f"E_{p}-{p}",
                    clerp=f"{tokens[p]!r} (position {p})", influence=influence, activation=None)
    feature = 999 if c.kind == "mlp" else c.head if c.kind == "head" else _FEATURE[c.kind] + c.head
    return dict(node_id=f"{c.layer}_{feature}_{p}", feature=feature, layer=str(c.layer), ctx_idx=p,
                feature_type="cross layer transcoder", token_prob=0.0, is_target_logit=False, run_idx=0,
                reverse_ctx_idx=0, jsNodeId=f"{c.layer}_{feature}-0", clerp=label, influence=influence, activation=None)


def circuit_tracer_graph(graph: dict, *, slug: str, model: str, registry: Registry, method: str = "flow") -> dict:
    """circuit-tracer's ``{metadata, qParams, nodes, links}`` for a component graph as the SVA study
    keeps it (``nodes``: label → values by method; ``edges``: source, target, values by method),
    with ``method``'s edge values as link weights; ``registry`` reads the labels."""
    labels = list(graph["nodes"])
    flow_out: dict[str, float] = {}
    for edge in graph["edges"]:
        weight = edge["values"].get(method)
        if weight is not None:
            flow_out[edge["source"]] = flow_out.get(edge["source"], 0.0) + weight
    nodes = {label: _node(label, graph, registry, flow_out.get(label)) for label in labels}
    links = [dict(source=nodes[e["source"]]["node_id"], target=nodes[e["target"]]["node_id"],
                  weight=e["values"][method]) for e in graph["edges"] if e["values"].get(method) is not None]
    metadata = dict(slug=slug, scan=f"gradgraph-{model}", transcoder_list=[], prompt_tokens=graph["tokens"],
                    prompt=graph["prefix"], node_threshold=None, schema_version=1)
    q_params = dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    return dict(metadata=metadata, qParams=q_params, nodes=list(nodes.values()), links=links)


def circuit_tracer_circuit(layout, *, slug: str, model: str, tokens: list[str], prompt: str, good: str,
                           bad: str) -> dict:
    """circuit-tracer's JSON of a circuit (``gradgraph.circuits.layout``): its edges are summed over
    positions, so every component is one node at the last position and the input embeddings one node
    (``E_0_0``); an edge into a head's query, key or value input is a link into the head (the three
    summed), weighted by its score summed over prompts; a node's ``influence`` is its share of the
    circuit's |score| leaving it."""
    last = len(tokens) - 1
    graph = dict(tokens=tokens, n_tokens=len(tokens), good=good, bad=bad)
    weights: dict[tuple[str, str], float] = {}
    for e in layout.edges:
        weights[(e.upstream, e.component)] = weights.get((e.upstream, e.component), 0.0) + e.score
    out: dict[str, float] = {}
    for (up, _), w in weights.items():
        out[up] = out.get(up, 0.0) + abs(w)
    total = sum(out.values()) or 1.0
    nodes = {}
    for label in layout.places:
        influence = out.get(label, 0.0) / total
        if label == "embed":
            nodes[label] = dict(node_id="E_0_0", feature=0, layer="E", ctx_idx=0, feature_type="embedding",
                                token_prob=0.0, is_target_logit=False, run_idx=0, reverse_ctx_idx=0,
                                jsNodeId="E_0-0", clerp="input embeddings (every position)", influence=influence,
                                activation=None)
        elif label == "logits":
            nodes[label] = _node(names.METRIC, graph, layout.registry, influence)
        else:
            c = layout.registry.parse(label)
            feature = 999 if c.kind == "mlp" else c.head
            nodes[label] = dict(node_id=f"{c.layer}_{feature}_{last}", feature=feature, layer=str(c.layer), ctx_idx=last,
                                feature_type="cross layer transcoder", token_prob=0.0, is_target_logit=False,
                                run_idx=0, reverse_ctx_idx=0, jsNodeId=f"{c.layer}_{feature}-0",
                                clerp=f"{label} (every position)", influence=influence, activation=None)
    links = [dict(source=nodes[u]["node_id"], target=nodes[d]["node_id"], weight=w) for (u, d), w in weights.items()]
    metadata = dict(slug=slug, scan=f"gradgraph-{model}", transcoder_list=[], prompt_tokens=tokens, prompt=prompt,
                    node_threshold=None, schema_version=1)
    q_params = dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    return dict(metadata=metadata, qParams=q_params, nodes=list(nodes.values()), links=links)


__all__ = ["circuit_tracer_circuit", "circuit_tracer_graph"]
