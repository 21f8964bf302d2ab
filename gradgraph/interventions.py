"""Ground truth by intervention: mean ablation and activation patching of heads and MLPs, patching
of the residual stream, attention and MLP outputs position by position, and the cheap first-order
estimates: attribution patching (gradient × activation difference) and relevance patching (the
same with RelP's modified gradient).

Every intervention replaces activations through ``hooks.replacing`` (no hook outlives a call) and
changes nothing else on the model. Effects are ``metric(intervened) − metric(clean)`` per prompt: a
negative effect means the component supports the metric. Components are the registry's
position-less heads (``L3H7``, at ``hook_z``) and MLPs (``MLP5``, at ``hook_mlp_out``).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from gradgraph.arch import hooks, inference, lens, names
from gradgraph.arch.features import soft_cap
from gradgraph.arch.inference import KeysValues
from gradgraph.arch.lens import Model
from gradgraph.backprop import backprop
from gradgraph.build import assemble, record
from gradgraph.errors import GradGraphError
from gradgraph.labels import Component, Registry
from gradgraph.metrics import prepare
from gradgraph.rules import GRADIENT

INTERVENED = ("head", "mlp")
PATHWAYS = ("q", "k", "v", "head", "mlp")  # and each head's query, key and value input


def intervened_components(model: Model, kinds=INTERVENED) -> list[Component]:
    """Every component of ``kinds`` (heads and MLPs by default), at every position."""
    return Registry.of(model).components(kinds=kinds)


SITES = ("resid_pre", "attn_out", "mlp_out")


def _intervened_hooks(model: Model, kinds=INTERVENED) -> list[str]:
    """The hook points holding the intervened components (hook_z, hook_mlp_out, the q/k/v inputs)."""
    reg = Registry.of(model)
    return list(dict.fromkeys(reg.nodes(c)[0] for c in intervened_components(model, kinds)))


@torch.no_grad()
def _cache(model: Model, tokens: torch.Tensor, *, embed: torch.Tensor | None = None,
           kinds=INTERVENED) -> dict[str, torch.Tensor]:
    """Clean activations at every head output (hook_z), attention and MLP output, the residual
    inputs, and the q/k/v inputs where ``kinds`` ask for them."""
    kinds = ("z", "mlp_out", "attn_out", "resid_pre") + tuple(f"{k}_input" for k in kinds if k in "qkv")
    wanted = {names.name(k, layer) for layer in range(model.cfg.n_layers) for k in kinds}
    replacements = {} if embed is None else {names.inputs(model)[0]: embed}
    with hooks.replacing(model, replacements), hooks.recording(model, names=wanted) as store:
        hooks.final_residual(model, tokens)
    return {name: tensors[0].clone() for name, tensors in store.items() if name in wanted}


def _run_from(model, layer: int, resid: torch.Tensor, replacements: dict) -> torch.Tensor:
    """Final residual stream after running layers ``layer..`` from ``resid`` with ``replacements``."""
    with hooks.replacing(model, replacements):
        return hooks.final_residual(model, resid, start_at_layer=layer)


def _metric_from_resid(model, resid_final: torch.Tensor, metric, mask, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The metric of the final residual stream; with ``ids``, only those logit columns are computed
    (the rest are zero): a logit difference reads two columns of a 49k vocabulary."""
    normalized = _final_norm(model, resid_final)
    if ids is None:
        return metric(_capped(model, model.unembed(normalized)), mask)
    logits = normalized.new_zeros((*normalized.shape[:-1], model.cfg.d_vocab))
    logits[..., ids] = _capped(model, normalized @ model.W_U[:, ids] + model.b_U[ids])
    return metric(logits, mask)


def _final_norm(model, resid_final: torch.Tensor) -> torch.Tensor:
    return resid_final if model.cfg.normalization_type is None else lens.final_norm(model)(resid_final)


def _capped(model, logits: torch.Tensor) -> torch.Tensor:
    """The logits as the model returns them: soft-capped where it caps them (Gemma 2)."""
    cap = soft_cap(model.cfg.output_logits_soft_cap)
    return logits if cap is None else cap * torch.tanh(logits / cap)


