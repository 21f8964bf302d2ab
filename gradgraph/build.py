"""build_graph = record (one forward pass with every hook point recorded) + assemble (per-op
emitters that ask a ``RuleSet`` for each op's local derivative blocks).

Canonical decomposition into ops (the top path and the entropy depend on it). Per layer L of a
pre-norm model, following TransformerLens' own computation with ``use_split_qkv_input``:

1. ``hook_resid_pre`` → ``hook_{q,k,v}_input``: per-head copies (Broadcast; n_heads copies for q,
   n_key_value_heads for k and v).
2. ``ln1`` on each copy (firing suffix ``:q``/``:k``/``:v``), as TransformerLens computes it:
   LayerNorm first centres, x̃ = x − mean(x) (node ``ln1.centered``, the map I − 11ᵀ/d); RMSNorm
   uses x̃ = x. Then ``hook_scale`` s = sqrt(mean(x̃²) + ε) (edges x̃_i → s: x̃_i/(d s)), and
   ``hook_normalized`` y = x̃ / s (edges x̃_j → y_j: 1/s and s → y_j: −x̃_j/s²). A norm's Jacobian
   is thus diagonal plus rank one through the scale node. The norm's weight w is folded into the
   next linear map (W' = diag(w) W).
3. ``hook_q/k/v`` = y W_Q/W_K/W_V + b (shared linear maps per head / key-value head).
4. Rotary (Llama): ``hook_rot_q/k`` = q cos + rotate(q) sin: two diagonal parts per element.
5. ``hook_attn_scores`` = q·k / attn_scale: a bilinear product, one edge block from each operand
   (the other operand is the weight); causally masked scores are constants, not nodes.
6. ``hook_pattern`` = softmax(scores): per row the Jacobian diag(p) − p pᵀ, kept as its factors.
7. ``hook_z`` = pattern · v: bilinear, one block from the pattern and one from v (grouped-query
   attention: a key/value head feeds each query head of its group).
8. ``hook_attn_out`` = Σ_h z_h W_O[h] + b_O (one shared linear map over (head, d_head)).
9. ``hook_resid_mid`` = resid_pre + attn_out (a residual sum); ``hook_mlp_in`` = resid_mid (a copy).
10. ``ln2`` as in 2 (no suffix); ``mlp.hook_pre`` = y W_in (gate: y W_gate) + b;
    ``mlp.hook_pre_linear`` = y W_in + b (gated MLPs); ``mlp.hook_post`` = act(pre)
    (× pre_linear): diagonal edges act'(pre)·pre_linear from pre and act(pre) from pre_linear.
11. ``hook_mlp_out`` = post W_out + b_out; ``hook_resid_post`` = resid_mid + mlp_out; the next
    layer's ``hook_resid_pre`` = this ``hook_resid_post`` (a copy).

Inputs are ``hook_embed`` (and ``hook_pos_embed``), summed into ``blocks.0.hook_resid_pre``. After
the last layer: ``ln_final`` as in 2, ``unembed.hook_in`` = y ⊙ w + b (identity when the weight is
folded), the logits ``unembed.hook_out`` = x W_U + b_U (only the vocabulary columns the metric
depends on: no other logit lies on a path to it), and ``metric``: one op from the logits with
weights ∂metric/∂logits (by autograd).

What other families add, each one emitter: parallel blocks (Pythia, GPT-J, Phi: the MLP reads
``hook_mlp_in`` = resid_pre, and resid_post = resid_pre + attn_out + mlp_out) and attention-only
ones (resid_post = resid_pre + attn_out); no norm (the norm's nodes are absent); q/k norms (Qwen3
per head, OLMo-2 over all heads: ``Reshape`` to the rows TransformerLens normalises, the norm, its
weight as a diagonal, ``Reshape`` back to ``attn.q_normed``); norms after attention and the MLP
(Gemma 2's ``ln1_post``/``ln2_post``; OLMo-2's ``ln1``/``ln2``, which then have none before)
between ``attn.out`` / ``mlp.out`` and ``hook_attn_out`` / ``hook_mlp_out``; soft caps c·tanh(x/c)
as element-wise ops from ``attn.scores_raw`` and into ``unembed.soft_capped``; local layers mask
keys outside the window like causally masked ones; SoLU is a softmax over the MLP's width, a
product with its input (``mlp.hook_mid``) and a LayerNorm. Encoders: ``gradgraph.encoder``.

Under ``rules=GRADIENT`` every block is the true local Jacobian; other rule sets (``gradgraph.rules``)
change the norm, activation, softmax, linear, bilinear and residual blocks and nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import einops
import torch

from gradgraph.arch import hooks, lens, memory, names
from gradgraph.arch.features import POST_NORM, check_supported, layout_features, soft_cap
from gradgraph.arch.lens import Model
from gradgraph.backprop import backprop
from gradgraph.errors import GradGraphError
from gradgraph.graph import Block, Broadcast, Diag, GradGraph, Identity, Matmul, Pending, Place, Reshape
from gradgraph.metrics import prepare
from gradgraph.prompts import to_tokens
from gradgraph.rules import GRADIENT, NormOp, RuleSet, SoftmaxOp, SumOp, rule_set
from gradgraph.weights import Weight, model_weights, shared_weight

# --------------------------------------------------------------------------- recording


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


def _tokens_and_mask(model, tokens, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
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


def _check_embed(model, embed: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    shape = (*token_ids.shape, model.cfg.d_model)
    if not isinstance(embed, torch.Tensor) or tuple(embed.shape) != shape:
        got = tuple(embed.shape) if isinstance(embed, torch.Tensor) else type(embed).__name__
        raise GradGraphError(f"embed must be a [batch, pos, d_model] = {list(shape)} tensor of input embeddings, got {got}")
    if not torch.isfinite(embed).all():
        raise GradGraphError("embed holds NaN or inf values")
    return embed.detach().to(lens.dtype(model))


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


def _check_prefix_layout(cfg) -> None:
    if names.is_encoder(cfg):
        raise GradGraphError("a cached prefix is for causal models; an encoder's positions all read each other: "
                             "record the whole sequence")
    if "q/k normalisation" in layout_features(cfg):
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
) -> Recording:
    """One forward pass of ``model`` with every hook point recorded (no autograd graph is kept).

    ``embed`` ``[batch, pos, d_model]`` replaces the token embeddings (``hook_embed``; e.g. points
    on an integrated-gradients path); ``tokens`` still give the positions and the padding.
    ``prefix`` ``[p]``: token ids every row follows (a few-shot prompt, say), run once and cached;
    ``tokens`` are then what comes after it, and the graph covers only those positions (see
    ``GradGraph``): much less work when the prefix is long and only what follows is explained."""
    check_supported(model)
    metric = prepare(metric, model)
    if prefix is not None:
        _check_prefix_layout(lens.config(model))
        prefix = _check_prefix(model, prefix, tokens)
    token_ids, mask = _tokens_and_mask(model, tokens, attention_mask)
    if prefix is not None and not lens.caches_prefix(model):
        return _whole_then_sliced(model, prefix, token_ids, mask, metric, embed)
    replacements = {} if embed is None else {names.inputs(model)[0]: _check_embed(model, embed, token_ids)}
    p0 = 0 if prefix is None else len(prefix)
    memory.check_fits(model.cfg, token_ids.shape[0], token_ids.shape[1] + p0, lens.dtype(model), token_ids.device)
    cache = None if prefix is None else lens.prefix_cache(model, prefix, token_ids.shape[0])
    run = {} if cache is None else dict(past_kv_cache=cache, attention_mask=mask)
    if names.is_encoder(model.cfg):  # padded keys are masked out of every position's attention
        run = dict(one_zero_attention_mask=mask)
    with torch.no_grad(), hooks.replacing(model, replacements), hooks.recording(model) as store:
        logits = model(token_ids, **run)
    acts = _deduplicated(hooks.node_firings(store), model.cfg.n_layers)
    del store
    if cache is not None:
        for layer, entry in enumerate(cache.entries):
            acts[names.name("cached_k", layer)] = entry.past_keys
            acts[names.name("cached_v", layer)] = entry.past_values
    # NaN and inf propagate into the residual stream; masked attention scores are -inf by design
    checked = [n for n in acts if "resid" in n or n == names.inputs(model)[0]]
    bad = [n for n in checked if not torch.isfinite(acts[n]).all()]
    if bad:
        raise GradGraphError(
            f"non-finite activations at {bad[:3]} (of {len(checked)} residual-stream hook points); the graph "
            f"would carry NaN/inf: check the inputs and the model's dtype"
        )
    with torch.enable_grad():
        logits = logits.detach().requires_grad_(True)
        value = metric(logits, mask)
        if not isinstance(value, torch.Tensor) or value.shape != (token_ids.shape[0],):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise GradGraphError(f"metric must return one value per prompt, shape [{token_ids.shape[0]}]; got {shape}")
        (grad,) = torch.autograd.grad(value.sum(), logits, allow_unused=True)
    grad = torch.zeros_like(logits) if grad is None else grad
    logit_ids = grad.flatten(0, 1).any(0).nonzero()[:, 0]
    if soft_cap(model.cfg.output_logits_soft_cap) is None:
        acts[names.name("logits")] = logits.detach()[..., logit_ids]
    else:  # the hook holds the logits before the cap, the metric reads them after it
        acts[names.name("logits")] = acts[names.name("logits")][..., logit_ids]
        acts[names.name("logits_capped")] = logits.detach()[..., logit_ids]
    return Recording(model, token_ids, mask, acts, value.detach(), grad[..., logit_ids].detach(), logit_ids,
                     prefix=prefix)


def _whole_then_sliced(model, prefix, token_ids, mask, metric, embed) -> Recording:
    """``record(prefix=)`` for a model with no key/value cache to start from (a bridge): the whole
    sequence recorded, and what follows the prefix sliced from it (``after_prefix``): the same
    recording, without the saving."""
    B, p = token_ids.shape[0], len(prefix)
    tokens = torch.cat([prefix.expand(B, -1), token_ids], 1)
    if embed is not None:
        embed = _check_embed(model, embed, token_ids)
        embed = torch.cat([model.W_E.detach()[prefix].expand(B, -1, -1).to(embed.dtype), embed], 1)
    whole = record(model, tokens, lambda logits, rows: metric(logits[:, p:], rows[:, p:]),
                   attention_mask=torch.cat([mask.new_ones(B, p), mask], 1), embed=embed)
    return after_prefix(whole, p)


def after_prefix(recording: Recording, length: int) -> Recording:
    """The recording of the positions after the first ``length``, as ``record(..., prefix=)`` would
    make it, sliced from a recording of the whole sequence (no second forward pass). Every row must
    start with the same ``length`` real tokens."""
    tokens, mask = recording.tokens, recording.attention_mask
    if recording.prefix is not None:
        raise GradGraphError("this recording already follows a cached prefix")
    _check_prefix_layout(lens.config(recording.model))
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
        elif node in by_query:
            acts[node] = tensor[:, :, length:]
        else:
            acts[node] = tensor[:, length:]
    for layer in range(n_layers):
        for which in "kv":
            acts[names.name(f"cached_{which}", layer)] = recording.activations[names.name(which, layer)][:, :length]
    return Recording(recording.model, tokens[:, length:], mask[:, length:], acts, recording.metric_value,
                     recording.grad_logits[:, length:], recording.logit_ids, prefix=tokens[0, :length])


# --------------------------------------------------------------------------- assembly


class _Assembly:
    """The nodes and blocks assembled so far, and what they are built from."""

    def __init__(self, recording: Recording, rules: RuleSet, head_mask: torch.Tensor | None):
        self.rec, self.rules, self.head_mask = recording, rules, head_mask
        self.model, self.cfg = recording.model, lens.config(recording.model)
        self.valid = recording.attention_mask.bool()  # [B, P]
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.order: list[str] = []
        self.blocks: list[Block] = []
        self.stored: dict[str, torch.Tensor] = {}
        self.weights = model_weights(self.model)
        self.prefix = 0 if recording.prefix is None else len(recording.prefix)
        self.encoder = names.is_encoder(self.cfg)  # post-LN blocks around the residual sums, attention both ways

    def node(self, name: str, tensor: torch.Tensor | None = None) -> str:
        if tensor is None:
            if name not in self.rec.activations:
                raise GradGraphError(f"hook point {name} did not fire; this model's layout is not supported")
            tensor = self.rec.activations[name].detach()
        self.shapes[name] = tuple(tensor.shape)
        self.order.append(name)
        self.stored[name] = tensor
        return name

    def add(self, blocks: list[Block]) -> None:
        self.blocks += blocks

    def add_derived(self, op: str, key: tuple, make) -> None:
        """``make()``'s blocks, made once per recording, rule set and op (no head mask enters them)."""
        key = (self.rules, op) + key
        if key not in self.rec.derived:
            self.rec.derived[key] = make()
        self.add(self.rec.derived[key])

    def shared(self, key: tuple, make) -> Weight:
        """A model matrix (with a norm's weight folded in), shared by every graph of the model."""
        return shared_weight(self.weights, key, make)


