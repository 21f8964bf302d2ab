"""The gradient graph: nodes are activation tensors, edges are typed blocks of local derivatives.

Semantically the graph is the *scalar* gradient graph: one node per tensor element, one edge per
non-zero local partial derivative ∂tgt/∂src. It is stored lazily as blocks:

- ``Identity``: same shape, weight 1 (residual additions, copies);
- ``Broadcast``: ``tgt = src.unsqueeze(dim).expand(n)``, weight 1 (per-head copies of the residual);
- ``Diag``: ``tgt[..., j] = Σ_parts w[..., j] · src[..., perm[j]]`` (element-wise functions; the
  rotary rotation is two parts, the second with the pair permutation);
- ``Matmul``: ``tgt[n, i, k] = Σ_j src[n, i, j] W[n, j, k]`` (node on the left) or
  ``Σ_j W[n, i, j] src[n, j, k]`` (node on the right), after rearranging both nodes to this
  canonical ``[n, i, j]`` layout with einops patterns. ``W`` is ``[1, J, K]`` for a weight shared
  across positions (W_Q, W_in, ...), or one matrix per row (a per-position Jacobian; one operand of
  a bilinear product, e.g. the keys for the q·k scores). An optional mask removes target elements
  that are constants (causally masked scores, padding).

Each block knows how to move semiring values backward (towards its source) and forward, using
only the semiring's operations, and how to list its scalar edges (for ``to_networkx``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import einops
import networkx as nx
import torch

from gradgraph import hooks
from gradgraph.errors import GradGraphError
from gradgraph.semirings import Semiring

NETWORKX_EDGE_LIMIT = 200_000
LOGITS = hooks.name("logits")


def _op_plus(sr: Semiring, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sr.op_sum(torch.stack([a, b], 1), 0)


@dataclass
class Identity:
    src: str
    tgt: str

    def backward(self, sr: Semiring, value: torch.Tensor, op: bool) -> torch.Tensor:
        return value

    def forward(self, sr: Semiring, value: torch.Tensor, op: bool) -> torch.Tensor:
        return value

    def scalar_edges(self, shapes: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = torch.arange(_numel(shapes[self.src]))
        return flat, flat, torch.ones(flat.shape, dtype=torch.float64)

    def out_edges(self, shapes: dict, flat: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets (flat indices) and weights of the scalar edges leaving source element ``flat``."""
        return torch.tensor([flat]), torch.ones(1, dtype=torch.float64)


@dataclass
class Broadcast:
    src: str
    tgt: str
    dim: int  # the new dim in the target's shape
    n: int

    def backward(self, sr, value, op):
        return sr.op_sum(value, self.dim) if op else sr.sum(value, self.dim)

    def forward(self, sr, value, op):
        shape = list(value.shape)
        shape.insert(self.dim + 1, self.n)
        return value.unsqueeze(self.dim + 1).expand(shape).contiguous()

    def scalar_edges(self, shapes):
        src_shape = shapes[self.src]
        src_flat = torch.arange(_numel(src_shape)).view(src_shape)
        src_idx = src_flat.unsqueeze(self.dim).expand(shapes[self.tgt]).reshape(-1)
        tgt_idx = torch.arange(_numel(shapes[self.tgt]))
        return src_idx, tgt_idx, torch.ones(tgt_idx.shape, dtype=torch.float64)

    def out_edges(self, shapes, flat):
        idx = torch.unravel_index(torch.tensor(flat), shapes[self.src])
        tgt_flat = torch.arange(_numel(shapes[self.tgt])).view(shapes[self.tgt])
        lead = tuple(int(i) for i in idx[: self.dim])
        rest = tuple(int(i) for i in idx[self.dim :])
        targets = tgt_flat[lead + (slice(None),) + rest]
        return targets.reshape(-1), torch.ones(self.n, dtype=torch.float64)


