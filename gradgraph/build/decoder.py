"""A decoder's ops (sequential, parallel and attention-only blocks): the embeddings, every layer's
attention and MLP (``gradgraph.build.emit``) around the residual sums, the final norm."""

from __future__ import annotations

from gradgraph.arch import names
from gradgraph.build.attention import attention
from gradgraph.build.emit import Assembly, final_norm, mlp, residual_sum
from gradgraph.graph import Identity


def embed(asm: Assembly) -> str:
    """The input embeddings summed into ``blocks.0.hook_resid_pre``; returns its node."""
    sources = [asm.node(name) for name in names.inputs(asm.cfg)]
    resid = asm.node(names.name("resid_pre", 0))
    residual_sum(asm, tuple(sources), resid, None)
    return resid


def layers(asm: Assembly) -> str:
    """The embeddings and every layer of a decoder (sequential, parallel or attention-only blocks);
    returns the last ``hook_resid_post``'s node."""
    cfg = asm.cfg
    resid = embed(asm)
    for layer in range(cfg.n_layers):
        attn_out = attention(asm, layer, resid)
        post = names.name("resid_post", layer)
        if cfg.attn_only:  # resid_post = resid_pre + attn_out
            residual_sum(asm, (resid, attn_out), asm.node(post), layer)
        elif cfg.parallel_attn_mlp:  # the MLP reads resid_pre too: resid_post = resid_pre + attn_out + mlp_out
            mlp_in = asm.node(names.name("mlp_in", layer))
            asm.add([Identity(resid, mlp_in, "copy", layer)])
            mlp_out = mlp(asm, layer, mlp_in)
            residual_sum(asm, (resid, attn_out, mlp_out), asm.node(post), layer)
        else:
            mid = asm.node(names.name("resid_mid", layer))
            residual_sum(asm, (resid, attn_out), mid, layer)
            mlp_in = asm.node(names.name("mlp_in", layer))
            asm.add([Identity(mid, mlp_in, "copy", layer)])
            mlp_out = mlp(asm, layer, mlp_in)
            residual_sum(asm, (mid, mlp_out), asm.node(post), layer)
        if layer + 1 < cfg.n_layers:
            resid = asm.node(names.name("resid_pre", layer + 1))
            asm.add([Identity(post, resid, "copy", layer)])
        else:
            resid = post
    return resid


def emit(asm: Assembly) -> str:
    """Every op of the decoder on ``asm``; returns ``unembed.hook_in``'s node."""
    return final_norm(asm, layers(asm))


__all__ = ["emit"]
