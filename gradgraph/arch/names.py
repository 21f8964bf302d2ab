"""Node and hook names: the only module that spells them (``name``) and reads them back (``parse``).

Graph nodes are named by TransformerLens 3.9's hook names. Where one hook point fires several times
in a forward pass (``ln1`` under ``use_split_qkv_input`` fires for the q, k and v inputs), the node
names carry the firing as a suffix: ``blocks.0.ln1.hook_scale:q``. Internal nodes with no hook are
named in the same style (``blocks.0.ln1.centered:q``, ``METRIC``). The logits are ``unembed.hook_out``.
A TransformerLens 4 bridge fires some hook points under names of its own (``renamed``).
"""

from __future__ import annotations

import functools
import re

METRIC = "metric"  # the graph's one output node

_TEMPLATES = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "q_input": "blocks.{L}.hook_q_input",
    "k_input": "blocks.{L}.hook_k_input",
    "v_input": "blocks.{L}.hook_v_input",
    "ln1_centered": "blocks.{L}.ln1.centered",
    "ln1_scale": "blocks.{L}.ln1.hook_scale",
    "ln1_normalized": "blocks.{L}.ln1.hook_normalized",
    "q": "blocks.{L}.attn.hook_q",
    "k": "blocks.{L}.attn.hook_k",
    "v": "blocks.{L}.attn.hook_v",
    "cached_k": "blocks.{L}.attn.cached_k",  # a cached prefix's keys and values (not hook points)
    "cached_v": "blocks.{L}.attn.cached_v",
    "all_k": "blocks.{L}.attn.all_k",  # the cached prefix's then this run's keys and values
    "all_v": "blocks.{L}.attn.all_v",
    "rot_q": "blocks.{L}.attn.hook_rot_q",
    "rot_k": "blocks.{L}.attn.hook_rot_k",
    "attn_scores": "blocks.{L}.attn.hook_attn_scores",
    "pattern": "blocks.{L}.attn.hook_pattern",
    "z": "blocks.{L}.attn.hook_z",
    "attn_out": "blocks.{L}.hook_attn_out",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "mlp_in": "blocks.{L}.hook_mlp_in",
    "ln2_centered": "blocks.{L}.ln2.centered",
    "ln2_scale": "blocks.{L}.ln2.hook_scale",
    "ln2_normalized": "blocks.{L}.ln2.hook_normalized",
    "mlp_pre": "blocks.{L}.mlp.hook_pre",
    "mlp_pre_linear": "blocks.{L}.mlp.hook_pre_linear",
    "mlp_post": "blocks.{L}.mlp.hook_post",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "resid_post": "blocks.{L}.hook_resid_post",
    "ln_final_centered": "ln_final.centered",
    "ln_final_scale": "ln_final.hook_scale",
    "ln_final_normalized": "ln_final.hook_normalized",
    "unembed_in": "unembed.hook_in",
    "logits": "unembed.hook_out",
    "metric": METRIC,
    # nodes of the features some families add (internal nodes have no "hook_")
    "q_normed": "blocks.{L}.attn.q_normed",  # q after its q/k norm (Qwen3, OLMo-2), [batch, pos, head, d_head]
    "k_normed": "blocks.{L}.attn.k_normed",
    "scores_raw": "blocks.{L}.attn.scores_raw",  # q·k / attn_scale before soft-capping (Gemma 2)
    "attn_raw": "blocks.{L}.attn.out",  # Σ_h z_h W_O[h] + b_O before a norm after attention
    "mlp_raw": "blocks.{L}.mlp.out",  # post W_out + b_out before a norm after the MLP
    "mlp_softmax": "blocks.{L}.mlp.softmax",  # softmax(pre) of SoLU
    "mlp_mid": "blocks.{L}.mlp.hook_mid",  # SoLU: pre ⊙ softmax(pre), before its LayerNorm
    "logits_capped": "unembed.soft_capped",  # cap · tanh(logits / cap) (Gemma 2)
    # what a TransformerLens 4 bridge fires instead (gradgraph.arch.lens renames and completes them)
    "block_in": "blocks.{L}.hook_in",  # hook_resid_pre
    "block_out": "blocks.{L}.hook_out",  # hook_resid_post
    "attn_cos": "blocks.{L}.attn.hook_cos",  # the rotary tables the layer used, [1, pos, rotary_dim]
    "attn_sin": "blocks.{L}.attn.hook_sin",
}