@dataclass
class Diag:
    src: str
    tgt: str
    parts: list[tuple[torch.Tensor, torch.Tensor | None]]  # (weight [*tgt shape], perm [last dim] or None)

    def backward(self, sr, value, op):
        total = None
        for weight, perm in self.parts:
            contribution = sr.times(sr.convert(weight), value)
            if perm is not None:
                contribution = contribution[..., torch.argsort(perm)]
            total = contribution if total is None else (_op_plus(sr, total, contribution) if op else sr.plus(total, contribution))
        return total

    def forward(self, sr, value, op):
        total = None
        for weight, perm in self.parts:
            moved = value if perm is None else value[..., perm]
            contribution = sr.times(sr.convert(weight), moved)
            total = contribution if total is None else (_op_plus(sr, total, contribution) if op else sr.plus(total, contribution))
        return total

    def scalar_edges(self, shapes):
        shape = shapes[self.tgt]
        tgt_flat = torch.arange(_numel(shape)).view(shape)
        srcs, tgts, weights = [], [], []
        for weight, perm in self.parts:
            src_flat = tgt_flat if perm is None else tgt_flat[..., perm]
            keep = (weight != 0).reshape(-1).cpu()
            srcs.append(src_flat.reshape(-1)[keep])
            tgts.append(tgt_flat.reshape(-1)[keep])
            weights.append(weight.reshape(-1).cpu().double()[keep])
        return torch.cat(srcs), torch.cat(tgts), torch.cat(weights)

    def out_edges(self, shapes, flat):
        shape = shapes[self.tgt]
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape))
        targets, weights = [], []
        for weight, perm in self.parts:
            last = idx[-1] if perm is None else int(torch.argsort(perm)[idx[-1]])
            at = idx[:-1] + (last,)
            w = float(weight[at])
            if w != 0:
                targets.append(int(torch.tensor(at).dot(torch.tensor(_strides(shape)))))
                weights.append(w)
        return torch.tensor(targets, dtype=torch.long), torch.tensor(weights, dtype=torch.float64)


