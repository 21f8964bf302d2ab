"""Every method's score for every head, q/k/v pathway and MLP, from one recorded forward pass per
batch; with each method's token attributions and its values at the q/k/v/skip branches of every
attention input. The SVA study and ``gradgraph heads`` rank components with these; each number is
the method's own (``paths.gradient_flow``, ``backprop.through``, ``attribution_patching``,
``relevance_patching``, ``lrp``, ``integrated_flow``: tested equal), read per component by
``components.pathway_scores``.

| method        | a component's score                                                                |
|---------------|------------------------------------------------------------------------------------|
| ``flow``      | share of the total |gradient| flow (Σ over input → metric paths of Π|w|) through it |
| ``top_path``  | the best path through it, relative to the best path overall (Max)                  |

(Token attributions of ``flow`` and ``top_path``: the same shares at each input token.)
| ``attribution`` | attribution patching: Σ (act_cf − act) · ∂metric/∂act over its elements          |
| ``relp``      | relevance patching: the same with RelP's modified gradient                         |
| ``attn_lrp``  | AttnLRP relevance: Σ act ⊙ modified gradient over its elements                    |
| ``mask_lrp``  | Mask-LRP relevance: Chefer et al.'s rules, relevance through the chosen heads only |
| ``udig``      | UDIG conductance: Σ_k ∂F/∂h(x_k) ⊙ Δh_k along UDIG's path (Σ = UDIG's attribution) |

Components (``component_labels``): per layer each query head's input (``L3H7.q``), each key/value
head's inputs (``L3H6-8.k``, ``.v``), each head's output (``L3H7``) and the MLP (``MLP3``), summed
over positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from gradgraph.arch import names
from gradgraph.attribution import integrated_flow, token_scores
from gradgraph.backprop import backprop, forward
from gradgraph.build import Recording, assemble, record
from gradgraph.components import PATHWAY_KINDS, pathway_scores
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.interventions import PATHWAYS, _cache
from gradgraph.labels import Registry
from gradgraph.metrics import logit_diff
from gradgraph.rules import ATTN_LRP, CHEFER2021, GRADIENT, RELP
from gradgraph.semirings import Abs, Max, Real

METHODS = {
    "flow": "gradient flow",
    "top_path": "best path (Max)",
    "attribution": "attribution patching",
    "relp": "relevance patching (RelP)",
    "attn_lrp": "AttnLRP relevance",
    "mask_lrp": "Mask-LRP relevance",
    "udig": "UDIG conductance",
}
NEEDS_COUNTERFACTUAL = ("attribution", "relp")
# token attributions: the input end of each method (patching methods only see the tokens that differ)
TOKEN_METHODS = {"grad_x_input": "gradient × input", "flow": "gradient flow", "top_path": "best path (Max)",
                 "attn_lrp": "AttnLRP relevance", "mask_lrp": "Mask-LRP relevance", "udig": "UDIG attribution"}


def check_methods(methods) -> tuple[str, ...]:
    """The method names, in ``METHODS`` order; ``GradGraphError`` naming an unknown one."""
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise GradGraphError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}" if unknown
                             else f"choose at least one method from {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in methods)


def component_labels(model_or_graph) -> list[str]:
    """The labels of the scored components, in the order of the score columns."""
    reg = Registry.of(model_or_graph)
    return [reg.label(c) for c in reg.components(kinds=PATHWAY_KINDS)]


@dataclass
class Branches:
    """What ``branches.branch_shares`` reads for one method: its semiring, aggregation and values
    ``{node: [1, batch, pos, ...]}`` at the q/k/v inputs and the skip (``hook_resid_mid``)."""

    semiring: object
    agg: str
    values: dict[str, torch.Tensor]
    include: torch.Tensor | None = None  # [batch] bool: the items that have values (UDIG's)


@dataclass
class Scores:
    """One batch: ``components[method]`` ``[batch, n components]``, ``tokens[method]`` ``[batch, pos]``,
    ``branches[method]``, the gradient graph (top paths, entropy), UDIG's completeness errors and
    ``positions[method]``: each component at each position ``[batch, pos, n components]``."""

    components: dict[str, torch.Tensor]
    tokens: dict[str, torch.Tensor]
    branches: dict[str, Branches]
    graph: GradGraph
    positions: dict[str, torch.Tensor] = field(default_factory=dict)  # method -> [batch, pos, n components]
    udig_delta: torch.Tensor | None = None  # [batch]: Σ UDIG attribution − (F(x) − F(x′)); NaN where not run
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Batch:
    """What every method reads on one batch: the recording, its gradient graph and the Real pass at
    the component, branch and input nodes, and what some methods need besides."""

    model: object
    recording: Recording
    gradient: GradGraph
    grads: dict[str, torch.Tensor]
    nodes: list[str]  # the component nodes (q/k/v inputs, z, mlp_out)
    wanted: list[str]  # the component, branch and input nodes
    good: torch.Tensor  # [batch]
    bad: torch.Tensor  # [batch]
    position: int
    counterfactual: torch.Tensor | None
    head_mask: torch.Tensor | None
    udig: torch.Tensor | None  # [batch] bool: the items UDIG runs on
    udig_steps: int
    baseline: object
    _corrupt: dict | None = None

    def corrupt(self) -> dict[str, torch.Tensor]:
        """The counterfactual's activations at the component nodes (one run, shared by both patchings)."""
        if self._corrupt is None:
            self._corrupt = _cache(self.model, self.counterfactual, kinds=PATHWAYS)
        return self._corrupt


