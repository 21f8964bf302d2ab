"""Compiled loops for what BLAS and single torch ops do not do (CPU, numba).

- Max–times products for the Max, KMax and SignedMax semirings: ``out[i, k] = max_j x[i, j] ·
  w[j, k]``; in plain torch the broadcast product is ~100x slower than the matching matmul, these
  loops run at two to four times the matmul's time. They take ``x: [N, I, J]`` (or ``[k, N, I, J]``) and
  ``w: [N or 1, J, K]``.
- The diagonal-plus-rank-one product ``out_j = ⊕_k (a_j δ_jk + b_j c_k) ⊗ v_k`` of a softmax's
  Jacobian for Max and Entropy, row by row in three sweeps (the torch version takes some forty
  element-wise passes over the ``[heads, positions, positions]`` values).

``available(...)`` says when they apply (numba importable, CPU tensors, float32/float64),
otherwise the semirings use torch code (CUDA included).
"""

from __future__ import annotations

import numpy as np
import torch

try:  # numba is a dependency; the torch fallback keeps CUDA and exotic platforms working
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only without numba
    HAVE_NUMBA = False

# no "ninf"/"nnan": the signed kernel uses ±inf as "no path"
_FLAGS = {"nsz", "contract", "arcp", "reassoc"}


def available(*tensors: torch.Tensor) -> bool:
    return HAVE_NUMBA and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)


