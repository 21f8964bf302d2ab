"""The one forward pass every rerun of a model goes through (``run``, with ``Edit``\ s at named
sites), written from the model's weights, and the logits it ends in (``logits``, ``last_logits``).

Interventions, position patching and deletion metrics run thousands of forward passes that read one position's logits.
TransformerLens 3.9 copies every weight matrix (``W.T.contiguous()``, the grouped key/value heads
repeated per query head) on every forward and runs hook machinery; these passes use the weights
as stored, fused where the maths allows (q, k and v in one product, the gate and the linear branch
of a gated MLP in one), attention per key/value head group without repeating keys, and a shared
prefix's keys and values computed once.

The arithmetic is TransformerLens' own, op for op, for the pre-norm GPT-2- and Llama-family models
the graph builder supports (``ModelSpec.from_weights``); results equal ``model(tokens)`` up to float
rounding (tested to 1e-10 in float64). Anything else runs TransformerLens' own forward, with the same
edits made by hooks.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from gradgraph.arch import hooks, lens, names
from gradgraph.arch.features import soft_cap
from gradgraph.arch.lens import Model
from gradgraph.arch.rotary import rotate
from gradgraph.arch.spec import ModelSpec, spec
from gradgraph.errors import GradGraphError


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
    """Whether these passes cover ``model``: the GPT-2 / Llama layout (``ModelSpec.from_weights``;
    its ``features`` list what else the graph builder covers, and these passes leave to TransformerLens)."""
    return spec(model).from_weights


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
    made = spec(model)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == made.fingerprint:
        return cached[1]
    cfg = made.cfg
    kind = cfg.normalization_type
    layers = []
    for block in made.blocks:
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
    weights = _Weights(tuple(layers), _norm(made.final_norm, kind), model.W_E.detach(), W_pos)
    _CACHE[model] = (made.fingerprint, weights)
    return weights


def _apply_norm(norm: _Norm, x: torch.Tensor, held: bool = False) -> torch.Tensor:
    """TransformerLens' LayerNorm / RMSNorm (and their ``Pre`` forms, whose weights are folded);
    ``held``: the scale is a constant of the backward pass."""
    if norm.kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    inverse = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)  # 1 / scale: one product, in the backward too
    x = x * (inverse.detach() if held else inverse)
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


SITES = ("resid_pre", "q_input", "k_input", "v_input", "z", "attn_out", "mlp_in", "mlp_out")
HEAD_SITES = ("q_input", "k_input", "v_input", "z")  # q_input, z: a query head; k_input, v_input: a key/value head


@dataclass(frozen=True)
class Edit:
    """Replace (``add``: add to) the value at one named site of one layer, for the batch rows
    ``rows``, at ``position`` (None: every position) and, at a head's site, for head ``head``.

    Sites (``SITES``, as ``names.name`` spells their hook points): the residual stream entering a
    layer, a head's query / key / value input (its copy of the residual stream, before ``ln1``), a
    head's output ``z``, the attention and MLP outputs, the MLP's input (the residual before ``ln2``).
    ``value`` broadcasts to the slot: ``[d_model]`` or ``[rows, d_model]`` (per position: ``[rows, pos,
    d_model]``), ``[d_head]`` or ``[rows, (pos,) d_head]`` for a head's output."""

    site: str
    layer: int
    value: torch.Tensor
    rows: slice | None = None  # None: every row
    position: int | None = None
    head: int | None = None
    add: bool = False

    def __post_init__(self):
        if self.site not in SITES:
            raise GradGraphError(f"an edit's site is one of {SITES}, got {self.site!r}")
        if (self.head is None) == (self.site in HEAD_SITES):
            raise GradGraphError(f"an edit at {self.site} {'needs' if self.head is None else 'takes no'} head")

    def apply(self, value: torch.Tensor, start: int = 0, head_axis: bool = True) -> None:
        """Make the edit in ``value`` ``[n, s, ...]`` (positions start..start+s), in place; without
        ``head_axis``, in the one input ``[n, s, d]`` of the edited head."""
        if self.position is None:
            where = slice(None)
        elif 0 <= self.position - start < value.shape[1]:
            where = self.position - start
        else:
            return
        rows = slice(None) if self.rows is None else self.rows
        slot = value[rows, where] if self.head is None or not head_axis else value[rows, where, self.head]
        new = self.value.to(value.dtype)
        if self.add:
            slot += new
        else:
            slot.copy_(new.expand_as(slot) if new.shape != slot.shape else new)


