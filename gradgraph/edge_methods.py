"""Edge scores of ``gradgraph.edges.edge_graph`` by every method, per prompt ``[batch, upstream,
downstream]`` (zero off the edges), with ``a_u`` an upstream node's output and ``r_d`` the residual
at a downstream node's input, ``x`` the prompt and ``x′`` its counterfactual:

- ``eap``: ``Σ_{position, dim} (a_u(x) − a_u(x′)) · ∂m/∂r_d(x)``, to first order what the metric
  loses when the edge alone carries its counterfactual value (Syed et al. 2023; EAP-IG's code and
  MIB take the gradient of a loss, −m, of ``a_u(x′) − a_u(x)``: the same sign, positive where the
  edge carries the behaviour);
- ``eap-ig``: the same with the gradient's mean over ``steps`` points on the line between the
  counterfactual's input embeddings and the clean ones, ``e′ + (k / steps)(e − e′)``, k = 1..steps
  (Hanna et al. 2024's EAP-IG-inputs; one point is EAP);
- ``relp``: EAP with RelP's modified gradient (Jafari et al. 2025);
- ``attn-lrp``: the AttnLRP relevance the edge carries, ``Σ a_u(x) · ∂̃m/∂r_d(x)`` with the rule
  set's modified gradient (the residual is a sum, so its relevance splits over the summands this way;
  no counterfactual);
- ``flow`` and ``max``: semiring path scores on the clean run's gradient graph, ``⊕_{position, dim}
  F_u ⊗ B_d`` with ``F_u`` the ⊕ over input → ``a_u`` paths and ``B_d`` over ``r_d`` → metric paths:
  ``flow`` the sum of |path weights| over every path that uses the edge (Abs), ``max`` the weight
  of the best one (Max).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gradgraph import fused
from gradgraph.arch import inference, names
from gradgraph.arch.lens import Model
from gradgraph.arch.spec import check_supported
from gradgraph.backprop import backprop, forward
from gradgraph.build import build_graph, record
from gradgraph.edges import EdgeGraph, EdgeScores, edge_graph
from gradgraph.errors import GradGraphError
from gradgraph.labels import Registry
from gradgraph.metrics import rows, tiled
from gradgraph.prompts import to_tokens
from gradgraph.semirings import Abs, Max, Real, Semiring

METHODS = ("eap", "eap-ig", "relp", "attn-lrp", "flow", "max")
NEEDS_COUNTERFACTUAL = ("eap", "eap-ig", "relp")
_RULES = {"eap": "gradient", "eap-ig": "gradient", "relp": "relp", "attn-lrp": "attn-lrp"}
_PATHS: dict[str, Semiring] = {"flow": Abs, "max": Max}
_ROWS = 48  # EAP-IG's points of a batch share a pass up to this many rows


def edge_scores(model: Model, tokens, metric, counterfactual=None, *, method: str = "eap", steps: int = 5,
                attention_mask: torch.Tensor | None = None, batch_size: int | None = None) -> EdgeScores:
    """Every edge's score by ``method`` (``METHODS``); ``steps``: EAP-IG's points.

    ``tokens`` and ``counterfactual``: prompts of equal shape (token ids, or texts that tokenize to the
    same lengths; ``eap``, ``eap-ig`` and ``relp`` need one); ``metric`` as for ``build_graph``. One
    pass of the prompts per point and one of the counterfactual; ``batch_size`` prompts at a time
    (``metrics.rows`` reads each batch's rows of the metric)."""
    if method not in METHODS:
        raise GradGraphError(f"method must be one of {METHODS}, got {method!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise GradGraphError(f"batch_size must be a positive integer, got {batch_size!r}")
    graph_of = edge_graph(model)
    clean, mask = _tokens(model, tokens, attention_mask)
    if batch_size is not None and len(clean) > batch_size:
        other = None if counterfactual is None else _tokens(model, counterfactual, attention_mask)[0]
        parts = []
        for start in range(0, len(clean), batch_size):
            index = torch.arange(start, min(start + batch_size, len(clean)))
            parts.append(edge_scores(model, clean[index], rows(metric, model, index, len(clean)),
                                     None if other is None else other[index], method=method, steps=steps,
                                     attention_mask=None if mask is None else mask[index]))
        return EdgeScores(graph_of, torch.cat([p.scores for p in parts]), parts[0].method)
    if method in _PATHS:
        return EdgeScores(graph_of, _path_scores(model, clean, mask, metric, graph_of, _PATHS[method]), method)
    reg = graph_of.registry
    if method == "attn-lrp":
        acts, grads = _pass(model, clean, mask, metric, "attn-lrp", reg)
        return _scored(graph_of, _outputs(model, acts, reg), grads, method)
    if counterfactual is None:
        raise GradGraphError(f"{method} scores an edge by its counterfactual value: pass counterfactual prompts")
    corrupt, _ = _tokens(model, counterfactual, attention_mask)
    if corrupt.shape != clean.shape:
        raise GradGraphError(f"counterfactual prompts must align with the prompts token by token: shapes "
                             f"{tuple(corrupt.shape)} and {tuple(clean.shape)}")
    if method == "eap-ig" and (not isinstance(steps, int) or steps < 1):
        raise GradGraphError(f"steps must be a positive integer, got {steps!r}")
    acts, grads = _pass(model, clean, mask, metric, _RULES[method], reg)
    integrated = method == "eap-ig" and steps > 1
    other = _recorded(model, corrupt, metric, mask, embeddings=integrated and not fused.covers(model, "gradient"))
    delta = _outputs(model, acts, reg, minus=other)  # [b, p, U, d]: a(x) − a(x′)
    if not integrated:
        return _scored(graph_of, delta, grads, method if method != "eap-ig" else "eap-ig (1)")
    embed = names.name("embed")
    e, e_cf = (acts[embed], other[embed]) if embed in other else (_token_embeddings(model, clean),
                                                                  _token_embeddings(model, corrupt))
    grads = _integrated(model, clean, mask, metric, e, e_cf, steps, reg, grads)
    return _scored(graph_of, delta, grads, f"eap-ig ({steps})")


def _pass(model: Model, tokens, mask, metric, rules: str, reg: Registry, embed=None):
    """``(activations, the (modified) gradient at every downstream input by node name)`` of one run:
    the fused autograd pass where it covers the model and rule set, else the graph."""
    if fused.covers(model, rules):
        values = fused.reader_values(model, tokens, metric, rules=rules, attention_mask=mask, embed=embed)
        return values.activations, values.grads
    graph = build_graph(model, tokens, metric, attention_mask=mask, rules=rules, embed=embed)
    return graph.activations, _reader_grads(graph, reg)


def _token_embeddings(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    """The token embeddings the fused pass starts from (``embed=`` replaces them): ``W_E[tokens]``."""
    return model.W_E.detach()[tokens]


def _integrated(model: Model, clean, mask, metric, e, e_cf, steps: int, reg: Registry, at_clean) -> dict:
    """The mean gradient at every downstream input over EAP-IG's points (by node, as ``_pass``);
    the last point is the clean run (``at_clean``, its gradient), the others stacked as rows of one pass
    (``_ROWS`` rows at most: larger matrices, fewer passes)."""
    B = len(clean)
    per = max(1, _ROWS // B)  # points per pass
    total = {n: g.clone() for n, g in at_clean.items()}
    for first in range(1, steps, per):
        ks = range(first, min(steps - 1, first + per - 1) + 1)
        embed = torch.cat([e_cf + (k / steps) * (e - e_cf) for k in ks])
        _, grads = _pass(model, clean.repeat(len(ks), 1), None if mask is None else mask.repeat(len(ks), 1),
                         tiled(metric, model, len(ks), B), "gradient", reg, embed=embed)
        for n, g in grads.items():
            total[n] += g.unflatten(0, (len(ks), B)).sum(0)
    return {n: g / steps for n, g in total.items()}


def eap(model: Model, tokens, counterfactual, metric, *, attention_mask: torch.Tensor | None = None,
        steps: int = 1) -> EdgeScores:
    """EAP (``steps=1``) or EAP-IG (``steps`` points): ``edge_scores`` with those methods."""
    method = "eap" if steps == 1 else "eap-ig"
    return edge_scores(model, tokens, metric, counterfactual, method=method, steps=steps, attention_mask=attention_mask)


def _scored(graph_of: EdgeGraph, outputs: torch.Tensor, grads: Mapping[str, torch.Tensor], method: str,
            chunks: int = 4) -> EdgeScores:
    """``Σ_{p, d} outputs[b, p, u, d] · g_n[b, p, d]`` on the edges, ``grads`` by downstream node name
    (``_downstream_nodes``). The downstream nodes go in ``chunks`` runs of layers, each one product
    per (prompt, position) over d with the upstream nodes written before the run's last read only
    (the others are no edges: about half the work of the whole product), summed over positions."""
    B, U = outputs.shape[0], outputs.shape[2]
    dtype = next(iter(grads.values())).dtype
    outputs = outputs.to(dtype)
    scores = torch.zeros(B, U, len(graph_of.downstream), dtype=dtype, device=outputs.device)
    groups = _node_groups(graph_of.registry)
    size = -(-len(groups) // chunks)
    first = 0
    for start in range(0, len(groups), size):
        run = groups[start:start + size]
        g = torch.cat([grads[name] if grads[name].ndim == 4 else grads[name][:, :, None] for name, _ in run], 2)
        count = g.shape[2]  # [b, p, N, d]
        before = int(graph_of.adjacency[:, first + count - 1].sum())  # upstream nodes are in write order
        for b in range(B):
            scores[b, :before, first:first + count] = torch.bmm(outputs[b, :, :before], g[b].transpose(1, 2)).sum(0)
        first += count
    return EdgeScores(graph_of, scores * graph_of.adjacency.to(scores), method)


def _node_groups(reg: Registry) -> list[tuple[str, int]]:
    """``_downstream_nodes`` as runs: each graph node and how many downstream nodes it holds."""
    groups: list[tuple[str, int]] = []
    for name, _ in _downstream_nodes(reg):
        if groups and groups[-1][0] == name:
            groups[-1] = (name, groups[-1][1] + 1)
        else:
            groups.append((name, 1))
    return groups


def _downstream_nodes(reg: Registry) -> list[tuple[str, int | None]]:
    """Per downstream node (in ``edge_graph``'s order): the graph node holding its input, and the
    head index into it (None: the node is the input itself)."""
    out = []
    for layer in range(reg.n_layers):
        for kind in ("q", "k", "v"):
            out += [(names.name(f"{kind}_input", layer), h) for h in range(reg.copies(kind))]
        if reg.mlps:
            out.append((names.name("mlp_in", layer), None))
    return out + [(names.name("resid_post", reg.n_layers - 1), None)]


def _at_downstream(values: dict[str, torch.Tensor], reg: Registry) -> torch.Tensor:
    """``[S, batch, pos, downstream, d_model]`` of node values ``[S, *shape]`` at every downstream input."""
    return torch.stack([values[n] if h is None else values[n][:, :, :, h] for n, h in _downstream_nodes(reg)], 3)


def _reader_grads(graph, reg: Registry) -> dict[str, torch.Tensor]:
    """The metric's (modified) gradient at every downstream input's graph node ``[batch, pos, (J,) d]``."""
    wanted = sorted({n for n, _ in _downstream_nodes(reg)})
    values = backprop(graph, Real, keep=wanted)
    return {n: values[n][0] for n in wanted}


def _gradients(graph, reg: Registry) -> torch.Tensor:
    """The same laid out per downstream node ``[batch, pos, downstream, d_model]``."""
    return _at_downstream({n: g[None] for n, g in _reader_grads(graph, reg).items()}, reg)[0]


def _W_O(model: Model, layer: int, dtype: torch.dtype) -> torch.Tensor:
    return check_supported(model).blocks[layer].attn.W_O.detach().to(dtype)  # [H, e, d]


def _outputs(model: Model, acts, reg: Registry, minus=None) -> torch.Tensor:
    """Every upstream node's output ``[batch, pos, upstream, d_model]`` from recorded activations
    (with ``minus``, another run's: the difference, each head's formed from the difference of z)."""
    def at(name: str) -> torch.Tensor:
        return acts[name] if minus is None else acts[name] - minus[name]

    outs = [at(names.name("resid_pre", 0))]
    for layer in range(reg.n_layers):
        z = at(names.name("z", layer))  # [b, p, H, e]
        outs += list(torch.einsum("bphe,hed->hbpd", z, _W_O(model, layer, z.dtype)))
        if reg.mlps:
            outs.append(at(names.name("mlp_out", layer)))
    return torch.stack(outs, 2)


def _recorded(model: Model, tokens: torch.Tensor, metric, mask, *, embeddings: bool = False) -> Mapping[str, torch.Tensor]:
    """The activations ``_outputs`` reads of a run on ``tokens``: the model wing's forward with a trace
    (from the weights where it covers the model), or, for the token embeddings too, the graph
    builder's recording."""
    if embeddings:
        return record(model, tokens, metric, attention_mask=mask).activations
    trace: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        inference.run(model, tokens, trace=trace)
    out = {names.name("resid_pre", 0): trace["resid_pre"][0]}
    for layer in range(len(trace["z"])):
        out[names.name("z", layer)] = trace["z"][layer]
        if "mlp_out" in trace and len(trace["mlp_out"]) > layer:
            out[names.name("mlp_out", layer)] = trace["mlp_out"][layer]
    return out


def _path_scores(model: Model, tokens: torch.Tensor, mask, metric, graph_of: EdgeGraph, sr: Semiring) -> torch.Tensor:
    """``[batch, upstream, downstream]``: ⊕ over (position, dim) of F_u ⊗ B_d (see the module)."""
    reg = graph_of.registry
    graph = build_graph(model, tokens, metric, attention_mask=mask)
    dtype = sr.safe_dtype or graph.dtype
    starts = [names.name("resid_pre", 0)] + [names.name(k, layer) for layer in range(reg.n_layers)
                                              for k in (("z", "mlp_out") if reg.mlps else ("z",))]
    fwd = forward(graph, sr, dtype=dtype, keep=starts)
    outs = [fwd[starts[0]][0]]
    for layer in range(reg.n_layers):
        z = fwd[names.name("z", layer)]  # [1, b, p, H, e]
        B, P, H, e = z.shape[1:]
        heads = sr.matmul(z.permute(0, 3, 1, 2, 4).reshape(1, H, B * P, e), _W_O(model, layer, dtype))  # [1, H, bp, d]
        outs += list(heads[0].reshape(H, B, P, -1))
        if reg.mlps:
            outs.append(fwd[names.name("mlp_out", layer)][0])
    F = torch.stack(outs, 2)  # [b, p, U, d]
    back = _at_downstream(backprop(graph, sr, dtype=dtype, keep=sorted({n for n, _ in _downstream_nodes(reg)})), reg)[0]
    U, D = F.shape[2], back.shape[2]
    x = F.permute(0, 2, 1, 3).reshape(1, B, U, -1)  # [1, b, U, p·d]
    w = back.permute(0, 1, 3, 2).reshape(B, -1, D)  # [b, p·d, D]: plain values, as the product's weights
    return sr.matmul(x, w)[0] * graph_of.adjacency.to(dtype)


def _tokens(model: Model, tokens, attention_mask):
    if isinstance(tokens, torch.Tensor):
        return tokens, attention_mask
    ids, mask = to_tokens(model, tokens)
    return ids, mask if attention_mask is None else attention_mask


__all__ = ["METHODS", "NEEDS_COUNTERFACTUAL", "eap", "edge_scores"]
