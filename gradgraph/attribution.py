"""Attributions: the one result type every method returns; input attributions (saliency, gradient
× input, SmoothGrad, IG, DIG, UDIG, LAFA) and their flow through every node; LRP on the gradient graph.

``lrp`` builds the graph under an LRP rule set (``gradgraph.rules``) and runs the one recursion with
the real semiring: the value at each node is a modified gradient ``g`` and the relevance there is
``activation ⊙ g`` (gradient × input form, as AttnLRP's reference implementation computes it).
The relevance arriving at the logits is ``logits ⊙ ∂metric/∂logits``, which sums to the metric for a
logit difference, so conservation is measured against the metric value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from gradgraph import fused, ig_paths, integrated
from gradgraph.arch import names
from gradgraph.backprop import backprop
from gradgraph.build import assemble, build_graph, record
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.labels import Registry
from gradgraph.lafa import lafa
from gradgraph.prompts import to_tokens
from gradgraph.result import Attribution, kept_positions
from gradgraph.rules import ATTN_LRP, CHEFER2021, GRADIENT, RuleSet, rule_set
from gradgraph.semirings import Real, Semiring


def cuts(graph: GradGraph) -> list[str]:
    """The residual-stream nodes that every input → metric path passes through, bottom to top."""
    # no resid_mid in parallel and attention-only blocks
    return [name for name in names.residual_cuts(graph.n_layers) if name in graph.shapes]


def token_scores(graph: GradGraph, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[batch, pos]``: Σ over the input nodes and d_model of activation ⊙ value, for ``grads``
    from ``backprop(graph, Real)`` (gradient × input, or LRP relevance); 0 at padding."""
    scores = sum((grads[s][0] * graph.activations[s]).sum(-1) for s in graph.sources)
    return scores * graph.source_mask.to(scores.dtype)


def cached_relevance(graph: GradGraph, grads: Mapping[str, torch.Tensor], from_layer: int = 0) -> torch.Tensor:
    """``[batch]``: Σ activation ⊙ value over a cached prefix's keys and values (the graph's inputs
    that are not tokens) in layers ``from_layer`` and up; 0 without a prefix."""
    total = torch.zeros_like(graph.metric_value)
    for node in graph.cached:
        if names.parse(node)[1] >= from_layer:
            total = total + (grads[node][0] * graph.activations[node]).flatten(1).sum(1)
    return total


def relevance(graph: GradGraph, method: str | None = None, *, keep="all") -> Attribution:
    """LRP relevance on a graph built under an LRP rule set (or gradient × input under GRADIENT):
    relevance per token and the conservation error at the input and at every residual cut. After
    a cached prefix, the inputs are the tokens and the prefix's keys and values (``cached``): what
    arrives there counts towards conservation, at a cut only where it enters above the cut.
    ``keep``: ``"all"`` (values at every node, the graph kept for ``by_component``) or node names
    (values at the inputs and those nodes only, no graph)."""
    at_cuts = cuts(graph)
    if keep == "all":
        wanted = [n for n in graph.order if n != names.METRIC]
    else:
        wanted = list(dict.fromkeys([*graph.sources, *([keep] if isinstance(keep, str) else keep)]))
    grads = backprop(graph, Real, keep=list(dict.fromkeys([*wanted, *at_cuts, *graph.cached])))
    scores = token_scores(graph, grads)
    target = graph.metric_value
    cut_deltas = {}
    for n in at_cuts:
        layer = names.parse(n)[1]
        above = layer if n == names.name("resid_pre", layer) else layer + 1  # cached k/v of layer L enter at its attention
        reached = (grads[n][0] * graph.activations[n]).flatten(1).sum(1)
        cut_deltas[n] = reached + cached_relevance(graph, grads, above) - target
    delta = scores.sum(1) + cached_relevance(graph, grads) - target
    values = {n: grads[n][0] * graph.activations[n] for n in wanted}
    return Attribution(method or graph.rules, graph.tokens, scores, target, delta, values,
                       graph if keep == "all" else None, cut_deltas)


