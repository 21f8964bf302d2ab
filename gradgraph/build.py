"""build_graph: one forward pass with hooks on every hook point -> the gradient graph.

Canonical decomposition into ops (the top path and the entropy depend on it). Per layer L of a
pre-norm model, following TransformerLens' own computation with ``use_split_qkv_input``:

1. ``hook_resid_pre`` → ``hook_{q,k,v}_input``: per-head copies (Broadcast; n_heads copies for q,
   n_key_value_heads for k and v).
2. ``ln1`` on each copy (firing suffix ``:q``/``:k``/``:v``), as TransformerLens computes it:
   LayerNorm first centres, x̃ = x − mean(x) (node ``ln1.centered``, a shared linear map
   I − 11ᵀ/d); RMSNorm uses x̃ = x. Then ``hook_scale`` s = sqrt(mean(x̃²) + ε) (edges
   x̃_i → s: x̃_i/(d s)), and ``hook_normalized`` y = x̃ / s (edges x̃_j → y_j: 1/s and
   s → y_j: −x̃_j/s²). A norm's Jacobian is thus diagonal plus rank one through the scale node.
   The norm's weight w (and bias) is folded into the next linear map (W' = diag(w) W).
3. ``hook_q/k/v`` = y W_Q/W_K/W_V + b (shared linear maps per head / key-value head).
4. Rotary (Llama): ``hook_rot_q/k`` = q cos + rotate(q) sin: two diagonal parts per element.
5. ``hook_attn_scores`` = q·k / attn_scale: a bilinear product, one edge block from each operand
   (the other operand is the weight); causally masked scores are constants, not nodes.
6. ``hook_pattern`` = softmax(scores): a dense per-row Jacobian p_k'(δ_kk' − p_k).
7. ``hook_z`` = pattern · v: bilinear, one block from the pattern and one from v (grouped-query
   attention: a key/value head feeds each query head of its group).
8. ``hook_attn_out`` = Σ_h z_h W_O[h] + b_O (one shared linear map over (head, d_head)).
9. ``hook_resid_mid`` = resid_pre + attn_out; ``hook_mlp_in`` = resid_mid (Identity edges).
10. ``ln2`` as in 2 (no suffix); ``mlp.hook_pre`` = y W_in (gate: y W_gate) + b;
    ``mlp.hook_pre_linear`` = y W_in + b (gated MLPs); ``mlp.hook_post`` = act(pre)
    (× pre_linear): diagonal edges act'(pre)·pre_linear from pre and act(pre) from pre_linear.
11. ``hook_mlp_out`` = post W_out + b_out; ``hook_resid_post`` = resid_mid + mlp_out; the next
    layer's ``hook_resid_pre`` = this ``hook_resid_post`` (Identity).

Inputs are ``hook_embed`` (and ``hook_pos_embed``), added into ``blocks.0.hook_resid_pre``. After
the last layer: ``ln_final`` as in 2, ``unembed.hook_in`` = y ⊙ w + b (identity when the weight is
folded), the logits ``unembed.hook_out`` = x W_U + b_U (only the vocabulary columns the metric
depends on: no other logit lies on a path to it), and ``metric``: one op from the logits with
weights ∂metric/∂logits (by autograd).
"""

from __future__ import annotations

import einops
import torch
from transformer_lens import HookedTransformer

from gradgraph import hooks
from gradgraph.errors import GradGraphError
from gradgraph.graph import Broadcast, Diag, GradGraph, Identity, Matmul
from gradgraph.prompts import to_tokens


