"""Ground truth by intervention: mean ablation and activation patching of heads and MLPs, patching
of the residual stream, attention and MLP outputs position by position, and the cheap first-order
estimates: attribution patching (gradient × activation difference) and relevance patching (the
same with RelP's modified gradient).

Every intervention reruns the model through ``inference.run``, the one forward with ``Edit``\ s at
named sites (from the weights where it covers the model, else TransformerLens' forward with hooks
that do not outlive the call), and changes nothing on the model. Effects are ``metric(intervened) − metric(clean)`` per prompt: a
negative effect means the component supports the metric. Components are the registry's
position-less heads (``L3H7``, at ``hook_z``) and MLPs (``MLP5``, at ``hook_mlp_out``).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from gradgraph.arch import hooks, inference, names
from gradgraph.arch.inference import Edit
from gradgraph.arch.lens import Model
from gradgraph.arch.spec import spec
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
def _cache(model: Model, tokens: torch.Tensor, *, kinds=INTERVENED) -> dict[str, torch.Tensor]:
    """Clean activations, recorded on TransformerLens' own forward (what the graph records): every
    head output (hook_z), attention and MLP output, the residual inputs, and the q/k/v inputs where
    ``kinds`` ask for them."""
    kinds = ("z", "mlp_out", "attn_out", "resid_pre") + tuple(f"{k}_input" for k in kinds if k in "qkv")
    wanted = {names.name(k, layer) for layer in range(model.cfg.n_layers) for k in kinds}
    with hooks.recording(model, names=wanted) as store:
        hooks.final_residual(model, tokens)
    return {name: tensors[0].clone() for name, tensors in store.items() if name in wanted}


def _by_hook(model: Model, trace: dict[str, list[torch.Tensor]], kinds=INTERVENED) -> dict[str, torch.Tensor]:
    """``inference.run``'s trace under the hook names of the sites interventions read."""
    cfg = model.cfg
    out = {}
    for layer in range(cfg.n_layers):
        for kind in ("z", "mlp_out", "attn_out", "resid_pre"):
            if kind in trace and len(trace[kind]) > layer:
                out[names.name(kind, layer)] = trace[kind][layer]
        resid = trace["resid_pre"][layer]  # [batch, pos, d]: every q/k/v input copies it
        for kind in (k for k in kinds if k in "qkv"):
            copies = cfg.n_heads if kind == "q" else cfg.n_key_value_heads or cfg.n_heads
            out[names.name(f"{kind}_input", layer)] = resid[:, :, None].expand(-1, -1, copies, -1)
    return out


def _reader(model: Model, final: torch.Tensor, metric, mask):
    """``read(resid_final) -> [batch]``: the metric of a final residual stream, computing only the
    logit columns the metric reads when that gives the same clean value (a logit difference reads
    two columns of a 49k vocabulary)."""
    with torch.enable_grad():
        full = inference.logits(model, final).detach().requires_grad_(True)
        value = metric(full, mask)
        (grad,) = torch.autograd.grad(value.sum(), full)
    ids = (grad != 0).flatten(0, -2).any(0).nonzero()[:, 0]
    if len(ids) > model.cfg.d_vocab // 4:
        ids = None
    logits = final.new_zeros((*final.shape[:-1], model.cfg.d_vocab))  # the metric reads only the ids columns

    def read(resid_final: torch.Tensor) -> torch.Tensor:
        if ids is None:
            return metric(inference.logits(model, resid_final), mask)
        logits[..., ids] = inference.logits(model, resid_final, ids)
        return metric(logits, mask)

    # the same numbers up to the order of a float sum, or every column
    if ids is not None and not torch.allclose(read(final), value.detach(), rtol=1e-4, atol=1e-5):
        ids = None
    return read