def lrp(
    model,
    tokens,
    metric,
    *,
    rules: RuleSet | str = ATTN_LRP,
    head_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    keep=(),
) -> Attribution:
    """Layer-wise relevance propagation of ``metric`` through ``model`` on ``tokens``.

    ``rules``: ``ATTN_LRP`` (default), ``CP_LRP``, ``RELP``, ``CHEFER2021`` or a name.
    ``head_mask`` ``[n_layers, n_heads]`` bool (Mask-LRP; ``gradgraph.heads.mask`` builds it):
    relevance flows down only through the heads marked True. Which rule sets conserve: CP-LRP on a
    model without biases, Chefer et al.'s (up to outputs with a zero denominator); AttnLRP's softmax
    rule and biases do not, and ``delta`` says by how much.

    ``keep``: what ``values`` holds besides the relevance at the inputs: ``()`` (default: the
    scores, ``delta`` and the cut deltas only, from one fused autograd pass where ``fused.covers``
    the rule set and model, with no graph stored), node names, or ``"all"`` (every node, and the
    graph for ``by_component``)."""
    if keep == () and fused.covers(model, rules, head_mask=head_mask):
        one = fused.input_values(model, tokens, metric, rules=rules, attention_mask=attention_mask, cuts=True)
        scores, target = one.scores(), one.metric_value
        values = {n: one.grads[n] * one.activations[n] for n in one.grads}
        return Attribution(rule_set(rules).name, one.tokens, scores, target, scores.sum(1) - target, values, None,
                           {n: total - target for n, total in one.cut_sums.items()})
    graph = build_graph(model, tokens, metric, attention_mask=attention_mask, rules=rules, head_mask=head_mask)
    return relevance(graph, keep=keep)


# --------------------------------------------------------------------------- input attributions

METHODS = {  # method -> its options and their defaults
    "saliency": {},
    "grad_x_input": {},
    "smoothgrad": dict(samples=25, noise=0.15, seed=0),
    "ig": dict(steps=32, rule="gausslegendre"),
    "dig": dict(steps=30, strategy="greedy", factor=0, neighbours=500),
    "udig": dict(steps=30, strategy="greedy", factor=0, neighbours=50),
    "lafa": dict(corpus=None, base="smoothgrad", lam=0.44, kernel="indicator", n_neighbours=10, layer=None),
}
BASELINES = ("pad", "eos", "zeros")


def _options(method: str, options: dict) -> dict:
    if method not in METHODS:
        raise GradGraphError(f"unknown attribution method {method!r}; choose one of {sorted(METHODS)}")
    unknown = set(options) - set(METHODS[method])
    if unknown:
        raise GradGraphError(f"{method} takes the options {sorted(METHODS[method])}; got {sorted(unknown)}")
    return {**METHODS[method], **options}