def check_supported(model: HookedTransformer) -> None:
    """Raise ``GradGraphError`` naming the first feature the graph builder does not cover."""
    if not isinstance(model, HookedTransformer):
        raise GradGraphError(f"build_graph needs a transformer_lens.HookedTransformer, got {type(model).__name__}")
    cfg = model.cfg
    problems = []
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        problems.append(f"normalization_type={cfg.normalization_type!r} (supported: LN, LNPre, RMS, RMSPre)")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r} (supported: standard, rotary)")
    flags = {
        "parallel_attn_mlp": "parallel attention and MLP",
        "attn_only": "attention-only blocks",
        "use_normalization_before_and_after": "post-norm (normalization before and after)",
        "use_qk_norm": "q/k normalisation",
        "use_attention_sinks": "attention sinks",
        "use_logn_attn": "log-n attention scaling",
        "use_local_attn": "local attention",
        "scale_attn_by_inverse_layer_idx": "attention scaled by inverse layer index",
        "use_dynamic_ntk_rope": "dynamic NTK rotary scaling",
    }
    for flag, label in flags.items():
        if getattr(cfg, flag, False):
            problems.append(label)
    if getattr(cfg, "attention_dir", "causal") != "causal":
        problems.append("bidirectional attention (encoder)")
    if cfg.act_fn is not None and cfg.act_fn.endswith("_ln"):
        problems.append(f"act_fn={cfg.act_fn!r} (a normalised activation)")
    if getattr(cfg, "num_experts", None):
        problems.append("mixture-of-experts MLPs")
    if getattr(cfg, "attn_scores_soft_cap", -1.0) and cfg.attn_scores_soft_cap > 0:
        problems.append("attention-score soft-capping")
    if getattr(cfg, "output_logits_soft_cap", -1.0) and cfg.output_logits_soft_cap > 0:
        problems.append("logit soft-capping")
    if getattr(cfg, "clip_qkv", None) is not None:
        problems.append("q/k/v clipping")
    if getattr(cfg, "original_architecture", None) in {"BertForMaskedLM", "OlmoForCausalLM", "Olmo2ForCausalLM"}:
        problems.append(f"architecture {cfg.original_architecture}")
    if problems:
        raise GradGraphError(
            "build_graph supports pre-norm GPT-2- and Llama-family models; this model has "
            + "; ".join(problems)
        )
    if not (cfg.use_split_qkv_input and cfg.use_hook_mlp_in):
        raise GradGraphError(
            "build_graph needs model.set_use_split_qkv_input(True) and model.set_use_hook_mlp_in(True) "
            "(gradgraph.load_model and tiny_model set them)"
        )


def _right_padded(mask: torch.Tensor) -> bool:
    # every row is 1...10...0
    return bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(mask[:, 0].all())


def build_graph(
    model: HookedTransformer,
    tokens: str | list[str] | torch.Tensor,
    metric,
    *,
    attention_mask: torch.Tensor | None = None,
) -> GradGraph:
    """Run ``model`` on ``tokens`` with every hook point recorded and build its gradient graph.

    ``metric(logits, attention_mask) -> [batch]`` (see ``gradgraph.metrics``). Batches must be
    right-padded (``gradgraph.prompts.to_tokens`` does this); padded positions carry nothing.
    """
    check_supported(model)
    if not callable(metric):
        raise GradGraphError(f"metric must be a function of logits (see gradgraph.metrics), got {type(metric).__name__}")
    token_ids, mask = to_tokens(model, tokens)
    if attention_mask is not None:
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
    with torch.enable_grad():
        with hooks.recording(model) as store:
            logits = model(token_ids)
        acts = hooks.node_firings(store)
        # masked attention scores are -inf by design; anything else non-finite is an error
        bad = [
            name for name, t in acts.items()
            if torch.isnan(t).any() or (t == torch.inf).any() or ("attn_scores" not in name and (t == -torch.inf).any())
        ]
        if bad:
            raise GradGraphError(
                f"non-finite activations at {bad[:3]} (of {len(bad)} hook points); the graph would carry "
                f"NaN/inf: check the inputs and the model's dtype"
            )
        logits = logits.detach().requires_grad_(True)
        value = metric(logits, mask)
        if not isinstance(value, torch.Tensor) or value.shape != (token_ids.shape[0],):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise GradGraphError(
                f"metric must return one value per prompt, shape [{token_ids.shape[0]}]; got {shape}"
            )
        (grad_logits,) = torch.autograd.grad(value.sum(), logits, allow_unused=True)
    if grad_logits is None:
        grad_logits = torch.zeros_like(logits)
    return _assemble(model, token_ids, mask, acts, grad_logits.detach(), value.detach())