@dataclass
class _Scored:
    """One method on one batch: per component ``[batch, C]`` and per position ``[batch, pos, C]``,
    its token attributions, branch values and (UDIG) completeness errors where it has them."""

    components: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor | None = None
    branches: Branches | None = None
    delta: torch.Tensor | None = None


def _component_nodes(graph: GradGraph) -> list[str]:
    nodes = [names.name(kind, layer) for layer in range(graph.n_layers)
             for kind in ("q_input", "k_input", "v_input", "z", "mlp_out")]
    return [n for n in nodes if n in graph.shapes]  # attention-only blocks have no MLP


def _branch_nodes(graph: GradGraph) -> list[str]:
    reg = Registry.of(graph)
    return [n for layer in range(graph.n_layers) for n in reg.branch_nodes(layer).values()]


def _relevance(graph: GradGraph, grads: dict[str, torch.Tensor], nodes) -> dict[str, torch.Tensor]:
    """activation ⊙ value at ``nodes`` ``{node: [1, *shape]}``; a skip node (``hook_resid_mid``,
    read from ``hook_resid_pre``) takes the activation of the residual it carries."""
    carried = Registry.of(graph).skip_sources()
    return {node: grads[node] * graph.activations[carried.get(node, node)][None] for node in nodes}


def _through(graph: GradGraph, semiring, nodes: list[str]):
    """(forward ⊗ backward at ``nodes``, the ⊕ over every input → metric path per item, backward values)."""
    dtype = semiring.safe_dtype
    bwd = backprop(graph, semiring, dtype=dtype)
    fwd = forward(graph, semiring, dtype=dtype, keep=nodes)
    total = None
    for source in graph.sources:
        value = semiring.sum(bwd[source].flatten(2), 1)  # [S, batch]
        total = value if total is None else semiring.plus(total, value)
    return {n: semiring.times(fwd[n], bwd[n]) for n in nodes}, total[0].double().cpu(), bwd


