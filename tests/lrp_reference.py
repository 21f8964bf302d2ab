"""A slow, plainly written reference for the LRP rule sets: TransformerLens' own forward pass with
hooks that detach or rescale activations, so that torch autograd computes the modified gradient
(AttnLRP, CP-LRP and RelP in gradient × input form, as their reference implementations do)."""

import torch

from gradgraph.arch import hooks, names


def _ratio(num, den):
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, torch.ones_like(den), den))


def _halved(t):
    """Value t, gradient halved (the uniform rule on a product): t/2 + (t/2).detach()."""
    return t / 2 + (t / 2).detach()


def _identity_rule(act_fn, pre):
    """Value act(pre), gradient act(pre)/pre."""
    return pre * _ratio(act_fn(pre), pre).detach()


def reference_hooks(model, rules: str, head_mask=None) -> list:
    """Forward hooks (name, fn) that turn autograd's gradient into the modified gradient of ``rules``
    (``attn-lrp``, ``cp-lrp``, ``relp``, ``relp+ah``)."""
    pre_acts: dict[int, dict[str, torch.Tensor]] = {}
    pattern_constant = rules in ("cp-lrp", "relp+ah")
    half_attention = rules == "attn-lrp"
    out = []

    def keep(kind, layer):
        def hook(t, hook):
            pre_acts.setdefault(layer, {})[kind] = t

        return hook

    def post_hook(layer):
        mlp = model.blocks[layer].mlp

        def hook(t, hook):
            pre = pre_acts[layer]["pre"]
            if not model.cfg.gated_mlp:
                return _identity_rule(mlp.act_fn, pre)
            lin = pre_acts[layer]["lin"]
            if rules == "cp-lrp":  # the gate held constant
                return mlp.act_fn(pre).detach() * lin
            return _halved(_identity_rule(mlp.act_fn, pre) * lin)

        return hook

    def z_hook(layer):
        def hook(t, hook):
            if half_attention:
                t = _halved(t)
            if head_mask is not None:
                keep_head = head_mask[layer].to(t.device)[None, None, :, None]
                t = torch.where(keep_head, t, t.detach())
            return t

        return hook

    for name in model.hook_dict:
        if name.endswith("hook_scale"):
            out.append((name, lambda t, hook: t.detach()))
    for layer in range(model.cfg.n_layers):
        out.append((names.name("mlp_pre", layer), keep("pre", layer)))
        if model.cfg.gated_mlp:
            out.append((names.name("mlp_pre_linear", layer), keep("lin", layer)))
        out.append((names.name("mlp_post", layer), post_hook(layer)))
        if pattern_constant:
            out.append((names.name("pattern", layer), lambda t, hook: t.detach()))
        elif half_attention:
            out.append((names.name("attn_scores", layer), lambda t, hook: _halved(t)))
        out.append((names.name("z", layer), z_hook(layer)))
    return out


def reference_gradients(model, tokens, metric, rules: str, head_mask=None) -> dict[str, torch.Tensor]:
    """The modified gradient of ``metric(logits).sum()`` at every hook point that gets one, except
    the values the rules hold constant (norm scales, a constant pattern)."""
    with model.hooks(fwd_hooks=reference_hooks(model, rules, head_mask), reset_hooks_end=True):
        with hooks.recording(model, keep_grad=True) as store:
            logits = model(tokens)
        metric(logits, None).sum().backward()
    model.zero_grad(set_to_none=True)
    constant = ("hook_scale",) + (("hook_pattern",) if rules in ("cp-lrp", "relp+ah") else ())
    return {name: t.grad for name, t in hooks.node_firings(store).items()
            if t.grad is not None and not any(c in name for c in constant)}


# --------------------------------------------------------------------------- Chefer et al. 2021


def _alpha1_beta0(x, W, R):
    """R_x = x⁺ ⊙ ((R/Z) W⁺ᵀ) + x⁻ ⊙ ((R/Z) W⁻ᵀ), Z = x⁺W⁺ + x⁻W⁻ (x [..., i], W [i, j], R [..., j])."""
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    S = _ratio(R, xp @ Wp + xn @ Wn)
    return xp * (S @ Wp.T) + xn * (S @ Wn.T)


def _normalised_add(parts, R):
    """Chefer's Add.relprop per item: z-rule shares, rescaled to |C_i| / Σ|C_k| of Σ R."""
    Z = sum(parts)
    shares = [a * _ratio(R, Z) for a in parts]
    c = torch.stack([s.flatten(1).sum(1) for s in shares])  # [parts, B]
    total = R.flatten(1).sum(1)
    out = []
    for i, s in enumerate(shares):
        factor = _ratio(c[i].abs(), c.abs().sum(0)) * total
        out.append(s * _ratio(factor, c[i])[:, None, None])
    return out


def _rotary_back(attn, rot, R_rot):
    """Relevance through the rotary rotation by its Jacobian (gradient × input)."""
    x = rot.new_zeros(rot.shape)  # the map is linear: any point gives the Jacobian
    _, (g,) = torch.autograd.functional.vjp(lambda t: attn.apply_rotary(t), (x,), _ratio(R_rot, rot))
    return g


