"""Semirings as data (after torch-struct): what the one backward recursion adds and multiplies.

A semiring value for a node of shape ``[*shape]`` is a tensor ``[S, *shape]``; ``S`` is the
semiring's ``size`` (1 for scalars, 2 for pairs, k for the k best). Edges carry real local
derivatives ``w``; ``convert(w)`` turns them into semiring values, and an edge of weight 0 is
no edge: it converts to the semiring's zero.

Every semiring offers the operations the recursion needs and nothing else:

- ``plus(a, b)``, ``times(a, b)``, ``sum(a, dim)`` (⊕ over a dim of the node shape);
- ``matmul(x, w)``: ``out[n, i, k] = ⊕_j x[n, i, j] ⊗ convert(w[n, j, k])`` for
  ``x: [S, N, I, J]`` and a real ``w: [N or 1, J, K]``; this one product carries every linear
  map, per-row Jacobian and bilinear edge;
- ``exclusive_sum(a, dim)``: ⊕ over every *other* element along a dim, and ``rank1(v, a, b, c)``:
  the product with a per-row matrix ``J = diag(a) + b cᵀ`` (a softmax's or a centring's Jacobian)
  in O(n) per row instead of O(n²);
- ``op_matmul`` / ``op_sum``: the same with an ordinary sum in place of ⊕, for
  ``granularity="op"`` (Du et al.'s implementation: ⊕ acts only between ops); ``within_op()``
  is the semiring that blocks use at that granularity.

Weights reach ``matmul`` as ``gradgraph.weights.Weight`` (or plain tensors), which keep ``|W|``
and ``|W| log |W|`` of the model's matrices across passes.

Properties the views ask instead of asking which semiring they got: ``plain`` (values are path
weights themselves, one number each: Real, Abs, Max), ``nonnegative``, ``additive`` (⊕ is +),
``selective`` (⊕ picks one operand: Max) and ``safe_dtype`` (Abs: float64, since Σ Π |w| of a deep
model passes float32's range).

Values as stored:

- ``Real``: Σ Π w (the gradient). ``Abs``: Σ Π |w|. ``Log``: log Σ Π |w| (zero = -inf).
  ``Count``: log of the number of paths.
- ``Max``: max Π |w| (zero = 0). ``KMax(k)``: the k largest Π |w|, descending (missing = 0).
- ``SignedMax``: (max, min) of the signed Π w (no path = (-inf, +inf)).
- ``Entropy``: the expectation semiring ⟨Z, R⟩ = ⟨Σ p̃, Σ p̃ log p̃⟩ over paths with
  p̃ = Π |w|, held as (log Z, R / Z) so that deep graphs neither overflow nor underflow:
  ⊗ adds both parts, ⊕ is log-add-exp with a Z-weighted mean. The entropy of the path
  distribution is H = log Z − R / Z.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from gradgraph import kernels
from gradgraph.errors import GradGraphError
from gradgraph.weights import Weight, as_weight

# elements of the broadcast product materialised at once by the max-times kernels
CHUNK_ELEMENTS = 1 << 24


def _safe_log(a: torch.Tensor) -> torch.Tensor:
    """log a for a >= 0, with log 0 = -inf."""
    return torch.log(a)


def _nonzero(z: torch.Tensor) -> torch.Tensor:
    """A denominator: z where z > 0; where z = 0 (no path) its numerator is 0 too."""
    return z.clamp_min(torch.finfo(z.dtype).tiny)


def _finite_or_zero(shift: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(shift, nan=0.0, neginf=0.0, posinf=0.0)


def _chunks(x: torch.Tensor, w: torch.Tensor, per_row: int):
    """Yield (x_chunk, w_chunk, slice) over N (per-row weights) or over I (shared weights).

    ``x: [S, N, I, J]``, ``w: [N|1, J, K]``; ``per_row`` = elements per (n, i) row of the product.
    """
    S, N, I, J = x.shape
    step = max(1, CHUNK_ELEMENTS // max(1, per_row * S))
    if w.shape[0] == 1 or N == 1:
        for i0 in range(0, I, step):
            yield x[:, :, i0 : i0 + step], w, (slice(None), slice(None), slice(i0, i0 + step))
    else:
        rows = max(1, step // max(1, I))
        for n0 in range(0, N, rows):
            yield x[:, n0 : n0 + rows], w[n0 : n0 + rows], (slice(None), slice(n0, n0 + rows), slice(None))


class Semiring(ABC):
    """Base: the interface. Subclasses define every method; the recursion calls only these."""

    name = "semiring"
    size = 1
    plain = False  # values are path weights themselves, one number per element
    nonnegative = False
    additive = False  # ⊕ is the ordinary sum
    selective = False  # ⊕ returns one of its operands
    safe_dtype: torch.dtype | None = None  # dtype views use so that sums cannot overflow

    @abstractmethod
    def zero(self, shape, *, dtype, device) -> torch.Tensor:
        ...

    @abstractmethod
    def one(self, shape, *, dtype, device) -> torch.Tensor:
        ...

    @abstractmethod
    def convert(self, w: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def plus(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def times(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def sum(self, a: torch.Tensor, dim: int) -> torch.Tensor:
        ...

    @abstractmethod
    def matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ...

    def op_matmul(self, x: torch.Tensor, w: Weight | torch.Tensor) -> torch.Tensor:
        return self.matmul(x, w)

    def op_sum(self, a: torch.Tensor, dim: int) -> torch.Tensor:
        return self.sum(a, dim)

    def exclusive_sum(self, a: torch.Tensor, dim: int) -> torch.Tensor:
        """``out[.., j, ..] = ⊕_{k≠j} a[.., k, ..]`` along node dim ``dim`` (no element: zero).

        Generic: inclusive prefix and suffix ⊕-scans (log₂ n steps of ``plus`` each), shifted by
        one and combined; semirings with a cumulative op override it."""
        x = a.movedim(dim + 1, -1)
        if x.shape[-1] == 1:
            return self.zero(a.shape[1:], dtype=a.dtype, device=a.device)
        before, after = _shifted_scans(x, self._scan)
        return self.plus(before(self), after(self)).movedim(-1, dim + 1)

    def _scan(self, x: torch.Tensor) -> torch.Tensor:
        """Inclusive ⊕-prefix along the last dim (Hillis–Steele doubling)."""
        n, step = x.shape[-1], 1
        while step < n:
            x = torch.cat([x[..., :step], self.plus(x[..., step:], x[..., :-step])], -1)
            step *= 2
        return x

    def rank1(self, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``out[.., j] = ⊕_k J[j, k] ⊗ v[.., k]`` with ``J = diag(a) + b cᵀ`` along the last dim.

        ``a, b, c`` are real and broadcast to the node shape of ``v``. The scalar edge j → j has the
        one weight ``a_j + b_j c_j``; j → k (k ≠ j) has ``b_j c_k``, so
        ``out_j = (a_j + b_j c_j) ⊗ v_j ⊕ b_j ⊗ ⊕_{k≠j} c_k ⊗ v_k``: O(n) per row."""
        others = self.exclusive_sum(self.times(self.convert(c), v), v.ndim - 2)
        return self.plus(self.times(self.convert(a + b * c), v), self.times(self.convert(b), others))

    def within_op(self) -> "Semiring":
        """The semiring blocks use at ``granularity="op"``: ⊕ inside a block is an ordinary sum."""
        if type(self).op_sum is Semiring.op_sum and type(self).op_matmul is Semiring.op_matmul:
            return self
        return _WithinOp(self)

    def overflowed(self, a: torch.Tensor) -> bool:
        """True if ``a`` holds NaN or a value out of the dtype's range (default: any non-finite)."""
        return not bool(torch.isfinite(a).all())

    def select(self, mask: torch.Tensor, value: torch.Tensor, cache: dict) -> torch.Tensor:
        """``value`` ``[S, ...]`` where ``mask`` (bool, broadcast to its trailing dims), the zero
        elsewhere. ``cache`` is the calling block's, for a converted copy of its mask."""
        zero = self.zero((), dtype=value.dtype, device=value.device).reshape((-1,) + (1,) * (value.ndim - 1))
        return torch.where(mask, value, zero)

    def is_zero(self, a: torch.Tensor) -> torch.Tensor:
        """``[*shape]`` bool: where the value is the semiring's zero (no path)."""
        return (a == self.zero(a.shape[1:], dtype=a.dtype, device=a.device)).all(0)

    def __repr__(self) -> str:
        return self.name


