"""A layer's attention: ln1, the q/k/v maps, q/k norms, a cached prefix's keys and values, rotary,
the scores (soft-capped), the softmax, pattern · v and the output map. A long prompt's layer (its
patterns not recorded) is also a ``gradgraph.chunked.Region``: its blocks between q, k, v and z
made for a chunk of query rows at a time."""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch

from gradgraph.arch import lens, memory, names, recorded
from gradgraph.arch.features import soft_cap
from gradgraph.build.emit import Assembly, linear, nonzero, norm, norm_out, norm_weight, norms_around, soft_capped, written
from gradgraph.chunked import Region
from gradgraph.graph import Block, Broadcast, Contract, Diag, Matmul, Place, Rank1, Reshape, Spread
from gradgraph.rules import RuleSet, SoftmaxOp
from gradgraph.weights import Lazy, Weight, lazily


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
    before, after, after_prefix = norms_around(asm, block, "1")
    w1 = None if before is None else norm_weight(before)
    matrices = {"q": lambda: attn.W_Q, "k": lambda: _kv_weight(attn, "K"), "v": lambda: _kv_weight(attn, "V")}
    proj = {}
    for firing, copies in (("q", H), ("k", G), ("v", G)):
        inp = asm.node(names.name(f"{firing}_input", layer))
        asm.add([Broadcast(resid, inp, "copy", layer, 2, copies)])
        start, first = len(asm.blocks), len(asm.order)
        y = inp if before is None else norm(asm, "ln1", inp, layer, before, firing)
        if y != inp and _one_per_copy(asm.blocks[start:], 2, len(asm.shapes[inp])):
            asm.copies.append((y, 2, (inp, *asm.order[first:])))

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
    # scores = q·k / attn_scale (then cap · tanh(· / cap)); causally masked, out-of-window and padded
    # scores are constants
    window = cfg.window_size if getattr(attn, "attn_type", "global") == "local" else None
    allowed, hidden, keyed_rows = _masks(asm, window, rq.device)
    cap = soft_cap(cfg.attn_scores_soft_cap)
    scores, pattern = names.name("attn_scores", layer), names.name("pattern", layer)
    raw = scores if cap is None else names.name("scores_raw", layer)
    made = None  # a long prompt's scores and pattern are not recorded: formed from q and k whenever read
    if pattern not in asm.rec.activations:
        made = _attention_maps(rq, rk, attn.attn_scale, cap, hidden, keyed_rows)
    if cap is not None:
        asm.node(raw, _raw_scores(rq, rk, attn.attn_scale) if made is None else made["raw"])
    asm.node(scores, None if made is None else made["scores"])
    asm.node(pattern, None if made is None else made["pattern"])
    z = asm.node(names.name("z", layer))
    # z = pattern · v; padded queries carry nothing, nor (Mask-LRP) the heads the mask leaves out
    z_mask = asm.valid[:, :, None, None]  # [B, q, 1, 1]
    f_p, f_v = asm.rules.bilinear("pv")
    if asm.head_mask is not None:
        z_mask = z_mask & asm.head_mask[layer].to(z_mask.device)[None, None, :, None]  # [B, q, H, 1]
        if not bool(asm.head_mask[layer].any()):  # no head passes anything: no block, and no pass does the work
            f_p = f_v = 0
    inside = _Inside(layer, q_name, k_name, v_name, raw, scores, pattern, z, asm.rules, attn.attn_scale, cap, G,
                     asm.unpadded, (*asm.rules.bilinear("qk"), f_p, f_v))
    tensors = {n: asm.stored[n] for n in (raw, scores, pattern)}
    blocks = inside.blocks(rq, rk, v, tensors, allowed, z_mask, lambda make: asm.derived("softmax", (scores, pattern), make))
    asm.add(blocks)
    if made is not None and blocks:
        def chunk(rows: slice, n_keys: int) -> list[Block]:
            q, k = rq[:, rows], rk[:, :n_keys]
            maps = _maps(q, k, attn.attn_scale, cap, hidden[:, :, rows, :n_keys], keyed_rows)
            return inside.blocks(q, k, v[:, :n_keys], {getattr(inside, n): t for n, t in maps.items()},
                                 allowed[:, :, rows, :n_keys], z_mask[:, rows], chunked=True)

        K = rk.shape[1]
        reads = (lambda end: K) if asm.encoder else (lambda end: p0 + end)  # a causal row reads the keys up to its own
        asm.regions.append(Region(layer, q_name, (k_name, v_name), tuple(dict.fromkeys((raw, scores, pattern))), z,
                                  tuple(blocks), chunk, P, memory.chunk_rows(B, H, P, K), reads))
    # attn_out = Σ_h z_h W_O[h] (+ b_O)
    W_O = asm.shared(("W_O", layer), lambda: attn.W_O.detach().reshape(1, -1, cfg.d_model))
    return written(asm, z, layer, W_O, ("b p h e -> 1 (b p) (h e)", "b p d -> 1 (b p) d", dict(b=B, p=P, h=H)),
                   names.name("attn_out", layer), names.name("attn_raw", layer), after, after_prefix,
                   lambda: asm.stored[z].flatten(2) @ attn.W_O.detach().reshape(-1, cfg.d_model) + attn.b_O.detach())


