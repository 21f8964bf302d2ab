"""The recording forward from the weights: every hook point the gradient graph reads, computed
as TransformerLens computes it, without its hooks (``recorded``).

TransformerLens' forward with every hook recorded runs each layer's first norm once per q/k/v copy
of the residual (``use_split_qkv_input``), repeats grouped keys and values per query head, and
computes the attention pattern eagerly with NaN checks: at 512 tokens of SmolLM2-135M that takes
about as long as a plain Hugging Face forward and backward together, and at 4,096 tokens four times
it. Here the norm runs once (its copies are views), q, k and v come from one product, and a long
prompt's attention runs in torch's fused kernel with no pattern kept (the graph forms the patterns
when a pass reads them). The arithmetic is TransformerLens' op for op (a norm's scale is
``sqrt(mean(x²) + ε)`` and divides), so every recorded tensor equals its hook point's to float
rounding (tested to 1e-12 in float64 on every layout it covers).

Covers what ``inference`` covers from the weights: the GPT-2 / Llama decoder layout of a
TransformerLens 3.9 ``HookedTransformer`` (``ModelSpec.from_weights``); anything else is recorded
through TransformerLens' hooks.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from gradgraph.arch import lens, names
from gradgraph.arch.inference import _Norm, _weights
from gradgraph.arch.rotary import rotate
from gradgraph.arch.spec import spec


_LINEAR: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _linear(model) -> list[dict[str, torch.Tensor]]:
    """Per layer the MLP's and W_O's matrices as TransformerLens 3.9 multiplies them (``F.linear`` with
    ``W.T`` contiguous for a gated MLP and W_O, HF's layout: the same float32 rounding), kept per model."""
    made = spec(model)
    cached = _LINEAR.get(model)
    if cached is None or cached[0] != made.fingerprint:
        layers = []
        for block in made.blocks:
            mlp, attn = block.mlp, block.attn
            one = dict(W_O=attn.W_O.detach().reshape(-1, made.cfg.d_model).T.contiguous())
            if made.cfg.gated_mlp:
                one.update(W_gate=mlp.W_gate.detach().T.contiguous(), W_in=mlp.W_in.detach().T.contiguous(),
                           W_out=mlp.W_out.detach().T.contiguous())
            layers.append(one)
        cached = (made.fingerprint, layers)
        _LINEAR[model] = cached
    return cached[1]


def covers(model) -> bool:
    """Whether ``recorded`` records ``model``: the weights path's layout, on TransformerLens 3.9."""
    made = spec(model)
    return made.from_weights and made.layout == "decoder" and not lens.is_bridge(model)


def _norm(acts: dict, kind: str, norm: _Norm, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """TransformerLens' LayerNorm / RMSNorm of ``x`` ``[n, s, d]``, recording ``{kind}_scale``
    ``sqrt(mean(x̃²) + ε)`` and ``{kind}_normalized`` ``x̃ / scale``; returns the output (weighted)."""
    if norm.kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    normalized = x / scale
    acts[names.name(f"{kind}_scale", layer)], acts[names.name(f"{kind}_normalized", layer)] = scale, normalized
    out = normalized if norm.w is None else normalized * norm.w
    return out if norm.b is None else out + norm.b


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q·k / attn_scale ``[n, H, s, t]`` from queries ``[n, H, s, e]`` and keys ``[n, G, t, e]``:
    each key/value head read by its ``H / G`` query heads, never repeated (TransformerLens' rounding)."""
    n, H, s, e = q.shape
    G, t = k.shape[1], k.shape[2]
    return (q.reshape(n, G, H // G, s, e) @ k[:, :, None].transpose(-1, -2)).div_(scale).view(n, H, s, t)


def _attention(model, layer, x: torch.Tensor, H: int, G: int, e: int, keep_patterns: bool, acts: dict,
               index: int, W_O: torch.Tensor) -> torch.Tensor:
    """One attention sublayer on ``x`` ``[n, s, d]``: records ln1 (once, its q/k/v copies as views),
    q, k, v, rotary, (scores and pattern when ``keep_patterns``) and z; returns attn_out."""
    n, s, d = x.shape
    R = H // G
    ln1: dict[str, torch.Tensor] = {}
    normed = _norm(ln1, "ln1", layer.ln1, x, index)
    for firing, copies in (("q", H), ("k", G), ("v", G)):
        acts[names.name(f"{firing}_input", index)] = x[:, :, None].expand(n, s, copies, d)
        for kind in ("scale", "normalized"):
            one = ln1[names.name(f"ln1_{kind}", index)]
            acts[names.name(f"ln1_{kind}", index, firing)] = one[:, :, None].expand(n, s, copies, one.shape[-1])
    qkv = torch.addmm(layer.b_qkv, normed.reshape(n * s, d), layer.W_qkv).view(n, s, H + 2 * G, e)
    q, k, v = qkv[:, :, :H], qkv[:, :, H:H + G], qkv[:, :, H + G:]
    acts[names.name("q", index)], acts[names.name("k", index)], acts[names.name("v", index)] = q, k, v
    if layer.rotary is not None:  # past the tables the model keeps, by its own formula
        tables = layer.rotary if s <= len(layer.rotary[0]) else lens.rotary_tables(model, index, s)
        cos, sin = (t[:s].to(x.dtype) for t in tables)
        adjacent = model.cfg.rotary_adjacent_pairs
        q, k = rotate(q, cos, sin, adjacent), rotate(k, cos, sin, adjacent)
        acts[names.name("rot_q", index)], acts[names.name("rot_k", index)] = q, k
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [n, heads, s, e]
    if keep_patterns:
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = attention_scores(q, k, layer.attn_scale).masked_fill_(~causal, float("-inf"))
        pattern = torch.softmax(scores, -1)
        acts[names.name("attn_scores", index)], acts[names.name("pattern", index)] = scores, pattern
        z = (pattern.view(n, G, R, s, s) @ v[:, :, None]).view(n, H, s, e)
    else:
        if G != H:
            k, v = (t[:, :, None].expand(n, G, R, s, e).reshape(n, H, s, e) for t in (k, v))
        z = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / layer.attn_scale)
    z = z.transpose(1, 2)  # [n, s, H, e]
    acts[names.name("z", index)] = z
    return F.linear(z.reshape(n, s, H * e), W_O, layer.b_O)


def _mlp(layer, x: torch.Tensor, linear: dict | None, acts: dict, index: int) -> torch.Tensor:
    """The MLP on ``x`` ``[n, s, d]`` (mlp_in, ln2, pre, pre_linear, post recorded); returns mlp_out.
    ``linear``: a gated MLP's transposed matrices (``_linear``); None: TransformerLens' fused addmm."""
    n, s, d = x.shape
    acts[names.name("mlp_in", index)] = x
    normed = _norm(acts, "ln2", layer.ln2, x, index)
    if linear is not None:
        gate, pre_linear = F.linear(normed, linear["W_gate"]), F.linear(normed, linear["W_in"])
        acts[names.name("mlp_pre", index)], acts[names.name("mlp_pre_linear", index)] = gate, pre_linear
        post = layer.act_fn(gate) * pre_linear + layer.b_in
        acts[names.name("mlp_post", index)] = post
        return F.linear(post, linear["W_out"], layer.b_out)
    pre = torch.addmm(layer.b_in, normed.reshape(n * s, d), layer.W_in).view(n, s, -1)
    acts[names.name("mlp_pre", index)] = pre
    post = layer.act_fn(pre)
    acts[names.name("mlp_post", index)] = post
    return torch.addmm(layer.b_out, post.reshape(n * s, -1), layer.W_out).view(n, s, d)


@torch.no_grad()
def recorded(model, tokens: torch.Tensor, embed: torch.Tensor | None, keep_patterns: bool,
             positions: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(logits [n, s, d_vocab], {node: tensor})`` for ``tokens`` ``[n, s]`` (causal attention over
    every position; ``embed`` ``[n, s, d]`` replaces the token embeddings), the nodes those
    TransformerLens' recording gives (``unembed.hook_out`` included, every vocabulary column).
    ``positions`` ``[n]``: the logits of row i at ``positions[i]`` only, ``[n, d_vocab]``, and no
    ``unembed.hook_out`` (the caller forms the columns it needs from ``unembed.hook_in``)."""
    made = spec(model)
    w, cfg = _weights(model), made.cfg
    H, e = cfg.n_heads, cfg.d_head
    G = cfg.n_key_value_heads or H
    n, s = tokens.shape
    acts: dict[str, torch.Tensor] = {}
    x = w.W_E[tokens] if embed is None else embed.to(w.W_E.dtype)
    acts[names.name("embed")] = x
    if w.W_pos is not None:
        pos = w.W_pos[:s][None].expand(n, s, -1)
        acts[names.name("pos_embed")] = pos
        x = x + pos
    linear = _linear(model)
    for index, layer in enumerate(w.layers):
        acts[names.name("resid_pre", index)] = x
        attn = _attention(model, layer, x, H, G, e, keep_patterns, acts, index, linear[index]["W_O"])
        acts[names.name("attn_out", index)] = attn
        mid = x + attn
        acts[names.name("resid_mid", index)] = mid
        out = _mlp(layer, mid, linear[index] if cfg.gated_mlp else None, acts, index)
        acts[names.name("mlp_out", index)] = out
        x = mid + out
        acts[names.name("resid_post", index)] = x
    unembed_in = _norm(acts, "ln_final", w.ln_final, x)
    acts[names.name("unembed_in")] = unembed_in
    if positions is not None:
        return unembed_in[torch.arange(n, device=x.device), positions] @ model.W_U.detach() + model.b_U.detach(), acts
    logits = unembed_in @ model.W_U.detach() + model.b_U.detach()
    acts[names.name("logits")] = logits
    return logits, acts


__all__ = ["attention_scores", "covers", "recorded"]