class RealSemiring(Semiring):
    """(+, ×) on signed weights: the gradient."""

    name = "Real"
    plain = True
    additive = True

    def zero(self, shape, *, dtype, device):
        return torch.zeros((1, *shape), dtype=dtype, device=device)

    def one(self, shape, *, dtype, device):
        return torch.ones((1, *shape), dtype=dtype, device=device)

    def convert(self, w):
        return w[None]

    def plus(self, a, b):
        return a + b

    def times(self, a, b):
        return a * b

    def sum(self, a, dim):
        return a.sum(dim + 1)

    def matmul(self, x, w):
        return x @ as_weight(w).real(x.dtype)

    def select(self, mask, value, cache):
        # a product with the 0/1 mask (kept per block and dtype): torch.where on a bool mask runs
        # ~10x slower on CPU. Values are finite here (an overflow raises at the next checkpoint).
        key = ("select", id(mask), value.dtype)  # the block holds the mask, so its id stays its own
        if key not in cache:  # converted along the mask's own (not broadcast) dims, then expanded
            compact = tuple(slice(0, 1) if step == 0 else slice(None) for step in mask.stride())
            cache[key] = mask[compact].to(value.dtype).expand(mask.shape)
        return value * cache[key]

    def exclusive_sum(self, a, dim):
        return _exclusive_cumsum(a, dim)

    def rank1(self, v, a, b, c):
        # a_j v_j + b_j Σ_k c_k v_k: what autograd computes for a softmax (p ⊙ (g − Σ p g))
        return a * v + b * (c * v).sum(-1, keepdim=True)