def _edited(value: torch.Tensor, edits: list[Edit], start: int) -> torch.Tensor:
    """``value`` with ``edits`` made (one copy for all of them); ``value`` itself if there are none."""
    if not edits:
        return value
    value = value.clone()
    for edit in edits:
        edit.apply(value, start)
    return value


def _by_site(edits) -> dict[tuple[int, str], list[Edit]]:
    out: dict[tuple[int, str], list[Edit]] = {}
    for edit in edits:
        out.setdefault((edit.layer, edit.site), []).append(edit)
    return out


def _attention(cfg, layer: _Layer, index: int, x: torch.Tensor, start: int, shared: tuple | None, past: tuple | None,
               edits: dict, trace: dict | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One attention sublayer on the residual ``x`` ``[n, s, d]`` at positions start..start+s. Keys and
    values of earlier positions: ``shared`` ``[G, p0, e]`` (the same for every row, never copied per
    row) then ``past`` ``[G, n, t, e]`` (each row's own), start = p0 + t. ``edits`` by (layer, site):
    a head's q/k/v input edit recomputes that head's q, k or v from its edited input; z edits
    replace head outputs. Returns the output ``[n, s, d]`` and this span's keys and values ``[G, n, s, e]``."""
    n, s, _ = x.shape
    H, e = cfg.n_heads, cfg.d_head
    G = cfg.n_key_value_heads or H
    R = H // G
    qkv = _qkv(layer, _apply_norm(layer.ln1, x), H + 2 * G, e)
    for first, copies, site in ((0, H, "q_input"), (H, G, "k_input"), (H + G, G, "v_input")):
        for edit in edits.get((index, site), ()):  # qkv is this call's own: edited in place
            rows = slice(None) if edit.rows is None else edit.rows
            at = slice(None) if edit.position is None else edit.position - start
            if isinstance(at, int) and not 0 <= at < s:
                continue
            if edit.value.ndim == 1 and not edit.add:  # one input everywhere (a mean): projected once, per copy
                inputs = _apply_norm(layer.ln1, edit.value.to(x.dtype).expand(copies, -1))  # [copies, d]
                moved = torch.addmm(layer.b_qkv, inputs, layer.W_qkv).view(copies, H + 2 * G, e)[edit.head]
                qkv[rows, at, first + edit.head] = moved[first + edit.head]
                continue
            head_input = x.clone()
            edit.apply(head_input, start, head_axis=False)
            moved = _qkv(layer, _apply_norm(layer.ln1, head_input[rows]), H + 2 * G, e)[:, :, first + edit.head]
            qkv[rows, at, first + edit.head] = moved[:, at]
    q, k, v = qkv[:, :, :H], qkv[:, :, H:H + G], qkv[:, :, H + G:]
    if trace is not None:
        for site, value in zip("qkv", (q, k, v)):
            trace.setdefault(site, []).append(value)
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
    z = z.view(G, n, R, s, e).permute(1, 3, 0, 2, 4).reshape(n, s, H, e)
    z = _edited(z, edits.get((index, "z"), []), start)
    if trace is not None:
        trace.setdefault("z", []).append(z)
    out = torch.addmm(layer.b_O, z.reshape(n * s, H * e), layer.W_O).view(n, s, -1)
    return _edited(out, edits.get((index, "attn_out"), []), start), k_new, v_new


def _qkv(layer: _Layer, normed: torch.Tensor, heads: int, e: int) -> torch.Tensor:
    """q, k and v of every head (before rotary): ``[n, s, H + 2 G, e]``."""
    n, s, _ = normed.shape
    return torch.addmm(layer.b_qkv, normed.reshape(n * s, -1), layer.W_qkv).view(n, s, heads, e)


def _mlp(cfg, layer: _Layer, x: torch.Tensor, backward: "Backward | None" = None) -> torch.Tensor:
    n, s, _ = x.shape
    pre = (x.reshape(n * s, -1) @ layer.W_in)
    act = layer.act_fn if backward is None or not backward.identity else lambda x: _IdentityRule.apply(x, layer.act_fn)
    if cfg.gated_mlp:
        gate, linear = pre.chunk(2, -1)
        factors = (1.0, 1.0) if backward is None else backward.gate
        post = _scaled(act(gate), factors[0]) * _scaled(linear, factors[1]) + layer.b_in
    else:
        post = act(pre + layer.b_in)
    return torch.addmm(layer.b_out, post, layer.W_out).view(n, s, -1)


# --------------------------------------------------------------------------- the differentiable pass


@dataclass(frozen=True)
class Backward:
    """How the backward pass of ``differentiable`` departs from the gradient: a rule set's Real
    recursion written as autograd (``gradgraph.fused`` maps rule sets to these). A factor multiplies
    what an operand of a product receives (0: the operand is a constant); ``scale_held``: each norm's
    scale is a constant; ``identity``: an element-wise activation ``f`` passes ``f(x) / x`` ⊙ g."""

    scale_held: bool = False
    identity: bool = False
    qk: tuple[float, float] = (1.0, 1.0)  # q, k of q·k
    pv: tuple[float, float] = (1.0, 1.0)  # the pattern, v of pattern · v
    gate: tuple[float, float] = (1.0, 1.0)  # act(gate), linear of a gated MLP's product


class _Scaled(torch.autograd.Function):
    """x forward, f · g backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, f: float) -> torch.Tensor:
        ctx.f = f
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g * ctx.f, None


def _scaled(x: torch.Tensor, f: float) -> torch.Tensor:
    """``x``, with the gradient it passes back multiplied by ``f`` (0: none)."""
    return x if f == 1 else x.detach() if f == 0 else _Scaled.apply(x, f)


class _IdentityRule(torch.autograd.Function):
    """``fn(x)`` forward, ``fn(x) / x`` ⊙ g back to x (0 where x = 0; AttnLRP's identity rule); the
    ratio is formed again in the backward from x, so that the pass keeps no tensor of its own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.fn = fn
        return fn(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        return g * torch.where(x == 0, 0.0, ctx.fn(x) / x), None


def _attention_sdpa(made: ModelSpec, layer: _Layer, index: int, x: torch.Tensor, backward: Backward,
                    reads: dict | None = None) -> torch.Tensor:
    """The attention sublayer of ``differentiable`` (causal, no cached positions), its softmax and
    products in torch's fused attention: constant factors on q·k and pattern · v scale what q, k
    and v receive (q: pattern factor × q factor), so that no pattern is ever stored."""
    cfg = made.cfg
    n, s, _ = x.shape
    H, e = cfg.n_heads, cfg.d_head
    G = cfg.n_key_value_heads or H
    qkv = _qkv(layer, _apply_norm(layer.ln1, x, backward.scale_held), H + 2 * G, e)
    if reads is not None:
        reads[("qkv", index)] = qkv
    q, k, v = qkv[:, :, :H], qkv[:, :, H:H + G], qkv[:, :, H + G:]
    if layer.rotary is not None:
        tables = layer.rotary if s <= len(layer.rotary[0]) else lens.rotary_tables(made.model, index, s)
        cos, sin = (t[:s].to(x.dtype) for t in tables)
        q = rotate(q, cos, sin, cfg.rotary_adjacent_pairs)
        k = rotate(k, cos, sin, cfg.rotary_adjacent_pairs)
    q = _scaled(q, backward.pv[0] * backward.qk[0]).transpose(1, 2)  # [n, H, s, e]
    k = _scaled(k, backward.pv[0] * backward.qk[1]).transpose(1, 2)  # [n, G, s, e]
    v = _scaled(v, backward.pv[1]).transpose(1, 2)
    if G != H:  # each key/value head read by R = H / G query heads, as a view (faster than enable_gqa)
        k, v = (t[:, :, None].expand(n, G, H // G, s, e).reshape(n, H, s, e) for t in (k, v))
    z = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         scale=1.0 / layer.attn_scale)  # [n, H, s, e]
    if reads is not None:
        reads[("z", index)] = z.detach().transpose(1, 2)  # [n, s, H, e]
    return torch.addmm(layer.b_O, z.transpose(1, 2).reshape(n * s, H * e), layer.W_O).view(n, s, -1)


def differentiable(model: Model | ModelSpec, tokens: torch.Tensor, backward: Backward = Backward(), *,
                   embed: torch.Tensor | None = None, watch=None, positions: torch.Tensor | None = None,
                   reads: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The forward from the weights with autograd on, for a model ``from_weights`` covers:
    ``(logits [n, s, d_vocab], inputs)``, ``inputs`` the input embeddings by node name (leaves that
    require grad: ``hook_embed``, ``hook_pos_embed``), so that the metric's backward leaves at each
    the gradient, or the rule set's modified gradient under ``backward``. ``tokens`` ``[n, s]``,
    causal attention over every position (right padding is never read by a real position); rotary
    models run past ``n_ctx`` (the rotation by the model's own formula), learned positions do not;
    ``embed`` ``[n, s, d]`` replaces the token embeddings. ``watch(name, tensor)`` sees each residual
    cut (``hook_resid_pre``, ``hook_resid_mid``, the last ``hook_resid_post``) as it is computed.
    ``positions`` ``[n]``: the logits of row i at ``positions[i]`` only, ``[n, d_vocab]`` (a metric of
    one position per row: the unembedding of the other positions is neither computed nor differentiated).
    ``reads`` (a dict, filled): per layer its residual in (``("x", l)``), every head's q, k and v before
    rotary (``("qkv", l)`` ``[n, s, H + 2G, e]``, in the autograd graph), the heads' outputs
    (``("z", l)``), the MLP's normed input (``("normed", l)``, in the graph), its residual in and out
    (``("mid", l)``, ``("mlp_out", l)``), and the last residual (``("final",)``, in the graph)."""
    made = as_spec(model)
    if not made.from_weights or made.layout != "decoder":
        raise GradGraphError("the differentiable forward from the weights covers the GPT-2 / Llama layout; this "
                             f"model has {'; '.join(made.problems + made.features) or 'an encoder layout'}")
    w, cfg = _weights(made.model), made.cfg
    s = tokens.shape[1]
    if w.W_pos is not None and s > len(w.W_pos):
        raise GradGraphError(f"{s} tokens, but the model's learned positions stop at {len(w.W_pos)}")
    token_embed = w.W_E[tokens] if embed is None else embed.detach().to(w.W_E.dtype)
    inputs = {names.name("embed"): token_embed.detach().clone().requires_grad_(True)}
    x = inputs[names.name("embed")]
    if w.W_pos is not None:
        inputs[names.name("pos_embed")] = w.W_pos[:s][None].expand(len(tokens), -1, -1).detach().clone().requires_grad_(True)
        x = x + inputs[names.name("pos_embed")]
    see = watch or (lambda name, tensor: None)
    for index, layer in enumerate(w.layers):
        see(names.name("resid_pre", index), x)
        mid = x + _attention_sdpa(made, layer, index, x, backward, reads)
        see(names.name("resid_mid", index), mid)
        normed = _apply_norm(layer.ln2, mid, backward.scale_held)
        out = _mlp(cfg, layer, normed, backward)
        if reads is not None:
            reads.update({("x", index): x.detach(), ("normed", index): normed, ("mid", index): mid.detach(),
                          ("mlp_out", index): out.detach()})
        x = mid + out
    see(names.name("resid_post", len(w.layers) - 1), x)
    if reads is not None:
        reads[("final",)] = x
    if positions is not None:
        x = x[torch.arange(len(x), device=x.device), positions]  # [n, d]
    model = made.model
    return torch.addmm(model.b_U.detach(), _apply_norm(w.ln_final, x, backward.scale_held).flatten(0, -2),
                       model.W_U.detach()).unflatten(0, x.shape[:-1]), inputs


def _norm_vjp(norm: _Norm, x: torch.Tensor, g_out: torch.Tensor, W: torch.Tensor | None = None,
              held: bool = False) -> torch.Tensor:
    """The norm's vector-Jacobian product at ``x`` ``[n, s, d]`` for J output gradients at once:
    ``g_out`` ``[n, s, J, d]``, or, with ``W`` ``[d, J, e]``, ``g_out`` ``[n, s, J, e]`` at ``normed @ W``.
    With xc = x centred (LayerNorm) or x, r = (mean xc² + ε)^(−½) and a = w ⊙ (W g) the gradient at
    the unit-scale output: ``r (a − mean a) − (r³ / d)(xc · a) xc`` (no mean term without centring,
    no last term with the scale held). With W, r and the mean go into the product and the dot
    products through W (``[n, s, J, e]``): the one ``[n, s, J, d]`` tensor is formed once, updated in
    place once."""
    d = x.shape[-1]
    centre = norm.kind in ("LN", "LNPre")
    xc = x - x.mean(-1, keepdim=True) if centre else x
    r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + norm.eps)[..., None]  # [n, s, 1, 1]
    if W is None:
        a = g_out * norm.w if norm.w is not None else g_out
        dot = None if held else torch.einsum("nsd,nsjd->nsj", xc, a)[..., None]
        out = (a - a.mean(-1, keepdim=True) if centre else a) * r
    else:  # r and the centring (W's columns less their mean over d) go into the product
        Ww = W * norm.w[:, None, None] if norm.w is not None else W  # [d, J, e]
        dot = None if held else (torch.einsum("nsd,dje->nsje", xc, Ww) * g_out).sum(-1)[..., None]
        out = torch.einsum("nsje,dje->nsjd", g_out * r, Ww - Ww.mean(0) if centre else Ww)
    if dot is not None:
        out.addcmul_(dot * r.pow(3) / d, xc[:, :, None], value=-1.0)
    return out


def reader_gradients(made: ModelSpec, reads: dict, grads: dict, backward: Backward = Backward()) -> dict[str, torch.Tensor]:
    """What the metric's gradient (under ``backward``) is at every head's query, key and value input
    (its own copy of the residual, before ``ln1``: ``[n, s, H | G, d]``) and every MLP's input (before
    ``ln2``), from ``differentiable``'s ``reads`` and the gradients ``grads`` at its ``qkv`` and
    ``normed`` tensors: ``g_j = J_ln1(x)ᵀ (W_qkv[j] g_qkv[j])`` for each head slot j, all slots at once
    (``_norm_vjp``; the norm's scale held where ``backward`` holds it). By node name."""
    w, cfg = _weights(made.model), made.cfg
    H, e = cfg.n_heads, cfg.d_head
    G = cfg.n_key_value_heads or H
    out = {}
    for index, layer in enumerate(w.layers):
        x = reads[("x", index)]
        W = layer.W_qkv.view(x.shape[-1], H + 2 * G, e)
        g = _norm_vjp(layer.ln1, x, grads[("qkv", index)], W, backward.scale_held)  # [n, s, J, d]
        out[names.name("q_input", index)] = g[:, :, :H]
        out[names.name("k_input", index)] = g[:, :, H:H + G]
        out[names.name("v_input", index)] = g[:, :, H + G:]
        out[names.name("mlp_in", index)] = _norm_vjp(layer.ln2, reads[("mid", index)], grads[("normed", index)][:, :, None],
                                                     held=backward.scale_held)[:, :, 0]
    return out


TRACED = ("resid_pre", "attn_out", "resid_mid", "mlp_out")
HEADS_TRACED = ("q", "k", "v", "z")


def as_spec(model_or_spec: Model | ModelSpec) -> ModelSpec:
    return model_or_spec if isinstance(model_or_spec, ModelSpec) else spec(model_or_spec)


@torch.no_grad()
def run(model: Model | ModelSpec, tokens: torch.Tensor | None = None, *, resid: torch.Tensor | None = None,
        first_layer: int = 0, edits=(), embed: torch.Tensor | None = None, clean_before: tuple | None = None,
        shared: KeysValues | None = None, past: KeysValues | None = None, keep: bool = False,
        last_only: bool = False, trace: dict[str, list[torch.Tensor]] | None = None
        ) -> tuple[torch.Tensor, KeysValues | None]:
    """The one forward pass every rerun of the model goes through: the residual stream after the
    last layer (before ``ln_final``) for ``tokens`` ``[n, s]`` (no padding; ``embed`` ``[n, s, d]``
    replaces their token embeddings), or from ``resid`` ``[n, s, d_model]`` entering layer
    ``first_layer``, with ``edits`` (``Edit``\ s) made as the sites are computed.

    A model that ``ModelSpec.from_weights`` covers runs from its weights here; any other through
    TransformerLens' own forward, the same edits made by hooks (none outlives the call).

    ``clean_before=(kv, i)``: the positions before ``i`` are those of an unedited run whose keys and
    values ``kv`` (``keep=True``'s, for these rows) are given; only positions ``i..`` are returned
    (from the weights, only they are computed). From the weights only: positions after ``shared``
    (``[G, p0, e]``, every row's) then ``past`` (``[G, n, t, e]``, each row's own); ``keep``: also
    these positions' keys and values ``[G, n, s, e]`` (None through TransformerLens); ``last_only``:
    only the last position goes through the last layer (``[n, 1, d]``). ``trace`` collects each
    layer's ``TRACED`` activations ``[n, s, d]`` and q, k, v (before rotary), z ``[n, s, heads, e]``."""
    made = as_spec(model)
    by_site = _by_site(edits)
    if not made.from_weights:
        if shared is not None or past is not None or last_only:
            raise GradGraphError("a forward from cached keys and values needs a model the weights path covers "
                                 f"(this one has {'; '.join(made.problems + made.features)})")
        return _hooked(made, tokens, resid, first_layer, by_site, embed, clean_before, trace), None
    if clean_before is not None:
        kv, i = clean_before
        past = KeysValues([k[:, :, :i] for k in kv.keys], [v[:, :, :i] for v in kv.values])
        tokens = None if tokens is None else tokens[:, i:]
        resid = None if resid is None else resid[:, i:]
        embed = None if embed is None else embed[:, i:]
    return _from_weights(made, tokens, resid, first_layer, by_site, embed, shared, past, keep, last_only, trace)


def _from_weights(made: ModelSpec, tokens, resid, first_layer, edits, embed, shared, past, keep, last_only, trace):
    w, cfg = _weights(made.model), made.cfg
    start = (0 if shared is None else shared.length) + (0 if past is None else past.length)
    if resid is None:
        s = tokens.shape[1]
        x = w.W_E[tokens] if embed is None else embed.to(w.W_E.dtype)
        if w.W_pos is not None:
            x = x + w.W_pos[start:start + s][None]
    else:
        x = resid
    kept = KeysValues([], []) if keep else None
    last = len(w.layers) - 1
    for index in range(first_layer, len(w.layers)):
        layer = w.layers[index]
        x = _edited(x, edits.get((index, "resid_pre"), []), start)
        attn, k, v = _attention(cfg, layer, index, x, start,
                                None if shared is None else (shared.keys[index], shared.values[index]),
                                None if past is None else (past.keys[index], past.values[index]), edits, trace)
        if kept is not None:
            kept.keys.append(k)
            kept.values.append(v)
        if index == last and last_only:  # later positions never read this layer's output
            x, attn = x[:, -1:], attn[:, -1:]
        mid = x + attn
        out = _mlp(cfg, layer, _apply_norm(layer.ln2, _edited(mid, edits.get((index, "mlp_in"), []), start)))
        out = _edited(out, edits.get((index, "mlp_out"), []), start)
        if trace is not None:
            for kind, value in zip(TRACED, (x, attn, mid, out)):
                trace.setdefault(kind, []).append(value)
        x = mid + out
    return x, kept


def _hooked(made: ModelSpec, tokens, resid, first_layer, edits, embed, clean_before, trace) -> torch.Tensor:
    """``run`` through TransformerLens' forward: each edited site's hook point makes its edits."""
    model = made.model
    replacements = {} if embed is None else {names.inputs(model)[0]: embed}
    for (layer, site), listed in edits.items():
        replacements[names.name(site, layer)] = lambda value, listed=listed: _edited(value, listed, 0)
    wanted = set() if trace is None else {names.name(kind, layer) for kind in TRACED + HEADS_TRACED
                                          for layer in range(first_layer, made.n_layers)}
    split = any(site in ("q_input", "k_input", "v_input", "mlp_in") for _, site in edits)
    with (contextlib.nullcontext() if split else hooks.plain_forward(model)), hooks.replacing(model, replacements), \
            hooks.recording(model, names=wanted) as store:
        final = hooks.final_residual(model, resid if resid is not None else tokens,
                                     start_at_layer=first_layer if resid is not None else None)
    if trace is not None:
        for kind in TRACED + HEADS_TRACED:  # each traced kind is its hook point's name
            for layer in range(first_layer, made.n_layers):
                tensors = store.get(names.name(kind, layer))
                if tensors:
                    trace.setdefault(kind, []).append(tensors[0])
    return final if clean_before is None else final[:, clean_before[1]:]


def logits(model: Model | ModelSpec, resid: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The logits, as the model returns them, of the vocabulary entries ``ids`` (None: all) for a
    final residual ``[..., d]``: ``ln_final``, the unembedding, and the soft cap where the model has one."""
    made = as_spec(model)
    model = made.model
    W_U, b_U = (model.W_U, model.b_U) if ids is None else (model.W_U[:, ids], model.b_U[ids])
    if made.from_weights:
        return _apply_norm(_weights(model).ln_final, resid) @ W_U + b_U
    normed = resid if made.final_norm is None else made.final_norm(resid)
    out = normed @ W_U + b_U
    cap = soft_cap(made.cfg.output_logits_soft_cap)
    return out if cap is None else cap * torch.tanh(out / cap)


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
                outputs.append(logits(model, resid[:, -1], ids))
            else:
                kept.append(kv if past is None else past.then(kv))
        if final:
            return torch.cat(outputs)[groups_next]
        stored = KeysValues([torch.cat([kv.keys[i] for kv in kept], 1) for i in range(len(w.layers))],
                            [torch.cat([kv.values[i] for kv in kept], 1) for i in range(len(w.layers))])
        groups = groups_next
    raise AssertionError("unreachable: the last span ends at the rows' length")


def _fallback(model, rows: torch.Tensor, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Through TransformerLens' forward, for architectures the weights path does not cover."""
    return torch.cat([logits(model, run(model, rows[begin:begin + batch_size])[0][:, -1], ids)
                      for begin in range(0, rows.shape[0], batch_size)])


__all__ = ["Backward", "Edit", "KeysValues", "SITES", "TRACED", "differentiable", "last_logits", "logits", "run",
           "supported"]
