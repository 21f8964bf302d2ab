"""Output-only forward passes, written from a model's weights.

Deletion metrics and patching run thousands of forward passes that read one position's logits.
TransformerLens 3.9 copies every weight matrix (``W.T.contiguous()``, the grouped key/value heads
repeated per query head) on every forward and runs hook machinery; these passes use the weights
as stored, fused where the maths allows (q, k and v in one product, the gate and the linear branch
of a gated MLP in one), attention per key/value head group without repeating keys, and a shared
prefix's keys and values computed once.

The arithmetic is TransformerLens' own, op for op, for the pre-norm GPT-2- and Llama-family models
the graph builder supports (``supported``); results equal ``model(tokens)`` up to float rounding
(tested to 1e-10 in float64). Anything else falls back to the model's own forward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from gradgraph.arch import hooks, lens
from gradgraph.arch.features import layout_features, unsupported_features
from gradgraph.arch.lens import Model
from gradgraph.arch.rotary import rotate
from gradgraph.weights import _fingerprint


@dataclass(frozen=True)
class _Norm:
    kind: str  # "LN", "LNPre", "RMS" or "RMSPre"
    eps: float
    w: torch.Tensor | None  # [d]
    b: torch.Tensor | None  # [d]


@dataclass(frozen=True)
class _Layer:
    ln1: _Norm
    W_qkv: torch.Tensor  # [d_model, (H + 2 G) d_head]: q, then k, then v
    b_qkv: torch.Tensor  # [(H + 2 G) d_head]
    rotary: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [n_ctx, rotary_dim]
    attn_scale: float
    W_O: torch.Tensor  # [H d_head, d_model]
    b_O: torch.Tensor  # [d_model]
    ln2: _Norm
    W_in: torch.Tensor  # [d_model, d_mlp] or, gated, [d_model, 2 d_mlp]: gate, then linear
    b_in: torch.Tensor  # [d_mlp]
    W_out: torch.Tensor  # [d_mlp, d_model]
    b_out: torch.Tensor  # [d_model]
    act_fn: object


@dataclass(frozen=True)
class _Weights:
    layers: tuple[_Layer, ...]
    ln_final: _Norm
    W_E: torch.Tensor  # [d_vocab, d_model]
    W_pos: torch.Tensor | None  # [n_ctx, d_model]


_CACHE: "weakref.WeakKeyDictionary[Model, tuple[tuple, _Weights]]" = weakref.WeakKeyDictionary()


def supported(model) -> bool:
    """Whether these passes cover ``model``: the GPT-2 / Llama layout (``features.layout_features``
    lists what else the graph builder covers, and what these passes leave to TransformerLens)."""
    return not unsupported_features(model) and not layout_features(lens.config(model))


def _norm(module, kind: str) -> _Norm:
    w = getattr(module, "w", None)
    b = getattr(module, "b", None)
    return _Norm(kind, float(module.eps), None if w is None else w.detach(), None if b is None else b.detach())


def _grouped(attn, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W and b of the keys or values, one matrix per key/value head: ``[G, d, e]``, ``[G, e]``."""
    W = getattr(attn, f"_W_{which}", None)
    b = getattr(attn, f"_b_{which}", None)
    if W is None:
        W, b = getattr(attn, f"W_{which}"), getattr(attn, f"b_{which}")
    return W.detach(), b.detach()


def _weights(model: Model) -> _Weights:
    fingerprint = _fingerprint(model)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    cfg = lens.config(model)
    kind = cfg.normalization_type
    layers = []
    for block in (lens.block(model, layer) for layer in range(cfg.n_layers)):
        attn, mlp = block.attn, block.mlp
        W_K, b_K = _grouped(attn, "K")
        W_V, b_V = _grouped(attn, "V")
        heads = [attn.W_Q.detach(), W_K, W_V]  # [heads, d, e] each
        W_qkv = torch.cat([h.permute(1, 0, 2).reshape(cfg.d_model, -1) for h in heads], 1).contiguous()
        b_qkv = torch.cat([attn.b_Q.detach().flatten(), b_K.flatten(), b_V.flatten()])
        rotary = None
        if cfg.positional_embedding_type == "rotary":
            rotary = (attn.rotary_cos.detach(), attn.rotary_sin.detach())
        if cfg.gated_mlp:
            W_in = torch.cat([mlp.W_gate.detach(), mlp.W_in.detach()], 1).contiguous()
        else:
            W_in = mlp.W_in.detach().contiguous()
        layers.append(_Layer(
            ln1=_norm(block.ln1, kind), W_qkv=W_qkv, b_qkv=b_qkv, rotary=rotary, attn_scale=float(attn.attn_scale),
            W_O=attn.W_O.detach().reshape(-1, cfg.d_model).contiguous(), b_O=attn.b_O.detach(),
            ln2=_norm(block.ln2, kind), W_in=W_in, b_in=mlp.b_in.detach(), W_out=mlp.W_out.detach().contiguous(),
            b_out=mlp.b_out.detach(), act_fn=mlp.act_fn))
    W_pos = model.W_pos.detach() if cfg.positional_embedding_type == "standard" else None
    weights = _Weights(tuple(layers), _norm(lens.final_norm(model), kind), model.W_E.detach(), W_pos)
    _CACHE[model] = (fingerprint, weights)
    return weights