if HAVE_NUMBA:

    @njit(parallel=True, cache=True)
    def _row_ends(w, ends):  # pragma: no cover - compiled
        # ends[n, j]: one past the last nonzero of w[n, j] (a causal pattern's rows end at their diagonal)
        N, J, K = w.shape
        for t in prange(N * J):
            n, j = t // J, t % J
            k = K
            while k > 0 and w[n, j, k - 1] == 0.0:
                k -= 1
            ends[n, j] = k

    @njit(parallel=True, fastmath=_FLAGS, cache=True)
    def _max_times(x, w, ends, out):  # pragma: no cover - compiled
        # four output rows per task, so that each row w[j] is read once for four (a shared matrix
        # streams from cache once per four rows, not per row: about twice as fast), and four w rows
        # per sweep of the output rows (a quarter of the loads and stores: 1.3-1.5x more); w's rows
        # are read up to their last nonzero (``ends``)
        N, I, J = x.shape
        K = w.shape[2]
        shared = w.shape[0] == 1
        blocks = (I + 3) // 4
        for t in prange(N * blocks):
            n = t // blocks
            i0 = (t % blocks) * 4
            wn = w[0] if shared else w[n]
            en = ends[0] if shared else ends[n]
            if i0 + 4 <= I:
                r0, r1, r2, r3 = out[n, i0], out[n, i0 + 1], out[n, i0 + 2], out[n, i0 + 3]
                for k in range(K):
                    r0[k] = 0.0
                    r1[k] = 0.0
                    r2[k] = 0.0
                    r3[k] = 0.0
                j = 0
                while j + 4 <= J:
                    a0, a1, a2, a3 = x[n, i0, j], x[n, i0 + 1, j], x[n, i0 + 2, j], x[n, i0 + 3, j]
                    b0, b1, b2, b3 = x[n, i0, j + 1], x[n, i0 + 1, j + 1], x[n, i0 + 2, j + 1], x[n, i0 + 3, j + 1]
                    c0, c1, c2, c3 = x[n, i0, j + 2], x[n, i0 + 1, j + 2], x[n, i0 + 2, j + 2], x[n, i0 + 3, j + 2]
                    d0, d1, d2, d3 = x[n, i0, j + 3], x[n, i0 + 1, j + 3], x[n, i0 + 2, j + 3], x[n, i0 + 3, j + 3]
                    j += 4
                    if (a0 == 0.0 and a1 == 0.0 and a2 == 0.0 and a3 == 0.0 and b0 == 0.0 and b1 == 0.0
                            and b2 == 0.0 and b3 == 0.0 and c0 == 0.0 and c1 == 0.0 and c2 == 0.0 and c3 == 0.0
                            and d0 == 0.0 and d1 == 0.0 and d2 == 0.0 and d3 == 0.0):
                        continue
                    wa, wb, wc, wd = wn[j - 4], wn[j - 3], wn[j - 2], wn[j - 1]
                    for k in range(max(max(en[j - 4], en[j - 3]), max(en[j - 2], en[j - 1]))):
                        p, q, u, v = wa[k], wb[k], wc[k], wd[k]
                        r0[k] = max(r0[k], max(max(a0 * p, b0 * q), max(c0 * u, d0 * v)))
                        r1[k] = max(r1[k], max(max(a1 * p, b1 * q), max(c1 * u, d1 * v)))
                        r2[k] = max(r2[k], max(max(a2 * p, b2 * q), max(c2 * u, d2 * v)))
                        r3[k] = max(r3[k], max(max(a3 * p, b3 * q), max(c3 * u, d3 * v)))
                while j < J:  # the last w rows, one by one
                    a0, a1, a2, a3 = x[n, i0, j], x[n, i0 + 1, j], x[n, i0 + 2, j], x[n, i0 + 3, j]
                    wj = wn[j]
                    j += 1
                    for k in range(en[j - 1]):
                        c = wj[k]
                        r0[k] = max(r0[k], a0 * c)
                        r1[k] = max(r1[k], a1 * c)
                        r2[k] = max(r2[k], a2 * c)
                        r3[k] = max(r3[k], a3 * c)
                continue
            for i in range(i0, I):  # the last rows, one by one
                row = out[n, i]
                for k in range(K):
                    row[k] = 0.0
                for j in range(J):
                    a = x[n, i, j]
                    if a == 0.0:
                        continue
                    wj = wn[j]
                    for k in range(en[j]):
                        row[k] = max(row[k], a * wj[k])

    @njit(parallel=True, fastmath=_FLAGS, cache=True)
    def _kmax_times(x, w, out):  # pragma: no cover - compiled
        top, N, I, J = x.shape
        K = w.shape[2]
        shared = w.shape[0] == 1
        for t in prange(N * I):
            n = t // I
            i = t % I
            wn = w[0] if shared else w[n]
            best = np.zeros((K, top), dtype=out.dtype)  # per column, descending
            floor = np.zeros(K, dtype=out.dtype)  # best[:, top - 1], kept contiguous for the fast test
            for j in range(J):
                a = x[0, n, i, j]
                if a == 0.0:
                    continue
                wj = wn[j]
                for k in range(K):
                    if a * wj[k] <= floor[k]:  # the common case: not even the best product enters
                        continue
                    b = best[k]
                    c = wj[k]
                    for m in range(top):  # x[:, n, i, j] is descending: stop at the first loser
                        v = x[m, n, i, j] * c
                        if v <= b[top - 1]:
                            break
                        pos = top - 1
                        while pos > 0 and b[pos - 1] < v:
                            b[pos] = b[pos - 1]
                            pos -= 1
                        b[pos] = v
                    floor[k] = b[top - 1]
            for k in range(K):
                for m in range(top):
                    out[m, n, i, k] = best[k, m]

    @njit(parallel=True, fastmath=_FLAGS, cache=True)
    def _signed_max_times(hi_x, lo_x, w, hi, lo):  # pragma: no cover - compiled
        N, I, J = hi_x.shape
        K = w.shape[2]
        shared = w.shape[0] == 1
        for t in prange(N * I):
            n = t // I
            i = t % I
            wn = w[0] if shared else w[n]
            rh = hi[n, i]
            rl = lo[n, i]
            for k in range(K):
                rh[k] = -np.inf
                rl[k] = np.inf
            for j in range(J):
                a = hi_x[n, i, j]
                if a == -np.inf:
                    continue
                b = lo_x[n, i, j]
                wj = wn[j]
                for k in range(K):
                    c = wj[k]
                    if c == 0.0:
                        continue
                    p = a * c
                    q = b * c
                    if p < q:
                        p, q = q, p
                    if p > rh[k]:
                        rh[k] = p
                    if q < rl[k]:
                        rl[k] = q


    @njit(parallel=True, fastmath=_FLAGS, cache=True)
    def _rank1_max(v, a, b, c, out):  # pragma: no cover - compiled
        rows, n = v.shape
        for t in prange(rows):
            # out[j] = max(|a_j + b_j c_j| v_j, |b_j| max_{k != j} |c_k| v_k): prefix then suffix maxima
            best = 0.0
            for j in range(n):
                out[t, j] = best
                term = abs(c[t, j]) * v[t, j]
                if term > best:
                    best = term
            best = 0.0
            for j in range(n - 1, -1, -1):
                others = max(out[t, j], best)
                diag = abs(a[t, j] + b[t, j] * c[t, j]) * v[t, j]
                out[t, j] = max(diag, abs(b[t, j]) * others)
                term = abs(c[t, j]) * v[t, j]
                if term > best:
                    best = term

    @njit(parallel=True, cache=True)
    def _rank1_entropy(lz, r, w, e, g, shift, a, b, c, out_lz, out_r):  # pragma: no cover - compiled
        # w = lz + log|c| (the off-diagonal terms Z_k |c_k| = exp(w_k)), e = exp(w - shift) and
        # g = log|c| come from vectorised torch ops. One sweep sums the terms (Z|c| and
        # Z|c|(r + log|c|)) and, apart, all but the largest; an element's exclusive sums are then the
        # totals less its own term (at most half the total, so no digits cancel), the largest's the
        # sums without it. Two logs per element (in the common case the diagonal's term is
        # e_j |d_j| / |c_j|: no exp)
        rows, n = lz.shape
        floor = np.log(np.finfo(lz.dtype).tiny) + 2.0  # below this a shifted term underflows
        exact = np.finfo(lz.dtype).tiny / np.finfo(lz.dtype).eps  # a shifted term above this is a normal number
        for t in prange(rows):
            sh = shift[t]
            top, second, arg = -np.inf, -np.inf, -1
            rest1, rest2 = 0.0, 0.0  # the sums without the largest term so far
            for k in range(n):
                x = w[t, k]
                if x > top:
                    if arg >= 0:
                        rest1 += e[t, arg]
                        rest2 += e[t, arg] * (r[t, arg] + g[t, arg])
                    top, second, arg = x, top, k
                else:
                    if x > second:
                        second = x
                    if e[t, k] != 0.0:
                        rest1 += e[t, k]
                        rest2 += e[t, k] * (r[t, k] + g[t, k])
            s1, s2 = rest1, rest2
            if arg >= 0 and e[t, arg] != 0.0:
                s1 += e[t, arg]
                s2 += e[t, arg] * (r[t, arg] + g[t, arg])
            for j in range(n):
                ej = e[t, j]
                osh = sh
                if j == arg:
                    o1, o2 = rest1, rest2
                    if second > -np.inf and second - sh < floor:  # the others underflowed: shift by the second
                        o1, o2, osh = 0.0, 0.0, second
                        for k in range(n):
                            if k != arg and w[t, k] > -np.inf:
                                z = np.exp(w[t, k] - second)
                                o1 += z
                                o2 += z * (r[t, k] + g[t, k])
                elif ej != 0.0:
                    o1, o2 = s1 - ej, s2 - ej * (r[t, j] + g[t, j])
                else:
                    o1, o2 = s1, s2
                # |b_j| (o1, o2) off the diagonal, |d_j| Z_j on it, in units of e^osh (log b = log c
                # for a softmax: reuse it)
                bj, cj, d = abs(b[t, j]), abs(c[t, j]), abs(a[t, j] + b[t, j] * c[t, j])
                lb = 0.0
                if bj != 0.0 and o1 > 0.0:
                    lb = g[t, j] if bj == cj else np.log(bj)
                else:
                    bj = 0.0
                if d != 0.0 and lz[t, j] > -np.inf:
                    ld = np.log(d)
                    if bj == 0.0:  # the diagonal alone
                        out_lz[t, j], out_r[t, j] = lz[t, j] + ld, r[t, j] + ld
                        continue
                    zd = ej * (d / cj) if ej > exact and osh == sh else 0.0  # Z_j |d_j| = e_j e^sh |d_j| / |c_j|
                    if exact < zd <= 1.0:  # a normal number in units of e^osh
                        z = zd + bj * o1
                        out_lz[t, j] = np.log(z) + osh
                        out_r[t, j] = (zd * (r[t, j] + ld) + bj * (o2 + lb * o1)) / z
                        continue
                    u = lz[t, j] + ld - osh  # the diagonal's log size against the others'
                    if u > 0.0:  # scale by the diagonal: every exponent is <= 0
                        ratio = np.exp(-u)
                        z = 1.0 + bj * o1 * ratio
                        out_lz[t, j] = lz[t, j] + ld + np.log(z)
                        out_r[t, j] = (r[t, j] + ld + bj * (o2 + lb * o1) * ratio) / z
                    else:
                        zd = np.exp(u)
                        z = zd + bj * o1
                        out_lz[t, j] = np.log(z) + osh
                        out_r[t, j] = (zd * (r[t, j] + ld) + bj * (o2 + lb * o1)) / z
                elif bj != 0.0:
                    out_lz[t, j], out_r[t, j] = lb + np.log(o1) + osh, o2 / o1 + lb
                else:
                    out_lz[t, j], out_r[t, j] = -np.inf, 0.0