def _read_columns(model, resid_final: torch.Tensor, metric, mask) -> torch.Tensor | None:
    """The logit columns the metric reads, if computing only them gives the same clean value."""
    with torch.enable_grad():
        logits = _capped(model, model.unembed(_final_norm(model, resid_final))).detach().requires_grad_(True)
        value = metric(logits, mask)
        (grad,) = torch.autograd.grad(value.sum(), logits)
    ids = (grad != 0).flatten(0, -2).any(0).nonzero()[:, 0]
    if len(ids) > model.cfg.d_vocab // 4:
        return None
    # the same numbers up to the order of a float sum
    same = torch.allclose(_metric_from_resid(model, resid_final, metric, mask, ids), value.detach(), rtol=1e-4, atol=1e-5)
    return ids if same else None


def _check(model, tokens, mask):
    if names.is_encoder(model.cfg):
        raise GradGraphError("interventions run a decoder from any layer (HookedTransformer); a HookedEncoder "
                             "cannot start at a layer: score its components by the graph methods")
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise GradGraphError(f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(tokens.shape)}")
    if mask.shape != tokens.shape:
        raise GradGraphError(f"attention_mask shape {tuple(mask.shape)} differs from tokens {tuple(tokens.shape)}")


@torch.no_grad()
def intervene(
    model: Model,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    metric,
    *,
    counterfactual: torch.Tensor | None = None,
    means: dict[str, torch.Tensor] | None = None,
    embed: torch.Tensor | None = None,
    progress: bool = True,
    kinds=INTERVENED,
) -> dict[str, dict[str, torch.Tensor]]:
    """Effects of mean-ablating (``means`` given) and of patching from ``counterfactual`` each component.

    ``kinds``: heads and MLPs by default; ``PATHWAYS`` adds each head's query, key and value input
    (``L3H7.q``; grouped key/value heads ``L3H6-8.k``): the input copy of the residual stream that
    only that pathway reads. ``means[hook]`` is the dataset mean of that hook's activation over real
    positions (``[n_heads, d_head]`` for hook_z, ``[d_model]`` for hook_mlp_out, ``[copies,
    d_model]`` for the q/k/v inputs); ``embed`` replaces the clean run's token embeddings. Returns
    ``{"clean": {"metric": [batch]}, "mean_ablation": {label: [batch]}, "patching": {label: [batch]}}``.
    Models that ``gradgraph.arch.inference`` covers run there (no hooks, all of a layer's components in one
    run from it); others through TransformerLens' hooks, with the same results.
    """
    _check(model, tokens, mask)
    metric = prepare(metric, model)
    unknown = [k for k in kinds if k not in PATHWAYS]
    if unknown:
        raise GradGraphError(f"intervene takes kinds from {PATHWAYS}, got {unknown}")
    if counterfactual is not None and counterfactual.shape != tokens.shape:
        raise GradGraphError(
            f"the counterfactual tokens {tuple(counterfactual.shape)} must align with the clean ones "
            f"{tuple(tokens.shape)}: same length, position by position"
        )
    if means is not None:
        shapes = _component_shapes(model)
        wrong = [h for h in _intervened_hooks(model, kinds) if h not in means or tuple(means[h].shape) != shapes[h]]
        if wrong:
            raise GradGraphError(f"means lacks {wrong[0]} (or has the wrong shape); compute them with "
                                 f"gradgraph.interventions.activation_means")
    if embed is None and inference.supported(model):
        return _intervene_from_weights(model, tokens, mask, metric, counterfactual, means, kinds, progress)
    clean = _cache(model, tokens, embed=embed, kinds=kinds)
    corrupt = _cache(model, counterfactual, kinds=kinds) if counterfactual is not None else None
    with hooks.replacing(model, {} if embed is None else {names.inputs(model)[0]: embed}):
        last = hooks.final_residual(model, tokens)
    ids = _read_columns(model, last, metric, mask)
    base = _metric_from_resid(model, last, metric, mask, ids)
    results: dict[str, dict[str, torch.Tensor]] = {"clean": {"metric": base}}
    jobs = []
    if means is not None:
        jobs.append(("mean_ablation", None))
    if corrupt is not None:
        jobs.append(("patching", corrupt))
    reg = Registry.of(model)
    batch = tokens.shape[0]
    layers = range(model.cfg.n_layers)
    todo = [(name, source, layer) for name, source in jobs for layer in layers]
    for name, source, layer in tqdm(todo, desc="interventions", disable=not progress, unit="layer"):
        # one run from this layer for all its components: copy i of the batch has component i replaced
        components = [c for c in intervened_components(model, kinds) if c.layer == layer]
        replacements = {}
        for hook in dict.fromkeys(reg.nodes(c)[0] for c in components):
            chosen = [(i, reg.index(c)[1:]) for i, c in enumerate(components) if reg.nodes(c)[0] == hook]

            def replace(activation, hook=hook, chosen=chosen):
                activation = activation.clone()
                copies = activation.view(len(components), batch, *activation.shape[1:])
                for i, index in chosen:  # index: (positions, head) or (positions,)
                    value = means[hook][index[1:]] if source is None else source[hook][(slice(None),) + index]
                    copies[i][(slice(None),) + index] = value
                return activation

            replacements[hook] = replace
        resid = clean[names.name("resid_pre", layer)].repeat(len(components), 1, 1)
        final = _run_from(model, layer, resid, replacements).view(len(components), batch, *resid.shape[1:])
        for i, c in enumerate(components):
            effect = _metric_from_resid(model, final[i], metric, mask, ids) - base
            results.setdefault(name, {})[reg.label(c)] = effect
    return results