def _apply_norm(norm: _Norm, x: torch.Tensor) -> torch.Tensor:
    """TransformerLens' LayerNorm / RMSNorm (and their ``Pre`` forms, whose weights are folded)."""
    if norm.kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    x = x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    if norm.w is not None:
        x = x * norm.w
    if norm.b is not None:
        x = x + norm.b
    return x


@dataclass
class KeysValues:
    """Per layer the keys (after rotary) and values of some positions: ``[G, n, pos, d_head]``
    (key/value head first, then the row), or ``[G, pos, d_head]`` for a prefix every row shares."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    def rows(self, index: torch.Tensor) -> "KeysValues":
        return KeysValues([k[:, index] for k in self.keys], [v[:, index] for v in self.values])

    def then(self, later: "KeysValues") -> "KeysValues":
        """These positions followed by ``later``'s (the same rows)."""
        return KeysValues([torch.cat(pair, 2) for pair in zip(self.keys, later.keys)],
                          [torch.cat(pair, 2) for pair in zip(self.values, later.values)])


def _attention(model, layer: _Layer, x: torch.Tensor, start: int, shared: tuple | None, past: tuple | None,
               edit=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One attention sublayer on the normed input ``x`` ``[n, s, d]`` at positions start..start+s.
    Keys and values of earlier positions: ``shared`` ``[G, p0, e]`` (the same for every row, never
    copied per row) then ``past`` ``[G, n, t, e]`` (each row's own), start = p0 + t. ``edit(site,
    value)`` may replace q, k, v (before rotary, ``[n, s, heads, e]``) and z (``[n, s, H, e]``).
    Returns the output ``[n, s, d]`` and this span's keys and values ``[G, n, s, e]``."""
    cfg = model.cfg
    n, s, _ = x.shape
    H, e = cfg.n_heads, cfg.d_head
    G = cfg.n_key_value_heads or H
    R = H // G
    qkv = torch.addmm(layer.b_qkv, x.reshape(n * s, -1), layer.W_qkv).view(n, s, H + 2 * G, e)
    q, k, v = qkv[:, :, :H], qkv[:, :, H:H + G], qkv[:, :, H + G:]
    if edit is not None:
        q, k, v = edit("q", q), edit("k", k), edit("v", v)
    if layer.rotary is not None:
        cos, sin = (t[start:start + s].to(x.dtype) for t in layer.rotary)
        q = rotate(q, cos, sin, cfg.rotary_adjacent_pairs)
        k = rotate(k, cos, sin, cfg.rotary_adjacent_pairs)
    # query heads g R .. g R + R - 1 read key/value head g: [G, n, R s, e]
    q = q.reshape(n, s, G, R, e).permute(2, 0, 3, 1, 4).reshape(G, n, R * s, e)
    k_new, v_new = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)  # [G, n, s, e]
    k_own = k_new if past is None else torch.cat([past[0], k_new], 2)
    v_own = v_new if past is None else torch.cat([past[1], v_new], 2)
    scores = q @ k_own.transpose(-1, -2)  # [G, n, R s, t + s]
    p0 = 0 if shared is None else shared[0].shape[1]
    if shared is not None:
        scores = torch.cat([(q.reshape(G, n * R * s, e) @ shared[0].transpose(-1, -2)).view(G, n, R * s, p0), scores], -1)
    scores = scores / layer.attn_scale
    P = scores.shape[-1]
    allowed = torch.ones(s, P, dtype=torch.bool, device=x.device).tril(P - s)  # query i sees keys ≤ start + i
    scores = scores.view(G, n, R, s, P).masked_fill(~allowed, float("-inf"))
    pattern = torch.softmax(scores, -1).view(G, n, R * s, P)
    z = pattern[..., p0:] @ v_own  # [G, n, R s, e]
    if shared is not None:
        z = z + (pattern[..., :p0].reshape(G, n * R * s, p0) @ shared[1]).view(G, n, R * s, e)
    z = z.view(G, n, R, s, e).permute(1, 3, 0, 2, 4)  # [n, s, G, R, e]
    z = (z if edit is None else edit("z", z.reshape(n, s, H, e))).reshape(n * s, H * e)
    out = torch.addmm(layer.b_O, z, layer.W_O).view(n, s, -1)
    return out, k_new, v_new