def chefer_relevance(model, tokens, metric) -> torch.Tensor:
    """Relevance at ``hook_embed`` ``[batch, pos, d_model]`` by Chefer et al.'s rules, propagated
    layer by layer in relevance space (no modified gradient): α1β0 on linear maps (the norm's weight
    folded into the next map), z-rule halved on q·k and pattern·v (and a gated MLP's product),
    relevance passing norms, softmax and activations unchanged, normalised residual sums. The
    relevance at the logits is logits ⊙ ∂metric/∂logits; the final norm's weight map keeps its
    Jacobian (as the graph builder's)."""
    cfg = model.cfg
    with torch.no_grad(), hooks.recording(model) as store:
        logits = model(tokens)
    a = hooks.node_firings(store)
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(metric(leaf, None).sum(), leaf)
    R = _alpha1_beta0(a["unembed.hook_in"], model.W_U, logits * grad)
    w_f = getattr(model.ln_final, "w", None)
    y_f = a["ln_final.hook_normalized"]
    R = y_f * (w_f if w_f is not None else 1.0) * _ratio(R, a["unembed.hook_in"])
    R_resid = R  # the final norm passes relevance through
    for L in reversed(range(cfg.n_layers)):
        blk, attn, mlp = model.blocks[L], model.blocks[L].attn, model.blocks[L].mlp
        p = f"blocks.{L}."
        R_mid, R_mlp = _normalised_add([a[p + "hook_resid_mid"], a[p + "hook_mlp_out"]], R_resid)
        R_post = _alpha1_beta0(a[p + "mlp.hook_post"], mlp.W_out, R_mlp)
        y2 = a[p + "ln2.hook_normalized"]
        w2 = getattr(blk.ln2, "w", torch.ones(cfg.d_model, dtype=y2.dtype))
        if cfg.gated_mlp:
            R_y2 = (_alpha1_beta0(y2, w2[:, None] * mlp.W_gate, R_post / 2)
                    + _alpha1_beta0(y2, w2[:, None] * mlp.W_in, R_post / 2))
        else:
            R_y2 = _alpha1_beta0(y2, w2[:, None] * mlp.W_in, R_post)
        R_mid = R_mid + R_y2  # ln2 passes relevance through to the MLP's input, a copy of resid_mid
        R_pre, R_attn = _normalised_add([a[p + "hook_resid_pre"], a[p + "hook_attn_out"]], R_mid)
        z = a[p + "attn.hook_z"]  # [B, q, H, e]
        B, P, H, E = z.shape
        R_z = _alpha1_beta0(z.reshape(B, P, H * E), attn.W_O.reshape(H * E, -1), R_attn).reshape(B, P, H, E)
        G = a[p + "attn.hook_v"].shape[2]
        v = a[p + "attn.hook_v"].repeat_interleave(H // G, 2)  # [B, k, H, e]
        pattern = a[p + "attn.hook_pattern"]  # [B, H, q, k]
        S = _ratio(R_z, z) / 2
        R_pattern = pattern * torch.einsum("bkhe,bqhe->bhqk", v, S)
        R_v = v * torch.einsum("bhqk,bqhe->bkhe", pattern, S)
        R_v = R_v.reshape(B, P, G, H // G, E).sum(3)
        scores = a[p + "attn.hook_attn_scores"]
        allowed = torch.isfinite(scores) & (scores > -1e4)
        S = torch.where(allowed, _ratio(R_pattern, torch.where(allowed, scores, 0.0)), 0.0) / 2  # softmax passes R
        rq = a[p + ("attn.hook_rot_q" if cfg.positional_embedding_type == "rotary" else "attn.hook_q")]
        rk = a[p + ("attn.hook_rot_k" if cfg.positional_embedding_type == "rotary" else "attn.hook_k")]
        rk_full = rk.repeat_interleave(H // G, 2)
        R_q = rq * torch.einsum("bhqk,bkhe->bqhe", S, rk_full) / attn.attn_scale
        R_k = (rk_full * torch.einsum("bhqk,bqhe->bkhe", S, rq) / attn.attn_scale).reshape(B, P, G, H // G, E).sum(3)
        if cfg.positional_embedding_type == "rotary":
            R_q = a[p + "attn.hook_q"] * _rotary_back(attn, rq, R_q)
            R_k = a[p + "attn.hook_k"] * _rotary_back(attn, rk, R_k)
        w1 = getattr(blk.ln1, "w", torch.ones(cfg.d_model, dtype=z.dtype))
        W_K = attn._W_K if getattr(attn, "_W_K", None) is not None else attn.W_K  # one per key/value head
        W_V = attn._W_V if getattr(attn, "_W_V", None) is not None else attn.W_V
        for firing, R_out, W in (("q", R_q, attn.W_Q), ("k", R_k, W_K), ("v", R_v, W_V)):
            y1 = a[p + f"ln1.hook_normalized:{firing}"]  # [B, P, heads, d]
            Wf = w1[None, :, None] * W  # [heads, d, e]
            R_y1 = torch.stack([_alpha1_beta0(y1[:, :, h], Wf[h], R_out[:, :, h]) for h in range(W.shape[0])], 2)
            R_pre = R_pre + R_y1.sum(2)  # ln1 passes relevance through; the copies sum
        R_resid = R_pre
    if cfg.positional_embedding_type == "standard":
        R_resid, _ = _normalised_add([a["hook_embed"], a["hook_pos_embed"]], R_resid)
    return R_resid