@dataclass
class Matmul:
    """A linear block in canonical layout; see the module docstring."""

    src: str
    tgt: str
    weight: torch.Tensor  # [N or 1, J, K] (node left) or [N or 1, I, J] (node right)
    node_left: bool
    src_pattern: str  # einops: node axes -> "n i j" (left) or "n j k" (right)
    tgt_pattern: str  # einops: node axes -> "n i k"
    axes: dict = field(default_factory=dict)  # axis lengths for the inverse patterns
    tgt_mask: torch.Tensor | None = None  # [N, I, K] bool, False where the target is a constant

    def _to(self, pattern: str, value: torch.Tensor) -> torch.Tensor:
        left, right = pattern.split("->")
        return einops.rearrange(value, f"s {left} -> s {right}", **_used(self.axes, pattern))

    def _from(self, pattern: str, value: torch.Tensor) -> torch.Tensor:
        left, right = pattern.split("->")
        return einops.rearrange(value, f"s {right} -> s {left}", **_used(self.axes, pattern))

    def _masked(self, sr: Semiring, value: torch.Tensor) -> torch.Tensor:
        if self.tgt_mask is None:
            return value
        zero = sr.zero(value.shape[1:], dtype=value.dtype, device=value.device)
        return torch.where(self.tgt_mask, value, zero)

    def backward(self, sr, value, op):
        mm = sr.op_matmul if op else sr.matmul
        v = self._masked(sr, self._to(self.tgt_pattern, value))  # [S, N, I, K]
        if self.node_left:  # src[n, i, j] = ⊕_k v[n, i, k] ⊗ W[n, j, k]
            out = mm(v, self.weight.to(value.dtype).transpose(-1, -2))
        else:  # src[n, j, k] = ⊕_i W[n, i, j] ⊗ v[n, i, k]
            out = mm(v.transpose(-1, -2), self.weight.to(value.dtype)).transpose(-1, -2)
        return self._from(self.src_pattern, out)

    def forward(self, sr, value, op):
        mm = sr.op_matmul if op else sr.matmul
        x = self._to(self.src_pattern, value)
        weight = self.weight.to(value.dtype)
        if self.node_left:
            out = mm(x, weight)
        else:
            out = mm(x.transpose(-1, -2), weight.transpose(-1, -2)).transpose(-1, -2)
        return self._from(self.tgt_pattern, self._masked(sr, out))

    def _canonical(self, shapes: dict, which: str) -> torch.Tensor:
        """Flat node indices laid out canonically ([n, i, j] for src, [n, i, k] for tgt), cached."""
        cache = self.__dict__.setdefault("_canon_cache", {})
        if which not in cache:
            name, pattern = (self.src, self.src_pattern) if which == "src" else (self.tgt, self.tgt_pattern)
            cache[which] = self._to(pattern, torch.arange(_numel(shapes[name])).view(1, *shapes[name]))[0]
            cache[which + "_inverse"] = torch.argsort(cache[which].reshape(-1))
        return cache[which]

    def out_edges(self, shapes, flat):
        src_c = self._canonical(shapes, "src")
        tgt_c = self._canonical(shapes, "tgt")
        pos = int(self.__dict__["_canon_cache"]["src_inverse"][flat])
        n, a, b = (int(i) for i in torch.unravel_index(torch.tensor(pos), src_c.shape))
        wn = self.weight[0 if self.weight.shape[0] == 1 else n].detach().cpu().double()
        if self.node_left:  # src (n, i=a, j=b) -> tgt (n, a, k), weight W[n, b, k]
            weights, targets = wn[b], tgt_c[n, a]
            mask = None if self.tgt_mask is None else self.tgt_mask[n, a].cpu()
        else:  # src (n, j=a, k=b) -> tgt (n, i, b), weight W[n, i, a]
            weights, targets = wn[:, a], tgt_c[n, :, b]
            mask = None if self.tgt_mask is None else self.tgt_mask[n, :, b].cpu()
        keep = weights != 0
        if mask is not None:
            keep = keep & mask
        return targets[keep], weights[keep]

    def scalar_edges(self, shapes):
        src_flat = self._to(self.src_pattern, torch.arange(_numel(shapes[self.src])).view(1, *shapes[self.src]))[0]
        tgt_flat = self._to(self.tgt_pattern, torch.arange(_numel(shapes[self.tgt])).view(1, *shapes[self.tgt]))[0]
        weight = self.weight.detach().cpu().double()
        if self.node_left:  # edge src[n,i,j] -> tgt[n,i,k], weight W[n,j,k]
            N, I, J = src_flat.shape
            K = tgt_flat.shape[-1]
            s = src_flat[:, :, :, None].expand(N, I, J, K)
            t = tgt_flat[:, :, None, :].expand(N, I, J, K)
            w = weight[:, None, :, :].expand(N, I, J, K)
            mask = None if self.tgt_mask is None else self.tgt_mask.cpu()[:, :, None, :].expand(N, I, J, K)
        else:  # edge src[n,j,k] -> tgt[n,i,k], weight W[n,i,j]
            N, J, K = src_flat.shape
            I = tgt_flat.shape[1]
            s = src_flat[:, None, :, :].expand(N, I, J, K)
            t = tgt_flat[:, :, None, :].expand(N, I, J, K)
            w = weight[:, :, :, None].expand(N, I, J, K)
            mask = None if self.tgt_mask is None else self.tgt_mask.cpu()[:, :, None, :].expand(N, I, J, K)
        keep = w != 0
        if mask is not None:
            keep = keep & mask
        return s[keep], t[keep], w[keep]


Edge = Identity | Broadcast | Diag | Matmul


def _strides(shape) -> list[int]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return strides[::-1]