class AbsSemiring(RealSemiring):
    """(+, ×) on |w|: the total gradient flow Σ Π |w|."""

    name = "Abs"
    nonnegative = True
    safe_dtype = torch.float64

    def convert(self, w):
        return w.abs()[None]

    def matmul(self, x, w):
        return x @ as_weight(w).abs(x.dtype)

    def rank1(self, v, a, b, c):
        return Semiring.rank1(self, v, a, b, c)  # |a + bc| on the diagonal: no shortcut


class LogSemiring(Semiring):
    """(log-add-exp, +) on log |w|: log Σ Π |w| without underflow."""

    name = "Log"

    def zero(self, shape, *, dtype, device):
        return torch.full((1, *shape), -math.inf, dtype=dtype, device=device)

    def one(self, shape, *, dtype, device):
        return torch.zeros((1, *shape), dtype=dtype, device=device)

    def convert(self, w):
        return _safe_log(w.abs())[None]

    def overflowed(self, a):
        return bool(torch.isnan(a).any() or (a == math.inf).any())

    def plus(self, a, b):
        return torch.logaddexp(a, b)

    def times(self, a, b):
        return a + b

    def sum(self, a, dim):
        return torch.logsumexp(a, dim + 1)

    def matmul(self, x, w):
        # shift each row of x by its max, then one BLAS product with |w|
        shift = _finite_or_zero(x.amax(dim=-1, keepdim=True))
        return _safe_log(torch.exp(x - shift) @ as_weight(w).abs(x.dtype)) + shift

    def exclusive_sum(self, a, dim):
        x = a.movedim(dim + 1, -1)
        if x.shape[-1] == 1:
            return torch.full_like(a, -math.inf)
        before, after = _shifted_scans(x, lambda t: torch.logcumsumexp(t, -1))
        return torch.logaddexp(before(self), after(self)).movedim(-1, dim + 1)


class CountSemiring(LogSemiring):
    """(log-add-exp, +) on log 1[w ≠ 0]: the log of the number of paths (each edge counts one,
    whatever its weight), for normalising a path entropy by its maximum, log N."""

    name = "Count"

    def convert(self, w):
        return torch.where(w != 0, 0.0, -math.inf).to(w.dtype)[None]

    def matmul(self, x, w):
        shift = _finite_or_zero(x.amax(dim=-1, keepdim=True))
        return _safe_log(torch.exp(x - shift) @ as_weight(w).indicator(x.dtype)) + shift