def score(model, tokens: torch.Tensor, mask: torch.Tensor, good: torch.Tensor, bad: torch.Tensor, *,
          methods=tuple(METHODS), counterfactual: torch.Tensor | None = None, head_mask: torch.Tensor | None = None,
          position: int = -1, udig: torch.Tensor | None = None, udig_steps: int = 30, baseline="pad") -> Scores:
    """Every chosen method on one batch of prompts ``tokens`` ``[batch, pos]`` (right-padded) with
    the metric logit(good) − logit(bad) at ``position`` (default each prompt's last token).

    One recording serves the gradient graph (flow, best path, attribution patching, gradient ×
    input), RelP's, AttnLRP's and Mask-LRP's graphs (``head_mask``: the heads Mask-LRP keeps).
    ``counterfactual`` (aligned tokens) is needed by the patching methods. UDIG integrates along its
    own path (``udig_steps`` anchors, from ``baseline`` as in ``attribute``), one prompt at a time,
    for the items where ``udig`` ``[batch]`` is True (default all)."""
    methods = check_methods(methods)
    if counterfactual is None and any(m in NEEDS_COUNTERFACTUAL for m in methods):
        raise GradGraphError(f"{[m for m in methods if m in NEEDS_COUNTERFACTUAL]} need counterfactual prompts")
    if "mask_lrp" in methods and head_mask is None:
        raise GradGraphError("mask_lrp needs a head mask (gradgraph.heads.mask builds Mask-LRP's)")
    clock: dict[str, float] = {}
    begin = time.perf_counter()
    recording = record(model, tokens, logit_diff(good, bad, pos=position), attention_mask=mask)
    gradient = assemble(recording, GRADIENT)
    nodes = _component_nodes(gradient)
    wanted = list(dict.fromkeys(nodes + _branch_nodes(gradient) + list(gradient.sources)))
    batch = _Batch(model, recording, gradient, backprop(gradient, Real, keep=wanted), nodes, wanted, good, bad,
                   position, counterfactual, head_mask, udig, udig_steps, baseline)
    clock["(recording and gradient)"] = time.perf_counter() - begin
    out = Scores({}, {"grad_x_input": token_scores(gradient, batch.grads).double().cpu()}, {}, gradient)
    for method in methods:
        start = time.perf_counter()
        scored = METHOD_FUNCTIONS[method](batch)
        out.components[method], out.positions[method] = scored.components, scored.positions
        if scored.tokens is not None:
            out.tokens[method] = scored.tokens.double().cpu()
        if scored.branches is not None:
            out.branches[method] = scored.branches
        if scored.delta is not None:
            out.udig_delta = scored.delta
        clock[METHODS[method]] = time.perf_counter() - start
    out.seconds = clock
    return out


def _per_component(batch: _Batch, values: dict[str, torch.Tensor], semiring) -> tuple[torch.Tensor, torch.Tensor]:
    """``(⊕ over positions and units [batch, C], ⊕ over units [batch, pos, C])`` of node values."""
    return (pathway_scores(batch.gradient, values, semiring),
            pathway_scores(batch.gradient, values, semiring, per_position=True))


def _path_method(batch: _Batch, semiring, agg: str) -> _Scored:
    """Flow (``Abs``) or best path (``Max``) through each component, as a share of the whole."""
    graph = batch.gradient
    through, total, bwd = _through(graph, semiring, batch.nodes)
    values = {n: v / total.to(v.dtype)[None, :].reshape((1, -1) + (1,) * (v.ndim - 2)) for n, v in through.items()}
    source = bwd[graph.sources[0]][0] / total.to(bwd[graph.sources[0]].dtype)[:, None, None]
    tokens = (source.sum(-1) if agg == "sum" else source.amax(-1)).double().cpu() * graph.source_mask
    components, positions = _per_component(batch, values, semiring)
    return _Scored(components, positions, tokens, Branches(semiring, agg, {n: bwd[n] for n in _branch_nodes(graph)}))


def _flow(batch: _Batch) -> _Scored:
    return _path_method(batch, Abs, "sum")


def _top_path(batch: _Batch) -> _Scored:
    scored = _path_method(batch, Max, "oplus")
    scored.components = scored.components.clamp(max=1.0)  # one path multiplied in another order can pass the best
    return scored