def _check(model, tokens, mask):
    if names.is_encoder(model.cfg):
        raise GradGraphError("interventions run a decoder from any layer (HookedTransformer); a HookedEncoder "
                             "cannot start at a layer: score its components by the graph methods")
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise GradGraphError(f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(tokens.shape)}")
    if mask.shape != tokens.shape:
        raise GradGraphError(f"attention_mask shape {tuple(mask.shape)} differs from tokens {tuple(tokens.shape)}")
    spec(model).check_device(tokens)


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
    clean, corrupt = {}, {}
    final, _ = inference.run(model, tokens, embed=embed, trace=clean)
    if counterfactual is not None:
        inference.run(model, counterfactual, trace=corrupt)
    read = _reader(model, final, metric, mask)
    base = read(final)
    results: dict[str, dict[str, torch.Tensor]] = {"clean": {"metric": base}}
    sources = ([("mean_ablation", means)] if means is not None else []) + \
              ([("patching", _by_hook(model, corrupt, kinds))] if counterfactual is not None else [])
    reg = Registry.of(model)
    batch = tokens.shape[0]
    todo = [(name, source, layer) for name, source in sources for layer in range(model.cfg.n_layers)]
    for name, source, layer in tqdm(todo, desc="interventions", disable=not progress, unit="layer"):
        # one run from this layer for all its components: copy i of the batch has component i replaced
        components = [c for c in intervened_components(model, kinds) if c.layer == layer]
        edits = [_edit(reg, c, source, slice(i * batch, (i + 1) * batch), per_position=name == "patching")
                 for i, c in enumerate(components)]
        resid = clean["resid_pre"][layer].repeat(len(components), 1, 1)
        out = inference.run(model, resid=resid, first_layer=layer, edits=edits)[0]
        for i, c in enumerate(components):
            results.setdefault(name, {})[reg.label(c)] = read(out[i * batch:(i + 1) * batch]) - base
    return results


# a component kind's site (``inference.SITES``; its hook point is ``names.name(site, layer)``)
_SITE = {"head": "z", "mlp": "mlp_out", "q": "q_input", "k": "k_input", "v": "v_input"}


def _edit(reg: Registry, c: Component, source: dict[str, torch.Tensor], rows: slice, per_position: bool) -> Edit:
    """The edit that sets component ``c`` to its value in ``source`` (a mean by hook name ``[heads,
    ...]`` or ``[d]``; or a run's activations by hook name ``[batch, pos, ...]``) in the batch rows ``rows``."""
    site = _SITE[c.kind]
    value = source[names.name(site, c.layer)]
    if c.head is not None:
        value = value[:, :, c.head] if per_position else value[c.head]
    return Edit(site, c.layer, value, rows=rows, head=c.head)


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
    One run from each layer and position, copy v of the batch patched at site v; a patch at
    position i leaves the earlier positions as they were, so the run starts from the clean run's
    keys and values before i (``inference.run(clean_before=)``)."""
    _check(model, tokens, mask)
    metric = prepare(metric, model)
    unknown = [s for s in sites if s not in SITES]
    if unknown or counterfactual.shape != tokens.shape:
        raise GradGraphError(f"patch_positions: sites from {SITES} and counterfactual tokens of the clean shape "
                             f"{tuple(tokens.shape)}; got {unknown or tuple(counterfactual.shape)}")
    trace_clean, trace_corrupt = {}, {}
    final, kv = inference.run(model, tokens, keep=True, trace=trace_clean)
    inference.run(model, counterfactual, trace=trace_corrupt)
    read = _reader(model, final, metric, mask)
    base = read(final)
    batch, P = tokens.shape
    L = model.cfg.n_layers
    rows = torch.arange(batch, device=tokens.device).repeat(len(sites))  # [sites × batch]: one variant per site
    kv_rows = None if kv is None else kv.rows(rows)
    out = {site: torch.zeros(batch, L, P, dtype=torch.float64) for site in sites}
    for i in tqdm(range(P), desc="position patching", disable=not progress, unit="position"):
        for layer in range(L):
            edits = [Edit(site, layer, trace_corrupt[site][layer][:, i], rows=slice(v * batch, (v + 1) * batch),
                          position=i) for v, site in enumerate(sites)]
            later, _ = inference.run(model, resid=trace_clean["resid_pre"][layer][rows], first_layer=layer,
                                     edits=edits, clean_before=(kv_rows, i))
            whole = final[rows].clone()
            whole[:, i:] = later
            for site, variant in zip(sites, whole.split(batch)):
                out[site][:, layer, i] = (read(variant) - base).double().cpu()
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
