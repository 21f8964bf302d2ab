"""Path statistics as thin choices of semiring: gradient flow, top paths, path entropy."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch

from gradgraph.arch import names
from gradgraph.backprop import backprop, through
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.labels import Component, Registry
from gradgraph.semirings import Abs, Count, Entropy, Max


@dataclass(frozen=True)
class GradientPath:
    """One input → metric path of the scalar gradient graph.

    ``weight`` is the signed product of its local derivatives (its contribution to the
    gradient), ``nodes`` its elements as ``(node name, index)`` pairs, from an input embedding
    element to ``("metric", (b,))``. ``str(path)`` reads as a person would say it (``steps``);
    ``path.full()`` spells every node.
    """

    weight: float
    nodes: tuple[tuple[str, tuple[int, ...]], ...]
    registry: Registry | None = field(default=None, compare=False, repr=False)  # for the components' labels

    @property
    def magnitude(self) -> float:
        return abs(self.weight)

    @property
    def steps(self) -> tuple[str, ...]:
        """The path in readable steps: the input element (``embed@5[25]``: position 5, dimension 25),
        each component by its label (``L3H6-8.v@2``, ``L3H7@5``, ``MLP0@5 (neuron 53)``), every run
        along the residual stream as one step (``resid@5[247] × 29 layers``: dimension 247 carried
        past the attention and MLP of 29 layers), the logit (``logit[314]``: token id 314) and the
        metric. The nodes inside a component (norms, q/k/v, scores, pattern) are left out."""
        if self.registry is None:
            return tuple(f"{name}{list(index)}" for name, index in self.nodes)
        return readable_steps(self.nodes, self.registry)

    def full(self) -> str:
        """Every node of the path with its index: ``+0.5024: hook_embed[0, 5, 25] → blocks.0.hook_resid_pre[0, 5, 25] → …``."""
        return f"{self.weight:+.4g}: " + " → ".join(f"{name}{list(index)}" for name, index in self.nodes)

    def __str__(self) -> str:
        return f"{self.weight:+.4g}: " + " → ".join(self.steps)


_EMBEDS = {"embed": "embed", "pos_embed": "pos_embed", "encoder_embed": "embed", "encoder_pos_embed": "pos_embed",
           "token_type_embed": "token_type"}


def readable_steps(nodes, registry: Registry) -> tuple[str, ...]:
    """``GradientPath.steps`` of ``nodes``."""
    steps: list[str] = []
    run: dict | None = None  # the residual run being walked: position, unit, layers skipped, last node
    neuron = None
    for name, index in nodes:
        parsed = names.parse(name)
        kind, layer = (parsed[0], parsed[1]) if parsed else (None, None)
        if kind in names.RESIDUAL:
            if run is None or (run["position"], run["unit"]) != (index[1], index[-1]):
                run = dict(position=index[1], unit=index[-1], layers=set(), last=None, step=None)
            previous = run["last"]
            if previous is not None and previous[1] == layer and names.RESIDUAL.index(previous[0]) < names.RESIDUAL.index(kind):
                run["layers"].add(layer)  # a hop past a sublayer of this layer: the residual skip
            run["last"] = (kind, layer)
            n = len(run["layers"])
            if n:  # a run that skips no sublayer is only the hop between two components: not a step
                if run["step"] is None:
                    run["step"] = len(steps)
                    steps.append("")
                steps[run["step"]] = f"resid@{run['position']}[{run['unit']}] × {n} layer{'s' if n != 1 else ''}"
            continue
        run = None
        if kind in _EMBEDS:
            step = f"{_EMBEDS[kind]}@{index[1]}[{index[-1]}]"
        elif kind == "mlp_post":
            neuron = index[-1]
            continue
        elif kind == "logits":
            step = f"logit[{index[-1]}]"
        elif kind == "metric":
            step = names.METRIC
        elif registry.kind_of_node(name) is not None:
            component, layer = registry.kind_of_node(name)
            head = index[2] if component in ("q", "k", "v", "head") else None
            step = registry.label(Component(component, layer, head, index[1]))
            if component == "mlp" and neuron is not None:
                step += f" (neuron {neuron})"
        else:
            continue  # inside a component, or the final norm
        if not steps or steps[-1] != step:
            steps.append(step)
    return tuple(steps)


def gradient_flow(graph: GradGraph, *, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Total |gradient| flow through every node element: Σ over input→metric paths through it of Π|w|.

    ``{node: [*shape]}``, computed as forward ⊗ backward in the ``Abs`` semiring, in float64 by
    default (the sums of a 30-layer model overflow float32).
    """
    return {node: value[0] for node, value in through(graph, Abs, dtype=dtype).items()}


def path_entropy(graph: GradGraph) -> torch.Tensor:
    """``[batch]``: entropy (nats) of the distribution over input→metric paths with p ∝ Π|w|."""
    values = backprop(graph, Entropy)
    total = None
    for source in graph.sources:
        v = values[source].flatten(2)  # [2, batch, pos * d]
        v = Entropy.sum(v, 1)
        total = v if total is None else Entropy.plus(total, v)
    log_z, mean = total[0], total[1]
    return log_z - mean


