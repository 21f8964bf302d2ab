"""Compiled max–times products for the Max, KMax and SignedMax semirings (CPU, numba).

BLAS does not do ``out[i, k] = max_j x[i, j] · w[j, k]``; in plain torch the broadcast product is
~100x slower than the matching matmul. These loops run at about twice the matmul's time. They
take ``x: [N, I, J]`` (or ``[k, N, I, J]``) and ``w: [N or 1, J, K]``, contiguous, on the CPU;
``available(x)`` says when they apply (numba importable, CPU tensors, float32/float64), otherwise
the semirings fall back to chunked torch code (CUDA included).
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

    @njit(parallel=True, fastmath=_FLAGS, cache=True)
    def _max_times(x, w, out):  # pragma: no cover - compiled
        N, I, J = x.shape
        K = w.shape[2]
        shared = w.shape[0] == 1
        for t in prange(N * I):
            n = t // I
            i = t % I
            wn = w[0] if shared else w[n]
            row = out[n, i]
            for k in range(K):
                row[k] = 0.0
            for j in range(J):
                a = x[n, i, j]
                if a == 0.0:
                    continue
                wj = wn[j]
                for k in range(K):
                    v = a * wj[k]
                    if v > row[k]:
                        row[k] = v

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
    out = np.empty((n, x.shape[-2], w.shape[-1]), dtype=_np(x[..., :0, :0]).dtype)
    _max_times(_np(x), _np(w), out)
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


__all__ = ["available", "max_times", "kmax_times", "signed_max_times", "HAVE_NUMBA"]