@dataclass(frozen=True)
class _Inside:
    """One layer's attention between its q, k, v nodes and z: the nodes, what the blocks are made of
    and the rule set's factors (q, k of q·k; pattern, v of pattern · v), enough to make the blocks
    of every query row, or of a chunk of rows (``gradgraph.chunked``)."""

    layer: int
    q: str
    k: str
    v: str
    raw: str  # the scores before a soft cap (the scores themselves without one)
    scores: str
    pattern: str
    z: str
    rules: RuleSet
    scale: float
    cap: float | None
    groups: int
    exact: bool  # no padding: p is exactly 0 outside the allowed pairs
    factors: tuple[float, float, float, float]

    def blocks(self, rq: torch.Tensor, rk: torch.Tensor, v: torch.Tensor, tensors: dict, allowed: torch.Tensor,
               z_mask: torch.Tensor, softmax=lambda make: make(), chunked: bool = False) -> list[Block]:
        """The blocks for queries ``rq`` ``[B, Q, H, e]``, keys ``rk`` and values ``v`` ``[B, K, G, e]``;
        ``tensors``: the raw scores, scores and pattern ``[B, H, Q, K]`` by node (tensors or lazy),
        ``allowed`` ``[B, 1, Q, K]``, ``z_mask`` ``[B, Q, 1 or H, 1]``; ``softmax(make)`` gives the
        softmax's blocks (the full graph's are made once per recording). ``chunked``: a region's
        (``gradgraph.chunked``), whose scores no pass keeps or visits: q·k's blocks then need no mask
        of the allowed pairs, since every softmax rule's (and a soft cap's) weights vanish outside
        them, so nothing reaches or leaves a masked score (one select per block and pass fewer)."""
        G, layer = self.groups, self.layer
        B, Q, H, _ = rq.shape
        R = H // G
        axes = dict(g=G, r=R, b=B)
        f_q, f_k, f_p, f_v = self.factors
        k_canon = einops.rearrange(rk, "b k g e -> (b g) e k", g=G)
        q_canon = einops.rearrange(rq, "b q (g r) e -> (b g) (r q) e", g=G, r=R)
        score_layout = "b (g r) q k -> (b g) (r q) k"
        scores_mask = None if chunked else allowed
        blocks = nonzero([
            (f_q, lambda: Matmul(self.q, self.raw, "bilinear", layer, Weight(k_canon, f_q / self.scale), True,
                                 "b q (g r) e -> (b g) (r q) e", score_layout, axes, scores_mask, self.k,
                                 "b k g e -> (b g) e k")),
            (f_k, lambda: Matmul(self.k, self.raw, "bilinear", layer, Weight(q_canon, f_k / self.scale), False,
                                 "b k g e -> (b g) e k", score_layout, axes, scores_mask, self.q,
                                 "b q (g r) e -> (b g) (r q) e")),
        ])
        if self.cap is not None:
            blocks.append(soft_capped(self.rules, self.raw, self.scores, layer, self.cap, tensors[self.raw], allowed))
        p = tensors[self.pattern]
        blocks += softmax(lambda: self.rules.softmax(
            SoftmaxOp(self.scores, self.pattern, p, allowed, layer, tensors[self.scores], exact=self.exact)))
        v_canon = einops.rearrange(v, "b k g e -> (b g) k e", g=G)
        p_canon = lazily(lambda t: einops.rearrange(t, "b (g r) q k -> (b g) (r q) k", g=G, r=R), p,
                         shape=(B * G, R * Q, rk.shape[1]))
        z_layout = "b q (g r) e -> (b g) (r q) e"
        return blocks + nonzero([
            (f_p, lambda: Matmul(self.pattern, self.z, "bilinear", layer, Weight(v_canon, f_p), True, score_layout,
                                 z_layout, axes, z_mask, self.v, "b k g e -> (b g) k e")),
            (f_v, lambda: Matmul(self.v, self.z, "bilinear", layer, Weight(p_canon, f_v, nonnegative=True), False,
                                 "b k g e -> (b g) k e", z_layout, axes, z_mask, self.pattern, score_layout)),
        ])