def path_count(graph: GradGraph) -> torch.Tensor:
    """``[batch]``: log of the number of input → metric paths (``Count``), the largest entropy a
    distribution over them can have."""
    values = backprop(graph, Count)
    return torch.stack([Count.sum(values[s].flatten(2), 1)[0] for s in graph.sources]).logsumexp(0)


def normalised_entropy(graph: GradGraph) -> torch.Tensor:
    """``[batch]``: ``path_entropy / log(number of paths)`` in [0, 1] (1: every path equally heavy),
    comparable across prompts of different lengths, whose path counts differ by orders of magnitude."""
    return path_entropy(graph) / path_count(graph)


def source_positions(graph: GradGraph, sources) -> list[set[int]]:
    """Per batch item, the input positions paths may start at: ``None`` every real position; an
    int or a sequence of ints (negative: from each prompt's last real token) for every item; a
    ``[batch]`` tensor one position per item; or a list of per-item sequences."""
    lengths = graph.attention_mask.sum(1).tolist()
    B = graph.batch_size
    if sources is None:
        per_item = [range(n) for n in lengths]
    elif isinstance(sources, torch.Tensor):
        if sources.ndim != 1 or len(sources) != B:
            raise GradGraphError(f"a sources tensor holds one position per item, [{B}]; got {tuple(sources.shape)}")
        per_item = [[int(p)] for p in sources]
    elif isinstance(sources, int):
        per_item = [[sources]] * B
    else:
        sources = list(sources)
        nested = sources and all(isinstance(s, (list, tuple, range)) for s in sources)
        if nested and len(sources) != B:
            raise GradGraphError(f"per-item sources need one list per item ({B}), got {len(sources)}")
        per_item = [list(s) for s in sources] if nested else [sources] * B
    out = []
    for b, positions in enumerate(per_item):
        chosen = set()
        for p in positions:
            q = int(p) + lengths[b] if int(p) < 0 else int(p)
            if not 0 <= q < lengths[b]:
                raise GradGraphError(f"source position {p} is outside item {b}'s {lengths[b]} tokens")
            chosen.add(q)
        out.append(chosen)
    return out


def top_paths(graph: GradGraph, k: int = 1, *, items: list[int] | None = None, sources=None,
              best: dict[str, torch.Tensor] | None = None) -> list[list[GradientPath]]:
    """The ``k`` highest-weighted (by Π|w|) input → metric paths, for each batch item.

    Best-first search guided by the exact ``Max`` values of every node (A* with an exact
    heuristic): the i-th complete path popped is the i-th best, so the search expands only
    prefixes of paths that can still rank in the top k. ``items`` limits the search to some batch
    items (the others get empty lists). ``sources`` restricts the paths to those starting at some
    input positions (``source_positions``: the subject, say; the best paths overall start at the
    last token). ``gradgraph.components.top_component_paths`` collapses them into component sequences.
    ``best``: ``backprop(graph, Max)``'s values, when the caller has them (one pass serves many searches).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GradGraphError(f"top_paths needs k >= 1 paths, got {k!r}")
    starts = source_positions(graph, sources)
    best = backprop(graph, Max) if best is None else best
    flat_best = {node: value[0].reshape(-1).double() for node, value in best.items()}
    chosen = range(graph.batch_size) if items is None else set(items)
    registry = Registry.of(graph)
    return [_search(graph, flat_best, b, k, starts[b], registry) if b in chosen else [] for b in range(graph.batch_size)]


def _search(graph: GradGraph, flat_best: dict, batch: int, k: int, positions: set[int],
            registry: Registry) -> list[GradientPath]:
    counter = itertools.count()
    heap: list = []
    for source in graph.sources:
        shape = graph.shapes[source]
        per_item = flat_best[source].view(shape[0], -1)[batch]
        offset = batch * per_item.numel()
        for local in per_item.nonzero()[:, 0].tolist():
            flat = offset + local
            position = graph.index(source, flat)[1]
            if graph.source_mask[batch, position] and position in positions:
                heapq.heappush(heap, (-float(per_item[local]), next(counter), 1.0, ((source, flat),)))
    found: list[GradientPath] = []
    while heap and len(found) < k:
        _, _, weight, steps = heapq.heappop(heap)
        node, flat = steps[-1]
        if node == names.METRIC:
            found.append(GradientPath(weight, tuple((n, graph.index(n, f)) for n, f in steps), registry))
            continue
        for edge in graph.edges_from(node):
            targets, weights = edge.out_edges(graph.shapes, flat)
            completion = flat_best[edge.tgt][targets] * weights.abs()
            for target, w, bound in zip(targets.tolist(), weights.tolist(), completion.tolist()):
                if bound > 0:
                    new_weight = weight * w
                    heapq.heappush(heap, (-abs(weight) * bound, next(counter), new_weight, steps + ((edge.tgt, target),)))
    return found
