"""``assemble``: a recording's gradient graph under a rule set, the layout's emitters chosen from
``LAYOUTS``; ``build_graph`` = ``record`` + ``assemble``."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import torch

from gradgraph.arch import names
from gradgraph.arch.lens import Model
from gradgraph.arch.spec import spec
from gradgraph.backprop import backprop
from gradgraph.build import decoder, encoder
from gradgraph.build.emit import Assembly, unembed
from gradgraph.build.record import Recording, record
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph, Pending
from gradgraph.rules import GRADIENT, RuleSet, rule_set

# a layout's emitters: every op from the inputs to ``unembed.hook_in``; ``assemble`` adds the logits and the metric
LAYOUTS = {"decoder": decoder.emit, "encoder": encoder.emit}


def check_head_mask(head_mask, cfg) -> torch.Tensor | None:
    """``None`` or a bool ``[n_layers, n_heads]`` tensor (True: the head passes relevance down)."""
    if head_mask is None:
        return None
    shape = (cfg.n_layers, cfg.n_heads)
    if not isinstance(head_mask, torch.Tensor) or tuple(head_mask.shape) != shape or head_mask.dtype != torch.bool:
        got = (f"{tuple(head_mask.shape)} {head_mask.dtype}" if isinstance(head_mask, torch.Tensor)
               else type(head_mask).__name__)
        raise GradGraphError(f"head_mask must be a bool tensor of shape [n_layers, n_heads] = {list(shape)} "
                             f"(gradgraph.heads.mask builds one), got {got}")
    return head_mask


def assemble(recording: Recording, rules: RuleSet | str = GRADIENT, *, head_mask: torch.Tensor | None = None) -> GradGraph:
    """The gradient graph of a recording under ``rules`` (the recording is not changed).

    ``head_mask`` ``[n_layers, n_heads]`` bool (Mask-LRP): a head marked False passes nothing into
    its pattern · v product (its output node still receives what arrives from above)."""
    rules = rule_set(rules)
    cfg = spec(recording.model).cfg
    if recording.prefix is not None and not rules.positionwise:
        raise GradGraphError(f"{rules.name} normalises relevance over every position of the sequence, so a graph "
                             f"after a cached prefix cannot apply it; record the whole sequence (no prefix)")
    asm = Assembly(recording, rules, check_head_mask(head_mask, cfg))
    unembed(asm, LAYOUTS[asm.spec.layout](asm))
    sources = names.inputs(cfg)
    name = rules.name if head_mask is None else f"{rules.name}+mask({int(head_mask.sum())} heads)"
    cached = tuple(names.name(f"cached_{w}", layer) for layer in range(cfg.n_layers) for w in "kv") if asm.prefix else ()
    graph = GradGraph(
        shapes=asm.shapes, order=tuple(asm.order), edges=tuple(asm.blocks), sources=sources, source_mask=asm.valid,
        activations=asm.stored, metric_value=recording.metric_value, logit_ids=recording.logit_ids,
        tokens=recording.tokens, attention_mask=recording.attention_mask, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, n_key_value_heads=cfg.n_key_value_heads or cfg.n_heads, rules=name,
        head_mask=asm.head_mask, prefix=asm.prefix, cached=cached, regions=tuple(asm.regions), copies=tuple(asm.copies),
    )
    return _frozen(graph)


def _frozen(graph: GradGraph) -> GradGraph:
    """Fix the blocks whose weights depend on the relevance arriving (``Pending``): one Real
    backprop in which each hands itself the value at its target, then the graph with fixed blocks.
    That pass's values at the sources and attention patterns stay with the graph (``settled``): a
    later Real backprop that keeps only those returns them instead of running again."""
    if not any(isinstance(edge, Pending) for edge in graph.edges):
        return graph
    patterns = [names.name("pattern", layer) for layer in range(graph.n_layers)]
    settled = backprop(graph, keep=list(graph.sources) + list(graph.cached) + [p for p in patterns if p in graph.shapes])
    edges = tuple(edge.frozen(graph.shapes) if isinstance(edge, Pending) else edge for edge in graph.edges)
    return dataclasses.replace(graph, edges=edges, settled=MappingProxyType(settled))


def build_graph(
    model: Model,
    tokens: str | list[str] | torch.Tensor,
    metric,
    *,
    attention_mask: torch.Tensor | None = None,
    rules: RuleSet | str = GRADIENT,
    embed: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    patterns: str = "auto",
) -> GradGraph:
    """Run ``model`` on ``tokens`` with every hook point recorded and build its gradient graph.

    ``metric(logits, attention_mask) -> [batch]`` or ``metric(logits) -> [batch]`` (see
    ``gradgraph.metrics``; ``logit_diff(" are", " is")`` takes words). Batches must be right-padded
    (``gradgraph.prompts.to_tokens`` does this); padded positions carry nothing. ``rules`` chooses
    the local derivatives (``gradgraph.rules``, or a name such as ``"attn-lrp"``); ``embed``
    replaces the token embeddings; ``head_mask`` (Mask-LRP) see ``assemble``; ``prefix`` (token
    ids every row follows, cached; ``tokens`` then come after it) and ``patterns`` (kept, or
    recomputed per pass for long prompts) see ``record``. Raises
    ``GradGraphError`` before the forward pass when the graph would not fit in memory.
    """
    rules = rule_set(rules)
    recording = record(model, tokens, metric, attention_mask=attention_mask, embed=embed, prefix=prefix,
                       patterns=patterns)
    return assemble(recording, rules, head_mask=head_mask)


__all__ = ["LAYOUTS", "assemble", "build_graph", "check_head_mask"]