def _rows(t: torch.Tensor, shape, dtype) -> np.ndarray:
    """``t`` broadcast to ``shape`` as a contiguous ``[rows, n]`` array."""
    return _np(t.to(dtype).expand(shape).reshape(-1, shape[-1]))


def rank1_max(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Max's ``out_j = max(|a_j + b_j c_j| v_j, |b_j| max_{k≠j} |c_k| v_k)`` along the last dim of ``v``."""
    shape = v.shape
    out = np.empty((int(np.prod(shape[:-1])), shape[-1]), dtype=_np(v[..., :0]).dtype)
    _rank1_max(_np(v.reshape(-1, shape[-1])), _rows(a, shape, v.dtype), _rows(b, shape, v.dtype),
               _rows(c, shape, v.dtype), out)
    return torch.from_numpy(out).reshape(shape)


def rank1_entropy(lz: torch.Tensor, r: torch.Tensor, a, b, c) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy's diagonal-plus-rank-one product on ``(log Z, R/Z)`` values along the last dim.

    The off-diagonal terms' logs ``w = log Z + log|c|``, their row maxima and ``exp(w - max)``
    are vectorised torch ops (a compiled loop calls exp and log one element at a time, several
    times slower); the loop makes the prefix and suffix sums and combines them."""
    shape = lz.shape
    rows, n = int(np.prod(shape[:-1])), shape[-1]
    g = torch.log(c.to(lz.dtype).abs())  # -inf where c = 0 (those terms are skipped)
    w = lz + g
    shift = w.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)
    e = torch.exp(w - shift)
    dtype = _np(lz[..., :0]).dtype
    out_lz, out_r = (np.empty((rows, n), dtype=dtype) for _ in range(2))
    _rank1_entropy(*(_np(t.reshape(-1, n)) for t in (lz, r, w, e)), _rows(g, shape, lz.dtype), _np(shift.reshape(-1)),
                   *(_rows(f, shape, lz.dtype) for f in (a, b, c)), out_lz, out_r)
    return torch.from_numpy(out_lz).reshape(shape), torch.from_numpy(out_r).reshape(shape)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _batch(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Broadcast x's N against w's N: returns (x [N, I, J], w [1 or N, J, K], N)."""
    n = max(x.shape[-3], w.shape[0])
    if x.shape[-3] != n:
        x = x.expand(*x.shape[:-3], n, *x.shape[-2:])
    return x, w, n


def max_times(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``out[n, i, k] = max_j x[n, i, j] · w[n, j, k]`` for non-negative x and w."""
    x, w, n = _batch(x, w.to(x.dtype))
    if not x.is_contiguous() and x.transpose(-1, -2).is_contiguous() and w.numel() < x.numel():
        # x is a transposed view (q·k's gradient towards k): outᵀ = wᵀ ⊗ xᵀ reads it as it lies, and
        # copies the smaller w (a transposed copy of x cost four times the product)
        return max_times(w.transpose(-1, -2).expand(n, -1, -1), x.transpose(-1, -2)).transpose(-1, -2)
    out = np.empty((n, x.shape[-2], w.shape[-1]), dtype=_np(x[..., :0, :0]).dtype)
    wn = _np(w)
    ends = np.full(wn.shape[:2], wn.shape[2], dtype=np.int64)
    if len(wn) > 1:  # a matrix per batch entry (patterns, gradients) may end early; one for all (a model's) is read whole
        _row_ends(wn, ends)
    _max_times(_np(x), wn, ends, out)
    return torch.from_numpy(out)


def kmax_times(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``out[:, n, i, k]`` = the k largest ``x[m, n, i, j] · w[n, j, k]`` over (m, j); x sorted in m."""
    x, w, n = _batch(x, w.to(x.dtype))
    out = np.empty((x.shape[0], n, x.shape[-2], w.shape[-1]), dtype=_np(x[..., :0, :0]).dtype)
    _kmax_times(_np(x), _np(w), out)
    return torch.from_numpy(out)


def signed_max_times(hi_x: torch.Tensor, lo_x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, min) over j of the signed products; ``hi_x = -inf`` marks no path; w = 0 is no edge."""
    hi_x, w, n = _batch(hi_x, w.to(hi_x.dtype))
    lo_x = lo_x.expand_as(hi_x)
    shape = (n, hi_x.shape[-2], w.shape[-1])
    dtype = _np(hi_x[..., :0, :0]).dtype
    hi, lo = np.empty(shape, dtype=dtype), np.empty(shape, dtype=dtype)
    _signed_max_times(_np(hi_x), _np(lo_x), _np(w), hi, lo)
    return torch.from_numpy(hi), torch.from_numpy(lo)


__all__ = ["available", "max_times", "kmax_times", "signed_max_times", "rank1_max", "rank1_entropy", "HAVE_NUMBA"]
