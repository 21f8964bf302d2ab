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

from gradgraph.arch import inference, names
from gradgraph.arch.lens import Model
from gradgraph.arch.spec import check_supported
from gradgraph.backprop import backprop, forward
from gradgraph.build import build_graph, record
from gradgraph.edges import EdgeGraph, EdgeScores, edge_graph
from gradgraph.errors import GradGraphError
from gradgraph.labels import Registry
from gradgraph.prompts import to_tokens
from gradgraph.semirings import Abs, Max, Real, Semiring

METHODS = ("eap", "eap-ig", "relp", "attn-lrp", "flow", "max")
NEEDS_COUNTERFACTUAL = ("eap", "eap-ig", "relp")
_RULES = {"eap": "gradient", "eap-ig": "gradient", "relp": "relp", "attn-lrp": "attn-lrp"}
_PATHS: dict[str, Semiring] = {"flow": Abs, "max": Max}


def edge_scores(model: Model, tokens, metric, counterfactual=None, *, method: str = "eap", steps: int = 5,
                attention_mask: torch.Tensor | None = None) -> EdgeScores:
    """Every edge's score by ``method`` (``METHODS``); ``steps``: EAP-IG's points.

    ``tokens`` and ``counterfactual``: prompts of equal shape (token ids, or texts that tokenize to the
    same lengths; ``eap``, ``eap-ig`` and ``relp`` need one); ``metric`` as for ``build_graph``. One
    recording of the prompts per point and one of the counterfactual."""
    if method not in METHODS:
        raise GradGraphError(f"method must be one of {METHODS}, got {method!r}")
    graph_of = edge_graph(model)
    clean, mask = _tokens(model, tokens, attention_mask)
    if method in _PATHS:
        return EdgeScores(graph_of, _path_scores(model, clean, mask, metric, graph_of, _PATHS[method]), method)
    if method == "attn-lrp":
        graph = build_graph(model, clean, metric, attention_mask=mask, rules="attn-lrp")
        outputs = _outputs(model, graph.activations, graph_of.registry)
        return _scored(graph_of, outputs, _gradients(graph, graph_of.registry), method)
    if counterfactual is None:
        raise GradGraphError(f"{method} scores an edge by its counterfactual value: pass counterfactual prompts")
    corrupt, _ = _tokens(model, counterfactual, attention_mask)
    if corrupt.shape != clean.shape:
        raise GradGraphError(f"counterfactual prompts must align with the prompts token by token: shapes "
                             f"{tuple(corrupt.shape)} and {tuple(clean.shape)}")
    if method == "eap-ig" and (not isinstance(steps, int) or steps < 1):
        raise GradGraphError(f"steps must be a positive integer, got {steps!r}")
    reg = graph_of.registry
    graph = build_graph(model, clean, metric, attention_mask=mask, rules=_RULES[method])
    other = _recorded(model, corrupt, metric, mask, embeddings=method == "eap-ig" and steps > 1)
    delta = _outputs(model, graph.activations, reg, minus=other)  # [b, p, U, d]: a(x) − a(x′)
    if method != "eap-ig" or steps == 1:
        return _scored(graph_of, delta, _gradients(graph, reg), method if method != "eap-ig" else "eap-ig (1)")
    e, e_cf = graph.activations[names.name("embed")], other[names.name("embed")]
    grads = sum(_gradients(build_graph(model, clean, metric, attention_mask=mask, embed=e_cf + (k / steps) * (e - e_cf)),
                           reg) for k in range(1, steps + 1)) / steps
    return _scored(graph_of, delta, grads, f"eap-ig ({steps})")


def eap(model: Model, tokens, counterfactual, metric, *, attention_mask: torch.Tensor | None = None,
        steps: int = 1) -> EdgeScores:
    """EAP (``steps=1``) or EAP-IG (``steps`` points): ``edge_scores`` with those methods."""
    method = "eap" if steps == 1 else "eap-ig"
    return edge_scores(model, tokens, metric, counterfactual, method=method, steps=steps, attention_mask=attention_mask)


def _scored(graph_of: EdgeGraph, outputs: torch.Tensor, grads: torch.Tensor, method: str) -> EdgeScores:
    """``Σ_{p, d} outputs[b, p, u, d] · grads[b, p, n, d]`` on the edges: per prompt, one product per
    position over d, summed (faster than one product over (p, d), which needs both laid out again)."""
    outputs = outputs.to(grads.dtype)
    scores = torch.stack([torch.bmm(o, g.transpose(1, 2)).sum(0) for o, g in zip(outputs, grads)])
    return EdgeScores(graph_of, scores * graph_of.adjacency.to(scores), method)


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


def _gradients(graph, reg: Registry) -> torch.Tensor:
    """The metric's (modified) gradient at every downstream input ``[batch, pos, downstream, d_model]``."""
    values = backprop(graph, Real, keep=sorted({n for n, _ in _downstream_nodes(reg)}))
    return _at_downstream(values, reg)[0]


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