def _mlp(model, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
    n, s, _ = x.shape
    pre = (x.reshape(n * s, -1) @ layer.W_in)
    if model.cfg.gated_mlp:
        gate, linear = pre.chunk(2, -1)
        post = layer.act_fn(gate) * linear + layer.b_in
    else:
        post = layer.act_fn(pre + layer.b_in)
    return torch.addmm(layer.b_out, post, layer.W_out).view(n, s, -1)


TRACED = ("resid_pre", "attn_out", "resid_mid", "mlp_out")
HEADS_TRACED = ("q", "k", "v", "z")


@torch.no_grad()
def run(model: Model, tokens: torch.Tensor | None = None, *, resid: torch.Tensor | None = None,
        first_layer: int = 0, shared: KeysValues | None = None, past: KeysValues | None = None, keep: bool = False,
        last_only: bool = False, trace: dict[str, list[torch.Tensor]] | None = None, edits=None
        ) -> tuple[torch.Tensor, KeysValues | None]:
    """The residual stream after the last layer (before ``ln_final``) for ``tokens`` ``[n, s]``
    (no padding), or from ``resid`` ``[n, s, d_model]`` entering layer ``first_layer``. The
    positions follow those of ``shared`` (``[G, p0, e]``: the same for every row) and then ``past``
    (``[G, n, t, e]``: each row's own), one entry per layer of the model. With ``keep``, also these
    positions' keys and values ``[G, n, s, e]`` (of the layers run). ``last_only``: only the last
    position goes through the last layer's output (all a next-token metric reads), ``[n, 1, d]``.
    ``trace`` collects each layer's ``TRACED`` activations ``[n, s, d]`` (lists by layer), and q, k, v
    (before rotary) and z (``[n, s, heads, e]``). ``edits(layer, site, value) -> value`` may replace
    q, k, v, z and ``mlp_out`` as they are computed (interventions)."""
    w = _weights(model)
    start = (0 if shared is None else shared.length) + (0 if past is None else past.length)
    if resid is None:
        n, s = tokens.shape
        x = w.W_E[tokens]
        if w.W_pos is not None:
            x = x + w.W_pos[start:start + s][None]
    else:
        x = resid
    kept = KeysValues([], []) if keep else None
    last = len(w.layers) - 1
    for index in range(first_layer, len(w.layers)):
        layer = w.layers[index]

        def edit(site: str, value: torch.Tensor, index=index) -> torch.Tensor:
            if trace is not None and site in HEADS_TRACED:
                trace.setdefault(site, []).append(value)
            return value if edits is None else edits(index, site, value)

        hooked = None if trace is None and edits is None else edit
        attn, k, v = _attention(model, layer, _apply_norm(layer.ln1, x), start,
                                None if shared is None else (shared.keys[index], shared.values[index]),
                                None if past is None else (past.keys[index], past.values[index]), hooked)
        if kept is not None:
            kept.keys.append(k)
            kept.values.append(v)
        if index == last and last_only:  # later positions never read this layer's output
            x, attn = x[:, -1:], attn[:, -1:]
        mid = x + attn
        out = _mlp(model, layer, _apply_norm(layer.ln2, mid))
        if edits is not None:
            out = edits(index, "mlp_out", out)
        if trace is not None:
            for kind, value in zip(TRACED, (x, attn, mid, out)):
                trace.setdefault(kind, []).append(value)
        x = mid + out
    return x, kept


def project(model: Model, layer: int, kind: str, inputs: torch.Tensor) -> torch.Tensor:
    """Each head's q, k or v (before rotary) from its own input vector: ``inputs`` ``[heads, d]``
    (query heads for q, key/value heads for k and v) → ``[heads, e]``."""
    cfg, block = model.cfg, _weights(model).layers[layer]
    H, e = cfg.n_heads, cfg.d_head
    G = cfg.n_key_value_heads or H
    first = {"q": 0, "k": H, "v": H + G}[kind]
    full = torch.addmm(block.b_qkv, _apply_norm(block.ln1, inputs), block.W_qkv).view(len(inputs), H + 2 * G, e)
    heads = torch.arange(len(inputs), device=inputs.device)
    return full[heads, first + heads]


def mlp_of(model: Model, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
    """Layer ``layer``'s MLP output for the residual ``resid_mid`` ``[..., d_model]``."""
    block = _weights(model).layers[layer]
    x = resid_mid.reshape(1, -1, resid_mid.shape[-1])
    return _mlp(model, block, _apply_norm(block.ln2, x)).view_as(resid_mid)


def final_logits(model: Model, resid: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``ln_final`` and the logits of the vocabulary entries ``ids`` for a final residual ``[..., d]``."""
    return _apply_norm(_weights(model).ln_final, resid) @ model.W_U[:, ids] + model.b_U[ids]


@torch.no_grad()
def last_logits(model: Model, rows: torch.Tensor, ids: torch.Tensor, *, prefix: int = 0,
                segments: int = 4, batch_tokens: int = 4096) -> torch.Tensor:
    """Logits of the vocabulary entries ``ids`` ``[k]`` at the last position of each row ``[n, pos]``
    (no padding), ``[n, k]``. The first ``prefix`` tokens, the same in every row, run once.

    The rest runs as a tree of ``segments`` equal spans: at each span's end the rows fall into
    groups with identical tokens so far, and each group's span runs once, from the keys and values
    of the group it grew from. Deletion rows differ from their input in a few replaced tokens, so
    many share long stretches (on Rotten Tomatoes reviews four spans run a quarter fewer tokens).
    Each pass takes as many rows as make about ``batch_tokens`` tokens."""
    if rows.ndim != 2 or rows.shape[1] <= prefix:
        raise ValueError(f"rows [n, pos] longer than the prefix {prefix}, got {tuple(rows.shape)}")
    if not supported(model):
        return _fallback(model, rows, ids, max(1, batch_tokens // rows.shape[1]))
    w = _weights(model)
    shared = None
    if prefix:
        kv = run(model, rows[:1, :prefix], keep=True)[1]
        shared = KeysValues([k[:, 0] for k in kv.keys], [v[:, 0] for v in kv.values])
    L = rows.shape[1]
    bounds = sorted({prefix + round(j * (L - prefix) / max(1, segments)) for j in range(segments + 1)})
    groups = torch.zeros(rows.shape[0], dtype=torch.long)  # each row's group at the current bound
    stored: KeysValues | None = None  # per group: keys and values of the positions prefix .. bound
    for begin, end in zip(bounds, bounds[1:]):
        final = end == L
        unique, groups_next = torch.unique(rows[:, :end], dim=0, return_inverse=True)
        parent = torch.zeros(len(unique), dtype=torch.long)
        parent[groups_next] = groups  # the rows of a group all grew from one group
        outputs, kept = [], []
        batch_size = max(1, batch_tokens // (end - begin))
        for lo in range(0, len(unique), batch_size):
            part = parent[lo:lo + batch_size]
            past = None if stored is None else stored.rows(part)
            resid, kv = run(model, unique[lo:lo + batch_size, begin:end], shared=shared, past=past,
                            keep=not final, last_only=final)
            if final:
                outputs.append(final_logits(model, resid[:, -1], ids))
            else:
                kept.append(kv if past is None else past.then(kv))
        if final:
            return torch.cat(outputs)[groups_next]
        stored = KeysValues([torch.cat([kv.keys[i] for kv in kept], 1) for i in range(len(w.layers))],
                            [torch.cat([kv.values[i] for kv in kept], 1) for i in range(len(w.layers))])
        groups = groups_next
    raise AssertionError("unreachable: the last span ends at the rows' length")


def _fallback(model, rows: torch.Tensor, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's own forward, for architectures these passes do not cover."""
    with hooks.plain_forward(model):
        return torch.cat([model(rows[begin:begin + batch_size])[:, -1, ids]
                          for begin in range(0, rows.shape[0], batch_size)])


__all__ = ["KeysValues", "TRACED", "final_logits", "last_logits", "mlp_of", "project", "run", "supported"]