def _nonzero(blocks: list[tuple[float, object]]) -> list[Block]:
    """The blocks whose rule factor is not zero (a factor 0 means the operand carries nothing)."""
    return [make() for factor, make in blocks if factor != 0]


def _norm_weight(module) -> torch.Tensor | None:
    return module.w.detach() if hasattr(module, "w") else None


def _norm(asm: _Assembly, prefix: str, x: str, layer: int | None, module, firing: str | None = None) -> str:
    """The norm ``module`` on node ``x``; returns ``hook_normalized``'s node (``x`` itself when the
    model has no norm there)."""
    kind = lens.norm_kind(module)
    if kind is None:
        return x
    centered = None
    x_tilde = asm.stored[x]
    if kind in ("LN", "LNPre"):
        compact = x_tilde[:, :, :1] if x_tilde.ndim == 4 and x_tilde.stride(2) == 0 else x_tilde  # per-head copies
        x_tilde = (compact - compact.mean(-1, keepdim=True)).expand_as(x_tilde)
        centered = asm.node(names.name(f"{prefix}_centered", layer, firing), x_tilde)
    scale = asm.node(names.name(f"{prefix}_scale", layer, firing))
    y = asm.node(names.name(f"{prefix}_normalized", layer, firing))
    asm.add_derived("norm", (x, y), lambda: asm.rules.norm(
        NormOp(x, centered, scale, y, asm.stored[x], x_tilde, asm.stored[scale], layer)))
    return y