def _assemble(model, token_ids, mask, acts, grad_logits, metric_value) -> GradGraph:
    cfg = model.cfg
    B, P = token_ids.shape
    H = cfg.n_heads
    G = cfg.n_key_value_heads or H
    R = H // G
    d = cfg.d_model
    valid = mask.bool()  # [B, P]
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    edges = []
    stored: dict[str, torch.Tensor] = {}

    def node(name: str, tensor: torch.Tensor) -> str:
        shapes[name] = tuple(tensor.shape)
        order.append(name)
        stored[name] = tensor
        return name

    def act(name: str) -> torch.Tensor:
        if name not in acts:
            raise GradGraphError(f"hook point {name} did not fire; this model's layout is not supported")
        return acts[name].detach()

    # ---------------- inputs
    sources = [node(hooks.name("embed"), act(hooks.name("embed")))]
    if cfg.positional_embedding_type == "standard":
        sources.append(node(hooks.name("pos_embed"), act(hooks.name("pos_embed"))))
    resid = node(hooks.name("resid_pre", 0), act(hooks.name("resid_pre", 0)))
    for source in sources:
        edges.append(Identity(source, resid))

    def norm(prefix: str, x_name: str, layer: int | None, copy: str | None, axes_names: str) -> str:
        """Nodes and edges of a LayerNorm/RMSNorm on node x_name; returns hook_normalized's node."""
        x = stored[x_name]
        n = x.shape[-1]
        rows = f"({axes_names})"
        if cfg.normalization_type in ("LN", "LNPre"):
            centered = x - x.mean(-1, keepdim=True)
            c_name = node(hooks.name(f"{prefix}_centered", layer, copy), centered)
            eye = torch.eye(n, dtype=x.dtype, device=x.device)
            edges.append(Matmul(x_name, c_name, (eye - 1.0 / n)[None], True,
                                f"{axes_names} d -> 1 {rows} d", f"{axes_names} d -> 1 {rows} d", _axes(x, axes_names)))
            x_name, x = c_name, centered
        scale = _firing(acts, hooks.name(f"{prefix}_scale", layer), copy)
        normalized = _firing(acts, hooks.name(f"{prefix}_normalized", layer), copy)
        s_name = node(hooks.name(f"{prefix}_scale", layer, copy), scale)
        y_name = node(hooks.name(f"{prefix}_normalized", layer, copy), normalized)
        axes = _axes(x, axes_names)
        # x̃_i -> s : x̃_i / (n s)      (per row: [rows, n, 1])
        to_scale = (x / (n * scale)).reshape(-1, n, 1)
        edges.append(Matmul(x_name, s_name, to_scale, True, f"{axes_names} d -> {rows} 1 d",
                            f"{axes_names} one -> {rows} 1 one", axes))
        # x̃_j -> y_j : 1 / s
        edges.append(Diag(x_name, y_name, [((1.0 / scale).expand_as(x).contiguous(), None)]))
        # s -> y_j : -x̃_j / s²       (per row: [rows, 1, n])
        from_scale = (-x / scale**2).reshape(-1, 1, n)
        edges.append(Matmul(s_name, y_name, from_scale, True, f"{axes_names} one -> {rows} 1 one",
                            f"{axes_names} d -> {rows} 1 d", axes))
        return y_name

    def norm_weight(module) -> torch.Tensor | None:
        return module.w.detach() if hasattr(module, "w") else None

    for L, block in enumerate(model.blocks):
        attn = block.attn
        # ---------------- attention inputs (per-head copies) and ln1
        y = {}
        for copy, n_copies in (("q", H), ("k", G), ("v", G)):
            inp = node(hooks.name(f"{copy}_input", L), act(hooks.name(f"{copy}_input", L)))
            edges.append(Broadcast(resid, inp, 2, n_copies))
            y[copy] = norm("ln1", inp, L, copy, "b p h")
        w1 = norm_weight(block.ln1)
        # ---------------- q, k, v projections
        proj = {}
        for copy, W in (("q", attn.W_Q), ("k", _kv_weight(attn, "K")), ("v", _kv_weight(attn, "V"))):
            W = W.detach()
            if w1 is not None:
                W = w1[None, :, None] * W
            out = node(hooks.name(copy, L), act(hooks.name(copy, L)))
            edges.append(Matmul(y[copy], out, W, True, "b p h d -> h (b p) d", "b p h e -> h (b p) e",
                                _axes(stored[out], "b p h")))
            proj[copy] = out
        q_name, k_name = proj["q"], proj["k"]
        if cfg.positional_embedding_type == "rotary":
            q_name = _rotary(attn, cfg, proj["q"], node(hooks.name("rot_q", L), act(hooks.name("rot_q", L))), stored, edges)
            k_name = _rotary(attn, cfg, proj["k"], node(hooks.name("rot_k", L), act(hooks.name("rot_k", L))), stored, edges)
        rq, rk, v = stored[q_name], stored[k_name], stored[proj["v"]]
        scale = attn.attn_scale
        # ---------------- scores = q·k / scale, causal and padding mask
        scores = node(hooks.name("attn_scores", L), act(hooks.name("attn_scores", L)))
        causal = torch.tril(torch.ones(P, P, dtype=torch.bool, device=rq.device))
        allowed = causal[None, None] & valid[:, None, :, None] & valid[:, None, None, :]  # [B, 1, q, k]
        score_mask = allowed.expand(B, H, P, P)
        canon_mask = _rearrange(score_mask, "b (g r) q k -> (b g) (r q) k", g=G, r=R)
        ax = dict(g=G, r=R)
        edges.append(Matmul(q_name, scores, _rearrange(rk, "b k g e -> (b g) e k", g=G) / scale, True,
                            "b q (g r) e -> (b g) (r q) e", "b (g r) q k -> (b g) (r q) k", {**ax, "b": B}, canon_mask))
        edges.append(Matmul(k_name, scores, _rearrange(rq, "b q (g r) e -> (b g) (r q) e", g=G, r=R) / scale, False,
                            "b k g e -> (b g) e k", "b (g r) q k -> (b g) (r q) k", {**ax, "b": B}, canon_mask))
        # ---------------- pattern = softmax(scores): J[row, k, k'] = p_k' (δ_kk' − p_k)
        pattern_act = act(hooks.name("pattern", L))
        pattern = node(hooks.name("pattern", L), pattern_act)
        p = pattern_act * score_mask
        jac = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]  # [B, H, q, k, k']
        edges.append(Matmul(scores, pattern, jac.reshape(-1, P, P), True, "b h q k -> (b h q) 1 k",
                            "b h q k -> (b h q) 1 k", dict(b=B, h=H, q=P)))
        # ---------------- z = pattern · v
        z = node(hooks.name("z", L), act(hooks.name("z", L)))
        z_mask = valid[:, None, :, None].expand(B, H, P, v.shape[-1])  # pad queries carry nothing
        z_mask = _rearrange(z_mask, "b (g r) q e -> (b g) (r q) e", g=G, r=R)
        edges.append(Matmul(pattern, z, _rearrange(v, "b k g e -> (b g) k e", g=G), True,
                            "b (g r) q k -> (b g) (r q) k", "b q (g r) e -> (b g) (r q) e", {**ax, "b": B}, z_mask))
        edges.append(Matmul(proj["v"], z, _rearrange(p, "b (g r) q k -> (b g) (r q) k", g=G, r=R), False,
                            "b k g e -> (b g) k e", "b q (g r) e -> (b g) (r q) e", {**ax, "b": B}, z_mask))
        # ---------------- attn_out = Σ_h z_h W_O[h]
        attn_out = node(hooks.name("attn_out", L), act(hooks.name("attn_out", L)))
        W_O = attn.W_O.detach().reshape(1, H * attn.W_O.shape[1], d)
        edges.append(Matmul(z, attn_out, W_O, True, "b p h e -> 1 (b p) (h e)", "b p d -> 1 (b p) d",
                            dict(b=B, p=P, h=H)))
        # ---------------- residual, mlp
        mid = node(hooks.name("resid_mid", L), act(hooks.name("resid_mid", L)))
        edges += [Identity(resid, mid), Identity(attn_out, mid)]
        mlp_in = node(hooks.name("mlp_in", L), act(hooks.name("mlp_in", L)))
        edges.append(Identity(mid, mlp_in))
        y2 = norm("ln2", mlp_in, L, None, "b p")
        w2 = norm_weight(block.ln2)
        mlp = block.mlp
        fold = (lambda W: W.detach() if w2 is None else w2[:, None] * W.detach())
        pre_act = act(hooks.name("mlp_pre", L))
        pre = node(hooks.name("mlp_pre", L), pre_act)
        edges.append(Matmul(y2, pre, fold(mlp.W_gate if cfg.gated_mlp else mlp.W_in)[None], True,
                            "b p d -> 1 (b p) d", "b p m -> 1 (b p) m", dict(b=B, p=P)))
        act_value, act_grad = _elementwise(mlp.act_fn, pre_act)
        post = act(hooks.name("mlp_post", L))
        if cfg.gated_mlp:
            lin_act = act(hooks.name("mlp_pre_linear", L))
            lin = node(hooks.name("mlp_pre_linear", L), lin_act)
            edges.append(Matmul(y2, lin, fold(mlp.W_in)[None], True, "b p d -> 1 (b p) d", "b p m -> 1 (b p) m",
                                dict(b=B, p=P)))
            post_name = node(hooks.name("mlp_post", L), post)
            edges.append(Diag(pre, post_name, [(act_grad * lin_act, None)]))
            edges.append(Diag(lin, post_name, [(act_value, None)]))
        else:
            post_name = node(hooks.name("mlp_post", L), post)
            edges.append(Diag(pre, post_name, [(act_grad, None)]))
        mlp_out = node(hooks.name("mlp_out", L), act(hooks.name("mlp_out", L)))
        edges.append(Matmul(post_name, mlp_out, mlp.W_out.detach()[None], True, "b p m -> 1 (b p) m",
                            "b p d -> 1 (b p) d", dict(b=B, p=P)))
        post_resid = node(hooks.name("resid_post", L), act(hooks.name("resid_post", L)))
        edges += [Identity(mid, post_resid), Identity(mlp_out, post_resid)]
        if L + 1 < cfg.n_layers:
            resid = node(hooks.name("resid_pre", L + 1), act(hooks.name("resid_pre", L + 1)))
            edges.append(Identity(post_resid, resid))
        else:
            resid = post_resid

    # ---------------- final norm, logits (only the columns the metric reads), metric
    yf = norm("ln_final", resid, None, None, "b p")
    live = (grad_logits != 0).any(dim=0).any(dim=0)  # [vocab]
    logit_ids = live.nonzero()[:, 0]
    wf = norm_weight(model.ln_final)
    unembed_in = node(hooks.name("unembed_in"), act(hooks.name("unembed_in")))
    if wf is None:
        edges.append(Identity(yf, unembed_in))
    else:  # y * w + b
        edges.append(Diag(yf, unembed_in, [(wf.expand(stored[yf].shape).contiguous(), None)]))
    W_U = model.W_U.detach()[:, logit_ids]
    logits = node(hooks.name("logits"), act(hooks.name("logits"))[..., logit_ids])
    edges.append(Matmul(unembed_in, logits, W_U[None], True, "b p d -> 1 (b p) d", "b p v -> 1 (b p) v",
                        dict(b=B, p=P)))
    metric = node(hooks.name("metric"), metric_value)
    g = grad_logits[..., logit_ids]  # [B, P, V']
    edges.append(Matmul(logits, metric, g.reshape(B, -1, 1), True, "b p v -> b 1 (p v)", "b -> b 1 1",
                        dict(b=B, p=P)))
    return GradGraph(
        shapes=shapes, order=order, edges=edges, sources=sources, source_mask=valid,
        activations=stored, metric_value=metric_value, logit_ids=logit_ids, tokens=token_ids,
        attention_mask=mask, n_layers=cfg.n_layers, n_heads=H, n_key_value_heads=G,
    )