def _baseline(model, ids: torch.Tensor, baseline, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(baseline embeddings [pos, d_model], baseline word ids [pos] or None)``; positions in
    ``keep`` keep their own token (BOS is not attributed unless asked)."""
    W = model.W_E.detach()
    if isinstance(baseline, torch.Tensor):
        if tuple(baseline.shape) != (len(ids), W.shape[1]):
            raise GradGraphError(f"a baseline tensor is [pos, d_model] = [{len(ids)}, {W.shape[1]}] embeddings, "
                                 f"got {tuple(baseline.shape)}; or pass one of {BASELINES}")
        return torch.where(keep[:, None], W[ids], baseline.to(W.dtype)), None
    if isinstance(baseline, int) and not isinstance(baseline, bool):
        if not 0 <= baseline < W.shape[0]:
            raise GradGraphError(f"a baseline token id must lie in [0, {W.shape[0]}), got {baseline}")
        words = torch.where(keep, ids, torch.full_like(ids, baseline))
        return W[words], words
    if baseline not in BASELINES:
        raise GradGraphError(f"baseline must be one of {BASELINES}, a token id or a [pos, d_model] tensor, "
                             f"got {baseline!r}")
    if baseline == "zeros":
        return torch.where(keep[:, None], W[ids], torch.zeros_like(W[ids])), None
    tokenizer = model.tokenizer
    word = None if tokenizer is None else (tokenizer.pad_token_id if baseline == "pad" else None)
    word = word if word is not None else (None if tokenizer is None else tokenizer.eos_token_id)
    if word is None:
        raise GradGraphError(f"baseline={baseline!r} needs a tokenizer with a pad or end-of-text token; use 'zeros'")
    words = torch.where(keep, ids, torch.full_like(ids, word))
    return W[words], words


@dataclass(frozen=True)
class _One:
    """One prompt's attribution: per-element ``[pos, d]``, target F(x) − F(x′), the path rows."""

    elements: torch.Tensor
    target: float
    path: torch.Tensor | None
    scores: torch.Tensor | None = None  # [pos], where not the sum of elements over d (saliency, LAFA)
    kind: str = ""


def _check_length(model, ids: torch.Tensor) -> None:
    words = int((~kept_positions(model, ids, False)).sum())  # the text's tokens, BOS aside
    if words < 2:
        raise GradGraphError(f"the text has {words} token(s); attributions need at least two (the metric reads "
                             f"the prediction that follows them)")


def _path_of(model, ids: torch.Tensor, method: str, opts: dict, baseline, keep: torch.Tensor) -> ig_paths.Path:
    """The IG, DIG or UDIG path of one prompt ``ids`` ``[pos]``."""
    x = model.W_E.detach()[ids]
    x0, words = _baseline(model, ids, baseline, keep)
    if method == "ig":
        return ig_paths.straight(x, x0, opts["steps"], opts["rule"])
    if words is None:
        raise GradGraphError(f"{method} walks through vocabulary words: the baseline must be a word ('pad' or 'eos'), "
                             f"not {'a tensor' if isinstance(baseline, torch.Tensor) else repr(baseline)}")
    return ig_paths.discretized(model, ids, words, method=method, strategy=opts["strategy"], m=opts["steps"],
                                factor=opts["factor"], k=opts["neighbours"])[0]


@dataclass(frozen=True)
class _Prompt:
    """What every method reads of one prompt: its ids ``[pos]``, embeddings ``x`` and baseline
    ``x0`` ``[pos, d]``, the positions that keep their token (``keep``) and ``grads(rows)``, the
    gradient and metric at rows of embeddings."""

    model: object
    ids: torch.Tensor
    x: torch.Tensor
    x0: torch.Tensor
    keep: torch.Tensor
    grads: Callable
    baseline: object


def _at_input(p: _Prompt, method: str, opts: dict) -> _One:
    """Saliency Σ_d |∂F/∂x| and gradient × input, from the gradient at the input."""
    g, f = p.grads(torch.stack([p.x, p.x0]))
    elements = g[0] * p.x
    scores = g[0].abs().sum(-1) * (~p.keep) if method == "saliency" else None
    return _One(elements * (~p.keep)[:, None], float(f[0] - f[1]), None, scores, method)


def _smoothgrad(p: _Prompt, method: str, opts: dict) -> _One:
    """Gradient × input averaged over noisy copies of the input."""
    if opts["samples"] < 1:
        raise GradGraphError(f"samples must be ≥ 1, got {opts['samples']}")
    sigma = opts["noise"] * float(p.x.max() - p.x.min())
    noise = torch.randn((opts["samples"], *p.x.shape), generator=torch.Generator().manual_seed(opts["seed"]),
                        dtype=p.x.dtype) * sigma * (~p.keep)[:, None]
    g, f = p.grads(torch.cat([p.x + noise, torch.stack([p.x, p.x0])]))
    return _One(g[:-2].mean(0) * p.x * (~p.keep)[:, None], float(f[-2] - f[-1]), p.x + noise, None,
                f"smoothgrad ({opts['samples']} samples, noise {opts['noise']})")


def _along_path(p: _Prompt, method: str, opts: dict) -> _One:
    """IG, DIG, UDIG: Σ_k ∂F/∂x(x_k) ⊙ Δx_k along the method's path."""
    path = _path_of(p.model, p.ids, method, opts, p.baseline, p.keep)
    rows = torch.cat([path.points, torch.stack([path.end, path.start])])
    g, f = p.grads(rows)
    elements = (g[:-2] * path.steps).sum(0)
    return _One(elements, float(f[-2] - f[-1]), path.polyline if path.polyline is not None else path.points, None,
                path.kind)


# each method of one prompt (LAFA wraps a base method over the whole batch: ``attribute`` hands it over)
_ONE_PROMPT = {"saliency": _at_input, "grad_x_input": _at_input, "smoothgrad": _smoothgrad,
               "ig": _along_path, "dig": _along_path, "udig": _along_path}


def _attribute_one(model, ids: torch.Tensor, metric, method: str, opts: dict, baseline, attribute_bos: bool,
                   batch_size: int, positions) -> _One:
    _check_length(model, ids)
    keep = kept_positions(model, ids, attribute_bos, positions)
    x0, _ = _baseline(model, ids, baseline, keep)
    grads = lambda rows: integrated.gradients(model, ids, metric, rows, batch_size=batch_size)  # noqa: E731
    prompt = _Prompt(model, ids, model.W_E.detach()[ids], x0, keep, grads, baseline)
    return _ONE_PROMPT[method](prompt, method, opts)


def attribute(model, tokens, metric, *, method: str = "ig", baseline="pad", attribute_bos: bool = False,
              positions=None, batch_size: int = 64, **options) -> Attribution:
    """Token attributions of ``metric`` by ``method``, one prompt at a time, all path points of a
    prompt in batched passes through the gradient graph.

    Methods and options (defaults in ``METHODS``): ``saliency`` (Σ_d |∂F/∂x|), ``grad_x_input``
    (Σ_d ∂F/∂x ⊙ x), ``smoothgrad`` (gradient × input averaged over ``samples`` noisy copies, noise
    σ = ``noise`` · (max − min) of the embeddings), ``ig`` (straight line, ``steps`` points of a
    quadrature ``rule``: ``gausslegendre``, ``riemann_left|right|middle|trapezoid``), ``dig`` and
    ``udig`` (``steps`` = m anchors, ``strategy`` greedy or maxcount, up-scaling ``factor``,
    ``neighbours`` candidates per step), ``lafa`` (``gradgraph.lafa``). The embeddings of the token
    ids are what moves (``hook_embed``); positional information stays the input's. ``baseline``:
    the ``pad`` token's embedding (the tokenizer's end-of-text token where it has no pad token),
    ``eos``, ``zeros``, a token id, or a ``[pos, d_model]`` tensor; BOS keeps its own embedding and gets 0 unless
    ``attribute_bos``; with ``positions`` (indices) only those move, the rest of the prompt (a
    few-shot prefix, say) keeps its tokens on every path. ``delta`` = Σ scores − (F(x) − F(x′)) for every method (complete ones: ≈ 0).
    ``values["hook_embed"]`` holds the per-element attributions ``[batch, pos, d_model]``."""
    opts = _options(method, options)
    token_ids, mask = to_tokens(model, tokens)
    if method == "lafa":  # the base method's attributions of the input and its neighbours, smoothed
        return lafa(model, token_ids, mask, metric, baseline=baseline, attribute_bos=attribute_bos,
                    positions=positions, batch_size=batch_size, attribute=attribute, **opts)
    ones = [_attribute_one(model, ids[: int(m.sum())], metric, method, opts, baseline, attribute_bos, batch_size,
                           positions) for ids, m in zip(token_ids, mask)]
    return _pack(method, token_ids, mask, ones, names.inputs(model)[0])


def _pack(method: str, token_ids: torch.Tensor, mask: torch.Tensor, ones: list[_One], embed: str) -> Attribution:
    B, P = token_ids.shape
    d = ones[0].elements.shape[-1]
    elements = torch.zeros(B, P, d, dtype=ones[0].elements.dtype)
    scores = torch.zeros(B, P, dtype=ones[0].elements.dtype)
    for b, one in enumerate(ones):
        n = len(one.elements)
        elements[b, :n] = one.elements
        scores[b, :n] = one.scores if one.scores is not None else one.elements.sum(-1)
    target = torch.tensor([one.target for one in ones], dtype=scores.dtype)
    path = None
    if all(one.path is not None for one in ones) and len({len(one.path) for one in ones}) == 1:
        path = torch.zeros(B, len(ones[0].path), P, d, dtype=elements.dtype)
        for b, one in enumerate(ones):
            path[b, :, : one.path.shape[1]] = one.path
    return Attribution(ones[0].kind or method, token_ids, scores, target, scores.sum(1) - target,
                       {embed: elements}, None, {}, path)


def integrated_flow(model, tokens, metric, *, path: str | torch.Tensor = "straight", semiring: Semiring = Real,
                    baseline="pad", attribute_bos: bool = False, steps: int = 32, strategy: str = "greedy",
                    factor: int = 0, batch_size: int = 8, progress: bool = True) -> Attribution:
    """The path-integrated attribution at every node of the gradient graph (conductance,
    Dhamdhere et al. 2019): ``Σ_k ∂F/∂h(x_k) ⊙ (h(x_{k+1}) − h(x_k))`` along the path from the baseline
    to the input, for one prompt. ``path``: ``"straight"`` (``steps`` equal steps), ``"dig"``,
    ``"udig"`` (``steps`` = m anchors) or a ``[N, pos, d_model]`` polyline of token embeddings,
    baseline first. At the input embeddings this is IG's left Riemann sum; at every residual cut the
    node values sum to F(x) − F(x′) up to ``cut_deltas`` (the path's discretisation error).
    ``by_component()`` says how much passes through each head, q/k/v pathway, MLP and position;
    ``values["blocks.L.hook_resid_pre->blocks.L.hook_resid_mid"]`` is what each layer's residual skip
    carries (beside its q/k/v inputs: Du et al.'s branches; ``->blocks.L.hook_resid_post`` where
    attention and MLP run in parallel). ``semiring=Abs`` gives the total
    absolute flow instead (an upper bound on |conductance|)."""
    token_ids, mask = to_tokens(model, tokens)
    if len(token_ids) != 1:
        raise GradGraphError(f"integrated_flow explains one prompt, got {len(token_ids)}; call it once per prompt")
    ids = token_ids[0]
    _check_length(model, ids)
    if isinstance(path, torch.Tensor):
        d = model.cfg.d_model
        if path.ndim != 3 or path.shape[1:] != (len(ids), d) or len(path) < 2:
            raise GradGraphError(f"a path is a [N ≥ 2, pos, d_model] = [N, {len(ids)}, {d}] tensor of token "
                                 f"embeddings, got {tuple(path.shape)}")
        polyline, kind = path.to(model.W_E.dtype), "given path"
    elif path in ("straight", "dig", "udig"):
        method = "ig" if path == "straight" else path
        opts = {**METHODS[method], "steps": steps, "strategy": strategy, "factor": factor, "rule": "riemann_left"}
        one = _path_of(model, ids, method, opts, baseline, kept_positions(model, ids, attribute_bos))
        polyline, kind = one.polyline, one.kind
    else:
        raise GradGraphError(f"path must be 'straight', 'dig', 'udig' or a [N, pos, d_model] tensor, got {path!r}")
    skips = tuple(map(Registry.of(model).skip_edge, range(model.cfg.n_layers)))
    totals, f = integrated.flow(model, ids, metric, polyline, semiring=semiring, batch_size=batch_size,
                                progress=progress, edges=skips)
    graph = build_graph(model, ids[None], metric)
    values = totals  # node -> [1, *shape]
    scores = values[names.inputs(model)[0]].sum(-1)  # [1, pos]
    target = (f[-1] - f[0]).reshape(1)
    cut_deltas = {} if semiring is not Real else {n: values[n].flatten(1).sum(1) - target for n in cuts(graph)}
    name = f"integrated flow ({kind})" if semiring is Real else f"integrated {semiring.name} flow ({kind})"
    return Attribution(name, ids[None], scores, target, scores.sum(1) - target, values, graph, cut_deltas,
                       polyline[None])


# --------------------------------------------------------------------------- attention maps


def _patterns(graph: GradGraph) -> list[str]:
    return [names.name("pattern", layer) for layer in range(graph.n_layers)]


def _map(method: str, graph: GradGraph, rows: torch.Tensor, drop_self: bool = False) -> Attribution:
    """An explanation map's row for each item's last real token (the position a next-token metric
    reads) as token scores; ``drop_self`` zeroes that token's own entry (Mask-LRP's code zeroes the
    explained token's self-entry). Maps do not claim completeness: ``delta`` is Σ scores − metric.
    ``rows`` ``[batch, pos, prefix + pos]``: after a cached prefix, the graph's own columns are scored."""
    last = graph.attention_mask.sum(1) - 1  # [batch]
    items = torch.arange(len(last))
    scores = rows[items, last, graph.prefix:] * graph.source_mask.to(rows.dtype)  # [batch, pos]
    if drop_self:
        scores = scores.clone()
        scores[items, last] = 0
    target = graph.metric_value
    return Attribution(method, graph.tokens, scores, target, scores.sum(1) - target, {}, graph)


def _rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """``Π_l normalise(I + A_l)`` from the first layer up (rows normalised), ``[batch, pos, pos]``.
    Maps ``[batch, pos, prefix + pos]`` after a cached prefix: the product keeps the graph's own
    columns, which is exact there (a chain to position j ≥ prefix passes positions ≥ j only), each
    row still normalised over all of its columns."""
    n = maps[0].shape[-2]
    eye = torch.eye(n, dtype=maps[0].dtype, device=maps[0].device)
    out = eye.expand(*maps[0].shape[:-1], n)
    for a in maps:
        step = eye + a[..., -n:]
        out = (step / (1 + a.sum(-1, keepdim=True))) @ out
    return torch.cat([torch.zeros_like(maps[0][..., :-n]), out], -1)


def raw_attention(graph: GradGraph) -> Attribution:
    """The last layer's attention from the last token, averaged over heads."""
    return _map("raw attention", graph, graph.activations[_patterns(graph)[-1]].mean(1))


def attention_rollout(graph: GradGraph) -> Attribution:
    """Attention rollout (Abnar & Zuidema 2020): per layer the head-averaged pattern with the
    residual as identity, ``(A + I) / 2``, multiplied from the first layer up."""
    return _map("attention rollout", graph, _rollout([graph.activations[p].mean(1) for p in _patterns(graph)]))


def chefer_rollout(gradient_graph: GradGraph, rule_graph: GradGraph, method: str | None = None, *,
                   gradients: dict[str, torch.Tensor] | None = None) -> Attribution:
    """Chefer et al.'s explanation map, as Mask-LRP's code computes it: per layer the gradient ⊙
    relevance of the attention pattern, clamped at 0 and averaged over heads, rolled out with the
    identity added and rows normalised, the explained token's own entry set to 0. The gradient comes
    from ``gradient_graph`` (``GRADIENT``),
    the relevance from ``rule_graph`` (``CHEFER2021``, with Mask-LRP's head mask where given);
    both from one recording. ``gradients`` may pass ``backprop(gradient_graph)`` values already
    computed (at least at the patterns). One graph may follow a cached prefix the other includes
    (``build.after_prefix``): the map is then the rows after the prefix, which is all the rollout
    needs for the tokens there."""
    patterns = _patterns(rule_graph)
    grads = gradients if gradients is not None else backprop(gradient_graph, keep=patterns)
    mods = backprop(rule_graph, keep=patterns)
    late = max(gradient_graph, rule_graph, key=lambda g: g.prefix)
    rows = lambda graph, value: value[:, :, late.prefix - graph.prefix:]  # noqa: E731  the later graph's queries
    maps = [(rows(gradient_graph, grads[p][0]) * rows(rule_graph, mods[p][0] * rule_graph.activations[p]))
            .clamp(min=0).mean(1) for p in patterns]
    return _map(method or f"rollout ({rule_graph.rules})", late, _rollout(maps), drop_self=True)


def partial_lrp(rule_graph: GradGraph) -> Attribution:
    """Partial LRP (Voita et al. 2019): the relevance of the last layer's attention pattern from the
    last token, averaged over heads."""
    last = _patterns(rule_graph)[-1]
    relevance = backprop(rule_graph, keep=[last])[last][0] * rule_graph.activations[last]
    return _map(f"partial LRP ({rule_graph.rules})", rule_graph, relevance.mean(1))


def mask_lrp(
    model,
    tokens,
    metric,
    *,
    head_mask: torch.Tensor | None = None,
    rules: RuleSet | str = CHEFER2021,
    attention_mask: torch.Tensor | None = None,
) -> Attribution:
    """Mask-LRP's token scores (Song et al. 2024): Chefer et al.'s rollout of gradient ⊙ relevance,
    with relevance flowing down only through the heads of ``head_mask`` (``gradgraph.heads.mask``;
    None: every head, which is Chefer et al.'s own map). One forward pass, two assemblies."""
    recording = record(model, tokens, metric, attention_mask=attention_mask)
    rule_graph = assemble(recording, rules, head_mask=head_mask)
    return chefer_rollout(assemble(recording, GRADIENT), rule_graph, f"Mask-LRP ({rule_graph.rules})")


__all__ = ["METHODS", "Attribution", "attention_rollout", "attribute", "cached_relevance", "integrated_flow",
           "chefer_rollout", "cuts", "lrp", "mask_lrp", "partial_lrp",
           "raw_attention", "relevance", "token_scores"]