def _norm_out(asm: _Assembly, prefix: str, x: str, layer: int, module, out: str) -> str:
    """A norm whose weight no linear map takes up (after attention or the MLP, on q and k, SoLU's):
    ``out = normalized ⊙ w + b``, a diagonal; returns ``out``'s node (its tensor recorded or formed)."""
    y = _norm(asm, prefix, x, layer, module)
    w = _norm_weight(module)
    if out in asm.rec.activations:
        asm.node(out)
    else:
        bias = module.b.detach() if hasattr(module, "b") else 0.0
        asm.node(out, asm.stored[y] if w is None else asm.stored[y] * w + bias)
    if w is None:
        asm.add([Identity(y, out, "copy" if y == x else "norm", layer)])
    else:
        asm.add([Diag(y, out, "norm", layer, ((Weight(w), None),))])
    return out


def _linear(asm: _Assembly, src: str, tgt: str, layer: int | None, weight: Weight, src_pattern: str,
            tgt_pattern: str, axes: dict) -> str:
    block = Matmul(src, tgt, "linear", layer, weight, True, src_pattern, tgt_pattern, axes)
    asm.add_derived("linear", (src, tgt), lambda: asm.rules.linear(block, asm.stored[src], asm.stored[tgt]))
    return tgt


def _sum(asm: _Assembly, sources: tuple[str, ...], target: str, layer: int | None) -> None:
    asm.add(asm.rules.residual(SumOp(sources, target, tuple(asm.stored[n] for n in sources), layer)))