def _component_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """The per-position shape of each intervened hook's activation (what a mean has)."""
    cfg = model.cfg
    G = cfg.n_key_value_heads or cfg.n_heads
    out = {}
    for layer in range(cfg.n_layers):
        out[names.name("z", layer)] = (cfg.n_heads, cfg.d_head)
        out[names.name("mlp_out", layer)] = (cfg.d_model,)
        for kind, copies in (("q", cfg.n_heads), ("k", G), ("v", G)):
            out[names.name(f"{kind}_input", layer)] = (copies, cfg.d_model)
    return out


@torch.no_grad()
def activation_means(model: Model, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean of every head output, MLP output and q/k/v input (per head: the residual stream's mean)
    over the real positions of a dataset batch."""
    _check(model, tokens, mask)
    cache = _cache(model, tokens)
    real = mask.bool()
    means = {name: cache[name][real].mean(0) for name in _intervened_hooks(model)}
    shapes = _component_shapes(model)
    for layer in range(model.cfg.n_layers):
        resid = cache[names.name("resid_pre", layer)][real].mean(0)  # every q/k/v input copies it
        for kind in "qkv":
            name = names.name(f"{kind}_input", layer)
            means[name] = resid.expand(shapes[name]).clone()
    return means


def _intervene_from_weights(model, tokens, mask, metric, counterfactual, means, kinds, progress) -> dict:
    """``intervene`` with ``gradgraph.arch.inference``: each layer's components in one run from its
    residual input, copy i of the batch with component i's q, k, v (before rotary), z or MLP output
    replaced: a q/k/v input by the counterfactual's (or the mean input's) projection, which is what
    replacing that head's input copy computes."""
    trace, corrupt = {}, {}
    final, _ = inference.run(model, tokens, trace=trace)
    if counterfactual is not None:
        inference.run(model, counterfactual, trace=corrupt)
    ids = _read_columns(model, final, metric, mask)
    ids = torch.arange(model.cfg.d_vocab, device=tokens.device) if ids is None else ids
    logits = final.new_zeros((*final.shape[:-1], model.cfg.d_vocab))  # the metric reads only the ids columns

    def value(resid_final: torch.Tensor) -> torch.Tensor:
        logits[..., ids] = inference.final_logits(model, resid_final, ids)
        return metric(logits, mask)

    base = value(final)
    results: dict[str, dict[str, torch.Tensor]] = {"clean": {"metric": base}}
    sources = ([("mean_ablation", _mean_sources(model, means))] if means is not None else []) + \
              ([("patching", corrupt)] if counterfactual is not None else [])
    reg = Registry.of(model)
    batch = tokens.shape[0]
    site_of = {"q": "q", "k": "k", "v": "v", "head": "z", "mlp": "mlp_out"}
    todo = [(name, source, layer) for name, source in sources for layer in range(model.cfg.n_layers)]
    for name, source, layer in tqdm(todo, desc="interventions", disable=not progress, unit="layer"):
        components = [c for c in intervened_components(model, kinds) if c.layer == layer]

        def edits(index: int, site: str, value: torch.Tensor, layer=layer, components=components, source=source):
            if index != layer:
                return value
            chosen = [(i, c) for i, c in enumerate(components) if site_of[c.kind] == site]
            if not chosen:
                return value
            value = value.clone()
            for i, c in chosen:
                rows = slice(i * batch, (i + 1) * batch)
                replacement = source[site][layer]  # [batch, pos, heads, e] or [batch, pos, d] (or per position)
                if c.head is None:
                    value[rows] = replacement
                else:
                    value[rows, :, c.head] = replacement[..., c.head, :]
            return value

        resid = trace["resid_pre"][layer].repeat(len(components), 1, 1)
        out = inference.run(model, resid=resid, first_layer=layer, edits=edits)[0]
        for i, c in enumerate(components):
            results.setdefault(name, {})[reg.label(c)] = value(out[i * batch:(i + 1) * batch]) - base
    return results


def _mean_sources(model, means: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """The replacements mean ablation makes, in ``inference.run``'s trace layout: per layer q, k, v
    projected from each head's mean input (``[heads, e]``), z's mean ``[H, e]``, the MLP output's ``[d]``."""
    out = {site: [] for site in ("q", "k", "v", "z", "mlp_out")}
    for layer in range(model.cfg.n_layers):
        projected = {}
        for kind in "qkv":
            mean_input = means.get(names.name(f"{kind}_input", layer))
            projected[kind] = None if mean_input is None else inference.project(model, layer, kind, mean_input)
        for kind in "qkv":
            out[kind].append(projected[kind])
        out["z"].append(means.get(names.name("z", layer)))
        out["mlp_out"].append(means.get(names.name("mlp_out", layer)))
    return out


def attribution_patching(
    model: Model,
    tokens: torch.Tensor,
    counterfactual: torch.Tensor,
    gradients: dict[str, torch.Tensor],
    *,
    clean: dict[str, torch.Tensor] | None = None,
    corrupt: dict[str, torch.Tensor] | None = None,
    kinds=INTERVENED,
) -> dict[str, torch.Tensor]:
    """First-order estimate of patching: ``Σ (act_cf − act_clean) · ∂metric/∂act`` per component.

    ``gradients[hook]`` are the metric's gradients at hook_z / hook_mlp_out (and the q/k/v inputs
    for ``kinds=PATHWAYS``) on the clean run (e.g. ``backprop(graph, Real)`` values). ``clean``
    may pass the clean run's activations (e.g. ``graph.activations``) so that only the
    counterfactual runs, ``corrupt`` the counterfactual's. One backward pass for every component at once.
    """
    clean = _cache(model, tokens, kinds=kinds) if clean is None else clean
    corrupt = _cache(model, counterfactual, kinds=kinds) if corrupt is None else corrupt
    reg = Registry.of(model)
    out = {}
    for c in intervened_components(model, kinds):
        (hook,) = reg.nodes(c)
        delta = (corrupt[hook] - clean[hook]) * gradients[hook].to(corrupt[hook].dtype)
        out[reg.label(c)] = delta[reg.index(c)].flatten(1).sum(1)
    return out


@torch.no_grad()
def patch_positions(
    model: Model,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    counterfactual: torch.Tensor,
    metric,
    *,
    sites: tuple[str, ...] = SITES,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Activation patching of one site at one position: ``{site: [batch, n_layers, pos]}``, the
    effect ``metric(patched) − metric(clean)`` of setting ``hook_resid_pre`` / ``hook_attn_out`` /
    ``hook_mlp_out`` of that layer at that position to its value on ``counterfactual``.
    One run from each layer per site, with copy i of the batch patched at position i."""
    _check(model, tokens, mask)
    metric = prepare(metric, model)
    unknown = [s for s in sites if s not in SITES]
    if unknown or counterfactual.shape != tokens.shape:
        raise GradGraphError(f"patch_positions: sites from {SITES} and counterfactual tokens of the clean shape "
                             f"{tuple(tokens.shape)}; got {unknown or tuple(counterfactual.shape)}")
    if inference.supported(model):
        return _patch_positions_from_weights(model, tokens, mask, counterfactual, metric, sites, progress)
    with hooks.plain_forward(model):  # these sites need no split q/k/v copies
        return _patch_positions(model, tokens, mask, counterfactual, metric, sites, progress)


def _patch_positions_from_weights(model, tokens, mask, counterfactual, metric, sites, progress) -> dict[str, torch.Tensor]:
    """``patch_positions`` with ``gradgraph.arch.inference``: a patch at position i leaves the earlier
    positions as they were, so each run covers positions i.. only, from the clean run's keys and
    values before i; a patched attention or MLP output at layer L changes position i alone until
    layer L + 1, so those runs start there. Patches at every site that start at one layer run together."""
    trace_clean, trace_corrupt = {}, {}
    final, kv = inference.run(model, tokens, keep=True, trace=trace_clean)
    inference.run(model, counterfactual, trace=trace_corrupt)
    ids = _read_columns(model, final, metric, mask)
    ids = torch.arange(model.cfg.d_vocab, device=tokens.device) if ids is None else ids

    logits = final.new_zeros((*final.shape[:-1], model.cfg.d_vocab))  # the metric reads only the ids columns

    def value(resid_final: torch.Tensor) -> torch.Tensor:  # [batch, pos, d] -> [batch]
        logits[..., ids] = inference.final_logits(model, resid_final, ids)
        return metric(logits, mask)

    items = torch.arange(tokens.shape[0], device=tokens.device)
    base = value(final)
    batch, P = tokens.shape
    L = model.cfg.n_layers
    out = {site: torch.zeros(batch, L, P, dtype=torch.float64) for site in sites}
    for i in tqdm(range(P), desc="position patching", disable=not progress, unit="position"):
        for start in range(L + 1):  # the layer each patch's run starts at
            starts = []  # (site, layer, resid at position i entering `start`)
            if "resid_pre" in sites and start < L:
                starts.append(("resid_pre", start, trace_corrupt["resid_pre"][start][:, i]))
            if start > 0:
                layer, mid = start - 1, trace_clean["resid_mid"][start - 1][:, i]
                if "attn_out" in sites:
                    patched = mid + trace_corrupt["attn_out"][layer][:, i] - trace_clean["attn_out"][layer][:, i]
                    starts.append(("attn_out", layer, patched + inference.mlp_of(model, layer, patched)))
                if "mlp_out" in sites:
                    starts.append(("mlp_out", layer, mid + trace_corrupt["mlp_out"][layer][:, i]))
            if not starts:
                continue
            rows = items.repeat(len(starts))  # [variants × batch]: each variant is the whole batch
            entering = final if start == L else trace_clean["resid_pre"][start]
            resid = entering[rows, i:].clone()
            resid[:, 0] = torch.cat([patched_i for _, _, patched_i in starts])
            if start < L:
                past = KeysValues([k[:, rows, :i] for k in kv.keys], [v[:, rows, :i] for v in kv.values])
                resid, _ = inference.run(model, resid=resid, first_layer=start, past=past)
            whole = final[rows].clone()
            whole[:, i:] = resid
            for (site, layer, _), variant in zip(starts, whole.split(batch)):
                out[site][:, layer, i] = (value(variant) - base).double().cpu()
    return out


def _patch_positions(model, tokens, mask, counterfactual, metric, sites, progress) -> dict[str, torch.Tensor]:
    clean, corrupt = _cache(model, tokens), _cache(model, counterfactual)
    last = hooks.final_residual(model, tokens)
    ids = _read_columns(model, last, metric, mask)
    base = _metric_from_resid(model, last, metric, mask, ids)
    batch, P = tokens.shape
    eye = torch.eye(P, dtype=torch.bool, device=tokens.device)[:, None, :, None]  # [copy, 1, pos, 1]
    out = {site: torch.zeros(batch, model.cfg.n_layers, P, dtype=torch.float64) for site in sites}
    todo = [(site, layer) for site in sites for layer in range(model.cfg.n_layers)]
    for site, layer in tqdm(todo, desc="position patching", disable=not progress, unit="layer"):
        hook = names.name(site, layer)

        def patched(activation, hook=hook):  # [P * batch, pos, d]: copy i patched at position i
            copies = activation.view(P, batch, *activation.shape[1:])
            return torch.where(eye, corrupt[hook][None], copies).view_as(activation)

        resid = clean[names.name("resid_pre", layer)].repeat(P, 1, 1)
        if site == "resid_pre":
            resid, replacements = patched(resid), {}
        else:
            replacements = {hook: patched}
        final = _run_from(model, layer, resid, replacements).view(P, batch, P, -1)
        for i in range(P):
            out[site][:, layer, i] = (_metric_from_resid(model, final[i], metric, mask, ids) - base).double().cpu()
    return out


def position_attribution(
    clean: dict[str, torch.Tensor],
    corrupt: dict[str, torch.Tensor],
    gradients: dict[str, torch.Tensor],
    n_layers: int,
    sites: tuple[str, ...] = SITES,
) -> dict[str, torch.Tensor]:
    """First-order estimate of ``patch_positions``: ``{site: [batch, n_layers, pos]}`` of
    ``Σ_d (act_cf − act) · g`` with ``g`` the gradient (attribution patching) or a rule set's
    modified gradient (RelP) at each site."""
    out = {}
    for site in sites:
        per_layer = []
        for layer in range(n_layers):
            hook = names.name(site, layer)
            per_layer.append(((corrupt[hook] - clean[hook]) * gradients[hook].to(clean[hook].dtype)).sum(-1))
        out[site] = torch.stack(per_layer, 1).double().cpu()
    return out


def relevance_patching(
    model: Model,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    counterfactual: torch.Tensor,
    metric,
    *,
    rules="relp",
    kinds=INTERVENED,
) -> dict[str, dict[str, torch.Tensor]]:
    """Relevance patching (Rezaei Jafari et al. 2025) beside attribution patching: the first-order
    estimate ``(act_cf − act) · g`` with ``g`` the modified gradient of ``rules`` (RelP's rules by
    default) and with the plain gradient, per head and MLP (``kinds=PATHWAYS``: and q/k/v input;
    ``{label: [batch]}``) and per site and position (``{site: [batch, n_layers, pos]}``). Returns
    ``{"relp": {...}, "attribution": {...}}``."""
    recording = record(model, tokens, metric, attention_mask=mask)
    corrupt = _cache(model, counterfactual, kinds=kinds)
    wanted = _intervened_hooks(model, kinds) + [names.name(site, layer) for layer in range(model.cfg.n_layers)
                                               for site in SITES]
    out = {}
    for name, rule_set in (("relp", rules), ("attribution", GRADIENT)):
        graph = assemble(recording, rule_set)
        grads = {n: v[0] for n, v in backprop(graph, keep=wanted).items()}
        per_component = attribution_patching(model, tokens, counterfactual, grads, clean=graph.activations,
                                              corrupt=corrupt, kinds=kinds)
        per_position = position_attribution(graph.activations, corrupt, grads, model.cfg.n_layers)
        out[name] = {**per_component, **per_position}
    return out
