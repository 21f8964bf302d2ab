"""What a model's architecture has, and what gradgraph covers: what the graph builder does not cover
(``unsupported_features``; ``spec.check_supported`` raises it) and the features beyond the GPT-2 / Llama layout
(``layout_features``) that a forward pass from the weights must handle."""

from __future__ import annotations

from gradgraph.arch import lens, names

POST_NORM = {"Olmo2ForCausalLM"}  # norms after attention and the MLP only, none before (OLMo-2)
QK_NORM_ACROSS_HEADS = {"Olmo2ForCausalLM"}  # q/k norms over all heads at once, not per head


def unsupported_features(model) -> list[str]:
    """What in ``model``'s architecture the graph builder does not cover (empty: all of it)."""
    problems = lens.model_problems(model)
    if problems:
        return problems
    cfg = lens.config(model)
    if lens.is_hooked_encoder(model):
        return _encoder_problems(cfg)
    problems = []
    if cfg.normalization_type not in (None, "LN", "LNPre", "RMS", "RMSPre"):
        problems.append(f"normalization_type={cfg.normalization_type!r} (supported: LN, LNPre, RMS, RMSPre, None)")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r} (supported: standard, rotary)")
    flags = {
        "use_attention_sinks": "attention sinks",
        "use_logn_attn": "log-n attention scaling",
        "use_dynamic_ntk_rope": "dynamic NTK rotary scaling",
        "post_embedding_ln": "a norm after the embedding",
        "use_attn_result": "use_attn_result (per-head results; switch it off)",
        "ungroup_grouped_query_attention": "ungroup_grouped_query_attention (switch it off)",
    }
    for flag, label in flags.items():
        if getattr(cfg, flag, False):
            problems.append(label)
    if getattr(cfg, "attention_dir", "causal") != "causal":
        problems.append("bidirectional attention in a HookedTransformer (encoders: HookedEncoder)")
    if cfg.act_fn is not None and cfg.act_fn not in _ACTIVATIONS:
        problems.append(f"act_fn={cfg.act_fn!r} (supported: {', '.join(sorted(_ACTIVATIONS))})")
    if cfg.act_fn == "solu_ln" and cfg.gated_mlp:
        problems.append("a gated MLP with act_fn='solu_ln'")
    if getattr(cfg, "num_experts", None):
        problems.append("mixture-of-experts MLPs")
    if getattr(cfg, "clip_qkv", None) is not None:
        problems.append("q/k/v clipping")
    if getattr(cfg, "use_qk_norm", False) and cfg.original_architecture in QK_NORM_ACROSS_HEADS:
        problems.append("use_qk_norm on an OLMo architecture (two q/k norms)")
    architecture = cfg.original_architecture
    if architecture in {"Olmo3ForCausalLM", "OlmoeForCausalLM"}:  # post-norm with sliding windows / experts
        problems.append(f"architecture {architecture}")
    return problems


def _encoder_problems(cfg) -> list[str]:
    problems = []
    if cfg.normalization_type != "LN":
        problems.append(f"an encoder with normalization_type={cfg.normalization_type!r} (BERT's is LN)")
    if cfg.act_fn not in _ACTIVATIONS or cfg.act_fn == "solu_ln":
        problems.append(f"an encoder with act_fn={cfg.act_fn!r}")
    if not names.is_encoder(cfg):
        problems.append("a HookedEncoder with causal attention")
    return problems


# the element-wise activations TransformerLens offers (solu_ln: x ⊙ softmax(x), then a LayerNorm)
_ACTIVATIONS = {"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "solu_ln", "relu2"}


def layout_features(cfg) -> list[str]:
    """The features of ``cfg`` beyond the GPT-2 / Llama layout (pre-norm, sequential attention then
    MLP, one norm kind, element-wise activation, full causal attention): what code that computes a
    forward pass from the weights alone (``gradgraph.arch.inference``) must handle to cover the model."""
    checks = {
        "parallel attention and MLP": cfg.parallel_attn_mlp,
        "attention-only blocks": cfg.attn_only,
        "no normalisation": cfg.normalization_type is None,
        "q/k normalisation": getattr(cfg, "use_qk_norm", False) or cfg.original_architecture in QK_NORM_ACROSS_HEADS,
        "norms after attention and MLP": (getattr(cfg, "use_normalization_before_and_after", False)
                                          or cfg.original_architecture in POST_NORM),
        "attention-score soft-capping": soft_cap(getattr(cfg, "attn_scores_soft_cap", None)) is not None,
        "logit soft-capping": soft_cap(getattr(cfg, "output_logits_soft_cap", None)) is not None,
        "local attention": getattr(cfg, "use_local_attn", False),
        "a SoLU activation": cfg.act_fn == "solu_ln",
        "attention scaled by inverse layer index": getattr(cfg, "scale_attn_by_inverse_layer_idx", False),
    }
    return [label for label, present in checks.items() if present]


def soft_cap(cap) -> float | None:
    """The soft cap ``c`` of ``c · tanh(x / c)``, or None when the model has none."""
    return float(cap) if cap is not None and cap > 0 else None


__all__ = ["POST_NORM", "QK_NORM_ACROSS_HEADS", "layout_features", "soft_cap",
           "unsupported_features"]