def _embed(asm: _Assembly) -> str:
    sources = [asm.node(name) for name in names.inputs(asm.cfg)]
    resid = asm.node(names.name("resid_pre", 0))
    _sum(asm, tuple(sources), resid, None)
    return resid


def _kv_weight(attn, which: str) -> torch.Tensor:
    """W_K / W_V with one matrix per key/value head (grouped-query attention keeps them unrepeated)."""
    grouped = getattr(attn, f"_W_{which}", None)
    return grouped if grouped is not None else getattr(attn, f"W_{which}")


def _attention(asm: _Assembly, layer: int, resid: str) -> str:
    """ln1, q/k/v, q/k norms, rotary, scores (soft-capped), pattern, z and attn_out of one layer (a
    norm after it); returns attn_out's node."""
    cfg, block = asm.cfg, lens.block(asm.model, layer)
    attn = block.attn
    B, P = asm.valid.shape
    H = cfg.n_heads
    G = cfg.n_key_value_heads or H
    R = H // G
    before, after, after_prefix = _norms_around(asm, block, "1")
    w1 = None if before is None else _norm_weight(before)
    matrices = {"q": lambda: attn.W_Q, "k": lambda: _kv_weight(attn, "K"), "v": lambda: _kv_weight(attn, "V")}
    proj = {}
    for firing, copies in (("q", H), ("k", G), ("v", G)):
        inp = asm.node(names.name(f"{firing}_input", layer))
        asm.add([Broadcast(resid, inp, "copy", layer, 2, copies)])
        y = inp if before is None else _norm(asm, "ln1", inp, layer, before, firing)

        def folded(firing=firing):
            W = matrices[firing]().detach()
            return W if w1 is None else w1[None, :, None] * W

        out = asm.node(names.name(firing, layer))
        weight = asm.shared((f"W_{firing.upper()}", layer), folded)
        proj[firing] = _linear(asm, y, out, layer, weight, "b p h d -> h (b p) d", "b p h e -> h (b p) e",
                               dict(zip("bph", asm.shapes[out][:3])))
    q_name, k_name, v_name = proj["q"], proj["k"], proj["v"]
    if attn.q_norm is not None:  # Qwen3 (per head), OLMo-2 (over all heads)
        q_name = _qk_norm(asm, layer, "q", q_name, attn.q_norm)
        k_name = _qk_norm(asm, layer, "k", k_name, attn.k_norm)
    p0 = asm.prefix
    if p0:  # the cached prefix's keys and values, then this run's
        k_name, v_name = _after_cache(asm, k_name, "k", layer), _after_cache(asm, v_name, "v", layer)
    if cfg.positional_embedding_type == "rotary":
        q_name = _rotary(asm, attn, q_name, asm.node(names.name("rot_q", layer)), layer, start=p0)
        k_name = _rotary(asm, attn, k_name, asm.node(names.name("rot_k", layer)), layer)
    rq, rk, v = asm.stored[q_name], asm.stored[k_name], asm.stored[v_name]
    axes = dict(g=G, r=R, b=B)
    # scores = q·k / attn_scale (then cap · tanh(· / cap)); causally masked, out-of-window and padded
    # scores are constants
    query_at = torch.arange(p0, p0 + P, device=rq.device)[:, None]
    key_at = torch.arange(p0 + P, device=rq.device)[None, :]
    causal = (key_at <= query_at) | asm.encoder  # [q, k]
    if getattr(attn, "attn_type", "global") == "local":
        causal = causal & (key_at > query_at - cfg.window_size)
    keys = torch.cat([asm.valid.new_ones(B, p0), asm.valid], 1)
    allowed = causal[None, None] & asm.valid[:, None, :, None] & keys[:, None, None, :]  # [B, 1, q, k]
    scores = names.name("attn_scores", layer)
    cap = soft_cap(cfg.attn_scores_soft_cap)
    if cap is None:
        raw = asm.node(scores)
    else:
        raw = asm.node(names.name("scores_raw", layer), torch.einsum("bqhe,bkhe->bhqk", rq, rk.repeat_interleave(R, 2))
                       / attn.attn_scale)
    f_q, f_k = asm.rules.bilinear("qk")
    k_canon = einops.rearrange(rk, "b k g e -> (b g) e k", g=G)
    q_canon = einops.rearrange(rq, "b q (g r) e -> (b g) (r q) e", g=G, r=R)
    score_layout = "b (g r) q k -> (b g) (r q) k"
    asm.add(_nonzero([
        (f_q, lambda: Matmul(q_name, raw, "bilinear", layer, Weight(k_canon, f_q / attn.attn_scale), True,
                             "b q (g r) e -> (b g) (r q) e", score_layout, axes, allowed, k_name,
                             "b k g e -> (b g) e k")),
        (f_k, lambda: Matmul(k_name, raw, "bilinear", layer, Weight(q_canon, f_k / attn.attn_scale), False,
                             "b k g e -> (b g) e k", score_layout, axes, allowed, q_name,
                             "b q (g r) e -> (b g) (r q) e")),
    ]))
    if cap is not None:
        asm.node(scores)
        _soft_capped(asm, raw, scores, layer, cap, allowed)
    # pattern = softmax(scores)
    pattern = asm.node(names.name("pattern", layer))
    asm.add_derived("softmax", (scores, pattern), lambda: asm.rules.softmax(
        SoftmaxOp(scores, pattern, asm.stored[pattern], allowed, layer, asm.stored[scores])))
    # z = pattern · v; padded queries carry nothing, nor (Mask-LRP) the heads the mask leaves out
    z = asm.node(names.name("z", layer))
    f_p, f_v = asm.rules.bilinear("pv")
    z_mask = asm.valid[:, :, None, None]  # [B, q, 1, 1]
    if asm.head_mask is not None:
        z_mask = z_mask & asm.head_mask[layer].to(z_mask.device)[None, None, :, None]  # [B, q, H, 1]
        if not bool(asm.head_mask[layer].any()):  # no head passes anything: no block, and no pass does the work
            f_p = f_v = 0
    v_canon = einops.rearrange(v, "b k g e -> (b g) k e", g=G)
    p_canon = einops.rearrange(asm.stored[pattern], "b (g r) q k -> (b g) (r q) k", g=G, r=R)
    z_layout = "b q (g r) e -> (b g) (r q) e"
    asm.add(_nonzero([
        (f_p, lambda: Matmul(pattern, z, "bilinear", layer, Weight(v_canon, f_p), True, score_layout, z_layout, axes,
                             z_mask, v_name, "b k g e -> (b g) k e")),
        (f_v, lambda: Matmul(v_name, z, "bilinear", layer, Weight(p_canon, f_v), False, "b k g e -> (b g) k e",
                             z_layout, axes, z_mask, pattern, score_layout)),
    ]))
    # attn_out = Σ_h z_h W_O[h] (+ b_O)
    W_O = asm.shared(("W_O", layer), lambda: attn.W_O.detach().reshape(1, -1, cfg.d_model))
    return _written(asm, z, layer, W_O, ("b p h e -> 1 (b p) (h e)", "b p d -> 1 (b p) d", dict(b=B, p=P, h=H)),
                    names.name("attn_out", layer), names.name("attn_raw", layer), after, after_prefix,
                    lambda: asm.stored[z].flatten(2) @ attn.W_O.detach().reshape(-1, cfg.d_model) + attn.b_O.detach())


