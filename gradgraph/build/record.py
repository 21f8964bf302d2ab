"""Recording: one forward pass with every hook point recorded, the metric and its gradient at the
logits (``record``), optionally after a cached prefix (``after_prefix``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from gradgraph.arch import hooks, lens, memory, names, recorded
from gradgraph.arch.features import soft_cap
from gradgraph.arch.lens import Model
from gradgraph.arch.spec import ModelSpec, check_supported, spec
from gradgraph.errors import GradGraphError
from gradgraph.metrics import AtPosition, prepare
from gradgraph.prompts import to_tokens


@dataclass(frozen=True, eq=False)
class Recording:
    """One forward pass: every firing of every hook point, the metric and its gradient at the logits.

    ``activations`` are keyed by node name; the logits keep only ``logit_ids``, the vocabulary
    columns the metric reads, and so does ``grad_logits`` ``[batch, pos, len(logit_ids)]``.
    A recording can be assembled under several rule sets (``assemble``); it keeps the blocks of
    ops no head mask changes (norms, softmaxes, linear maps), so that assembling it again under
    another head mask recomputes none of them (α1β0's denominators, say). With a ``prefix``, the
    activations cover the positions after it, and each layer's cached keys and values are recorded
    as ``cached_k`` / ``cached_v`` (before rotary, as TransformerLens caches them)."""

    model: Model
    tokens: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    activations: Mapping[str, torch.Tensor]
    metric_value: torch.Tensor  # [batch]
    grad_logits: torch.Tensor  # [batch, pos, n kept]
    logit_ids: torch.Tensor  # [n kept]
    derived: dict = field(default_factory=dict, repr=False)  # blocks a rule set made of a norm, softmax or linear op
    prefix: torch.Tensor | None = None  # [p] token ids of a cached prefix every row follows


def _right_padded(mask: torch.Tensor) -> bool:
    # every row is 1...10...0
    return bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(mask[:, 0].all())


def tokens_and_mask(model, tokens, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    token_ids, mask = to_tokens(model, tokens)
    if attention_mask is None:
        return token_ids, mask
    if not isinstance(tokens, torch.Tensor):
        raise GradGraphError("attention_mask goes with a [batch, pos] tensor of tokens; strings are padded for you")
    mask = attention_mask.to(token_ids.device).long()
    if mask.shape != token_ids.shape:
        raise GradGraphError(f"attention_mask has shape {tuple(mask.shape)}, tokens {tuple(token_ids.shape)}")
    if not _right_padded(mask):
        raise GradGraphError(
            "attention_mask must be right padding (each row 1...1 0...0, first token real); "
            "gradgraph.prompts.to_tokens right-pads"
        )
    return token_ids, mask


def check_embed(model, embed: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    shape = (*token_ids.shape, model.cfg.d_model)
    if not isinstance(embed, torch.Tensor) or tuple(embed.shape) != shape:
        got = tuple(embed.shape) if isinstance(embed, torch.Tensor) else type(embed).__name__
        raise GradGraphError(f"embed must be a [batch, pos, d_model] = {list(shape)} tensor of input embeddings, got {got}")
    if not torch.isfinite(embed).all():
        raise GradGraphError("embed holds NaN or inf values")
    return embed.detach().to(spec(model).dtype)


def check_metric_value(value, batch: int) -> torch.Tensor:
    """``value`` if it is one number per prompt ``[batch]``, else a ``GradGraphError`` saying so."""
    if not isinstance(value, torch.Tensor) or value.shape != (batch,):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise GradGraphError(f"metric must return one value per prompt, shape [{batch}]; got {shape}")
    return value


def _deduplicated(acts: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Per-head copies of the residual stream and of ``ln1`` repeat one vector along the head axis:
    keep one and an expanded view, so that they cost no memory. The q/k/v inputs are copies of
    ``hook_resid_pre`` by TransformerLens' construction; ``ln1`` of identical copies is compared
    (first, middle and last head) and kept whole if it differs."""
    for layer in range(n_layers):
        resid = acts.get(names.name("resid_pre", layer))
        for firing in names.SPLIT_FIRINGS:
            name = names.name(f"{firing}_input", layer)
            tensor = acts.get(name)
            if resid is not None and tensor is not None and tensor.ndim == 4 and tensor.shape[-1] == resid.shape[-1]:
                acts[name] = resid[:, :, None].expand_as(tensor)
            for kind in ("scale", "normalized"):
                name = names.name(f"ln1_{kind}", layer, firing)
                tensor = acts.get(name)
                if tensor is None or tensor.ndim != 4:
                    continue
                first = tensor[:, :, :1]
                if all(torch.equal(first, tensor[:, :, h : h + 1]) for h in {tensor.shape[2] // 2, tensor.shape[2] - 1}):
                    acts[name] = first.clone().expand_as(tensor)
    return acts


def _check_prefix_layout(made: ModelSpec) -> None:
    if made.layout == "encoder":
        raise GradGraphError("a cached prefix is for causal models; an encoder's positions all read each other: "
                             "record the whole sequence")
    if "q/k normalisation" in made.features:
        raise GradGraphError("graphs after a cached prefix do not cover q/k normalisation yet; record the whole "
                             "sequence (no prefix)")


def _check_prefix(model, prefix, tokens) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise GradGraphError("a prefix goes with a [batch, pos] tensor of the token ids that follow it (no BOS)")
    prefix = torch.as_tensor(prefix)
    if prefix.ndim != 1 or len(prefix) == 0 or prefix.dtype not in (torch.int64, torch.int32):
        raise GradGraphError(f"prefix must be a non-empty 1-D tensor of token ids, got {tuple(prefix.shape)} "
                             f"{prefix.dtype}")
    if int(prefix.min()) < 0 or int(prefix.max()) >= model.cfg.d_vocab:
        raise GradGraphError(f"prefix token ids must lie in [0, {model.cfg.d_vocab})")
    return prefix.long().to(tokens.device)


def record(
    model: Model,
    tokens: str | list[str] | torch.Tensor,
    metric,
    *,
    attention_mask: torch.Tensor | None = None,
    embed: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    patterns: str = "auto",
) -> Recording:
    """One forward pass of ``model`` with every hook point recorded (no autograd graph is kept):
    from the weights where ``gradgraph.arch.recorded`` covers the model (no cached prefix), through
    TransformerLens' hooks otherwise.

    ``embed`` ``[batch, pos, d_model]`` replaces the token embeddings (``hook_embed``; e.g. points
    on an integrated-gradients path); ``tokens`` still give the positions and the padding.
    ``prefix`` ``[p]``: token ids every row follows (a few-shot prompt, say), run once and cached;
    ``tokens`` are then what comes after it, and the graph covers only those positions (see
    ``GradGraph``): much less work when the prefix is long and only what follows is explained.
    ``patterns``: ``"keep"`` the attention scores and patterns of every layer as the forward pass
    made them, or ``"recompute"`` them from the queries and keys whenever a pass reads them (a pass
    then goes through each layer's attention a chunk of query rows at a time, ``gradgraph.chunked``;
    the graph holds a byte per (query, key) pair for all its layers instead of ``2·B·H·P²`` numbers
    per layer); ``"auto"`` keeps them unless that takes more than ``gradgraph.arch.memory.PATTERN_BUDGET``."""
    made = check_supported(model)
    if isinstance(tokens, torch.Tensor):
        made.check_device(tokens)
    metric = prepare(metric, model)
    if prefix is not None:
        _check_prefix_layout(made)
        prefix = _check_prefix(model, prefix, tokens)
    token_ids, mask = tokens_and_mask(model, tokens, attention_mask)
    if prefix is not None and not lens.caches_prefix(model):
        return _whole_then_sliced(model, prefix, token_ids, mask, metric, embed, patterns)
    replacements = {} if embed is None else {names.inputs(model)[0]: check_embed(model, embed, token_ids)}
    p0 = 0 if prefix is None else len(prefix)
    B, P = token_ids.shape[0], token_ids.shape[1] + p0
    recompute = memory.recomputes_patterns(patterns, model.cfg, B, P, made.dtype)
    own = prefix is None and recorded.covers(model)  # the weights' own forward: no hooks, the norms run once
    # a metric of one position per row: the logits are made there only
    at_position = own and isinstance(metric, AtPosition) and soft_cap(model.cfg.output_logits_soft_cap) is None
    memory.check_fits(model.cfg, B, P, made.dtype, token_ids.device, recompute, B if at_position else None)
    cache = None if prefix is None else lens.prefix_cache(model, prefix, token_ids.shape[0])
    run = {} if cache is None else dict(past_kv_cache=cache, attention_mask=mask)
    if names.is_encoder(model.cfg):  # padded keys are masked out of every position's attention
        run = dict(one_zero_attention_mask=mask)
    at = metric.positions(mask) if at_position else None  # [batch]: where that metric reads
    if own:
        embedded = replacements.get(names.inputs(model)[0])
        logits, acts = recorded.recorded(model, token_ids, embedded, keep_patterns=not recompute, positions=at)
    else:
        skip = {names.name(kind, layer) for kind in ("attn_scores", "pattern") for layer in range(model.cfg.n_layers)}
        with torch.no_grad(), hooks.replacing(model, replacements), \
                hooks.recording(model, skip=skip if recompute else frozenset()) as store:
            logits = model(token_ids, **run)
        acts = _deduplicated(hooks.node_firings(store), model.cfg.n_layers)
        del store
    if cache is not None:
        for layer, entry in enumerate(cache.entries):
            acts[names.name("cached_k", layer)] = entry.past_keys
            acts[names.name("cached_v", layer)] = entry.past_values
    # NaN and inf propagate into the residual stream, up to its last cut (where one is, every cut
    # after it has one: the list is made only then); masked attention scores are -inf by design
    last = names.name("resid_post", model.cfg.n_layers - 1)
    checked = [n for n in acts if names.is_residual(n) or n == names.inputs(model)[0]]
    bad = [] if last in acts and torch.isfinite(acts[last]).all() else [n for n in checked
                                                                        if not torch.isfinite(acts[n]).all()]
    if bad:
        raise GradGraphError(
            f"non-finite activations at {bad[:3]} (of {len(checked)} residual-stream hook points); the graph "
            f"would carry NaN/inf: check the inputs and the model's dtype"
        )
    with torch.enable_grad():
        logits = logits.detach().requires_grad_(True)
        value = check_metric_value(metric(logits, mask) if at is None else metric.of(logits), token_ids.shape[0])
        (grad,) = torch.autograd.grad(value.sum(), logits, allow_unused=True)
    grad = torch.zeros_like(logits) if grad is None else grad
    logit_ids = grad.flatten(0, -2).any(0).nonzero()[:, 0]
    if at is not None:  # the kept columns at every position; the gradient is the metric's positions'
        W_U, b_U = model.W_U.detach()[:, logit_ids], model.b_U.detach()[logit_ids]
        acts[names.name("logits")] = acts[names.name("unembed_in")] @ W_U + b_U
        rows = torch.zeros((*token_ids.shape, len(logit_ids)), dtype=grad.dtype, device=grad.device)
        rows[torch.arange(len(at), device=at.device), at] = grad[:, logit_ids]
        return Recording(model, token_ids, mask, acts, value.detach(), rows, logit_ids, prefix=prefix)
    if soft_cap(model.cfg.output_logits_soft_cap) is None:
        acts[names.name("logits")] = logits.detach()[..., logit_ids]
    else:  # the hook holds the logits before the cap, the metric reads them after it
        acts[names.name("logits")] = acts[names.name("logits")][..., logit_ids]
        acts[names.name("logits_capped")] = logits.detach()[..., logit_ids]
    return Recording(model, token_ids, mask, acts, value.detach(), grad[..., logit_ids].detach(), logit_ids,
                     prefix=prefix)


def _whole_then_sliced(model, prefix, token_ids, mask, metric, embed, patterns: str) -> Recording:
    """``record(prefix=)`` for a model with no key/value cache to start from (a bridge): the whole
    sequence recorded, and what follows the prefix sliced from it (``after_prefix``): the same
    recording, without the saving."""
    B, p = token_ids.shape[0], len(prefix)
    tokens = torch.cat([prefix.expand(B, -1), token_ids], 1)
    if embed is not None:
        embed = check_embed(model, embed, token_ids)
        embed = torch.cat([model.W_E.detach()[prefix].expand(B, -1, -1).to(embed.dtype), embed], 1)
    whole = record(model, tokens, lambda logits, rows: metric(logits[:, p:], rows[:, p:]),
                   attention_mask=torch.cat([mask.new_ones(B, p), mask], 1), embed=embed, patterns=patterns)
    return after_prefix(whole, p)


def after_prefix(recording: Recording, length: int) -> Recording:
    """The recording of the positions after the first ``length``, as ``record(..., prefix=)`` would
    make it, sliced from a recording of the whole sequence (no second forward pass). Every row must
    start with the same ``length`` real tokens."""
    tokens, mask = recording.tokens, recording.attention_mask
    if recording.prefix is not None:
        raise GradGraphError("this recording already follows a cached prefix")
    _check_prefix_layout(spec(recording.model))
    if not 0 < length < int(mask.sum(1).min()):
        raise GradGraphError(f"a prefix of {length} tokens must leave every row at least one token after it "
                             f"(shortest row: {int(mask.sum(1).min())})")
    if not bool((tokens[:, :length] == tokens[:1, :length]).all()):
        raise GradGraphError(f"the rows differ within their first {length} tokens: no shared prefix")
    n_layers = recording.model.cfg.n_layers
    by_query = {names.name(kind, layer) for kind in ("attn_scores", "pattern") for layer in range(n_layers)}
    whole = {names.name("rot_k", layer) for layer in range(n_layers)}  # keys after rotary: every position
    acts = {}
    for node, tensor in recording.activations.items():
        if node in whole:
            acts[node] = tensor
        elif node in by_query:  # (absent when the patterns are recomputed)
            acts[node] = tensor[:, :, length:]
        else:
            acts[node] = tensor[:, length:]
    for layer in range(n_layers):
        for which in "kv":
            acts[names.name(f"cached_{which}", layer)] = recording.activations[names.name(which, layer)][:, :length]
    return Recording(recording.model, tokens[:, length:], mask[:, length:], acts, recording.metric_value,
                     recording.grad_logits[:, length:], recording.logit_ids, prefix=tokens[0, :length])


__all__ = ["Recording", "after_prefix", "check_embed", "check_metric_value", "record", "tokens_and_mask"]