class MaxSemiring(Semiring):
    """(max, ×) on |w|: the weight of the best path (Viterbi)."""

    name = "Max"
    plain = True
    nonnegative = True
    selective = True

    def zero(self, shape, *, dtype, device):
        return torch.zeros((1, *shape), dtype=dtype, device=device)

    def one(self, shape, *, dtype, device):
        return torch.ones((1, *shape), dtype=dtype, device=device)

    def convert(self, w):
        return w.abs()[None]

    def plus(self, a, b):
        return torch.maximum(a, b)

    def times(self, a, b):
        return a * b

    def sum(self, a, dim):
        return a.amax(dim + 1)

    def matmul(self, x, w):
        aw = as_weight(w).abs(x.dtype)
        if kernels.available(x, aw):
            return kernels.max_times(x[0], aw)[None]
        S, N, I, J = x.shape
        out = x.new_empty((S, max(N, w.shape[0]), I, w.shape[-1]))
        for xc, wc, where in _chunks(x, aw, J * w.shape[-1]):
            # [S, n, i, J, 1] * [n, 1, J, K] -> max over J
            out[where] = (xc[..., None] * wc[:, None]).amax(dim=-2)
        return out

    def op_matmul(self, x, w):
        return x @ as_weight(w).abs(x.dtype)

    def op_sum(self, a, dim):
        return a.sum(dim + 1)

    def exclusive_sum(self, a, dim):
        x = a.movedim(dim + 1, -1)
        if x.shape[-1] == 1:
            return torch.zeros_like(a)
        before, after = _shifted_scans(x, lambda t: torch.cummax(t, -1).values)
        return torch.maximum(before(self), after(self)).movedim(-1, dim + 1)

    def rank1(self, v, a, b, c):
        if kernels.available(v, a, b, c):
            return kernels.rank1_max(v[0], a, b, c)[None]
        return Semiring.rank1(self, v, a, b, c)


class SignedMaxSemiring(Semiring):
    """Pairs (max, min) of signed path products, so two negative edges can make the best path."""

    name = "SignedMax"
    size = 2

    def zero(self, shape, *, dtype, device):
        z = torch.empty((2, *shape), dtype=dtype, device=device)
        z[0], z[1] = -math.inf, math.inf
        return z

    def one(self, shape, *, dtype, device):
        return torch.ones((2, *shape), dtype=dtype, device=device)

    def convert(self, w):
        out = torch.stack([w, w])
        out[0][w == 0], out[1][w == 0] = -math.inf, math.inf
        return out

    def overflowed(self, a):
        return bool(torch.isnan(a).any() or (a[0] == math.inf).any() or (a[1] == -math.inf).any())

    def plus(self, a, b):
        return torch.stack([torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1])])

    def times(self, a, b):
        empty = (a[0] == -math.inf) | (b[0] == -math.inf)
        a0, a1, b0, b1 = (torch.where(empty, torch.zeros_like(t), t) for t in (a[0], a[1], b[0], b[1]))
        products = torch.stack([a0 * b0, a0 * b1, a1 * b0, a1 * b1])
        hi = torch.where(empty, -math.inf, products.amax(0))
        lo = torch.where(empty, math.inf, products.amin(0))
        return torch.stack([hi, lo])

    def sum(self, a, dim):
        return torch.stack([a[0].amax(dim), a[1].amin(dim)])

    def matmul(self, x, w):
        w = as_weight(w).real(x.dtype)
        if kernels.available(x, w):
            return torch.stack(kernels.signed_max_times(x[0], x[1], w))
        S, N, I, J = x.shape
        out = x.new_empty((2, max(N, w.shape[0]), I, w.shape[-1]))
        for xc, wc, where in _chunks(x, w, 2 * J * w.shape[-1]):
            valid = (xc[0] != -math.inf)[..., None] & (wc != 0)[:, None]  # [n, i, J, K]
            hi_x = torch.where(xc[0] == -math.inf, 0, xc[0])[..., None]
            lo_x = torch.where(xc[1] == math.inf, 0, xc[1])[..., None]
            a, b = hi_x * wc[:, None], lo_x * wc[:, None]
            out[0][where[1:]] = torch.where(valid, torch.maximum(a, b), -math.inf).amax(dim=-2)
            out[1][where[1:]] = torch.where(valid, torch.minimum(a, b), math.inf).amin(dim=-2)
        return out

    def op_matmul(self, x, w):
        w = as_weight(w).real(x.dtype)
        empty = x[0] == -math.inf
        hi = torch.where(empty, 0, x[0])
        lo = torch.where(empty, 0, x[1])
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        out = torch.stack([hi @ wp + lo @ wn, lo @ wp + hi @ wn])
        reached = ((~empty).to(w.dtype) @ (w != 0).to(w.dtype)) > 0
        out[0] = torch.where(reached, out[0], -math.inf)
        out[1] = torch.where(reached, out[1], math.inf)
        return out

    def op_sum(self, a, dim):
        empty = a[0] == -math.inf
        total = torch.where(empty, 0, a).sum(dim + 1)
        reached = (~empty).any(dim)
        return torch.stack([torch.where(reached, total[0], -math.inf), torch.where(reached, total[1], math.inf)])

    def is_zero(self, a):
        return a[0] == -math.inf

    def exclusive_sum(self, a, dim):
        x = a.movedim(dim + 1, -1)
        if x.shape[-1] == 1:
            return self.zero(a.shape[1:], dtype=a.dtype, device=a.device)
        scan = lambda t: torch.stack([torch.cummax(t[0], -1).values, torch.cummin(t[1], -1).values])  # noqa: E731
        before, after = _shifted_scans(x, scan)
        return self.plus(before(self), after(self)).movedim(-1, dim + 1)