def _used(axes: dict, pattern: str) -> dict:
    names = set(pattern.replace("(", " ").replace(")", " ").replace("->", " ").split())
    return {k: v for k, v in axes.items() if k in names}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class GradGraph:
    """Nodes (name -> shape, topological order), edge blocks, and what the forward pass recorded.

    ``sources`` are the input embedding nodes; ``source_mask`` says which of their elements are
    real tokens (padding carries nothing); the one sink is ``"metric"`` of shape ``[batch]``.
    ``logit_ids`` are the vocabulary ids kept in the logits node ``unembed.hook_out`` (its last
    dim): only logits the metric depends on are nodes, since no other logit lies on a path to it.
    """

    shapes: dict[str, tuple[int, ...]]
    order: list[str]
    edges: list[Edge]
    sources: list[str]
    source_mask: torch.Tensor  # [batch, pos] bool
    activations: dict[str, torch.Tensor]
    metric_value: torch.Tensor  # [batch]
    logit_ids: torch.Tensor  # [n kept]
    tokens: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    n_layers: int
    n_heads: int
    n_key_value_heads: int

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def n_scalar_edges(self) -> int:
        """The number of scalar edges (counted without materialising them where cheap)."""
        total = 0
        for edge in self.edges:
            if isinstance(edge, (Identity, Broadcast)):
                total += _numel(self.shapes[edge.tgt])
            elif isinstance(edge, Diag):
                total += sum(int((w != 0).sum()) for w, _ in edge.parts)
            else:
                total += _matmul_edge_count(edge, self.shapes)
        return total

    def index(self, node: str, flat: int) -> tuple[int, ...]:
        """The element index tuple of a flat index in ``node`` (the logits' last index is the vocab id)."""
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), self.shapes[node]))
        if node == LOGITS:
            idx = idx[:-1] + (int(self.logit_ids[idx[-1]]),)
        return idx

    def to_networkx(self, *, limit: int = NETWORKX_EDGE_LIMIT) -> nx.DiGraph:
        """The scalar graph: nodes ``(name, index)``, edge attribute ``weight``, sink ``"metric"``.

        Metric elements ``("metric", (b,))`` all feed the one sink with weight 1. Refuses graphs
        with more than ``limit`` scalar edges.
        """
        size = self.n_scalar_edges()
        if size > limit:
            raise GradGraphError(
                f"the scalar graph has {size:,} edges, over the to_networkx limit of {limit:,}; "
                f"use a smaller model or fewer tokens, or work with backprop() on the block graph"
            )
        graph = nx.DiGraph()
        for edge in self.edges:
            src_idx, tgt_idx, weight = edge.scalar_edges(self.shapes)
            for s, t, w in zip(src_idx.tolist(), tgt_idx.tolist(), weight.tolist()):
                u, v = (edge.src, self.index(edge.src, s)), (edge.tgt, self.index(edge.tgt, t))
                if graph.has_edge(u, v):  # two parts of one op between the same pair: one edge
                    graph[u][v]["weight"] += w
                else:
                    graph.add_edge(u, v, weight=w)
        for b in range(self.batch_size):
            graph.add_edge(("metric", (b,)), "metric", weight=1.0)
        for source in self.sources:  # every real input element is a node, even one with no edge
            for flat in range(_numel(self.shapes[source])):
                idx = self.index(source, flat)
                if self.source_mask[idx[0], idx[1]]:
                    graph.add_node((source, idx))
        return graph


def _matmul_edge_count(edge: Matmul, shapes: dict) -> int:
    src = torch.zeros(shapes[edge.src])
    tgt = torch.zeros(shapes[edge.tgt])
    src_c = einops.rearrange(src, edge.src_pattern, **_used(edge.axes, edge.src_pattern))
    tgt_c = einops.rearrange(tgt, edge.tgt_pattern, **_used(edge.axes, edge.tgt_pattern))
    nonzero = (edge.weight != 0).double()
    if edge.node_left:  # per (n, i): nnz(W[n]) edges, restricted by the target mask
        N, I, J = src_c.shape
        K = tgt_c.shape[-1]
        if edge.tgt_mask is None:
            return int(nonzero.sum(dim=(1, 2)).expand(N).sum()) * I if nonzero.shape[0] == 1 else int(nonzero.sum()) * I
        per = torch.einsum("njk,nik->", nonzero.expand(N, J, K), edge.tgt_mask.double())
        return int(per)
    N, J, K = src_c.shape
    I = tgt_c.shape[1]
    mask = edge.tgt_mask.double() if edge.tgt_mask is not None else torch.ones(N, I, K, dtype=torch.float64)
    return int(torch.einsum("nij,nik->", nonzero.expand(N, I, J), mask))