def _firing(acts: dict, hook: str, copy: str | None) -> torch.Tensor:
    key = f"{hook}:{copy}" if copy else hook
    if key not in acts:
        raise GradGraphError(f"hook point {key} did not fire; this model's layout is not supported")
    return acts[key].detach()


def _axes(tensor: torch.Tensor, names: str) -> dict:
    return {name: size for name, size in zip(names.split(), tensor.shape)}


def _rearrange(tensor: torch.Tensor, pattern: str, **axes) -> torch.Tensor:
    return einops.rearrange(tensor, pattern, **axes)


def _kv_weight(attn, which: str) -> torch.Tensor:
    """W_K / W_V with one matrix per key/value head (grouped-query attention keeps them unrepeated)."""
    grouped = getattr(attn, f"_W_{which}", None)
    return grouped if grouped is not None else getattr(attn, f"W_{which}")


def _elementwise(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), f'(x)) of an element-wise activation, the derivative by autograd."""
    with torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        value = fn(leaf)
        (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad.detach()


def _rotary(attn, cfg, src: str, tgt: str, stored: dict, edges: list) -> str:
    """rot = x cos + rotate(x) sin on the first rotary_dim dims; the rest pass through."""
    x = stored[src]  # [B, P, heads, e]
    P, e = x.shape[1], x.shape[-1]
    rd = cfg.rotary_dim
    cos = torch.ones(P, e, dtype=x.dtype, device=x.device)
    sin = torch.zeros(P, e, dtype=x.dtype, device=x.device)
    cos[:, :rd] = attn.rotary_cos[:P].to(x.dtype)
    perm = torch.arange(e, device=x.device)
    sign = torch.zeros(e, dtype=x.dtype, device=x.device)
    if cfg.rotary_adjacent_pairs:  # rotate(x)[2i] = -x[2i+1], rotate(x)[2i+1] = x[2i]
        perm[0:rd:2], perm[1:rd:2] = torch.arange(1, rd, 2), torch.arange(0, rd, 2)
        sign[0:rd:2], sign[1:rd:2] = -1.0, 1.0
    else:  # rotate(x)[:n] = -x[n:rd], rotate(x)[n:rd] = x[:n]
        n = rd // 2
        perm[:n], perm[n:rd] = torch.arange(n, rd), torch.arange(0, n)
        sign[:n], sign[n:rd] = -1.0, 1.0
    sin[:, :rd] = attn.rotary_sin[:P].to(x.dtype)
    shape = x.shape
    cos_w = cos[None, :, None, :].expand(shape).contiguous()
    sin_w = (sin * sign)[None, :, None, :].expand(shape).contiguous()
    edges.append(Diag(src, tgt, [(cos_w, None), (sin_w, perm)]))
    return tgt