class KMaxSemiring(Semiring):
    """The k largest path products Π |w|, descending; fewer than k paths leave zeros."""

    size = 1
    plain = False  # k numbers per element
    nonnegative = True

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise GradGraphError(f"KMax needs k >= 1 (the number of best paths kept), got {k!r}")
        self.k = self.size = k
        self.name = f"KMax({k})"

    def zero(self, shape, *, dtype, device):
        return torch.zeros((self.k, *shape), dtype=dtype, device=device)

    def one(self, shape, *, dtype, device):
        z = self.zero(shape, dtype=dtype, device=device)
        z[0] = 1
        return z

    def convert(self, w):
        out = torch.zeros((self.k, *w.shape), dtype=w.dtype, device=w.device)
        out[0] = w.abs()
        return out

    def _top(self, candidates: torch.Tensor, dim: int) -> torch.Tensor:
        """Top k along ``dim`` of candidates, moved to the front."""
        n = candidates.shape[dim]
        if n < self.k:
            pad = list(candidates.shape)
            pad[dim] = self.k - n
            candidates = torch.cat([candidates, candidates.new_zeros(pad)], dim)
        return candidates.topk(self.k, dim=dim).values.movedim(dim, 0)

    def plus(self, a, b):
        return self._top(torch.cat([a, b], 0), 0)

    def times(self, a, b):
        # all k*k products, keep the k best: [k, 1, ...] * [1, k, ...] (node dims broadcast)
        ndim = max(a.ndim, b.ndim)
        a = a.reshape(a.shape[:1] + (1,) * (ndim - a.ndim) + a.shape[1:])
        b = b.reshape(b.shape[:1] + (1,) * (ndim - b.ndim) + b.shape[1:])
        products = (a[:, None] * b[None]).flatten(0, 1)
        return self._top(products, 0)

    def sum(self, a, dim):
        moved = a.movedim(dim + 1, 1)  # [k, n, *rest]
        return self._top(moved.flatten(0, 1), 0)

    def matmul(self, x, w):
        aw = as_weight(w).abs(x.dtype)
        if kernels.available(x, aw):
            return kernels.kmax_times(x, aw)
        k, N, I, J = x.shape
        K = w.shape[-1]
        out = x.new_empty((k, max(N, w.shape[0]), I, K))
        for xc, wc, where in _chunks(x, aw, k * J * K):
            # [k, n, i, J, 1] * [n, 1, J, K] -> [n, i, k*J, K] -> top k over the k*J candidates
            products = (xc[..., None] * wc[:, None]).permute(1, 2, 0, 3, 4).flatten(2, 3)
            out[where] = self._top(products, 2)
        return out

    def op_matmul(self, x, w):
        return x @ as_weight(w).abs(x.dtype)

    def op_sum(self, a, dim):
        return a.sum(dim + 1)


