"""Edge weights: real tensors the semirings convert, stored once and computed lazily.

A ``Weight`` is one tensor or the product of broadcastable factors. A product is formed when a pass
needs it and freed after, so a per-position weight such as ``x̃ / (n s)`` costs no memory between
passes (autograd keeps ``x̃`` and ``s`` too, and forms the product in its backward). Expanded
dims (per-head copies of one vector) stay size one in the product, so it broadcasts: ``shape``
is the broadcast shape of the factors, not necessarily the node's.

A *shared* weight is one of the model's matrices (``W_Q``, ``W_in``, ...; with a norm's weight
folded in where the model has one). Every graph built from the model reuses the same ``Weight``
(``model_weights``), which keeps a product of factors (a folded norm's weight times the matrix) in
the matrix's own dtype, and its ``|W|`` and ``|W| log |W|`` in that dtype (read by most passes, and
by every Entropy pass: forming ``|W| log |W|`` per use made Entropy 25–30 % slower). Casts to another
dtype and α1β0's parts are formed as a block's pass reads them, one matrix at a time: an element-wise
op on one matrix is a fraction of the product it feeds, while keeping them for every matrix held 4–5
copies of the model (the SVA study peaked at 11.9 GB).
The cache is dropped when any parameter of the model changes (its ``_version`` or identity).

A factor may be ``Lazy``: a tensor formed from others each time a pass reads it (a long prompt's
attention pattern, recomputed from its queries and keys rather than kept: ``B·H·P²`` per layer).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch


class Lazy:
    """A tensor of known ``shape``, ``dtype`` and ``device`` formed by ``make()`` when it is read
    (``tensor()``) and not kept: while the last one formed is still held somewhere (the first
    factor of a block's pass), a second read returns it instead of forming it again."""

    def __init__(self, make: Callable[[], torch.Tensor], shape, dtype: torch.dtype, device):
        self.make, self.shape, self.dtype, self.device = make, torch.Size(shape), dtype, torch.device(device)
        self._last: weakref.ref | None = None

    def tensor(self) -> torch.Tensor:
        held = None if self._last is None else self._last()
        if held is None:
            held = self.make()
            self._last = weakref.ref(held)
        return held

    @property
    def ndim(self) -> int:
        return len(self.shape)


def resolved(t: "torch.Tensor | Lazy") -> torch.Tensor:
    """The tensor itself (a ``Lazy`` one formed now)."""
    return t.tensor() if isinstance(t, Lazy) else t


def lazily(fn: Callable[..., torch.Tensor], *args, shape=None):
    """``fn(*args)``, formed at once when no argument is ``Lazy``; otherwise a ``Lazy`` that forms
    it on each read (of ``shape``: the first lazy argument's unless given)."""
    first = next((a for a in args if isinstance(a, Lazy)), None)
    if first is None:
        return fn(*args)
    return Lazy(lambda: fn(*map(resolved, args)), first.shape if shape is None else shape, first.dtype, first.device)


def _is_tensor(f) -> bool:
    return isinstance(f, (torch.Tensor, Lazy))


class Weight:
    """A real weight: the product of ``factors`` (tensors, and numbers), in any dtype on demand."""

    def __init__(self, *factors: torch.Tensor | Lazy | float, shared: bool = False, nonnegative: bool = False):
        if not any(_is_tensor(f) for f in factors):
            raise ValueError("a Weight needs at least one tensor factor")
        self.factors = factors
        self.shared = shared
        self.nonnegative = nonnegative  # every factor is (an attention pattern, a factor >= 0): |w| is w
        self._cache: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._parts: dict[tuple, "Weight"] = {}

    @property
    def shape(self) -> torch.Size:
        return torch.broadcast_shapes(*(f.shape for f in self.factors if _is_tensor(f)))

    @property
    def device(self) -> torch.device:
        return next(f.device for f in self.factors if _is_tensor(f))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first tensor factor (its own: no cast, no copy)."""
        return next(f.dtype for f in self.factors if _is_tensor(f))

    def _get(self, kind: str, dtype: torch.dtype, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self.shared or dtype != self.dtype:  # kept in the matrix's own dtype only
            return make()
        key = (kind, dtype)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def real(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight itself, in ``dtype``."""

        def make() -> torch.Tensor:
            out = None
            for f in self.factors:
                if _is_tensor(f):
                    f = compact(resolved(f)).to(dtype)
                elif f == 1 and out is not None:  # a rule's factor one: no pass over the tensor
                    continue
                out = f if out is None else out * f
            return out if isinstance(out, torch.Tensor) else torch.as_tensor(out, dtype=dtype)

        return self._get("real", dtype, make)

    def part(self, sign: int) -> "Weight":
        """The positive (``sign=+1``) or negative (``-1``) part, ``max(w, 0)`` / ``min(w, 0)``, as a
        weight of its own, formed when a pass reads it and not kept (a clamp costs a fraction of
        the product it feeds; keeping both parts of every matrix would double the model)."""
        key = ("part", sign)
        if key not in self._parts:
            self._parts[key] = _Part(self, sign)
        return self._parts[key]

    def magnitude(self, dtype: torch.dtype) -> torch.Tensor:
        """|w| in ``dtype``, uncached. One tensor's is taken in its own dtype and cast (both exact),
        with no cast copy of the tensor itself; a weight known to be non-negative is its own."""
        if self.nonnegative:
            return self.real(dtype)
        if len(self.factors) == 1:
            return compact(resolved(self.factors[0])).abs().to(dtype)
        return self.real(dtype).abs()

    def abs(self, dtype: torch.dtype) -> torch.Tensor:
        """|w| (a shared matrix keeps its own dtype's)."""
        return self._get("abs", dtype, lambda: self.magnitude(dtype))

    def indicator(self, dtype: torch.dtype) -> torch.Tensor:
        """1 where w ≠ 0, else 0 (which edges exist); not kept (one comparison per pass of ``Count``)."""
        return (self.real(self.dtype) != 0).to(dtype)

    def xlogx(self, dtype: torch.dtype, magnitude: torch.Tensor | None = None) -> torch.Tensor:
        """|w| log |w| (0 log 0 = 0; a shared matrix keeps its own dtype's, which every Entropy pass
        reads at every block); ``magnitude`` may pass |w|."""

        def make() -> torch.Tensor:
            a = self.abs(dtype) if magnitude is None else magnitude
            return torch.special.xlogy(a, a)

        return self._get("xlogx", dtype, make)


class _Part(Weight):
    """``max(w, 0)`` or ``min(w, 0)`` of a base weight, computed on each use (the base keeps its own casts)."""

    def __init__(self, base: Weight, sign: int):
        self.base, self.sign = base, sign
        self.factors = base.factors
        self.shared = self.nonnegative = False
        self._cache, self._parts = {}, {}

    def real(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.base.real(self.base.dtype)
        return (w.clamp(min=0) if self.sign > 0 else w.clamp(max=0)).to(dtype)

    def magnitude(self, dtype: torch.dtype) -> torch.Tensor:
        return self.real(dtype).abs()


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every expanded (stride-0) dim cut to size 1: a product of per-head copies is
    computed once and broadcast, not once per copy."""
    if all(stride or size == 1 for stride, size in zip(t.stride(), t.shape)):
        return t
    return t[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in t.stride())]


def as_weight(w: Weight | torch.Tensor) -> Weight:
    return w if isinstance(w, Weight) else Weight(w)


# --------------------------------------------------------------------------- per-model cache

_MODELS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, dict]]" = weakref.WeakKeyDictionary()


_PARAMETERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, list]]" = weakref.WeakKeyDictionary()


def _fingerprint(model: torch.nn.Module) -> tuple:
    """Identity, version, dtype and device of every parameter: changes when any of them changes.
    The parameter list is kept per model (walking a TransformerLens module tree takes ~20 ms), and
    walked again when the model's modules change."""
    modules = len(model._modules) + sum(len(block._modules) for block in model.children())
    listed = _PARAMETERS.get(model)
    if listed is None or listed[0] != modules:
        listed = (modules, list(model.parameters()))
        _PARAMETERS[model] = listed
    return tuple((id(p), p._version, p.dtype, p.device) for p in listed[1])


def model_weights(model: torch.nn.Module) -> dict[tuple, Weight]:
    """The shared ``Weight`` objects of ``model`` by key (e.g. ``("W_Q", 3)``), rebuilt whenever a
    parameter changed. Callers fill it with ``shared_weight``."""
    fingerprint = _fingerprint(model)
    cached = _MODELS.get(model)
    if cached is None or cached[0] != fingerprint:
        cached = (fingerprint, {})
        _MODELS[model] = cached
    return cached[1]


def shared_weight(cache: dict[tuple, Weight], key: tuple, make: Callable[[], torch.Tensor]) -> Weight:
    """``cache[key]``, made once from ``make()`` (a detached tensor) and kept with the model."""
    if key not in cache:
        cache[key] = Weight(make().detach(), shared=True)
    return cache[key]
