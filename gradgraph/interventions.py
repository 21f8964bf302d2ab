"""Ground truth by intervention: mean ablation and activation patching of heads and MLPs, and
attribution patching (gradient × activation difference) as the cheap baseline.

Every intervention runs inside a scoped hook context (no hook outlives a call) and changes
nothing else on the model. Effects are ``metric(intervened) − metric(clean)`` per prompt: a
negative effect means the component supports the metric.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from gradgraph import hooks
from gradgraph.errors import GradGraphError


def components(model: HookedTransformer) -> list[tuple[str, int, int | None]]:
    """``(kind, layer, head)`` for every head (``"head"``) and MLP (``"mlp"``) of the model."""
    out: list[tuple[str, int, int | None]] = []
    for layer in range(model.cfg.n_layers):
        out += [("head", layer, h) for h in range(model.cfg.n_heads)]
        out.append(("mlp", layer, None))
    return out


def component_label(kind: str, layer: int, head: int | None) -> str:
    return f"L{layer}H{head}" if kind == "head" else f"MLP{layer}"


def _hook_of(kind: str, layer: int) -> str:
    return hooks.name("z" if kind == "head" else "mlp_out", layer)


@torch.no_grad()
def _cache(model: HookedTransformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clean activations at every head output (hook_z) and MLP output, and the residual inputs."""
    wanted = {hooks.name(k, layer) for layer in range(model.cfg.n_layers) for k in ("z", "mlp_out", "resid_pre")}
    store: dict[str, torch.Tensor] = {}

    def keep(tensor, hook):
        store[hook.name] = tensor.detach().clone()

    with model.hooks(fwd_hooks=[(lambda name: name in wanted, keep)]):
        model(tokens, stop_at_layer=model.cfg.n_layers)
    return store


def _run_from(model, layer: int, resid: torch.Tensor, hook: str, replace) -> torch.Tensor:
    """Final residual stream after running layers ``layer..`` from ``resid`` with ``hook`` replaced."""
    with model.hooks(fwd_hooks=[(hook, replace)]):
        return model(resid, start_at_layer=layer, stop_at_layer=model.cfg.n_layers)


def _metric_from_resid(model, resid_final: torch.Tensor, metric, mask, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The metric of the final residual stream; with ``ids``, only those logit columns are computed
    (the rest are zero): a logit difference reads two columns of a 49k vocabulary."""
    normalized = model.ln_final(resid_final)
    if ids is None:
        return metric(model.unembed(normalized), mask)
    logits = normalized.new_zeros((*normalized.shape[:-1], model.cfg.d_vocab))
    logits[..., ids] = normalized @ model.W_U[:, ids] + model.b_U[ids]
    return metric(logits, mask)


def _read_columns(model, resid_final: torch.Tensor, metric, mask) -> torch.Tensor | None:
    """The logit columns the metric reads, if computing only them gives the same clean value."""
    with torch.enable_grad():
        logits = model.unembed(model.ln_final(resid_final)).detach().requires_grad_(True)
        value = metric(logits, mask)
        (grad,) = torch.autograd.grad(value.sum(), logits)
    ids = (grad != 0).flatten(0, -2).any(0).nonzero()[:, 0]
    if len(ids) > model.cfg.d_vocab // 4:
        return None
    same = torch.allclose(_metric_from_resid(model, resid_final, metric, mask, ids), value.detach(), rtol=1e-6, atol=1e-6)
    return ids if same else None


def _check(model, tokens, mask):
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise GradGraphError(f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(tokens.shape)}")
    if mask.shape != tokens.shape:
        raise GradGraphError(f"attention_mask shape {tuple(mask.shape)} differs from tokens {tuple(tokens.shape)}")


@torch.no_grad()
def intervene(
    model: HookedTransformer,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    metric,
    *,
    counterfactual: torch.Tensor | None = None,
    means: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Effects of mean-ablating (``means`` given) and of patching from ``counterfactual`` each component.

    ``means[hook] `` is the dataset mean of that hook's activation over real positions
    (``[n_heads, d_head]`` for hook_z, ``[d_model]`` for hook_mlp_out). Returns
    ``{"clean": {"metric": [batch]}, "mean_ablation": {label: [batch]}, "patching": {label: [batch]}}``.
    """
    _check(model, tokens, mask)
    if counterfactual is not None and counterfactual.shape != tokens.shape:
        raise GradGraphError(
            f"the counterfactual tokens {tuple(counterfactual.shape)} must align with the clean ones "
            f"{tuple(tokens.shape)}: same length, position by position"
        )
    clean = _cache(model, tokens)
    corrupt = _cache(model, counterfactual) if counterfactual is not None else None
    last = model(tokens, stop_at_layer=model.cfg.n_layers)
    ids = _read_columns(model, last, metric, mask)
    base = _metric_from_resid(model, last, metric, mask, ids)
    results: dict[str, dict[str, torch.Tensor]] = {"clean": {"metric": base}}
    jobs = []
    if means is not None:
        jobs.append(("mean_ablation", None))
    if corrupt is not None:
        jobs.append(("patching", corrupt))
    todo = [(job, c) for job in jobs for c in components(model)]
    for (name, source), (kind, layer, head) in tqdm(todo, desc="interventions", disable=not progress, unit="run"):
        hook = _hook_of(kind, layer)
        if name == "mean_ablation":
            value = means[hook][head] if kind == "head" else means[hook]
        else:
            value = source[hook][:, :, head] if kind == "head" else source[hook]

        def replace(activation, hook=None, value=value, head=head):
            activation = activation.clone()
            if head is None:
                activation[...] = value
            else:
                activation[:, :, head] = value
            return activation

        final = _run_from(model, layer, clean[hooks.name("resid_pre", layer)], hook, replace)
        effect = _metric_from_resid(model, final, metric, mask, ids) - base
        results.setdefault(name, {})[component_label(kind, layer, head)] = effect
    return results


@torch.no_grad()
def activation_means(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean of every head output and MLP output over the real positions of a dataset batch."""
    _check(model, tokens, mask)
    cache = _cache(model, tokens)
    real = mask.bool()
    return {name: value[real].mean(0) for name, value in cache.items() if "resid" not in name}


def attribution_patching(
    model: HookedTransformer,
    tokens: torch.Tensor,
    counterfactual: torch.Tensor,
    gradients: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """First-order estimate of patching: ``Σ (act_cf − act_clean) · ∂metric/∂act`` per component.

    ``gradients[hook]`` are the metric's gradients at hook_z / hook_mlp_out on the clean run (e.g.
    ``backprop(graph, Real)`` values). One backward pass for every component at once.
    """
    clean, corrupt = _cache(model, tokens), _cache(model, counterfactual)
    out = {}
    for kind, layer, head in components(model):
        hook = _hook_of(kind, layer)
        delta = (corrupt[hook] - clean[hook]) * gradients[hook].to(clean[hook].dtype)
        value = delta[:, :, head].flatten(1).sum(1) if kind == "head" else delta.flatten(1).sum(1)
        out[component_label(kind, layer, head)] = value
    return out