class EntropySemiring(Semiring):
    """Expectation semiring ⟨Z, R⟩ held as (log Z, R/Z); entropy H = log Z − R/Z."""

    name = "Entropy"
    size = 2

    def zero(self, shape, *, dtype, device):
        z = torch.zeros((2, *shape), dtype=dtype, device=device)
        z[0] = -math.inf
        return z

    def one(self, shape, *, dtype, device):
        return torch.zeros((2, *shape), dtype=dtype, device=device)

    # The hot operations write into one preallocated [2, ...] tensor instead of stacking parts.

    def convert(self, w):
        out = _pair(w.shape, w)
        torch.log(w.abs(), out=out[0])
        torch.nan_to_num(out[0], neginf=0.0, out=out[1])
        return out

    def overflowed(self, a):
        return not (bool((a[0] < math.inf).all()) and bool(torch.isfinite(a[1]).all()))

    def plus(self, a, b):
        # log Z = logaddexp; R/Z = the Z-weighted mean b₁ + σ(log Z_a − log Z_b)(a₁ − b₁) (σ = 0 or 1
        # where one side has no path; where neither has, the difference is NaN: σ(0) mixes two zeros)
        out = _pair(_broadcast(a.shape[1:], b.shape[1:]), a)
        share = torch.sub(a[0], b[0]).nan_to_num_(nan=0.0).sigmoid_()
        torch.logaddexp(a[0], b[0], out=out[0])
        torch.lerp(b[1], a[1], share, out=out[1])
        return out

    def times(self, a, b):
        out = _pair(_broadcast(a.shape[1:], b.shape[1:]), a)
        torch.add(a[0], b[0], out=out[0])
        torch.add(a[1], b[1], out=out[1])
        out[1].masked_fill_(out[0] == -math.inf, 0.0)  # no path: R/Z = 0
        return out

    def sum(self, a, dim):
        shift = _finite_or_zero(a[0].amax(dim, keepdim=True))
        z = torch.exp(a[0] - shift)
        total = z.sum(dim)
        out = _pair(total.shape, a)
        torch.add(torch.log(total), shift.squeeze(dim), out=out[0])
        torch.div(z.mul_(a[1]).sum(dim), _nonzero(total), out=out[1])
        return out

    def matmul(self, x, w):
        # Z_i = Σ_j |w_ij| Z_j ;  R_i = Σ_j |w_ij| R_j + (|w| log|w|)_ij Z_j, with Z_j = e^{lz_j - m}
        w = as_weight(w)
        shift = _finite_or_zero(x[0].amax(dim=-1, keepdim=True))
        z = (x[0] - shift).exp_()  # [N, I, J], zero where no path
        magnitude = w.abs(x.dtype)
        z_out = z @ magnitude
        r_out = (z * x[1]) @ magnitude
        r_out.add_(z @ w.xlogx(x.dtype, magnitude))
        out = _pair(z_out.shape, x)
        torch.log(z_out, out=out[0]).add_(shift)
        torch.div(r_out, z_out.clamp_min_(torch.finfo(z_out.dtype).tiny), out=out[1])
        return out

    def rank1(self, v, a, b, c):
        if kernels.available(v, a, b, c):
            return torch.stack(kernels.rank1_entropy(v[0], v[1], a, b, c))
        return Semiring.rank1(self, v, a, b, c)

    def exclusive_sum(self, a, dim):
        """Prefix and suffix sums of Z and Z·(R/Z) shifted by each row's largest log Z; the element
        holding that largest one sums the others again, shifted by the second largest, so that its
        exclusive sum does not underflow."""
        lz, r = a[0].movedim(dim, -1), a[1].movedim(dim, -1)
        n = lz.shape[-1]
        if n == 1:
            return self.zero(a.shape[1:], dtype=a.dtype, device=a.device)
        top = lz.topk(2, dim=-1)
        first, second = _finite_or_zero(top.values[..., :1]), _finite_or_zero(top.values[..., 1:])
        z = torch.exp(lz - first)
        both = torch.stack([z, z * r])
        before, after = _shifted_scans(both, lambda t: t.cumsum(-1))
        total = before(None) + after(None)  # zero boundaries
        out_lz = torch.log(total[0]) + first
        out_r = total[1] / _nonzero(total[0])
        # the largest element: the sum of all others, shifted by the second largest
        is_top = torch.zeros_like(lz, dtype=torch.bool).scatter_(-1, top.indices[..., :1], True)
        z2 = torch.where(is_top, 0, torch.exp(lz - second))
        z2_sum = z2.sum(-1, keepdim=True)
        top_lz = torch.log(z2_sum) + second
        top_r = (z2 * r).sum(-1, keepdim=True) / _nonzero(z2_sum)
        out_lz = torch.where(is_top, top_lz, out_lz)
        out_r = torch.where(is_top, top_r, out_r)
        return torch.stack([out_lz, out_r]).movedim(-1, dim + 1)

    def is_zero(self, a):
        return a[0] == -math.inf


