"""Gradients and integrated flow of one prompt at many input points, through the gradient graph.

Each point is a row of ``hook_embed`` (the token embeddings; positional embeddings and everything
else follow from the real tokens). Rows go through ``record`` → ``assemble`` → ``backprop`` in
batches, so a path of 32 points costs a few batched passes, never one pass per point.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from gradgraph import fused
from gradgraph.arch import memory, names
from gradgraph.backprop import backprop
from gradgraph.build import assemble, record
from gradgraph.errors import GradGraphError
from gradgraph.rules import GRADIENT
from gradgraph.semirings import Abs, Real, Semiring


TOKEN_ROWS = 2048  # rows × positions per fused pass: past it, smaller passes run faster on a CPU (caches)


def fitting(model, positions: int, wanted: int) -> int:
    """Rows per batch: at most ``wanted``, and as many as take half the free memory (at least one)."""
    per_row = memory.graph_bytes(model.cfg, 1, positions, model.cfg.dtype)
    return max(1, min(wanted, memory.available_bytes(model.cfg.device) // (2 * per_row)))


def even(rows: int, most: int) -> int:
    """Rows per batch for ``rows`` in passes of at most ``most``, the passes as equal as they can be."""
    passes = -(-rows // most)
    return -(-rows // passes)


def gradients(model, tokens: torch.Tensor, metric, rows: torch.Tensor, *, batch_size: int = 64,
              progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂F/∂embed [R, pos, d_model], F [R])`` at each row ``[R, pos, d_model]`` of token
    embeddings for the prompt ``tokens`` ``[pos]``; ``batch_size`` rows per pass at most, fewer
    where memory is short. Where ``fused.covers`` the model, one autograd pass per batch (the
    graph's values, tested equal); otherwise the graph."""
    grads, values = [], []
    embed = names.inputs(model)[0]
    direct = fused.covers(model, GRADIENT)
    if direct:
        batch_size = min(batch_size, max(1, TOKEN_ROWS // len(tokens)))
    batch_size = even(len(rows), fitting(model, len(tokens), batch_size))
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="path gradients", unit="batch", disable=not progress or len(starts) < 2):
        chunk = rows[start:start + batch_size]
        if direct:  # the same gradient by one autograd pass, no graph stored
            one = fused.input_values(model, tokens.expand(len(chunk), -1), metric, rules=GRADIENT, embed=chunk)
            grads.append(one.grads[embed])
            values.append(one.metric_value)
            continue
        recording = record(model, tokens.expand(len(chunk), -1), metric, embed=chunk)
        graph = assemble(recording, GRADIENT)
        grads.append(backprop(graph, keep=[embed])[embed][0])
        values.append(recording.metric_value)
    return torch.cat(grads), torch.cat(values)


def flow(model, tokens: torch.Tensor, metric, polyline: torch.Tensor, *, semiring: Semiring = Real,
         batch_size: int = 8, progress: bool = True, edges: tuple[tuple[str, str], ...] = ()
         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Conductance at every node along ``polyline`` ``[N, pos, d_model]`` (baseline first):
    ``Σ_k ∂F/∂h(x_k) ⊙ (h(x_{k+1}) − h(x_k))`` per element ``{node: [1, *shape]}``, and F at each
    point ``[N]``. ``Abs``: ``Σ_k |paths|(x_k) ⊙ |Δh_k|``, the total absolute flow, an upper bound on
    each element's |conductance|. ``edges``: pairs ``(src, tgt)`` of nodes joined by a weight-1 edge
    (a residual skip): the conductance that edge carries, ``Σ_k ∂F/∂tgt(x_k) ⊙ Δsrc_k``, under the
    key ``"src->tgt"``."""
    if semiring not in (Real, Abs):
        raise GradGraphError(f"integrated flow sums gradient × increment along a path: Real (conductance) or Abs "
                             f"(its absolute bound) only, got {semiring.name}; Max or Entropy of one point's graph "
                             f"come from backprop on build_graph")
    totals: dict[str, torch.Tensor] = {}
    values = []
    batch_size = fitting(model, len(tokens), batch_size + 1) - 1 or 1
    starts = range(0, len(polyline) - 1, batch_size)
    for start in tqdm(starts, desc="integrated flow", unit="batch", disable=not progress or len(starts) < 2):
        chunk = polyline[start:start + batch_size + 1]  # one more row: the step's end point
        recording = record(model, tokens.expand(len(chunk), -1), metric, embed=chunk)
        graph = assemble(recording, GRADIENT)
        reading = {tgt: [] for _, tgt in edges}  # a skip's target: the sources whose step it carries
        for src, tgt in edges:
            reading[tgt].append(src)

        def add(key: str, value: torch.Tensor, h: torch.Tensor) -> None:
            step = torch.nan_to_num(h[1:] - h[:-1], nan=0.0, posinf=0.0, neginf=0.0)  # masked scores: -inf − -inf
            part = ((value[0][:-1]) * (step.abs() if semiring is Abs else step)).sum(0, keepdim=True)
            totals[key] = part if key not in totals else totals[key] + part

        def visit(node: str, value: torch.Tensor, graph=graph) -> None:  # each node's value once, then freed
            add(node, value, graph.activations[node])
            for src in reading.get(node, ()):
                add(f"{src}->{node}", value, graph.activations[src])

        backprop(graph, semiring, keep=(), visit=visit)
        zero = graph.metric_value.new_zeros  # no path to the metric: no conductance
        for key, node in [(n, n) for n in graph.order if n != names.METRIC] + [(f"{s}->{t}", s) for s, t in edges]:
            if key not in totals:
                totals[key] = zero((1, *graph.shapes[node][1:]), dtype=graph.dtype)
        values.append(recording.metric_value[:-1])
    values.append(recording.metric_value[-1:])
    return totals, torch.cat(values)


__all__ = ["flow", "gradients"]
