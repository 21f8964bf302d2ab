"""The edge graph of edge attribution patching (EAP; Syed et al. 2023, Hanna et al. 2024's EAP-IG, the
graph MIB scores circuits on), and its edge scores.

Upstream nodes write into the residual stream: the input embeddings (``embed``: the residual before
layer 0), each head's output (``L3H7``: ``z[:, :, 7] @ W_O[7]``) and each MLP's output (``MLP3``).
Downstream nodes read it: each head's query, key and value input (``L3H7.q``; grouped-query
attention's ``L3H6-8.k``), each MLP's input (``MLP3``) and the logits (``logits``: the residual
after the last layer). An edge ``u->d`` exists wherever the residual at ``d``'s input holds ``u``'s
output: ``u`` writes before ``d`` reads (a layer's heads before its MLP in a sequential block, not
in a parallel one, where both read the layer's input).

EAP's score of an edge is the first-order change of the metric when the edge alone carries its
counterfactual value: ``Σ_{position, dim} (a_u(x′) − a_u(x)) · ∂m/∂r_d(x)``, with ``a_u`` the
upstream output and ``r_d`` the residual at ``d``'s input, on the clean run ``x``. EAP-IG replaces
the gradient by its mean over ``steps`` points on the straight line between the counterfactual's
input embeddings and the clean ones (``e(α) = e′ + α (e − e′)``, ``α = k / steps``, k = 1..steps:
one point, α = 1, is EAP). Scores are per prompt (``[batch, upstream, downstream]``, zero off the
edges); a circuit sums or averages them over prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradgraph.arch import hooks, names
from gradgraph.arch.features import layout_features
from gradgraph.arch.lens import Model
from gradgraph.arch.spec import check_supported
from gradgraph.backprop import backprop
from gradgraph.build import build_graph
from gradgraph.errors import GradGraphError
from gradgraph.labels import Component, Registry
from gradgraph.prompts import to_tokens
from gradgraph.semirings import Real

LOGITS = "logits"
# layouts whose head and MLP outputs do not add into the residual stream as they are
_NOT_ADDITIVE = ("norms after attention and MLP",)


@dataclass(frozen=True)
class EdgeGraph:
    """Upstream and downstream nodes by label (in residual order), and which pairs are edges."""

    upstream: tuple[str, ...]
    downstream: tuple[str, ...]
    adjacency: torch.Tensor  # [upstream, downstream] bool
    registry: Registry

    @property
    def edges(self) -> list[str]:
        """Every edge's label, ``"u->d"``, upstream by upstream."""
        return [f"{self.upstream[u]}->{self.downstream[d]}" for u, d in self.adjacency.nonzero().tolist()]

    def __len__(self) -> int:
        return int(self.adjacency.sum())

    def index(self, edge: str) -> tuple[int, int]:
        """``(upstream, downstream)`` indices of an edge label."""
        up, sep, down = edge.partition("->")
        if not sep or up not in self.upstream or down not in self.downstream:
            raise GradGraphError(f"{edge!r} is not an edge label of this model (e.g. {self.edges[0]!r}: "
                                 "upstream 'embed', 'L3H7' or 'MLP3'; downstream 'L3H7.q', 'MLP3' or 'logits')")
        u, d = self.upstream.index(up), self.downstream.index(down)
        if not self.adjacency[u, d]:
            raise GradGraphError(f"{edge!r}: {up} writes to the residual stream after {down} reads it")
        return u, d


def edge_graph(model: Model) -> EdgeGraph:
    """EAP's edge graph of ``model`` (every decoder family whose head and MLP outputs add into the
    residual stream as they are)."""
    spec = check_supported(model)
    if spec.layout != "decoder":
        raise GradGraphError("edge graphs are defined for decoders (an encoder's post-norm residual is no sum of "
                             "its components' outputs)")
    blocked = [f for f in layout_features(spec.cfg) if f in _NOT_ADDITIVE]
    if blocked:
        raise GradGraphError(f"{blocked[0]}: a head's output is normalised with the others' before it joins the "
                             "residual stream, so EAP's edges are not defined; use the node methods "
                             "(gradgraph.interventions.attribution_patching)")
    reg = Registry.of(model)
    up: list[tuple[str, float]] = [("embed", -1.0)]  # (label, when it is written: layer, + 0.5 after attention)
    down: list[tuple[str, float]] = []
    for layer in range(reg.n_layers):
        for kind in ("q", "k", "v"):
            down += [(reg.label(Component(kind, layer, h)), layer) for h in range(reg.copies(kind))]
        up += [(reg.label(Component("head", layer, h)), layer) for h in range(reg.n_heads)]
        if reg.mlps:
            down.append((reg.label(Component("mlp", layer)), layer + (0.5 if reg.sequential else 0.0)))
            up.append((reg.label(Component("mlp", layer)), layer + 0.5))
    down.append((LOGITS, float(reg.n_layers)))
    written = torch.tensor([t for _, t in up])
    read = torch.tensor([t for _, t in down])
    return EdgeGraph(tuple(u for u, _ in up), tuple(d for d, _ in down), written[:, None] < read[None, :], reg)