def _norms_around(asm: _Assembly, block, which: str) -> tuple:
    """``(norm before, norm after, the latter's node prefix)`` for attention (``which="1"``) or the
    MLP (``"2"``): pre-norm ``ln1``/``ln2`` (and Gemma 2's ``ln1_post``/``ln2_post`` after); OLMo-2's
    ``ln1``/``ln2`` after only; none for an encoder, whose norms sit after the residual sums."""
    own = getattr(block, f"ln{which}", None)
    if asm.encoder:
        return None, None, None
    if asm.cfg.original_architecture in POST_NORM:
        return None, own, f"ln{which}"
    return own, getattr(block, f"ln{which}_post", None), f"ln{which}_post"


def _written(asm: _Assembly, src: str, layer: int, weight: Weight, rows: tuple, out: str, raw: str, after,
             prefix: str | None, raw_value) -> str:
    """A sublayer's output map ``src → out`` (``hook_attn_out``, ``hook_mlp_out``): straight, or into
    ``raw`` (its tensor ``raw_value()``) and through the norm ``after`` when the model has one there."""
    if after is None:
        return _linear(asm, src, asm.node(out), layer, weight, *rows)
    node = asm.node(raw, raw_value())
    _linear(asm, src, node, layer, weight, *rows)
    return _norm_out(asm, prefix, node, layer, after, out)


def _qk_norm(asm: _Assembly, layer: int, which: str, src: str, module) -> str:
    """The q (or k) norm: ``src`` ``[B, P, heads, e]`` reshaped as TransformerLens normalises it
    (rows of ``e``: Qwen3; rows of ``heads · e``: OLMo-2), normalised, weighted, reshaped back."""
    prefix = f"{which}_norm"
    shape = tuple(asm.rec.activations[names.name(f"{prefix}_normalized", layer)].shape)
    heads_shape = asm.shapes[src]
    inp = asm.node(names.name(f"{prefix}_input", layer), asm.stored[src].reshape(shape))
    asm.add([Reshape(src, inp, "copy", layer, heads_shape, shape)])
    out = _norm_out(asm, prefix, inp, layer, module, names.name(f"{prefix}_output", layer))
    normed = asm.node(names.name(f"{which}_normed", layer), asm.stored[out].reshape(heads_shape))
    asm.add([Reshape(out, normed, "copy", layer, shape, heads_shape)])
    return normed


