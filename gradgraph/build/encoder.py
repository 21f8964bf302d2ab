"""A BERT encoder (TransformerLens ``HookedEncoder``) as ops of the gradient graph, from the
embeddings to ``unembed.hook_in``; ``gradgraph.build.assemble`` adds the logits and the metric.

BERT is post-LN (Devlin et al. 2019; the family Du et al. 2023 ran their SVA study on):

1. ``embed.hook_embed`` + ``embed.hook_pos_embed`` + ``embed.hook_token_type_embed`` → ``embed.sum``
   → ``embed.ln`` → ``hook_full_embed`` = ``blocks.0.hook_resid_pre``;
2. per layer: attention straight on ``hook_resid_pre`` (the q/k/v input copies, no norm before it),
   every position reading every real position; ``hook_resid_mid`` = resid_pre + attn_out;
   ``ln1`` on ``hook_mlp_in`` (its output ``blocks.L.ln1.output`` feeds both the MLP and the next
   sum); ``hook_resid_post`` = ln1's output + mlp_out; ``ln2`` → ``hook_normalized_resid_post``,
   the next layer's ``hook_resid_pre``;
3. the MLM head: ``mlm_head.dense`` = x W + b, ``mlm_head.act`` = act(dense), ``mlm_head.ln`` →
   ``unembed.hook_in``.

Norms whose output feeds a residual sum keep their weight as a diagonal (``emit.norm_out``);
attention, MLP and the rule sets' blocks are the decoder's own emitters.
"""

from __future__ import annotations

from gradgraph.arch import names
from gradgraph.build.attention import attention
from gradgraph.build.emit import Assembly, linear, mlp, norm_out, residual_sum
from gradgraph.graph import Diag, Identity
from gradgraph.weights import Weight


def emit(asm: Assembly) -> str:
    """Every op of the encoder on ``asm``; returns ``unembed.hook_in``'s node."""
    model = asm.model
    sources = tuple(asm.node(name) for name in names.inputs(asm.cfg))
    total = asm.node(names.name("embed_sum"), sum(asm.stored[n] for n in sources))
    residual_sum(asm, sources, total, None)
    full = norm_out(asm, "embed_ln", total, None, model.embed.ln, names.name("full_embed"))
    resid = asm.node(names.name("resid_pre", 0))
    asm.add([Identity(full, resid, "copy", None)])
    for layer in range(asm.cfg.n_layers):
        block = model.blocks[layer]
        attn_out = attention(asm, layer, resid)
        mid = asm.node(names.name("resid_mid", layer))
        residual_sum(asm, (resid, attn_out), mid, layer)
        mlp_in = asm.node(names.name("mlp_in", layer))
        asm.add([Identity(mid, mlp_in, "copy", layer)])
        normed = norm_out(asm, "ln1", mlp_in, layer, block.ln1, names.name("ln1_output", layer))
        mlp_out = mlp(asm, layer, normed)
        post = asm.node(names.name("resid_post", layer))
        residual_sum(asm, (normed, mlp_out), post, layer)
        resid = norm_out(asm, "ln2", post, layer, block.ln2, names.name("normalized_resid_post", layer))
        if layer + 1 < asm.cfg.n_layers:
            nxt = asm.node(names.name("resid_pre", layer + 1))
            asm.add([Identity(resid, nxt, "copy", layer)])
            resid = nxt
    return _mlm_head(asm, resid)


def _mlm_head(asm: Assembly, resid: str) -> str:
    """dense → act → LayerNorm, into ``unembed.hook_in``."""
    head = asm.model.mlm_head
    B, P = asm.valid.shape
    W = head.W.detach()
    dense = asm.node(names.name("mlm_dense"), asm.stored[resid] @ W + head.b.detach())
    weight = asm.shared(("mlm_W",), lambda: W[None])
    linear(asm, resid, dense, None, weight, "b p d -> 1 (b p) d", "b p e -> 1 (b p) e", dict(b=B, p=P))
    x = asm.stored[dense]
    act = asm.node(names.name("mlm_act"), head.act_fn(x))
    asm.add([Diag(dense, act, "activation", None, ((Weight(asm.rules.activation(head.act_fn, x)), None),))])
    return norm_out(asm, "mlm_ln", act, None, head.ln, names.name("unembed_in"))


__all__ = ["emit"]
