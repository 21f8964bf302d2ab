"""The gradient graph: nodes are activation tensors, edges are typed blocks of local derivatives.

Semantically the graph is the *scalar* gradient graph: one node per tensor element, one edge per
non-zero local partial derivative ∂tgt/∂src. It is stored lazily as blocks, each tagged with the
``op`` whose derivative it is (one of ``OPS``) and its ``layer`` (``None`` outside the layers):

- ``Identity``: same shape, weight 1 (residual sums, the residual read by the MLP);
- ``Reshape``: the same elements in another shape, weight 1 (into and out of a per-head q/k norm);
- ``Broadcast``: ``tgt = src.unsqueeze(dim).expand(n)``, weight 1 (per-head copies of the residual);
- ``Place``: ``src`` is a slice of ``tgt`` along one dim, weight 1 (a cached prefix's keys and the
  run's own keys in one node);
- ``Diag``: ``tgt[..., j] = Σ_parts w[..., j] · src[..., perm[j]]`` (element-wise functions; the
  rotary rotation is two parts, the second with the pair permutation). Weights broadcast to the
  target's shape;
- ``Contract`` / ``Spread``: ``tgt[..., 0] = Σ_j w[..., j] src[..., j]`` and
  ``tgt[..., j] = w[..., j] src[..., 0]`` (into and out of a norm's scale);
- ``Rank1``: along the last dim, ``tgt[..., k] = Σ_j src[..., j] J[j, k]`` with
  ``J = diag(a) + b cᵀ`` per row (a softmax: ``a = p, b = −p, c = p``; a LayerNorm's centring:
  ``a = 1, b = 1, c = −1/n``), applied in O(n) per row: no ``[rows, n, n]`` tensor exists;
- ``Matmul``: ``tgt[n, i, k] = Σ_j src[n, i, j] W[n, j, k]`` (node on the left) or
  ``Σ_j W[n, i, j] src[n, j, k]`` (node on the right), after rearranging both nodes to this
  canonical ``[n, i, j]`` layout with einops patterns. ``W`` is ``[1, J, K]`` for a weight shared
  across positions (W_Q, W_in, ...), or one matrix per row (one operand of a bilinear product,
  e.g. the keys for the q·k scores; ``weight_node`` then names the operand's node). An optional
  mask (broadcast to the target's shape) removes target elements that are constants (causally
  masked scores, padding).

Weights are ``gradgraph.weights.Weight`` objects: per-position weights are products of stored
activations formed when a pass needs them. Each block moves semiring values backward (towards its
source) and forward using only the semiring's operations; it also lists its scalar edges (for
``to_networkx``) and those leaving one element (for the top-path search).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

import einops
import networkx as nx
import torch

from gradgraph.arch import names
from gradgraph.errors import GradGraphError
from gradgraph.semirings import Semiring
from gradgraph.weights import Lazy, Weight, resolved

NETWORKX_EDGE_LIMIT = 200_000
LOGITS = names.name("logits")

# what a block is the derivative of
OPS = ("copy", "residual", "norm", "linear", "rotary", "bilinear", "softmax", "activation", "metric")


@dataclass(frozen=True, eq=False)
class Block:
    """An edge block: the local derivatives of ``tgt`` with respect to ``src`` under one op."""

    src: str
    tgt: str
    op: str
    layer: int | None
    _cache: dict = field(default_factory=dict, init=False, repr=False)  # listings for tiny graphs and path search

    def _memo(self, key: str, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def backward(self, sr: Semiring, value: torch.Tensor) -> torch.Tensor:
        """Values ``[S, *tgt shape]`` at the target → contributions ``[S, *src shape]`` at the source."""
        raise NotImplementedError

    def forward(self, sr: Semiring, value: torch.Tensor) -> torch.Tensor:
        """Values ``[S, *src shape]`` at the source → contributions ``[S, *tgt shape]`` at the target."""
        raise NotImplementedError

    def scalar_edges(self, shapes: Mapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat source indices, flat target indices and float64 weights of every scalar edge."""
        raise NotImplementedError

    def out_edges(self, shapes: Mapping, flat: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets (flat indices) and weights of the scalar edges leaving source element ``flat``."""
        raise NotImplementedError

    def n_edges(self, shapes: Mapping) -> int:
        """The number of scalar edges, counted without listing them."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Identity(Block):
    def backward(self, sr, value):
        return value

    def forward(self, sr, value):
        return value

    def scalar_edges(self, shapes):
        flat = torch.arange(_numel(shapes[self.src]))
        return flat, flat, torch.ones(flat.shape, dtype=torch.float64)

    def out_edges(self, shapes, flat):
        return torch.tensor([flat]), torch.ones(1, dtype=torch.float64)

    def n_edges(self, shapes):
        return _numel(shapes[self.tgt])


@dataclass(frozen=True, eq=False)
class Reshape(Identity):
    """``tgt = src.reshape(tgt shape)``, weight 1: the same elements in the same flat order (a q/k
    norm that TransformerLens applies to ``[batch·pos·head, d_head]`` rows)."""

    src_shape: tuple[int, ...]
    tgt_shape: tuple[int, ...]

    def backward(self, sr, value):
        return value.reshape(value.shape[0], *self.src_shape)

    def forward(self, sr, value):
        return value.reshape(value.shape[0], *self.tgt_shape)


@dataclass(frozen=True, eq=False)
class Broadcast(Block):
    dim: int  # the new dim in the target's shape
    n: int

    def backward(self, sr, value):
        return sr.sum(value, self.dim)

    def forward(self, sr, value):
        shape = list(value.shape)
        shape.insert(self.dim + 1, self.n)
        return value.unsqueeze(self.dim + 1).expand(shape)

    def scalar_edges(self, shapes):
        src_shape = shapes[self.src]
        src_flat = torch.arange(_numel(src_shape)).view(src_shape)
        src_idx = src_flat.unsqueeze(self.dim).expand(shapes[self.tgt]).reshape(-1)
        tgt_idx = torch.arange(_numel(shapes[self.tgt]))
        return src_idx, tgt_idx, torch.ones(tgt_idx.shape, dtype=torch.float64)

    def out_edges(self, shapes, flat):
        idx = _unravel(flat, shapes[self.src])
        tgt_flat = torch.arange(_numel(shapes[self.tgt])).view(shapes[self.tgt])
        targets = tgt_flat[idx[: self.dim] + (slice(None),) + idx[self.dim :]]
        return targets.reshape(-1), torch.ones(self.n, dtype=torch.float64)

    def n_edges(self, shapes):
        return _numel(shapes[self.tgt])


@dataclass(frozen=True, eq=False)
class Place(Block):
    """``tgt[..., start : start + length, ...] = src`` along ``dim`` (a cached prefix's keys, then
    the run's own, in one key node), weight 1; the target's other elements get nothing from it."""

    dim: int
    start: int
    length: int  # the source's extent along dim
    size: int  # the target's

    def backward(self, sr, value):
        return value.narrow(self.dim + 1, self.start, self.length)

    def forward(self, sr, value):
        shape = list(value.shape[1:])
        shape[self.dim] = self.size
        out = sr.zero(shape, dtype=value.dtype, device=value.device)
        out.narrow(self.dim + 1, self.start, self.length).copy_(value)
        return out

    def _index(self, shapes):
        """``[*src shape]``: the flat target index of each source element."""
        def make():
            tgt = torch.arange(_numel(shapes[self.tgt])).view(shapes[self.tgt])
            return tgt.narrow(self.dim, self.start, self.length)
        return self._memo("index", make)

    def scalar_edges(self, shapes):
        tgt = self._index(shapes).reshape(-1)
        return torch.arange(len(tgt)), tgt, torch.ones(len(tgt), dtype=torch.float64)

    def out_edges(self, shapes, flat):
        return self._index(shapes).reshape(-1)[flat : flat + 1], torch.ones(1, dtype=torch.float64)

    def n_edges(self, shapes):
        return _numel(shapes[self.src])


@dataclass(frozen=True, eq=False)
class Diag(Block):
    parts: tuple[tuple[Weight, torch.Tensor | None], ...]  # (weight, perm [last dim] or None)

    def _parts(self, sr, value, moving_back: bool):
        total = None
        for weight, perm in self.parts:
            w = sr.convert(weight.real(value.dtype))
            if moving_back:
                part = sr.times(w, value)
                part = part if perm is None else part[..., torch.argsort(perm)]
            else:
                part = sr.times(w, value if perm is None else value[..., perm])
            total = part if total is None else sr.plus(total, part)
        return total

    def backward(self, sr, value):
        return self._parts(sr, value, True)

    def forward(self, sr, value):
        return self._parts(sr, value, False)

    def _dense(self, shapes):
        shape = shapes[self.tgt]
        return self._memo("dense", lambda: [(weight.real(torch.float64).cpu().expand(shape), perm)
                                            for weight, perm in self.parts])

    def scalar_edges(self, shapes):
        tgt_flat = torch.arange(_numel(shapes[self.tgt])).view(shapes[self.tgt])
        srcs, tgts, weights = [], [], []
        for weight, perm in self._dense(shapes):
            src_flat = tgt_flat if perm is None else tgt_flat[..., perm]
            keep = (weight != 0).reshape(-1)
            srcs.append(src_flat.reshape(-1)[keep])
            tgts.append(tgt_flat.reshape(-1)[keep])
            weights.append(weight.reshape(-1)[keep])
        return torch.cat(srcs), torch.cat(tgts), torch.cat(weights)

    def out_edges(self, shapes, flat):
        shape = shapes[self.tgt]
        idx = _unravel(flat, shape)
        targets, weights = [], []
        for weight, perm in self._dense(shapes):
            last = idx[-1] if perm is None else int(torch.argsort(perm)[idx[-1]])
            at = idx[:-1] + (last,)
            if float(weight[at]) != 0:
                targets.append(_ravel(at, shape))
                weights.append(float(weight[at]))
        return torch.tensor(targets, dtype=torch.long), torch.tensor(weights, dtype=torch.float64)

    def n_edges(self, shapes):
        return sum(int((w != 0).sum()) for w, _ in self._dense(shapes))


@dataclass(frozen=True, eq=False)
class Contract(Block):
    """``tgt[..., 0] = Σ_j w[..., j] src[..., j]`` (a norm's input into its scale)."""

    weight: Weight  # broadcast to the source's shape

    def backward(self, sr, value):
        return sr.times(sr.convert(self.weight.real(value.dtype)), value)

    def forward(self, sr, value):
        return sr.sum(sr.times(sr.convert(self.weight.real(value.dtype)), value), value.ndim - 2).unsqueeze(-1)

    def _dense(self, shapes):
        return self._memo("dense", lambda: self.weight.real(torch.float64).cpu().expand(shapes[self.src]))

    def scalar_edges(self, shapes):
        w = self._dense(shapes)
        src = torch.arange(w.numel())
        tgt = src // w.shape[-1]
        keep = w.reshape(-1) != 0
        return src[keep], tgt[keep], w.reshape(-1)[keep]

    def out_edges(self, shapes, flat):
        w = float(self._dense(shapes)[_unravel(flat, shapes[self.src])])
        n = shapes[self.src][-1]
        return (torch.tensor([flat // n]), torch.tensor([w], dtype=torch.float64)) if w != 0 else _no_edges()

    def n_edges(self, shapes):
        return int((self._dense(shapes) != 0).sum())


@dataclass(frozen=True, eq=False)
class Spread(Block):
    """``tgt[..., j] = w[..., j] src[..., 0]`` (a norm's scale into its output)."""

    weight: Weight  # broadcast to the target's shape

    def backward(self, sr, value):
        return sr.sum(sr.times(sr.convert(self.weight.real(value.dtype)), value), value.ndim - 2).unsqueeze(-1)

    def forward(self, sr, value):
        return sr.times(sr.convert(self.weight.real(value.dtype)), value)

    def _dense(self, shapes):
        return self._memo("dense", lambda: self.weight.real(torch.float64).cpu().expand(shapes[self.tgt]))

    def scalar_edges(self, shapes):
        w = self._dense(shapes)
        tgt = torch.arange(w.numel())
        src = tgt // w.shape[-1]
        keep = w.reshape(-1) != 0
        return src[keep], tgt[keep], w.reshape(-1)[keep]

    def out_edges(self, shapes, flat):
        w = self._dense(shapes)
        n = w.shape[-1]
        row = w[_unravel(flat, w.shape[:-1])]
        keep = row != 0
        return (flat * n + torch.arange(n))[keep], row[keep]

    def n_edges(self, shapes):
        return int((self._dense(shapes) != 0).sum())


@dataclass(frozen=True, eq=False)
class Rank1(Block):
    """Per row of the last dim, ``J = diag(a) + b cᵀ`` (``J[j, k] = ∂tgt_k / ∂src_j``); source and
    target have the same shape and ``a, b, c`` broadcast to it."""

    a: Weight
    b: Weight
    c: Weight

    def _factors(self, dtype):
        made: dict[int, torch.Tensor] = {}  # a softmax's a and c are one weight: form it once
        return tuple(made.setdefault(id(f), f.real(dtype)) for f in (self.a, self.b, self.c))

    def backward(self, sr, value):
        a, b, c = self._factors(value.dtype)
        return sr.rank1(value, a, b, c)

    def forward(self, sr, value):  # Jᵀ = diag(a) + c bᵀ
        a, b, c = self._factors(value.dtype)
        return sr.rank1(value, a, c, b)

    def _dense(self, shapes, row: int | None = None):
        """``J`` of every row ``[rows, j, k]``, or of one row ``[j, k]``."""
        shape = shapes[self.tgt]
        factors = self._memo("factors", lambda: [f.cpu().expand(shape) for f in self._factors(torch.float64)])
        if row is None:
            a, b, c = (f.reshape(-1, shape[-1]) for f in factors)
        else:
            index = _unravel(row, shape[:-1])
            a, b, c = (f[index] for f in factors)
        return torch.diag_embed(a) + b[..., :, None] * c[..., None, :]

    def scalar_edges(self, shapes):
        jac = self._dense(shapes)
        rows, n = jac.shape[0], jac.shape[-1]
        base = (torch.arange(rows) * n)[:, None, None]
        src = (base + torch.arange(n)[None, :, None]).expand_as(jac).reshape(-1)
        tgt = (base + torch.arange(n)[None, None, :]).expand_as(jac).reshape(-1)
        w = jac.reshape(-1)
        keep = w != 0
        return src[keep], tgt[keep], w[keep]

    def out_edges(self, shapes, flat):
        n = shapes[self.tgt][-1]
        row, j = divmod(flat, n)
        weights = self._dense(shapes, row)[j]
        keep = weights != 0
        return (row * n + torch.arange(n))[keep], weights[keep]

    def n_edges(self, shapes):
        shape = shapes[self.tgt]
        a, b, c = (f.expand(shape) for f in self._factors(torch.float64))
        off = ((b != 0).sum(-1) * (c != 0).sum(-1) - ((b != 0) & (c != 0)).sum(-1)).sum()
        return int(off + ((a + b * c) != 0).sum())


@dataclass(frozen=True, eq=False)
class Matmul(Block):
    """A linear block in canonical layout; see the module docstring."""

    weight: Weight  # [N or 1, J, K] (node left) or [N or 1, I, J] (node right)
    node_left: bool
    src_pattern: str  # einops: node axes -> "n i j" (left) or "n j k" (right)
    tgt_pattern: str  # einops: node axes -> "n i k"
    axes: dict = field(default_factory=dict)  # axis lengths for the inverse patterns
    tgt_mask: torch.Tensor | None = None  # bool, broadcast to the target's shape: False = a constant
    weight_node: str | None = None  # the node whose activation the weight is (bilinear operands)
    weight_pattern: str | None = None  # einops: that node's axes -> the weight's canonical layout
    tgt_scale: Weight | None = None  # broadcast to the target's shape: W[j, k] · scale[k] (LRP's ε and z rules)

    def _to(self, pattern: str, value: torch.Tensor) -> torch.Tensor:
        left, right = pattern.split("->")
        return einops.rearrange(value, f"s {left} -> s {right}", **_used(self.axes, pattern))

    def _from(self, pattern: str, value: torch.Tensor) -> torch.Tensor:
        left, right = pattern.split("->")
        return einops.rearrange(value, f"s {right} -> s {left}", **_used(self.axes, pattern))

    def _masked(self, sr: Semiring, value: torch.Tensor) -> torch.Tensor:
        return value if self.tgt_mask is None else sr.select(self.tgt_mask, value, self._cache)

    def _scaled(self, sr: Semiring, value: torch.Tensor) -> torch.Tensor:
        if self.tgt_scale is None:
            return value
        return sr.times(sr.convert(self.tgt_scale.real(value.dtype)), value)

    def backward(self, sr, value):
        v = self._to(self.tgt_pattern, self._scaled(sr, self._masked(sr, value)))  # [S, N, I, K]
        if self.node_left:  # src[n, i, j] = ⊕_k v[n, i, k] ⊗ W[n, j, k]
            out = sr.matmul(v, _Transposed(self.weight))
        else:  # src[n, j, k] = ⊕_i W[n, i, j] ⊗ v[n, i, k]
            out = sr.matmul(v.transpose(-1, -2), self.weight).transpose(-1, -2)
        return self._from(self.src_pattern, out)

    def summed(self, sr: Semiring, value: torch.Tensor) -> torch.Tensor | None:
        """``backward``'s contribution ⊕-summed over the source's per-head copies (its canonical ``n``,
        node dim 2 of ``b p h d``), kept as one copy: one product over (head, k) for a shared weight
        (q, k, v from ln1's copies); None where the block is not of that form."""
        if not (self.node_left and self.weight.shared and self.src_pattern == "b p h d -> h (b p) d"
                and len(self.weight.shape) == 3):
            return None
        v = self._to(self.tgt_pattern, self._scaled(sr, self._masked(sr, value)))  # [S, N, I, K]
        S, N, I, K = v.shape
        out = sr.matmul(v.permute(0, 2, 1, 3).reshape(S, 1, I, N * K), _Stacked(self.weight))  # [S, 1, I, J]
        b, p = self.axes["b"], self.axes["p"]
        return out.reshape(S, b, p, 1, out.shape[-1])

    def forward(self, sr, value):
        x = self._to(self.src_pattern, value)
        if self.node_left:
            out = sr.matmul(x, self.weight)
        else:
            out = sr.matmul(x.transpose(-1, -2), _Transposed(self.weight)).transpose(-1, -2)
        return self._scaled(sr, self._masked(sr, self._from(self.tgt_pattern, out)))

    def weight_flow(self, sr: Semiring, src_value: torch.Tensor, tgt_value: torch.Tensor) -> torch.Tensor:
        """The ⊕ over the scalar edges that each weight element carries, of forward (at the source) ⊗
        weight ⊗ backward (at the target), in the layout of ``weight_node``: for ``pattern → z``'s
        partner ``v → z`` (weight = the pattern), the flow from each key position into each query
        position's head output. Plain semirings only (values are path weights: Real, Abs, Max)."""
        if not sr.plain or self.weight_node is None:
            raise GradGraphError(f"weight_flow needs a plain semiring (Real, Abs, Max) and a bilinear block; "
                                 f"got {sr.name} on {self.src} → {self.tgt}")
        fwd = self._to(self.src_pattern, src_value)
        bwd = self._to(self.tgt_pattern, self._scaled(sr, self._masked(sr, tgt_value)))
        if self.node_left:  # W[n, j, k]: ⊕_i fwd[n, i, j] ⊗ bwd[n, i, k]
            paired = sr.matmul(fwd.transpose(-1, -2), Weight(bwd[0]))
        else:  # W[n, i, j]: ⊕_k bwd[n, i, k] ⊗ fwd[n, j, k]
            paired = sr.matmul(bwd, Weight(fwd[0].transpose(-1, -2)))
        flow = sr.times(sr.convert(self.weight.real(paired.dtype)), paired)
        left, right = self.weight_pattern.split("->")
        return einops.rearrange(flow, f"s {right} -> s {left}", **_used(self.axes, self.weight_pattern))

    def _canonical(self, shapes: Mapping, which: str) -> torch.Tensor:
        """Flat node indices laid out canonically (``[n, i, j]`` for src, ``[n, i, k]`` for tgt)."""
        name, pattern = (self.src, self.src_pattern) if which == "src" else (self.tgt, self.tgt_pattern)
        return self._memo(which, lambda: self._to(pattern, torch.arange(_numel(shapes[name])).view(1, *shapes[name]))[0])

    def _mask(self, shapes: Mapping) -> torch.Tensor:
        """The target mask in canonical layout ``[N, I, K]`` (all True without one)."""

        def make():
            shape = shapes[self.tgt]
            mask = torch.ones(shape, dtype=torch.bool) if self.tgt_mask is None else self.tgt_mask.cpu().expand(shape)
            return self._to(self.tgt_pattern, mask[None])[0]

        return self._memo("mask", make)

    def _scale(self, shapes: Mapping) -> torch.Tensor | None:
        """The target scale in canonical layout ``[N, I, K]``, float64 (None without one)."""
        if self.tgt_scale is None:
            return None
        return self._memo("scale", lambda: self._to(
            self.tgt_pattern, self.tgt_scale.real(torch.float64).cpu().expand(shapes[self.tgt])[None])[0])

    def _weight(self) -> torch.Tensor:
        """The weight in its own dtype (rows become float64 where they are listed)."""
        return self._memo("weight", lambda: self.weight.real(self.weight.dtype).cpu())

    def out_edges(self, shapes, flat):
        src_c = self._canonical(shapes, "src")
        tgt_c = self._canonical(shapes, "tgt")
        inverse = self._memo("src_inverse", lambda: torch.argsort(src_c.reshape(-1)))
        pos = int(inverse[flat])
        n, a, b = _unravel(pos, src_c.shape)
        weight = self._weight()
        wn = weight[0 if weight.shape[0] == 1 else n]
        mask = self._mask(shapes)
        scale = self._scale(shapes)
        if self.node_left:  # src (n, i=a, j=b) -> tgt (n, a, k), weight W[n, b, k]
            weights, targets, keep = wn[b].double(), tgt_c[n, a], mask[n, a]
            weights = weights if scale is None else weights * scale[n, a]
        else:  # src (n, j=a, k=b) -> tgt (n, i, b), weight W[n, i, a]
            weights, targets, keep = wn[:, a].double(), tgt_c[n, :, b], mask[n, :, b]
            weights = weights if scale is None else weights * scale[n, :, b]
        keep = keep & (weights != 0)
        return targets[keep], weights[keep]

    def _expanded(self, shapes):
        """(source, target, weight, keep) over every (n, i, j, k) of the product."""
        src_flat, tgt_flat = self._canonical(shapes, "src"), self._canonical(shapes, "tgt")
        weight, mask = self._weight(), self._mask(shapes)
        if self.node_left:  # edge src[n,i,j] -> tgt[n,i,k], weight W[n,j,k]
            N, I, J = src_flat.shape
            K = tgt_flat.shape[-1]
            s = src_flat[:, :, :, None].expand(N, I, J, K)
            w = weight[:, None, :, :].expand(N, I, J, K)
        else:  # edge src[n,j,k] -> tgt[n,i,k], weight W[n,i,j]
            N, J, K = src_flat.shape
            I = tgt_flat.shape[1]
            s = src_flat[:, None, :, :].expand(N, I, J, K)
            w = weight[:, :, :, None].expand(N, I, J, K)
        t = tgt_flat[:, :, None, :].expand(N, I, J, K)
        scale = self._scale(shapes)
        if scale is not None:
            w = w.double() * scale[:, :, None, :]
        keep = (w != 0) & mask[:, :, None, :].expand(N, I, J, K)
        return s, t, w, keep

    def scalar_edges(self, shapes):
        s, t, w, keep = self._expanded(shapes)
        return s[keep], t[keep], w[keep].double()

    def n_edges(self, shapes):
        nonzero = (self._weight() != 0).double()
        mask = self._mask(shapes).double()
        src_c = self._canonical(shapes, "src")
        if self.node_left:  # per (n, i, k): the j with W[n, j, k] != 0
            per = torch.einsum("njk,nik->", nonzero.expand(src_c.shape[0], -1, -1), mask)
        else:  # per (n, i, k): the j with W[n, i, j] != 0
            per = torch.einsum("nij,nik->", nonzero.expand(src_c.shape[0], -1, -1), mask)
        return int(per)


@dataclass(frozen=True, eq=False)
class SignSplit(Block):
    """A linear map whose weight depends on the sign of each source element: ``positive``'s weight
    where ``src > 0``, ``negative``'s where ``src < 0``, no edge where ``src = 0`` (LRP's α1β0 rule
    as a modified gradient: W⁺ for positive inputs, W⁻ for negative ones). Two shared-weight
    products per pass; the selection is exact in every semiring since the two sets are disjoint."""

    positive: Matmul
    negative: Matmul
    src_positive: torch.Tensor  # bool, broadcast to the source's shape
    src_negative: torch.Tensor

    def backward(self, sr, value):
        return sr.plus(sr.select(self.src_positive, self.positive.backward(sr, value), self._cache),
                       sr.select(self.src_negative, self.negative.backward(sr, value), self._cache))  # disjoint

    def forward(self, sr, value):
        return sr.plus(self.positive.forward(sr, sr.select(self.src_positive, value, self._cache)),
                       self.negative.forward(sr, sr.select(self.src_negative, value, self._cache)))

    def scalar_edges(self, shapes):
        out = []
        for block, mask in ((self.positive, self.src_positive), (self.negative, self.src_negative)):
            src, tgt, w = block.scalar_edges(shapes)
            keep = mask.cpu().expand(shapes[self.src]).reshape(-1)[src]
            out.append((src[keep], tgt[keep], w[keep]))
        return tuple(torch.cat(parts) for parts in zip(*out))

    def out_edges(self, shapes, flat):
        for block, mask in ((self.positive, self.src_positive), (self.negative, self.src_negative)):
            if bool(mask.cpu().expand(shapes[self.src]).reshape(-1)[flat]):
                return block.out_edges(shapes, flat)
        return _no_edges()

    def n_edges(self, shapes):  # an upper bound: both halves
        return self.positive.n_edges(shapes) + self.negative.n_edges(shapes)


@dataclass(frozen=True, eq=False)
class Pending(Block):
    """A block whose weights depend on the Real value arriving at its target (Chefer et al.'s
    normalised residual rule). ``freeze(value [1, *tgt shape]) -> Block`` makes the fixed block;
    the builder runs one ``backprop(graph, Real)`` in which each pending block freezes itself, and
    returns the graph with the frozen blocks. No other semiring ever sees a pending block."""

    freeze: Callable[[torch.Tensor], Block]

    def backward(self, sr, value):
        if sr.name != "Real":
            raise GradGraphError(f"{self.src} → {self.tgt} has weights that depend on the relevance arriving; "
                                 f"build the graph with build_graph, which fixes them")
        frozen = self.freeze(value)
        self._cache["frozen"] = frozen
        return frozen.backward(sr, value)

    def forward(self, sr, value):
        raise GradGraphError(f"{self.src} → {self.tgt} is not fixed yet; build the graph with build_graph")

    def frozen(self, shapes: Mapping) -> Block:
        """The fixed block (fixed with a zero value if the pass never reached its target)."""
        if "frozen" not in self._cache:
            self._cache["frozen"] = self.freeze(torch.zeros((1, *shapes[self.tgt])))
        return self._cache["frozen"]


class _Transposed(Weight):
    """``W`` with its last two dims swapped: views of ``W``'s own (cached) values and ``|W| log |W|``;
    a shared matrix's ``|Wᵀ|`` is kept laid out as read (the max–times kernels read its rows, and a
    transposed copy per product cost as much as the product; BLAS reads either layout)."""

    def __init__(self, base: Weight):
        self.base = base

    @property
    def shape(self):
        s = self.base.shape
        return s[:-2] + (s[-1], s[-2])

    def real(self, dtype):
        return self.base.real(dtype).transpose(-1, -2)

    def indicator(self, dtype):
        return self.base.indicator(dtype).transpose(-1, -2)

    def abs(self, dtype):
        if not self.base.shared:
            return self.base.abs(dtype).transpose(-1, -2)
        return self.base._get("abs_t", dtype, lambda: self.base.magnitude(dtype).transpose(-1, -2).contiguous())

    def xlogx(self, dtype, magnitude=None):
        return self.base.xlogx(dtype, None if magnitude is None else magnitude.transpose(-1, -2)).transpose(-1, -2)


class _Stacked(Weight):
    """A shared ``W`` ``[N, J, K]`` read as ``Wᵀ`` with its N matrices stacked, ``[1, N·K, J]``: the
    product ⊕_n ⊕_k x[n, i, k] ⊗ W[n, j, k] in one (views of the transposed copies kept laid out
    as read, ``|Wᵀ|`` and ``|Wᵀ| log |Wᵀ|``)."""

    def __init__(self, base: Weight):
        self.base = base
        N, J, K = base.shape
        self._stacked = (1, N * K, J)

    @property
    def shape(self):
        return torch.Size(self._stacked)

    def real(self, dtype):
        return self.base.real(dtype).transpose(-1, -2).reshape(self._stacked)

    def indicator(self, dtype):
        return self.base.indicator(dtype).transpose(-1, -2).reshape(self._stacked)

    def abs(self, dtype):
        return _Transposed(self.base).abs(dtype).reshape(self._stacked)

    def xlogx(self, dtype, magnitude=None):
        return self.base._get("xlogx_t", dtype, lambda: self.base.xlogx(dtype).transpose(-1, -2).contiguous()) \
            .reshape(self._stacked)


def _no_edges() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)


def _unravel(flat: int, shape) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape)))


