"""The op emitters every layout shares: the ``Assembly`` being built, norms, linear maps, residual
sums, soft caps, and the sublayers made of them (attention, the MLP, the final norm, the logits and
the metric). Each emitter adds its ops' blocks, as the ``RuleSet`` gives them, and returns the node
its output lands on, a named site (``gradgraph.arch.names``) where later nodes attach."""

from __future__ import annotations

import einops
import torch

from gradgraph.arch import lens, names, recorded
from gradgraph.arch.features import POST_NORM, soft_cap
from gradgraph.arch.spec import spec
from gradgraph.build.record import Recording
from gradgraph.errors import GradGraphError
from gradgraph.graph import Block, Broadcast, Diag, Identity, Matmul, Place, Reshape
from gradgraph.rules import NormOp, RuleSet, SoftmaxOp, SumOp
from gradgraph.weights import Lazy, Weight, lazily, model_weights, shared_weight


class Assembly:
    """The nodes and blocks assembled so far, and what they are built from."""

    def __init__(self, recording: Recording, rules: RuleSet, head_mask: torch.Tensor | None):
        self.rec, self.rules, self.head_mask = recording, rules, head_mask
        self.model, self.spec = recording.model, spec(recording.model)
        self.cfg = self.spec.cfg
        self.valid = recording.attention_mask.bool()  # [B, P]
        self.unpadded = bool(self.valid.all())  # the masks then only repeat what −inf made 0 in the patterns
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.order: list[str] = []
        self.blocks: list[Block] = []
        self.stored: dict[str, torch.Tensor] = {}
        self.weights = model_weights(self.model)
        self.prefix = 0 if recording.prefix is None else len(recording.prefix)
        self.encoder = self.spec.layout == "encoder"  # post-LN blocks around the residual sums, attention both ways
        self.masks: dict[int | None, tuple] = {}  # attention masks by local window (None: global)

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


def norm_weight(module) -> torch.Tensor | None:
    return module.w.detach() if hasattr(module, "w") else None


def norm(asm: Assembly, prefix: str, x: str, layer: int | None, module, firing: str | None = None) -> str:
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


def norm_out(asm: Assembly, prefix: str, x: str, layer: int, module, out: str) -> str:
    """A norm whose weight no linear map takes up (after attention or the MLP, on q and k, SoLU's):
    ``out = normalized ⊙ w + b``, a diagonal; returns ``out``'s node (its tensor recorded or formed)."""
    y = norm(asm, prefix, x, layer, module)
    w = norm_weight(module)
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


def linear(asm: Assembly, src: str, tgt: str, layer: int | None, weight: Weight, src_pattern: str,
            tgt_pattern: str, axes: dict) -> str:
    block = Matmul(src, tgt, "linear", layer, weight, True, src_pattern, tgt_pattern, axes)
    asm.add_derived("linear", (src, tgt), lambda: asm.rules.linear(block, asm.stored[src], asm.stored[tgt]))
    return tgt


def residual_sum(asm: Assembly, sources: tuple[str, ...], target: str, layer: int | None) -> None:
    asm.add(asm.rules.residual(SumOp(sources, target, tuple(asm.stored[n] for n in sources), layer)))


def _kv_weight(attn, which: str) -> torch.Tensor:
    """W_K / W_V with one matrix per key/value head (grouped-query attention keeps them unrepeated)."""
    grouped = getattr(attn, f"_W_{which}", None)
    return grouped if grouped is not None else getattr(attn, f"W_{which}")