@dataclass(frozen=True)
class EdgeScores:
    """Per-prompt edge scores ``[batch, upstream, downstream]`` (zero off the edges) and their graph."""

    graph: EdgeGraph
    scores: torch.Tensor
    method: str

    def of(self, edge: str) -> torch.Tensor:
        """One edge's score per prompt ``[batch]``."""
        u, d = self.graph.index(edge)
        return self.scores[:, u, d]

    def table(self) -> dict[str, float]:
        """``{edge: score summed over prompts}``, every edge."""
        total = self.scores.sum(0)
        return {edge: float(total[self.graph.index(edge)]) for edge in self.graph.edges}


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


def _outputs(model: Model, acts, reg: Registry) -> torch.Tensor:
    """Every upstream node's output ``[batch, pos, upstream, d_model]`` from recorded activations."""
    spec = check_supported(model)
    outs = [acts[names.name("resid_pre", 0)]]
    for layer in range(reg.n_layers):
        z = acts[names.name("z", layer)]  # [b, p, H, e]
        W_O = spec.blocks[layer].attn.W_O.detach().to(z.dtype)  # [H, e, d]
        outs += list(torch.einsum("bphe,hed->hbpd", z, W_O))
        if reg.mlps:
            outs.append(acts[names.name("mlp_out", layer)])
    return torch.stack(outs, 2)


def _gradients(graph, reg: Registry) -> torch.Tensor:
    """The metric's gradient at every downstream input ``[batch, pos, downstream, d_model]``."""
    nodes = _downstream_nodes(reg)
    values = backprop(graph, Real, keep=sorted({n for n, _ in nodes}))
    return torch.stack([values[n][0] if h is None else values[n][0][:, :, h] for n, h in nodes], 2)


def _corrupt_activations(model: Model, tokens: torch.Tensor, reg: Registry) -> dict[str, torch.Tensor]:
    wanted = {names.name("resid_pre", 0), names.name("embed")}
    wanted |= {names.name(k, layer) for layer in range(reg.n_layers) for k in ("z", "mlp_out") if k != "mlp_out" or reg.mlps}
    with hooks.recording(model, names=wanted) as store:
        hooks.final_residual(model, tokens)
    return {name: tensors[0].detach() for name, tensors in store.items()}


def eap(model: Model, tokens, counterfactual, metric, *, attention_mask: torch.Tensor | None = None,
        steps: int = 1) -> EdgeScores:
    """Edge attribution patching (``steps=1``) or EAP-IG (``steps`` points on the line from the
    counterfactual's input embeddings to the clean ones) for every edge of ``edge_graph(model)``.

    ``tokens`` and ``counterfactual``: prompts of equal shape (token ids, or texts that tokenize to
    the same lengths); ``metric`` as for ``build_graph``. One graph per point, one recording of the
    counterfactual."""
    graph_of = edge_graph(model)
    reg = graph_of.registry
    if not isinstance(steps, int) or steps < 1:
        raise GradGraphError(f"steps must be a positive integer, got {steps!r}")
    clean, mask = _tokens(model, tokens, attention_mask)
    corrupt, _ = _tokens(model, counterfactual, attention_mask)
    if clean.shape != corrupt.shape:
        raise GradGraphError(f"counterfactual prompts must align with the prompts token by token: shapes "
                             f"{tuple(corrupt.shape)} and {tuple(clean.shape)}")
    graph = build_graph(model, clean, metric, attention_mask=mask)
    other = _corrupt_activations(model, corrupt, reg)
    delta = _outputs(model, other, reg) - _outputs(model, graph.activations, reg)  # [b, p, U, d]
    if steps == 1:
        grads = _gradients(graph, reg)
    else:
        e, e_cf = graph.activations[names.name("embed")], other[names.name("embed")]
        grads = sum(_gradients(build_graph(model, clean, metric, attention_mask=mask,
                                           embed=e_cf + (k / steps) * (e - e_cf)), reg)
                    for k in range(1, steps + 1)) / steps
    scores = torch.einsum("bpud,bpnd->bun", delta.to(grads.dtype), grads)
    return EdgeScores(graph_of, scores * graph_of.adjacency.to(scores), "EAP" if steps == 1 else f"EAP-IG ({steps})")


def _tokens(model: Model, tokens, attention_mask):
    if isinstance(tokens, torch.Tensor):
        return tokens, attention_mask
    ids, mask = to_tokens(model, tokens)
    return ids, mask if attention_mask is None else attention_mask


__all__ = ["LOGITS", "EdgeGraph", "EdgeScores", "eap", "edge_graph"]