def _ravel(index: tuple[int, ...], shape) -> int:
    flat = 0
    for i, size in zip(index, shape):
        flat = flat * size + i
    return flat


def _used(axes: dict, pattern: str) -> dict:
    names = set(pattern.replace("(", " ").replace(")", " ").replace("->", " ").split())
    return {k: v for k, v in axes.items() if k in names}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class Activations(Mapping):
    """Node → recorded tensor, read-only; a ``Lazy`` one (a long prompt's scores and pattern) is
    formed on each read and not kept."""

    def __init__(self, tensors: Mapping[str, torch.Tensor | Lazy]):
        self._tensors = dict(tensors._tensors if isinstance(tensors, Activations) else tensors)

    def __getitem__(self, node: str) -> torch.Tensor:
        return resolved(self._tensors[node])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def formed_on_read(self, node: str) -> bool:
        """Whether ``node``'s tensor is recomputed on each read rather than kept."""
        return isinstance(self._tensors[node], Lazy)


@dataclass(frozen=True, eq=False)
class GradGraph:
    """Nodes (name -> shape, topological order), edge blocks, and what the forward pass recorded.

    Immutable once built. ``sources`` are the input embedding nodes; ``source_mask`` says which of
    their elements are real tokens (padding carries nothing); the one sink is ``"metric"`` of shape
    ``[batch]``. A graph built after a cached prefix (``record(..., prefix=)``) covers only the
    positions after it: the prefix enters as its keys and values in each layer (``cached``), nodes
    without incoming edges, so every input → metric path is a path of the tokens after the prefix. ``logit_ids`` are the vocabulary ids kept in the logits node ``unembed.hook_out``
    (its last dim): only logits the metric depends on are nodes, since no other logit lies on a
    path to it. ``rules`` names the rule set the blocks were built with. A long prompt's graph
    (``build_graph(..., patterns=)``) keeps no attention scores or patterns: ``activations`` forms
    them from the queries and keys on each read, and so do the blocks that weigh by them; its
    ``regions`` let a pass go through each layer's attention a chunk of query rows at a time.
    """

    shapes: Mapping[str, tuple[int, ...]]
    order: tuple[str, ...]
    edges: tuple[Block, ...]
    sources: tuple[str, ...]
    source_mask: torch.Tensor  # [batch, pos] bool
    activations: Mapping[str, torch.Tensor]
    metric_value: torch.Tensor  # [batch]
    logit_ids: torch.Tensor  # [n kept]
    tokens: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    n_layers: int
    n_heads: int
    n_key_value_heads: int
    rules: str = "gradient"
    head_mask: torch.Tensor | None = None  # [n_layers, n_heads] bool: Mask-LRP's heads (None: all)
    settled: Mapping[str, torch.Tensor] | None = None  # Real backprop at sources and patterns, from fixing Pending blocks
    prefix: int = 0  # positions of a cached prefix before the graph's own (keys and values only)
    cached: tuple[str, ...] = ()  # the cached prefix's key and value nodes: inputs that are not tokens
    regions: tuple = ()  # gradgraph.chunked.Region per layer of a long prompt: attention run a chunk of rows at a time
    # (node, dim, nodes): a norm on per-head copies along dim, the same for every copy, whose output node is the first
    copies: tuple[tuple[str, int, tuple[str, ...]], ...] = ()
    _out: Mapping[str, tuple[Block, ...]] = field(init=False, repr=False)
    _in: Mapping[str, tuple[Block, ...]] = field(init=False, repr=False)

    def __post_init__(self):
        out: dict[str, list[Block]] = {}
        into: dict[str, list[Block]] = {}
        for edge in self.edges:
            out.setdefault(edge.src, []).append(edge)
            into.setdefault(edge.tgt, []).append(edge)
        object.__setattr__(self, "shapes", MappingProxyType(dict(self.shapes)))
        object.__setattr__(self, "activations", Activations(self.activations))
        object.__setattr__(self, "_out", MappingProxyType({k: tuple(v) for k, v in out.items()}))
        object.__setattr__(self, "_in", MappingProxyType({k: tuple(v) for k, v in into.items()}))

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.metric_value.dtype

    def edges_from(self, node: str) -> tuple[Block, ...]:
        """The blocks whose source is ``node``."""
        return self._out.get(node, ())

    def edges_into(self, node: str) -> tuple[Block, ...]:
        """The blocks whose target is ``node``."""
        return self._in.get(node, ())

    def edge(self, src: str, tgt: str) -> Block:
        """The one block from ``src`` to ``tgt``."""
        found = [e for e in self.edges_from(src) if e.tgt == tgt]
        if len(found) != 1:
            raise GradGraphError(f"the graph has {len(found)} blocks from {src} to {tgt}, not one")
        return found[0]

    def n_scalar_edges(self) -> int:
        """The number of scalar edges (counted without materialising them)."""
        return sum(edge.n_edges(self.shapes) for edge in self.edges)

    def index(self, node: str, flat: int) -> tuple[int, ...]:
        """The element index tuple of a flat index in ``node`` (the logits' last index is the vocab id)."""
        idx = _unravel(flat, self.shapes[node])
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
            graph.add_edge((names.METRIC, (b,)), names.METRIC, weight=1.0)
        for source in self.sources:  # every real input element is a node, even one with no edge
            for flat in range(_numel(self.shapes[source])):
                idx = self.index(source, flat)
                if self.source_mask[idx[0], idx[1]]:
                    graph.add_node((source, idx))
        return graph