class _WithinOp(Semiring):
    """A semiring whose ⊕ inside a block is its ``op_sum`` (Du et al.'s op granularity)."""

    def __init__(self, base: Semiring):
        self.base = base
        self.name, self.size = f"{base.name} (op)", base.size

    def zero(self, shape, *, dtype, device):
        return self.base.zero(shape, dtype=dtype, device=device)

    def one(self, shape, *, dtype, device):
        return self.base.one(shape, dtype=dtype, device=device)

    def convert(self, w):
        return self.base.convert(w)

    def times(self, a, b):
        return self.base.times(a, b)

    def plus(self, a, b):
        return self.base.op_sum(torch.stack([a, b], 1), 0)

    def sum(self, a, dim):
        return self.base.op_sum(a, dim)

    def matmul(self, x, w):
        return self.base.op_matmul(x, w)


def _broadcast(a: torch.Size, b: torch.Size) -> tuple[int, ...]:
    """The broadcast shape of two node shapes (``torch.broadcast_shapes`` costs ~50 µs a call)."""
    if a == b:
        return a
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    if any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        return torch.broadcast_shapes(a, b)  # raises, saying which shapes
    return tuple(max(x, y) if 0 not in (x, y) else 0 for x, y in zip(a, b))


def _pair(shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``[2, *shape]`` tensor with ``like``'s dtype and device."""
    return torch.empty((2, *shape), dtype=like.dtype, device=like.device)


def _shifted_scans(x: torch.Tensor, scan):
    """``(before, after)``: functions of a semiring giving the inclusive ``scan`` of ``x`` along the
    last dim shifted by one (element j sees ⊕ of elements < j), and the same from the right (> j);
    the boundary holds the semiring's zero (plain zeros for ``None``)."""
    forward = scan(x)
    backward = scan(x.flip(-1)).flip(-1)

    def pad(sr, part: torch.Tensor, at_start: bool) -> torch.Tensor:
        if sr is None:
            edge = part.new_zeros(part.shape[:-1] + (1,))  # (part[..., :1] is empty for one element)
        else:
            edge = sr.zero(part.shape[1:-1] + (1,), dtype=part.dtype, device=part.device)
        return torch.cat([edge, part], -1) if at_start else torch.cat([part, edge], -1)

    return (lambda sr: pad(sr, forward[..., :-1], True)), (lambda sr: pad(sr, backward[..., 1:], False))


def _exclusive_cumsum(a: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ over the other elements as prefix + suffix sums: no element is subtracted, so no
    cancellation beyond that of a direct sum."""
    x = a.movedim(dim + 1, -1)
    before, after = _shifted_scans(x, lambda t: t.cumsum(-1))
    return (before(None) + after(None)).movedim(-1, dim + 1)


Real = RealSemiring()
Abs = AbsSemiring()
Log = LogSemiring()
Count = CountSemiring()
Max = MaxSemiring()
SignedMax = SignedMaxSemiring()
Entropy = EntropySemiring()


def KMax(k: int) -> KMaxSemiring:
    """The semiring of the k best path weights."""
    return KMaxSemiring(k)


__all__ = ["Real", "Abs", "Log", "Count", "Max", "SignedMax", "KMax", "Entropy", "Semiring"]