def _soft_capped(asm: _Assembly, raw: str, capped: str, layer: int | None, cap: float,
                 mask: torch.Tensor | None = None) -> None:
    """``capped = cap · tanh(raw / cap)``, an element-wise function (Gemma 2's scores and logits)."""
    fn = lambda x: cap * torch.tanh(x / cap)  # noqa: E731
    slope = asm.rules.activation(fn, asm.stored[raw])
    asm.add([Diag(raw, capped, "activation", layer, ((Weight(slope) if mask is None else Weight(slope, mask), None),))])


def _after_cache(asm: _Assembly, own: str, which: str, layer: int) -> str:
    """The node of the cached prefix's keys (or values) followed by this run's, ``[B, p0 + P, G, e]``."""
    cached = asm.node(names.name(f"cached_{which}", layer))
    both = torch.cat([asm.stored[cached], asm.stored[own]], 1)
    full = asm.node(names.name(f"all_{which}", layer), both)
    p0, n = asm.prefix, both.shape[1]
    asm.add([Place(cached, full, "copy", layer, 1, 0, p0, n), Place(own, full, "copy", layer, 1, p0, n - p0, n)])
    return full


def _rotary(asm: _Assembly, attn, src: str, tgt: str, layer: int, start: int = 0) -> str:
    """rot = x cos + rotate(x) sin on the first rotary_dim dims; the rest pass through. ``x``'s
    first position is position ``start`` (after a cached prefix)."""
    x = asm.stored[src]  # [B, P, heads, e]
    P, e = x.shape[1], x.shape[-1]
    rd = asm.cfg.rotary_dim
    cos = torch.ones(P, e, dtype=x.dtype, device=x.device)
    sin = torch.zeros(P, e, dtype=x.dtype, device=x.device)
    cos[:, :rd] = attn.rotary_cos[start:start + P].to(x.dtype)
    sin[:, :rd] = attn.rotary_sin[start:start + P].to(x.dtype)
    perm = torch.arange(e, device=x.device)
    sign = torch.zeros(e, dtype=x.dtype, device=x.device)
    if asm.cfg.rotary_adjacent_pairs:  # rotate(x)[2i] = -x[2i+1], rotate(x)[2i+1] = x[2i]
        perm[0:rd:2], perm[1:rd:2] = torch.arange(1, rd, 2), torch.arange(0, rd, 2)
        sign[0:rd:2], sign[1:rd:2] = -1.0, 1.0
    else:  # rotate(x)[:n] = -x[n:rd], rotate(x)[n:rd] = x[:n]
        n = rd // 2
        perm[:n], perm[n:rd] = torch.arange(n, rd), torch.arange(0, n)
        sign[:n], sign[n:rd] = -1.0, 1.0
    parts = ((Weight(cos[None, :, None, :]), None), (Weight((sin * sign)[None, :, None, :]), perm))
    asm.add([Diag(src, tgt, "rotary", layer, parts)])
    return tgt


def _mlp(asm: _Assembly, layer: int, mlp_in: str) -> str:
    """ln2, the (gated) MLP and its output (a norm after it); returns mlp_out's node."""
    cfg, block = asm.cfg, lens.block(asm.model, layer)
    mlp = block.mlp
    B, P = asm.valid.shape
    before, after, after_prefix = _norms_around(asm, block, "2")  # an encoder's MLP reads ln1's output
    y = mlp_in if before is None else _norm(asm, "ln2", mlp_in, layer, before)
    w2 = None if before is None else _norm_weight(before)

    def folded(matrix):
        return lambda: matrix.detach() if w2 is None else w2[:, None] * matrix.detach()

    rows = ("b p d -> 1 (b p) d", "b p m -> 1 (b p) m", dict(b=B, p=P))
    pre = asm.node(names.name("mlp_pre", layer))
    W_pre = asm.shared(("W_gate" if cfg.gated_mlp else "W_in", layer),
                       lambda: folded(mlp.W_gate if cfg.gated_mlp else mlp.W_in)()[None])
    _linear(asm, y, pre, layer, W_pre, *rows)
    pre_act = asm.stored[pre]
    post = names.name("mlp_post", layer)
    if cfg.act_fn == "solu_ln":
        _solu(asm, layer, pre, mlp, post)
    elif cfg.gated_mlp:
        slope = asm.rules.activation(mlp.act_fn, pre_act)
        lin = asm.node(names.name("mlp_pre_linear", layer))
        _linear(asm, y, lin, layer, asm.shared(("W_in", layer), lambda: folded(mlp.W_in)()[None]), *rows)
        asm.node(post)
        f_gate, f_lin = asm.rules.bilinear("gate")
        asm.add(_nonzero([
            (f_gate, lambda: Diag(pre, post, "activation", layer, ((Weight(slope, asm.stored[lin], f_gate), None),))),
            (f_lin, lambda: Diag(lin, post, "activation", layer, ((Weight(mlp.act_fn(pre_act), f_lin), None),))),
        ]))
    else:
        slope = asm.rules.activation(mlp.act_fn, pre_act)
        asm.node(post)
        asm.add([Diag(pre, post, "activation", layer, ((Weight(slope), None),))])
    W_out = asm.shared(("W_out", layer), lambda: mlp.W_out.detach()[None])
    return _written(asm, post, layer, W_out, ("b p m -> 1 (b p) m", "b p d -> 1 (b p) d", dict(b=B, p=P)),
                    names.name("mlp_out", layer), names.name("mlp_raw", layer), after, after_prefix,
                    lambda: asm.stored[post] @ mlp.W_out.detach() + mlp.b_out.detach())