def _one_per_copy(blocks: list[Block], dim: int, ndim: int) -> bool:
    """Whether every weight of a norm's ``blocks`` has size one along node dim ``dim`` (of
    ``ndim``): the norm is then the same for every copy there."""
    for block in blocks:
        if not isinstance(block, (Diag, Contract, Spread, Rank1)):
            return False
        weights = [w for w, _ in block.parts] if isinstance(block, Diag) else \
            [block.a, block.b, block.c] if isinstance(block, Rank1) else [block.weight]
        for factor in (f for w in weights for f in w.factors):
            if isinstance(factor, Lazy):
                return False
            at = dim - (ndim - factor.ndim) if isinstance(factor, torch.Tensor) else -1
            if at >= 0 and factor.shape[at] != 1:
                return False
    return True


def _masks(asm: Assembly, window: int | None, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(allowed [B, 1, q, k], hidden [B or 1, 1, q, k], keyed)`` for layers with this local
    ``window`` (None: global), made once per graph: the (query, key) pairs that are not constants
    (causal, in the window, neither padded), those TransformerLens masks to −inf (not causal, out
    of the window; padded keys too with a prefix and in encoders), and whether every query has a
    key it does not mask."""
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
        seen = causal[None, None] & keys[:, None, None, :] if p0 or asm.encoder else causal[None, None]
        asm.masks[window] = allowed, ~seen, bool(seen.any(-1).all())
    return asm.masks[window]


def _raw_scores(rq: torch.Tensor, rk: torch.Tensor, scale: float) -> torch.Tensor:
    """q·k / attn_scale ``[B, H, q, k]`` from queries ``[B, q, H, e]`` and keys ``[B, k, G, e]``."""
    return recorded.attention_scores(rq.transpose(1, 2), rk.transpose(1, 2), scale)


def _attention_maps(rq: torch.Tensor, rk: torch.Tensor, scale: float, cap: float | None,
                    hidden: torch.Tensor, keyed: bool) -> dict[str, Lazy]:
    """The raw scores, the scores and the pattern of one layer (``_maps``), each formed when it is read."""
    B, Q, H, _ = rq.shape
    raw = Lazy(lambda: _raw_scores(rq, rk, scale), (B, H, Q, rk.shape[1]), rq.dtype, rq.device)
    scores = lazily(lambda t: _masked(t.clone() if cap is None else t, cap, hidden), raw)
    return dict(raw=raw, scores=scores, pattern=lazily(lambda t: _softmax(t, keyed), scores))


def _maps(rq: torch.Tensor, rk: torch.Tensor, scale: float, cap: float | None, hidden: torch.Tensor,
          keyed: bool) -> dict[str, torch.Tensor]:
    """The raw scores q·k / scale, the scores (soft-capped; −inf where ``hidden`` [B or 1, 1, q, k],
    as TransformerLens masks them) and the pattern ``[B, H, q, k]``, formed now (without a cap the
    raw scores are the scores, masked in place)."""
    raw = _raw_scores(rq, rk, scale)
    scores = _masked(raw, cap, hidden)
    return dict(raw=raw, scores=scores, pattern=_softmax(scores, keyed))


def _masked(raw: torch.Tensor, cap: float | None, hidden: torch.Tensor) -> torch.Tensor:
    """Soft-capped (a new tensor) or ``raw`` itself, −inf where ``hidden``."""
    capped = raw if cap is None else cap * torch.tanh(raw / cap)
    return capped.masked_fill_(hidden, float("-inf"))


def _softmax(scores: torch.Tensor, keyed: bool) -> torch.Tensor:
    """softmax over the keys; unless every row has a key (``keyed``), a row without one is zeros."""
    p = torch.softmax(scores, -1)
    return p if keyed else p.nan_to_num_(nan=0.0)


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



__all__ = ["attention"]
