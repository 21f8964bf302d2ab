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

import re

_FEATURE = {"q": 100, "k": 200, "v": 300}
_LABEL = re.compile(r"^(?:MLP(\d+)|L(\d+)H(\d+)(?:-\d+)?(?:\.([qkv]))?)@(\d+)$")


def _node(label: str, graph: dict, n_layers: int, kv_group: int, influence: float | None) -> dict:
    tokens = graph["tokens"]
    if label == "metric":
        last = graph["n_tokens"] - 1
        return dict(node_id=f"{n_layers + 1}_0_{last}", feature=0, layer=str(n_layers + 1), ctx_idx=last,
                    feature_type="logit", token_prob=0.0, is_target_logit=True, run_idx=0, reverse_ctx_idx=0,
                    jsNodeId=f"L_0-{last}", clerp=f"logit({graph['good']!r}) − logit({graph['bad']!r})",
                    influence=influence, activation=None)
    if label.startswith("embed@"):
        p = int(label.split("@")[1])
        return dict(node_id=f"E_{p}_{p}", feature=p, layer="E", ctx_idx=p, feature_type="embedding", token_prob=0.0,
                    is_target_logit=False, run_idx=0, reverse_ctx_idx=0, jsNodeId=f"E_{p}-{p}",
                    clerp=f"{tokens[p]!r} (position {p})", influence=influence, activation=None)
    mlp, layer, head, branch, p = _LABEL.match(label).groups()
    layer = int(mlp if mlp is not None else layer)
    if mlp is not None:
        feature = 999
    elif branch is None:
        feature = int(head)
    else:
        feature = _FEATURE[branch] + (int(head) // kv_group if branch in "kv" else int(head))
    return dict(node_id=f"{layer}_{feature}_{p}", feature=feature, layer=str(layer), ctx_idx=int(p),
                feature_type="cross layer transcoder", token_prob=0.0, is_target_logit=False, run_idx=0,
                reverse_ctx_idx=0, jsNodeId=f"{layer}_{feature}-0", clerp=label, influence=influence, activation=None)


def circuit_tracer_graph(graph: dict, *, slug: str, model: str, method: str = "flow", n_layers: int | None = None,
                         kv_group: int = 1) -> dict:
    """circuit-tracer's ``{metadata, qParams, nodes, links}`` for a component graph as the SVA study
    keeps it (``nodes``: label → values by method; ``edges``: source, target, values by method),
    with ``method``'s edge values as link weights."""
    labels = list(graph["nodes"])
    layers = n_layers if n_layers is not None else 1 + max(
        (int(m.group(1) or m.group(2)) for m in (_LABEL.match(x) for x in labels) if m), default=0)
    flow_out: dict[str, float] = {}
    for edge in graph["edges"]:
        weight = edge["values"].get(method)
        if weight is not None:
            flow_out[edge["source"]] = flow_out.get(edge["source"], 0.0) + weight
    nodes = {label: _node(label, graph, layers, kv_group, flow_out.get(label)) for label in labels}
    links = [dict(source=nodes[e["source"]]["node_id"], target=nodes[e["target"]]["node_id"],
                  weight=e["values"][method]) for e in graph["edges"] if e["values"].get(method) is not None]
    metadata = dict(slug=slug, scan=f"gradgraph-{model}", transcoder_list=[], prompt_tokens=graph["tokens"],
                    prompt=graph["prefix"], node_threshold=None, schema_version=1)
    q_params = dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    return dict(metadata=metadata, qParams=q_params, nodes=list(nodes.values()), links=links)


__all__ = ["circuit_tracer_graph"]