def _solu(asm: _Assembly, layer: int, pre: str, mlp, post: str) -> None:
    """SoLU with its LayerNorm: ``mid = pre ⊙ softmax(pre)`` (a softmax over the MLP's width, then a
    product of two operands, ``"solu"`` for the rule set's bilinear factors), ``post = LN(mid)``."""
    x = asm.stored[pre]
    soft = asm.node(names.name("mlp_softmax", layer), torch.softmax(x, -1))
    everywhere = torch.ones(x.shape[:-1] + (1,), dtype=torch.bool, device=x.device)  # [B, P, 1]
    asm.add_derived("softmax", (pre, soft), lambda: asm.rules.softmax(
        SoftmaxOp(pre, soft, asm.stored[soft], everywhere, layer, x)))
    mid = asm.node(names.name("mlp_mid", layer))
    f_soft, f_x = asm.rules.bilinear("solu")
    asm.add(_nonzero([
        (f_soft, lambda: Diag(soft, mid, "activation", layer, ((Weight(x, f_soft), None),))),
        (f_x, lambda: Diag(pre, mid, "activation", layer, ((Weight(asm.stored[soft], f_x), None),))),
    ]))
    _norm_out(asm, "mlp_ln", mid, layer, mlp.ln, post)


def _final_norm(asm: _Assembly, resid: str) -> str:
    """ln_final into ``unembed.hook_in``; returns its node."""
    y = _norm(asm, "ln_final", resid, None, lens.final_norm(asm.model)) if asm.cfg.normalization_type else resid
    unembed_in = asm.node(names.name("unembed_in"))
    wf = _norm_weight(lens.final_norm(asm.model)) if asm.cfg.normalization_type else None
    if wf is None:
        asm.add([Identity(y, unembed_in, "linear" if y != resid else "copy", None)])
    else:  # y * w + b
        asm.add([Diag(y, unembed_in, "linear", None, ((Weight(wf), None),))])
    return unembed_in


def _unembed(asm: _Assembly, unembed_in: str) -> None:
    """The logits the metric reads (soft-capped), and the metric."""
    B, P = asm.valid.shape
    ids = asm.rec.logit_ids
    logits = asm.node(names.name("logits"))
    W_U = Weight(asm.model.W_U.detach()[:, ids][None])
    _linear(asm, unembed_in, logits, None, W_U, "b p d -> 1 (b p) d", "b p v -> 1 (b p) v", dict(b=B, p=P))
    cap = soft_cap(asm.cfg.output_logits_soft_cap)
    if cap is not None:
        capped = asm.node(names.name("logits_capped"))
        _soft_capped(asm, logits, capped, None, cap)
        logits = capped
    metric = asm.node(names.name("metric"), asm.rec.metric_value)
    g = asm.rec.grad_logits.reshape(B, -1, 1)  # [B, P * V', 1]
    asm.add([Matmul(logits, metric, "metric", None, Weight(g), True, "b p v -> b 1 (p v)", "b -> b 1 1",
                    dict(b=B, p=P))])


def check_head_mask(head_mask, cfg) -> torch.Tensor | None:
    """``None`` or a bool ``[n_layers, n_heads]`` tensor (True: the head passes relevance down)."""
    if head_mask is None:
        return None
    shape = (cfg.n_layers, cfg.n_heads)
    if not isinstance(head_mask, torch.Tensor) or tuple(head_mask.shape) != shape or head_mask.dtype != torch.bool:
        got = (f"{tuple(head_mask.shape)} {head_mask.dtype}" if isinstance(head_mask, torch.Tensor)
               else type(head_mask).__name__)
        raise GradGraphError(f"head_mask must be a bool tensor of shape [n_layers, n_heads] = {list(shape)} "
                             f"(gradgraph.heads.mask builds one), got {got}")
    return head_mask