def attention(asm: Assembly, layer: int, resid: str) -> str:
    """ln1, q/k/v, q/k norms, rotary, scores (soft-capped), pattern, z and attn_out of one layer (a
    norm after it); returns attn_out's node."""
    cfg, block = asm.cfg, asm.spec.blocks[layer]
    attn = block.attn
    B, P = asm.valid.shape
    H = cfg.n_heads
    G = cfg.n_key_value_heads or H
    R = H // G
    before, after, after_prefix = _norms_around(asm, block, "1")
    w1 = None if before is None else norm_weight(before)
    matrices = {"q": lambda: attn.W_Q, "k": lambda: _kv_weight(attn, "K"), "v": lambda: _kv_weight(attn, "V")}
    proj = {}
    for firing, copies in (("q", H), ("k", G), ("v", G)):
        inp = asm.node(names.name(f"{firing}_input", layer))
        asm.add([Broadcast(resid, inp, "copy", layer, 2, copies)])
        y = inp if before is None else norm(asm, "ln1", inp, layer, before, firing)

        def folded(firing=firing):
            W = matrices[firing]().detach()
            return W if w1 is None else w1[None, :, None] * W

        out = asm.node(names.name(firing, layer))
        weight = asm.shared((f"W_{firing.upper()}", layer), folded)
        proj[firing] = linear(asm, y, out, layer, weight, "b p h d -> h (b p) d", "b p h e -> h (b p) e",
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
    window = cfg.window_size if getattr(attn, "attn_type", "global") == "local" else None
    causal, allowed, keys = _masks(asm, window, rq.device)
    scores = names.name("attn_scores", layer)
    cap = soft_cap(cfg.attn_scores_soft_cap)
    pattern = names.name("pattern", layer)
    made = None  # a long prompt's scores and pattern are not recorded: formed from q and k whenever read
    if pattern not in asm.rec.activations:  # masked as TransformerLens masks them (padded keys: with a prefix, encoders)
        tl_mask = causal[None, None] & keys[:, None, None, :] if p0 or asm.encoder else causal[None, None]
        made = _attention_maps(rq, rk, attn.attn_scale, cap, tl_mask)
    if cap is None:
        raw = asm.node(scores, None if made is None else made["scores"])
    else:
        raw = asm.node(names.name("scores_raw", layer), _raw_scores(rq, rk, attn.attn_scale)
                       if made is None else made["raw"])
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
        asm.node(scores, None if made is None else made["scores"])
        _soft_capped(asm, raw, scores, layer, cap, allowed)
    # pattern = softmax(scores)
    asm.node(pattern, None if made is None else made["pattern"])
    asm.add_derived("softmax", (scores, pattern), lambda: asm.rules.softmax(
        SoftmaxOp(scores, pattern, asm.stored[pattern], allowed, layer, asm.stored[scores], exact=asm.unpadded)))
    # z = pattern · v; padded queries carry nothing, nor (Mask-LRP) the heads the mask leaves out
    z = asm.node(names.name("z", layer))
    f_p, f_v = asm.rules.bilinear("pv")
    z_mask = asm.valid[:, :, None, None]  # [B, q, 1, 1]
    if asm.head_mask is not None:
        z_mask = z_mask & asm.head_mask[layer].to(z_mask.device)[None, None, :, None]  # [B, q, H, 1]
        if not bool(asm.head_mask[layer].any()):  # no head passes anything: no block, and no pass does the work
            f_p = f_v = 0
    v_canon = einops.rearrange(v, "b k g e -> (b g) k e", g=G)
    p_canon = lazily(lambda p: einops.rearrange(p, "b (g r) q k -> (b g) (r q) k", g=G, r=R), asm.stored[pattern],
                     shape=(B * G, R * P, p0 + P))
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


def _masks(asm: Assembly, window: int | None, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(causal [q, k], allowed [B, 1, q, k], keys [B, k])`` for layers with this local ``window``
    (None: global), made once per graph: the (query, key) pairs that are not constants (causal, in
    the window, neither padded) and the keys that are real tokens."""
    if window not in asm.masks:
        B, P = asm.valid.shape
        p0 = asm.prefix
        query_at = torch.arange(p0, p0 + P, device=device)[:, None]
        key_at = torch.arange(p0 + P, device=device)[None, :]
        causal = (key_at <= query_at) | asm.encoder  # [q, k]
        if window is not None:
            causal = causal & (key_at > query_at - window)
        keys = torch.cat([asm.valid.new_ones(B, p0), asm.valid], 1)
        allowed = causal[None, None] & asm.valid[:, None, :, None] & keys[:, None, None, :]  # [B, 1, q, k]
        asm.masks[window] = causal, allowed, keys
    return asm.masks[window]


def _raw_scores(rq: torch.Tensor, rk: torch.Tensor, scale: float) -> torch.Tensor:
    """q·k / attn_scale ``[B, H, q, k]`` from queries ``[B, q, H, e]`` and keys ``[B, k, G, e]``."""
    return recorded.attention_scores(rq.transpose(1, 2), rk.transpose(1, 2), scale)


def _attention_maps(rq: torch.Tensor, rk: torch.Tensor, scale: float, cap: float | None,
                    mask: torch.Tensor) -> dict[str, Lazy]:
    """The raw scores, the scores (soft-capped; −inf where ``mask`` [B or 1, 1, q, k] is False, as
    TransformerLens masks them) and the pattern of one layer, each formed when it is read."""
    B, Q, H, _ = rq.shape
    shape = (B, H, Q, rk.shape[1])

    def masked(raw: torch.Tensor) -> torch.Tensor:
        capped = raw if cap is None else cap * torch.tanh(raw / cap)
        return capped.masked_fill(~mask, float("-inf"))

    def softmax(s: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(s, -1)
        return torch.where(torch.isnan(p), torch.zeros((), dtype=p.dtype, device=p.device), p)  # no key allowed

    raw = Lazy(lambda: _raw_scores(rq, rk, scale), shape, rq.dtype, rq.device)
    scores = lazily(masked, raw)
    return dict(raw=raw, scores=scores, pattern=lazily(softmax, scores))


def _norms_around(asm: Assembly, block, which: str) -> tuple:
    """``(norm before, norm after, the latter's node prefix)`` for attention (``which="1"``) or the
    MLP (``"2"``): pre-norm ``ln1``/``ln2`` (and Gemma 2's ``ln1_post``/``ln2_post`` after); OLMo-2's
    ``ln1``/``ln2`` after only; none for an encoder, whose norms sit after the residual sums."""
    own = getattr(block, f"ln{which}", None)
    if asm.encoder:
        return None, None, None
    if asm.cfg.original_architecture in POST_NORM:
        return None, own, f"ln{which}"
    return own, getattr(block, f"ln{which}_post", None), f"ln{which}_post"


def _written(asm: Assembly, src: str, layer: int, weight: Weight, rows: tuple, out: str, raw: str, after,
             prefix: str | None, raw_value) -> str:
    """A sublayer's output map ``src → out`` (``hook_attn_out``, ``hook_mlp_out``): straight, or into
    ``raw`` (its tensor ``raw_value()``) and through the norm ``after`` when the model has one there."""
    if after is None:
        return linear(asm, src, asm.node(out), layer, weight, *rows)
    node = asm.node(raw, raw_value())
    linear(asm, src, node, layer, weight, *rows)
    return norm_out(asm, prefix, node, layer, after, out)


def _qk_norm(asm: Assembly, layer: int, which: str, src: str, module) -> str:
    """The q (or k) norm: ``src`` ``[B, P, heads, e]`` reshaped as TransformerLens normalises it
    (rows of ``e``: Qwen3; rows of ``heads · e``: OLMo-2), normalised, weighted, reshaped back."""
    prefix = f"{which}_norm"
    shape = tuple(asm.rec.activations[names.name(f"{prefix}_normalized", layer)].shape)
    heads_shape = asm.shapes[src]
    inp = asm.node(names.name(f"{prefix}_input", layer), asm.stored[src].reshape(shape))
    asm.add([Reshape(src, inp, "copy", layer, heads_shape, shape)])
    out = norm_out(asm, prefix, inp, layer, module, names.name(f"{prefix}_output", layer))
    normed = asm.node(names.name(f"{which}_normed", layer), asm.stored[out].reshape(heads_shape))
    asm.add([Reshape(out, normed, "copy", layer, shape, heads_shape)])
    return normed


def _soft_capped(asm: Assembly, raw: str, capped: str, layer: int | None, cap: float,
                 mask: torch.Tensor | None = None) -> None:
    """``capped = cap · tanh(raw / cap)``, an element-wise function (Gemma 2's scores and logits)."""
    fn = lambda x: cap * torch.tanh(x / cap)  # noqa: E731
    slope = lazily(lambda x: asm.rules.activation(fn, x), asm.stored[raw])
    asm.add([Diag(raw, capped, "activation", layer, ((Weight(slope) if mask is None else Weight(slope, mask), None),))])


def _after_cache(asm: Assembly, own: str, which: str, layer: int) -> str:
    """The node of the cached prefix's keys (or values) followed by this run's, ``[B, p0 + P, G, e]``."""
    cached = asm.node(names.name(f"cached_{which}", layer))
    both = torch.cat([asm.stored[cached], asm.stored[own]], 1)
    full = asm.node(names.name(f"all_{which}", layer), both)
    p0, n = asm.prefix, both.shape[1]
    asm.add([Place(cached, full, "copy", layer, 1, 0, p0, n), Place(own, full, "copy", layer, 1, p0, n - p0, n)])
    return full


def _rotary(asm: Assembly, attn, src: str, tgt: str, layer: int, start: int = 0) -> str:
    """rot = x cos + rotate(x) sin on the first rotary_dim dims; the rest pass through. ``x``'s
    first position is position ``start`` (after a cached prefix)."""
    x = asm.stored[src]  # [B, P, heads, e]
    P, e = x.shape[1], x.shape[-1]
    rd = asm.cfg.rotary_dim
    cos = torch.ones(P, e, dtype=x.dtype, device=x.device)
    sin = torch.zeros(P, e, dtype=x.dtype, device=x.device)
    tables = (attn.rotary_cos, attn.rotary_sin)
    if start + P > len(tables[0]):  # past the tables the model keeps, by its own formula
        tables = lens.rotary_tables(asm.model, layer, start + P)
    cos[:, :rd] = tables[0][start:start + P].to(x.dtype)
    sin[:, :rd] = tables[1][start:start + P].to(x.dtype)
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


def mlp(asm: Assembly, layer: int, mlp_in: str) -> str:
    """ln2, the (gated) MLP and its output (a norm after it); returns mlp_out's node."""
    cfg, block = asm.cfg, asm.spec.blocks[layer]
    mlp = block.mlp
    B, P = asm.valid.shape
    before, after, after_prefix = _norms_around(asm, block, "2")  # an encoder's MLP reads ln1's output
    y = mlp_in if before is None else norm(asm, "ln2", mlp_in, layer, before)
    w2 = None if before is None else norm_weight(before)

    def folded(matrix):
        return lambda: matrix.detach() if w2 is None else w2[:, None] * matrix.detach()

    rows = ("b p d -> 1 (b p) d", "b p m -> 1 (b p) m", dict(b=B, p=P))
    pre = asm.node(names.name("mlp_pre", layer))
    W_pre = asm.shared(("W_gate" if cfg.gated_mlp else "W_in", layer),
                       lambda: folded(mlp.W_gate if cfg.gated_mlp else mlp.W_in)()[None])
    linear(asm, y, pre, layer, W_pre, *rows)
    pre_act = asm.stored[pre]
    post = names.name("mlp_post", layer)
    if cfg.act_fn == "solu_ln":
        _solu(asm, layer, pre, mlp, post)
    elif cfg.gated_mlp:
        slope = asm.rules.activation(mlp.act_fn, pre_act)
        lin = asm.node(names.name("mlp_pre_linear", layer))
        linear(asm, y, lin, layer, asm.shared(("W_in", layer), lambda: folded(mlp.W_in)()[None]), *rows)
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


def _solu(asm: Assembly, layer: int, pre: str, mlp, post: str) -> None:
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
    norm_out(asm, "mlp_ln", mid, layer, mlp.ln, post)


def final_norm(asm: Assembly, resid: str) -> str:
    """ln_final into ``unembed.hook_in``; returns its node."""
    y = norm(asm, "ln_final", resid, None, asm.spec.final_norm) if asm.cfg.normalization_type else resid
    unembed_in = asm.node(names.name("unembed_in"))
    wf = norm_weight(asm.spec.final_norm) if asm.cfg.normalization_type else None
    if wf is None:
        asm.add([Identity(y, unembed_in, "linear" if y != resid else "copy", None)])
    else:  # y * w + b
        asm.add([Diag(y, unembed_in, "linear", None, ((Weight(wf), None),))])
    return unembed_in


def unembed(asm: Assembly, unembed_in: str) -> None:
    """The logits the metric reads (soft-capped), and the metric."""
    B, P = asm.valid.shape
    ids = asm.rec.logit_ids
    logits = asm.node(names.name("logits"))
    W_U = Weight(asm.model.W_U.detach()[:, ids][None])
    linear(asm, unembed_in, logits, None, W_U, "b p d -> 1 (b p) d", "b p v -> 1 (b p) v", dict(b=B, p=P))
    cap = soft_cap(asm.cfg.output_logits_soft_cap)
    if cap is not None:
        capped = asm.node(names.name("logits_capped"))
        _soft_capped(asm, logits, capped, None, cap)
        logits = capped
    metric = asm.node(names.name("metric"), asm.rec.metric_value)
    g = asm.rec.grad_logits.reshape(B, -1, 1)  # [B, P * V', 1]
    asm.add([Matmul(logits, metric, "metric", None, Weight(g), True, "b p v -> b 1 (p v)", "b -> b 1 1",
                    dict(b=B, p=P))])


__all__ = ["Assembly", "attention", "final_norm", "linear", "mlp", "norm", "norm_out", "norm_weight",
           "residual_sum", "unembed"]