# every norm's nodes: the input (where it differs from the node it reads), x̃ (LayerNorm), the scale,
# the normalised vector and the output (where the norm's weight cannot be folded into a linear map)
_NORMS = {
    "ln1": "blocks.{L}.ln1", "ln2": "blocks.{L}.ln2", "ln_final": "ln_final",
    "ln1_post": "blocks.{L}.ln1_post", "ln2_post": "blocks.{L}.ln2_post",
    "q_norm": "blocks.{L}.attn.q_norm", "k_norm": "blocks.{L}.attn.k_norm", "mlp_ln": "blocks.{L}.mlp.ln",
    "embed_ln": "embed.ln", "mlm_ln": "mlm_head.ln",  # a BERT encoder's
}
for _norm, _path in _NORMS.items():
    for _part, _leaf in (("input", "input"), ("centered", "centered"), ("scale", "hook_scale"),
                         ("normalized", "hook_normalized"), ("output", "output")):
        _TEMPLATES.setdefault(f"{_norm}_{_part}", f"{_path}.{_leaf}")

_TEMPLATES.update({  # a BERT encoder's own (TransformerLens HookedEncoder)
    "encoder_embed": "embed.hook_embed",
    "encoder_pos_embed": "embed.hook_pos_embed",
    "token_type_embed": "embed.hook_token_type_embed",
    "embed_sum": "embed.sum",  # the three embeddings' sum, before the embedding LayerNorm
    "full_embed": "hook_full_embed",
    "normalized_resid_post": "blocks.{L}.hook_normalized_resid_post",
    "mlm_dense": "mlm_head.dense",  # resid W + b of the MLM head
    "mlm_act": "mlm_head.act",  # act(dense)
})


def is_encoder(cfg) -> bool:
    """Whether ``cfg`` is a bidirectional encoder's (BERT: TransformerLens ``HookedEncoder``)."""
    return getattr(cfg, "attention_dir", "causal") == "bidirectional"


def inputs(model) -> tuple[str, ...]:
    """The hook points of ``model``'s (or a config's) input embeddings, the token embedding first:
    ``hook_embed`` (and ``hook_pos_embed`` for learned positions); an encoder's ``embed.hook_embed``,
    ``embed.hook_pos_embed`` and ``embed.hook_token_type_embed``."""
    cfg = getattr(model, "cfg", model)
    if is_encoder(cfg):
        return name("encoder_embed"), name("encoder_pos_embed"), name("token_type_embed")
    return (name("embed"),) + ((name("pos_embed"),) if cfg.positional_embedding_type == "standard" else ())


def residual_cuts(n_layers: int) -> list[str]:
    """The residual-stream nodes every input → metric path of a sequential decoder passes, bottom
    to top: each layer's ``hook_resid_pre`` and ``hook_resid_mid``, then the last ``hook_resid_post``."""
    return [name(kind, layer) for layer in range(n_layers) for kind in ("resid_pre", "resid_mid")] + \
        [name("resid_post", n_layers - 1)]


# hook points that fire once per q/k/v input under use_split_qkv_input, in firing order
SPLIT_FIRINGS = ("q", "k", "v")


def name(kind: str, layer: int | None = None, firing: str | None = None) -> str:
    """The node name for ``kind`` in ``layer``, with a firing suffix (``q``/``k``/``v``) if given."""
    text = _TEMPLATES[kind].format(L=layer)
    return f"{text}:{firing}" if firing else text


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{L}"), r"(\d+)") + r"(?::([a-z]+))?$")


# node name -> kind: every template but a bridge's own names, which are renamed before a graph is built
_PARSERS = [(kind, _pattern(t)) for kind, t in _TEMPLATES.items() if kind not in ("block_in", "block_out")]


def parse(node: str) -> tuple[str, int | None, str | None] | None:
    """``(kind, layer, firing)`` of a node name (the inverse of ``name``), or None for a name this
    module does not spell."""
    for kind, pattern in _PARSERS:
        match = pattern.match(node)
        if match:
            groups = match.groups()
            layer = int(groups[0]) if "{L}" in _TEMPLATES[kind] else None
            return kind, layer, groups[-1]
    return None


RESIDUAL = ("resid_pre", "resid_mid", "resid_post", "normalized_resid_post")  # the residual stream's kinds


def is_residual(node: str) -> bool:
    """Whether ``node`` is the residual stream (before, between and after a layer's sublayers)."""
    parsed = parse(node)
    return parsed is not None and parsed[0] in RESIDUAL


@functools.lru_cache(maxsize=None)
def renamed(n_layers: int) -> dict[str, str]:
    """A TransformerLens 4 bridge's own hook names → 3.9's: ``blocks.L.hook_in`` / ``hook_out`` are
    ``hook_resid_pre`` / ``hook_resid_post``."""
    pairs = (("block_in", "resid_pre"), ("block_out", "resid_post"))
    return {name(bridge, layer): name(own, layer) for layer in range(n_layers) for bridge, own in pairs}


__all__ = ["METRIC", "RESIDUAL", "SPLIT_FIRINGS", "inputs", "is_encoder", "is_residual", "name", "parse", "renamed",
           "residual_cuts"]