def _decoder(asm: _Assembly) -> str:
    """The embeddings and every layer of a decoder (sequential, parallel or attention-only blocks);
    returns the last ``hook_resid_post``'s node."""
    cfg = asm.cfg
    resid = _embed(asm)
    for layer in range(cfg.n_layers):
        attn_out = _attention(asm, layer, resid)
        post = names.name("resid_post", layer)
        if cfg.attn_only:  # resid_post = resid_pre + attn_out
            _sum(asm, (resid, attn_out), asm.node(post), layer)
        elif cfg.parallel_attn_mlp:  # the MLP reads resid_pre too: resid_post = resid_pre + attn_out + mlp_out
            mlp_in = asm.node(names.name("mlp_in", layer))
            asm.add([Identity(resid, mlp_in, "copy", layer)])
            mlp_out = _mlp(asm, layer, mlp_in)
            _sum(asm, (resid, attn_out, mlp_out), asm.node(post), layer)
        else:
            mid = asm.node(names.name("resid_mid", layer))
            _sum(asm, (resid, attn_out), mid, layer)
            mlp_in = asm.node(names.name("mlp_in", layer))
            asm.add([Identity(mid, mlp_in, "copy", layer)])
            mlp_out = _mlp(asm, layer, mlp_in)
            _sum(asm, (mid, mlp_out), asm.node(post), layer)
        if layer + 1 < cfg.n_layers:
            resid = asm.node(names.name("resid_pre", layer + 1))
            asm.add([Identity(post, resid, "copy", layer)])
        else:
            resid = post
    return resid


def assemble(recording: Recording, rules: RuleSet | str = GRADIENT, *, head_mask: torch.Tensor | None = None) -> GradGraph:
    """The gradient graph of a recording under ``rules`` (the recording is not changed).

    ``head_mask`` ``[n_layers, n_heads]`` bool (Mask-LRP): a head marked False passes nothing into
    its pattern · v product (its output node still receives what arrives from above)."""
    rules = rule_set(rules)
    cfg = lens.config(recording.model)
    if recording.prefix is not None and not rules.positionwise:
        raise GradGraphError(f"{rules.name} normalises relevance over every position of the sequence, so a graph "
                             f"after a cached prefix cannot apply it; record the whole sequence (no prefix)")
    asm = _Assembly(recording, rules, check_head_mask(head_mask, cfg))
    if asm.encoder:
        from gradgraph import encoder

        _unembed(asm, encoder.emit(asm))
    else:
        _unembed(asm, _final_norm(asm, _decoder(asm)))
    sources = names.inputs(cfg)
    name = rules.name if head_mask is None else f"{rules.name}+mask({int(head_mask.sum())} heads)"
    cached = tuple(names.name(f"cached_{w}", layer) for layer in range(cfg.n_layers) for w in "kv") if asm.prefix else ()
    graph = GradGraph(
        shapes=asm.shapes, order=tuple(asm.order), edges=tuple(asm.blocks), sources=sources, source_mask=asm.valid,
        activations=asm.stored, metric_value=recording.metric_value, logit_ids=recording.logit_ids,
        tokens=recording.tokens, attention_mask=recording.attention_mask, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, n_key_value_heads=cfg.n_key_value_heads or cfg.n_heads, rules=name,
        head_mask=asm.head_mask, prefix=asm.prefix, cached=cached,
    )
    return _frozen(graph)


def _frozen(graph: GradGraph) -> GradGraph:
    """Fix the blocks whose weights depend on the relevance arriving (``Pending``): one Real
    backprop in which each hands itself the value at its target, then the graph with fixed blocks.
    That pass's values at the sources and attention patterns stay with the graph (``settled``): a
    later Real backprop that keeps only those returns them instead of running again."""
    if not any(isinstance(edge, Pending) for edge in graph.edges):
        return graph
    patterns = [names.name("pattern", layer) for layer in range(graph.n_layers)]
    settled = backprop(graph, keep=list(graph.sources) + list(graph.cached) + [p for p in patterns if p in graph.shapes])
    edges = tuple(edge.frozen(graph.shapes) if isinstance(edge, Pending) else edge for edge in graph.edges)
    return dataclasses.replace(graph, edges=edges, settled=MappingProxyType(settled))


def build_graph(
    model: Model,
    tokens: str | list[str] | torch.Tensor,
    metric,
    *,
    attention_mask: torch.Tensor | None = None,
    rules: RuleSet | str = GRADIENT,
    embed: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
) -> GradGraph:
    """Run ``model`` on ``tokens`` with every hook point recorded and build its gradient graph.

    ``metric(logits, attention_mask) -> [batch]`` or ``metric(logits) -> [batch]`` (see
    ``gradgraph.metrics``; ``logit_diff(" are", " is")`` takes words). Batches must be right-padded
    (``gradgraph.prompts.to_tokens`` does this); padded positions carry nothing. ``rules`` chooses
    the local derivatives (``gradgraph.rules``, or a name such as ``"attn-lrp"``); ``embed``
    replaces the token embeddings; ``head_mask`` (Mask-LRP) see ``assemble``; ``prefix`` (token
    ids every row follows, cached; ``tokens`` then come after it) see ``record``. Raises
    ``GradGraphError`` before the forward pass when the graph would not fit in memory.
    """
    rules = rule_set(rules)
    recording = record(model, tokens, metric, attention_mask=attention_mask, embed=embed, prefix=prefix)
    return assemble(recording, rules, head_mask=head_mask)