def _patching(batch: _Batch, grads: dict[str, torch.Tensor]) -> _Scored:
    """(act_cf − act) · ``grads`` at every component element."""
    corrupt, graph = batch.corrupt(), batch.gradient
    values = {n: ((corrupt[n] - graph.activations[n]) * grads[n][0].to(corrupt[n].dtype))[None] for n in batch.nodes}
    return _Scored(*_per_component(batch, values, Real))


def _attribution(batch: _Batch) -> _Scored:
    return _patching(batch, batch.grads)


def _relp(batch: _Batch) -> _Scored:
    return _patching(batch, backprop(assemble(batch.recording, RELP), Real, keep=batch.nodes))


def _lrp(batch: _Batch, graph: GradGraph) -> _Scored:
    """Relevance (activation ⊙ modified gradient) at every component, token and branch of ``graph``."""
    g = backprop(graph, Real, keep=batch.wanted)
    values = _relevance(graph, g, batch.wanted)
    return _Scored(*_per_component(batch, values, Real), token_scores(graph, g),
                   Branches(Real, "sum", {n: values[n] for n in _branch_nodes(graph)}))


def _attn_lrp(batch: _Batch) -> _Scored:
    return _lrp(batch, assemble(batch.recording, ATTN_LRP))


def _mask_lrp(batch: _Batch) -> _Scored:
    return _lrp(batch, assemble(batch.recording, CHEFER2021, head_mask=batch.head_mask))


def _udig(batch: _Batch) -> _Scored:
    """UDIG conductance per component, UDIG's token attribution and branch conductances, one
    prompt at a time (NaN rows where not run)."""
    model, gradient, good, bad, position = batch.model, batch.gradient, batch.good, batch.bad, batch.position
    chosen, steps, baseline = batch.udig, batch.udig_steps, batch.baseline
    B, P = gradient.tokens.shape
    chosen = torch.ones(B, dtype=torch.bool) if chosen is None else chosen
    C = len(component_labels(gradient))
    rows = torch.full((B, C), float("nan"), dtype=torch.float64)
    at = torch.full((B, P, C), float("nan"), dtype=torch.float64)
    tokens = torch.full((B, P), float("nan"), dtype=torch.float64)
    delta = torch.full((B,), float("nan"), dtype=torch.float64)
    nodes = _branch_nodes(gradient)
    carried = Registry.of(gradient).skip_sources()
    branch = {n: torch.zeros((1, *gradient.shapes[n]), dtype=torch.float64) for n in nodes}
    for b in chosen.nonzero()[:, 0].tolist():
        n = int(gradient.attention_mask[b].sum())
        result = integrated_flow(model, gradient.tokens[b:b + 1, :n], logit_diff(int(good[b]), int(bad[b]), pos=position),
                                 path="udig", steps=steps, baseline=baseline, batch_size=steps + 2, progress=False)
        values = {k: v[None] for k, v in result.values.items()}
        rows[b] = pathway_scores(result.graph, values, Real)[0]
        at[b, :n] = pathway_scores(result.graph, values, Real, per_position=True)[0]
        tokens[b] = 0.0
        tokens[b, :n] = result.scores[0].double()
        delta[b] = float(result.delta[0])
        for node in nodes:
            key = f"{carried[node]}->{node}" if node in carried else node
            branch[node][0, b, :n] = result.values[key][0].double()
    return _Scored(rows, at, tokens, Branches(Real, "sum", branch, chosen.clone()), delta)


# every method's function over one batch, in METHODS' order
METHOD_FUNCTIONS = {"flow": _flow, "top_path": _top_path, "attribution": _attribution, "relp": _relp,
                    "attn_lrp": _attn_lrp, "mask_lrp": _mask_lrp, "udig": _udig}


__all__ = ["METHODS", "NEEDS_COUNTERFACTUAL", "TOKEN_METHODS", "Branches", "Scores", "check_methods",
           "component_labels", "score"]
